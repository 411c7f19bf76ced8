"""Configuration: the YAML schema of /etc/rampipe.conf, its defaults and its validation.

The dataclasses below are the contract the rest of the daemon codes against. Loading collects
every error with file, line and key path (see `load`).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

DEFAULT_PATH = "/etc/rampipe.conf"


@dataclass(frozen=True)
class Size:
    """A size given either in bytes or as a percentage of a total (physical RAM, or `ram.max`)."""

    bytes: int | None = None
    percent: float | None = None

    def resolve(self, total: int) -> int:
        if self.bytes is not None:
            return self.bytes
        assert self.percent is not None
        return int(total * self.percent / 100.0)


@dataclass(frozen=True)
class RamConfig:
    max: Size = field(default_factory=lambda: Size(percent=25.0))
    high_watermark: float = 0.90  # fraction of `max`
    min_free: int = 256 * 1024 * 1024  # bytes of MemAvailable
    backend: str = "tmpfs"  # what each pin's RAM area is (rampiped/ramarea.py)
    compression: str = "lz4"  # zram only: one of ZRAM_ALGORITHMS the kernel offers


@dataclass(frozen=True)
class SyncConfig:
    interval: float = 300.0  # seconds; 0 disables periodic checkpoints
    on_session_end: bool = False  # checkpoint every pin when the last user session ends


@dataclass(frozen=True)
class WatchRoot:
    path: str
    depth: int = 1
    reopen: str | None = None


@dataclass(frozen=True)
class AdaptiveConfig:
    enabled: bool = True
    watch: tuple[WatchRoot, ...] = (WatchRoot("/var/log", 1),)
    exclude: tuple[str, ...] = ("/var/log/journal",)
    half_life: float = 10.0
    pin_above: float = 50.0
    hot_for: float = 5.0
    unpin_below: float = 5.0
    cool_for: float = 120.0
    max_pins: int = 8


@dataclass(frozen=True)
class PinConfig:
    path: str  # absolute; may hold glob characters (one pin per match)
    mode: str = "copy"  # copy | overlay | volatile
    sync_interval: float | None = None  # overrides sync.interval
    max_size: int | None = None  # bytes; refuse a bigger directory
    before: tuple[str, ...] = ()  # systemd units ordered after the pin
    size: int | None = None  # volatile: tmpfs size in bytes
    keep: tuple[str, ...] = ()  # volatile: subdirectories that stay on disk
    reopen: str | None = None
    max_age: float | None = None  # volatile: systemd-tmpfiles removes files unused this long


@dataclass(frozen=True)
class MetricsConfig:
    textfile: str | None = None  # node_exporter textfile (*.prom), rewritten every `interval`
    listen: str | None = None  # "127.0.0.1:9586": an HTTP endpoint, loopback only; None: off
    interval: float = 15.0  # seconds between rewrites of `textfile`


@dataclass(frozen=True)
class Config:
    source: str | None = None  # the file it came from; None for built-in defaults
    runtime_dir: str = "/run/rampiped"
    journal_dir: str = "/var/lib/rampiped"
    ram: RamConfig = field(default_factory=RamConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    pins: tuple[PinConfig, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def control_socket(self) -> str:
        return self.runtime_dir.rstrip("/") + "/control.sock"


# =========================================================================== loading
#
# Everything below turns YAML text into a `Config`. The YAML is composed into nodes (not loaded
# into plain Python objects) so that every value keeps its line number; each check records an
# issue and goes on, and `ConfigError` reports them all at once.

T = TypeVar("T")
_Num = TypeVar("_Num", int, float)

_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"

# Durations longer than this are refused: timers built from them would overflow (select() and
# friends reject timeouts beyond a few hundred years) and no setting here needs more.
_MAX_SECONDS = 100 * 365 * 86400
# The largest size the kernel can express (off_t and tmpfs `size=` are signed 64-bit).
_MAX_BYTES = 2**63 - 1
# Longer number strings are certainly mistakes; the cap also keeps Decimal arithmetic cheap.
_MAX_NUMBER_TEXT = 64
# Lists and mappings nested deeper than this are refused. No setting needs more than a few
# levels, and PyYAML composes a document by recursing once per level (three Python frames
# each): a limit of its own keeps far inside Python's default 1000 frames, so that the error
# can say where, instead of the stack running out somewhere.
_MAX_DEPTH = 100


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration file. `line` and `column` are 1-based; None when the
    problem is not at one place (the file cannot be read at all)."""

    source: str
    line: int | None
    key_path: str  # "pins[1].path"; "" for the file as a whole
    message: str  # what is wrong and, in parentheses, what to write instead
    column: int | None = None

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        if self.key_path:
            return f"{where}: {self.key_path}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """An invalid configuration: every issue found, in the order of the file. `str()` is what
    a person should read: one line per issue."""

    def __init__(self, errors: Sequence[ConfigIssue]) -> None:
        self.errors = sorted(errors, key=lambda e: (e.line is None, e.line or 0, e.column or 0))
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class _Invalid(Exception):
    """A value that does not fit: what was expected, and optionally a hint. The caller adds
    ", got <value>" in the words of its input (YAML text or a Python value)."""

    def __init__(self, expected: str, hint: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.hint = hint

    def render(self, got: str) -> str:
        text = f"{self.expected}, got {got}"
        return f"{text} ({self.hint})" if self.hint else text


def _quote(text: str) -> str:
    if len(text) > 60:
        return repr(text[:50]) + "..."
    return repr(text)


def _describe_value(value: object) -> str:
    """A Python value as a message shows it."""
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, bool):
        return f"{value} (a boolean)"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _format_memory(size: int) -> str:
    """An amount of memory in binary units with one decimal, rounded down, so that a size
    reported as more than it also reads as more: 23.4 GiB, 512.0 MiB."""
    value, unit = float(size), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    if unit == "B":
        return f"{size} B"
    return f"{math.floor(value * 10) / 10:.1f} {unit}"


# --------------------------------------------------------------------------- durations

_DURATION_UNITS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}

_DURATION_EXPECTED = "expected a duration like 10s, 5m or a number of seconds"
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d)", re.ASCII)
_DURATION_WHOLE = re.compile(rf"(?:\s*{_NUMBER}\s*(?:ms|s|m|h|d))+\s*", re.ASCII)
_PLAIN_NUMBER = re.compile(rf"\s*({_NUMBER})\s*", re.ASCII)


def _check_number(value: object, expected: str, negative: str = "cannot be negative") -> float:
    """An int or float that is finite and not negative (bool is not a number here: YAML reads
    `yes` and `on` as booleans). `negative` is the hint for a negative value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(expected)
    if isinstance(value, float):
        if math.isnan(value):
            raise _Invalid(expected, "not a number")
        if math.isinf(value):
            raise _Invalid(expected, "must be finite")
    if value < 0:
        raise _Invalid(expected, negative)
    if value > _MAX_BYTES:
        raise _Invalid(expected, "too large")
    return float(value)


