"""The daemon and its loop. One loop owns the state. It waits on one selector for: the signal
wake-up socket (handlers only record the signal), the monitor's "events ready" fd, the
worker's "job done" fd and the control socket, with a timeout that makes the engine tick
twice a second. Each tick drains the monitor's write events into rates, lets the engine decide
and acts on its decisions (pin, unpin, evict, checkpoint) through the worker."""

from __future__ import annotations

import logging
import os
import selectors
import time

import psutil

from rampiped import __version__, control, engine, logind
from rampiped.daemon.requests import Requests
from rampiped.daemon.stop import Stop
from rampiped.errors import EXIT_FAILURE
from rampiped.monitor import Monitor, MonitorError

log = logging.getLogger("rampiped")

TICK = 0.5  # seconds between engine decisions


class Daemon(Requests, Stop):
    """rampiped: `start`, then `run` until the stop, a handover or a failure ends it. Its
    behaviour comes in layers, one module each (see the package's docstring)."""

    # -- start-up ------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        self._listen_for_signals()
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

    # -- the loop ------------------------------------------------------------------------------

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
        self._sleep_overdue(now)
        if not self.stopping and self.handover is None:
            self._decide(now)
            if not self.dry_run:
                self._retry_stranded(now)
                self._retry_static(now)
            with self.pinmgr.lock:  # the worker changes the table of pins
                pinned = set(self.pinmgr.pins)
            # a pinned or pending directory keeps its rate, however quiet
            self.rates.prune(now, keep={*pinned, *self.pending, *self.dry_pins})
        self.notifier.status(self.status_line())

    def _pin_infos(self, now: float) -> dict[str, engine.PinInfo]:
        infos: dict[str, engine.PinInfo] = {}
        for pin in list(self.pinmgr.pins.values()):
            ram_bytes, fill_bytes = self.pinmgr.budget_bytes(pin)
            infos[pin.path] = engine.PinInfo(
                path=pin.path,
                static=pin.static,
                state=pin.state,
                ram_bytes=ram_bytes,
                fill_bytes=fill_bytes,
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
