"""The RAM budget of the pins, pure: how fast the pinned pins grow, whether RAM is short (and
an eviction due), and whether a candidate's estimate fits. The engine decides with these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from rampiped.confschema import RamConfig
from rampiped.units import format_bytes, format_threshold

# An eviction takes effect this long after the RAM figures that call for it (up to one tick
# until the next decision, then the checks before the unmount). A pin that grows fast is evicted
# when it would pass the high watermark within this time, not once it has passed it: the
# writes that land meanwhile must fit in the headroom of its tmpfs, or they fail with ENOSPC.
EVICT_LEAD = 1.0


class Growth:
    """Bytes per second by which the pinned pins grew since each was last measured."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}  # pin -> (when, bytes)

    def made(self, path: str, now: float, size: int) -> None:
        """A pin just made holds `size` bytes: its first measurement, so that the next one
        tells how fast it grows (a writer hot enough to be pinned may fill it within a second
        of its pin, and without this it counted from the second tick after the pin on)."""
        self._last[path] = (now, size)

    def rate(self, now: float, sizes: Mapping[str, int]) -> float:
        """`sizes`: the RAM bytes of each pinned pin at `now` (pins being made or drained do
        not count: their RAM moves for reasons of their own). A pin counts from its second
        measurement on (the one `made` gave counts); shrinking counts as no growth."""
        grown = 0.0
        for path, n in sizes.items():
            last = self._last.get(path)
            if last is not None and now > last[0]:
                grown += max(0, n - last[1]) / (now - last[0])
        self._last = {path: (now, n) for path, n in sizes.items()}
        return grown


@dataclass(frozen=True)
class Figures:
    """The RAM figures of one decision: the configured limits, what the pins take and what the
    machine has."""

    ram: RamConfig
    used: int  # bytes all pins take in RAM
    available: int  # MemAvailable, bytes
    total: int  # physical RAM, bytes
    # bytes that fill the pins' RAM areas, where more than `used` (files on a compressed
    # area, engine.PinInfo.fill_bytes): what a fast writer fills up, so what is projected
    filled: int | None = None

    @property
    def max_bytes(self) -> int:
        return self.ram.max.resolve(self.total)

    @property
    def high(self) -> float:
        """The high watermark in bytes: evictions start above it."""
        return self.ram.high_watermark * self.max_bytes

    def _mark(self) -> str:
        percent = format_threshold(self.ram.high_watermark * 100)
        return f"{format_bytes(self.high)} ({percent}% of {format_bytes(self.max_bytes)})"

    def pressure(self, growth: float) -> str | None:
        """Why RAM is short, or None: the pins above the high watermark, or about to pass it at
        `growth` bytes/s within EVICT_LEAD; MemAvailable below `ram.min_free`."""
        why = []
        used, mark = self.used, f"high watermark {self._mark()}"
        filled = max(used, self.filled or 0)
        if used > self.high:
            why.append(f"RAM used by pins {format_bytes(used)} above {mark}")
        elif growth > 0 and filled + growth * EVICT_LEAD > self.high:
            files = "" if filled == used else f" (their files {format_bytes(filled)})"
            why.append(
                f"RAM used by pins {format_bytes(used)}{files}, growing {format_bytes(growth)}/s,"
                f" would pass {mark} within {format_threshold(EVICT_LEAD)}s"
            )
        if self.available < self.ram.min_free:
            why.append(
                f"MemAvailable {format_bytes(self.available)} below min_free "
                f"{format_bytes(self.ram.min_free)}"
            )
        return " and ".join(why) if why else None

    def refusal(self, estimate: int) -> str | None:
        """Why a pin expected to take `estimate` bytes does not fit, or None."""
        used, available = self.used, self.available
        if used + estimate > self.high:
            return (
                f"RAM budget: pins use {format_bytes(used)} + estimate {format_bytes(estimate)}"
                f" > high watermark {self._mark()}"
            )
        if available - estimate < self.ram.min_free:
            return (
                f"RAM budget: MemAvailable {format_bytes(available)} - estimate "
                f"{format_bytes(estimate)} < min_free {format_bytes(self.ram.min_free)}"
            )
        return None

    def admit(self, estimate: int) -> Figures:
        """The figures once a pin expected to take `estimate` bytes is made."""
        return replace(self, used=self.used + estimate, available=self.available - estimate)
