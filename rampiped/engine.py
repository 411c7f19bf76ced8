"""Decisions: which directories to pin, unpin, evict and checkpoint.

Pure: `decide` takes the time, the current rates, the pins and the memory figures as arguments
and returns actions; the daemon carries them out (or, with --dry-run, only logs them). The
engine's own state is the timers of its hysteresis and the backoff of refused pins.

Hysteresis: a directory is pinned when its rate stays above `pin_above` for `hot_for`, and
unpinned when it stays below the lower `unpin_below` for the longer `cool_for`, so that a rate
hovering around one threshold does not make it flap. Lost events (`overflow`) count as writes:
a pin is never unpinned on the strength of events the daemon did not see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from rampiped import budget
from rampiped.backoff import RETRY
from rampiped.confschema import AdaptiveConfig, RamConfig, SyncConfig
from rampiped.rates import PathPattern, is_within, normalize
from rampiped.units import format_bytes, format_duration, format_threshold

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "LOCAL_FSTYPES",
    "NEVER_PIN",
    "Action",
    "CandidateFacts",
    "Checkpoint",
    "Engine",
    "Evict",
    "MemoryInfo",
    "Pin",
    "PinInfo",
    "Unpin",
    "format_bytes",
    "format_duration",
]

# Filesystems on a local disk. A pin moves writes off the disk; on tmpfs there is nothing to
# save, an overlay or FUSE filesystem may not accept an overlay on top (or its data lives
# elsewhere), and for network filesystems the writes are not ours to batch.
LOCAL_FSTYPES = frozenset(
    {
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "f2fs",
        "jfs",
        "reiserfs",
        "nilfs2",
        "vfat",
        "exfat",
        "ntfs3",
        "ntfs",
        "bcachefs",
    }
)

# Kernel and early-boot trees: virtual, already in RAM, or needed before rampiped runs.
NEVER_PIN = ("/proc", "/sys", "/dev", "/run", "/boot")

# Adaptive pins in these states take one of the `max_pins` places.
_COUNTED_STATES = frozenset({"pinning", "pinned", "draining"})

# Retry a refused pin after 5 s, doubling per consecutive refusal, at most every 5 minutes
# (backoff.RETRY, as every retry): a holder that keeps a file open (a daemon's log) is rarely
# gone within seconds, and a retry costs a scan of /proc.
BACKOFF_FIRST, BACKOFF_MAX = RETRY.first, RETRY.max


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class _Move:
    """A directory to move into or out of RAM, its rate when that was decided, and why."""

    path: str
    rate: float
    reason: str


class Pin(_Move):
    """Pin `path`: it has been hot for long enough."""


class Unpin(_Move):
    """Write `path` back and unpin it: it has been cool for long enough, or the configuration
    now forbids it."""


class Evict(_Move):
    """Write `path` back and unpin it to free RAM (the coldest adaptive pin)."""


@dataclass(frozen=True)
class Checkpoint:
    path: str
    reason: str


Action: TypeAlias = Pin | Unpin | Evict | Checkpoint

# What `Engine()` and `Engine.reconfigure` take: the adaptive, ram and sync sections of the
# configuration, its runtime_dir and its journal_dir.
Settings: TypeAlias = tuple[AdaptiveConfig, RamConfig, SyncConfig, str, str]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class PinInfo:
    path: str
    static: bool
    state: str  # "pinning" | "pinned" | "draining" | "failed"
    ram_bytes: int
    pinned_at: float
    last_sync: float | None = None
    sync_interval: float | None = None  # None -> sync.interval
    busy: bool = False  # an operation (pin, checkpoint, unpin) is running on it
    # what fills its RAM area, which a write that does not fit finds full (ENOSPC): its files'
    # bytes on a compressed area (ram.backend zram), where ram_bytes counts far less until
    # they near the area's size (ramarea.Usage.counted); None: ram_bytes
    fill_bytes: int | None = None

    @property
    def filling(self) -> int:
        return filling(self.ram_bytes, self.fill_bytes)


def filling(ram_bytes: int, fill_bytes: int | None) -> int:
    """What fills a pin's RAM area (PinInfo.fill_bytes), its RAM where nothing else does."""
    return ram_bytes if fill_bytes is None else fill_bytes


@dataclass(frozen=True)
class MemoryInfo:
    total: int  # physical RAM, bytes
    available: int  # MemAvailable, bytes


@dataclass(frozen=True)
class CandidateFacts:
    exists: bool
    is_dir: bool
    is_mountpoint: bool
    contains_mount: bool
    fstype: str | None
    ram_estimate: int  # bytes the pin is expected to take in RAM


# --------------------------------------------------------------------------- engine


