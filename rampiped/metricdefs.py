"""Metric definitions: every series rampiped exports, with its help text and labels, and the
accounting behind them (`Metrics`). Pure: no clock, no files. `rampiped.metrics` measures the
pins, feeds `Metrics` and exposes what it renders (its docstring defines the figures).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from rampiped import __version__

STATES = ("pinning", "pinned", "draining")
# Write-backs take from a few milliseconds (a small log directory) to minutes (a large copy pin
# on an SD card); the buckets cover that range at roughly x2-x3 steps.
WRITEBACK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_BY_PIN = ("path", "mode")

# Every gauge and every counter (named without the _total the exposition adds to a counter):
# its help text and its labels. `Metrics` registers them in this order.
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "rampiped_info": ("The running rampiped.", ("version",)),
    "rampiped_pins": ("Directories pinned now.", ()),
    "rampiped_ram_bytes": ("RAM used by all pins.", ()),
    "rampiped_ram_max_bytes": ("RAM all pins together may use (ram.max).", ()),
    "rampiped_ram_high_watermark_bytes": (
        "RAM of all pins above which the coldest adaptive pin is evicted (ram.high_watermark of"
        " ram.max).",
        (),
    ),
    "rampiped_textfile_interval_seconds": (
        "Seconds between rewrites of the metrics textfile (metrics.interval): a textfile older"
        " than a few of them is stale.",
        (),
    ),
    "rampiped_dirty_bytes": (
        "Bytes in RAM not yet on disk, all pins: changed files since their last good checkpoint.",
        (),
    ),
    "rampiped_data_at_risk_seconds": (
        "Age of the oldest change not yet on disk, over all pins; 0 when all is on disk.",
        (),
    ),
    "rampiped_pin_state": (
        "1 for the state the pin is in (pinning, pinned, draining), 0 for the others.",
        (*_BY_PIN, "state"),
    ),
    "rampiped_pin_write_rate": (
        "Write events per second in the pinned directory (moving average).",
        _BY_PIN,
    ),
    "rampiped_pin_ram_bytes": ("RAM used by the pin.", _BY_PIN),
    "rampiped_pin_stored_bytes": (
        "Bytes the pin's files take in RAM before compression (ram_bytes on tmpfs).",
        _BY_PIN,
    ),
    "rampiped_pin_written_bytes": (
        "Bytes the pin's checkpoints wrote to disk since it was made: files copied whole and"
        " tails appended (a file renamed or linked into place costs none).",
        _BY_PIN,
    ),
    "rampiped_pin_whole_file_bytes": (
        "Bytes the same checkpoints would have written with each changed file whole: against"
        " rampiped_pin_written_bytes, what appends and renames spared.",
        _BY_PIN,
    ),
    "rampiped_stranded_bytes": (
        "Bytes of a write-back that could not complete: in the journal or RAM only, not in the"
        " directory (retried until it completes).",
        ("path",),
    ),
    "rampiped_pin_dirty_bytes": (
        "Bytes of the pin not yet on disk: files changed since its last good checkpoint.",
        _BY_PIN,
    ),
    "rampiped_pin_data_at_risk_seconds": (
        "Age of the pin's oldest change not yet on disk; 0 when all is on disk.",
        _BY_PIN,
    ),
    "rampiped_pin_sync_interval_seconds": (
        "Seconds between the pin's checkpoints (sync.interval or its sync_interval); 0 when it"
        " has none (volatile, or checkpoints disabled).",
        _BY_PIN,
    ),
}

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rampiped_pins_made": ("Directories moved into RAM.", _BY_PIN),
    "rampiped_checkpoints": (
        "Checkpoints (writes to disk while pinned), by result (ok, failed).",
        (*_BY_PIN, "result"),
    ),
    "rampiped_unpins": ("Unpins done (written back, RAM freed), evictions included.", _BY_PIN),
    "rampiped_evictions": ("Unpins forced by RAM pressure.", _BY_PIN),
    "rampiped_failures": (
        "Operations that did not happen: operation pin, checkpoint or unpin; kind refused (a"
        " precondition, such as a process holding a file), busy (in use at unpin) or error.",
        (*_BY_PIN, "operation", "kind"),
    ),
    "rampiped_written_bytes": (
        "Bytes written to disk by write-backs (operation checkpoint or unpin), as rsync reports"
        " them.",
        (*_BY_PIN, "operation"),
    ),
    "rampiped_written_files": (
        "Files written to disk by write-backs (operation checkpoint or unpin).",
        (*_BY_PIN, "operation"),
    ),
    "rampiped_absorbed_bytes": (
        "Bytes that landed in RAM instead of on disk: growth of the bytes not yet on disk"
        " between measurements, plus what a write-back wrote beyond them. Never less than"
        " rampiped_written_bytes_total; the difference never had to reach the disk.",
        _BY_PIN,
    ),
    "rampiped_absorbed_events": (
        "Write events (writes, creations, deletions, renames) that went to RAM instead of the"
        " disk.",
        _BY_PIN,
    ),
}

# The monitor's totals, reported as counters: (key in the sample, name, help).
_MONITOR_COUNTERS = (
    ("events", "rampiped_monitor_events", "Write events the fanotify monitor counted."),
    (
        "lost_events",
        "rampiped_monitor_lost_events",
        "fanotify queue overflows: each stands for an unknown number of write events not seen"
        " (pinned directories are then treated as hot).",
    ),
    (
        "ignored",
        "rampiped_monitor_ignored_events",
        "Write events of rampiped's own processes (its rsync), not counted as load.",
    ),
    (
        "unresolved",
        "rampiped_monitor_unresolved_events",
        "Write events whose directory was gone before it could be named.",
    ),
)


@dataclass(frozen=True)
class PinSample:
    path: str
    mode: str
    state: str
    rate: float  # events/s
    ram_bytes: int
    dirty_bytes: int
    at_risk_s: float  # age of the oldest change not yet on disk; 0 when there is none
    sync_interval: float = 0.0  # seconds between its checkpoints; 0: none
    stored_bytes: int | None = None  # before compression (ram.backend zram); None: ram_bytes
    written_bytes: int = 0  # what its checkpoints wrote
    whole_file_bytes: int = 0  # what they would have written with whole files


@dataclass(frozen=True)
class Sample:
    pins: tuple[PinSample, ...]
    ram_max_bytes: int
    monitor: Mapping[str, int]  # Monitor.stats() and the daemon's lost_events
    stranded: Mapping[str, int] = field(default_factory=dict)  # path -> bytes not on disk
    ram_high_bytes: int = 0  # ram.high_watermark of ram_max_bytes: evictions start above it
    textfile_interval: float = 0.0  # metrics.interval: seconds between rewrites of the textfile


def _label(path: str) -> str:
    """A path as a label value: paths are bytes, label values UTF-8."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Totals:
    """Counters kept elsewhere (the monitor's), reported as they were last sampled."""

    def __init__(self) -> None:
        self.values: Mapping[str, int] = {}

    def collect(self) -> Iterable[Metric]:
        for key, name, help_text in _MONITOR_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=self.values.get(key, 0))