def _duration(value: object) -> float:
    if isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_NUMBER_TEXT:
            raise _Invalid(_DURATION_EXPECTED)
        plain = _PLAIN_NUMBER.fullmatch(text)
        if plain:
            total = Decimal(plain.group(1))
        elif _DURATION_WHOLE.fullmatch(text):
            total = Decimal(0)
            for part in _DURATION_PART.finditer(text):
                total += Decimal(part.group(1)) * _DURATION_UNITS[part.group(2)]
        elif text.startswith("-") and (
            _PLAIN_NUMBER.fullmatch(text[1:]) or _DURATION_WHOLE.fullmatch(text[1:])
        ):
            raise _Invalid(_DURATION_EXPECTED, "a duration cannot be negative")
        elif re.match(_NUMBER, text, re.ASCII):
            raise _Invalid(_DURATION_EXPECTED, "units are ms, s, m, h and d")
        else:
            raise _Invalid(_DURATION_EXPECTED)
        if total > _MAX_SECONDS:
            raise _Invalid(_DURATION_EXPECTED, "at most 100 years")
        return float(total)
    seconds = _check_number(value, _DURATION_EXPECTED, "a duration cannot be negative")
    if seconds > _MAX_SECONDS:
        raise _Invalid(_DURATION_EXPECTED, "at most 100 years")
    return seconds


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string: "500ms", "10s", "5m", "1h", "1d", "1m30s",
    "2.5" (seconds). Raises ValueError saying what was expected."""
    try:
        return _duration(value)
    except _Invalid as e:
        raise ValueError(e.render(_describe_value(value))) from None


# --------------------------------------------------------------------------- sizes

_SIZE_UNITS = {
    **dict.fromkeys(("", "B"), 1),
    **dict.fromkeys(("k", "K", "KiB"), 1024),
    **dict.fromkeys(("M", "MiB"), 1024**2),
    **dict.fromkeys(("G", "GiB"), 1024**3),
    **dict.fromkeys(("T", "TiB"), 1024**4),
}

_SIZE_EXPECTED = "expected a size like 512M, 2G or a number of bytes"
_SIZE_OR_PERCENT_EXPECTED = (
    "expected a size like 512M, 2G, a number of bytes or a percentage like 25%"
)
_SIZE = re.compile(rf"\s*({_NUMBER})\s*([A-Za-z]*)\s*", re.ASCII)
_PERCENT = re.compile(rf"\s*({_NUMBER})\s*%\s*", re.ASCII)


def _size(value: object, expected: str = _SIZE_EXPECTED) -> int:
    if isinstance(value, str):
        text = value.strip()
        match = _SIZE.fullmatch(text) if len(text) <= _MAX_NUMBER_TEXT else None
        if match is None:
            if text.startswith("-") and _SIZE.fullmatch(text[1:]):
                raise _Invalid(expected, "a size cannot be negative")
            if _PERCENT.fullmatch(text):
                raise _Invalid(expected, "a percentage is not allowed here")
            raise _Invalid(expected)
        number, unit = Decimal(match.group(1)), match.group(2)
        if unit not in _SIZE_UNITS:
            if unit.upper() in ("KB", "MB", "GB", "TB"):
                number_text, prefix = match.group(1), unit[0].upper()
                hint = f"write {number_text}{prefix} or {number_text}{prefix}iB: powers of 1024"
            else:
                hint = "units are K, M, G and T (powers of 1024)"
            raise _Invalid(expected, hint)
        if _SIZE_UNITS[unit] == 1 and number != number.to_integral_value():
            raise _Invalid(expected, "a number of bytes must be whole")
        result = int(number * _SIZE_UNITS[unit])
    elif isinstance(value, float) and math.isfinite(value) and not value.is_integer():
        raise _Invalid(expected, "a number of bytes must be whole")
    else:
        _check_number(value, expected, "a size cannot be negative")
        assert isinstance(value, int | float)
        result = int(value)  # an int stays exact; a float here is whole
    if result > _MAX_BYTES:
        raise _Invalid(expected, "too large")
    return result


def _percent(value: object) -> float | None:
    """The number in "25%", or None when `value` is not written as a percentage."""
    if not isinstance(value, str):
        return None
    match = _PERCENT.fullmatch(value) if len(value) <= _MAX_NUMBER_TEXT else None
    return float(Decimal(match.group(1))) if match else None


def _size_or_percent(value: object) -> Size:
    percent = _percent(value)
    if percent is not None:
        return Size(percent=percent)
    if (
        isinstance(value, str)
        and value.strip()[:1] == "-"
        and _percent(value.strip()[1:]) is not None
    ):
        raise _Invalid(_SIZE_OR_PERCENT_EXPECTED, "cannot be negative")
    return Size(bytes=_size(value, _SIZE_OR_PERCENT_EXPECTED))


def parse_size(value: object) -> int:
    """Bytes from an int or a string: "512", "64K", "64k", "64KiB", "64M", "2G", "1T" (powers
    of 1024), "1.5G". Raises ValueError saying what was expected."""
    try:
        return _size(value)
    except _Invalid as e:
        raise ValueError(e.render(_describe_value(value))) from None


def parse_size_or_percent(value: object) -> Size:
    """Like `parse_size`, but "25%" is also accepted: Size(percent=25.0); otherwise
    Size(bytes=...). The range of a percentage is the caller's to check."""
    try:
        return _size_or_percent(value)
    except _Invalid as e:
        raise ValueError(e.render(_describe_value(value))) from None


# --------------------------------------------------------------------------- other values