@dataclass
class _Backoff:
    refusals: int
    retry_at: float
    reason: str


class Engine:
    """Pin/unpin/evict/checkpoint decisions. See the module docstring."""

    def __init__(self, *settings: *Settings) -> None:
        """`settings` as for `reconfigure`."""
        self._hot_since: dict[str, float] = {}
        self._cool_since: dict[str, float] = {}
        self._blocked: dict[str, str] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._pins: dict[str, PinInfo] = {}
        self._pressure: str | None = None
        self._growth = budget.Growth()
        self.reconfigure(*settings)

    def reconfigure(
        self,
        adaptive: AdaptiveConfig,
        ram: RamConfig,
        sync: SyncConfig,
        runtime_dir: str,
        journal_dir: str,
    ) -> None:
        """New thresholds take effect at the next `decide`; the hot and cool timers and the
        backoffs carry over (a directory hot for 4 s stays hot for 4 s)."""
        self._adaptive = adaptive
        self._ram = ram
        self._sync = sync
        self._runtime_dir = normalize(runtime_dir)
        self._journal_dir = normalize(journal_dir)
        self._exclude = tuple(PathPattern(e) for e in adaptive.exclude)
        # Refusals were judged against the old configuration.
        self._blocked.clear()

    @property
    def pressure(self) -> str | None:
        """Why RAM is short at the last `decide` (whether or not a pin could be evicted)."""
        return self._pressure

    # ------------------------------------------------------------------ decide

    def decide(
        self,
        now: float,
        rates: Mapping[str, float],
        pins: Mapping[str, PinInfo],
        memory: MemoryInfo,
        facts: Callable[[str], CandidateFacts],
        overflow: bool = False,
    ) -> list[Action]:
        """The actions due at `now`, in the order Evict, Unpin, Checkpoint, Pin.

        `rates`: events/s per candidate directory; `pins`: every pin the daemon holds;
        `facts(path)`: what the filesystem says about a candidate, asked only for candidates
        that pass every other test; `overflow`: the monitor lost events since the last call.
        """
        by_path = {info.path: info for info in pins.values()}
        self._pins = by_path
        self._track_hot(now, rates, by_path)
        self._track_cool(now, rates, by_path, overflow)
        self._track_backoff(rates, by_path)

        used = sum(info.ram_bytes for info in by_path.values())
        filled = sum(max(info.ram_bytes, info.filling) for info in by_path.values())
        figures = budget.Figures(self._ram, used, memory.available, memory.total, filled)
        # How fast the pins' areas fill, not their RAM: a compressed area's RAM grows slowly,
        # then its count jumps to its files' bytes once they near its size (too late for
        # EVICT_LEAD to evict it before a fast writer fills it)
        growth = self._growth.rate(
            now, {p: i.filling for p, i in by_path.items() if i.state == "pinned"}
        )

        acted: set[str] = set()
        evictions = self._evictions(rates, by_path, figures, growth)
        acted.update(a.path for a in evictions)
        unpins = self._unpins(now, rates, by_path, acted)
        acted.update(a.path for a in unpins)
        checkpoints = self._checkpoints(now, by_path, acted)
        admissions = self._admissions(now, rates, by_path, facts, figures)

        actions: list[Action] = []
        actions.extend(evictions)
        actions.extend(unpins)
        actions.extend(checkpoints)
        actions.extend(admissions)
        return actions

    def _track_hot(
        self, now: float, rates: Mapping[str, float], by_path: Mapping[str, PinInfo]
    ) -> None:
        above = self._adaptive.pin_above
        for path in list(self._hot_since):
            if path in by_path or rates.get(path, 0.0) <= above:
                del self._hot_since[path]
                self._blocked.pop(path, None)
        for path, rate in rates.items():
            if rate > above and path not in by_path and path not in self._hot_since:
                self._hot_since[path] = now

    def _track_cool(
        self,
        now: float,
        rates: Mapping[str, float],
        by_path: Mapping[str, PinInfo],
        overflow: bool,
    ) -> None:
        below = self._adaptive.unpin_below
        for path in list(self._cool_since):
            info = by_path.get(path)
            if (
                overflow
                or info is None
                or info.static
                or info.state != "pinned"
                or rates.get(path, 0.0) >= below
            ):
                del self._cool_since[path]
        if overflow:
            # Events were lost: this interval may have been busy. Start counting again.
            return
        for info in by_path.values():
            if (
                not info.static
                and info.state == "pinned"
                and rates.get(info.path, 0.0) < below
                and info.path not in self._cool_since
            ):
                self._cool_since[info.path] = now

    def _track_backoff(self, rates: Mapping[str, float], by_path: Mapping[str, PinInfo]) -> None:
        below = self._adaptive.unpin_below
        for path in list(self._backoff):
            info = by_path.get(path)
            if (info is not None and info.state == "pinned") or rates.get(path, 0.0) < below:
                del self._backoff[path]

    def _evictions(
        self,
        rates: Mapping[str, float],
        by_path: Mapping[str, PinInfo],
        figures: budget.Figures,
        growth: float = 0.0,
    ) -> list[Evict]:
        self._pressure = figures.pressure(growth)
        if self._pressure is None:
            return []
        adaptive = [info for info in by_path.values() if not info.static]
        if any(info.state == "draining" for info in adaptive):
            # One at a time: the RAM of a draining pin is about to be freed; evicting another
            # on the same figures could empty RAM of every pin.
            return []
        choices = [info for info in adaptive if info.state == "pinned" and not info.busy]
        if not choices:
            return []
        coldest = min(choices, key=lambda info: (rates.get(info.path, 0.0), info.path))
        rate = rates.get(coldest.path, 0.0)
        return [Evict(coldest.path, rate, f"{self._pressure}; coldest pin at {rate:.1f} events/s")]

    def _unpins(
        self,
        now: float,
        rates: Mapping[str, float],
        by_path: Mapping[str, PinInfo],
        acted: set[str],
    ) -> list[Unpin]:
        a = self._adaptive
        out = []
        for path in sorted(by_path):
            info = by_path[path]
            if info.static or info.state != "pinned" or info.busy or path in acted:
                continue
            rate = rates.get(path, 0.0)
            # A reload that excludes a pinned directory writes it back now. (A reload that
            # disables adaptive pinning only stops new pins: pins made by hand are not static
            # either, and must not go the moment they are made.)
            reason = self._config_refusal(path)
            if reason is None:
                since = self._cool_since.get(path)
                if since is not None and now - since >= a.cool_for:
                    reason = (
                        f"{rate:.1f} events/s < {format_threshold(a.unpin_below)}/s "
                        f"for {format_duration(a.cool_for)}"
                    )
            if reason is not None:
                out.append(Unpin(path, rate, reason))
        return out

    def _checkpoints(
        self, now: float, by_path: Mapping[str, PinInfo], acted: set[str]
    ) -> list[Checkpoint]:
        out = []
        for path in sorted(by_path):
            info = by_path[path]
            if info.state != "pinned" or info.busy or path in acted:
                continue
            interval = info.sync_interval if info.sync_interval is not None else self._sync.interval
            if interval <= 0:
                continue
            last = info.last_sync if info.last_sync is not None else info.pinned_at
            if now - last >= interval:
                out.append(Checkpoint(path, f"periodic, every {format_duration(interval)}"))
        return out

    def _admissions(
        self,
        now: float,
        rates: Mapping[str, float],
        by_path: Mapping[str, PinInfo],
        facts: Callable[[str], CandidateFacts],
        figures: budget.Figures,
    ) -> list[Pin]:
        a = self._adaptive
        if not a.enabled:
            return []
        eligible = sorted(
            (
                (path, rates.get(path, 0.0))
                for path, since in self._hot_since.items()
                if now - since >= a.hot_for
            ),
            key=lambda item: (-item[1], item[0]),
        )
        if not eligible:
            return []
        count = sum(
            1 for info in by_path.values() if not info.static and info.state in _COUNTED_STATES
        )
        occupied = list(by_path)
        out: list[Pin] = []
        for path, rate in eligible:
            reason = self._config_refusal(path) or self._pin_conflict(path, occupied)
            if reason is None:
                backoff = self._backoff.get(path)
                if backoff is not None and now < backoff.retry_at:
                    reason = self._backoff_text(backoff, now)
            if reason is None and count >= a.max_pins:
                reason = f"max_pins reached: {count} adaptive pins"
            if reason is None:
                f = facts(path)
                reason = self._facts_refusal(f)
                if reason is None:
                    reason = figures.refusal(f.ram_estimate)
                if reason is None:
                    figures = figures.admit(f.ram_estimate)
            if reason is not None:
                self._blocked[path] = reason
                continue
            self._blocked.pop(path, None)
            count += 1
            occupied.append(path)
            out.append(
                Pin(
                    path,
                    rate,
                    f"{rate:.1f} events/s > {format_threshold(a.pin_above)}/s"
                    f" for {format_duration(a.hot_for)}",
                )
            )
        return out

    # ------------------------------------------------------------------ refusals

    def never_pin_reason(self, path: str) -> str | None:
        """Why `path` may never be pinned (system trees, the runtime and journal directories,
        exclusions), or None. Checks configuration only: no pins, no filesystem."""
        return self._config_refusal(normalize(path))

    def _config_refusal(self, path: str) -> str | None:
        """Why the configuration forbids pinning `path` at all, or None."""
        if path == "/":
            return "the root directory is never pinned"
        for root in NEVER_PIN:
            if is_within(path, root):
                return f"{root} and below are never pinned"
        for what, d in (("runtime", self._runtime_dir), ("journal", self._journal_dir)):
            if is_within(path, d):
                return f"inside the {what} directory {d}"
            if is_within(d, path):
                return f"contains the {what} directory {d}"
        for pattern in self._exclude:
            if pattern.match_at_or_above(path) is not None:
                return f"excluded by {pattern.text}"
            if pattern.may_match_below(path):
                return f"contains the excluded {pattern.text}"
        return None

    @staticmethod
    def _pin_conflict(path: str, occupied: Iterable[str]) -> str | None:
        for other in sorted(occupied):
            if other == path:
                continue
            if is_within(path, other):
                return f"inside the pinned {other}"
            if is_within(other, path):
                return f"contains the pinned {other}"
        return None

    @staticmethod
    def _facts_refusal(f: CandidateFacts) -> str | None:
        if not f.exists:
            return "does not exist"
        if not f.is_dir:
            return "not a directory"
        if f.is_mountpoint:
            return "is a mount point"
        if f.contains_mount:
            return "contains a mount point"
        if f.fstype is None:
            return "filesystem type unknown"
        if f.fstype not in LOCAL_FSTYPES:
            return f"not on a local disk filesystem ({f.fstype})"
        return None

    @staticmethod
    def _backoff_text(backoff: _Backoff, now: float) -> str:
        n = backoff.refusals
        return (
            f"{backoff.reason} (refused {n} time{'s' if n != 1 else ''}; "
            f"retry in {format_duration(backoff.retry_at - now)})"
        )

    # ------------------------------------------------------------------ feedback and queries

    def made(self, path: str, now: float, ram_bytes: int, fill_bytes: int | None = None) -> None:
        """The pin of `path` was made at `now`, with these bytes (as PinInfo has them): how
        fast it grows is known from the next `decide` on."""
        self._growth.made(normalize(path), now, filling(ram_bytes, fill_bytes))

    def refused(self, path: str, now: float, reason: str) -> None:
        """An attempted pin of `path` failed at `now` (e.g. a process holds a file open).
        The next attempt waits 5 s, then 10 s, 20 s, ... at most 5 min; the count starts again
        once the directory cools below `unpin_below` or gets pinned."""
        path = normalize(path)
        previous = self._backoff.get(path)
        refusals = 1 if previous is None else previous.refusals + 1
        delay = RETRY.after(refusals)
        self._backoff[path] = _Backoff(refusals, now + delay, reason)
        # Not a pin (being made) any more, and as hot as when it was tried: `explain` says so
        # before the next `decide` (an attempt can take a second: holders are waited out).
        if self._pins.get(path) is not None and self._pins[path].state == "pinning":
            del self._pins[path]
            self._hot_since.setdefault(path, now)

    def explain(self, path: str, now: float) -> dict[str, object]:
        """Why `path` is or is not pinned, from the engine's side (times are the `now` clock)."""
        path = normalize(path)
        a = self._adaptive
        hot = self._hot_since.get(path)
        cool = self._cool_since.get(path)
        backoff = self._backoff.get(path)
        info = self._pins.get(path)
        blocked: str | None = None
        if info is None:
            blocked = (
                ("adaptive pinning is disabled" if not a.enabled else None)
                or self._config_refusal(path)
                or self._pin_conflict(path, self._pins)
            )
            if blocked is None and backoff is not None and now < backoff.retry_at:
                blocked = self._backoff_text(backoff, now)
            if blocked is None:
                # max_pins, the filesystem facts or the RAM budget, as of the last `decide`.
                blocked = self._blocked.get(path)
        return {
            "path": path,
            "pinned": info.state if info is not None else None,
            "static": info.static if info is not None else None,
            "hot_since": hot,
            "eligible_at": hot + a.hot_for if hot is not None else None,
            "cool_since": cool,
            "unpin_at": cool + a.cool_for if cool is not None else None,
            "blocked": blocked,
            "retry_at": backoff.retry_at if backoff is not None else None,
            "refusals": backoff.refusals if backoff is not None else 0,
        }

    def top(self, rates: Mapping[str, float], n: int) -> list[tuple[str, float]]:
        """The `n` hottest candidates, hottest first (ties by path)."""
        return sorted(rates.items(), key=lambda item: (-item[1], item[0]))[: max(n, 0)]
