"""The worker's jobs as the loop sees them: submitting a pin, an unpin or a checkpoint (a pin
runs one job at a time), taking each result in with its log line, retrying stranded
write-backs, and the `rampipectl sync` and `unpin` requests that wait for a busy pin."""

from __future__ import annotations

import functools
import logging
import selectors
import time
from typing import Any, TypedDict, Unpack

from rampiped import engine, pins
from rampiped.backoff import RETRY
from rampiped.daemon.state import DaemonState
from rampiped.daemon.worker import Job, JobReply

log = logging.getLogger("rampiped")


class PinOptions(TypedDict, total=False):
    """What a pin may be asked for beyond its mode and origin (pins.PinManager.pin)."""

    sync_interval: float | None
    max_size: int | None
    size: int | None
    keep: tuple[str, ...]
    reopen: str | None


class Jobs(DaemonState):
    def _submit_pin(
        self,
        path: str,
        mode: str,
        origin: str,
        reason: str,
        *,
        reply: JobReply | None = None,
        **options: Unpack[PinOptions],
    ) -> None:
        self.pending[path] = "pin"
        fn = functools.partial(self.pinmgr.pin, path, mode=mode, origin=origin, **options)
        self.worker.submit(Job("pin", path, fn, reason=reason, mode=mode, reply=reply))

    def _submit_unpin(self, pin: pins.Pin, reason: str, reply: JobReply | None = None) -> bool:
        """Queue the unpin of `pin`; False (and `reply` told so) when it is busy."""
        # A pin whose job result the loop has not collected yet is not done either: collecting
        # it starts watching its RAM side, which would make this unpin's unmount busy.
        if not self._take(pin, "unpin", reply, busy=self.pending.get(pin.path) == "pin"):
            return False
        self.pending[pin.path] = "unpin"
        with self.pinmgr.lock:
            pin.evicting = reason.startswith("evicted")
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
            self._stranded_done(job, result, exc)
            return
        now = time.monotonic()
        self.observer.finished(job.kind, job.path, job.mode, job.reason, result, exc)
        if job.kind == "pin":
            self._pin_done(job, result, exc, now)
        elif job.kind == "unpin":
            self._unpin_done(job, result, exc, now)
        elif job.kind == "checkpoint":
            self._checkpoint_done(job, result, exc)

    def _stranded_done(self, job: Job, result: Any, exc: BaseException | None) -> None:
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

    def _pin_done(self, job: Job, result: Any, exc: BaseException | None, now: float) -> None:
        self.pending.pop(job.path, None)
        if exc is None:
            pin = result
            self._watch_pin(pin)
            self.engine.made(pin.path, now, *self.pinmgr.budget_bytes(pin))
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

    def _unpin_done(self, job: Job, result: Any, exc: BaseException | None, now: float) -> None:
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
        retry = self._unpin_retry(job.path, pin.backoff, now)
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

    def _checkpoint_done(self, job: Job, result: Any, exc: BaseException | None) -> None:
        pin = self.pinmgr.pins.get(job.path)
        if pin is not None:
            with self.pinmgr.lock:
                pin.busy = False
        if exc is not None:
            log.error("checkpoint of %s failed: %s", job.path, exc)
            return
        rec = result
        if rec.ok:
            log_checkpoint(logging.DEBUG, job.path, job.reason, rec)
        else:
            log.error(
                "checkpoint of %s failed (the last good one stays on disk): %s",
                job.path,
                rec.error,
            )

    def _unpin_retry(self, path: str, backoff: float, now: float) -> str:
        """When the failed unpin of `path` is tried again, for its log line (the stop retries
        on its own terms: stop.py)."""
        return f"retrying in {engine.format_duration(backoff)}"

    def _retry_stranded(self, now: float) -> None:
        """Write-backs found unfinished at start that could not complete: tried again with
        backoff (a full disk gets room, a directory swapped for a symlink comes back)."""
        for path, st in list(self.pinmgr.stranded.items()):
            if now >= st.retry_at and path not in self.pending and path not in self.running:
                self.pending[path] = "stranded"
                fn = functools.partial(self.pinmgr.retry_stranded, path)
                self.worker.submit(Job("stranded", path, fn, "retrying a stranded write-back"))

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


def _tell_all(replies: list[JobReply], result: Any, exc: BaseException | None) -> None:
    for reply in replies:
        reply(result, exc)


def log_checkpoint(level: int, path: str, reason: str, rec: pins.SyncRecord) -> None:
    """The log line of a checkpoint that went well."""
    log.log(
        level,
        "checkpoint of %s (%s): %d files, %s in %.2f s",
        path,
        reason,
        rec.files,
        engine.format_bytes(rec.bytes),
        rec.seconds,
    )
