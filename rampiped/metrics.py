"""Metrics: what is in RAM, what is not on disk yet and for how long, and what was written back.

Three readers, one set of figures:

- Prometheus, through a node_exporter textfile (`metrics.textfile`, rewritten every
  `metrics.interval`: a temporary file, then a rename) or an HTTP endpoint on a loopback address
  (`metrics.listen`, off by default). The endpoint is served from the daemon's own selector
  loop, not a thread: a scrape reads the same state the loop owns, without locks, and a scrape
  that stalls cannot hold anything up (each connection is non-blocking and dropped after
  `HTTP_TIMEOUT`).
- systemd's STATUS line (`risk_text`), and `rampipectl status`/`top` (`dirty`, `at_risk`).

`Metrics` holds the Prometheus registry (one per daemon, not the library's global one) and is
pure: the daemon reports events and samples to it; it renders text. `Observer` is the daemon's
side: it measures the pins (walking the RAM side is not free, so each measurement is reused
for a while), writes the textfile and serves the endpoint.

Definitions (also in the HELP text of each metric):

- dirty bytes: the size of the regular files on a pin's RAM side that changed since its last
  good checkpoint; data at risk: the age of the oldest change not yet on disk (0 when there is
  none). A power cut loses at most these.
- written bytes: what the write-backs (checkpoints and unpins) wrote to disk, as rsync reports.
- absorbed bytes: what landed in RAM instead of on the disk. The size of each write is not
  visible to fanotify, so it is the growth of the dirty bytes between measurements, plus
  whatever a write-back wrote beyond the dirty bytes last measured. It is never less than what
  was written; the difference is data that never had to reach the disk (files removed or
  truncated before a write-back). Files rewritten between two measurements count once, so it
  is a floor.
- absorbed events: write events (writes, creations, deletions, renames) seen on the RAM side of
  a pin: each would have been a write to the disk. Against `written_files` it says how many
  writes a pin folded into one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from rampiped import __version__, config, pins
from rampiped.engine import format_bytes, format_duration
from rampiped.listener import Client, Listener

log = logging.getLogger("rampiped")

STATES = ("pinning", "pinned", "draining")
# Write-backs take from a few milliseconds (a small log directory) to minutes (a large copy pin
# on an SD card); the buckets cover that range at roughly x2-x3 steps.
WRITEBACK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# The text format generate_latest() writes (version 0.0.4: what every Prometheus and
# node_exporter reads).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A measurement of a pin's changes is reused for this long (the STATUS line asks twice a
# second), and for at least WALK_COST_FACTOR times as long as the last walk took, so that a
# pin with many files cannot keep the loop walking.
DIRTY_MAX_AGE = 5.0
WALK_COST_FACTOR = 20.0

HTTP_TIMEOUT = 10.0  # seconds a client may take to send its request and read the answer
HTTP_MAX_REQUEST = 8192
HTTP_MAX_CLIENTS = 16

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
        by_pin = ("path", "mode")
        Gauge("rampiped_info", "The running rampiped.", ["version"], registry=r).labels(
            __version__
        ).set(1)
        self.pins = Gauge("rampiped_pins", "Directories pinned now.", registry=r)
        self.ram = Gauge("rampiped_ram_bytes", "RAM used by all pins.", registry=r)
        self.ram_max = Gauge(
            "rampiped_ram_max_bytes", "RAM all pins together may use (ram.max).", registry=r
        )
        self.ram_high = Gauge(
            "rampiped_ram_high_watermark_bytes",
            "RAM of all pins above which the coldest adaptive pin is evicted"
            " (ram.high_watermark of ram.max).",
            registry=r,
        )
        self.textfile_interval = Gauge(
            "rampiped_textfile_interval_seconds",
            "Seconds between rewrites of the metrics textfile (metrics.interval): a textfile"
            " older than a few of them is stale.",
            registry=r,
        )
        self.dirty = Gauge(
            "rampiped_dirty_bytes",
            "Bytes in RAM not yet on disk, all pins: changed files since their last good"
            " checkpoint.",
            registry=r,
        )
        self.at_risk = Gauge(
            "rampiped_data_at_risk_seconds",
            "Age of the oldest change not yet on disk, over all pins; 0 when all is on disk.",
            registry=r,
        )
        self.pin_state = Gauge(
            "rampiped_pin_state",
            "1 for the state the pin is in (pinning, pinned, draining), 0 for the others.",
            [*by_pin, "state"],
            registry=r,
        )
        self.pin_rate = Gauge(
            "rampiped_pin_write_rate",
            "Write events per second in the pinned directory (moving average).",
            by_pin,
            registry=r,
        )
        self.pin_ram = Gauge("rampiped_pin_ram_bytes", "RAM used by the pin.", by_pin, registry=r)
        self.pin_stored = Gauge(
            "rampiped_pin_stored_bytes",
            "Bytes the pin's files take in RAM before compression (ram_bytes on tmpfs).",
            by_pin,
            registry=r,
        )
        self.stranded = Gauge(
            "rampiped_stranded_bytes",
            "Bytes of a write-back that could not complete: in the journal or RAM only, not in"
            " the directory (retried until it completes).",
            ["path"],
            registry=r,
        )
        self.pin_dirty = Gauge(
            "rampiped_pin_dirty_bytes",
            "Bytes of the pin not yet on disk: files changed since its last good checkpoint.",
            by_pin,
            registry=r,
        )
        self.pin_at_risk = Gauge(
            "rampiped_pin_data_at_risk_seconds",
            "Age of the pin's oldest change not yet on disk; 0 when all is on disk.",
            by_pin,
            registry=r,
        )
        self.pin_sync_interval = Gauge(
            "rampiped_pin_sync_interval_seconds",
            "Seconds between the pin's checkpoints (sync.interval or its sync_interval); 0 when"
            " it has none (volatile, or checkpoints disabled).",
            by_pin,
            registry=r,
        )
        self.pins_made = Counter(
            "rampiped_pins_made", "Directories moved into RAM.", by_pin, registry=r
        )
        self.checkpoints = Counter(
            "rampiped_checkpoints",
            "Checkpoints (writes to disk while pinned), by result (ok, failed).",
            [*by_pin, "result"],
            registry=r,
        )
        self.unpins = Counter(
            "rampiped_unpins",
            "Unpins done (written back, RAM freed), evictions included.",
            by_pin,
            registry=r,
        )
        self.evictions = Counter(
            "rampiped_evictions", "Unpins forced by RAM pressure.", by_pin, registry=r
        )
        self.failures = Counter(
            "rampiped_failures",
            "Operations that did not happen: operation pin, checkpoint or unpin; kind refused"
            " (a precondition, such as a process holding a file), busy (in use at unpin) or"
            " error.",
            [*by_pin, "operation", "kind"],
            registry=r,
        )
        self.written_bytes = Counter(
            "rampiped_written_bytes",
            "Bytes written to disk by write-backs (operation checkpoint or unpin), as rsync"
            " reports them.",
            [*by_pin, "operation"],
            registry=r,
        )
        self.written_files = Counter(
            "rampiped_written_files",
            "Files written to disk by write-backs (operation checkpoint or unpin).",
            [*by_pin, "operation"],
            registry=r,
        )
        self.absorbed_bytes = Counter(
            "rampiped_absorbed_bytes",
            "Bytes that landed in RAM instead of on disk: growth of the bytes not yet on disk"
            " between measurements, plus what a write-back wrote beyond them. Never less than"
            " rampiped_written_bytes_total; the difference never had to reach the disk.",
            by_pin,
            registry=r,
        )
        self.absorbed_events = Counter(
            "rampiped_absorbed_events",
            "Write events (writes, creations, deletions, renames) that went to RAM instead of"
            " the disk.",
            by_pin,
            registry=r,
        )
        self.writeback_seconds = Histogram(
            "rampiped_writeback_duration_seconds",
            "Duration of successful write-backs (operation checkpoint or unpin).",
            [*by_pin, "operation"],
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
        for gauge in (self.pin_state, self.pin_rate, self.pin_ram, self.pin_stored, self.pin_dirty):
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
            self.pin_at_risk.labels(label, p.mode).set(p.at_risk_s)
            self.pin_sync_interval.labels(label, p.mode).set(p.sync_interval)
        self._totals.values = dict(sample.monitor)
        self.stranded.clear()
        for path, nbytes in sample.stranded.items():
            self.stranded.labels(_label(path)).set(nbytes)

    def render(self) -> bytes:
        """The Prometheus text format."""
        return prometheus_client.generate_latest(self.registry)


def at_risk(dirty: pins.Dirty, wall: float) -> float:
    """Seconds since the oldest change not yet on disk; 0 when there is none."""
    return 0.0 if dirty.oldest is None else max(0.0, wall - dirty.oldest)


def risk_text(dirty_bytes: int, age: float) -> str:
    """For the STATUS line: "1.3 MiB at risk (oldest 42s)" (ASCII)."""
    if age <= 0 and dirty_bytes == 0:
        return "nothing at risk"
    return f"{format_bytes(dirty_bytes)} at risk (oldest {format_duration(round(age))})"


def write_textfile(path: str, data: bytes) -> None:
    """Replace `path` atomically: node_exporter never reads half a file. No fsync: the file
    is rewritten every interval, and forcing it to disk would be the very write a pin saves.
    The temporary name does not end in .prom, so node_exporter skips it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class _Measured:
    dirty: pins.Dirty
    at: float  # monotonic
    took: float  # seconds the walk took


