"""What the pin manager keeps of each pin, and the limits it works with."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from rampiped import copymode, handover, holders, writeback
from rampiped import ledger as ledger_mod
from rampiped.backoff import RETRY

STATE_VERSION = 1
# Each pin's tmpfs may grow to ram.max times this. The budget itself is the engine's: above
# the high watermark it evicts the coldest adaptive pin (checked every tick). The extra half
# is room for the writes that arrive between crossing the watermark and the unmount of the
# evicted pin, so that a writer sees no ENOSPC meanwhile (RAM is still bounded by min_free).
TMPFS_HEADROOM = 1.5
# An unpin that finds the directory in use tries again for this long before it reports the
# holders: writers that open, write and close hold a file only for moments.
BUSY_GRACE = 2.0
# In a journal: the last generation is an unpin's final one (the RAM layer is no longer needed).
FINAL_MARK = "final.json"
# In a journal: an unpin wrote its generation `generation` into the directory before the
# unmount; what changed in RAM since `since` (ns) is all that is left to write. A recovery
# then leaves the files written that way alone (a process may have written them since).
EARLY_MARK = "early.json"
# copy mode: the disk as it was before the unmount of an unpin (copymode.Window), so that a
# write-back after it, and its recovery after a crash, leave alone what processes write there
COPY_WINDOW = "copy-window.json"
BUSY_POLL = 0.05
# A pin that finds a file of the directory open looks again this often, for this long, before
# it is refused (and retried with backoff): most writers hold a file only while they write.
HOLD_WAIT, HOLD_POLL = 1.0, 0.005
# An unmount that finds a file open is tried again at once, this often, for this long, before
# the holders are looked for: most holds of busy writers end within a millisecond.
UMOUNT_SPIN, UMOUNT_SPIN_POLL = 0.2, 0.002
# After a write-back, processes that opened a replaced disk file during it and still hold it
# get this long to let go (their last bytes are carried over) before a warning names them.
WINDOW_GRACE = 2.0
# Failed checkpoints and stranded write-backs are retried with backoff.RETRY: first after this.
RETRY_MIN = RETRY.first
SOURCE_PREFIX = "rampiped-"  # every mount rampiped makes carries "rampiped-<id>" as its source


def held_files(path: str, late: list[handover.HeldFile]) -> tuple[list[str], bool]:
    """The files below `path` that `late` hold open, relative to it, and whether that is all
    they hold (not a working directory, a mapping or a file elsewhere)."""
    prefix = path.rstrip("/") + "/"
    rels, only_files = [], True
    for held in late:
        kind, _, rest = held.what.partition(" ")
        target = rest.partition(" ")[2]
        if kind == "fd" and target.startswith(prefix):
            rels.append(target[len(prefix) :])
        else:
            only_files = False
    return rels, only_files


class PinRefused(Exception):
    """The directory cannot be pinned now; nothing was changed."""


class StillDraining(PinRefused):
    """A rolled-back pin whose writers have not yet let go of its RAM layer: it stays in the
    table (draining) until they do."""


class UnpinBusy(Exception):
    """The pin is in use and stays pinned; `holders` says by whom."""

    def __init__(self, message: str, found: list[holders.Holder]) -> None:
        super().__init__(message)
        self.holders = found


def pin_id(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:12]


@dataclass
class SyncRecord:
    time: float  # wall clock, for people
    ok: bool
    seconds: float
    files: int = 0
    bytes: int = 0  # written: files copied whole, tails appended (renames and links: none)
    error: str | None = None
    whole_bytes: int = 0  # what writing every changed file whole would have written


class Written(NamedTuple):
    """What a checkpoint wrote (Mode.write_checkpoint)."""

    files: int
    bytes: int  # written: files copied whole, tails appended
    ledger: ledger_mod.Ledger | None  # what the disk (or journal) now holds, by content
    whole_bytes: int  # what writing each changed file whole would have written


@dataclass(frozen=True)
class Dirty:
    """The changes on a pin's RAM side that are not on disk yet."""

    bytes: int  # size of the changed regular files
    entries: int  # changed entries of any kind
    oldest: float | None  # wall-clock change time of the oldest one; None when nothing changed
    complete: bool = True  # False: the walk stopped at its limit (the figures are a floor)


