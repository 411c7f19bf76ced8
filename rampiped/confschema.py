"""The configuration's schema: the frozen dataclasses of /etc/rampipe.conf, with their defaults.

They are the contract the rest of the daemon codes against; `rampiped.config` reads a file into
them (and re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PATH = "/etc/rampipe.conf"
MODES = ("copy", "overlay", "volatile")  # PinConfig.mode
RAM_BACKENDS = ("tmpfs", "zram")  # RamConfig.backend
# the zram compressors of Linux 6.x (drivers/block/zram/zcomp.c); which of them this kernel
# offers is checked when the daemon starts (ramarea.check)
ZRAM_ALGORITHMS = ("lz4", "lz4hc", "lzo", "lzo-rle", "zstd", "deflate", "842")


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
