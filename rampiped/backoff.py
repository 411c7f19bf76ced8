"""How long rampiped waits before it tries again what failed: a refused pin, a failed unpin or
checkpoint, a static pin that could not be made, a stranded write-back. Pure: no clock, no OS.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Wait `first` seconds after a failure, twice as long after each further one, never more
    than `max` seconds."""

    first: float
    max: float

    def next(self, delay: float) -> float:
        """The wait after one more failure, given the wait before it (0 for none yet)."""
        return min(self.max, max(self.first, delay * 2))

    def after(self, failures: int) -> float:
        """The wait after `failures` failures in a row (at least 1)."""
        return min(self.first * 2.0 ** min(failures - 1, 32), self.max)


# 5 s, 10 s, 20 s, ... at most 5 min. What makes an attempt fail (a holder that keeps a file
# open, a full or read-only disk) is rarely gone within seconds, and an attempt costs a scan of
# /proc or an rsync run; five minutes is long enough to leave a stuck directory alone and short
# enough that a fixed one is noticed without a person's help.
RETRY = Backoff(first=5.0, max=300.0)