_GLOB_CHARS = "*?["
_UNIT_SUFFIXES = (
    "service", "socket", "mount", "target", "timer", "path",
    "scope", "slice", "swap", "device", "automount",
)  # fmt: skip
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]+")
MODES = ("copy", "overlay", "volatile")
RAM_BACKENDS = ("tmpfs", "zram")
# the zram compressors of Linux 6.x (drivers/block/zram/zcomp.c); which of them this kernel
# offers is checked when the daemon starts (ramarea.check)
ZRAM_ALGORITHMS = ("lz4", "lz4hc", "lzo", "lzo-rle", "zstd", "deflate", "842")

# Trees that can be neither pinned nor watched, and why (after "... is").
_SPECIAL_TREES = {
    "/proc": "a kernel virtual filesystem",
    "/sys": "a kernel virtual filesystem",
    "/dev": "the kernel's device filesystem",
    "/run": "already in RAM (tmpfs)",
    "/boot": "for boot files, which must be on disk when the machine starts",
}


def _normalise(path: str) -> str:
    parts: list[str] = []
    for name in path.split("/"):
        if name in ("", "."):
            continue
        if name == "..":
            if parts:
                parts.pop()
            continue
        parts.append(name)
    return "/" + "/".join(parts)


def _has_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def _abs_path(value: object, *, glob: bool = False) -> str:
    expected = "expected an absolute path"
    if not isinstance(value, str) or not value:
        raise _Invalid(expected)
    if "\0" in value:
        raise _Invalid(expected, "a path cannot contain a NUL character")
    if not value.startswith("/"):
        if value.startswith("~"):
            raise _Invalid(expected, "~ is not expanded: write the whole path")
        raise _Invalid(expected, "it must start with /")
    normal = _normalise(value)
    if normal != value:
        raise _Invalid("expected a normalised absolute path", f"write {normal!r}")
    if not glob and _has_glob(value):
        raise _Invalid(
            "expected a path without glob characters",
            "*, ? and [ are allowed only in pin paths",
        )
    return value


def _glob_path(value: object) -> str:
    return _abs_path(value, glob=True)


def _above_zero(convert: Callable[[object], _Num], what: str) -> Callable[[object], _Num]:
    """`convert`, refusing 0: "expected <what> greater than 0"."""

    def convert_above_zero(value: object) -> _Num:
        result = convert(value)
        if result <= 0:
            raise _Invalid(f"expected {what} greater than 0")
        return result

    return convert_above_zero


_positive_duration = _above_zero(_duration, "a duration")
_positive_size = _above_zero(_size, "a size")


def _ram_max(value: object) -> Size:
    size = _size_or_percent(value)
    if size.percent is not None and not 0 < size.percent <= 100:
        raise _Invalid("expected a percentage above 0% and at most 100%")
    if size.bytes is not None and size.bytes <= 0:
        raise _Invalid("expected a size greater than 0")
    return size


def _fraction(value: object) -> float:
    expected = "expected a percentage like 90% or a fraction like 0.9"
    percent = _percent(value)
    if percent is not None:
        if not 0 < percent <= 100:
            raise _Invalid(expected, "must be above 0% and at most 100%")
        return percent / 100.0
    if isinstance(value, str) and _PLAIN_NUMBER.fullmatch(value):
        value = float(value)
    fraction = _check_number(value, expected)
    if 1 < fraction <= 100:
        raise _Invalid(expected, f"did you mean {_format_number(fraction)}%?")
    if not 0 < fraction <= 1:
        raise _Invalid(expected, "must be above 0 and at most 1")
    return fraction


def _events_per_second(value: object) -> float:
    return _check_number(value, "expected a number of events per second")


_positive_events_per_second = _above_zero(_events_per_second, "a number of events per second")


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("expected a whole number (0 or more)")
    if value < 0:
        raise _Invalid("expected a whole number (0 or more)", "cannot be negative")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("expected true or false")
    return value


