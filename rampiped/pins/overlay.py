"""Overlay pins (adaptive pins by default): a tmpfs upper layer over the directory, written
back through the checkpoint journal (writeback/), and unpinned in steps (see `unpin`)."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rampiped import durable, handover, mounts, pause, writeback
from rampiped.commands import guarded
from rampiped.engine import format_bytes
from rampiped.osutil import read_json
from rampiped.pins.dirs import copy_root_attributes, largest_file
from rampiped.pins.early import (
    Early,
    Room,
    changed_files,
    changed_since,
    disk_below,
    write_passes,
    written_early,
)
from rampiped.pins.handoff import Handoff
from rampiped.pins.mode import Mode, Undo
from rampiped.pins.model import (
    EARLY_MARK,
    FINAL_MARK,
    SOURCE_PREFIX,
    Pin,
    StillDraining,
    SyncRecord,
    UnpinBusy,
    Written,
    held_files,
)

if TYPE_CHECKING:
    from rampiped.pins.manager import PinManager

log = logging.getLogger("rampiped")


class OverlayMode(Mode):
    name = "overlay"
    lets_late_writers_in = True
    takes_reopen = True

    def __init__(self, manager: PinManager) -> None:
        super().__init__(manager)
        self.handoff = Handoff(manager)

    def ram_side(self, pin: Pin) -> str:
        return self.m.upper(pin.id)

    def ram_needed(self, path: str) -> tuple[int, str]:
        # any change to a file, even a chmod, copies it up whole; a file larger than the room
        # left would fail with ENOSPC at that moment
        return largest_file(path), "its largest file"

    # -- pinning ---------------------------------------------------------------------------------

    def mount(self, pin: Pin, undo: Undo, dir_fd: int) -> None:
        upper, work = self.m.upper(pin.id), os.path.join(self.m.ram(pin.id), "work")
        os.mkdir(upper)
        os.mkdir(work)
        # the merged root shows the upper root's; read through the staging bind, not the path
        copy_root_attributes(self.m.disk(pin.id), upper)
        # hides the scratch directory of the write-back into the lower before the unmount
        # (writeback.names); never seen through the overlay, never written back
        os.mknod(os.path.join(upper, writeback.SCRATCH_NAME), stat.S_IFCHR, os.makedev(0, 0))
        self.mount_overlay(pin, f"/proc/self/fd/{dir_fd}")
        undo.append(lambda: self.rollback(pin))
        writeback.pause_point("pin:overlay-mounted")

    def rollback(self, pin: Pin) -> None:
        """Undo a pin's overlay; what was written through it in the moment it was mounted is
        written back first (the overlay served the directory, however briefly)."""
        self.m.unmount_placed(pin)
        upper = self.m.upper(pin.id)
        if os.listdir(upper):
            writeback.apply_upper(upper, self.m.disk(pin.id), runner=self.m.runner)

    def late_writes_shown(self, pin: Pin, late: list[handover.HeldFile]) -> bool:
        """Processes that opened files on disk in the moment between the check and the mount
        (`late`): whether they all let go within HOLD_WAIT (a logger that opens, appends and
        closes does at once) and everything they could have written there is what the overlay
        shows. It is, for a file not copied up (the overlay reads the disk file), and for one
        whose disk content is a prefix of its copy in RAM (copied up after their last write,
        or appended to since): the write-back then carries every byte of it."""
        if self.m.disk_holders_waited(pin, "pin:late-holders", late):
            return False
        held, only_files = held_files(pin.path, late)
        if not only_files:
            return False  # a working directory or a mapping: writes may still come
        upper, disk = self.m.upper(pin.id), self.m.disk(pin.id)
        return all(
            not os.path.lexists(os.path.join(upper, rel))
            or writeback.is_prefix(disk, rel, os.path.join(upper, rel))
            for rel in held
        )

    def late_bases(self, pin: Pin, late: list[handover.HeldFile]) -> dict[str, writeback.Stamp]:
        out: dict[str, writeback.Stamp] = {}
        for rel in held_files(pin.path, late)[0]:
            copy = os.path.join(self.m.upper(pin.id), rel)
            try:
                # copied into RAM already: what the disk file holds beyond the bytes both share
                # was written below RAM's copy, and is kept by the write-back
                found = (
                    writeback.shared_stamp(self.m.disk(pin.id), rel, copy)
                    if os.path.lexists(copy)
                    else writeback.stamp_of(self.m.disk(pin.id), rel)
                )
            except OSError:
                continue
            if found is not None:
                out[rel] = found
        return out

    def reopen_after_pin(self, pin: Pin, undo: Undo) -> None:
        self.handoff.reopen_after_pin(pin, undo)

    def late_holders(self, pin: Pin) -> list[handover.HeldFile]:
        late = self.m.disk_holders(pin)
        if late and self.late_writes_shown(pin, late):
            return []  # held for moments, and all they wrote is what the overlay shows
        return late

    def refuse_late(self, pin: Pin, late: list[handover.HeldFile], refusal: str, undo: Undo) -> str:
        pin.late_bases = self.late_bases(pin, late)
        if not self.write_back_refused(pin):
            # a process holds a file in RAM: dropping the mounts would lose what it wrote. The
            # pin stays (mounted) and its unpin is retried with backoff.
            undo.clear()
            pin.unpin_requested = True
            raise StillDraining(
                refusal + "; what reached RAM meanwhile stays pinned until its unpin,"
                " retried in the background, can write it back"
            )
        return refusal

    def write_back_refused(self, pin: Pin) -> bool:
        """An overlay pin refused after its mount: what processes wrote through it meanwhile is
        in RAM only. Write it back the way an unpin does (held files, journal, verify) instead of
        dropping it with the mounts. False when that cannot be done now (the caller then rolls
        back as before)."""
        self.m.set_state(pin, "pinned")
        try:
            self.unpin(pin)
        except (UnpinBusy, OSError, writeback.SyncError) as exc:
            log.warning(
                "%s: could not write back the refused pin (%s); rolling it back", pin.path, exc
            )
            return False
        return True

    def cover(self, pin: Pin, target: str) -> None:
        # the same layers again, on the same boot: the volatile mount's mark may go (below)
        clear_volatile_mark(os.path.join(self.m.ram(pin.id), "work"))
        self.mount_overlay(pin, target)

    def mount_overlay(self, pin: Pin, target: str) -> None:
        """The pin's overlay on `target`. On tmpfs it is mounted `volatile`: the overlay then
        skips every fsync and syncfs to its upper layer, which on tmpfs write nothing anyway
        (what makes a pin durable is its checkpoints), and writers that fsync run faster
        (4k write + fsync: about 0.78 of plain tmpfs against 0.69, measured here). On zram a
        writer's fsync still pushes its pages to the compressed device. A kernel without the
        option (before 5.10) gets the overlay without it."""
        kwargs: dict[str, Any] = {
            "lower": self.m.disk(pin.id),
            "upper": self.m.upper(pin.id),
            "work": os.path.join(self.m.ram(pin.id), "work"),
            "source": SOURCE_PREFIX + pin.id,
        }
        if mounts.fs_type(self.m.upper(pin.id)) == "tmpfs":
            try:
                mounts.mount_overlay(
                    target, features=writeback.OVERLAY_FEATURES + ",volatile", **kwargs
                )
                return
            except mounts.MountError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        mounts.mount_overlay(target, features=writeback.OVERLAY_FEATURES, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------------

    def write_checkpoint(self, pin: Pin) -> Written:
        taken = self.m.ram_clock_ns(pin)  # before the layer is read (see writeback/carry.py)
        need = self.check_room(pin, "checkpoint")  # deferred, loudly, if it won't fit
        journal = self.m.journal(pin.id)
        with self.m.journal_links(pin.id, pin.path) as link:
            res = writeback.checkpoint(
                self.m.upper(pin.id),
                journal,
                runner=self.m.runner,
                ledger=pin.ledger,
                found=need.found,  # read just now: once per checkpoint
                taken_ns=taken,
                below=disk_below(pin, link, journal, self.m.disk(pin.id)),
            )
        return Written(res.files, res.bytes, res.ledger, res.whole_bytes)

    # -- unpin -------------------------------------------------------------------------------------

    def unpin(self, pin: Pin) -> SyncRecord:
        """Raises UnpinBusy (still pinned, nothing lost) when someone uses the directory, and
        SyncError/OSError when the write-back failed (the overlay is mounted again). The steps:
        check that the write-back fits; while the overlay still serves the path, checkpoint the
        layer and write that into the directory below it (`write_early`); record the disk
        files the rest will replace and unmount (hand the directory over instead when writers
        keep their files open); checkpoint what changed since into a final journal generation
        and apply that (an apply cut short by a power cut is finished from the journal at the
        next start); carry over what was written into the replaced files meanwhile; free the
        RAM."""
        if pin.handover_mount is not None:
            return self.handoff.finish(pin, time.monotonic(), time.time())
        start, wall = time.monotonic(), time.time()
        self.check_room(pin, "write-back")  # refused while RAM still serves the path
        with self.m.journal_links(pin.id, pin.path) as link:
            early = self.write_early(pin, link)
            try:
                replaced, since = self.m.unmount_when_free(
                    pin,
                    SOURCE_PREFIX + pin.id,
                    before=lambda: self.record_replaced(
                        pin, read=early is None, since=None if early is None else early.disk_since
                    ),
                )
            except UnpinBusy as busy:
                overlay_id = self.handover_mount(pin, busy)
                if overlay_id is None:
                    raise
                # writers that keep their files open: hand them over to the disk
                return self.handoff.start(pin, overlay_id, start, wall)
            unmounted = time.monotonic()
            writeback.pause_point("unpin:unmounted")
            # whether anything changed since the last pass before the unmount (all of it
            # without one): read once, the switch is under way
            changed = early is None or changed_since(self.m.upper(pin.id), early.since)
            if early is not None and not early.moves_left and not changed:
                # nothing changed since the last pass before the unmount: the disk holds it all
                res = writeback.ApplyResult(0, 0, 0, 0.0)
            else:
                res = self.write_rest(pin, replaced, since, early, link, changed)
        writeback.pause_point("unpin:applied")
        if early is not None:
            log.info(
                "%s: written back before the unmount (%d files, %s; %d linked from the journal,"
                " not written again); after it, %d files, %s in %.0f ms",
                pin.path,
                early.files,
                format_bytes(early.bytes),
                early.linked,
                res.files,
                format_bytes(res.bytes),
                (time.monotonic() - unmounted) * 1000,
            )
        self.m.release(pin)  # removes the journal directory last
        if pin.adopted:
            for line in self.m.scrub(pin.id, pin.path, self):
                log.info("%s", line)
        if pin.reopen:
            # writers that opened a file since: they follow the directory back to disk
            handover.run_reopen(pin.reopen, pin.path, self.m.runner)
        files, nbytes = res.files, res.bytes
        if early is not None:
            files, nbytes = files + early.files, nbytes + early.bytes
        return SyncRecord(wall, True, time.monotonic() - start, files, nbytes)

    def write_early(
        self, pin: Pin, link: Callable[[str], writeback.LinkRoute | None]
    ) -> Early | None:
        """While the overlay still serves the path: checkpoint the layer into the journal and
        apply that generation to the directory below it, through the staging bind. Readers
        see none of it: the upper layer shadows every entry the apply changes (a file deleted
        or renamed through the overlay since leaves a whiteout, the kernel finding it in the
        layer below; a directory made through it is opaque), and the pin's whiteout hides the
        apply's scratch directory. After the unmount only what changed since is written, so
        the path shows its last state on disk moments after it stops showing RAM, not after a
        whole write-back. A power cut meanwhile finds a complete checkpoint in the journal, as
        always. An eviction (RAM is short) writes back early too, while the pin's RAM area
        keeps room for what its writers add meanwhile (`Room`): once it does not, the
        running command is stopped, and the unmount comes first, as it would have without
        this (the directory below holds part of what was written, hidden by the layer, and
        the write-back after the unmount writes all of it). None (nothing done) when this
        cannot be: such an eviction, an older pin without the whiteout, a process that wrote the
        disk below the pin (late_bases), holders that stay (with a reopen command, the
        hand-over follows: it writes the layer while the overlay is mounted too), a file
        mapped (a store through a mapping made before now would change no stamp), or a
        renamed directory whose content cannot go to its origin first (writeback/origins.py:
        the origin, which the overlay reads, stays in place until the unmount, and what the
        layer holds of the directory is written into it, as hidden as the rest; the apply
        after the unmount then only moves it)."""
        if pause.late_writeback_only() or pin.late_bases:
            return None
        if pin.evicting:
            writeback.pause_point("evict:begin")
        room = Room(self.m.upper(pin.id)) if pin.evicting else None
        if room is None:
            return write_passes(self.m, pin, link, self.m.runner, lambda: None)
        if (busy := room.busy()) is not None:
            log.info("%s: evicted, and %s: the unmount comes first", pin.path, busy)
            return None
        try:
            return write_passes(self.m, pin, link, guarded(self.m.runner, room.short), room.short)
        except (writeback.SyncError, OSError):
            if room.reason is None:
                raise
        log.warning(
            "%s: evicted, and %s: the write-back before the unmount stops; the unmount"
            " comes first, the rest is written after it",
            pin.path,
            room.reason,
        )
        return None

    def write_rest(
        self,
        pin: Pin,
        replaced: dict[str, writeback.Stamp],
        since: int,
        early: Early | None,
        link: Callable[[str], writeback.LinkRoute | None],
        changed: bool = True,
    ) -> writeback.ApplyResult:
        """After the unmount: what is left to write (all of it, without `early`), carrying
        over what processes write meanwhile into the disk files it replaces. `changed`:
        whether the layer changed since `early`. On failure the overlay is mounted again."""
        upper = self.m.upper(pin.id)
        held: writeback.HeldFiles | None = None
        try:
            # after a write-back before the unmount, only what changed since is replaced
            held = writeback.HeldFiles.hold(
                upper,
                self.m.hold_place(pin.id, pin.path),
                replaced,
                since,
                only=None if early is None else changed_files(upper, early.since),
            )
            res = self.apply_final(pin, held, early, link, changed)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.m.journal(pin.id), EARLY_MARK))
            if held is not None:
                # the RAM layer is mounted again and hides the disk files at those names
                with contextlib.suppress(OSError, writeback.SyncError):
                    held.merge(conflicts_only=True)
                    held.finish()
                held.keep()
            self.m.remount(pin)
            raise
        self.m.settle_window(pin, held)
        return res

    def record_replaced(
        self, pin: Pin, *, read: bool = True, since: int | None = None
    ) -> tuple[dict[str, writeback.Stamp], int]:
        """The disk files the write-back will replace, as they are while nothing can write
        them (the overlay still covers the path), and the time from which a change of theirs
        is someone else's: see writeback.HeldFiles."""
        if since is None:
            since = time.time_ns() - writeback.CLOCK_SLACK_NS
        try:
            replaced = writeback.touched_entries(
                self.m.upper(pin.id), self.m.disk(pin.id), read=read
            )
            for rel, base in pin.late_bases.items():
                # written on disk below the overlay since the pin (see late_bases): what was
                # added since then follows RAM's version
                found = replaced.get(rel)
                if found is not None and found.source == rel and found.ino == base.ino:
                    replaced[rel] = base
        except (OSError, writeback.SyncError) as exc:
            log.warning(
                "%s: could not record the disk files the write-back replaces (%s); writes"
                " to them during the write-back are kept as conflict files",
                pin.path,
                exc,
            )
            replaced = {}
        writeback.pause_point("unpin:recorded")  # the overlay still mounted, its users free
        return replaced, since

    def handover_mount(self, pin: Pin, busy: UnpinBusy) -> int | None:
        """The overlay's mount id when the unpin can hand the directory over to disk instead
        (a reopen command, and only writers hold it), else None."""
        top = mounts.mount_at(pin.path)
        if (
            pin.reopen
            and busy.holders
            and top is not None
            and top.source == SOURCE_PREFIX + pin.id
            and handover.only_writers(busy.holders)
        ):
            return top.mount_id
        return None

    def apply_final(
        self,
        pin: Pin,
        held: writeback.HeldFiles,
        early: Early | None,
        link: Callable[[str], writeback.LinkRoute | None],
        changed: bool = True,
    ) -> writeback.ApplyResult:
        """The layer into a final journal generation, then that generation into the directory:
        an apply cut short by a power loss is then replayed from disk at the next start (the
        RAM layer is gone by then). After `early`, only what changed since: the generation
        copies the files changed since (by ctime; none is mapped, see write_early) and links
        the rest to the one written early, and the apply leaves out the files it linked."""
        journal = self.m.journal(pin.id)
        upper = self.m.upper(pin.id)
        if early is None:
            writeback.checkpoint(upper, journal, runner=self.m.runner, ledger=pin.ledger)
        elif not changed and writeback.latest_generation(journal) == early.generation:
            pass  # the generation written before the unmount is the layer: only its moves left
        else:
            writeback.checkpoint(
                upper,
                journal,
                runner=self.m.runner,
                changed_since=early.since,
                keep_older=True,  # the one written early: its files are in the directory
            )
        pin.ledger = None  # the apply removes the journal it describes
        gen = writeback.latest_generation(journal)
        unchanged = early.unchanged_after_unmount(gen, upper) if early else None
        # from here on the journal, not the RAM layer, is what gets applied: applying the layer
        # a second time after this apply moved renamed directories would find their origins gone
        # No commit of its own where the filesystem commits in order, and no write-out: the
        # apply's commits take its name (on a slow stick a renamed directory was missing from
        # its new name for one more commit; a file written in the last moment showed its older
        # version for the write-out's 90 ms more). A start after a crash of the daemon finds it
        # in the page cache; after a power cut it may be absent or empty, and the early mark
        # says which files the directory holds already (pins.early.written_early, which takes
        # an empty mark for none; test_final_mark_power_cut.py).
        durable.write_json(
            os.path.join(journal, FINAL_MARK),
            {"final": True, "unchanged": sorted(unchanged or ())},
            commit=False,
            written_out=False,
        )
        writeback.pause_point("unpin:journaled")
        res = writeback.apply_journal(
            journal,
            self.m.disk(pin.id),
            runner=self.m.runner,
            window=held,
            unchanged=unchanged or frozenset(),
            link=link,
        )
        if res is None:
            raise writeback.SyncError(f"the journal of {pin.path} vanished before its apply")
        return res

    # -- start-up ----------------------------------------------------------------------------------

    def reconcile(self, pid: str, path: str, rec: dict[str, Any]) -> str:
        if handover.read_marker(self.m.journal(pid)) is not None:
            return self.handoff.reconcile(pid, path, rec)
        return super().reconcile(pid, path, rec)

    def finish_interrupted(self, pid: str, path: str, state: Any, disk_mounted: bool) -> str:
        m = self.m
        if os.path.exists(os.path.join(m.journal(pid), FINAL_MARK)):
            # the final generation was written: the layer must not be applied again
            m.ensure_staging(pid, path, disk_mounted)
            res = self.apply_left_journal(pid, path)
            if res is None:
                return "the write-back had finished"
            return f"wrote {res.files} files, {format_bytes(res.bytes)}"
        if not os.path.isdir(m.upper(pid)):
            return "the overlay was never mounted: nothing to write"
        # through the staging bind (nosymfollow), never the path users control
        m.ensure_staging(pid, path, disk_mounted)
        early = read_json(os.path.join(m.journal(pid), EARLY_MARK))
        since = early.get("since") if early else None
        res = self.recover_apply(
            pid,
            path,
            functools.partial(
                writeback.apply_upper,
                m.upper(pid),
                unchanged=changed_files(m.upper(pid), since, invert=True)
                if isinstance(since, int)
                else frozenset(),
            ),
        )
        assert res is not None  # apply_upper always returns a result
        return f"wrote {res.files} files, {format_bytes(res.bytes)}"

    def after_power_cut(self, pid: str, path: str, disk_mounted: bool) -> str:
        m = self.m
        m.ensure_staging(pid, path, disk_mounted)
        try:
            res = self.apply_left_journal(pid, path)
        finally:
            mounts.umount(m.disk(pid))
            shutil.rmtree(m.base(pid), ignore_errors=True)
        m.drop_journal(pid, path)
        if res is None:
            return ""
        return (
            f"{path}: applied the checkpoint journal left by a power cut or crash:"
            f" {res.files} files, {format_bytes(res.bytes)}"
        )

    def check_room(self, pin: Pin, what: str) -> writeback.SpaceNeed:
        """An overlay pin's journal generation and the apply that follows must both fit (on
        one filesystem, twice the changed data, unless the apply links the generation's files
        into place): a generation that cannot be applied strands its data in the journal.
        Raises writeback.NoSpace before anything is written."""
        return writeback.check_space(
            self.m.upper(pin.id),
            self.m.journal(pin.id),
            self.m.disk(pin.id),
            pin.ledger,
            f"{what} of {pin.path}",
            pin.path,
            linked=self.m.journal_shares_mount(pin.id, pin.path),
        )

    def apply_left_journal(self, pid: str, path: str) -> writeback.ApplyResult | None:
        """At start: apply the newest generation a crash or power cut left in the journal,
        linked into place where it can be, leaving alone what the unpin wrote before it."""
        m = self.m
        with m.journal_links(pid, path) as link:
            return self.recover_apply(
                pid,
                path,
                functools.partial(
                    writeback.apply_journal,
                    m.journal(pid),
                    unchanged=written_early(m, pid),
                    link=link,
                ),
            )

    def recover_apply(
        self, pid: str, path: str, apply: Callable[..., writeback.ApplyResult | None]
    ) -> writeback.ApplyResult | None:
        """Finish an overlay write-back found half done at start: `apply` (apply_upper or
        apply_journal, its source bound) into the staging bind, carrying over what was held
        from the write-back's window."""
        place = self.m.hold_place(pid, path)
        try:
            left = writeback.HeldFiles.left(place)
            res = apply(self.m.disk(pid), runner=self.m.runner, window=left[0] if left else None)
        finally:
            place.close()
        self.m.finish_window(pid, path)
        return res


def clear_volatile_mark(work: str) -> None:
    """Remove the mark a `volatile` overlay leaves in its workdir (work/incompat/volatile),
    which makes the kernel refuse to mount those layers again: it is there for layers that a
    crash may have left half written, and these are on a RAM filesystem that did not go away
    (after a power cut there is nothing to mount again)."""
    shutil.rmtree(os.path.join(work, "work", "incompat", "volatile"), ignore_errors=True)
