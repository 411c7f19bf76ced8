"""What differs between the kinds of pin, behind one interface.

PinManager holds one object of each kind (overlay.OverlayMode, copy.CopyMode,
ramonly.VolatileMode) and asks the pin's for every step that depends on it; the steps they
share (checks, the table of pins, mounting and unmounting, the write-back window, recovery)
are the manager's.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rampiped import copymode, handover, mounts, writeback
from rampiped.pins.dirs import open_dir_nofollow
from rampiped.pins.model import (
    Pin,
    PinRefused,
    PinRequest,
    StillDraining,
    SyncRecord,
    Written,
    holder_list,
    pin_id,
)

if TYPE_CHECKING:
    from rampiped.pins.manager import PinManager

log = logging.getLogger("rampiped")

Undo = list[Callable[[], None]]


class Mode:
    """One kind of pin. `name` is what Pin.mode, the state file and the status say."""

    name = ""
    writes_back = True  # False: nothing of the RAM side ever reaches the disk
    lets_late_writers_in = False  # see PinManager.check_pinnable(late_ok=...)
    takes_reopen = False  # a `reopen` command moves its writers between disk and RAM

    def __init__(self, manager: PinManager) -> None:
        self.m = manager

    # -- where it lives ----------------------------------------------------------------------

    def ram_side(self, pin: Pin) -> str:
        """Where writes to the pin land in RAM (what the monitor watches)."""
        raise NotImplementedError

    def ram_needed(self, path: str) -> tuple[int, str]:
        """What a pin of `path` needs of the RAM budget at once, and what that is."""
        raise NotImplementedError

    def ram_mount(self, pin: Pin) -> str:
        """The mount whose usage is the RAM the pin takes."""
        return self.m.ram(pin.id)

    # -- pinning -------------------------------------------------------------------------------

    def pin(self, path: str, req: PinRequest) -> Pin:
        """Pin `path` (worker thread): a RAM layer and the staging bind, then the mode's own
        cover over the directory (`mount`), then the checks that only a mounted pin allows.
        Raises PinRefused with everything rolled back."""
        m = self.m
        reopen, max_size = req.reopen, req.max_size
        held_at_check = m.check_pinnable(
            path,
            writers_ok=reopen is not None,
            late_ok=self.lets_late_writers_in and reopen is None,
        )
        if max_size is not None:
            try:
                copymode.check_fits(path, max_size)
            except copymode.TooLarge as exc:
                raise PinRefused(str(exc)) from exc
        m.check_budget(path, self)
        pid = pin_id(path)
        if writeback.latest_generation(m.journal(pid)) is not None:
            # a checkpoint that a failed start-up could not apply: a new pin would discard it
            raise PinRefused(
                f"cannot pin {path}: {m.journal(pid)} holds a checkpoint not yet written to"
                " the directory (see the start-up log); restart rampiped to apply it"
            )
        pin = Pin(
            path=path,
            id=pid,
            mode=self.name,
            origin=req.origin,
            state="pinning",
            pinned_at=time.monotonic(),
            pinned_wall=time.time(),
            sync_interval=req.sync_interval,
            reopen=reopen,
        )
        self.starting(pin)
        m.register(pin, {"path": path, "mode": self.name, "id": pid})
        undo: Undo = []
        dir_fd = -1
        written_back = ""  # refused after the mount, and what reached RAM was written back
        try:
            # Everything below reaches the directory through this descriptor, opened without
            # following any symlink: a user who swaps the directory (or a parent) for a symlink
            # cannot make the mounts land anywhere else.
            dir_fd = open_dir_nofollow(path)
            pin.under_mount = mounts.mount_id_of_fd(dir_fd)
            m.mount_layers(pin, undo, dir_fd)
            writeback.pause_point("pin:layers")
            self.mount(pin, undo, dir_fd)
            m.check_in_place(pin)
            if reopen is not None:
                self.reopen_after_pin(pin, undo)
            late = [] if reopen is not None else self.late_holders(pin)
            if late:
                # held from before the check to after the mount: in use, as for the check
                how = (
                    "in use by "
                    if any(h.pid in held_at_check for h in late)
                    else "opened on disk during the pin by "
                )
                written_back = self.refuse_late(
                    pin, late, f"cannot pin {path}: {how}" + holder_list(late), undo
                )
            else:
                self.settled(pin, undo)
                writeback.pause_point("pin:mounted")
        except BaseException as exc:
            m.roll_back(pin, undo, keep=isinstance(exc, StillDraining))
            if isinstance(exc, PinRefused):
                raise
            if isinstance(
                exc, (OSError, mounts.MountError, writeback.SyncError, copymode.CopyError)
            ):
                raise PinRefused(f"cannot pin {path}: {exc}") from exc
            raise
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        if written_back:
            raise PinRefused(written_back + " (what reached RAM meanwhile was written back)")
        m.set_state(pin, "pinned")
        return pin

    def starting(self, pin: Pin) -> None:
        """A pin about to be recorded: what the mode sets before the table shows it."""

    def mount(self, pin: Pin, undo: Undo, dir_fd: int) -> None:
        """Cover the directory behind `dir_fd` with the RAM side (its undo steps in `undo`)."""
        raise NotImplementedError

    def reopen_after_pin(self, pin: Pin, undo: Undo) -> None:
        raise PinRefused(f"cannot pin {pin.path}: reopen is for overlay pins")

    def late_holders(self, pin: Pin) -> list[handover.HeldFile]:
        """Processes that opened files on disk in the moment between the check and the mount:
        their writes would bypass RAM."""
        return self.m.disk_holders(pin)

    def settled(self, pin: Pin, undo: Undo) -> None:
        """The mounted pin once no process holds a file on disk below it (late_holders found
        none): every write begun before the mount has ended. Raise PinRefused (rolled back)
        when one of them must not be lost that way."""

    def refuse_late(self, pin: Pin, late: list[handover.HeldFile], refusal: str, undo: Undo) -> str:
        """A mounted pin with `late` holders on disk: raise PinRefused (rolled back), or
        write back what reached RAM and return the refusal to raise after that."""
        raise PinRefused(refusal)

    def cover(self, pin: Pin, target: str) -> None:
        """Show the RAM side at `target` again (after a failed write-back)."""
        raise NotImplementedError

    # -- writing back ----------------------------------------------------------------------------

    def no_checkpoint(self, pin: Pin, wall: float) -> SyncRecord | None:
        """The record of a checkpoint that is not to be made now, or None."""
        return None

    def write_checkpoint(self, pin: Pin) -> Written:
        """Make the RAM side durable without unmounting: files and bytes written, what the
        disk (or journal) now holds by content, and what whole files would have cost."""
        raise NotImplementedError

    def unpin(self, pin: Pin) -> SyncRecord:
        """Write everything back, unmount and free the RAM (worker thread)."""
        raise NotImplementedError

    def dirty_floor(self, pin: Pin, since: float) -> tuple[float, float | None]:
        """For PinManager.dirty: the time from which changes count, and the change time of
        what the walk of the RAM side does not see (None: nothing)."""
        return since, None

    # -- start-up ----------------------------------------------------------------------------------

    def reconcile(self, pid: str, path: str, rec: dict[str, Any]) -> str:
        """Adopt the pin, finish its half-done step or apply what a power cut left."""
        return self.m.reconcile_one(pid, path, self, rec)

    def finish_interrupted(self, pid: str, path: str, state: Any, disk_mounted: bool) -> str:
        """The cover is gone but the RAM layer is there: an unpin was cut short, or a pin never
        got as far as its mount. Write back what is to be written; say what was done."""
        raise NotImplementedError

    def after_power_cut(self, pid: str, path: str, disk_mounted: bool) -> str:
        """No RAM left (a power cut, a reboot): what the disk is to get from the journal."""
        if disk_mounted:
            mounts.umount(self.m.disk(pid))
        shutil.rmtree(self.m.base(pid), ignore_errors=True)
        self.m.drop_journal(pid, path)
        return f"{path}: RAM copy lost (power cut or reboot); the disk holds the last checkpoint"

    def scrub_mounted(self, pid: str) -> list[str]:
        """Remove a crash's temporary files while the pin stays mounted; the names removed."""
        return []
