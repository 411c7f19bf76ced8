"""The configuration loader (DESIGN §5): values, defaults, and every error with its exact
message: file, line, key path and hint."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rampiped.config import (
    AdaptiveConfig,
    Config,
    ConfigError,
    ConfigIssue,
    MetricsConfig,
    PinConfig,
    RamConfig,
    Size,
    SyncConfig,
    WatchRoot,
    load,
    load_text,
    parse_duration,
    parse_listen,
    parse_size,
    parse_size_or_percent,
)

SRC = "/etc/rampipe.conf"
EXAMPLE = Path(__file__).resolve().parents[2] / "rampipe.conf.example"


def cfg(text: str) -> Config:
    return load_text(textwrap.dedent(text), SRC)


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        cfg(text)
    return str(info.value).splitlines()


# --------------------------------------------------------------------------- values


def test_every_key_with_a_value_other_than_its_default() -> None:
    c = cfg(
        """
        runtime_dir: /run/rp
        journal_dir: /srv/rp-journal
        ram:
          max: 2G
          high_watermark: 0.75
          min_free: 1G
        sync:
          interval: 0
        adaptive:
          enabled: false
          watch:
            - path: /var/log
              depth: 2
              reopen: /usr/lib/rsyslog/rsyslog-rotate
            - path: /srv/app/logs
          exclude: [/var/log/journal, /var/log/private]
          half_life: 1m30s
          pin_above: 12.5
          hot_for: 500ms
          unpin_below: 0
          cool_for: 1h
          max_pins: 0
        pins:
          - path: /var/lib/pve-cluster
            sync_interval: 1m
            max_size: 64M
            before: [pve-cluster.service, corosync.service]
            reopen: systemctl reload pve-cluster.service
          - path: /srv/db
            mode: overlay
            sync_interval: 0
          - path: /home/*/.cache
            mode: volatile
            size: 2G
            keep: [pip, mozilla/firefox]
            max_age: 1d 12h
        metrics:
          textfile: /var/lib/prometheus/node-exporter/rampiped.prom
          listen: 127.0.0.1:9586
          interval: 1m
        """
    )
    assert c == Config(
        source=SRC,
        runtime_dir="/run/rp",
        journal_dir="/srv/rp-journal",
        ram=RamConfig(max=Size(bytes=2 << 30), high_watermark=0.75, min_free=1 << 30),
        sync=SyncConfig(interval=0.0),
        adaptive=AdaptiveConfig(
            enabled=False,
            watch=(
                WatchRoot("/var/log", 2, "/usr/lib/rsyslog/rsyslog-rotate"),
                WatchRoot("/srv/app/logs", 1, None),
            ),
            exclude=("/var/log/journal", "/var/log/private"),
            half_life=90.0,
            pin_above=12.5,
            hot_for=0.5,
            unpin_below=0.0,
            cool_for=3600.0,
            max_pins=0,
        ),
        pins=(
            PinConfig(
                path="/var/lib/pve-cluster",
                mode="copy",
                sync_interval=60.0,
                max_size=64 << 20,
                before=("pve-cluster.service", "corosync.service"),
                reopen="systemctl reload pve-cluster.service",
            ),
            PinConfig(path="/srv/db", mode="overlay", sync_interval=0.0),
            PinConfig(
                path="/home/*/.cache",
                mode="volatile",
                size=2 << 30,
                keep=("pip", "mozilla/firefox"),
                max_age=36 * 3600.0,
            ),
        ),
        metrics=MetricsConfig(
            textfile="/var/lib/prometheus/node-exporter/rampiped.prom",
            listen="127.0.0.1:9586",
            interval=60.0,
        ),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ram: {max: 25%}", Size(percent=25.0)),
        ("ram: {max: 12.5 %}", Size(percent=12.5)),
        ("ram: {max: 100%}", Size(percent=100.0)),
        ("ram: {max: 1073741824}", Size(bytes=1 << 30)),
        ("ram: {max: 1.5G}", Size(bytes=3 << 29)),
        ("ram: {max: 512MiB}", Size(bytes=512 << 20)),
    ],
)
def test_ram_max_is_a_size_or_a_percentage(text: str, expected: Size) -> None:
    assert cfg(text).ram.max == expected


def test_ram_backend_is_tmpfs_unless_zram_is_asked_for() -> None:
    assert cfg("").ram.backend == "tmpfs"
    assert cfg("").ram.compression == "lz4"
    zram = cfg("ram: {backend: zram, compression: zstd}").ram
    assert (zram.backend, zram.compression) == ("zram", "zstd")
    assert cfg("ram: {backend: zram, compression: lzo-rle}").ram.compression == "lzo-rle"


@pytest.mark.parametrize(
    ("value", "fraction"), [("90%", 0.9), ("0.9", 0.9), ("1", 1.0), ("100%", 1.0), ("'0.5'", 0.5)]
)
def test_high_watermark_is_a_percentage_or_a_fraction_stored_as_fraction(
    value: str, fraction: float
) -> None:
    assert cfg(f"ram: {{high_watermark: {value}}}").ram.high_watermark == fraction


@pytest.mark.parametrize(
    "text",
    ["", "\n", "# only a comment\n", "{}", "---\n", "~\n", "ram:\nsync:\nadaptive:\n"],
)
def test_an_empty_file_is_the_defaults_with_its_source(text: str) -> None:
    assert load_text(text, SRC) == dataclasses.replace(Config(), source=SRC)


def test_empty_lists_are_empty() -> None:
    c = cfg("adaptive:\n  watch:\n  exclude: []\npins:\n")
    assert c.adaptive.watch == ()
    assert c.adaptive.exclude == ()
    assert c.pins == ()


def test_json_is_accepted_also_indented_with_tabs() -> None:
    document = {
        "ram": {"max": "1G", "high_watermark": 0.8},
        "adaptive": {"watch": [{"path": "/var/log", "depth": 2}], "exclude": []},
        "pins": [{"path": "/var/lib/pve-cluster", "before": ["pve-cluster.service"]}],
    }
    for text in (json.dumps(document), json.dumps(document, indent="\t")):
        c = load_text(text, "/etc/rampipe.json")
        assert c.ram == RamConfig(max=Size(bytes=1 << 30), high_watermark=0.8)
        assert c.adaptive.watch == (WatchRoot("/var/log", 2),)
        assert c.adaptive.exclude == ()
        assert c.pins == (PinConfig("/var/lib/pve-cluster", before=("pve-cluster.service",)),)


def test_json_errors_name_their_line() -> None:
    text = '{\n\t"ram": {\n\t\t"max": "lots"\n\t}\n}\n'
    with pytest.raises(ConfigError) as info:
        load_text(text, "c.json")
    assert str(info.value) == (
        "c.json:3: ram.max: expected a size like 512M, 2G, a number of bytes or a percentage "
        "like 25%, got 'lots'"
    )


def test_yaml_merge_keys_share_settings() -> None:
    c = cfg(
        """
        pins:
          - &db {path: /srv/a, mode: overlay, sync_interval: 30s}
          - {<<: *db, path: /srv/b}
        """
    )
    assert c.pins[1] == PinConfig("/srv/b", mode="overlay", sync_interval=30.0)


def test_yaml_one_one_sexagesimal_is_a_number_of_seconds() -> None:
    # YAML 1.1 reads 1:30 as the integer 90; as a duration that is 90 seconds, as meant.
    assert cfg("sync: {interval: 1:30}").sync.interval == 90.0


def test_checkpoint_at_session_end_is_off_unless_asked() -> None:
    assert cfg("sync: {interval: 1m}").sync == SyncConfig(interval=60.0, on_session_end=False)
    assert cfg("sync: {on_session_end: true}").sync == SyncConfig(on_session_end=True)
    assert errors("sync:\n  on_session_end: 1\n") == [
        f"{SRC}:2: sync.on_session_end: expected true or false, got 1"
    ]


