"""Signals and configuration. Signal handlers only record the signal; the loop acts on it.
Reload (SIGHUP, `rampipectl reload`) validates, diffs and applies: a configuration that fails
validation changes nothing. Watch roots and static pins are applied here at start too; a static
pin that was refused is tried again with backoff."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import selectors
import signal
import socket
import time
from typing import Any

from rampiped import config, ramarea
from rampiped.daemon.jobs import Jobs
from rampiped.daemon.status import Status

log = logging.getLogger("rampiped")


class Reload(Status, Jobs):
    # -- signals -------------------------------------------------------------------------------

    def _listen_for_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        self.sig_r, self.sig_w = socket.socketpair()
        self.sig_r.setblocking(False)
        self.sig_w.setblocking(False)
        signal.set_wakeup_fd(self.sig_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self.sig_r, selectors.EVENT_READ, lambda m: self._drain_signals())

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

    # -- watch roots and static pins -----------------------------------------------------------

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

    def _retry_static(self, now: float) -> None:
        """Static pins that were refused are tried again with backoff: a writer that raced the
        copy or held a file at start usually lets go (a reload tries at once)."""
        for path, (at, _backoff) in list(self.static_retry.items()):
            pc = self.static_paths.get(path)
            if pc is None:
                del self.static_retry[path]
            elif now >= at and path not in self.pinmgr.pins and path not in self.pending:
                self._submit_static(path, pc)

    # -- reload --------------------------------------------------------------------------------

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


def _keep_dirs(new: config.Config, old: config.Config) -> config.Config:
    return dataclasses.replace(new, runtime_dir=old.runtime_dir, journal_dir=old.journal_dir)