def _command(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("expected a command line")
    return value


def _mode(value: object) -> str:
    if value not in MODES:
        raise _Invalid("expected one of " + ", ".join(MODES))
    assert isinstance(value, str)
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Invalid("expected one of " + ", ".join(choices))
        return value

    return convert


def _unit_name(value: object) -> str:
    expected = "expected a systemd unit name like pve-cluster.service"
    if not isinstance(value, str):
        raise _Invalid(expected)
    stem, dot, suffix = value.rpartition(".")
    if not dot or not stem or suffix not in _UNIT_SUFFIXES:
        raise _Invalid(expected, "unit names end in ." + ", .".join(_UNIT_SUFFIXES))
    if not _UNIT_NAME.fullmatch(value) or len(value) > 255:
        raise _Invalid(expected, r"unit names use letters, digits and :-_.\@")
    return value


def _keep_name(value: object) -> str:
    expected = "expected a directory name relative to the pin, like pip or a/b"
    if not isinstance(value, str) or not value or "\0" in value:
        raise _Invalid(expected)
    if value.startswith("/"):
        raise _Invalid(expected, "keep names are relative to the pin")
    names = value.split("/")
    if ".." in names:
        raise _Invalid(expected, ".. is not allowed")
    if "" in names or "." in names:
        normal = _normalise(value)[1:]
        raise _Invalid(expected, f"write {normal!r}" if normal else None)
    return value


_LISTEN_EXPECTED = "expected a loopback address and port like 127.0.0.1:9586 or [::1]:9586"
# Each rewrite of the textfile is a write to wherever it lives; more often than once a second
# serves no scraper (Prometheus scrapes every 15s to 1m) and would itself wear a disk.
_MIN_METRICS_INTERVAL = 1.0


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of a `metrics.listen` value such as "127.0.0.1:9586" or "[::1]:9586"; the
    host must be a loopback address, written as digits. Raises ValueError saying why not."""
    try:
        return _split_listen(text)
    except _Invalid as e:
        raise ValueError(e.render(_describe_value(text))) from None


def _split_listen(value: object) -> tuple[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        raise _Invalid(_LISTEN_EXPECTED, f"write 127.0.0.1:{value}")
    if not isinstance(value, str):
        raise _Invalid(_LISTEN_EXPECTED)
    host, colon, port = value.rpartition(":")
    if not colon or not host:
        raise _Invalid(_LISTEN_EXPECTED, "give the address and the port")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise _Invalid(_LISTEN_EXPECTED, "the port is a number from 1 to 65535")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise _Invalid(
            _LISTEN_EXPECTED, "write the address as digits (127.0.0.1 or [::1]), not a name"
        ) from None
    if address.version == 6 and not bracketed:
        raise _Invalid(_LISTEN_EXPECTED, f"write an IPv6 address in brackets: [{host}]:{port}")
    if address.version == 4 and bracketed:
        raise _Invalid(_LISTEN_EXPECTED, f"brackets are for IPv6 addresses: {host}:{port}")
    if not address.is_loopback:
        raise _Invalid(
            _LISTEN_EXPECTED,
            "the endpoint has no authentication, so rampiped serves it to this machine only;"
            " let node_exporter read metrics.textfile, or put a proxy in front",
        )
    return host, int(port)


def _listen(value: object) -> str:
    _split_listen(value)
    assert isinstance(value, str)
    return value


def _textfile(value: object) -> str:
    path = _abs_path(value)
    if not path.endswith(".prom") or path.rsplit("/", 1)[1] == ".prom":
        raise _Invalid(
            "expected a file name ending in .prom",
            "node_exporter's textfile collector reads only *.prom files",
        )
    return path


def _metrics_interval(value: object) -> float:
    seconds = _duration(value)
    if seconds < _MIN_METRICS_INTERVAL:
        raise _Invalid("expected a duration of at least 1s")
    return seconds


def _optional(convert: Callable[[object], T]) -> Callable[[object], T | None]:
    def convert_optional(value: object) -> T | None:
        return None if value is None else convert(value)

    return convert_optional


# --------------------------------------------------------------------------- paths as patterns


def _components(path: str) -> list[str]:
    return [name for name in path.split("/") if name]


def _literal_head(name: str) -> str:
    for i, c in enumerate(name):
        if c in _GLOB_CHARS:
            return name[:i]
    return name


def _literal_tail(name: str) -> str:
    if "[" in name:
        return ""
    cut = max(name.rfind("*"), name.rfind("?"))
    return name[cut + 1 :]


def _may_match(a: str, b: str) -> bool:
    """Whether two path components, either of which may be a glob, can name the same entry.
    Two globs are compared by their literal head and tail (`*.log` and `*.cache` never meet);
    otherwise they are assumed to meet."""
    glob_a, glob_b = _has_glob(a), _has_glob(b)
    if not glob_a and not glob_b:
        return a == b
    if not glob_b:
        return fnmatchcase(b, a)
    if not glob_a:
        return fnmatchcase(a, b)
    head_a, head_b = _literal_head(a), _literal_head(b)
    tail_a, tail_b = _literal_tail(a), _literal_tail(b)
    return (head_a.startswith(head_b) or head_b.startswith(head_a)) and (
        tail_a.endswith(tail_b) or tail_b.endswith(tail_a)
    )


def _relation(a: str, b: str) -> str | None:
    """Where path (or pattern) `a` can lie relative to `b`: "same", "inside", "contains", or
    None when they cannot meet. A glob matches within one component (as glob(3) does), so
    patterns are compared component by component, not as text prefixes."""
    parts_a, parts_b = _components(a), _components(b)
    if not all(_may_match(x, y) for x, y in zip(parts_a, parts_b, strict=False)):
        return None
    if len(parts_a) == len(parts_b):
        return "same"
    return "inside" if len(parts_a) > len(parts_b) else "contains"


_RELATION_WORDS = {
    # relation: (both literal, with a glob)
    "same": ("is the same directory as", "can match the same directory as"),
    "inside": ("is inside", "can match a directory inside"),
    "contains": ("contains", "can match a directory that contains"),
}


def _relation_words(relation: str, a: str, b: str) -> str:
    definite, possible = _RELATION_WORDS[relation]
    return possible if _has_glob(a) or _has_glob(b) else definite


# --------------------------------------------------------------------------- the loader


# A path from the file: (value, key path, node). The node is None for a default value, which
# has no line of its own.
_Placed = tuple[str, str, Node | None]


@dataclass
class _Entry:
    key: Node
    value: Node


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


class _Loader:
    def __init__(self, source: str, memory_total: int | None = None) -> None:
        self.source = source
        self.memory_total = memory_total  # bytes of physical memory; None: unknown
        self.issues: list[ConfigIssue] = []
        self.bad: set[str] = set()  # key paths whose value was rejected
        self._constructor = yaml.constructor.SafeConstructor()

    # ----------------------------------------------------------------- recording

    def issue(self, node: Node | None, key_path: str, message: str) -> None:
        line = None
        if node is not None and node.start_mark is not None:
            line = node.start_mark.line + 1
        self.issues.append(ConfigIssue(self.source, line, key_path, message))
        self.bad.add(key_path)

    def describe(self, node: Node, value: object) -> str:
        """A value as the file wrote it."""
        if isinstance(node, SequenceNode):
            return "a list"
        if isinstance(node, MappingNode):
            return "a mapping"
        text = str(node.value)
        if value is None:
            return "nothing" if text == "" else text
        if isinstance(value, bool):
            return f"{text} (a boolean)"
        if isinstance(value, int | float):
            return text
        if isinstance(value, str):
            return _quote(value)
        return f"{_quote(text)} (a {type(value).__name__})"

    # ----------------------------------------------------------------- reading nodes

    def scalar(self, node: Node, key_path: str) -> tuple[bool, object]:
        """(True, value) for a scalar YAML can read; (True, node) for a list or mapping, which
        converters refuse; (False, None) after recording why the value cannot be read."""
        if not isinstance(node, ScalarNode):
            return True, node
        try:
            return True, self._constructor.construct_object(node)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            self.issue(node, key_path, f"cannot read this value: {problem}")
        except Exception:
            # PyYAML's constructors trust the resolver: a value whose explicit tag it does not
            # fit (`!!bool x`, `!!int `, `!!timestamp 2024-13-45`) fails with whatever error
            # the conversion hits (KeyError, IndexError, ValueError, ...).
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.issue(node, key_path, f"cannot read this value: {node.value!r} is not a {tag}")
        return False, None

    def convert(self, node: Node, key_path: str, convert: Callable[[object], T], default: T) -> T:
        ok, value = self.scalar(node, key_path)
        if not ok:
            return default
        try:
            return convert(value)
        except _Invalid as e:
            self.issue(node, key_path, e.render(self.describe(node, value)))
            return default

    def get(
        self,
        entries: dict[str, _Entry],
        key: str,
        parent: str,
        convert: Callable[[object], T],
        default: T,
    ) -> T:
        """The converted value of `key`; `default` when it is absent or was rejected (then the
        issue is recorded and the key path is in `self.bad`)."""
        entry = entries.get(key)
        if entry is None:
            return default
        return self.convert(entry.value, _join(parent, key), convert, default)

    def _pairs(self, node: MappingNode, key_path: str, depth: int = 0) -> list[tuple[Node, Node]]:
        """The key/value pairs of a mapping with YAML merge keys (`<<: *defaults`) expanded:
        the mapping's own keys first, then merged keys it does not set itself."""
        own = [(k, v) for k, v in node.value if k.tag != _MERGE_TAG]
        pairs = list(own)
        seen = {k.value for k, _ in own if isinstance(k, ScalarNode)}
        for k, v in node.value:
            if k.tag != _MERGE_TAG:
                continue
            sources = v.value if isinstance(v, SequenceNode) else [v]
            for source in sources:
                if not isinstance(source, MappingNode) or depth > 16:
                    self.issue(k, _join(key_path, "<<"), "expected a mapping to merge")
                    continue
                for mk, mv in self._pairs(source, key_path, depth + 1):
                    if isinstance(mk, ScalarNode) and mk.value not in seen:
                        seen.add(mk.value)
                        pairs.append((mk, mv))
        return pairs

    def mapping(
        self,
        node: Node,
        key_path: str,
        known: Sequence[str],
        expected: str = "expected a mapping of settings",
    ) -> dict[str, _Entry] | None:
        """The known keys of a mapping; unknown and repeated keys are recorded as issues.
        An empty value (`ram:` with nothing after it) is an empty mapping."""
        if isinstance(node, ScalarNode) and node.tag == _NULL_TAG:
            return {}
        if not isinstance(node, MappingNode):
            ok, value = self.scalar(node, key_path)
            if ok:
                self.issue(node, key_path, f"{expected}, got {self.describe(node, value)}")
            return None
        entries: dict[str, _Entry] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in self._pairs(node, key_path):
            ok, key = self.scalar(key_node, key_path)
            if not ok:
                continue
            if not isinstance(key, str):
                self.issue(
                    key_node, key_path, f"expected a key name, got {self.describe(key_node, key)}"
                )
                continue
            path = _join(key_path, key)
            line = key_node.start_mark.line + 1 if key_node.start_mark else 0
            if key in first_line:
                self.issue(key_node, path, f"repeated key (first given at line {first_line[key]})")
                continue
            first_line[key] = line
            if key not in known:
                self.issue(key_node, path, self._unknown_key(key, known))
                continue
            entries[key] = _Entry(key_node, value_node)
        return entries

    @staticmethod
    def _unknown_key(key: str, known: Sequence[str]) -> str:
        close = difflib.get_close_matches(key, known, n=1)
        names = ", ".join(known)
        if close:
            return f"unknown key (did you mean {close[0]}? known keys here: {names})"
        return f"unknown key (known keys here: {names})"

    def items(self, node: Node, key_path: str, expected: str) -> list[tuple[str, Node]] | None:
        """(key path, node) of each list item; an empty value is an empty list."""
        if isinstance(node, ScalarNode) and node.tag == _NULL_TAG:
            return []
        if isinstance(node, SequenceNode):
            return [(f"{key_path}[{i}]", item) for i, item in enumerate(node.value)]
        ok, value = self.scalar(node, key_path)
        if ok:
            hint = ""
            if isinstance(value, str):
                hint = f" (write [{value}] for a list of one)"
            self.issue(node, key_path, f"{expected}, got {self.describe(node, value)}{hint}")
        return None

    def string_list(
        self,
        entries: dict[str, _Entry],
        key: str,
        parent: str,
        expected: str,
        convert: Callable[[object], str],
        default: tuple[str, ...],
    ) -> tuple[tuple[str, ...], list[_Placed]]:
        """A list of strings, each converted; repeats are issues. Returns the values and
        where each accepted one is (defaults included)."""
        entry = entries.get(key)
        path = _join(parent, key)
        if entry is None:
            return default, [(v, f"{path}[{i}]", None) for i, v in enumerate(default)]
        items = self.items(entry.value, path, expected)
        if items is None:
            return default, []
        accepted: list[_Placed] = []
        for item_path, item in items:
            value = self.convert(item, item_path, convert, "")
            if item_path in self.bad:
                continue
            first = next((p for v, p, _ in accepted if v == value), None)
            if first is not None:
                self.issue(item, item_path, f"repeats {first}")
                continue
            accepted.append((value, item_path, item))
        return tuple(v for v, _, _ in accepted), accepted

    # ----------------------------------------------------------------- the schema

    def load(self, root: Node | None) -> Config:
        if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL_TAG):
            return Config(source=self.source)
        top = self.mapping(
            root,
            "",
            _known(Config),
            "expected a mapping of settings (key: value lines) at the top level",
        )
        if top is None:
            raise ConfigError(self.issues)
        defaults = Config()
        runtime_dir = self.get(top, "runtime_dir", "", _abs_path, defaults.runtime_dir)
        journal_dir = self.get(top, "journal_dir", "", _abs_path, defaults.journal_dir)
        ram = self.ram(top)
        sync = self.sync(top)
        adaptive, watch_nodes, excludes = self.adaptive(top)
        pins, pin_nodes = self.pins(top)
        metrics = self.metrics(top)
        self.check_dirs(top, runtime_dir, journal_dir)
        self.check_trees(runtime_dir, journal_dir, pin_nodes, watch_nodes, excludes)
        if self.issues:
            raise ConfigError(self.issues)
        return Config(
            source=self.source,
            runtime_dir=runtime_dir,
            journal_dir=journal_dir,
            ram=ram,
            sync=sync,
            adaptive=adaptive,
            pins=pins,
            metrics=metrics,
        )

    def section(self, top: dict[str, _Entry], key: str, cls: type) -> dict[str, _Entry]:
        entry = top.get(key)
        if entry is None:
            return {}
        return self.mapping(entry.value, key, _known(cls)) or {}

    def ram(self, top: dict[str, _Entry]) -> RamConfig:
        d = RamConfig()
        s = self.section(top, "ram", RamConfig)
        ram = RamConfig(
            max=self.get(s, "max", "ram", _ram_max, d.max),
            high_watermark=self.get(s, "high_watermark", "ram", _fraction, d.high_watermark),
            min_free=self.get(s, "min_free", "ram", _size, d.min_free),
            backend=self.get(s, "backend", "ram", _one_of(RAM_BACKENDS), d.backend),
            compression=self.get(s, "compression", "ram", _one_of(ZRAM_ALGORITHMS), d.compression),
        )
        # Sizes above the machine's memory are typos or come from a bigger machine: such a max
        # is never reached, and such a min_free forbids every pin. Each is checked alone: that
        # max and min_free together exceed the memory only means min_free stops the pins first,
        # as it does for `max: 100%`. A percentage is of this machine's memory anyway.
        self.check_memory(s, "max", ram.max.bytes, "write a smaller size, or a percentage like 25%")
        self.check_memory(
            s, "min_free", ram.min_free, "nothing could ever be pinned: MemAvailable is below it"
        )
        return ram

    def check_memory(
        self, entries: dict[str, _Entry], key: str, size: int | None, hint: str
    ) -> None:
        entry = entries.get(key)
        path = _join("ram", key)
        total = self.memory_total
        if total is None or entry is None or size is None or path in self.bad or size <= total:
            return
        written = str(entry.value.value)  # accepted, so a scalar: the text as the file has it
        self.issue(
            entry.value,
            path,
            f"{written} is more than this machine's {_format_memory(total)} of memory ({hint})",
        )

    def sync(self, top: dict[str, _Entry]) -> SyncConfig:
        d = SyncConfig()
        s = self.section(top, "sync", SyncConfig)
        return SyncConfig(
            interval=self.get(s, "interval", "sync", _duration, d.interval),
            on_session_end=self.get(s, "on_session_end", "sync", _boolean, d.on_session_end),
        )

    def metrics(self, top: dict[str, _Entry]) -> MetricsConfig:
        d = MetricsConfig()
        s = self.section(top, "metrics", MetricsConfig)
        return MetricsConfig(
            textfile=self.get(s, "textfile", "metrics", _optional(_textfile), d.textfile),
            listen=self.get(s, "listen", "metrics", _optional(_listen), d.listen),
            interval=self.get(s, "interval", "metrics", _metrics_interval, d.interval),
        )

    def adaptive(
        self, top: dict[str, _Entry]
    ) -> tuple[AdaptiveConfig, list[_Placed], list[_Placed]]:
        d = AdaptiveConfig()
        s = self.section(top, "adaptive", AdaptiveConfig)
        p = "adaptive"
        pin_above = self.get(s, "pin_above", p, _positive_events_per_second, d.pin_above)
        unpin_below = self.get(s, "unpin_below", p, _events_per_second, d.unpin_below)
        if {"adaptive.pin_above", "adaptive.unpin_below"}.isdisjoint(self.bad) and not (
            unpin_below < pin_above
        ):
            entry = s.get("unpin_below") or s.get("pin_above")
            default = "" if "unpin_below" in s else " by default"
            self.issue(
                entry.value if entry else None,
                "adaptive.unpin_below",
                "must be less than adaptive.pin_above (unpin_below is "
                f"{_format_number(unpin_below)}{default}, pin_above is "
                f"{_format_number(pin_above)})",
            )
        watch, watch_nodes = self.watch(s, d.watch)
        exclude, exclude_nodes = self.string_list(
            s, "exclude", p, "expected a list of absolute paths", _abs_path, d.exclude
        )
        config = AdaptiveConfig(
            enabled=self.get(s, "enabled", p, _boolean, d.enabled),
            watch=watch,
            exclude=exclude,
            half_life=self.get(s, "half_life", p, _positive_duration, d.half_life),
            pin_above=pin_above,
            hot_for=self.get(s, "hot_for", p, _positive_duration, d.hot_for),
            unpin_below=unpin_below,
            cool_for=self.get(s, "cool_for", p, _positive_duration, d.cool_for),
            max_pins=self.get(s, "max_pins", p, _count, d.max_pins),
        )
        return config, watch_nodes, exclude_nodes

    def watch(
        self, s: dict[str, _Entry], default: tuple[WatchRoot, ...]
    ) -> tuple[tuple[WatchRoot, ...], list[_Placed]]:
        entry = s.get("watch")
        if entry is None:
            return default, [
                (w.path, f"adaptive.watch[{i}].path", None) for i, w in enumerate(default)
            ]
        items = self.items(entry.value, "adaptive.watch", "expected a list of watch roots")
        if items is None:
            return default, []
        d = WatchRoot("")  # the defaults of its keys
        roots: list[WatchRoot] = []
        accepted: list[_Placed] = []
        for item_path, item in items:
            w = self.mapping(
                item, item_path, _known(WatchRoot), "expected a mapping like {path: /dir, depth: 1}"
            )
            if w is None:
                continue
            if "path" not in w:
                self.issue(item, _join(item_path, "path"), "required key is missing")
                continue
            path = self.get(w, "path", item_path, _abs_path, "")
            root = WatchRoot(
                path=path,
                depth=self.get(w, "depth", item_path, _count, d.depth),
                reopen=self.get(w, "reopen", item_path, _optional(_command), d.reopen),
            )
            roots.append(root)
            path_key = _join(item_path, "path")
            if path_key in self.bad:
                continue
            first = next((p for v, p, _ in accepted if v == path), None)
            if first is not None:
                self.issue(w["path"].value, path_key, f"repeats {first}")
                continue
            accepted.append((path, path_key, w["path"].value))
        return tuple(roots), accepted

    def pins(self, top: dict[str, _Entry]) -> tuple[tuple[PinConfig, ...], list[_Placed]]:
        entry = top.get("pins")
        if entry is None:
            return (), []
        items = self.items(entry.value, "pins", "expected a list of pins")
        if items is None:
            return (), []
        pins: list[PinConfig] = []
        accepted: list[_Placed] = []
        for item_path, item in items:
            parsed = self.pin(item, item_path)
            if parsed is None:
                continue
            pin, path_node = parsed
            pins.append(pin)
            path_key = _join(item_path, "path")
            if path_key not in self.bad:
                accepted.append((pin.path, path_key, path_node))
        return tuple(pins), accepted

    def pin(self, item: Node, item_path: str) -> tuple[PinConfig, Node] | None:
        p = self.mapping(item, item_path, _known(PinConfig), "expected a mapping like {path: /dir}")
        if p is None:
            return None
        if "path" not in p:
            self.issue(item, _join(item_path, "path"), "required key is missing")
            return None
        d = PinConfig("")  # the defaults of its keys
        mode = self.get(p, "mode", item_path, _mode, d.mode)
        mode_ok = _join(item_path, "mode") not in self.bad
        pin = PinConfig(
            path=self.get(p, "path", item_path, _glob_path, ""),
            mode=mode,
            sync_interval=self.get(
                p, "sync_interval", item_path, _optional(_duration), d.sync_interval
            ),
            max_size=self.get(p, "max_size", item_path, _optional(_positive_size), d.max_size),
            before=self.string_list(
                p, "before", item_path, "expected a list of systemd units", _unit_name, d.before
            )[0],
            size=self.get(p, "size", item_path, _optional(_positive_size), d.size),
            keep=self.string_list(
                p, "keep", item_path, "expected a list of directory names", _keep_name, d.keep
            )[0],
            reopen=self.get(p, "reopen", item_path, _optional(_command), d.reopen),
            max_age=self.get(p, "max_age", item_path, _optional(_positive_duration), d.max_age),
        )
        if mode_ok and mode != "volatile":
            for key in ("size", "keep", "max_age"):
                if key in p:
                    self.issue(
                        p[key].key,
                        _join(item_path, key),
                        f"applies only to volatile pins (this pin's mode is {mode})",
                    )
        if mode_ok and mode == "volatile" and "sync_interval" in p:
            self.issue(
                p["sync_interval"].key,
                _join(item_path, "sync_interval"),
                "does not apply to volatile pins: nothing is written back",
            )
        return pin, p["path"].value

    # ----------------------------------------------------------------- relations between paths

    def check_dirs(self, top: dict[str, _Entry], runtime_dir: str, journal_dir: str) -> None:
        """runtime_dir is RAM of rampiped's own; journal_dir must be on disk; they are apart."""
        for key, path in (("runtime_dir", runtime_dir), ("journal_dir", journal_dir)):
            entry = top.get(key)
            if entry is None or key in self.bad:
                continue
            if path == "/":
                self.issue(entry.value, key, "cannot use /: name a directory of rampiped's own")
                continue
            for tree, why in _SPECIAL_TREES.items():
                if tree == "/run" and key == "runtime_dir":
                    continue  # where it belongs
                if _relation(path, tree) in ("same", "inside"):
                    if tree == "/run":
                        why = "already in RAM (tmpfs), and journal_dir must be on disk"
                    self.issue(entry.value, key, f"cannot use {path}: {tree} is {why}")
                    break
        if {"runtime_dir", "journal_dir"} & self.bad:
            return
        relation = _relation(journal_dir, runtime_dir)
        if relation is None:
            return
        dirs = {"runtime_dir": runtime_dir, "journal_dir": journal_dir}
        key, other = ("journal_dir", "runtime_dir")
        if relation == "contains":
            key, other = other, key
            relation = "inside"
        entry = top.get(key) or top.get(other)
        words = _RELATION_WORDS[relation][0]
        self.issue(
            entry.value if entry else None,
            key,
            f"{dirs[key]} {words} {other} ({dirs[other]}): "
            "the RAM area and the on-disk journal must be separate directories",
        )

    def forbidden(
        self, verb: str, path: str, runtime_dir: str, journal_dir: str, *, contains: bool
    ) -> str | None:
        """Why `path` cannot be pinned or watched, or None."""
        if path == "/":
            return f"cannot {verb} /: it is the whole root filesystem (name directories below it)"
        for tree, why in _SPECIAL_TREES.items():
            relation = _relation(path, tree)
            if relation in ("same", "inside"):
                if _has_glob(path):
                    return (
                        f"cannot {verb} {path}: it can match a directory in {tree}, which is {why}"
                    )
                return f"cannot {verb} {path}: {tree} is {why}"
        for key, own in (("runtime_dir", runtime_dir), ("journal_dir", journal_dir)):
            if key in self.bad:
                continue
            relation = _relation(path, own)
            if relation is None or (relation == "contains" and not contains):
                continue
            words = _relation_words(relation, path, own)
            return f"cannot {verb} {path}: it {words} {key} ({own}), which rampiped uses itself"
        return None

    def check_trees(
        self,
        runtime_dir: str,
        journal_dir: str,
        pins: list[_Placed],
        watch: list[_Placed],
        excludes: list[_Placed],
    ) -> None:
        """Pins and watch roots against the special trees, rampiped's own directories and each
        other. Each path gets at most one such issue: the first that applies."""
        earlier: list[tuple[str, str]] = []
        for path, key_path, node in pins:
            problem = self.forbidden("pin", path, runtime_dir, journal_dir, contains=True)
            if problem is None:
                problem = self._conflict(path, earlier)
            if problem is None:
                for excluded, exclude_path, _ in excludes:
                    relation = _relation(path, excluded)
                    if relation in ("same", "inside"):
                        words = _relation_words(relation, path, excluded)
                        problem = (
                            f"{path} {words} {excluded} ({exclude_path}): "
                            "an excluded tree cannot hold a static pin"
                        )
                        break
            if problem is not None:
                self.issue(node, key_path, problem)
            earlier.append((path, key_path.removesuffix(".path")))
        for path, key_path, node in watch:
            problem = self.forbidden("watch", path, runtime_dir, journal_dir, contains=False)
            if problem is not None:
                self.issue(node, key_path, problem)
                continue
            for pin_path, pin_key, pin_node in pins:
                if pin_key in self.bad:
                    continue
                relation = _relation(path, pin_path)
                if relation not in ("same", "inside"):
                    continue
                if node is None:
                    # A default watch root: the pin is what the file says, so it gets the issue.
                    words = _relation_words(
                        "same" if relation == "same" else "contains", pin_path, path
                    )
                    self.issue(
                        pin_node,
                        pin_key,
                        f"{pin_path} {words} the default watch root {path} "
                        f"({key_path.removesuffix('.path')}): a watch root cannot be inside a "
                        "static pin (set adaptive.watch)",
                    )
                else:
                    words = _relation_words(relation, path, pin_path)
                    self.issue(
                        node,
                        key_path,
                        f"{path} {words} {pin_key.removesuffix('.path')} ({pin_path}): "
                        "a watch root cannot be inside a static pin",
                    )
                break

    @staticmethod
    def _conflict(path: str, earlier: list[tuple[str, str]]) -> str | None:
        for other, other_key in earlier:
            if other == path:
                return f"{path} repeats {other_key}"
            relation = _relation(path, other)
            if relation is not None:
                words = _relation_words(relation, path, other)
                return f"{path} {words} {other_key} ({other}): a directory can be in only one pin"
        return None