# --------------------------------------------------------------------------- the example file


def test_the_example_file_is_valid_and_shows_the_defaults() -> None:
    assert load(str(EXAMPLE)) == dataclasses.replace(Config(), source=str(EXAMPLE))


def _uncommented_example() -> str:
    """The example with its commented-out settings (`#pins:`, `#  - path: ...`, `#  reopen:`)
    switched on; prose comments stay."""
    keys = "pins|path|mode|sync_interval|max_size|before|size|keep|reopen|max_age|textfile|listen"
    return re.sub(rf"(?m)^#(?=\s*(- )?({keys}):(\s|$)|  # )", "", EXAMPLE.read_text())


def test_the_example_files_commented_settings_are_valid() -> None:
    c = load_text(_uncommented_example(), "example")
    assert c.adaptive.watch == (WatchRoot("/var/log", 1, "/usr/lib/rsyslog/rsyslog-rotate"),)
    assert c.pins == (
        PinConfig(
            path="/var/lib/pve-cluster",
            mode="copy",
            sync_interval=60.0,
            max_size=64 << 20,
            before=("pve-cluster.service",),
        ),
        PinConfig(
            path="/home/*/.cache",
            mode="volatile",
            size=2 << 30,
            keep=("pip",),
            max_age=30 * 86400.0,
        ),
    )
    assert c.metrics == MetricsConfig(
        textfile="/var/lib/prometheus/node-exporter/rampiped.prom", listen="127.0.0.1:9586"
    )


def test_the_example_file_documents_every_key() -> None:
    """Each key of the schema is set in the example (maybe commented out) and is described by a
    comment: the one right above it, or, for pins, the key list above `#pins:`."""
    lines = _uncommented_example().splitlines()
    sections = (Config, RamConfig, SyncConfig, AdaptiveConfig, WatchRoot, PinConfig, MetricsConfig)
    for section in sections:
        for f in dataclasses.fields(section):
            if f.name == "source":
                continue
            at = [i for i, line in enumerate(lines) if re.match(rf"\s*(- )?{f.name}:", line)]
            assert at, f"{f.name} is not in the example"
            text = "\n".join(lines)
            described = (
                lines[at[0] - 1].lstrip().startswith("#")  # the comment right above
                or f"#   {f.name} " in text  # the list of pin keys
                or f"`{f.name}`" in text  # the comment on watch roots
            )
            assert described, f"{f.name} has no comment"


# --------------------------------------------------------------------------- errors, one by one

TOO_DEEP = "YAML syntax error: nested too deeply (more than 100 levels of lists and mappings)"