class HttpServer(Listener):
    """GET /metrics on a loopback address, served from the daemon's selector loop."""

    recv_size = 4096
    max_request = HTTP_MAX_REQUEST
    max_clients = HTTP_MAX_CLIENTS
    timeout = HTTP_TIMEOUT
    terminators = (b"\r\n\r\n", b"\n\n")

    def __init__(
        self,
        host: str,
        port: int,
        selector: selectors.BaseSelector,
        render: Callable[[], bytes],
    ) -> None:
        self.render = render
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        self.address = sock.getsockname()[:2]
        super().__init__(sock, selector)

    def _timed_out(self, client: Client) -> None:
        self._close(client)  # reading its request or its answer: too slow either way

    def _accept_failed(self, exc: OSError) -> None:
        # EMFILE and the like: try again at the next wake-up
        log.debug("metrics endpoint: accept failed: %s", exc)

    def _too_large(self, client: Client) -> None:
        self._answer(client, "431 Request Header Fields Too Large", b"request too large\n")

    def _request(self, client: Client) -> None:
        parts = client.inbuf.split(b"\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._answer(client, "400 Bad Request", b"not an HTTP request\n")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            self._answer(client, "405 Method Not Allowed", b"GET only\n", extra="Allow: GET, HEAD")
        elif target == "/metrics":
            try:
                body = self.render()
            except Exception:  # a scrape must not take the daemon down
                log.exception("metrics endpoint: rendering failed")
                self._answer(client, "500 Internal Server Error", b"rendering failed\n")
                return
            self._answer(client, "200 OK", body, content_type=CONTENT_TYPE, head=head)
        elif target == "/":
            self._answer(client, "200 OK", b"rampiped: metrics at /metrics\n", head=head)
        else:
            self._answer(client, "404 Not Found", b"metrics are at /metrics\n", head=head)

    def _answer(
        self,
        client: Client,
        status: str,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        head: bool = False,
        extra: str = "",
    ) -> None:
        lines = [
            f"HTTP/1.1 {status}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if extra:
            lines.append(extra)
        header = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        self._reply(client, header + (b"" if head else body))


class Observer:
    """The daemon's side: measures the pins, keeps `Metrics` up to date, writes the textfile
    and serves the endpoint. Runs in the main loop only."""

    def __init__(
        self,
        cfg: config.MetricsConfig,
        pinmgr: pins.PinManager,
        *,
        rate: Callable[[str, float], float],
        ram_max: Callable[[], int],
        monitor: Callable[[], Mapping[str, int]],
        ram_high: Callable[[], int] | None = None,
        sync_interval: Callable[[], float] | None = None,
    ) -> None:
        """`ram_high`: the RAM above which pins are evicted (default: `ram_max`);
        `sync_interval`: sync.interval, for pins without their own (default: 0)."""
        self.cfg = cfg
        self.pinmgr = pinmgr
        self.rate = rate
        self.ram_max = ram_max
        self.monitor = monitor
        self.ram_high = ram_high or ram_max
        self.sync_interval = sync_interval or (lambda: 0.0)
        self.metrics = Metrics()
        self.server: HttpServer | None = None
        self.selector: selectors.BaseSelector | None = None
        self.next_write = 0.0
        self.textfile_error: str | None = None
        self._measured: dict[str, _Measured] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self._listen(self.cfg.listen)

    def reconfigure(self, cfg: config.MetricsConfig) -> None:
        old, self.cfg = self.cfg, cfg
        if cfg.listen != old.listen or (cfg.listen and self.server is None):
            self._listen(cfg.listen)
        if cfg.textfile != old.textfile or cfg.interval != old.interval:
            self.textfile_error = None
            self.next_write = 0.0

    def close(self) -> None:
        """At exit: the textfile shows the state rampiped leaves (what stays pinned)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.cfg.textfile:
            self._write_textfile(time.monotonic())

    def _listen(self, listen: str | None) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if not listen or self.selector is None:
            return
        host, port = config.parse_listen(listen)
        try:
            self.server = HttpServer(host, port, self.selector, self.render)
        except OSError as exc:
            log.error(
                "cannot serve metrics on %s: %s; no metrics endpoint until a reload",
                listen,
                exc.strerror or exc,
            )
            return
        log.info("serving metrics at http://%s/metrics", listen)

    def tick(self, now: float) -> None:
        if self.server is not None:
            self.server.expire(now)
        if self.cfg.textfile and now >= self.next_write:
            self.next_write = now + self.cfg.interval
            self._write_textfile(now)

    def _write_textfile(self, now: float) -> None:
        path = self.cfg.textfile
        assert path is not None
        try:
            write_textfile(path, self.render(now))
        except OSError as exc:
            problem = f"cannot write the metrics textfile {path}: {exc.strerror or exc}"
            if problem != self.textfile_error:
                log.error("%s; trying again every %s", problem, format_duration(self.cfg.interval))
            self.textfile_error = problem
            return
        if self.textfile_error is not None:
            log.info("metrics textfile %s written again", path)
            self.textfile_error = None

    # -- measurements ------------------------------------------------------------------------

    def dirty(self, pin: pins.Pin, now: float, max_age: float = DIRTY_MAX_AGE) -> pins.Dirty:
        """What of `pin` is not on disk yet, measured at most `max_age` seconds ago. A pin the
        worker is busy with is not walked (an unpin unmounts its RAM side under the walk): its
        last measurement stands."""
        last = self._measured.get(pin.path)
        walkable = pin.state == "pinned" and not pin.busy
        if last is not None and (
            not walkable or now - last.at < max(max_age, last.took * WALK_COST_FACTOR)
        ):
            return last.dirty
        if not walkable:
            return pins.Dirty(0, 0, None)
        start = time.monotonic()
        dirty = self.pinmgr.dirty(pin)
        self._measured[pin.path] = _Measured(dirty, now, time.monotonic() - start)
        self.metrics.measured(pin.path, pin.mode, dirty.bytes)
        return dirty

    def at_risk(self, pin: pins.Pin, now: float, max_age: float = DIRTY_MAX_AGE) -> float:
        return at_risk(self.dirty(pin, now, max_age), time.time())

    def risk_text(self, now: float) -> str:
        """ ", 1.3 MiB at risk (oldest 42s)" for the STATUS line; "" with nothing pinned."""
        current = list(self.pinmgr.pins.values())
        if not current:
            return ""
        wall = time.time()
        measured = [self.dirty(p, now) for p in current]
        total = sum(d.bytes for d in measured)
        age = max((at_risk(d, wall) for d in measured), default=0.0)
        return ", " + risk_text(total, age)

    def sample(self, now: float) -> Sample:
        wall = time.time()
        default_interval = self.sync_interval()
        out = []
        for pin in sorted(self.pinmgr.pins.values(), key=lambda p: p.path):
            dirty = self.dirty(pin, now)
            usage = self.pinmgr.ram_usage(pin)
            out.append(
                PinSample(
                    path=pin.path,
                    mode=pin.mode,
                    state=pin.state,
                    rate=self.rate(pin.path, now),
                    ram_bytes=usage.ram,
                    stored_bytes=usage.stored,
                    dirty_bytes=dirty.bytes,
                    at_risk_s=at_risk(dirty, wall),
                    sync_interval=(
                        default_interval if pin.sync_interval is None else pin.sync_interval
                    ),
                )
            )
        for path in list(self._measured):
            if path not in self.pinmgr.pins:
                del self._measured[path]
        stranded = {s.path: s.bytes for s in list(self.pinmgr.stranded.values())}
        return Sample(
            tuple(out),
            self.ram_max(),
            self.monitor(),
            stranded,
            ram_high_bytes=self.ram_high(),
            textfile_interval=self.cfg.interval,
        )

    def render(self, now: float | None = None) -> bytes:
        self.metrics.update(self.sample(time.monotonic() if now is None else now))
        return self.metrics.render()

    # -- events from the daemon ------------------------------------------------------------

    def finished(
        self,
        kind: str,
        path: str,
        mode: str,
        reason: str,
        result: object,
        exc: BaseException | None,
    ) -> None:
        """A job of the worker ended (Daemon._finish): `kind` pin, unpin or checkpoint; `mode`
        the pin's; `result` the job's (a Pin, or a SyncRecord) when `exc` is None."""
        m = self.metrics
        if kind == "pin":
            if exc is None:
                m.pinned(path, mode)
            else:
                m.pin_failed(path, mode, "refused" if isinstance(exc, pins.PinRefused) else "error")
        elif kind == "unpin":
            if exc is None and isinstance(result, pins.SyncRecord):
                m.unpinned(
                    path,
                    mode,
                    evicted=reason.startswith("evicted"),
                    seconds=result.seconds,
                    files=result.files,
                    nbytes=result.bytes,
                )
                self._measured.pop(path, None)
            elif exc is not None:
                m.unpin_failed(path, mode, "busy" if isinstance(exc, pins.UnpinBusy) else "error")
        elif kind == "checkpoint":
            if exc is None and isinstance(result, pins.SyncRecord):
                m.checkpointed(
                    path,
                    mode,
                    ok=result.ok,
                    seconds=result.seconds,
                    files=result.files,
                    nbytes=result.bytes,
                )
                if result.ok:
                    self._measured.pop(path, None)  # measured afresh against the new checkpoint
            else:
                m.checkpointed(path, mode, ok=False, seconds=0.0, files=0, nbytes=0)

    def absorbed(self, path: str, events: int) -> None:
        """`events` write events were attributed to `path`: absorbed when it is pinned."""
        pin = self.pinmgr.pins.get(path)
        if pin is not None and pin.state == "pinned":
            self.metrics.absorbed(path, pin.mode, events)