def _known(cls: type) -> tuple[str, ...]:
    """The keys a section accepts: the fields of its dataclass (`source` is not a key)."""
    return tuple(f.name for f in fields(cls) if f.name != "source")


# --------------------------------------------------------------------------- entry points


def _syntax_issue(source: str, text: str, error: yaml.YAMLError) -> ConfigIssue:
    if isinstance(error, yaml.reader.ReaderError):
        position = int(error.position)
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        message = f"YAML syntax error: character U+{int(error.character):04X} is not allowed"
        return ConfigIssue(source, line, "", message, column)
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        message = f"YAML syntax error: {error.problem or error}"
        if "'\\t'" in (error.problem or ""):
            message = (
                "YAML syntax error: found a tab (indent with spaces: YAML does not allow tabs)"
            )
        elif error.context:
            context = error.context
            if error.context_mark is not None and error.context_mark.line != mark.line:
                context += f" at line {error.context_mark.line + 1}"
            message += f" ({context})"
        return ConfigIssue(source, mark.line + 1, "", message, mark.column + 1)
    return ConfigIssue(source, None, "", f"YAML syntax error: {error}")


class _TooDeep(Exception):
    """Raised by `_Composer` at the first list or mapping nested deeper than `_MAX_DEPTH`."""

    def __init__(self, mark: yaml.Mark, key_path: str) -> None:
        super().__init__(key_path)
        self.mark = mark
        self.key_path = key_path