# (what, YAML, the exact message lines)
ERRORS = [
    # ---- structure
    (
        "top level not a mapping",
        "- a\n- b\n",
        [
            f"{SRC}:1: expected a mapping of settings (key: value lines) at the top level, "
            "got a list"
        ],
    ),
    (
        "unknown top-level key",
        "runtime_dir: /run/rampiped\nruntim_dir: /run/x\n",
        [
            f"{SRC}:2: runtim_dir: unknown key (did you mean runtime_dir? known keys here: "
            "runtime_dir, journal_dir, ram, sync, adaptive, pins, metrics)"
        ],
    ),
    (
        "unknown nested key without a close match",
        "ram:\n  colour: blue\n",
        [
            f"{SRC}:2: ram.colour: unknown key (known keys here: max, high_watermark, min_free,"
            " backend, compression)"
        ],
    ),
    (
        "unknown key in a list item",
        "pins:\n  - path: /srv/a\n    mod: copy\n",
        [
            f"{SRC}:3: pins[0].mod: unknown key (did you mean mode? known keys here: path, mode, "
            "sync_interval, max_size, before, size, keep, reopen, max_age)"
        ],
    ),
    (
        "repeated key",
        "ram:\n  max: 1G\n  max: 2G\n",
        [f"{SRC}:3: ram.max: repeated key (first given at line 2)"],
    ),
    ("key that is not a name", "7: x\n", [f"{SRC}:1: expected a key name, got 7"]),
    (
        "section that is not a mapping",
        "sync: 5m\n",
        [f"{SRC}:1: sync: expected a mapping of settings, got '5m'"],
    ),
    (
        "unsupported tag",
        "sync:\n  interval: !!python/name:os.system\n",
        [
            f"{SRC}:2: sync.interval: cannot read this value: could not determine a constructor "
            "for the tag 'tag:yaml.org,2002:python/name:os.system'"
        ],
    ),
    (
        "value that does not fit its explicit tag",
        "sync:\n  interval: !!bool maybe\n",
        [f"{SRC}:2: sync.interval: cannot read this value: 'maybe' is not a !!bool"],
    ),
    (
        "impossible date",
        "sync:\n  interval: 2024-13-45\n",
        [f"{SRC}:2: sync.interval: cannot read this value: '2024-13-45' is not a !!timestamp"],
    ),
    # ---- durations
    (
        "duration garbage",
        "adaptive:\n  half_life: fast\n",
        [
            f"{SRC}:2: adaptive.half_life: expected a duration like 10s, 5m or a number of "
            "seconds, got 'fast'"
        ],
    ),
    (
        "negative duration",
        "sync:\n  interval: -5s\n",
        [
            f"{SRC}:2: sync.interval: expected a duration like 10s, 5m or a number of seconds, "
            "got '-5s' (a duration cannot be negative)"
        ],
    ),
    (
        "negative number of seconds",
        "sync:\n  interval: -1\n",
        [
            f"{SRC}:2: sync.interval: expected a duration like 10s, 5m or a number of seconds, "
            "got -1 (a duration cannot be negative)"
        ],
    ),
    (
        "unknown duration unit",
        "sync:\n  interval: 5M\n",
        [
            f"{SRC}:2: sync.interval: expected a duration like 10s, 5m or a number of seconds, "
            "got '5M' (units are ms, s, m, h and d)"
        ],
    ),
    (
        "duration as a boolean",
        "adaptive:\n  cool_for: yes\n",
        [
            f"{SRC}:2: adaptive.cool_for: expected a duration like 10s, 5m or a number of "
            "seconds, got yes (a boolean)"
        ],
    ),
    (
        "duration not a number",
        "adaptive:\n  hot_for: .nan\n",
        [
            f"{SRC}:2: adaptive.hot_for: expected a duration like 10s, 5m or a number of "
            "seconds, got .nan (not a number)"
        ],
    ),
    (
        "infinite duration",
        "adaptive:\n  hot_for: .inf\n",
        [
            f"{SRC}:2: adaptive.hot_for: expected a duration like 10s, 5m or a number of "
            "seconds, got .inf (must be finite)"
        ],
    ),
    (
        "duration beyond a century",
        "sync:\n  interval: 36600d\n",
        [
            f"{SRC}:2: sync.interval: expected a duration like 10s, 5m or a number of seconds, "
            "got '36600d' (at most 100 years)"
        ],
    ),
    (
        "zero where a duration must be positive",
        "adaptive:\n  half_life: 0s\n  hot_for: 0\n",
        [
            f"{SRC}:2: adaptive.half_life: expected a duration greater than 0, got '0s'",
            f"{SRC}:3: adaptive.hot_for: expected a duration greater than 0, got 0",
        ],
    ),
    (
        "empty duration",
        "adaptive:\n  cool_for:\n",
        [
            f"{SRC}:2: adaptive.cool_for: expected a duration like 10s, 5m or a number of "
            "seconds, got nothing"
        ],
    ),
    # ---- RAM backend
    (
        "unknown ram backend",
        "ram:\n  backend: zfs\n",
        [f"{SRC}:2: ram.backend: expected one of tmpfs, zram, got 'zfs'"],
    ),
    (
        "ram backend not a string",
        "ram:\n  backend: [zram]\n",
        [f"{SRC}:2: ram.backend: expected one of tmpfs, zram, got a list"],
    ),
    (
        "unknown compressor",
        "ram:\n  backend: zram\n  compression: gzip\n",
        [
            f"{SRC}:3: ram.compression: expected one of lz4, lz4hc, lzo, lzo-rle, zstd, deflate,"
            " 842, got 'gzip'"
        ],
    ),
    # ---- sizes and percentages
    (
        "size garbage",
        "ram:\n  min_free: lots\n",
        [f"{SRC}:2: ram.min_free: expected a size like 512M, 2G or a number of bytes, got 'lots'"],
    ),
    (
        "decimal size unit",
        "ram:\n  min_free: 64MB\n",
        [
            f"{SRC}:2: ram.min_free: expected a size like 512M, 2G or a number of bytes, "
            "got '64MB' (write 64M or 64MiB: powers of 1024)"
        ],
    ),
    (
        "unknown size unit",
        "ram:\n  min_free: 64X\n",
        [
            f"{SRC}:2: ram.min_free: expected a size like 512M, 2G or a number of bytes, "
            "got '64X' (units are K, M, G and T (powers of 1024))"
        ],
    ),
    (
        "percentage where only a size goes",
        "ram:\n  min_free: 10%\n",
        [
            f"{SRC}:2: ram.min_free: expected a size like 512M, 2G or a number of bytes, "
            "got '10%' (a percentage is not allowed here)"
        ],
    ),
    (
        "fractional bytes",
        "ram:\n  min_free: 1.5\n",
        [
            f"{SRC}:2: ram.min_free: expected a size like 512M, 2G or a number of bytes, "
            "got 1.5 (a number of bytes must be whole)"
        ],
    ),
    (
        "negative size",
        "ram:\n  min_free: -1\n",
        [
            f"{SRC}:2: ram.min_free: expected a size like 512M, 2G or a number of bytes, "
            "got -1 (a size cannot be negative)"
        ],
    ),
    (
        "size as a boolean",
        "ram:\n  min_free: on\n",
        [
            f"{SRC}:2: ram.min_free: expected a size like 512M, 2G or a number of bytes, "
            "got on (a boolean)"
        ],
    ),
    (
        "size beyond 64 bits",
        "ram:\n  min_free: 9999999T\n",
        [
            f"{SRC}:2: ram.min_free: expected a size like 512M, 2G or a number of bytes, "
            "got '9999999T' (too large)"
        ],
    ),
    (
        "ram.max percentage out of range",
        "ram:\n  max: 150%\n",
        [f"{SRC}:2: ram.max: expected a percentage above 0% and at most 100%, got '150%'"],
    ),
    (
        "ram.max zero percent",
        "ram:\n  max: 0%\n",
        [f"{SRC}:2: ram.max: expected a percentage above 0% and at most 100%, got '0%'"],
    ),
    (
        "ram.max zero bytes",
        "ram:\n  max: 0\n",
        [f"{SRC}:2: ram.max: expected a size greater than 0, got 0"],
    ),
    (
        "ram.max negative percentage",
        "ram:\n  max: -5%\n",
        [
            f"{SRC}:2: ram.max: expected a size like 512M, 2G, a number of bytes or a percentage "
            "like 25%, got '-5%' (cannot be negative)"
        ],
    ),
    (
        "high_watermark as a whole percentage number",
        "ram:\n  high_watermark: 90\n",
        [
            f"{SRC}:2: ram.high_watermark: expected a percentage like 90% or a fraction like "
            "0.9, got 90 (did you mean 90%?)"
        ],
    ),
    (
        "high_watermark above 100%",
        "ram:\n  high_watermark: 120%\n",
        [
            f"{SRC}:2: ram.high_watermark: expected a percentage like 90% or a fraction like "
            "0.9, got '120%' (must be above 0% and at most 100%)"
        ],
    ),
    (
        "high_watermark zero",
        "ram:\n  high_watermark: 0\n",
        [
            f"{SRC}:2: ram.high_watermark: expected a percentage like 90% or a fraction like "
            "0.9, got 0 (must be above 0 and at most 1)"
        ],
    ),
    (
        "pin max_size zero",
        "pins:\n  - path: /srv/a\n    max_size: 0\n",
        [f"{SRC}:3: pins[0].max_size: expected a size greater than 0, got 0"],
    ),
    (
        "volatile size zero",
        "pins:\n  - path: /srv/a\n    mode: volatile\n    size: 0K\n",
        [f"{SRC}:4: pins[0].size: expected a size greater than 0, got '0K'"],
    ),
    # ---- rates, counts, switches, words
    (
        "pin_above zero",
        "adaptive:\n  pin_above: 0\n",
        [
            f"{SRC}:2: adaptive.pin_above: expected a number of events per second greater "
            "than 0, got 0"
        ],
    ),
    (
        "unpin_below negative",
        "adaptive:\n  unpin_below: -1\n",
        [
            f"{SRC}:2: adaptive.unpin_below: expected a number of events per second, got -1 "
            "(cannot be negative)"
        ],
    ),
    (
        "rate as text",
        "adaptive:\n  pin_above: lots\n",
        [f"{SRC}:2: adaptive.pin_above: expected a number of events per second, got 'lots'"],
    ),
    (
        "inverted thresholds",
        "adaptive:\n  pin_above: 50\n  unpin_below: 60\n",
        [
            f"{SRC}:3: adaptive.unpin_below: must be less than adaptive.pin_above "
            "(unpin_below is 60, pin_above is 50)"
        ],
    ),
    (
        "equal thresholds",
        "adaptive:\n  pin_above: 7.5\n  unpin_below: 7.5\n",
        [
            f"{SRC}:3: adaptive.unpin_below: must be less than adaptive.pin_above "
            "(unpin_below is 7.5, pin_above is 7.5)"
        ],
    ),
    (
        "pin_above below the default unpin_below",
        "adaptive:\n  pin_above: 3\n",
        [
            f"{SRC}:2: adaptive.unpin_below: must be less than adaptive.pin_above "
            "(unpin_below is 5 by default, pin_above is 3)"
        ],
    ),
    (
        "max_pins negative",
        "adaptive:\n  max_pins: -1\n",
        [
            f"{SRC}:2: adaptive.max_pins: expected a whole number (0 or more), got -1 "
            "(cannot be negative)"
        ],
    ),
    (
        "max_pins fractional",
        "adaptive:\n  max_pins: 2.5\n",
        [f"{SRC}:2: adaptive.max_pins: expected a whole number (0 or more), got 2.5"],
    ),
    (
        "enabled not a boolean",
        "adaptive:\n  enabled: maybe\n",
        [f"{SRC}:2: adaptive.enabled: expected true or false, got 'maybe'"],
    ),
    (
        "unknown mode",
        "pins:\n  - path: /srv/a\n    mode: ram\n",
        [f"{SRC}:3: pins[0].mode: expected one of copy, overlay, volatile, got 'ram'"],
    ),
    (
        "empty reopen command",
        "pins:\n  - path: /srv/a\n    reopen: ''\n",
        [f"{SRC}:3: pins[0].reopen: expected a command line, got ''"],
    ),
    # ---- lists
    (
        "list given as a single string",
        "adaptive:\n  exclude: /var/log/journal\n",
        [
            f"{SRC}:2: adaptive.exclude: expected a list of absolute paths, got "
            "'/var/log/journal' (write [/var/log/journal] for a list of one)"
        ],
    ),
    (
        "watch root that is not a mapping",
        "adaptive:\n  watch:\n    - /var/log\n",
        [
            f"{SRC}:3: adaptive.watch[0]: expected a mapping like {{path: /dir, depth: 1}}, "
            "got '/var/log'"
        ],
    ),
    (
        "watch root without a path",
        "adaptive:\n  watch:\n    - depth: 2\n",
        [f"{SRC}:3: adaptive.watch[0].path: required key is missing"],
    ),
    (
        "watch depth negative",
        "adaptive:\n  watch:\n    - path: /var/log\n      depth: -1\n",
        [
            f"{SRC}:4: adaptive.watch[0].depth: expected a whole number (0 or more), got -1 "
            "(cannot be negative)"
        ],
    ),
    (
        "pins not a list",
        "pins:\n  path: /srv/a\n",
        [f"{SRC}:2: pins: expected a list of pins, got a mapping"],
    ),
    (
        "pin that is not a mapping",
        "pins:\n  - /srv/a\n",
        [f"{SRC}:2: pins[0]: expected a mapping like {{path: /dir}}, got '/srv/a'"],
    ),
    (
        "pin without a path",
        "pins:\n  - path: /srv/a\n  - mode: copy\n",
        [f"{SRC}:3: pins[1].path: required key is missing"],
    ),
    (
        "before a unit without a type",
        "pins:\n  - path: /srv/a\n    before: [pve-cluster]\n",
        [
            f"{SRC}:3: pins[0].before[0]: expected a systemd unit name like pve-cluster.service, "
            "got 'pve-cluster' (unit names end in .service, .socket, .mount, .target, .timer, "
            ".path, .scope, .slice, .swap, .device, .automount)"
        ],
    ),
    (
        "before a unit with a space",
        "pins:\n  - path: /srv/a\n    before: ['my app.service']\n",
        [
            f"{SRC}:3: pins[0].before[0]: expected a systemd unit name like pve-cluster.service, "
            "got 'my app.service' (unit names use letters, digits and :-_.\\@)"
        ],
    ),
    (
        "before a unit twice",
        "pins:\n  - path: /srv/a\n    before:\n      - a.service\n      - a.service\n",
        [f"{SRC}:5: pins[0].before[1]: repeats pins[0].before[0]"],
    ),
    (
        "keep entries that are not relative names",
        "pins:\n  - path: /srv/a\n    mode: volatile\n    keep: [../x, /abs, a//b, '']\n",
        [
            f"{SRC}:4: pins[0].keep[0]: expected a directory name relative to the pin, like pip "
            "or a/b, got '../x' (.. is not allowed)",
            f"{SRC}:4: pins[0].keep[1]: expected a directory name relative to the pin, like pip "
            "or a/b, got '/abs' (keep names are relative to the pin)",
            f"{SRC}:4: pins[0].keep[2]: expected a directory name relative to the pin, like pip "
            "or a/b, got 'a//b' (write 'a/b')",
            f"{SRC}:4: pins[0].keep[3]: expected a directory name relative to the pin, like pip "
            "or a/b, got ''",
        ],
    ),
    (
        "size and keep on a copy pin",
        "pins:\n  - path: /srv/a\n    size: 1G\n    keep: [x]\n",
        [
            f"{SRC}:3: pins[0].size: applies only to volatile pins (this pin's mode is copy)",
            f"{SRC}:4: pins[0].keep: applies only to volatile pins (this pin's mode is copy)",
        ],
    ),
    (
        "max_age on a copy pin",
        "pins:\n  - path: /srv/a\n    max_age: 10m\n",
        [f"{SRC}:3: pins[0].max_age: applies only to volatile pins (this pin's mode is copy)"],
    ),
    (
        "max_age zero",
        "pins:\n  - path: /srv/a\n    mode: volatile\n    max_age: 0\n",
        [f"{SRC}:4: pins[0].max_age: expected a duration greater than 0, got 0"],
    ),
    (
        "max_age negative",
        "pins:\n  - path: /srv/a\n    mode: volatile\n    max_age: -10m\n",
        [
            f"{SRC}:4: pins[0].max_age: expected a duration like 10s, 5m or a number of seconds,"
            " got '-10m' (a duration cannot be negative)"
        ],
    ),
    (
        "max_age without a known unit",
        "pins:\n  - path: /srv/a\n    mode: volatile\n    max_age: 10 minutes\n",
        [
            f"{SRC}:4: pins[0].max_age: expected a duration like 10s, 5m or a number of seconds,"
            " got '10 minutes' (units are ms, s, m, h and d)"
        ],
    ),
    (
        "sync_interval on a volatile pin",
        "pins:\n  - path: /srv/a\n    mode: volatile\n    sync_interval: 1m\n",
        [
            f"{SRC}:4: pins[0].sync_interval: does not apply to volatile pins: nothing is "
            "written back"
        ],
    ),
    # ---- paths
    (
        "relative path",
        "runtime_dir: run/rampiped\n",
        [
            f"{SRC}:1: runtime_dir: expected an absolute path, got 'run/rampiped' "
            "(it must start with /)"
        ],
    ),
    (
        "home directory shorthand",
        "pins:\n  - path: ~/.cache\n",
        [
            f"{SRC}:2: pins[0].path: expected an absolute path, got '~/.cache' "
            "(~ is not expanded: write the whole path)"
        ],
    ),
    (
        "trailing slash",
        "journal_dir: /var/lib/rampiped/\n",
        [
            f"{SRC}:1: journal_dir: expected a normalised absolute path, got "
            "'/var/lib/rampiped/' (write '/var/lib/rampiped')"
        ],
    ),
    (
        "dot-dot",
        "adaptive:\n  exclude: [/var/log/../lib]\n",
        [
            f"{SRC}:2: adaptive.exclude[0]: expected a normalised absolute path, got "
            "'/var/log/../lib' (write '/var/lib')"
        ],
    ),
    (
        "doubled slash",
        "adaptive:\n  watch: [{path: /var//log}]\n",
        [
            f"{SRC}:2: adaptive.watch[0].path: expected a normalised absolute path, got "
            "'/var//log' (write '/var/log')"
        ],
    ),
    (
        "glob outside a pin",
        "adaptive:\n  exclude: [/var/log/*.old]\n",
        [
            f"{SRC}:2: adaptive.exclude[0]: expected a path without glob characters, got "
            "'/var/log/*.old' (*, ? and [ are allowed only in pin paths)"
        ],
    ),
    (
        "path not a string",
        "runtime_dir: 5\n",
        [f"{SRC}:1: runtime_dir: expected an absolute path, got 5"],
    ),
    (
        "NUL in a path",
        'journal_dir: "/var/lib/a\\0b"\n',
        [
            f"{SRC}:1: journal_dir: expected an absolute path, got '/var/lib/a\\x00b' "
            "(a path cannot contain a NUL character)"
        ],
    ),
    # ---- paths that cannot be pinned or watched
    (
        "pin the root",
        "pins:\n  - path: /\n",
        [
            f"{SRC}:2: pins[0].path: cannot pin /: it is the whole root filesystem "
            "(name directories below it)"
        ],
    ),
    (
        "pin in /proc",
        "pins:\n  - path: /proc/sys\n",
        [f"{SRC}:2: pins[0].path: cannot pin /proc/sys: /proc is a kernel virtual filesystem"],
    ),
    (
        "pin /sys",
        "pins:\n  - path: /sys\n",
        [f"{SRC}:2: pins[0].path: cannot pin /sys: /sys is a kernel virtual filesystem"],
    ),
    (
        "pin in /dev",
        "pins:\n  - path: /dev/shm\n",
        [f"{SRC}:2: pins[0].path: cannot pin /dev/shm: /dev is the kernel's device filesystem"],
    ),
    (
        "pin in /run",
        "pins:\n  - path: /run/user\n",
        [f"{SRC}:2: pins[0].path: cannot pin /run/user: /run is already in RAM (tmpfs)"],
    ),
    (
        "pin /boot",
        "pins:\n  - path: /boot/grub\n",
        [
            f"{SRC}:2: pins[0].path: cannot pin /boot/grub: /boot is for boot files, which must "
            "be on disk when the machine starts"
        ],
    ),
    (
        "glob that can reach /proc",
        "pins:\n  - path: /*/cache\n",
        [
            f"{SRC}:2: pins[0].path: cannot pin /*/cache: it can match a directory in /proc, "
            "which is a kernel virtual filesystem"
        ],
    ),
    (
        "watch /sys",
        "adaptive:\n  watch: [{path: /sys/kernel}]\n",
        [
            f"{SRC}:2: adaptive.watch[0].path: cannot watch /sys/kernel: /sys is a kernel "
            "virtual filesystem"
        ],
    ),
    (
        "watch the root",
        "adaptive:\n  watch: [{path: /}]\n",
        [
            f"{SRC}:2: adaptive.watch[0].path: cannot watch /: it is the whole root filesystem "
            "(name directories below it)"
        ],
    ),
    (
        "pin inside journal_dir",
        "pins:\n  - path: /var/lib/rampiped/x\n",
        [
            f"{SRC}:2: pins[0].path: cannot pin /var/lib/rampiped/x: it is inside journal_dir "
            "(/var/lib/rampiped), which rampiped uses itself"
        ],
    ),
    (
        "pin inside runtime_dir",
        "runtime_dir: /srv/rp\npins:\n  - path: /srv/rp\n",
        [
            f"{SRC}:3: pins[0].path: cannot pin /srv/rp: it is the same directory as runtime_dir "
            "(/srv/rp), which rampiped uses itself"
        ],
    ),
    (
        "pin containing journal_dir",
        "pins:\n  - path: /var/lib\n",
        [
            f"{SRC}:2: pins[0].path: cannot pin /var/lib: it contains journal_dir "
            "(/var/lib/rampiped), which rampiped uses itself"
        ],
    ),
    (
        "glob pin that can contain journal_dir",
        "pins:\n  - path: /var/*\n",
        [
            f"{SRC}:2: pins[0].path: cannot pin /var/*: it can match a directory that contains "
            "journal_dir (/var/lib/rampiped), which rampiped uses itself"
        ],
    ),
    (
        "watch root inside journal_dir",
        "adaptive:\n  watch: [{path: /var/lib/rampiped}]\n",
        [
            f"{SRC}:2: adaptive.watch[0].path: cannot watch /var/lib/rampiped: it is the same "
            "directory as journal_dir (/var/lib/rampiped), which rampiped uses itself"
        ],
    ),
    (
        "journal_dir below /run",
        "journal_dir: /run/rampiped-journal\n",
        [
            f"{SRC}:1: journal_dir: cannot use /run/rampiped-journal: /run is already in RAM "
            "(tmpfs), and journal_dir must be on disk"
        ],
    ),
    (
        "runtime_dir in /proc",
        "runtime_dir: /proc/rampiped\n",
        [f"{SRC}:1: runtime_dir: cannot use /proc/rampiped: /proc is a kernel virtual filesystem"],
    ),
    (
        "journal_dir the root",
        "journal_dir: /\n",
        [f"{SRC}:1: journal_dir: cannot use /: name a directory of rampiped's own"],
    ),
    (
        "runtime_dir inside journal_dir",
        "runtime_dir: /var/lib/rampiped/run\n",
        [
            f"{SRC}:1: runtime_dir: /var/lib/rampiped/run is inside journal_dir "
            "(/var/lib/rampiped): the RAM area and the on-disk journal must be separate "
            "directories"
        ],
    ),
    (
        "journal_dir the same as runtime_dir",
        "runtime_dir: /srv/rp\njournal_dir: /srv/rp\n",
        [
            f"{SRC}:2: journal_dir: /srv/rp is the same directory as runtime_dir (/srv/rp): the "
            "RAM area and the on-disk journal must be separate directories"
        ],
    ),
    # ---- pins against each other, excludes and watch roots
    (
        "duplicate pin",
        "pins:\n  - path: /srv/a\n  - path: /srv/b\n  - path: /srv/a\n",
        [f"{SRC}:4: pins[2].path: /srv/a repeats pins[0]"],
    ),
    (
        "pin inside an earlier pin",
        "pins:\n  - path: /var/lib/pve-cluster\n  - path: /var/lib/pve-cluster/db\n",
        [
            f"{SRC}:3: pins[1].path: /var/lib/pve-cluster/db is inside pins[0] "
            "(/var/lib/pve-cluster): a directory can be in only one pin"
        ],
    ),
    (
        "pin containing an earlier pin",
        "pins:\n  - path: /srv/a/b\n  - path: /srv/a\n",
        [
            f"{SRC}:3: pins[1].path: /srv/a contains pins[0] (/srv/a/b): a directory can be in "
            "only one pin"
        ],
    ),
    (
        "pin that a glob pin can match",
        "pins:\n  - path: /home/*/.cache\n  - path: /home/alice/.cache/pip\n",
        [
            f"{SRC}:3: pins[1].path: /home/alice/.cache/pip can match a directory inside pins[0] "
            "(/home/*/.cache): a directory can be in only one pin"
        ],
    ),
    (
        "two globs that can match the same directory",
        "pins:\n  - path: /home/*/.cache\n  - path: /home/a*/.c*\n",
        [
            f"{SRC}:3: pins[1].path: /home/a*/.c* can match the same directory as pins[0] "
            "(/home/*/.cache): a directory can be in only one pin"
        ],
    ),
    (
        "pin inside an excluded tree",
        "pins:\n  - path: /var/log/journal/remote\n",
        [
            f"{SRC}:2: pins[0].path: /var/log/journal/remote is inside /var/log/journal "
            "(adaptive.exclude[0]): an excluded tree cannot hold a static pin"
        ],
    ),
    (
        "watch root inside a static pin",
        "adaptive:\n  watch: [{path: /srv/app/logs}]\npins:\n  - path: /srv/app\n",
        [
            f"{SRC}:2: adaptive.watch[0].path: /srv/app/logs is inside pins[0] (/srv/app): a "
            "watch root cannot be inside a static pin"
        ],
    ),
    (
        "pin that contains the default watch root",
        "pins:\n  - path: /var/log\n",
        [
            f"{SRC}:2: pins[0].path: /var/log is the same directory as the default watch root "
            "/var/log (adaptive.watch[0]): a watch root cannot be inside a static pin "
            "(set adaptive.watch)"
        ],
    ),
    (
        "the same watch root twice",
        "adaptive:\n  watch:\n    - path: /var/log\n    - path: /var/log\n      depth: 2\n",
        [f"{SRC}:4: adaptive.watch[1].path: repeats adaptive.watch[0].path"],
    ),
    (
        "the same exclude twice",
        "adaptive:\n  exclude: [/a, /b, /a]\n",
        [f"{SRC}:2: adaptive.exclude[2]: repeats adaptive.exclude[0]"],
    ),
    # ---- metrics
    (
        "metrics listener on every interface",
        "metrics:\n  listen: 0.0.0.0:9586\n",
        [
            f"{SRC}:2: metrics.listen: expected a loopback address and port like 127.0.0.1:9586"
            " or [::1]:9586, got '0.0.0.0:9586' (the endpoint has no authentication, so"
            " rampiped serves it to this machine only; let node_exporter read"
            " metrics.textfile, or put a proxy in front)"
        ],
    ),
    (
        "metrics listener on a LAN address",
        "metrics: {listen: 192.168.1.10:9586}\n",
        [
            f"{SRC}:1: metrics.listen: expected a loopback address and port like 127.0.0.1:9586"
            " or [::1]:9586, got '192.168.1.10:9586' (the endpoint has no authentication, so"
            " rampiped serves it to this machine only; let node_exporter read"
            " metrics.textfile, or put a proxy in front)"
        ],
    ),
    (
        "metrics listener on IPv6 any",
        'metrics: {listen: "[::]:9586"}\n',
        [
            f"{SRC}:1: metrics.listen: expected a loopback address and port like 127.0.0.1:9586"
            " or [::1]:9586, got '[::]:9586' (the endpoint has no authentication, so"
            " rampiped serves it to this machine only; let node_exporter read"
            " metrics.textfile, or put a proxy in front)"
        ],
    ),
    (
        "metrics listener given as a port only",
        "metrics: {listen: 9586}\n",
        [
            f"{SRC}:1: metrics.listen: expected a loopback address and port like 127.0.0.1:9586"
            " or [::1]:9586, got 9586 (write 127.0.0.1:9586)"
        ],
    ),
    (
        "metrics listener given as a host name",
        "metrics: {listen: localhost:9586}\n",
        [
            f"{SRC}:1: metrics.listen: expected a loopback address and port like 127.0.0.1:9586"
            " or [::1]:9586, got 'localhost:9586' (write the address as digits (127.0.0.1 or"
            " [::1]), not a name)"
        ],
    ),
    (
        "metrics listener without a port",
        "metrics: {listen: 127.0.0.1}\n",
        [
            f"{SRC}:1: metrics.listen: expected a loopback address and port like 127.0.0.1:9586"
            " or [::1]:9586, got '127.0.0.1' (give the address and the port)"
        ],
    ),
    (
        "metrics listener port out of range",
        "metrics: {listen: 127.0.0.1:65536}\n",
        [
            f"{SRC}:1: metrics.listen: expected a loopback address and port like 127.0.0.1:9586"
            " or [::1]:9586, got '127.0.0.1:65536' (the port is a number from 1 to 65535)"
        ],
    ),
    (
        "metrics listener IPv6 without brackets",
        'metrics: {listen: "::1:9586"}\n',
        [
            f"{SRC}:1: metrics.listen: expected a loopback address and port like 127.0.0.1:9586"
            " or [::1]:9586, got '::1:9586' (write an IPv6 address in brackets: [::1]:9586)"
        ],
    ),
    (
        "metrics textfile that node_exporter would not read",
        "metrics: {textfile: /var/lib/prometheus/node-exporter/rampiped.txt}\n",
        [
            f"{SRC}:1: metrics.textfile: expected a file name ending in .prom, got"
            " '/var/lib/prometheus/node-exporter/rampiped.txt' (node_exporter's textfile"
            " collector reads only *.prom files)"
        ],
    ),
    (
        "metrics textfile relative",
        "metrics: {textfile: rampiped.prom}\n",
        [
            f"{SRC}:1: metrics.textfile: expected an absolute path, got 'rampiped.prom'"
            " (it must start with /)"
        ],
    ),
    (
        "metrics interval below a second",
        "metrics: {interval: 500ms}\n",
        [f"{SRC}:1: metrics.interval: expected a duration of at least 1s, got '500ms'"],
    ),
    (
        "unknown metrics key",
        "metrics: {port: 9586}\n",
        [f"{SRC}:1: metrics.port: unknown key (known keys here: textfile, listen, interval)"],
    ),
    # ---- YAML syntax
    (
        "unclosed flow mapping",
        "ram: {max: 1G\n",
        [
            f"{SRC}:2:1: YAML syntax error: expected ',' or '}}', but got '<stream end>' "
            "(while parsing a flow mapping at line 1)"
        ],
    ),
    (
        "tab indentation",
        "ram:\n\tmax: 1G\n",
        [
            f"{SRC}:2:1: YAML syntax error: found a tab "
            "(indent with spaces: YAML does not allow tabs)"
        ],
    ),
    (
        "two documents",
        "ram: {}\n---\nsync: {}\n",
        [
            f"{SRC}:2:1: YAML syntax error: but found another document (expected a single "
            "document in the stream at line 1)"
        ],
    ),
    (
        "control character",
        "ram: {max: 1G}\n# \x07\n",
        [f"{SRC}:2:3: YAML syntax error: character U+0007 is not allowed"],
    ),
    # ---- nesting: the place of the first list or mapping beyond 100 levels
    (
        "nested too deeply in flow style",
        "pins: " + "[" * 1000,
        [f"{SRC}:1:106: pins[0][0][0]...: {TOO_DEEP}"],
    ),
    (
        "nested too deeply in block style",
        "adaptive:\n" + "".join(f"{'  ' * i}l{i}:\n" for i in range(1, 200)),
        [f"{SRC}:101:201: adaptive.l1.l2.l3...: {TOO_DEEP}"],
    ),
    (
        "nested too deeply after other settings",
        "ram: {max: 1G}\npins:\n  - path: /srv/a\n    before: " + "{a: " * 150 + "\n",
        [f"{SRC}:4:401: pins[0].before.a...: {TOO_DEEP}"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_message(text: str, expected: list[str]) -> None:
    assert errors(text) == expected


def test_every_error_of_a_file_is_reported_at_once_in_file_order() -> None:
    text = """\
        ram:
          max: 150%
          high_watermark: 90
          colour: blue
        adaptive:
          half_life: fast
          watch:
            - path: /proc
        pins:
          - path: /var/lib/pve-cluster
            mode: ram
          - path: /var/lib/pve-cluster/db
          - path: var/x
        """
    assert errors(text) == [
        f"{SRC}:2: ram.max: expected a percentage above 0% and at most 100%, got '150%'",
        f"{SRC}:3: ram.high_watermark: expected a percentage like 90% or a fraction like 0.9, "
        "got 90 (did you mean 90%?)",
        f"{SRC}:4: ram.colour: unknown key (known keys here: max, high_watermark, min_free,"
        " backend, compression)",
        f"{SRC}:6: adaptive.half_life: expected a duration like 10s, 5m or a number of seconds, "
        "got 'fast'",
        f"{SRC}:8: adaptive.watch[0].path: cannot watch /proc: /proc is a kernel virtual "
        "filesystem",
        f"{SRC}:11: pins[0].mode: expected one of copy, overlay, volatile, got 'ram'",
        f"{SRC}:12: pins[1].path: /var/lib/pve-cluster/db is inside pins[0] "
        "(/var/lib/pve-cluster): a directory can be in only one pin",
        f"{SRC}:13: pins[2].path: expected an absolute path, got 'var/x' (it must start with /)",
    ]


def test_config_error_carries_structured_issues() -> None:
    with pytest.raises(ConfigError) as info:
        cfg("sync:\n  interval: soon\npins:\n  - path: /proc/x\n")
    assert info.value.errors == [
        ConfigIssue(
            SRC,
            2,
            "sync.interval",
            "expected a duration like 10s, 5m or a number of seconds, got 'soon'",
        ),
        ConfigIssue(
            SRC, 4, "pins[0].path", "cannot pin /proc/x: /proc is a kernel virtual filesystem"
        ),
    ]
    assert isinstance(info.value, Exception)


def test_no_cascade_from_a_rejected_value() -> None:
    # pin_above is rejected; the threshold comparison must not report it a second time.
    assert errors("adaptive:\n  pin_above: fast\n  unpin_below: 60\n") == [
        f"{SRC}:2: adaptive.pin_above: expected a number of events per second, got 'fast'"
    ]


def test_globs_that_cannot_meet_are_separate_pins() -> None:
    c = cfg(
        """
        pins:
          - path: /home/*/.cache
          - path: /home/*/.local/share/Trash
          - path: /srv/*.log
          - path: /srv/*.tmp
        """
    )
    assert len(c.pins) == 4


# --------------------------------------------------------------------------- files


def test_load_reads_a_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "rampipe.conf"
    path.write_text("sync:\n  interval: 1m\n")
    c = load(str(path))
    assert c.source == str(path)
    assert c.sync.interval == 60.0
    path.write_text("sync:\n  interval: soon\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == (
        f"{path}:2: sync.interval: expected a duration like 10s, 5m or a number of seconds, "
        "got 'soon'"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read: Is a directory"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"# ok\nruntime_dir: /run/r\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == f"{path}:2: cannot read: not UTF-8 text (byte 0xe9)"


def test_path_with_a_nul_byte() -> None:
    with pytest.raises(ConfigError) as info:
        load("/etc/rampipe\0.conf")
    assert str(info.value) == "/etc/rampipe\0.conf: cannot read: embedded null byte"


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(ConfigError) as info:
        load_text("[" * (1 << 20), SRC)
    assert info.value.errors == [ConfigIssue(SRC, 1, "[0][0][0][0]...", TOO_DEEP, 101)]


def test_a_hundred_levels_are_read_and_judged_by_the_schema() -> None:
    # the root mapping and 99 lists: within the limit, so the schema speaks
    assert errors("pins: " + "[" * 99 + "]" * 99 + "\n") == [
        f"{SRC}:1: pins[0]: expected a mapping like {{path: /dir}}, got a list"
    ]
    assert errors("pins: " + "[" * 100 + "]" * 100 + "\n") == [
        f"{SRC}:1:106: pins[0][0][0]...: {TOO_DEEP}"
    ]


def test_deep_nesting_inside_json_indented_with_tabs() -> None:
    with pytest.raises(ConfigError) as info:
        load_text('{\n\t"ram": ' + "[" * 200, "c.json")
    assert str(info.value) == f"c.json:2:108: ram[0][0][0]...: {TOO_DEEP}"


def test_deep_nesting_when_the_stack_is_nearly_used_up() -> None:
    # the composer's own limit is far inside Python's; called from deep in the stack, the
    # stack can still run out first, and that too is a ConfigError
    def nest(levels: int) -> None:
        if levels:
            nest(levels - 1)
        else:
            load_text("pins: " + "[" * 99, SRC)

    frame, used = sys._getframe(), 0
    while frame is not None:
        frame, used = frame.f_back, used + 1
    with pytest.raises(ConfigError) as info:
        nest(sys.getrecursionlimit() - used - 100)  # 100 frames left: not enough for 99 levels
    assert str(info.value) == f"{SRC}: YAML syntax error: nested too deeply"


# --------------------------------------------------------------------------- physical memory

MEMORY = 16 << 30  # the machine's memory in these tests: 16.0 GiB
MAX_HINT = "write a smaller size, or a percentage like 25%"
MIN_FREE_HINT = "nothing could ever be pinned: MemAvailable is below it"

# (what, YAML, the exact message lines) with `memory_total=MEMORY`; the system tests run the
# ones in terabytes through the real programs too, with the real machine's memory
MEMORY_ERRORS = [
    (
        "ram.max above the machine's memory",
        "ram:\n  max: 64G\n",
        [f"{SRC}:2: ram.max: 64G is more than this machine's 16.0 GiB of memory ({MAX_HINT})"],
    ),
    (
        "ram.max one byte above the machine's memory",
        "ram:\n  max: 17179869185\n",
        [
            f"{SRC}:2: ram.max: 17179869185 is more than this machine's 16.0 GiB of memory "
            f"({MAX_HINT})"
        ],
    ),
    (
        "ram.min_free above the machine's memory",
        "ram:\n  min_free: 100T\n",
        [
            f"{SRC}:2: ram.min_free: 100T is more than this machine's 16.0 GiB of memory "
            f"({MIN_FREE_HINT})"
        ],
    ),
    (
        "ram.max and ram.min_free above the machine's memory",
        "sync: {interval: 1m}\nram:\n  min_free: 1T\n  max: 2T\n",
        [
            f"{SRC}:3: ram.min_free: 1T is more than this machine's 16.0 GiB of memory "
            f"({MIN_FREE_HINT})",
            f"{SRC}:4: ram.max: 2T is more than this machine's 16.0 GiB of memory ({MAX_HINT})",
        ],
    ),
    (
        "ram.max above the machine's memory in JSON",
        '{"ram": {"max": "1T"}}',
        [f"{SRC}:1: ram.max: 1T is more than this machine's 16.0 GiB of memory ({MAX_HINT})"],
    ),
    (
        "ram.max above the machine's memory from a merge key",
        "ram:\n  high_watermark: 80%\n  <<: {max: 1T}\n",
        [f"{SRC}:3: ram.max: 1T is more than this machine's 16.0 GiB of memory ({MAX_HINT})"],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [e[1:] for e in MEMORY_ERRORS], ids=[e[0] for e in MEMORY_ERRORS]
)
def test_sizes_above_the_machines_memory(text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(text, SRC, memory_total=MEMORY)
    assert str(info.value).splitlines() == expected


def test_sizes_are_not_checked_when_the_memory_is_unknown() -> None:
    for _, text, _ in MEMORY_ERRORS:
        load_text(text, SRC)
        load_text(text, SRC, memory_total=None)


@pytest.mark.parametrize(
    ("text", "ram"),
    [
        # all of the memory is not more than it
        ("ram: {max: 16G}", RamConfig(max=Size(bytes=MEMORY))),
        ("ram: {min_free: 16G}", RamConfig(min_free=MEMORY)),
        # a percentage is of this memory, whatever min_free is
        ("ram: {max: 100%, min_free: 8G}", RamConfig(max=Size(percent=100.0), min_free=8 << 30)),
        # together more than the memory: min_free stops the pins before max; not an error
        ("ram: {max: 12G, min_free: 8G}", RamConfig(max=Size(bytes=12 << 30), min_free=8 << 30)),
    ],
)
def test_sizes_within_the_machines_memory(text: str, ram: RamConfig) -> None:
    assert load_text(text, SRC, memory_total=MEMORY).ram == ram


def test_a_rejected_size_is_not_also_compared_with_the_memory() -> None:
    # on a 128 MiB machine the defaults taken in place of rejected values (25%, 256M) are
    # not held against the file, nor is the default min_free when the file does not set it
    small = 128 << 20
    with pytest.raises(ConfigError) as info:
        load_text("ram:\n  max: 100TB\n  min_free: lots\n", SRC, memory_total=small)
    assert str(info.value).splitlines() == [
        f"{SRC}:2: ram.max: expected a size like 512M, 2G, a number of bytes or a percentage "
        "like 25%, got '100TB' (write 100T or 100TiB: powers of 1024)",
        f"{SRC}:3: ram.min_free: expected a size like 512M, 2G or a number of bytes, got 'lots'",
    ]
    assert load_text("ram: {max: 64M}", SRC, memory_total=small).ram.min_free == 256 << 20


@pytest.mark.parametrize(
    ("memory", "shown"),
    [
        (25_276_502_016, "23.5 GiB"),  # 23.54 GiB
        ((24 << 30) - 1, "23.9 GiB"),  # rounded down: 24G must read as more than it
        (512 << 20, "512.0 MiB"),
        (3 << 40, "3.0 TiB"),
    ],
)
def test_the_machines_memory_is_shown_rounded_down(memory: int, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text("ram: {max: 4T}", SRC, memory_total=memory)
    assert f"4T is more than this machine's {shown} of memory" in str(info.value)


def test_load_passes_the_memory_on(tmp_path: Path) -> None:
    path = tmp_path / "rampipe.conf"
    path.write_text("ram:\n  max: 64G\n")
    assert load(str(path)).ram.max == Size(bytes=64 << 30)
    with pytest.raises(ConfigError) as info:
        load(str(path), memory_total=MEMORY)
    assert str(info.value) == (
        f"{path}:2: ram.max: 64G is more than this machine's 16.0 GiB of memory ({MAX_HINT})"
    )


# --------------------------------------------------------------------------- durations and sizes


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (10, 10.0),
        (2.5, 2.5),
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1m30s", 90.0),
        ("1h 30m", 5400.0),
        ("1.5h", 5400.0),
        ("1.1h", 3960.0),
        ("2", 2.0),
        (" 7 s ", 7.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", "expected a duration like 10s, 5m or a number of seconds, got 'fast'"),
        ("", "expected a duration like 10s, 5m or a number of seconds, got ''"),
        ("1m30", "expected a duration like 10s, 5m or a number of seconds, got '1m30' (units "
         "are ms, s, m, h and d)"),
        ("-1s", "expected a duration like 10s, 5m or a number of seconds, got '-1s' (a "
         "duration cannot be negative)"),
        (-0.5, "expected a duration like 10s, 5m or a number of seconds, got -0.5 (a duration "
         "cannot be negative)"),
        (True, "expected a duration like 10s, 5m or a number of seconds, got True (a boolean)"),
        (None, "expected a duration like 10s, 5m or a number of seconds, got None"),
        (float("nan"), "expected a duration like 10s, 5m or a number of seconds, got nan (not "
         "a number)"),
        (float("inf"), "expected a duration like 10s, 5m or a number of seconds, got inf (must "
         "be finite)"),
        ([1], "expected a duration like 10s, 5m or a number of seconds, got a list"),
    ],
)  # fmt: skip
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (512, 512),
        (2.0, 2),
        ("512", 512),
        ("512B", 512),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("64KiB", 64 << 10),
        ("64M", 64 << 20),
        ("64MiB", 64 << 20),
        ("2G", 2 << 30),
        ("2GiB", 2 << 30),
        ("1T", 1 << 40),
        ("1TiB", 1 << 40),
        ("1.5G", 3 << 29),
        (" 4 K ", 4096),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lots", "expected a size like 512M, 2G or a number of bytes, got 'lots'"),
        ("25%", "expected a size like 512M, 2G or a number of bytes, got '25%' (a percentage "
         "is not allowed here)"),
        ("-1K", "expected a size like 512M, 2G or a number of bytes, got '-1K' (a size cannot "
         "be negative)"),
        (-1, "expected a size like 512M, 2G or a number of bytes, got -1 (a size cannot be "
         "negative)"),
        (1.5, "expected a size like 512M, 2G or a number of bytes, got 1.5 (a number of bytes "
         "must be whole)"),
        (False, "expected a size like 512M, 2G or a number of bytes, got False (a boolean)"),
        (2**63, "expected a size like 512M, 2G or a number of bytes, got 9223372036854775808 "
         "(too large)"),
        ("2gb", "expected a size like 512M, 2G or a number of bytes, got '2gb' (write 2G or "
         "2GiB: powers of 1024)"),
    ],
)  # fmt: skip
def test_parse_size_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert str(info.value) == message


def test_parse_size_or_percent() -> None:
    assert parse_size_or_percent("25%") == Size(percent=25.0)
    assert parse_size_or_percent("2G") == Size(bytes=2 << 30)
    assert parse_size_or_percent(4096) == Size(bytes=4096)
    with pytest.raises(ValueError) as info:
        parse_size_or_percent("25 percent")
    assert str(info.value) == (
        "expected a size like 512M, 2G, a number of bytes or a percentage like 25%, "
        "got '25 percent' (units are K, M, G and T (powers of 1024))"
    )


DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
SIZE_UNITS = {"": 1, "K": 1 << 10, "k": 1 << 10, "KiB": 1 << 10, "M": 1 << 20, "MiB": 1 << 20}
SIZE_UNITS |= {"G": 1 << 30, "GiB": 1 << 30, "T": 1 << 40, "TiB": 1 << 40}


@given(st.integers(0, 36500), st.sampled_from(sorted(DURATION_UNITS)))
def test_duration_round_trip(n: int, unit: str) -> None:
    assert parse_duration(f"{n}{unit}") == pytest.approx(n * DURATION_UNITS[unit], rel=1e-15)


@given(st.integers(0, 10**4), st.integers(0, 59), st.integers(0, 59))
def test_combined_duration_is_the_sum(h: int, m: int, s: int) -> None:
    assert parse_duration(f"{h}h{m}m{s}s") == h * 3600 + m * 60 + s


@given(st.integers(0, 10**6), st.sampled_from(sorted(SIZE_UNITS)))
def test_size_round_trip(n: int, unit: str) -> None:
    assert parse_size(f"{n}{unit}") == n * SIZE_UNITS[unit]


@given(st.integers(0, 2**63 - 1))
def test_size_of_any_byte_count(n: int) -> None:
    assert parse_size(n) == n
    assert parse_size(str(n)) == n


@given(st.one_of(st.text(max_size=30), st.from_regex(r"-?[0-9.]{0,6}[a-zA-Z%]{0,4}")))
def test_arbitrary_text_raises_only_value_error(text: str) -> None:
    for parse in (parse_duration, parse_size, parse_size_or_percent):
        try:
            parse(text)
        except ValueError:
            pass


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["/", "/var/log", "/proc/x", "5m", "25%", "2G", "copy", "/home/*/.cache"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS = st.sampled_from(
    ["runtime_dir", "journal_dir", "ram", "sync", "adaptive", "pins", "max", "high_watermark",
     "min_free", "interval", "enabled", "watch", "exclude", "half_life", "pin_above", "hot_for",
     "unpin_below", "cool_for", "max_pins", "path", "mode", "depth", "before", "keep", "size"]
)  # fmt: skip
DOCUMENTS = st.recursive(
    st.dictionaries(KEYS, VALUES, max_size=4),
    lambda inner: st.dictionaries(KEYS, inner | st.lists(inner, max_size=2), max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(DOCUMENTS)
def test_any_yaml_document_gives_a_config_or_config_error(document: dict[str, object]) -> None:
    text = yaml.safe_dump(document)
    try:
        load_text(text, SRC)
    except ConfigError as e:
        assert e.errors
        for issue in e.errors:
            assert str(issue).startswith(SRC + ":")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_any_text_gives_a_config_or_config_error(text: str) -> None:
    try:
        load_text(text, SRC)
    except ConfigError as e:
        assert e.errors


TAGS = ["!!bool", "!!int", "!!float", "!!null", "!!str", "!!timestamp", "!!binary", "!!set",
        "!!omap", "!!pairs", "!!map", "!!seq", "!!merge", "!!value", "!local"]  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(TAGS), st.text(alphabet="0123456789abxe.:-_ +", max_size=8))
def test_explicitly_tagged_values_give_config_error_not_a_crash(tag: str, text: str) -> None:
    for template in ("sync: {{interval: {}}}", "{}", "ram: {{<<: {}}}", "pins: [{}]"):
        try:
            load_text(template.format(f"{tag} {text}"), SRC)
        except ConfigError:
            pass


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9586", ("127.0.0.1", 9586)),
        ("127.8.9.10:1", ("127.8.9.10", 1)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_metrics_listen_on_loopback(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected
    assert cfg(f'metrics: {{listen: "{text}"}}').metrics.listen == text


def test_parse_listen_refuses_other_hosts_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"got '10\.0\.0\.1:9586' \(the endpoint has no auth"):
        parse_listen("10.0.0.1:9586")


def test_metrics_are_off_by_default() -> None:
    assert cfg("metrics:").metrics == MetricsConfig(textfile=None, listen=None, interval=15.0)
    assert cfg("metrics: {listen: null, textfile: null}").metrics == MetricsConfig()