@dataclass(frozen=True)
class PinRequest:
    """How a pin is to be made (PinManager.pin's arguments, for the mode that makes it)."""

    origin: str  # adaptive | static | manual
    sync_interval: float | None = None
    max_size: int | None = None  # refuse a directory larger than this
    size: int | None = None  # volatile: the tmpfs size
    keep: tuple[str, ...] = ()  # volatile: subdirectories bound from the disk
    reopen: str | None = None


@dataclass
class Pin:
    path: str
    id: str
    mode: str  # overlay | copy | volatile
    origin: str  # adaptive | static | manual
    state: str  # pinning | pinned | draining
    pinned_at: float  # monotonic
    pinned_wall: float
    sync_interval: float | None = None
    last_sync: SyncRecord | None = None
    last_sync_mono: float | None = None
    last_ok_wall: float | None = None  # start of the last good checkpoint, or of the copy-in
    busy: bool = False  # an operation runs on it in the worker
    retry_at: float = 0.0  # monotonic: no unpin attempt before
    backoff: float = 0.0
    unpin_requested: bool = False
    error: str | None = None
    holders: list[str] = field(default_factory=list)
    keep: tuple[str, ...] = ()  # volatile: subdirectories bound from the disk
    size: int | None = None  # volatile: the tmpfs size
    reopen: str | None = None  # the command that makes writers reopen their files
    # overlay with reopen: the overlay was detached from the path with writers still on it
    # (handover.py); the unpin finishes when they let go. The mount id tells their files.
    handover_mount: int | None = None
    # copy mode: unmounted by an unpin whose write-back failed, RAM not shown again (see
    # PinManager._import_window): the retry writes back from here
    window: copymode.Window | None = None
    # the mount the directory was on before the pin (None: not known, for an adopted pin)
    under_mount: int | None = None
    # overlay pin refused after its mount but kept (a process held a file in RAM): the disk
    # files that processes opened below it in that moment, as they were then. Their writes
    # from then on go to the disk file, below RAM's copy: the unpin carries them like those of
    # its own window (writeback.HeldFiles) instead of replacing them with RAM's version.
    late_bases: dict[str, writeback.Stamp] = field(default_factory=dict)
    # what the disk (copy) or the journal's last generation (overlay) holds of each file, by
    # content (ledger.py); None: not known (adopted, or a write-back failed), and the next
    # write-back compares content instead
    ledger: ledger_mod.Ledger | None = field(default=None, repr=False)
    # what its checkpoints wrote to disk since it was made (or adopted), and what writing each
    # changed file whole would have written: the bytes the appends and renames spared
    written_bytes: int = 0
    whole_file_bytes: int = 0
    # adopted at start after a crash: an overlay's lower may hold what that crash left of a
    # write-back's temporary files, removed once the unpin frees the directory (never while
    # the overlay is mounted: its lower must not change under it)
    adopted: bool = False
    # evicted (RAM is short): its unpin unmounts as soon as it can, and writes back after
    evicting: bool = False

    @property
    def static(self) -> bool:
        return self.origin != "adaptive"

    @classmethod
    def recorded(
        cls, path: str, pid: str, mode: str, rec: dict[str, Any], *, state: str, **fields: Any
    ) -> Pin:
        """The pin a record of the state file describes, found again at start."""
        return cls(
            path=path,
            id=pid,
            mode=mode,
            origin=str(rec.get("origin", fields.pop("origin", "adaptive"))),
            state=state,
            pinned_at=time.monotonic(),
            pinned_wall=float(rec.get("pinned_wall") or time.time()),
            **fields,
        )


@dataclass
class Stranded:
    """A write-back found unfinished at start that could not complete (a full disk, an I/O
    error): what it holds is on disk only in the journal, or in RAM only. It is kept, retried,
    and reported (status, STATUS line, metrics) until it completes; its directory is not
    pinned again meanwhile (a new pin would take over the same journal)."""

    id: str
    path: str
    mode: str
    where: str  # the journal generation or RAM copy that holds what the directory lacks
    bytes: int
    error: str
    since: float  # wall clock
    record: dict[str, Any] = field(repr=False)
    attempts: int = 1
    retry_at: float = 0.0  # monotonic
    backoff: float = 0.0


def holder_list(found: Sequence[object]) -> str:
    shown = "; ".join(str(h) for h in found[:5])
    return shown + (f" and {len(found) - 5} more" if len(found) > 5 else "")
