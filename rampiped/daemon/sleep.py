"""Sleep and session ends (logind.py): every pin is checkpointed before the machine sleeps
(logind waits, up to a deadline, for the delay lock) and when the last user session ends."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from rampiped import pins
from rampiped.daemon.jobs import Jobs, log_checkpoint

# At most this long between logind's sleep announcement and releasing the delay lock (logind
# itself goes ahead after its InhibitDelayMaxSec, when that is shorter).
SLEEP_DEADLINE = 20.0


class SleepCheckpoints(Jobs):
    def _checkpoint_all(self, reason: str, done: Callable[[set[str]], None] | None = None) -> None:
        """Checkpoint every pin that has something to write back; `done` is told when the
        checkpoints submitted here have all finished, with the paths that failed."""
        targets = self._checkpointable()
        waiting = {p.path for p in targets}
        failed: set[str] = set()

        def one(pin: pins.Pin) -> Callable[[Any, BaseException | None], None]:
            def finished(result: Any, exc: BaseException | None) -> None:
                if exc is None and result is not None and result.ok:
                    log_checkpoint(logging.INFO, pin.path, reason, result)
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

    def _sleep_overdue(self, now: float) -> None:
        """Past the deadline, the sleep waits no longer for the checkpoints still running."""
        if self.sleep_wait and now >= self.sleep_deadline and self.sleep_guard is not None:
            left = ", ".join(sorted(self.sleep_wait))
            self.sleep_wait.clear()
            self.sleep_guard.sleep_ready(f"checkpoints still running after the deadline: {left}")
