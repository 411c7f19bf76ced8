"""The RAM budget of the pins, pure: how fast the pinned pins grow, whether RAM is short (and
an eviction due), and whether a candidate's estimate fits. The engine decides with these."""

from __future__ import annotations

from collections.abc import Mapping

from rampiped.confschema import RamConfig
from rampiped.units import format_bytes, format_threshold

# An eviction takes effect this long after the RAM figures that call for it (up to one tick
# until the next decision, then the checks before the unmount). A pin that grows fast is evicted
# when it would pass the high watermark within this time, not once it has passed it: the
# writes that land meanwhile must fit in the headroom of its tmpfs, or they fail with ENOSPC.
EVICT_LEAD = 1.0


class Growth:
    """Bytes per second by which the pinned pins grew between two measurements."""

    def __init__(self) -> None:
        self._last: tuple[float, Mapping[str, int]] | None = None  # (when, bytes per pin)

    def rate(self, now: float, sizes: Mapping[str, int]) -> float:
        """`sizes`: the RAM bytes of each pinned pin at `now` (pins being made or drained do
        not count: their RAM moves for reasons of their own). A pin counts from its second
        measurement on; shrinking counts as no growth."""
        last, self._last = self._last, (now, sizes)
        if last is None or now <= last[0]:
            return 0.0
        grown = sum(max(0, n - last[1][p]) for p, n in sizes.items() if p in last[1])
        return grown / (now - last[0])


def pressure(
    ram: RamConfig, used: int, growth: float, high: float, max_bytes: int, available: int
) -> str | None:
    """Why RAM is short, or None: the pins' `used` bytes above the `high` watermark, or about
    to pass it at `growth` bytes/s within EVICT_LEAD; MemAvailable below `ram.min_free`."""
    why = []
    mark = (
        f"high watermark {format_bytes(high)} ({format_threshold(ram.high_watermark * 100)}% of "
        f"{format_bytes(max_bytes)})"
    )
    if used > high:
        why.append(f"RAM used by pins {format_bytes(used)} above {mark}")
    elif used + growth * EVICT_LEAD > high:
        why.append(
            f"RAM used by pins {format_bytes(used)}, growing {format_bytes(growth)}/s, would"
            f" pass {mark} within {format_threshold(EVICT_LEAD)}s"
        )
    if available < ram.min_free:
        why.append(
            f"MemAvailable {format_bytes(available)} below min_free {format_bytes(ram.min_free)}"
        )
    return " and ".join(why) if why else None


def refusal(
    ram: RamConfig, estimate: int, used: int, available: int, high: float, max_bytes: int
) -> str | None:
    """Why a pin expected to take `estimate` bytes does not fit, or None."""
    if used + estimate > high:
        return (
            f"RAM budget: pins use {format_bytes(used)} + estimate {format_bytes(estimate)}"
            f" > high watermark {format_bytes(high)}"
            f" ({format_threshold(ram.high_watermark * 100)}% of {format_bytes(max_bytes)})"
        )
    if available - estimate < ram.min_free:
        return (
            f"RAM budget: MemAvailable {format_bytes(available)} - estimate "
            f"{format_bytes(estimate)} < min_free {format_bytes(ram.min_free)}"
        )
    return None
