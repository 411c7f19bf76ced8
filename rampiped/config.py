"""Configuration: /etc/rampipe.conf read into the schema's dataclasses, every error collected.

The modules below it, each importing nothing above it: `confschema` (the dataclasses and their
defaults: the contract the rest of the daemon codes against), `confyaml` (YAML composed into
nodes that keep their line numbers; syntax errors; reading nodes while collecting issues),
`confvalues` (what each setting accepts) and `conftrees` (pins, watch roots and excludes against
the special trees, rampiped's own directories and each other). This module reads the sections
(`load`, `load_text`) and re-exports what callers use.
"""

from __future__ import annotations

from dataclasses import fields

from yaml.nodes import Node, ScalarNode

from rampiped import confvalues as values
from rampiped.confschema import (
    DEFAULT_PATH,
    MODES,
    RAM_BACKENDS,
    ZRAM_ALGORITHMS,
    AdaptiveConfig,
    Config,
    MetricsConfig,
    PinConfig,
    RamConfig,
    Size,
    SyncConfig,
    WatchRoot,
)
from rampiped.conftrees import check_dirs, check_trees
from rampiped.confvalues import parse_duration, parse_listen, parse_size, parse_size_or_percent
from rampiped.confyaml import (
    NULL_TAG,
    ConfigError,
    ConfigIssue,
    Entry,
    Placed,
    Reader,
    compose,
    join_key,
)

__all__ = [
    "DEFAULT_PATH",
    "MODES",
    "RAM_BACKENDS",
    "ZRAM_ALGORITHMS",
    "AdaptiveConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "MetricsConfig",
    "PinConfig",
    "RamConfig",
    "Size",
    "SyncConfig",
    "WatchRoot",
    "load",
    "load_text",
    "parse_duration",
    "parse_listen",
    "parse_size",
    "parse_size_or_percent",
]


