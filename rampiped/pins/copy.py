"""Copy pins (static pins such as /var/lib/pve-cluster): a RAM copy bind-mounted over the
directory, checkpointed into the staging bind of the original (copymode.py), and unpinned in
steps (see `unpin`)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rampiped import copymode, mounts, writeback
from rampiped import ledger as ledger_mod
from rampiped.engine import format_bytes
from rampiped.pins.mode import Mode, Undo
from rampiped.pins.model import (
    COPY_WINDOW,
    SOURCE_PREFIX,
    Pin,
    PinRefused,
    StillDraining,
    SyncRecord,
    Written,
)

if TYPE_CHECKING:
    from rampiped import handover
    from rampiped.pins.manager import PinManager

log = logging.getLogger("rampiped")


def _only_reading(held: list[handover.HeldFile]) -> bool:
    """Every holding is a descriptor open for reading only (not a mapping, a working or a
    root directory)."""
    return all(h.what.startswith("fd ") and not h.writable for h in held)


@dataclass
class _Synced:
    """What an unpin wrote while the copy still covered the path."""

    files: int
    bytes: int
    clock: float  # RAM's clock when it began: what changed after it is written after the unmount
    verified: copymode.Snapshot | None  # RAM as the disk was verified to hold it, if it was


class CopyMode(Mode):
    name = "copy"

    def __init__(self, manager: PinManager) -> None:
        super().__init__(manager)
        # pin id -> the disk as its copy-in read it, RAM's clock then and what the disk held
        # by content, until the pin has settled (`settled`)
        self._copied: dict[str, tuple[copymode.Snapshot, float, ledger_mod.Ledger]] = {}

    def ram_side(self, pin: Pin) -> str:
        return self.m.data(pin.id)

    def ram_needed(self, path: str) -> tuple[int, str]:
        return copymode.dir_size(path), "its content"

    # -- pinning ---------------------------------------------------------------------------------

    def starting(self, pin: Pin) -> None:
        pin.last_ok_wall = pin.pinned_wall  # until the copy-in ends (mount)

    def mount(self, pin: Pin, undo: Undo, dir_fd: int) -> None:
        ram, disk = self.m.ram(pin.id), self.m.disk(pin.id)
        copied = copymode.copy_in(disk, ram, pin_id=pin.id, runner=self.m.runner, path=pin.path)
        # nothing but rampiped sees the copy before the bind: the disk holds what it holds
        pin.ledger = ledger_mod.Ledger.of(ledger_mod.scan(self.m.data(pin.id)))
        # RAM and disk are equal from here: the copy's own change times must not make the
        # first checkpoint write every file again
        pin.last_ok_wall = self.m.ram_clock(pin)
        mounts.bind(self.m.data(pin.id), f"/proc/self/fd/{dir_fd}", private=False)
        undo.append(lambda: self.m.unmount_placed(pin))
        writeback.pause_point("pin:bound")
        self._copied[pin.id] = (copied.snapshot, pin.last_ok_wall, pin.ledger)
        undo.append(lambda: self._forget(pin.id))
        self._raced(pin, undo)

    def late_holders(self, pin: Pin) -> list[handover.HeldFile]:
        """As for any pin, but processes that opened files on disk for reading only, in the
        moment between the check and the bind, are waited out (up to HOLD_WAIT): they read
        what the copy holds and cannot write through those files, and once they let go
        `settled` looks for writes on disk again. A reader that keeps its file longer is
        refused, as before (it would go on reading the disk, not RAM's copy); so is any
        other holder at once."""
        late = self.m.disk_holders(pin)
        if not late or not _only_reading(late):
            return late
        return self.m.disk_holders_waited(pin, "pin:late-readers", late, _only_reading)

    def settled(self, pin: Pin, undo: Undo) -> None:
        # looked at again now that no process holds a file on disk: a logger that opened its
        # file just before the bind may write into it just after, and the look right after the
        # bind could come before that write (a logger's line was lost so in a test run)
        self._raced(pin, undo)
        self._copied.pop(pin.id, None)

    def _forget(self, pin_id: str) -> None:
        self._copied.pop(pin_id, None)

    def _raced(self, pin: Pin, undo: Undo) -> None:
        # a write that reached the disk between the end of the copy and the bind would be
        # overwritten by the first checkpoint: roll back and let the pin be tried again
        snapshot, clock, ledger = self._copied[pin.id]
        disk = self.m.disk(pin.id)
        raced = copymode.changed_since(disk, snapshot)
        if raced:
            self._forget(pin.id)  # the roll-back may keep its undo steps (draining)
            refusal = (
                f"cannot pin {pin.path}: written on disk during the pin ("
                + ", ".join(raced[:5])
                + ")"
            )
            window = copymode.Window(
                snapshot,
                clock,
                time.time_ns() - writeback.CLOCK_SLACK_NS,
                forced=frozenset(ledger.changed(ledger_mod.scan(self.m.data(pin.id)))),
            )
            self.write_back_rolled(pin, undo, window, refusal)
            raise PinRefused(refusal)

    def write_back_rolled(
        self, pin: Pin, undo: Undo, window: copymode.Window, refusal: str
    ) -> None:
        """A copy pin rolled back after its bind: processes may have written into RAM in that
        moment. Unmount, then write that back the way an unpin does after its unmount (what
        reached the disk meanwhile stays). When that fails, the RAM copy is kept and the pin
        stays (draining) until a retry writes it back."""
        window.save(os.path.join(self.m.journal(pin.id), COPY_WINDOW))  # for a crash from here
        self.m.unmount_placed(pin)  # raises (and the rollback goes on) when still in use
        try:
            res, held = self.m.write_window(pin.id, pin.path, window)
        except (OSError, writeback.SyncError, copymode.CopyError) as exc:
            undo.clear()  # keep the RAM copy: it holds what is not on disk
            pin.window = window
            pin.unpin_requested = True  # retried with backoff (PinManager._retry_window)
            self.m.set_state(pin, "draining")
            raise StillDraining(
                f"{refusal}; writing back what reached RAM meanwhile failed ({exc}): kept in"
                f" {self.m.ram_side(pin)} and retried"
            ) from exc
        self.m.settle_window(pin, held)
        if res.files or res.deleted:
            log.warning(
                "%s: rolled back; wrote back what reached RAM meanwhile: %d files, %d deleted",
                pin.path,
                res.files,
                res.deleted,
            )

    def cover(self, pin: Pin, target: str) -> None:
        mounts.bind(self.m.data(pin.id), target, private=False)

    # -- checkpoints -----------------------------------------------------------------------------

    def no_checkpoint(self, pin: Pin, wall: float) -> SyncRecord | None:
        if pin.window is None:
            return None
        # RAM is not mounted; the disk is what processes use now: the unpin's retry writes
        # RAM's changes, a checkpoint (with --delete) would remove theirs
        return SyncRecord(wall, False, 0.0, error="the unpin's write-back is pending (see the log)")

    def copy_checkpoint(
        self, pin: Pin, ledger: ledger_mod.Ledger | None
    ) -> copymode.CheckpointResult:
        return copymode.checkpoint(
            self.m.ram(pin.id),
            self.m.disk(pin.id),
            pin_id=pin.id,
            runner=self.m.runner,
            ledger=ledger,
        )

    def write_checkpoint(self, pin: Pin) -> Written:
        res = self.copy_checkpoint(pin, pin.ledger)
        if res.unstable:
            log.warning(
                "checkpoint of %s: files that never held still, written as last seen: %s",
                pin.path,
                ", ".join(res.unstable[:10]),
            )
        return Written(res.files, res.bytes, res.ledger, res.whole_bytes)

    def dirty_floor(self, pin: Pin, since: float) -> tuple[float, float | None]:
        # copy_in writes its sentinel last: everything older came from the disk
        with contextlib.suppress(OSError):
            since = max(
                since, os.lstat(os.path.join(self.m.ram(pin.id), copymode.SENTINEL)).st_ctime
            )
        # a deletion changes the copy's root, which the walk below it does not see
        with contextlib.suppress(OSError):
            root_ctime = os.lstat(self.m.data(pin.id)).st_ctime
            if root_ctime >= since:
                return since, root_ctime
        return since, None

    # -- unpin -------------------------------------------------------------------------------------

    def unpin(self, pin: Pin) -> SyncRecord:
        """Raises UnpinBusy (still pinned, nothing lost) when someone uses the directory, and
        SyncError/OSError when the write-back failed (the copy covers the path again). The
        steps: write everything back while the copy still covers the path (the disk side is
        a private bind, and no one else can write the disk copy meanwhile); record the disk as
        it is and unmount; write what changed in RAM since the first step, leaving alone what
        processes write on disk meanwhile; free the RAM."""
        if pin.window is not None:
            return self.retry_window(pin, pin.window)
        start, wall = time.monotonic(), time.time()
        synced = self.sync_while_mounted(pin)
        window = self.m.unmount_when_free(
            pin, SOURCE_PREFIX + pin.id, before=lambda: self.take_window(pin, synced.clock)
        )
        writeback.pause_point("unpin:unmounted")
        held: writeback.HeldFiles | None = None
        try:
            files, nbytes, held = self.write_after_unmount(pin, synced, window)
        except BaseException:
            if not self.import_window(pin, window):
                raise
            self.m.remount(pin)
            raise
        if held is not None:
            self.m.settle_window(pin, held)
        writeback.pause_point("unpin:applied")
        self.m.release(pin)  # removes the journal directory, COPY_WINDOW with it, last
        return SyncRecord(wall, True, time.monotonic() - start, files, nbytes)

    def sync_while_mounted(self, pin: Pin) -> _Synced:
        """The whole write-back while the copy still covers the path, verified when RAM held
        still during it."""
        clock = self.m.ram_clock(pin)
        before_sync = copymode.snapshot(self.m.data(pin.id))
        verified: copymode.Snapshot | None = None
        try:
            pin.ledger, known = None, pin.ledger  # until the disk is known again
            bulk = copymode.final_sync(
                self.m.ram(pin.id),
                self.m.disk(pin.id),
                pin_id=pin.id,
                runner=self.m.runner,
                ledger=known,
            )
            verified = before_sync
        except copymode.NotVerified as unverified:
            # still being written: a plain checkpoint now, the verified sync after the unmount
            bulk = self.copy_checkpoint(pin, unverified.ledger)
        pin.ledger = bulk.ledger
        writeback.pause_point("unpin:copy-synced")
        return _Synced(bulk.files, bulk.bytes, clock, verified)

    def take_window(self, pin: Pin, clock: float) -> copymode.Window:
        """The disk as it is while no one but us can write it (the copy covers the path); kept
        on disk too, for a write-back that a crash cuts short."""
        window = copymode.Window.take(
            self.m.ram(pin.id),
            self.m.disk(pin.id),
            clock,
            time.time_ns() - writeback.CLOCK_SLACK_NS,
            pin.ledger,
        )
        window.save(os.path.join(self.m.journal(pin.id), COPY_WINDOW))
        return window

    def write_after_unmount(
        self, pin: Pin, synced: _Synced, window: copymode.Window
    ) -> tuple[int, int, writeback.HeldFiles | None]:
        if (
            synced.verified is not None
            and not window.forced
            and copymode.snapshot(self.m.data(pin.id)) == synced.verified
        ):
            # RAM did not change from before the verified sync to the unmount: the disk holds
            # it all, and nothing is written after the unmount, so a file a process writes on
            # disk in this moment (the path shows the disk now) is left alone
            return synced.files, synced.bytes, None
        # RAM changed after the verified sync (a process still wrote at the unpin): write those
        # changes, leaving alone what is written on disk meanwhile
        res, held = self.m.write_window(pin.id, pin.path, window)
        return synced.files + res.files, synced.bytes + res.bytes, held

    def retry_window(self, pin: Pin, window: copymode.Window) -> SyncRecord:
        """Unpin a copy pin left unmounted by a write-back that failed after its unmount."""
        start, wall = time.monotonic(), time.time()
        self.m.set_state(pin, "draining")
        try:
            cres, held = self.m.write_window(pin.id, pin.path, window)
        except BaseException:
            if self.import_window(pin, window):
                pin.window = None
                self.m.remount(pin)
            raise
        self.m.settle_window(pin, held)
        pin.window = None
        self.m.release(pin)
        return SyncRecord(wall, True, time.monotonic() - start, cres.files, cres.bytes)

    def import_window(self, pin: Pin, window: copymode.Window) -> bool:
        """A copy pin's write-back failed after the unmount and the copy is to cover the path
        again: bring into RAM what was written on disk meanwhile, or the copy would hide it and
        the next checkpoint delete it. False (the path then keeps showing the disk, and the
        RAM copy stays where it is) when that failed."""
        try:
            copymode.import_window(self.m.ram(pin.id), self.m.disk(pin.id), window)
        except (OSError, copymode.CopyError) as exc:
            log.critical(
                "%s: the write-back failed, and what was written on disk meanwhile could not be"
                " brought into RAM (%s): the RAM copy is not mounted again, so that it cannot"
                " hide or delete those files; its changes are safe in %s and are written when"
                " the unpin is retried",
                pin.path,
                exc,
                self.m.ram_side(pin),
            )
            pin.window = window
            pin.unpin_requested = True  # retried with backoff (PinManager._retry_window)
            return False
        return True

    # -- start-up ----------------------------------------------------------------------------------

    def after_power_cut(self, pid: str, path: str, disk_mounted: bool) -> str:
        """The RAM copy is gone; an unpin cut short after its unmount may have left the disk
        files it replaced held, with what processes wrote into them meanwhile: that is carried
        over to their names now, as the unpin would have (writeback.HeldFiles)."""
        m = self.m
        try:
            m.ensure_staging(pid, path, disk_mounted)
            try:
                m.finish_window(pid, path)
            finally:
                mounts.umount(m.disk(pid))
        except (OSError, mounts.MountError, writeback.SyncError) as exc:
            log.error(
                "%s: carrying the writes made during an unpin cut short by a power cut"
                " failed (%s); the files they went to are kept (see the next message)",
                path,
                exc,
            )
        return super().after_power_cut(pid, path, False)

    def finish_interrupted(self, pid: str, path: str, state: Any, disk_mounted: bool) -> str:
        m = self.m
        if state != "draining":
            return "the copy never served the directory: discarded"
        m.ensure_staging(pid, path, disk_mounted)
        window = copymode.Window.load(os.path.join(m.journal(pid), COPY_WINDOW))
        if window is not None:
            # the path showed the disk since the unmount: what was written there meanwhile
            # stays (see copymode.WindowWriteBack)
            res, held = m.write_window(pid, path, window)
            try:
                held.merge()
                held.finish()
            finally:
                held.keep()
        else:
            # no ledger after a crash: every file compared by content
            res = copymode.final_sync(m.ram(pid), m.disk(pid), pin_id=pid, runner=m.runner)
        return f"wrote {res.files} files, {format_bytes(res.bytes)}"

    def scrub_mounted(self, pid: str) -> list[str]:
        # an adopted copy's RAM copy too: checkpoints copy it
        return writeback.scrub_leftovers(self.m.disk(pid)) + writeback.scrub_leftovers(
            self.m.data(pid)
        )