def disable_created_series() -> None:
    """No `_created` series: they are noise in a textfile and double the lines of every counter.

    prometheus-client 0.18 and later have disable_created_metrics(); Debian 12's 0.16 reads the
    switch once, at import, from $PROMETHEUS_DISABLE_CREATED_SERIES into the module global that
    disable_created_metrics() sets, so that global is set the same way here."""
    disable = getattr(prometheus_client, "disable_created_metrics", None)
    if disable is not None:
        disable()
    else:
        prometheus_client.metrics._use_created = False


class Metrics:
    """The registry and the accounting behind it. Pure: no clock, no files."""

    def __init__(self) -> None:
        disable_created_series()
        r = self.registry = CollectorRegistry(auto_describe=True)

        def gauge(name: str) -> Gauge:
            help_text, labels = GAUGES[name]
            return Gauge(name, help_text, labels, registry=r)

        def counter(name: str) -> Counter:
            help_text, labels = COUNTERS[name]
            return Counter(name, help_text, labels, registry=r)

        gauge("rampiped_info").labels(__version__).set(1)
        self.pins = gauge("rampiped_pins")
        self.ram = gauge("rampiped_ram_bytes")
        self.ram_max = gauge("rampiped_ram_max_bytes")
        self.ram_high = gauge("rampiped_ram_high_watermark_bytes")
        self.textfile_interval = gauge("rampiped_textfile_interval_seconds")
        self.dirty = gauge("rampiped_dirty_bytes")
        self.at_risk = gauge("rampiped_data_at_risk_seconds")
        self.pin_state = gauge("rampiped_pin_state")
        self.pin_rate = gauge("rampiped_pin_write_rate")
        self.pin_ram = gauge("rampiped_pin_ram_bytes")
        self.pin_stored = gauge("rampiped_pin_stored_bytes")
        self.pin_written = gauge("rampiped_pin_written_bytes")
        self.pin_whole = gauge("rampiped_pin_whole_file_bytes")
        self.stranded = gauge("rampiped_stranded_bytes")
        self.pin_dirty = gauge("rampiped_pin_dirty_bytes")
        self.pin_at_risk = gauge("rampiped_pin_data_at_risk_seconds")
        self.pin_sync_interval = gauge("rampiped_pin_sync_interval_seconds")
        self.pins_made = counter("rampiped_pins_made")
        self.checkpoints = counter("rampiped_checkpoints")
        self.unpins = counter("rampiped_unpins")
        self.evictions = counter("rampiped_evictions")
        self.failures = counter("rampiped_failures")
        self.written_bytes = counter("rampiped_written_bytes")
        self.written_files = counter("rampiped_written_files")
        self.absorbed_bytes = counter("rampiped_absorbed_bytes")
        self.absorbed_events = counter("rampiped_absorbed_events")
        self.writeback_seconds = Histogram(
            "rampiped_writeback_duration_seconds",
            "Duration of successful write-backs (operation checkpoint or unpin).",
            [*_BY_PIN, "operation"],
            buckets=WRITEBACK_BUCKETS,
            registry=r,
        )
        self._totals = _Totals()
        r.register(self._totals)
        # per pin: the dirty bytes last measured since its last write-back (absorbed bytes)
        self._dirty_seen: dict[str, int] = {}

    # -- events ------------------------------------------------------------------------------

    def pinned(self, path: str, mode: str) -> None:
        label = _label(path)
        self.pins_made.labels(label, mode).inc()
        # series that start at 0 with the pin, so that rate() and increase() see their first
        # increase (the alert rules in packaging/prometheus count failures that way)
        self.absorbed_bytes.labels(label, mode)
        self.absorbed_events.labels(label, mode)
        for result in ("ok", "failed"):
            self.checkpoints.labels(label, mode, result)
        for operation in ("checkpoint", "unpin"):
            self.failures.labels(label, mode, operation, "error")
        self.unpins.labels(label, mode)
        self.evictions.labels(label, mode)
        self._dirty_seen[path] = 0

    def pin_failed(self, path: str, mode: str, kind: str) -> None:
        self.failures.labels(_label(path), mode, "pin", kind).inc()

    def checkpointed(
        self, path: str, mode: str, *, ok: bool, seconds: float, files: int, nbytes: int
    ) -> None:
        label = _label(path)
        self.checkpoints.labels(label, mode, "ok" if ok else "failed").inc()
        if not ok:
            self.failures.labels(label, mode, "checkpoint", "error").inc()
            return
        self._wrote(path, mode, "checkpoint", seconds, files, nbytes)

    def unpinned(
        self, path: str, mode: str, *, evicted: bool, seconds: float, files: int, nbytes: int
    ) -> None:
        label = _label(path)
        self.unpins.labels(label, mode).inc()
        if evicted:
            self.evictions.labels(label, mode).inc()
        self._wrote(path, mode, "unpin", seconds, files, nbytes)
        self._dirty_seen.pop(path, None)

    def unpin_failed(self, path: str, mode: str, kind: str) -> None:
        self.failures.labels(_label(path), mode, "unpin", kind).inc()

    def absorbed(self, path: str, mode: str, events: int) -> None:
        if events > 0:
            self.absorbed_events.labels(_label(path), mode).inc(events)

    def measured(self, path: str, mode: str, dirty_bytes: int) -> None:
        """A fresh measurement of a pin's bytes not yet on disk: their growth was absorbed."""
        before = self._dirty_seen.get(path, 0)
        if dirty_bytes > before:
            self.absorbed_bytes.labels(_label(path), mode).inc(dirty_bytes - before)
        self._dirty_seen[path] = dirty_bytes

    def _wrote(
        self, path: str, mode: str, operation: str, seconds: float, files: int, nbytes: int
    ) -> None:
        label = _label(path)
        self.written_bytes.labels(label, mode, operation).inc(nbytes)
        self.written_files.labels(label, mode, operation).inc(files)
        self.writeback_seconds.labels(label, mode, operation).observe(seconds)
        # what the write-back wrote beyond the changes measured went through RAM unseen
        beyond = nbytes - self._dirty_seen.get(path, 0)
        if beyond > 0:
            self.absorbed_bytes.labels(label, mode).inc(beyond)
        self._dirty_seen[path] = 0

    # -- state -------------------------------------------------------------------------------

    def update(self, sample: Sample) -> None:
        """Gauges from a sample; pins that are gone disappear (their counters stay)."""
        self.pins.set(len(sample.pins))
        self.ram.set(sum(p.ram_bytes for p in sample.pins))
        self.ram_max.set(sample.ram_max_bytes)
        self.ram_high.set(sample.ram_high_bytes)
        self.textfile_interval.set(sample.textfile_interval)
        self.dirty.set(sum(p.dirty_bytes for p in sample.pins))
        self.at_risk.set(max((p.at_risk_s for p in sample.pins), default=0.0))
        for gauge in (
            self.pin_state,
            self.pin_rate,
            self.pin_ram,
            self.pin_stored,
            self.pin_dirty,
            self.pin_written,
            self.pin_whole,
        ):
            gauge.clear()
        self.pin_at_risk.clear()
        self.pin_sync_interval.clear()
        for p in sample.pins:
            label = _label(p.path)
            for state in STATES:
                self.pin_state.labels(label, p.mode, state).set(1 if p.state == state else 0)
            self.pin_rate.labels(label, p.mode).set(p.rate)
            self.pin_ram.labels(label, p.mode).set(p.ram_bytes)
            stored = p.ram_bytes if p.stored_bytes is None else p.stored_bytes
            self.pin_stored.labels(label, p.mode).set(stored)
            self.pin_dirty.labels(label, p.mode).set(p.dirty_bytes)
            self.pin_written.labels(label, p.mode).set(p.written_bytes)
            self.pin_whole.labels(label, p.mode).set(p.whole_file_bytes)
            self.pin_at_risk.labels(label, p.mode).set(p.at_risk_s)
            self.pin_sync_interval.labels(label, p.mode).set(p.sync_interval)
        self._totals.values = dict(sample.monitor)
        self.stranded.clear()
        for path, nbytes in sample.stranded.items():
            self.stranded.labels(_label(path)).set(nbytes)

    def render(self) -> bytes:
        """The Prometheus text format."""
        return prometheus_client.generate_latest(self.registry)
