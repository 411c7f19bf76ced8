"""The stop (SIGTERM): every pin's final write-back starts at once, a busy unpin is retried a
few times on the stop's own short delay, systemd's stop timeout is extended while write-backs
make progress, and whatever could not be written back is named before the exit."""

from __future__ import annotations

import logging

from rampiped import engine
from rampiped.daemon.jobs import Jobs
from rampiped.errors import EXIT_FAILURE

log = logging.getLogger("rampiped")

STOP_RETRIES = 3  # busy unpins retried at stop before a pin is left mounted
# The stop retries an unpin that failed during the stop after this long, not after the pin's
# own backoff: that one doubles up to RETRY.max (5 min), far past the unit's stop timeout
# (90 s). A retry due before the stop began (a failed checkpoint or unpin) is not waited for
# at all. STOP_RETRIES attempts wait (STOP_RETRIES - 1) * STOP_RETRY_DELAY in all, which
# gives holders a moment to let go without spinning on a pin that stays busy.
STOP_RETRY_DELAY = 5.0
EXTEND_EVERY = 5.0  # seconds between EXTEND_TIMEOUT_USEC messages during the final sync
EXTEND_BY_USEC = 30_000_000


class Stop(Jobs):
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

    def _unpin_retry(self, path: str, backoff: float, now: float) -> str:
        if not self.stopping:
            return super()._unpin_retry(path, backoff, now)
        attempts = self.stop_attempts.get(path, 0) + 1
        self.stop_attempts[path] = attempts
        self.stop_retry_at[path] = now + STOP_RETRY_DELAY
        return (
            f"retrying in {engine.format_duration(STOP_RETRY_DELAY)}"
            f" (attempt {attempts} of {STOP_RETRIES} at stop)"
            if attempts < STOP_RETRIES
            else f"not retried: the stop tried {attempts} times"
        )
