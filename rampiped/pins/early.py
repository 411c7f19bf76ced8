"""The write-back of an overlay pin before its unmount (OverlayMode.write_early): what it
wrote, how to tell what changed since, and what a recovery leaves alone after it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rampiped import durable, tree, writeback
from rampiped.engine import format_bytes
from rampiped.osutil import read_json
from rampiped.pins.model import EARLY_MARK, FINAL_MARK, SOURCE_PREFIX, Pin

if TYPE_CHECKING:
    from rampiped.pins.manager import PinManager

# An unpin writes back what changed during its write-back before the unmount, pass after pass,
# at most this many times (a directory written faster than it is written back would not
# settle): what is left is written after the unmount.
CATCH_UP_PASSES = 3

# beside the generations in the journal: the one written before the unmount, with its renamed
# directories at their origins (below_overlay)
AT_ORIGINS = "at-origins"


@dataclass(frozen=True)
class Early:
    """What an unpin wrote back before its unmount (OverlayMode.write_early)."""

    since: int  # ns, wall clock: what changed in the layer from then on is written after it
    generation: str  # the journal generation written into the directory
    # ns, the disk's own clock: later than every change the early write-back made there, and
    # not later than any a process makes once the path shows the disk (HeldFiles.threshold)
    disk_since: int
    inodes: dict[str, int]  # regular files of the generation applied: rel -> inode
    files: int
    bytes: int
    linked: int = 0  # of `files`, those linked from the journal (written to the disk once)
    # renamed directories written at their origins: their moves are left for after the unmount
    moves_left: bool = False

    @classmethod
    def written(
        cls,
        since: int,
        gen: str,
        applied: writeback.ApplyResult,
        moves_left: bool,
        before: Early | None,
    ) -> Early:
        """After a pass that wrote the generation `gen` (`applied`), taken from `since` on,
        following the passes `before`."""
        files, nbytes, linked = applied.files, applied.bytes, applied.linked
        if before is not None:
            files, nbytes, linked = (
                files + before.files,
                nbytes + before.bytes,
                linked + before.linked,
            )
        return cls(since, gen, 0, file_inodes(gen), files, nbytes, linked, moves_left)

    def unchanged_in(self, gen: str) -> frozenset[str]:
        """The regular files of `gen` that are those written early (linked to them). By name in
        the layer: one in a renamed directory was written at its origin, and the apply's move
        of the origin takes it to that name."""
        return frozenset(
            rel
            for rel, st in tree.walk(gen)
            if stat.S_ISREG(st.st_mode) and self.inodes.get(rel) == st.st_ino
        )

    def unchanged_after_unmount(self, gen: str | None, upper: str) -> frozenset[str] | None:
        """The regular files of the final generation `gen` that the directory holds already:
        those written early that did not change in the layer since (by ctime; nothing is
        mapped, see write_early). Not by inode as in unchanged_in: a file written early is the
        journal's own inode when the apply linked it, and a process that writes it on disk
        after the unmount changes that inode, so the generation taken after the unmount holds
        RAM's copy of it, and writing that would undo what the process wrote. None without a
        generation."""
        if gen is None:
            return None
        still = changed_files(upper, self.since, invert=True)
        return frozenset(
            rel
            for rel, st in tree.walk(gen)
            if stat.S_ISREG(st.st_mode) and rel in self.inodes and rel in still
        )


@contextlib.contextmanager
def below_overlay(journal: str) -> Iterator[Callable[[str], writeback.AtOrigins | None]]:
    """While the block runs: a function giving a generation of `journal` as the disk below
    the overlay holds it (writeback.at_origins: renamed directories at their origins, made
    beside the generations), or None when it cannot be. What it made is removed when it is
    called again and when the block ends (also one a killed daemon left)."""
    path = os.path.join(journal, AT_ORIGINS)

    def drop() -> None:
        if os.path.lexists(path):
            shutil.rmtree(path)

    def view(gen: str) -> writeback.AtOrigins | None:
        drop()
        return writeback.at_origins(gen, path)

    try:
        yield view
    finally:
        drop()


def changed_files(upper: str, since: int, *, invert: bool = False) -> frozenset[str]:
    """The regular files of the layer changed at or after `since` (ns); with `invert`, those
    not changed since."""
    return frozenset(
        rel
        for rel, st in tree.walk(upper, tolerate=(OSError,))
        if stat.S_ISREG(st.st_mode) and (st.st_ctime_ns >= since) != invert
    )


def written_early(m: PinManager, pid: str) -> frozenset[str]:
    """The files of the journal's newest generation that the directory holds already, as
    that generation has them: those the final mark lists, or all of a generation written
    into the directory before the unmount (EARLY_MARK). Nothing when neither says so."""
    journal = m.journal(pid)
    final = read_json(os.path.join(journal, FINAL_MARK))
    if final is not None:
        listed = final.get("unchanged")
        return (
            frozenset(r for r in listed if isinstance(r, str))
            if isinstance(listed, list)
            else frozenset()
        )
    early = read_json(os.path.join(journal, EARLY_MARK))
    gen = writeback.latest_generation(journal)
    if early is None or gen is None or early.get("generation") != os.path.basename(gen):
        return frozenset()
    return frozenset(file_inodes(gen))


def disk_clock(disk: str) -> int:
    """The clock of the disk's filesystem now: the ctime of a file made and removed in the
    scratch directory (which the pin's whiteout hides while the overlay is mounted)."""
    scratch = os.path.join(disk, writeback.SCRATCH_NAME)
    made = not os.path.isdir(scratch)
    if made:
        os.mkdir(scratch, 0o700)
    try:
        probe = os.path.join(scratch, ".clock")
        with open(probe, "w"):
            pass
        try:
            return os.lstat(probe).st_ctime_ns
        finally:
            os.unlink(probe)
    finally:
        if made:
            os.rmdir(scratch)


def disk_clock_after(disk: str, after: int) -> int:
    """disk_clock, once it is later than `after` (the coarse clock ticks every few ms)."""
    while (now := disk_clock(disk)) <= after:
        time.sleep(0.001)
    return now


def file_inodes(gen: str) -> dict[str, int]:
    return {rel: st.st_ino for rel, st in tree.walk(gen) if stat.S_ISREG(st.st_mode)}


def changed_since(upper: str, since: int) -> bool:
    """Whether an entry of the layer (of any kind: a whiteout, a directory whose entries
    changed) changed at or after `since` (ns)."""
    return any(st.st_ctime_ns >= since for _rel, st in tree.walk(upper, tolerate=(OSError,)))


class Room:
    """The RAM area of an evicted pin written back before its unmount (`area`: a path on it),
    whose writers go on writing into it meanwhile. They may take a quarter of the room it had
    when the eviction began; the rest is theirs while the unmount comes first, as the whole of
    it was when an eviction always unmounted first (TMPFS_HEADROOM)."""

    # how long the writers are watched before the write-back begins, and the most of their
    # quarter they may take in that time: writers that would take all of it within two seconds
    # leave no time for a write-back (the unmount comes first at once)
    WATCH = 0.1
    QUIET = WATCH / 2.0

    def __init__(self, area: str) -> None:
        self.area = area
        self.at_start, self.size = self._free()
        self.reason: str | None = None  # why it ran short, once it did (it stays so)

    def _free(self) -> tuple[int, int]:
        st = os.statvfs(self.area)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def busy(self) -> str | None:
        """Why not to begin (writers too fast for the room), watching them for WATCH s."""
        time.sleep(self.WATCH)
        taken = self.at_start - self._free()[0]
        if self.at_start < self.size / 6 or taken > self.at_start / 4 * self.QUIET:
            return (
                f"its writers added {format_bytes(max(0, taken))} in {self.WATCH:g} s to its"
                f" RAM area ({format_bytes(self.at_start)} of {format_bytes(self.size)} free)"
            )
        return None

    def short(self) -> str | None:
        """Why to stop: the writers took a quarter of the room (now or at an earlier call)."""
        if self.reason is None:
            now = self._free()[0]
            if self.at_start - now > self.at_start / 4:
                self.reason = (
                    f"its RAM area has {format_bytes(now)} of {format_bytes(self.size)} free"
                    f" ({format_bytes(self.at_start)} when the eviction began)"
                )
        return self.reason


def disk_below(
    pin: Pin, link: Callable[[str], writeback.LinkRoute | None], journal: str, disk: str
) -> writeback.Below | None:
    """Where a checkpoint of the mounted overlay `pin` finds the disk files below it, to take
    them into the journal rather than copy them again (writeback/fromlower.py): through the
    private copy of the mount the journal shares with the directory (`link`), which must reach
    the journal and the directory below the overlay (`disk`, the staging bind). None when
    the journal is on another mount, and for a pin that a process wrote below (late_bases)
    or that was adopted (a crash may have left such writers unknown)."""
    if pin.late_bases or pin.adopted:
        return None
    return writeback.reached(link(os.path.join(journal, "gen-0")), journal, disk)


def write_passes(
    m: PinManager,
    pin: Pin,
    link: Callable[[str], writeback.LinkRoute | None],
    runner: writeback.Runner,
    stop: Callable[[], str | None],
) -> Early | None:
    """OverlayMode.write_early's work, its commands run by `runner`; `stop` is asked before
    each pass (a reason: no more passes)."""
    upper, journal, disk = m.upper(pin.id), m.journal(pin.id), m.disk(pin.id)
    try:
        hides = stat.S_ISCHR(os.lstat(os.path.join(upper, writeback.SCRATCH_NAME)).st_mode)
    except FileNotFoundError:
        hides = False
    since = m.ram_clock_ns(pin)
    if not hides or stop() is not None or not m.free_soon(pin, SOURCE_PREFIX + pin.id, stop):
        return None
    res = writeback.checkpoint(
        upper,
        journal,
        runner=runner,
        ledger=pin.ledger,
        taken_ns=since,
        below=disk_below(pin, link, journal, disk),
    )
    pin.ledger = res.ledger
    early: Early | None = None
    with below_overlay(journal) as at_origins:
        # the checkpoint just taken, then what was written meanwhile, the same way, until
        # a pass finds nothing new: what is left for after the unmount is then what is
        # written in its last moment
        for n in range(1 + CATCH_UP_PASSES):
            if early is not None:
                if not changed_since(upper, early.since) or stop() is not None:
                    break
                since = m.ram_clock_ns(pin)
                writeback.checkpoint(upper, journal, runner=runner, changed_since=early.since)
                # this generation was taken by ctime: no ledger of it
                pin.ledger = None
            gen = writeback.latest_generation(journal)
            view = None if gen is None else at_origins(gen)
            if gen is None or view is None:
                break  # renamed directories that cannot go to their origins first
            applied = writeback.apply_layer(
                view.path,
                disk,
                runner,
                keep_plan=False,
                unchanged=view.rels(early.unchanged_in(gen)) if early else frozenset(),
                link=link(view.path),
            )
            early = Early.written(since, gen, applied, view.names is not None, early)
            if n == 0:
                writeback.pause_point("unpin:written-early")
    if early is None:
        return None  # nothing written: all of it after the unmount
    # (the copy at the origins is gone: no unlink in the journal from here on)
    early = dataclasses.replace(early, disk_since=disk_clock_after(disk, disk_clock(disk)))
    durable.write_json(
        os.path.join(journal, EARLY_MARK),
        {"generation": os.path.basename(early.generation), "since": early.since},
    )
    return early
