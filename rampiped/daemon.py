"""The daemon: wiring, the main loop, signals, systemd notifications and reload.

One loop owns the state. It waits on one selector for: the signal wake-up socket (handlers
only record the signal), the monitor's "events ready" fd, the worker's "job done" fd and the
control socket, with a timeout that makes the engine tick twice a second. Slow work (copies,
rsync, the size of a candidate) runs in one worker thread, one job at a time, so the loop keeps
answering `rampipectl` and the systemd watchdog while a sync runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import glob
import logging
import os
import queue
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from rampiped import (
    __version__,
    config,
    control,
    engine,
    logind,
    metrics,
    mounts,
    pins,
    ramarea,
    rates,
    writeback,
)
from rampiped import log as logsetup
from rampiped.backoff import RETRY
from rampiped.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from rampiped.monitor import DisabledMonitor, Monitor, MonitorError, fanotify_refused

log = logging.getLogger("rampiped")

TICK = 0.5  # seconds between engine decisions
STOP_RETRIES = 3  # busy unpins retried at stop before a pin is left mounted
# The stop retries an unpin that failed during the stop after this long, not after the pin's
# own backoff: that one doubles up to RETRY.max (5 min), far past the unit's stop timeout
# (90 s). A retry due before the stop began (a failed checkpoint or unpin) is not waited for
# at all. STOP_RETRIES attempts wait (STOP_RETRIES - 1) * STOP_RETRY_DELAY in all, which
# gives holders a moment to let go without spinning on a pin that stays busy.
STOP_RETRY_DELAY = 5.0
EXTEND_EVERY = 5.0  # seconds between EXTEND_TIMEOUT_USEC messages during the final sync
EXTEND_BY_USEC = 30_000_000
# At most this long between logind's sleep announcement and releasing the delay lock (logind
# itself goes ahead after its InhibitDelayMaxSec, when that is shorter).
SLEEP_DEADLINE = 20.0
FACTS_MAX_AGE = 30.0  # seconds a candidate's filesystem facts and size are reused


JobReply = Callable[[Any, BaseException | None], None]


@dataclass
class SyncWait:
    """`rampipectl sync` of a pin that was busy with another operation: its checkpoint is made
    when that operation ends, unless `deadline` (monotonic) passes first."""

    deadline: float
    limit: float  # seconds it was allowed to wait, for the message
    reply: JobReply


@dataclass
class Job:
    kind: str  # pin | unpin | checkpoint | measure (a candidate's size)
    path: str
    fn: Callable[[], Any]
    reason: str = ""
    mode: str = ""  # the pin's mode (overlay, copy), for the metrics
    reply: JobReply | None = None  # told the result once the loop has taken it in


class Worker:
    """One thread that runs jobs in order and reports each result through a pipe."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.done: queue.Queue[tuple[Job, Any, BaseException | None]] = queue.Queue()
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pending = 0
        self.thread = threading.Thread(target=self._run, name="rampiped-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.pending += 1
        self.jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            result: Any = None
            exc: BaseException | None = None
            try:
                result = job.fn()
            except BaseException as e:  # reported to the loop, which decides
                exc = e
            self.done.put((job, result, exc))
            with contextlib.suppress(BlockingIOError):
                os.write(self.wfd, b"x")

    def collect(self) -> list[tuple[Job, Any, BaseException | None]]:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.rfd, 4096):
                pass
        out: list[tuple[Job, Any, BaseException | None]] = []
        while True:
            try:
                item = self.done.get_nowait()
            except queue.Empty:
                return out
            self.pending -= 1
            out.append(item)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=5)


