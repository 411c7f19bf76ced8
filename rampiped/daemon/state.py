"""What the daemon holds: its collaborators and state, built in one place, and the small
facts it reads for every concern: the RAM budget, the fanotify monitor and what it watches
(with fanotify refused, the daemon runs on without it), and what the filesystem says about a
candidate. The other modules of this package add behaviour on top, one concern each."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import selectors
import subprocess
import time

import psutil

from rampiped import (
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
from rampiped.daemon.notify import Notifier
from rampiped.daemon.worker import Job, JobReply, SyncWait, Worker
from rampiped.errors import EXIT_OK
from rampiped.monitor import DisabledMonitor, Monitor, MonitorError, fanotify_refused

log = logging.getLogger("rampiped")

FACTS_MAX_AGE = 30.0  # seconds a candidate's filesystem facts and size are reused


class DaemonState:
    """The daemon's collaborators and state; the modules of this package add its behaviour."""

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

    # -- helpers -------------------------------------------------------------------------------

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

    # -- fanotify: what is watched -------------------------------------------------------------

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

    def _rebuild_attributor(self, cfg: config.Config) -> None:
        translate = {self.pinmgr.ram_side(p): p.path for p in self.pinmgr.pins.values()}
        watch = cfg.adaptive.watch if cfg.adaptive.enabled else ()
        self.attributor = rates.Attributor(
            watch, cfg.adaptive.exclude, tuple(self.static_paths), translate
        )

    # -- pins and watch roots ------------------------------------------------------------------

    def _reopen_for(self, path: str) -> str | None:
        """The reopen command of the watch root that `path` lies in (the innermost one)."""
        best: config.WatchRoot | None = None
        for root in self.cfg.adaptive.watch:
            inside = path == root.path or path.startswith(root.path.rstrip("/") + "/")
            if inside and root.reopen and (best is None or len(root.path) > len(best.path)):
                best = root
        return best.reopen if best else None

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

    # -- a candidate's filesystem facts --------------------------------------------------------

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
