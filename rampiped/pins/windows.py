"""The write-back window: what processes write into disk files while a write-back replaces
them (writeback.HeldFiles, copymode.WindowWriteBack) is carried over, not lost."""

from __future__ import annotations

import contextlib
import logging
import os
import time

from rampiped import copymode, writeback
from rampiped.pins.model import BUSY_POLL, WINDOW_GRACE, Pin
from rampiped.pins.mounting import Mounting

log = logging.getLogger("rampiped")


class Windows(Mounting):
    def write_window(
        self, pid: str, path: str, window: copymode.Window
    ) -> tuple[copymode.CheckpointResult, writeback.HeldFiles]:
        """A copy pin's write-back after its unmount (copymode.WindowWriteBack); the caller
        settles the held files. When it fails, they are first kept as conflict files (the
        copy may cover the path again and hide their names)."""
        plan = copymode.WindowWriteBack.prepare(
            self.ram(pid), self.disk(pid), window, pin_id=pid, hold=self.hold_place(pid, path)
        )
        try:
            return plan.write(self.runner), plan.held
        except BaseException:
            with contextlib.suppress(OSError, writeback.SyncError):
                plan.held.merge(conflicts_only=True)
                plan.held.finish()
            plan.held.keep()
            raise

    def settle_window(self, pin: Pin, held: writeback.HeldFiles) -> None:
        """Carry into the written-back files what processes wrote into the replaced disk files
        during the write-back; wait up to WINDOW_GRACE for those that still hold one."""
        deadline = time.monotonic() + WINDOW_GRACE
        try:
            while True:
                holding = processes_holding(held.inodes())
                # after a scan that found nobody, nobody can write them any more (they have
                # no name left but ours): this merge is the last one
                held.merge()
                if not holding:
                    break
                if time.monotonic() >= deadline:
                    log.warning(
                        "%s: still open after the write-back replaced them: %s; what these"
                        " processes write from now on goes to files that no longer have a"
                        " name, as on a plain disk when a file is replaced by a rename",
                        pin.path,
                        ", ".join(holding[:10]),
                    )
                    break
                time.sleep(BUSY_POLL)
            held.finish()
        except (OSError, writeback.SyncError) as exc:
            log.error(
                "%s: carrying the writes made during the write-back failed (%s); the files"
                " they went to stay in %s",
                pin.path,
                exc,
                held.place.shown if held.place.outside else f"{pin.path}/{writeback.HOLD_NAME}",
            )
        finally:
            held.keep()

    def finish_window(self, pid: str, path: str) -> None:
        """At start-up, after the apply: what an unpin cut short left in the hold directory."""
        place = self.hold_place(pid, path)
        try:
            left = writeback.HeldFiles.left(place)
            for held in left:
                held.merge()
                held.finish()
        finally:
            place.close()
        if left:
            log.info("%s: carried the writes made during an interrupted write-back", path)


def processes_holding(inodes: set[tuple[int, int]]) -> list[str]:
    """Processes (other than this one) with one of `inodes` open: "pid N (comm) fd M"."""
    if not inodes:
        return []
    out = []
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # exited, or not ours to look at
        for fd in fds:
            try:
                # a replaced file was unlinked at its name: only such fds are looked at (no
                # stat of every socket, pipe or network file on the machine)
                if not os.readlink(f"/proc/{pid}/fd/{fd}").endswith(" (deleted)"):
                    continue
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inodes:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                out.append(f"pid {pid} ({comm}) fd {fd}")
    return out