class Notifier:
    """sd_notify, only when systemd asked for it; STATUS kept ASCII (sdnotify encodes latin-1)."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier: Any = None
        if self.enabled:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier(debug=False)
        usec = os.environ.get("WATCHDOG_USEC", "")
        wd_pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog = (
            float(usec) / 1e6 / 2
            if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == str(os.getpid()))
            else 0.0
        )
        self.last_watchdog = 0.0
        self.last_status = ""

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            text = "\n".join(lines).encode("ascii", "replace").decode("ascii")
            self._notifier.notify(text)

    def status(self, text: str) -> None:
        if text != self.last_status:
            self.last_status = text
            self.send("STATUS=" + text)

    def tick(self, now: float) -> None:
        if self.watchdog and now - self.last_watchdog >= self.watchdog:
            self.last_watchdog = now
            self.send("WATCHDOG=1")


class Daemon:
    def __init__(self, cfg: config.Config, *, dry_run: bool = False) -> None:
        self.cfg = cfg
        self.dry_run = dry_run
        self.started = time.monotonic()
        self.selector = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.total_ram = psutil.virtual_memory().total
        self.rates = rates.RateTable(cfg.adaptive.half_life)
        self.engine = engine.Engine(
            cfg.adaptive, cfg.ram, cfg.sync, cfg.runtime_dir, cfg.journal_dir
        )
        self.worker = Worker()
        self.children: set[int] = set()
        self.pinmgr = pins.PinManager(
            cfg.runtime_dir,
            cfg.journal_dir,
            ram_limit=self._ram_limit(cfg),
            runner=self._run_command,
            exclude_pids=lambda: set(self.children),
        )
        self.pinmgr.ram_backend = ramarea.backend_of(cfg.ram)
        self.pending: dict[str, str] = {}  # path -> job kind queued or running
        self.dry_pins: dict[str, float] = {}  # dry run: what would be pinned, since when
        self.static_paths: dict[str, config.PinConfig] = {}
        # static pins refused (in use, raced, too large): path -> (monotonic retry time, backoff)
        self.static_retry: dict[str, tuple[float, float]] = {}
        self.watched_fs: set[str] = set()
        self.attributor = rates.Attributor((), ())
        # Where fanotify is refused (a container's seccomp filter, a user namespace): why, in
        # words; the daemon runs on with static and manual pins only (`_fanotify_refused`).
        self.fanotify_off: str | None = None
        self.monitor: Monitor | DisabledMonitor
        try:
            self.monitor = Monitor()
        except MonitorError as exc:
            if not fanotify_refused(exc):
                raise
            self.monitor = DisabledMonitor(str(exc))
            self._fanotify_refused(exc)
        self.control: control.ControlServer | None = None
        self.stopping = False
        self.stop_attempts: dict[str, int] = {}
        # the stop's own retries of unpins that failed during it: path -> monotonic time
        self.stop_retry_at: dict[str, float] = {}
        self.stop_started: set[str] = set()  # pins whose final write-back the stop began
        self.running: dict[str, str] = {}  # path -> kind of the worker's job on that pin
        self.sync_waits: dict[str, list[SyncWait]] = {}  # path -> syncs waiting for it
        # path -> `rampipectl unpin`s that came while the pin was busy (a checkpoint ran): the
        # unpin follows as soon as that ends, and answers them
        self.unpin_waits: dict[str, list[JobReply]] = {}
        self.exit_code = EXIT_OK
        self.want_reload = False
        self.want_stop = False
        self.abort = False  # leave at once, pins left mounted for the next start to adopt
        # `rampipectl handover` (a package upgrade): its reply, once every pin is checkpointed
        # and no job runs; the daemon then exits leaving the pins mounted for the next one
        self.handover: control.Reply | None = None
        self.handover_checkpointed: set[str] | None = None  # paths whose checkpoint failed
        self.overflow_until = 0.0
        self.last_tick = 0.0
        self.last_extend = 0.0
        self.last_refusal: dict[str, str] = {}
        self.facts_cache: dict[str, tuple[float, engine.CandidateFacts]] = {}
        self.measuring: set[str] = set()  # candidates whose size the worker is measuring
        self.lost_events = 0
        self.sleep_guard: logind.SleepGuard | None = None
        self.sleep_wait: set[str] = set()  # checkpoints the coming sleep waits for
        self.sleep_deadline = 0.0
        self.observer = metrics.Observer(
            cfg.metrics,
            self.pinmgr,
            rate=self.rates.rate,
            ram_max=lambda: self._ram_limit(self.cfg),
            monitor=lambda: {"lost_events": self.lost_events, **self.monitor.stats()},
            ram_high=lambda: int(self.cfg.ram.high_watermark * self._ram_limit(self.cfg)),
            sync_interval=lambda: self.cfg.sync.interval,
        )

    # -- helpers -----------------------------------------------------------------------------

    def _ram_limit(self, cfg: config.Config) -> int:
        return cfg.ram.max.resolve(self.total_ram)

    def _ram_used(self) -> int:
        return sum(self.pinmgr.ram_bytes(p) for p in self.pinmgr.pins.values())

    def _run_command(self, argv: list[str]) -> writeback.CommandResult:
        """Run a child whose writes must not count as load (the monitor ignores its pid)."""
        try:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
            )
        except FileNotFoundError:
            return writeback.CommandResult(127, "", f"{argv[0]}: command not found")
        self.children.add(proc.pid)
        self.monitor.ignore_pid(proc.pid)
        try:
            return writeback.communicate_watched(proc)
        finally:
            self.monitor.unignore_pid(proc.pid)
            self.children.discard(proc.pid)

    # -- start-up ----------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        self.sig_r, self.sig_w = socket.socketpair()
        self.sig_r.setblocking(False)
        self.sig_w.setblocking(False)
        signal.set_wakeup_fd(self.sig_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self.sig_r, selectors.EVENT_READ, lambda m: self._drain_signals())
        self.selector.register(self.worker.rfd, selectors.EVENT_READ, lambda m: self._collect())
        self.monitor.ignore_pid(os.getpid())
        self.monitor.start()
        if isinstance(self.monitor, Monitor):
            self.selector.register(
                self.monitor.fileno(),
                selectors.EVENT_READ,
                lambda m: self._drain_monitor(time.monotonic()),
            )
        if not self.dry_run:
            os.makedirs(cfg.runtime_dir, mode=0o755, exist_ok=True)
            os.makedirs(cfg.journal_dir, mode=0o700, exist_ok=True)
            self.pinmgr.prepare_runtime()
            for line in self.pinmgr.reconcile():  # before READY: adopt, finish, apply journals
                log.info("%s", line)
            for pin in list(self.pinmgr.pins.values()):
                self._watch_pin(pin)
            self.control = control.ControlServer(
                cfg.control_socket, self._on_command, self.selector
            )
            self.sleep_guard = logind.SleepGuard(
                self.selector,
                on_sleep=self._before_sleep,
                on_session_end=lambda: self._checkpoint_all("the last user session ended"),
                session_end_wanted=lambda: self.cfg.sync.on_session_end,
            )
            self.sleep_guard.start()
        self._apply_watch_roots(cfg)
        self._apply_static_pins(cfg, wait=True)
        self.observer.start(self.selector)
        mode = " (dry run: nothing is mounted)" if self.dry_run else ""
        roots = ", ".join(f"{w.path} (depth {w.depth})" for w in cfg.adaptive.watch) or "none"
        stranded = list(self.pinmgr.stranded.values())
        log.log(
            logging.ERROR if stranded else logging.INFO,
            "rampiped %s started%s: watching %s; %d pinned%s",
            __version__,
            mode,
            "nothing (adaptive pinning off: fanotify is not available here)"
            if self.fanotify_off
            else roots
            if cfg.adaptive.enabled
            else "nothing (adaptive pinning off)",
            len(self.pinmgr.pins),
            f"; {len(stranded)} WRITE-BACKS NOT COMPLETED ("
            + ", ".join(f"{s.path}: {engine.format_bytes(s.bytes)} in {s.where}" for s in stranded)
            + "), retried until they complete"
            if stranded
            else "",
        )
        self.notifier.send("READY=1", "STATUS=" + self.status_line())

    def _fanotify_refused(self, exc: OSError) -> None:
        """fanotify is refused here (`exc` from fanotify_init or fanotify_mark): say so once,
        and go on without write events. Nothing that depends on them may then act on their
        absence: no pin is unpinned for cooling (`_decide` treats every interval as one that
        lost events), and static and manual pins never depended on them."""
        if self.fanotify_off is not None:
            return
        m = re.search(r"(?:fanotify_\w+|open_by_handle_at): [^()]*[^ ()]", str(exc))
        call = m.group(0) if m else str(exc)
        if exc.errno in (errno.EPERM, errno.EACCES):
            why = "a container's seccomp filter or a user namespace refuses it"
        elif exc.errno == errno.ENOSYS:
            why = "this kernel has no fanotify, or a seccomp filter hides it"
        else:
            why = "this kernel cannot report directory handles (Linux 5.9 or later can)"
        self.fanotify_off = f"{call}; {why}"
        log.warning(
            "fanotify is not available here (%s): adaptive pinning is off; static and manual"
            " pins work, their checkpoints and write-backs too",
            self.fanotify_off,
        )
        monitor = self.monitor
        if isinstance(monitor, Monitor):  # fanotify_init worked, fanotify_mark is refused
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(monitor.fileno())
            monitor.stop()
            self.monitor = DisabledMonitor(self.fanotify_off)
        self.watched_fs.clear()

    def _watch_fs(self, path: str, *, modify: bool = True) -> None:
        """Watch the filesystem of `path`; a refusal of fanotify as such turns it off
        (`_fanotify_refused`), any other failure is raised."""
        if self.fanotify_off is not None:
            return
        try:
            self.monitor.add_filesystem(path, modify=modify)
        except MonitorError as exc:
            if not fanotify_refused(exc):
                raise
            self._fanotify_refused(exc)

    def adaptive_off(self) -> str | None:
        """Why adaptive pinning is off, or None when it is on."""
        if self.fanotify_off is not None:
            return f"fanotify is not available here ({self.fanotify_off})"
        if not self.cfg.adaptive.enabled:
            return "adaptive.enabled: false"
        return None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # record only; the loop acts (the wake-up fd gets the signal number too)
        if signum == signal.SIGHUP:
            self.want_reload = True
        else:
            self.want_stop = True

    def _drain_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.sig_r.recv(4096):
                pass

    # -- watch roots and static pins ---------------------------------------------------------

    def _apply_watch_roots(self, cfg: config.Config) -> None:
        wanted: set[str] = set()
        if cfg.adaptive.enabled:
            for root in cfg.adaptive.watch:
                if os.path.isdir(root.path):
                    wanted.add(root.path)
                else:
                    log.warning(
                        "watch root %s does not exist (yet): not watched; reload when it does",
                        root.path,
                    )
        for path in sorted(wanted - self.watched_fs):
            if self.fanotify_off is not None:
                break  # said once already, at the refusal
            try:
                self._watch_fs(path)
                if self.fanotify_off is None:
                    self.watched_fs.add(path)
            except OSError as exc:
                log.error("cannot watch %s: %s", path, exc)
        for path in sorted(self.watched_fs - wanted):
            with contextlib.suppress(OSError, KeyError):
                self.monitor.remove_filesystem(path)
            self.watched_fs.discard(path)
        self._rebuild_attributor(cfg)

    def _rebuild_attributor(self, cfg: config.Config) -> None:
        translate = {self.pinmgr.ram_side(p): p.path for p in self.pinmgr.pins.values()}
        watch = cfg.adaptive.watch if cfg.adaptive.enabled else ()
        self.attributor = rates.Attributor(
            watch, cfg.adaptive.exclude, tuple(self.static_paths), translate
        )

    def _expand_static(self, cfg: config.Config) -> dict[str, config.PinConfig]:
        out: dict[str, config.PinConfig] = {}
        for pc in cfg.pins:
            if glob.has_magic(pc.path):
                matches = sorted(p for p in glob.glob(pc.path) if os.path.isdir(p))
                if not matches:
                    log.warning("static pin %s matches no directory", pc.path)
            else:
                matches = [pc.path]
            for path in matches:
                out.setdefault(os.path.normpath(path), pc)
        return out

    def _apply_static_pins(self, cfg: config.Config, *, wait: bool) -> None:
        new = self._expand_static(cfg)
        old = self.static_paths
        self.static_paths = new
        for path in sorted(set(old) - set(new)):
            pin = self.pinmgr.pins.get(path)
            if pin is not None and pin.origin == "static":
                self._submit_unpin(pin, "no longer in the configuration")
        for path, pc in sorted(new.items()):
            if path in self.pinmgr.pins or path in self.pending:
                continue
            if self.dry_run:
                log.info("would pin %s: static pin (%s)", path, pc.mode)
                self.dry_pins[path] = time.monotonic()
                continue
            self._submit_static(path, pc)
        for path in set(self.static_retry) - set(new):
            del self.static_retry[path]
        self._rebuild_attributor(cfg)
        if wait:  # at start: static pins exist before READY (units ordered after them)
            while self.worker.pending:
                self._collect(block=True)

    def _submit_static(self, path: str, pc: config.PinConfig) -> None:
        self._submit_pin(
            path,
            pc.mode,
            "static",
            "static pin",
            sync_interval=pc.sync_interval,
            max_size=pc.max_size,
            size=pc.size,
            keep=pc.keep,
            reopen=pc.reopen or self._reopen_for(path),
        )

    def _reopen_for(self, path: str) -> str | None:
        """The reopen command of the watch root that `path` lies in (the innermost one)."""
        best: config.WatchRoot | None = None
        for root in self.cfg.adaptive.watch:
            inside = path == root.path or path.startswith(root.path.rstrip("/") + "/")
            if inside and root.reopen and (best is None or len(root.path) > len(best.path)):
                best = root
        return best.reopen if best else None

    def _retry_static(self, now: float) -> None:
        """Static pins that were refused are tried again with backoff: a writer that raced the
        copy or held a file at start usually lets go (a reload tries at once)."""
        for path, (at, _backoff) in list(self.static_retry.items()):
            pc = self.static_paths.get(path)
            if pc is None:
                del self.static_retry[path]
            elif now >= at and path not in self.pinmgr.pins and path not in self.pending:
                self._submit_static(path, pc)

    def _retry_stranded(self, now: float) -> None:
        """Write-backs found unfinished at start that could not complete: tried again with
        backoff (a full disk gets room, a directory swapped for a symlink comes back)."""
        for path, st in list(self.pinmgr.stranded.items()):
            if now >= st.retry_at and path not in self.pending and path not in self.running:
                self.pending[path] = "stranded"
                fn = functools.partial(self.pinmgr.retry_stranded, path)
                self.worker.submit(Job("stranded", path, fn, "retrying a stranded write-back"))

    # -- jobs --------------------------------------------------------------------------------

    def _submit_pin(
        self,
        path: str,
        mode: str,
        origin: str,
        reason: str,
        *,
        sync_interval: float | None = None,
        max_size: int | None = None,
        size: int | None = None,
        keep: tuple[str, ...] = (),
        reopen: str | None = None,
        reply: JobReply | None = None,
    ) -> None:
        self.pending[path] = "pin"
        job = Job(
            "pin",
            path,
            lambda: self.pinmgr.pin(
                path,
                mode=mode,
                origin=origin,
                sync_interval=sync_interval,
                max_size=max_size,
                size=size,
                keep=keep,
                reopen=reopen,
            ),
            reason=reason,
            mode=mode,
            reply=reply,
        )
        self.worker.submit(job)

    def _submit_unpin(self, pin: pins.Pin, reason: str, reply: JobReply | None = None) -> bool:
        """Queue the unpin of `pin`; False (and `reply` told so) when it is busy."""
        # A pin whose job result the loop has not collected yet is not done either: collecting
        # it starts watching its RAM side, which would make this unpin's unmount busy.
        if not self._take(pin, "unpin", reply, busy=self.pending.get(pin.path) == "pin"):
            return False
        self.pending[pin.path] = "unpin"
        self._unwatch_pin(pin)  # the monitor's fds must not keep the tmpfs busy
        fn = functools.partial(self.pinmgr.unpin, pin)
        self.worker.submit(Job("unpin", pin.path, fn, reason, pin.mode, reply))
        return True

    def _submit_checkpoint(self, pin: pins.Pin, reason: str, reply: JobReply | None = None) -> None:
        if not self._take(pin, "checkpoint", reply):
            return
        fn = functools.partial(self.pinmgr.checkpoint, pin)
        self.worker.submit(Job("checkpoint", pin.path, fn, reason, pin.mode, reply))

    def _take(self, pin: pins.Pin, kind: str, reply: JobReply | None, busy: bool = False) -> bool:
        """Mark `pin` busy with a job of the worker; False, and `reply` told so, when it (or
        `busy`) says it is busy already."""
        if busy or pin.busy:
            if reply:
                reply(None, RuntimeError(f"{pin.path} is busy with another operation"))
            return False
        with self.pinmgr.lock:
            pin.busy = True
        self.running[pin.path] = kind
        return True

    def _collect(self, block: bool = False) -> None:
        if block:
            sel = selectors.DefaultSelector()
            sel.register(self.worker.rfd, selectors.EVENT_READ)
            sel.select(timeout=1.0)
            sel.close()
        done = self.worker.collect()
        for job, result, exc in done:
            if job.kind in ("unpin", "checkpoint"):
                self.running.pop(job.path, None)
            self._finish(job, result, exc)
            if job.reply:
                job.reply(result, exc)
        if done and self.sync_waits:
            self._serve_sync_waits(time.monotonic())
        if done and self.unpin_waits:
            self._serve_unpin_waits()

    def _finish(self, job: Job, result: Any, exc: BaseException | None) -> None:
        if job.kind == "measure":
            self._measured(job.path, result if exc is None else None)
            return
        if job.kind == "stranded":
            self.pending.pop(job.path, None)
            if exc is None:
                log.info("%s", result)
                self.static_retry.pop(job.path, None)  # its static pin may be made now
            else:
                st = self.pinmgr.stranded.get(job.path)
                log.error(
                    "%s: write-back still NOT COMPLETED (%s in %s; attempt %d, next in %s): %s",
                    job.path,
                    engine.format_bytes(st.bytes) if st else "?",
                    st.where if st else "?",
                    st.attempts if st else 0,
                    engine.format_duration(st.backoff) if st else "?",
                    exc,
                )
            return
        now = time.monotonic()
        self.observer.finished(job.kind, job.path, job.mode, job.reason, result, exc)
        if job.kind == "pin":
            self.pending.pop(job.path, None)
            if exc is None:
                pin = result
                self._watch_pin(pin)
                self.last_refusal.pop(job.path, None)
                self.static_retry.pop(job.path, None)
                log.info("pinned %s: %s (%s)", job.path, job.reason, pin.mode)
            elif job.path in self.static_paths:
                # asked for by the configuration: say so loudly, once per reason, and try again
                reason = str(exc)
                backoff = RETRY.next(self.static_retry.get(job.path, (0.0, 0.0))[1])
                self.static_retry[job.path] = (now + backoff, backoff)
                repeated = self.last_refusal.get(job.path) == reason
                self.last_refusal[job.path] = reason
                log.log(
                    logging.DEBUG if repeated else logging.ERROR,
                    "static pin %s not made, the directory stays on disk (trying again in %s): %s",
                    job.path,
                    engine.format_duration(backoff),
                    reason,
                )
            else:
                reason = str(exc)
                self.engine.refused(job.path, now, reason)
                level = logging.INFO if self.last_refusal.get(job.path) != reason else logging.DEBUG
                self.last_refusal[job.path] = reason
                if not isinstance(exc, pins.PinRefused):
                    level = logging.ERROR
                log.log(level, "not pinned: %s", reason)
        elif job.kind == "unpin":
            self.pending.pop(job.path, None)
            pin = self.pinmgr.pins.get(job.path)
            if exc is None:
                rec: pins.SyncRecord = result
                self.stop_attempts.pop(job.path, None)
                log.info(
                    "unpinned %s: %s; wrote %d files, %s in %.1f s",
                    job.path,
                    job.reason,
                    rec.files,
                    engine.format_bytes(rec.bytes),
                    rec.seconds,
                )
                self._rebuild_attributor(self.cfg)
                return
            if pin is None:
                log.error("unpin of %s failed: %s", job.path, exc)
                return
            held = [str(h) for h in exc.holders] if isinstance(exc, pins.UnpinBusy) else None
            with self.pinmgr.lock:  # the worker sets a pin's fields under it (pins.PinManager)
                pin.busy = False
                pin.backoff = RETRY.next(pin.backoff)
                pin.retry_at = now + pin.backoff
                pin.error = str(exc)
                held_before = pin.holders
                if held is not None:
                    pin.holders = held
            self._watch_pin(pin)
            retry = f"retrying in {engine.format_duration(pin.backoff)}"
            if self.stopping:
                attempts = self.stop_attempts.get(job.path, 0) + 1
                self.stop_attempts[job.path] = attempts
                self.stop_retry_at[job.path] = now + STOP_RETRY_DELAY
                retry = (
                    f"retrying in {engine.format_duration(STOP_RETRY_DELAY)}"
                    f" (attempt {attempts} of {STOP_RETRIES} at stop)"
                    if attempts < STOP_RETRIES
                    else f"not retried: the stop tried {attempts} times"
                )
            if held is not None:
                level = logging.WARNING if held != held_before else logging.DEBUG
                log.log(
                    level,
                    "cannot unpin %s yet: %s; staying pinned, %s",
                    job.path,
                    exc,
                    retry,
                )
            else:
                log.error(
                    "write-back of %s failed, staying pinned (nothing lost), %s: %s",
                    job.path,
                    retry,
                    exc,
                )
        elif job.kind == "checkpoint":
            pin = self.pinmgr.pins.get(job.path)
            if pin is not None:
                with self.pinmgr.lock:
                    pin.busy = False
            if exc is not None:
                log.error("checkpoint of %s failed: %s", job.path, exc)
                return
            rec = result
            if rec.ok:
                log.debug(
                    "checkpoint of %s (%s): %d files, %s in %.2f s",
                    job.path,
                    job.reason,
                    rec.files,
                    engine.format_bytes(rec.bytes),
                    rec.seconds,
                )
            else:
                log.error(
                    "checkpoint of %s failed (the last good one stays on disk): %s",
                    job.path,
                    rec.error,
                )

    def _watch_pin(self, pin: pins.Pin) -> None:
        if pin.mode == "volatile" or pin.handover_mount is not None:
            # a volatile pin is never written back, a handed-over one is leaving: the write
            # rate of neither decides anything
            self._rebuild_attributor(self.cfg)
            return
        try:
            # without FAN_MODIFY: a write per event would slow the writes moved to RAM
            self._watch_fs(self.pinmgr.ram_side(pin), modify=False)
        except OSError as exc:
            log.warning("cannot watch the RAM side of %s: %s", pin.path, exc)
        self._rebuild_attributor(self.cfg)

    def _unwatch_pin(self, pin: pins.Pin) -> None:
        with contextlib.suppress(OSError, KeyError):
            self.monitor.remove_filesystem(self.pinmgr.ram_side(pin))

    # -- sleep and session ends (logind.py) --------------------------------------------------

    def _checkpoint_all(self, reason: str, done: Callable[[set[str]], None] | None = None) -> None:
        """Checkpoint every pin that has something to write back; `done` is told when the
        checkpoints submitted here have all finished, with the paths that failed."""
        targets = self._checkpointable()
        waiting = {p.path for p in targets}
        failed: set[str] = set()

        def one(pin: pins.Pin) -> Callable[[Any, BaseException | None], None]:
            def finished(result: Any, exc: BaseException | None) -> None:
                if exc is None and result is not None and result.ok:
                    log.info(
                        "checkpoint of %s (%s): %d files, %s in %.2f s",
                        pin.path,
                        reason,
                        result.files,
                        engine.format_bytes(result.bytes),
                        result.seconds,
                    )
                else:
                    failed.add(pin.path)
                waiting.discard(pin.path)
                if not waiting and done is not None:
                    done(failed)

            return finished

        if not targets and done is not None:
            done(failed)
        for pin in targets:
            self._submit_checkpoint(pin, reason, reply=one(pin))

    def _checkpointable(self) -> list[pins.Pin]:
        """Pins with something to write back and no job running: a volatile pin is never
        written back, a handed-over one is leaving."""
        return [
            p
            for p in self.pinmgr.pins.values()
            if p.mode != "volatile" and p.handover_mount is None and not p.busy
        ]

    def _before_sleep(self) -> None:
        guard = self.sleep_guard
        assert guard is not None
        now = time.monotonic()
        self.sleep_deadline = now + min(SLEEP_DEADLINE, guard.delay_max or SLEEP_DEADLINE)
        self.sleep_wait = {p.path for p in self._checkpointable()}

        def done(failed: set[str]) -> None:
            if not self.sleep_wait and not failed:
                return  # the deadline came first and released the lock
            count = len(self.sleep_wait)
            self.sleep_wait.clear()
            why = (
                f"checkpointed {count} pins"
                if not failed
                else ("checkpoints failed for " + ", ".join(sorted(failed)))
            )
            guard.sleep_ready(why)

        if not self.sleep_wait:
            guard.sleep_ready("nothing to checkpoint")
            return
        self._checkpoint_all("before sleep", done)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        while True:
            now = time.monotonic()
            if self.handover is not None:
                self._handover_step()
            if self.abort:
                break  # (before a SIGTERM is acted on: a handover leaves the pins mounted)
            if self.want_stop and not self.stopping:
                self._begin_stop()
            if self.want_reload and not self.stopping:
                self.want_reload = False
                self.reload()
            if self.abort or (self.stopping and self._stop_step(now)):
                break
            timeout = max(0.0, self.last_tick + TICK - now)
            for key, mask in self.selector.select(timeout):
                key.data(mask)
            now = time.monotonic()
            if now - self.last_tick >= TICK:
                self.last_tick = now
                self._tick(now)
        self.shutdown()
        return self.exit_code

    def _drain_monitor(self, now: float) -> None:
        try:
            batch = self.monitor.drain()
        except MonitorError as exc:
            # blind: no write is seen any more. Leave every pin mounted (nothing is lost; the
            # next start adopts them) and exit with a failure so that systemd restarts us.
            log.critical(
                "the fanotify monitor failed (%s): exiting so that systemd restarts"
                " rampiped, which adopts the pins as they are",
                exc,
            )
            self.exit_code = EXIT_FAILURE
            self.abort = True
            return
        for dirpath, count in batch.counts.items():
            cand = self.attributor.candidate(dirpath)
            if cand is not None:
                self.rates.add(cand, count, now)
                self.observer.absorbed(cand, count)
        if batch.lost:
            self.lost_events += batch.lost
            self.overflow_until = now + self.cfg.adaptive.cool_for
            log.warning(
                "the kernel's fanotify queue overflowed (%d overflow events): some"
                " writes were not seen; pinned directories are treated as hot",
                batch.lost,
            )

    def _tick(self, now: float) -> None:
        self._drain_monitor(now)
        if self.control is not None:
            self.control.expire(now)
        if self.sync_waits:
            self._serve_sync_waits(now)
        if self.unpin_waits:
            self._serve_unpin_waits()
        self.notifier.tick(now)
        self.observer.tick(now)
        if self.sleep_wait and now >= self.sleep_deadline and self.sleep_guard is not None:
            left = ", ".join(sorted(self.sleep_wait))
            self.sleep_wait.clear()
            self.sleep_guard.sleep_ready(f"checkpoints still running after the deadline: {left}")
        if not self.stopping and self.handover is None:
            self._decide(now)
            if not self.dry_run:
                self._retry_stranded(now)
                self._retry_static(now)
            self.rates.prune(now)
        self.notifier.status(self.status_line())

    def _pin_infos(self, now: float) -> dict[str, engine.PinInfo]:
        infos: dict[str, engine.PinInfo] = {}
        for pin in list(self.pinmgr.pins.values()):
            infos[pin.path] = engine.PinInfo(
                path=pin.path,
                static=pin.static,
                state=pin.state,
                ram_bytes=self.pinmgr.ram_bytes(pin),
                pinned_at=pin.pinned_at,
                last_sync=pin.last_sync_mono,
                sync_interval=pin.sync_interval,
                busy=pin.busy or now < pin.retry_at,
            )
        for path, _kind in self.pending.items():
            if path not in infos:
                infos[path] = engine.PinInfo(
                    path=path,
                    static=False,
                    state="pinning",
                    ram_bytes=0,
                    pinned_at=now,
                    last_sync=None,
                    sync_interval=None,
                    busy=True,
                )
        for path, since in self.dry_pins.items():
            infos[path] = engine.PinInfo(
                path=path,
                static=path in self.static_paths,
                state="pinned",
                ram_bytes=0,
                pinned_at=since,
                last_sync=now,
                sync_interval=0,
                busy=False,
            )
        return infos

    def _facts(self, path: str) -> engine.CandidateFacts:
        """What the filesystem says about a candidate. Its size takes a walk of the tree, which
        can take seconds, so the worker measures it: until the first measurement the estimate
        is the most one pin may take, and a candidate that fits even so is not kept waiting."""
        now = time.monotonic()
        cached = self.facts_cache.get(path)
        if cached and now - cached[0] < FACTS_MAX_AGE:
            return cached[1]
        try:
            is_dir = os.path.isdir(path) and not os.path.islink(path)
            exists = os.path.lexists(path)
        except OSError:
            is_dir = exists = False
        facts = engine.CandidateFacts(
            exists=exists,
            is_dir=is_dir,
            is_mountpoint=False,
            contains_mount=False,
            fstype=None,
            ram_estimate=0,
        )
        if is_dir:
            try:
                fstype: str | None = mounts.fs_type(path)
            except OSError:  # removed, or its mount detached, since the test above
                fstype = None
            facts = engine.CandidateFacts(
                exists=True,
                is_dir=True,
                is_mountpoint=mounts.is_mountpoint(path),
                contains_mount=bool(mounts.mounts_below(path)),
                fstype=fstype,
                # the last measurement while a new one is under way, or the most one pin may take
                ram_estimate=(
                    cached[1].ram_estimate if cached and cached[1].is_dir else self._max_estimate()
                ),
            )
            if path not in self.measuring:
                self.measuring.add(path)
                self.worker.submit(Job("measure", path, lambda: mounts.du(path)))
        if len(self.facts_cache) >= 1000:
            self.facts_cache.clear()
        self.facts_cache[path] = (now, facts)
        return facts

    def _max_estimate(self) -> int:
        """The most one pin is expected to take: ram.max / max_pins."""
        return self._ram_limit(self.cfg) // max(1, self.cfg.adaptive.max_pins)

    def _measured(self, path: str, size: int | None) -> None:
        """The worker measured a candidate (`size` None: the walk failed, and the estimate
        stays as it was until the facts are next due)."""
        self.measuring.discard(path)
        cached = self.facts_cache.get(path)
        if cached is not None and size is not None:
            estimate = min(size, self._max_estimate())
            facts = dataclasses.replace(cached[1], ram_estimate=estimate)
            self.facts_cache[path] = (time.monotonic(), facts)

    def _decide(self, now: float) -> None:
        vm = psutil.virtual_memory()
        memory = engine.MemoryInfo(total=vm.total, available=vm.available)
        snapshot = self.rates.snapshot(now)
        for path in self.pinmgr.pins:  # a pin with no events still has a rate: 0
            snapshot.setdefault(path, 0.0)
        actions = self.engine.decide(
            now,
            snapshot,
            self._pin_infos(now),
            memory,
            self._facts,
            # blind (fanotify refused): no event is no evidence of a cool pin
            overflow=now < self.overflow_until or self.fanotify_off is not None,
        )
        for action in actions:
            self._act(action, now)
        # unpins asked for by hand, and of static pins that a reload dropped, retried with
        # backoff (a busy unmount, or a systemd-tmpfiles clean-up of a volatile pin)
        for pin in list(self.pinmgr.pins.values()):
            if pin.busy or now < pin.retry_at or pin.path in self.pending:
                continue
            if pin.unpin_requested:
                self._submit_unpin(pin, "asked by rampipectl")
            elif pin.origin == "static" and pin.path not in self.static_paths:
                self._submit_unpin(pin, "no longer in the configuration")

    def _act(self, action: engine.Action, now: float) -> None:
        if isinstance(action, engine.Pin):
            if action.path in self.static_paths:
                # a static pin that was refused: it is retried as configured (copy mode, its
                # max_size), never made an adaptive overlay pin because it is hot
                return
            if self.dry_run:
                log.info("would pin %s: %s (overlay)", action.path, action.reason)
                self.dry_pins[action.path] = now
                return
            self._submit_pin(
                action.path,
                "overlay",
                "adaptive",
                action.reason,
                reopen=self._reopen_for(action.path),
            )
        elif isinstance(action, (engine.Unpin, engine.Evict)):
            verb = "unpin" if isinstance(action, engine.Unpin) else "evict"
            if self.dry_run:
                log.info("would %s %s: %s", verb, action.path, action.reason)
                self.dry_pins.pop(action.path, None)
                return
            pin = self.pinmgr.pins.get(action.path)
            if pin is not None:
                reason = action.reason if verb == "unpin" else "evicted: " + action.reason
                self._submit_unpin(pin, reason)
        elif isinstance(action, engine.Checkpoint):
            pin = self.pinmgr.pins.get(action.path)
            if pin is not None and not self.dry_run:
                self._submit_checkpoint(pin, action.reason)

    # -- reload ------------------------------------------------------------------------------

    def reload(self) -> str | None:
        """Validate, diff, apply. Returns None when applied, or the reason it was not."""
        path = self.cfg.source or config.DEFAULT_PATH
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}")
        try:
            try:
                new = config.load(path, memory_total=self.total_ram)
            except config.ConfigError as exc:
                for line in str(exc).splitlines():
                    log.error("%s", line)
                log.error("reload refused: %s is invalid; the running configuration stays", path)
                return str(exc)
            unusable = ramarea.check(ramarea.backend_of(new.ram))
            if unusable is not None:
                log.error("reload refused: %s; the running configuration stays", unusable)
                return unusable
            old = self.cfg
            for key in ("runtime_dir", "journal_dir"):
                if getattr(new, key) != getattr(old, key):
                    log.warning(
                        "%s changed from %s to %s: takes effect at the next restart",
                        key,
                        getattr(old, key),
                        getattr(new, key),
                    )
            new = _keep_dirs(new, old)
            self.cfg = new
            self.engine.reconfigure(
                new.adaptive, new.ram, new.sync, new.runtime_dir, new.journal_dir
            )
            self.rates.set_half_life(new.adaptive.half_life, time.monotonic())
            self.pinmgr.ram_limit = self._ram_limit(new)
            self.pinmgr.ram_backend = ramarea.backend_of(new.ram)
            self.observer.reconfigure(new.metrics)
            self._apply_watch_roots(new)
            self._apply_static_pins(new, wait=False)
            log.info("reloaded %s", path)
            return None
        finally:
            self.notifier.send("READY=1", "STATUS=" + self.status_line())

    # -- stop --------------------------------------------------------------------------------

    def _begin_stop(self) -> None:
        self.stopping = True
        log.info("stopping: writing %d pins back", len(self.pinmgr.pins))
        self.notifier.send("STOPPING=1", "STATUS=stopping: writing back to disk")
        self.last_extend = 0.0
        self._drop_sync_waits(
            "rampiped began to stop while this sync waited for the running {kind}:"
            " no checkpoint made; the stop writes every pin back to disk"
        )
        self._drop_unpin_waits("rampiped began to stop: the stop writes every pin back to disk")

    def _stop_step(self, now: float) -> bool:
        """One step of the stop; True when there is nothing left to do. Every pin's final
        write-back starts at once, or as soon as the job running on it ends: a retry that a
        failed checkpoint or unpin scheduled before the stop (pin.retry_at, up to RETRY.max
        away) is not waited for."""
        if now - self.last_extend >= EXTEND_EVERY:
            self.last_extend = now
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={EXTEND_BY_USEC}")
        left = False
        for pin in list(self.pinmgr.pins.values()):
            if pin.busy:
                left = True
                continue
            if self.stop_attempts.get(pin.path, 0) >= STOP_RETRIES:
                continue
            left = True
            if now < self.stop_retry_at.get(pin.path, 0.0):
                continue  # an unpin that failed during the stop: its short retry delay
            first = pin.path not in self.stop_started
            if self._submit_unpin(pin, "stopping") and first:
                self.stop_started.add(pin.path)
                due = pin.retry_at - now
                log.info(
                    "stopping: writing %s back%s",
                    pin.path,
                    f" now (its retry was due in {engine.format_duration(due)})" if due > 0 else "",
                )
        if left or self.worker.pending:
            return False
        for st in list(self.pinmgr.stranded.values()):
            self.exit_code = EXIT_FAILURE
            log.critical(
                "%s: its write-back never completed (%s): %s are still only in %s; the next"
                " start tries again",
                st.path,
                st.error,
                engine.format_bytes(st.bytes),
                st.where,
            )
        for pin in list(self.pinmgr.pins.values()):
            self.exit_code = EXIT_FAILURE
            log.critical(
                "%s stays pinned: could not write it back (%s). Its data is safe in"
                " RAM and visible at its path; the last checkpoint is on disk. Start"
                " rampiped again to adopt it.",
                pin.path,
                pin.error or "busy",
            )
        return True

    def shutdown(self) -> None:
        self._drop_sync_waits("rampiped exited while this sync waited for the running {kind}")
        self._drop_unpin_waits("rampiped exited while this unpin waited for the running {kind}")
        if self.control is not None:
            self.control.close()
        if self.sleep_guard is not None:
            self.sleep_guard.close()
        self.worker.stop()
        self.monitor.stop()
        self.observer.close()
        if self.stopping and not self.dry_run:
            self.pinmgr.release_runtime()
        log.info("stopped")

    # -- status and control ------------------------------------------------------------------

    def status_line(self) -> str:
        if self.dry_run:
            return f"dry run: would have {len(self.dry_pins)} pins"
        n = len(self.pinmgr.pins)
        used = self._ram_used()
        at_risk = self.observer.risk_text(time.monotonic())
        stranded = list(self.pinmgr.stranded.values())
        warn = (
            f"NOT WRITTEN BACK: {engine.format_bytes(sum(s.bytes for s in stranded))} of"
            f" {', '.join(s.path for s in stranded)} (see the log); "
            if stranded
            else ""
        )
        blind = "; adaptive pinning off: fanotify not available" if self.fanotify_off else ""
        compressed = ramarea.status_text(
            [self.pinmgr.ram_usage(p) for p in self.pinmgr.pins.values()]
        )
        return f"{warn}{n} pinned, {engine.format_bytes(used)} in RAM{compressed}{at_risk}{blind}"

    def status(self, now: float) -> dict[str, Any]:
        pins_out: list[dict[str, Any]] = []
        wall = time.time()
        for pin in sorted(self.pinmgr.pins.values(), key=lambda p: p.path):
            last = pin.last_sync
            dirty = self.observer.dirty(pin, now, max_age=1.0)
            usage = self.pinmgr.ram_usage(pin)
            pins_out.append(
                {
                    "path": pin.path,
                    "mode": pin.mode,
                    "state": pin.state,
                    "static": pin.static,
                    "origin": pin.origin,
                    "rate": round(self.rates.rate(pin.path, now), 3),
                    "ram_bytes": usage.ram,
                    **ramarea.status_fields(usage),
                    "dirty_bytes": dirty.bytes,
                    "data_at_risk_s": round(metrics.at_risk(dirty, wall), 1),
                    "pinned_since": _iso(pin.pinned_wall),
                    "last_sync": None
                    if last is None
                    else {
                        "time": _iso(last.time),
                        "ok": last.ok,
                        "seconds": round(last.seconds, 3),
                        "files": last.files,
                        "bytes": last.bytes,
                        "error": last.error,
                    },
                    "holders": pin.holders,
                    "error": pin.error,
                }
            )
        snapshot = self.rates.snapshot(now)
        candidates = []
        for path, rate in self.engine.top(snapshot, 10):
            info = self.engine.explain(path, now)
            candidates.append(
                {
                    "path": path,
                    "rate": round(rate, 3),
                    "pinned": path in self.pinmgr.pins,
                    "blocked": info.get("blocked"),
                }
            )
        used = sum(p["ram_bytes"] for p in pins_out)
        return {
            "version": __version__,
            "protocol": control.PROTOCOL,
            "pid": os.getpid(),
            "dry_run": self.dry_run,
            "config": self.cfg.source,
            "uptime_s": round(now - self.started, 1),
            "stopping": self.stopping,
            "ram": {
                "max_bytes": self._ram_limit(self.cfg),
                "used_bytes": used,
                "stored_bytes": sum(p["stored_bytes"] for p in pins_out),
                "available_bytes": psutil.virtual_memory().available,
            },
            "monitor": {"lost_events": self.lost_events, **self.monitor.stats()},
            # on: pins are made and unpinned by write rate; off: `reason` says why
            "adaptive_pinning": {
                "on": self.adaptive_off() is None,
                "reason": self.adaptive_off(),
                "fanotify": self.fanotify_off is None,
            },
            "pins": pins_out,
            "candidates": candidates,
            # write-backs found unfinished at start that could not complete: what the
            # directory lacks is only in `where` (a journal generation, or a RAM copy)
            "stranded": [
                {
                    "path": s.path,
                    "mode": s.mode,
                    "where": s.where,
                    "bytes": s.bytes,
                    "error": s.error,
                    "since": _iso(s.since),
                    "attempts": s.attempts,
                    "next_retry_s": round(max(0.0, s.retry_at - now), 1),
                }
                for s in sorted(self.pinmgr.stranded.values(), key=lambda s: s.path)
            ],
        }

    def explain(self, path: str, now: float) -> dict[str, Any]:
        """The raw facts behind `path`'s state (rampipectl explain puts them in sentences).
        Times are this host's monotonic clock, like `now`."""
        a = self.cfg.adaptive
        vm = psutil.virtual_memory()
        max_bytes = self._ram_limit(self.cfg)
        pin = self.pinmgr.pins.get(path)
        pin_facts: dict[str, Any] | None = None
        if pin is not None:
            dirty = self.observer.dirty(pin, now, max_age=1.0)
            pin_facts = {
                "mode": pin.mode,
                "origin": pin.origin,
                "state": pin.state,
                "ram_bytes": self.pinmgr.ram_bytes(pin),
                "dirty_bytes": dirty.bytes,
                "data_at_risk_s": round(metrics.at_risk(dirty, time.time()), 1),
                "holders": pin.holders,
                "error": pin.error,
                "retry_at": pin.retry_at if pin.retry_at > now else None,
                "unpin_requested": pin.unpin_requested,
                "sync_interval": pin.sync_interval,
                "last_sync_at": pin.last_sync_mono,
            }
        return {
            "path": path,
            "now": now,
            "rate": self.rates.rate(path, now),
            **self.engine.explain(path, now),
            "candidate": self.attributor.candidate(path),
            "pending": self.pending.get(path),
            "last_refusal": self.last_refusal.get(path),
            "pin": pin_facts,
            # fanotify refused here: why (adaptive pinning is off, whatever `enabled` says)
            "fanotify_off": self.fanotify_off,
            "adaptive": {
                "enabled": a.enabled,
                "watch": [{"path": w.path, "depth": w.depth} for w in a.watch],
                "exclude": list(a.exclude),
                "pin_above": a.pin_above,
                "hot_for": a.hot_for,
                "unpin_below": a.unpin_below,
                "cool_for": a.cool_for,
                "max_pins": a.max_pins,
                "adaptive_pins": sum(1 for p in self.pinmgr.pins.values() if not p.static),
            },
            "sync_interval": self.cfg.sync.interval,
            "budget": {
                "used_bytes": self._ram_used(),
                "max_bytes": max_bytes,
                "high_watermark": self.cfg.ram.high_watermark,
                "available_bytes": vm.available,
                "min_free_bytes": self.cfg.ram.min_free,
                "pressure": self.engine.pressure,
            },
        }

    def _on_command(self, cmd: str, args: dict[str, Any], reply: control.Reply) -> None:
        now = time.monotonic()
        if cmd == "status":
            reply(control.ok(self.status(now)))
        elif cmd == "explain":
            reply(control.ok(self.explain(_arg_path(args), now)))
        elif cmd == "reload":
            problem = self.reload()
            reply(
                control.ok("reloaded") if problem is None else control.error(problem, EXIT_CONFIG)
            )
        elif self.stopping:
            reply(control.error("rampiped is stopping"))
        elif self.handover is not None:
            reply(control.error("rampiped is handing its pins over to the next rampiped"))
        elif cmd == "handover":
            self._cmd_handover(reply)
        elif cmd == "sync":
            self._cmd_sync(args, reply)
        elif cmd == "pin":
            self._cmd_pin(args, reply)
        elif cmd == "unpin":
            self._cmd_unpin(args, reply)
        else:
            reply(control.error(f"unknown command {cmd!r}", EXIT_USAGE))

    def _cmd_handover(self, reply: control.Reply) -> None:
        """Checkpoint every pin, wait for the worker to finish, answer, and exit leaving every
        pin mounted: the next rampiped adopts them as after a crash, with nothing written back
        or unmounted in between (the package's postinst asks for this before restarting the
        service on an upgrade)."""
        self.handover = reply
        self.handover_checkpointed = None
        log.info(
            "handing over: checkpointing %d pins, then exiting with them mounted for the next"
            " rampiped to adopt",
            len(self.pinmgr.pins),
        )

        def checkpointed(failed: set[str]) -> None:
            self.handover_checkpointed = failed

        self._checkpoint_all("handover", done=checkpointed)

    def _handover_step(self) -> None:
        """Exit once the handover's checkpoints are done and no job is queued or running."""
        if self.handover_checkpointed is None or self.worker.pending or self.running:
            return
        failed = sorted(self.handover_checkpointed)
        left = sorted(self.pinmgr.pins)
        for path in failed:
            log.warning(
                "handover: the checkpoint of %s failed; its data stays in RAM, mounted, for the"
                " next rampiped",
                path,
            )
        log.info("handed over %d pins, left mounted: %s", len(left), ", ".join(left) or "none")
        assert self.handover is not None
        self.handover(control.ok({"pins": left, "checkpoint_failed": failed}))
        self.handover = None
        self.exit_code = EXIT_OK
        self.abort = True

    def _cmd_sync(self, args: dict[str, Any], reply: control.Reply) -> None:
        """Checkpoint one pin or all. A pin busy with another operation (a checkpoint, an
        unpin) is checkpointed when that ends, if it ends within `wait` seconds; the answer
        comes once every checkpoint is done (the loop goes on meanwhile)."""
        wait = args.get("wait", control.SYNC_WAIT)
        number = isinstance(wait, (int, float)) and not isinstance(wait, bool)
        if not number or not 0 <= wait < float("inf"):  # NaN fails the comparison too
            reply(control.error(f"'wait' must be a number of seconds, not {wait!r}", EXIT_USAGE))
            return
        path = args.get("path")
        for st in list(self.pinmgr.stranded.values()):
            if not path or st.path == _arg_path(args):
                with self.pinmgr.lock:
                    st.retry_at = 0.0  # a stranded write-back is tried again at the next tick
        if path:
            path = _arg_path(args)
            if path in self.pinmgr.stranded:
                st = self.pinmgr.stranded[path]
                reply(
                    control.error(
                        f"{path} is not pinned: its earlier write-back has not completed"
                        f" ({engine.format_bytes(st.bytes)} in {st.where}: {st.error});"
                        " trying it again now (see the log)"
                    )
                )
                return
            if path not in self.pinmgr.pins:
                reply(control.error(f"{path} is not pinned"))
                return
            targets = [self.pinmgr.pins[path]]
        else:
            targets = list(self.pinmgr.pins.values())
        if not targets:
            reply(control.ok({"synced": [], "failed": []}))
            return
        results: dict[str, str | None] = {}

        def one(p: pins.Pin) -> Callable[[Any, BaseException | None], None]:
            def done(result: Any, exc: BaseException | None) -> None:
                if exc is None and result is not None and not result.ok:
                    results[p.path] = result.error
                else:
                    results[p.path] = str(exc) if exc else None
                if len(results) == len(targets):
                    failed = {k: v for k, v in results.items() if v}
                    body = {
                        "synced": sorted(k for k, v in results.items() if not v),
                        "failed": failed,
                    }
                    reply(
                        control.ok(body)
                        if not failed
                        else control.error(
                            "; ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
                        )
                    )

            return done

        now = time.monotonic()
        for pin in targets:
            if pin.busy:
                kind = self.running.get(pin.path, "operation")
                log.debug(
                    "sync of %s waits for the running %s (at most %s)",
                    pin.path,
                    kind,
                    engine.format_duration(wait),
                )
                self.sync_waits.setdefault(pin.path, []).append(
                    SyncWait(now + wait, float(wait), one(pin))
                )
            else:
                self._submit_checkpoint(pin, "asked by rampipectl", reply=one(pin))

    def _serve_sync_waits(self, now: float) -> None:
        """Syncs waiting for a pin's operation: checkpoint the pins whose operation ended (one
        checkpoint answers every sync that waited for it: all of them asked before it began),
        and answer those that waited past their limit."""
        for path, waits in list(self.sync_waits.items()):
            pin = self.pinmgr.pins.get(path)
            if pin is None:
                # the operation was its unpin, which wrote everything back to disk
                del self.sync_waits[path]
                log.debug("sync of %s: unpinned meanwhile, its data is on disk", path)
                for w in waits:
                    w.reply(None, None)
            elif not pin.busy:
                del self.sync_waits[path]
                fan_out = functools.partial(_tell_all, [w.reply for w in waits])
                self._submit_checkpoint(pin, "asked by rampipectl", reply=fan_out)
            else:
                kind = self.running.get(path, "operation")
                for w in [w for w in waits if now >= w.deadline]:
                    waits.remove(w)
                    w.reply(
                        None,
                        RuntimeError(
                            f"waited {engine.format_duration(w.limit)} for the running {kind}"
                            " to end; no checkpoint made (rampipectl sync --timeout waits longer)"
                        ),
                    )
                if not waits:
                    del self.sync_waits[path]

    def _serve_unpin_waits(self) -> None:
        """Unpins asked for while their pin was busy: submitted once its operation ended."""
        for path, replies in list(self.unpin_waits.items()):
            pin = self.pinmgr.pins.get(path)
            if pin is None:
                del self.unpin_waits[path]
                _tell_all(replies, None, RuntimeError(f"{path} was unpinned meanwhile"))
            elif not pin.busy and self.pending.get(path) != "pin":
                del self.unpin_waits[path]
                self._submit_unpin(
                    pin, "asked by rampipectl", functools.partial(_tell_all, replies)
                )

    def _drop_unpin_waits(self, message: str) -> None:
        """Answer every waiting unpin with `message` ({kind}: the operation it waited for)."""
        waits, self.unpin_waits = self.unpin_waits, {}
        for path, replies in waits.items():
            kind = self.running.get(path, "operation")
            _tell_all(replies, None, RuntimeError(message.format(kind=kind)))

    def _drop_sync_waits(self, message: str) -> None:
        """Answer every waiting sync with `message` ({kind}: the operation it waited for)."""
        waits, self.sync_waits = self.sync_waits, {}
        for path, ws in waits.items():
            kind = self.running.get(path, "operation")
            for w in ws:
                w.reply(None, RuntimeError(message.format(kind=kind)))

    def _cmd_pin(self, args: dict[str, Any], reply: control.Reply) -> None:
        path = _arg_path(args)
        mode = args.get("mode") or "overlay"
        if mode not in ("overlay", "copy"):
            reply(control.error(f"mode must be overlay or copy, not {mode!r}", EXIT_USAGE))
            return
        if path in self.pinmgr.pins or path in self.pending:
            reply(control.error(f"{path} is already pinned"))
            return
        refusal = self.engine.never_pin_reason(path)
        if refusal:
            reply(control.error(f"cannot pin {path}: {refusal}"))
            return

        def done(result: Any, exc: BaseException | None) -> None:
            reply(
                control.ok({"pinned": path, "mode": mode})
                if exc is None
                else control.error(str(exc))
            )

        self._submit_pin(
            path, mode, "manual", "asked by rampipectl", reopen=self._reopen_for(path), reply=done
        )

    def _cmd_unpin(self, args: dict[str, Any], reply: control.Reply) -> None:
        path = _arg_path(args)
        pin = self.pinmgr.pins.get(path)
        if pin is None:
            reply(control.error(f"{path} is not pinned"))
            return

        def done(result: Any, exc: BaseException | None) -> None:
            if exc is None:
                reply(
                    control.ok(
                        {
                            "unpinned": path,
                            "files": result.files,
                            "bytes": result.bytes,
                            "seconds": round(result.seconds, 3),
                        }
                    )
                )
            else:
                with self.pinmgr.lock:
                    pin.unpin_requested = True  # keep trying in the background
                reply(control.error(f"{exc} (rampiped keeps trying)"))

        if self.stopping:
            reply(control.error("rampiped is stopping: it writes every pin back to disk"))
        elif pin.busy or self.pending.get(path) == "pin" or path in self.unpin_waits:
            # a checkpoint (or the pin itself) is running: the unpin follows when it ends
            kind = self.running.get(path, "operation")
            log.debug("unpin of %s waits for the running %s", path, kind)
            self.unpin_waits.setdefault(path, []).append(done)
        else:
            self._submit_unpin(pin, "asked by rampipectl", reply=done)