class _Composer(yaml.SafeLoader):
    """PyYAML's safe loader, composing nodes only, that counts how deep it is and stops with
    the place (and the key path) of a list or mapping nested too deeply."""

    # the key path is shown down to this many steps: enough to name the setting
    _SHOWN_STEPS = 4

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._steps: list[str] = []  # one per node being composed: "key", "[i]" or ""

    def compose_node(self, parent: Node | None, index: int | Node | None) -> Node | None:
        # `index` is the item's position in a list, the key node of a mapping's value, or
        # None for a mapping's key and for the document itself (the stub says int only)
        if isinstance(parent, SequenceNode):
            step = f"[{index}]"
        elif isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
            step = f".{index.value}"
        else:
            step = ""
        self._steps.append(step)
        try:
            if len(self._steps) > _MAX_DEPTH and self.check_event(
                yaml.SequenceStartEvent, yaml.MappingStartEvent
            ):
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _TooDeep(event.start_mark, self._key_path())
            return super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            self._steps.pop()

    def _key_path(self) -> str:
        steps = [step for step in self._steps if step]
        path = "".join(steps[: self._SHOWN_STEPS]).lstrip(".")
        return path + "..." if len(steps) > self._SHOWN_STEPS else path


def _compose_nodes(text: str) -> Node | None:
    composer = _Composer(text)
    try:
        return composer.get_single_node()
    finally:
        composer.dispose()


