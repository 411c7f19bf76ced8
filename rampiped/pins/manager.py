"""The pin manager: the state machine of each pinned directory (DESIGN.md §4), with one
object per kind of pin (mode.py) for what differs between them."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Callable

from rampiped import copymode, handover, holders, mounts, ramarea, tree, writeback
from rampiped.backoff import RETRY
from rampiped.engine import format_bytes, format_duration
from rampiped.pins.copy import CopyMode
from rampiped.pins.mode import Mode, Undo
from rampiped.pins.model import (
    HOLD_POLL,
    HOLD_WAIT,
    SOURCE_PREFIX,
    Dirty,
    Pin,
    PinRefused,
    PinRequest,
    SyncRecord,
    holder_list,
)
from rampiped.pins.overlay import OverlayMode
from rampiped.pins.ramonly import VolatileMode
from rampiped.pins.recovery import Recovery

log = logging.getLogger("rampiped")


class PinManager(Recovery):
    """Pins, checkpoints, unpins and recovers directories (the worker thread's operations);
    the table of pins is shared with the main loop under `lock`."""

    def make_modes(self) -> list[Mode]:
        return [OverlayMode(self), CopyMode(self), VolatileMode(self)]

    # -- pinning -----------------------------------------------------------------------------

    def pin(
        self,
        path: str,
        *,
        mode: str,
        origin: str,
        sync_interval: float | None = None,
        max_size: int | None = None,
        size: int | None = None,
        keep: tuple[str, ...] = (),
        reopen: str | None = None,
    ) -> Pin:
        """Pin `path` (worker thread). Raises PinRefused with everything rolled back."""
        kind = self.modes.get(mode)
        if kind is None:
            raise PinRefused(f"cannot pin {path}: mode {mode!r} is not supported")
        with self.lock:
            if path in self.pins:
                raise PinRefused(f"{path} is already pinned")
        reopen = reopen if kind.takes_reopen else None
        return kind.pin(path, PinRequest(origin, sync_interval, max_size, size, keep, reopen))

    def roll_back(self, pin: Pin, undo: Undo, *, keep: bool) -> None:
        """Undo a pin that failed: `undo`'s steps in reverse, then its record, unless `keep`
        (it stays in the table, draining, until its RAM can be written back)."""
        for step in reversed(undo):
            try:
                step()
            except Exception as undo_exc:  # keep undoing; report what is left
                log.error("rolling back the pin of %s: %s", pin.path, undo_exc)
        if not keep:
            with self.lock:
                self.pins.pop(pin.path, None)
        self.save_state()
        if not os.path.ismount(self.ram(pin.id)):
            shutil.rmtree(self.base(pin.id), ignore_errors=True)
            if not writeback.latest_generation(self.journal(pin.id)):
                shutil.rmtree(self.journal(pin.id), ignore_errors=True)

    def check_pinnable(
        self, path: str, *, writers_ok: bool = False, late_ok: bool = False
    ) -> list[int]:
        """The preconditions, checked again right before acting (the engine decided earlier).
        With `writers_ok` (a reopen command moves them), holders that only hold files open for
        writing are let through. With `late_ok` (an overlay pin), so are such holders that
        are still there after HOLD_WAIT: a writer that opens, writes and closes back to back
        (fsync on a slow disk) always holds a file, but lets go of each at once after the mount,
        which `pin` waits for. Returns the pids let through that way."""
        stranded = self.stranded.get(path)
        if stranded is not None:
            raise PinRefused(
                f"cannot pin {path}: its earlier write-back has not completed"
                f" ({format_bytes(stranded.bytes)} in {stranded.where}: {stranded.error})"
            )
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise PinRefused(f"cannot pin {path}: {exc.strerror}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise PinRefused(f"cannot pin {path}: not a directory")
        for reserved in (writeback.STASH_NAME, writeback.HOLD_NAME, writeback.SCRATCH_NAME):
            if os.path.lexists(os.path.join(path, reserved)):
                raise PinRefused(
                    f"cannot pin {path}: it holds an entry named {reserved}, which rampiped's"
                    " write-back uses (a leftover of another tool, or a file of yours: rename it)"
                )
        if mounts.is_mountpoint(path):
            raise PinRefused(f"cannot pin {path}: it is a mount point")
        below = mounts.mounts_below(path)
        if below:
            raise PinRefused(f"cannot pin {path}: {below[0].mountpoint} is mounted inside it")
        deadline = time.monotonic() + HOLD_WAIT
        while True:
            # a writer that opens, writes and closes holds its file for moments: waited out
            found = holders.find_holders(path, exclude_pids=self.exclude_pids())
            if not found or (writers_ok and handover.only_writers(found)):
                return []
            if time.monotonic() >= deadline:
                if late_ok and handover.only_writers(found):
                    return sorted({h.pid for h in found})
                raise PinRefused(f"cannot pin {path}: in use by " + holder_list(found))
            time.sleep(HOLD_POLL)

    def check_budget(self, path: str, kind: Mode) -> None:
        """Refuse what cannot fit in the RAM budget left: a copy pin's whole tree, or an overlay
        pin's largest file (any change to a file, even a chmod, copies it up whole; a file
        larger than the room left would fail with ENOSPC at that moment)."""
        with self.lock:
            others = list(self.pins.values())
        room = self.ram_limit - sum(self.ram_bytes(p) for p in others)
        need, what = kind.ram_needed(path)
        if need > room:
            raise PinRefused(
                f"cannot pin {path}: {what} ({format_bytes(need)}) does not fit in the RAM "
                f"budget left ({format_bytes(max(0, room))} of ram.max "
                f"{format_bytes(self.ram_limit)})"
            )

    def disk_holders(self, pin: Pin) -> list[handover.HeldFile]:
        """Processes holding files of the directory on disk after the mount (they opened it in
        the moment between the check and the mount): their writes would bypass RAM. Told by
        the mount each file was reached through (st_dev cannot tell: a file on an overlay
        reports the device of its layer); one that opened a file through the pin's mount in
        that moment writes into RAM and is no reason to refuse."""
        found = holders.find_holders(pin.path, exclude_pids=self.exclude_pids())
        top = mounts.mount_at(pin.path)
        if top is None or top.source != SOURCE_PREFIX + pin.id:
            return handover.describe(found)
        return handover.not_on(found, top.mount_id)

    def disk_holders_waited(
        self,
        pin: Pin,
        stage: str,
        late: list[handover.HeldFile],
        waiting: Callable[[list[handover.HeldFile]], bool] = bool,
    ) -> list[handover.HeldFile]:
        """The `late` disk holders (disk_holders) looked at again every HOLD_POLL while
        `waiting` says so of them, for up to HOLD_WAIT: holders that let go within moments are
        waited out. What holds at the end ([] once all let go). The daemon's test pause point
        `stage` comes first."""
        writeback.pause_point(stage)
        deadline = time.monotonic() + HOLD_WAIT
        while late and waiting(late) and time.monotonic() < deadline:
            time.sleep(HOLD_POLL)
            late = self.disk_holders(pin)
        return late

    # -- checkpoints and unpins --------------------------------------------------------------

    def checkpoint(self, pin: Pin) -> SyncRecord:
        """Make the RAM side durable without unmounting (worker thread)."""
        start = time.monotonic()
        wall = time.time()
        kind = self.mode(pin)
        skipped = kind.no_checkpoint(pin, wall)
        if skipped is not None:
            return skipped
        clock = self.ram_clock(pin)  # what changes from here on, the next checkpoint writes
        try:
            files, nbytes, known, whole = kind.write_checkpoint(pin)
            record = SyncRecord(
                wall, True, time.monotonic() - start, files, nbytes, whole_bytes=whole
            )
        except writeback.NoSpace as exc:
            record = SyncRecord(wall, False, time.monotonic() - start, error=str(exc))
            known = pin.ledger  # refused before writing anything
        except (OSError, writeback.SyncError, copymode.CopyError) as exc:
            record = SyncRecord(wall, False, time.monotonic() - start, error=str(exc))
            known = None  # partly written: the next write-back compares content
        with self.lock:
            pin.ledger = known
            pin.last_sync = record
            if record.ok:
                pin.written_bytes += record.bytes
                pin.whole_file_bytes += record.whole_bytes
                pin.last_sync_mono = start
                pin.last_ok_wall = clock
                pin.backoff = 0.0
            else:
                # the engine leaves a pin alone until retry_at: no rsync every tick against a
                # full or read-only disk
                pin.backoff = RETRY.next(pin.backoff)
                pin.retry_at = time.monotonic() + pin.backoff
                record.error = f"{record.error} (retrying in {format_duration(pin.backoff)})"
        self.save_state()
        return record

    def unpin(self, pin: Pin) -> SyncRecord:
        """Write everything back, unmount and free the RAM (worker thread). Raises UnpinBusy
        (still pinned, nothing lost) when someone uses the directory, and SyncError/OSError when
        the write-back failed (still pinned: the overlay or bind is mounted again)."""
        return self.mode(pin).unpin(pin)

    # -- measurements ----------------------------------------------------------------------

    def ram_bytes(self, pin: Pin) -> int:
        """What the RAM budget counts for the pin (ramarea.Usage.counted)."""
        return self.ram_usage(pin).counted(self.ram_limit)

    def budget_bytes(self, pin: Pin) -> tuple[int, int | None]:
        """What the RAM budget counts for the pin, and what fills its RAM area where that is
        more (a compressed area's files: engine.PinInfo.fill_bytes), else None."""
        usage = self.ram_usage(pin)
        return usage.counted(self.ram_limit), usage.stored if usage.backend == "zram" else None

    def ram_usage(self, pin: Pin) -> ramarea.Usage:
        return ramarea.usage(self.mode(pin).ram_mount(pin))

    def dirty_bytes(self, pin: Pin, limit: int = 200_000) -> int:
        """Bytes in RAM changed since the last good checkpoint (not yet on disk)."""
        return self.dirty(pin, limit).bytes

    def dirty(self, pin: Pin, limit: int = 200_000) -> Dirty:
        """What on the RAM side changed since the last good checkpoint: the size of the regular
        files among it, and the change time of the oldest such entry (file, directory, symlink
        or whiteout), which is how long the oldest change has been at risk."""
        kind = self.mode(pin)
        if not kind.writes_back:
            return Dirty(0, 0, None)  # nothing is written back: nothing is at risk
        # The overlay's upper root gets its times when the pin is made; what changes below it
        # shows as entries (a deletion as a whiteout).
        since, oldest = kind.dirty_floor(pin, pin.last_ok_wall or 0.0)
        total = entries = 0
        root = self.ram_side(pin)
        for seen, (rel, st) in enumerate(tree.walk(root, tolerate=(OSError,)), start=1):
            if seen > limit:
                return Dirty(total, entries, oldest, complete=False)
            if rel == writeback.SCRATCH_NAME and stat.S_ISCHR(st.st_mode):
                continue  # an overlay's own hiding whiteout (writeback.names), not a change
            if st.st_ctime >= since:
                entries += 1
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
                if oldest is None or st.st_ctime < oldest:
                    oldest = st.st_ctime
        if oldest is not None and pin.last_sync is not None and not pin.last_sync.ok:
            # Checkpoints fail: a file changed again and again since the last good one shows
            # only its latest change time, while its first change not on disk is older. The
            # honest bound is the last good checkpoint (or the pin).
            oldest = min(oldest, pin.last_ok_wall or pin.pinned_wall)
        return Dirty(total, entries, oldest, complete=True)