def _tell_all(replies: list[JobReply], result: Any, exc: BaseException | None) -> None:
    for reply in replies:
        reply(result, exc)


def _arg_path(args: dict[str, Any]) -> str:
    path = args.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("a command's path must be absolute")
    return os.path.normpath(path)


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(wall))


def _keep_dirs(new: config.Config, old: config.Config) -> config.Config:
    return dataclasses.replace(new, runtime_dir=old.runtime_dir, journal_dir=old.journal_dir)


def build_parser() -> argparse.ArgumentParser:
    """The daemon's command line (its manual page is generated from it too)."""
    p = argparse.ArgumentParser(
        prog="rampiped",
        description="Keeps write-hot directories in RAM and writes them back to disk, safely.",
    )
    p.add_argument(
        "--config",
        default=config.DEFAULT_PATH,
        metavar="PATH",
        help="configuration file (default %(default)s)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="watch and log every decision; mount nothing"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        metavar="LEVEL",
        help="the least important messages logged, one of %(choices)s; debug adds"
        " checkpoints and per-decision detail (default %(default)s)",
    )
    p.add_argument("--version", action="version", version=f"rampiped {__version__}")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logsetup.setup(args.log_level)
    if os.path.exists(args.config) or args.config != config.DEFAULT_PATH:
        try:
            cfg = config.load(args.config, memory_total=psutil.virtual_memory().total)
        except config.ConfigError as exc:
            for line in str(exc).splitlines():
                log.error("%s", line)
            log.error("not starting: %s is invalid", args.config)
            return EXIT_CONFIG
    else:
        log.info("%s does not exist: running with the built-in defaults", args.config)
        cfg = config.Config(source=args.config)
    if os.geteuid() != 0:
        log.error("rampiped needs root (fanotify, mounts)")
        return EXIT_FAILURE
    unusable = None if args.dry_run else ramarea.check(ramarea.backend_of(cfg.ram))
    if unusable is not None:
        log.error("not starting: %s", unusable)
        return EXIT_CONFIG
    try:
        daemon = Daemon(cfg, dry_run=args.dry_run)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    try:
        daemon.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        if exc.errno in (errno.EPERM, errno.EACCES):
            log.error("rampiped needs root with CAP_SYS_ADMIN (fanotify, mounts)")
        daemon.shutdown()
        return EXIT_FAILURE
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())