def _compose(text: str, source: str) -> Node | None:
    try:
        try:
            return _compose_nodes(text)
        except yaml.YAMLError as first_error:
            error = first_error
            # JSON is YAML, except that YAML refuses tabs as indentation. Outside its strings
            # JSON has tabs only as whitespace (inside them they must be written \t), so a
            # document that looks like JSON is read again with its tabs as spaces; columns stay
            # the same.
            if "\t" in text and text.lstrip()[:1] in ("{", "["):
                try:
                    return _compose_nodes(text.replace("\t", " "))
                except yaml.YAMLError as json_error:
                    error = json_error
            raise ConfigError([_syntax_issue(source, text, error)]) from None
    except _TooDeep as e:
        message = (
            f"YAML syntax error: nested too deeply (more than {_MAX_DEPTH} levels of lists "
            "and mappings)"
        )
        line, column = e.mark.line + 1, e.mark.column + 1
        raise ConfigError([ConfigIssue(source, line, e.key_path, message, column)]) from None
    except RecursionError:
        # only when called with most of the stack already used
        raise ConfigError(
            [ConfigIssue(source, None, "", "YAML syntax error: nested too deeply")]
        ) from None


def load_text(text: str, source: str, *, memory_total: int | None = None) -> Config:
    """The configuration in `text`; `source` names it in messages and in `Config.source`.
    `memory_total`: the machine's physical memory in bytes (psutil.virtual_memory().total),
    against which `ram.max` and `ram.min_free` are checked; None skips that check.
    Raises ConfigError listing every problem."""
    root = _compose(text, source)
    return _Loader(source, memory_total).load(root)


def load(path: str, *, memory_total: int | None = None) -> Config:
    """The configuration in the file at `path` (YAML, or JSON); `memory_total` as for
    `load_text`. Raises ConfigError, and only ConfigError, for a file that is missing,
    unreadable or invalid."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(
            [ConfigIssue(path, None, "", f"cannot read: {e.strerror or e}")]
        ) from None
    except ValueError as e:  # a NUL byte in the path
        raise ConfigError([ConfigIssue(path, None, "", f"cannot read: {e}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        message = f"cannot read: not UTF-8 text (byte 0x{data[e.start]:02x})"
        raise ConfigError([ConfigIssue(path, line, "", message)]) from None
    return load_text(text, path, memory_total=memory_total)
