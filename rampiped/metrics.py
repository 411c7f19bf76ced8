"""Metrics: what is in RAM, what is not on disk yet and for how long, and what was written back.

Three readers, one set of figures:

- Prometheus, through a node_exporter textfile (`metrics.textfile`, rewritten every
  `metrics.interval`: a temporary file, then a rename) or an HTTP endpoint on a loopback address
  (`metrics.listen`, off by default). The endpoint is served from the daemon's own selector
  loop, not a thread: a scrape reads the same state the loop owns, without locks, and a scrape
  that stalls cannot hold anything up (each connection is non-blocking and dropped after
  `HTTP_TIMEOUT`).
- systemd's STATUS line (`risk_text`), and `rampipectl status`/`top` (`dirty`, `at_risk`).

`Metrics` (in `metricdefs`, with the name, help text and labels of every series) holds the
Prometheus registry (one per daemon, not the library's global one) and is pure: the daemon
reports events and samples to it; it renders text. `Observer` is the daemon's
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rampiped import __version__, config, pins
from rampiped.listener import Client, Listener
from rampiped.metricdefs import (
    STATES,
    WRITEBACK_BUCKETS,
    Metrics,
    PinSample,
    Sample,
    disable_created_series,
)
from rampiped.units import format_bytes, format_duration

__all__ = [
    "CONTENT_TYPE",
    "DIRTY_MAX_AGE",
    "HTTP_MAX_CLIENTS",
    "HTTP_MAX_REQUEST",
    "HTTP_TIMEOUT",
    "STATES",
    "WALK_COST_FACTOR",
    "WRITEBACK_BUCKETS",
    "HttpServer",
    "Metrics",
    "Observer",
    "PinSample",
    "Sample",
    "__version__",
    "at_risk",
    "disable_created_series",
    "risk_text",
    "write_textfile",
]

log = logging.getLogger("rampiped")

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
                    written_bytes=pin.written_bytes,
                    whole_file_bytes=pin.whole_file_bytes,
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
