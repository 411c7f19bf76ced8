"""Overlay pins with a `reopen` command: writers that keep their files open are moved between
the disk and RAM by asking them to reopen (handover.py), at the pin and at the unpin."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from rampiped import handover, holders, mounts, ramarea, writeback
from rampiped.pins.model import Pin, PinRefused, StillDraining, SyncRecord, UnpinBusy

if TYPE_CHECKING:
    from rampiped.pins.manager import PinManager
    from rampiped.pins.mode import Undo

log = logging.getLogger("rampiped")


class Handoff:
    def __init__(self, manager: PinManager) -> None:
        self.m = manager

    def reopen_after_pin(self, pin: Pin, undo: Undo) -> None:
        """The overlay is mounted: run the reopen command, then make sure that every process
        holding a file of the directory holds it through the overlay. One that still holds the
        disk file below would write past RAM: roll back (through `undo`, which writes back
        what landed in RAM) and run the command again so that the others return to disk."""
        assert pin.reopen is not None
        top = mounts.mount_at(pin.path)
        assert top is not None
        overlay_id = top.mount_id
        handover.run_reopen(pin.reopen, pin.path, self.m.runner)

        def on_disk() -> list[handover.HeldFile]:
            found = holders.find_holders(pin.path, exclude_pids=self.m.exclude_pids())
            return handover.not_on(found, overlay_id)

        left = handover.wait_until_empty(on_disk)
        if not left:
            return
        message = (
            f"rolled back the pin of {pin.path}: {handover.listing(left)} keeps writing to the"
            f" disk copy after {pin.reopen!r}"
        )
        log.warning("%s", message)
        reopen = pin.reopen
        if handover.fds_on_mount(overlay_id, self.m.exclude_pids()):
            # others did follow the command into RAM: bring them back the way an unpin does
            undo.clear()
            try:
                self.start(pin, overlay_id, time.monotonic(), time.time())
            except UnpinBusy as exc:
                raise StillDraining(f"{message}; {exc}") from exc
            raise PinRefused(message)

        def reopen_again() -> None:
            handover.run_reopen(reopen, pin.path, self.m.runner)

        undo.insert(0, reopen_again)
        raise PinRefused(message)

    def start(self, pin: Pin, overlay_id: int, start: float, wall: float) -> SyncRecord:
        """Unpin an overlay whose files writers keep open (handover.py): apply, detach, ask
        them to reopen, and merge what they wrote in between once they let go."""
        assert pin.reopen is not None
        self.m.set_state(pin, "draining")
        journal, disk = self.m.journal(pin.id), self.m.disk(pin.id)
        try:
            writeback.checkpoint(self.m.upper(pin.id), journal, runner=self.m.runner)
            gen = writeback.latest_generation(journal)
            files = handover.generation_files(gen) if gen else {}
            writeback.apply_journal(journal, disk, runner=self.m.runner)
            applied = handover.after_apply(files, disk)
            handover.write_marker(journal, {"mount_id": overlay_id, "applied": applied})
            self.m.check_in_place(pin)
            handover.detach(pin.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(journal, handover.MARKER))
            self.m.set_state(pin, "pinned")
            raise
        with self.m.lock:
            pin.handover_mount = overlay_id
            pin.unpin_requested = True  # retried until the writers let go
        self.m.save_state()
        log.info(
            "%s: wrote its RAM layer back and detached it; asking its writers to reopen",
            pin.path,
        )
        handover.run_reopen(pin.reopen, pin.path, self.m.runner)
        return self.finish(pin, start, wall)

    def finish(self, pin: Pin, start: float, wall: float) -> SyncRecord:
        assert pin.handover_mount is not None
        mount_id = pin.handover_mount
        left = handover.wait_until_empty(
            lambda: handover.fds_on_mount(mount_id, self.m.exclude_pids())
        )
        if left:
            raise UnpinBusy(
                f"{pin.path} is back on disk, but {handover.listing(left)} still writes to its"
                f" RAM copy after {pin.reopen!r}; what it writes is merged when it lets go",
                [],
            )
        marker = handover.read_marker(self.m.journal(pin.id)) or {}
        applied = marker.get("applied")
        res = handover.merge_window(
            self.m.upper(pin.id), self.m.disk(pin.id), applied if isinstance(applied, dict) else {}
        )
        if res.conflicts:
            log.warning(
                "%s: files rewritten both in RAM and on disk while the writers moved; the RAM"
                " versions are kept next to them: %s",
                pin.path,
                ", ".join(res.conflicts[:10]),
            )
        self.m.release(pin)
        return SyncRecord(wall, True, time.monotonic() - start, res.files, res.bytes)

    def reconcile(self, pid: str, path: str, rec: dict[str, Any]) -> str:
        """A handover was under way: the disk holds the applied journal and maybe what writers
        appended since. Never apply the journal or the layer again over it."""
        marker = handover.read_marker(self.m.journal(pid)) or {}
        mount_id = marker.get("mount_id")
        applied = marker.get("applied")
        ram_mounted = os.path.ismount(self.m.ram(pid))
        if ram_mounted and isinstance(mount_id, int):
            if handover.fds_on_mount(mount_id, self.m.exclude_pids()):
                pin = Pin.recorded(
                    path,
                    pid,
                    "overlay",
                    rec,
                    state="draining",
                    reopen=rec.get("reopen") if isinstance(rec.get("reopen"), str) else None,
                    handover_mount=mount_id,
                    unpin_requested=True,
                )
                with self.m.lock:
                    self.m.pins[path] = pin
                return f"{path}: its writers still hold the detached RAM layer; waiting for them"
            if not os.path.ismount(self.m.disk(pid)):
                self.m.staging_for(pid, path)
            res = handover.merge_window(
                self.m.upper(pid), self.m.disk(pid), applied if isinstance(applied, dict) else {}
            )
            what = f"merged {res.files} files written while its writers moved"
        else:
            what = "the disk already held the checkpoint"
        if os.path.ismount(self.m.disk(pid)):
            mounts.umount(self.m.disk(pid))
        if ram_mounted:
            ramarea.unmount(self.m.ram(pid))
        shutil.rmtree(self.m.base(pid), ignore_errors=True)
        writeback.discard_journal(self.m.journal(pid))
        self.m.drop_journal(pid, path)
        return f"{path}: finished an interrupted hand-over to disk: {what}"