class _Loader(Reader):
    """The schema's sections, read with the checks between them."""

    def __init__(self, source: str, memory_total: int | None = None) -> None:
        super().__init__(source)
        self.memory_total = memory_total  # bytes of physical memory; None: unknown

    def load(self, root: Node | None) -> Config:
        if root is None or (isinstance(root, ScalarNode) and root.tag == NULL_TAG):
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
        runtime_dir = self.get(top, "runtime_dir", "", values.abs_path, defaults.runtime_dir)
        journal_dir = self.get(top, "journal_dir", "", values.abs_path, defaults.journal_dir)
        ram = self.ram(top)
        sync = self.sync(top)
        adaptive, watch_nodes, excludes = self.adaptive(top)
        pins, pin_nodes = self.pins(top)
        metrics = self.metrics(top)
        check_dirs(self, top, runtime_dir, journal_dir)
        check_trees(self, runtime_dir, journal_dir, pin_nodes, watch_nodes, excludes)
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

    def section(self, top: dict[str, Entry], key: str, cls: type) -> dict[str, Entry]:
        entry = top.get(key)
        if entry is None:
            return {}
        return self.mapping(entry.value, key, _known(cls)) or {}

    def ram(self, top: dict[str, Entry]) -> RamConfig:
        d = RamConfig()
        s = self.section(top, "ram", RamConfig)
        ram = RamConfig(
            max=self.get(s, "max", "ram", values.ram_max, d.max),
            high_watermark=self.get(s, "high_watermark", "ram", values.fraction, d.high_watermark),
            min_free=self.get(s, "min_free", "ram", values.size, d.min_free),
            backend=self.get(s, "backend", "ram", values.one_of(RAM_BACKENDS), d.backend),
            compression=self.get(
                s, "compression", "ram", values.one_of(ZRAM_ALGORITHMS), d.compression
            ),
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
        self, entries: dict[str, Entry], key: str, size: int | None, hint: str
    ) -> None:
        entry = entries.get(key)
        path = join_key("ram", key)
        total = self.memory_total
        if total is None or entry is None or size is None or path in self.bad or size <= total:
            return
        written = str(entry.value.value)  # accepted, so a scalar: the text as the file has it
        self.issue(
            entry.value,
            path,
            f"{written} is more than this machine's {values.format_memory(total)} of memory"
            f" ({hint})",
        )

    def sync(self, top: dict[str, Entry]) -> SyncConfig:
        d = SyncConfig()
        s = self.section(top, "sync", SyncConfig)
        return SyncConfig(
            interval=self.get(s, "interval", "sync", values.duration, d.interval),
            on_session_end=self.get(s, "on_session_end", "sync", values.boolean, d.on_session_end),
        )

    def metrics(self, top: dict[str, Entry]) -> MetricsConfig:
        d = MetricsConfig()
        s = self.section(top, "metrics", MetricsConfig)
        return MetricsConfig(
            textfile=self.get(
                s, "textfile", "metrics", values.optional(values.textfile), d.textfile
            ),
            listen=self.get(s, "listen", "metrics", values.optional(values.listen), d.listen),
            interval=self.get(s, "interval", "metrics", values.metrics_interval, d.interval),
        )

    def adaptive(self, top: dict[str, Entry]) -> tuple[AdaptiveConfig, list[Placed], list[Placed]]:
        d = AdaptiveConfig()
        s = self.section(top, "adaptive", AdaptiveConfig)
        p = "adaptive"
        pin_above = self.get(s, "pin_above", p, values.positive_events_per_second, d.pin_above)
        unpin_below = self.get(s, "unpin_below", p, values.events_per_second, d.unpin_below)
        if {"adaptive.pin_above", "adaptive.unpin_below"}.isdisjoint(self.bad) and not (
            unpin_below < pin_above
        ):
            entry = s.get("unpin_below") or s.get("pin_above")
            default = "" if "unpin_below" in s else " by default"
            self.issue(
                entry.value if entry else None,
                "adaptive.unpin_below",
                "must be less than adaptive.pin_above (unpin_below is "
                f"{values.format_number(unpin_below)}{default}, pin_above is "
                f"{values.format_number(pin_above)})",
            )
        watch, watch_nodes = self.watch(s, d.watch)
        exclude, exclude_nodes = self.string_list(
            s, "exclude", p, "expected a list of absolute paths", values.abs_path, d.exclude
        )
        config = AdaptiveConfig(
            enabled=self.get(s, "enabled", p, values.boolean, d.enabled),
            watch=watch,
            exclude=exclude,
            half_life=self.get(s, "half_life", p, values.positive_duration, d.half_life),
            pin_above=pin_above,
            hot_for=self.get(s, "hot_for", p, values.positive_duration, d.hot_for),
            unpin_below=unpin_below,
            cool_for=self.get(s, "cool_for", p, values.positive_duration, d.cool_for),
            max_pins=self.get(s, "max_pins", p, values.count, d.max_pins),
        )
        return config, watch_nodes, exclude_nodes

    def watch(
        self, s: dict[str, Entry], default: tuple[WatchRoot, ...]
    ) -> tuple[tuple[WatchRoot, ...], list[Placed]]:
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
        accepted: list[Placed] = []
        for item_path, item in items:
            w = self.mapping(
                item, item_path, _known(WatchRoot), "expected a mapping like {path: /dir, depth: 1}"
            )
            if w is None:
                continue
            if "path" not in w:
                self.issue(item, join_key(item_path, "path"), "required key is missing")
                continue
            path = self.get(w, "path", item_path, values.abs_path, "")
            root = WatchRoot(
                path=path,
                depth=self.get(w, "depth", item_path, values.count, d.depth),
                reopen=self.get(w, "reopen", item_path, values.optional(values.command), d.reopen),
            )
            roots.append(root)
            path_key = join_key(item_path, "path")
            if path_key in self.bad:
                continue
            first = next((p for v, p, _ in accepted if v == path), None)
            if first is not None:
                self.issue(w["path"].value, path_key, f"repeats {first}")
                continue
            accepted.append((path, path_key, w["path"].value))
        return tuple(roots), accepted

    def pins(self, top: dict[str, Entry]) -> tuple[tuple[PinConfig, ...], list[Placed]]:
        entry = top.get("pins")
        if entry is None:
            return (), []
        items = self.items(entry.value, "pins", "expected a list of pins")
        if items is None:
            return (), []
        pins: list[PinConfig] = []
        accepted: list[Placed] = []
        for item_path, item in items:
            parsed = self.pin(item, item_path)
            if parsed is None:
                continue
            pin, path_node = parsed
            pins.append(pin)
            path_key = join_key(item_path, "path")
            if path_key not in self.bad:
                accepted.append((pin.path, path_key, path_node))
        return tuple(pins), accepted

    def pin(self, item: Node, item_path: str) -> tuple[PinConfig, Node] | None:
        p = self.mapping(item, item_path, _known(PinConfig), "expected a mapping like {path: /dir}")
        if p is None:
            return None
        if "path" not in p:
            self.issue(item, join_key(item_path, "path"), "required key is missing")
            return None
        d = PinConfig("")  # the defaults of its keys
        mode = self.get(p, "mode", item_path, values.mode, d.mode)
        mode_ok = join_key(item_path, "mode") not in self.bad
        pin = PinConfig(
            path=self.get(p, "path", item_path, values.glob_path, ""),
            mode=mode,
            sync_interval=self.get(
                p, "sync_interval", item_path, values.optional(values.duration), d.sync_interval
            ),
            max_size=self.get(
                p, "max_size", item_path, values.optional(values.positive_size), d.max_size
            ),
            before=self.string_list(
                p,
                "before",
                item_path,
                "expected a list of systemd units",
                values.unit_name,
                d.before,
            )[0],
            size=self.get(p, "size", item_path, values.optional(values.positive_size), d.size),
            keep=self.string_list(
                p, "keep", item_path, "expected a list of directory names", values.keep_name, d.keep
            )[0],
            reopen=self.get(p, "reopen", item_path, values.optional(values.command), d.reopen),
            max_age=self.get(
                p, "max_age", item_path, values.optional(values.positive_duration), d.max_age
            ),
        )
        if mode_ok and mode != "volatile":
            for key in ("size", "keep", "max_age"):
                if key in p:
                    self.issue(
                        p[key].key,
                        join_key(item_path, key),
                        f"applies only to volatile pins (this pin's mode is {mode})",
                    )
        if mode_ok and mode == "volatile" and "sync_interval" in p:
            self.issue(
                p["sync_interval"].key,
                join_key(item_path, "sync_interval"),
                "does not apply to volatile pins: nothing is written back",
            )
        return pin, p["path"].value


def _known(cls: type) -> tuple[str, ...]:
    """The keys a section accepts: the fields of its dataclass (`source` is not a key)."""
    return tuple(f.name for f in fields(cls) if f.name != "source")


# --------------------------------------------------------------------------- entry points


def load_text(text: str, source: str, *, memory_total: int | None = None) -> Config:
    """The configuration in `text`; `source` names it in messages and in `Config.source`.
    `memory_total`: the machine's physical memory in bytes (psutil.virtual_memory().total),
    against which `ram.max` and `ram.min_free` are checked; None skips that check.
    Raises ConfigError listing every problem."""
    root = compose(text, source)
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
