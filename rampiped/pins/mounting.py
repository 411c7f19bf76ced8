"""Mounting and unmounting a pin: the staging bind, the unmount that waits for holders (never
a lazy detach), the remount after a failed write-back, and the release of what is left."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from rampiped import handover, holders, mounts, ramarea, writeback
from rampiped.pins.core import ManagerCore
from rampiped.pins.dirs import open_dir_nofollow
from rampiped.pins.model import (
    BUSY_GRACE,
    BUSY_POLL,
    SOURCE_PREFIX,
    UMOUNT_SPIN,
    UMOUNT_SPIN_POLL,
    Pin,
    PinRefused,
    UnpinBusy,
    holder_list,
)
from rampiped.writeback import LinkRoute

log = logging.getLogger("rampiped")

# the directories whose mount could not be copied, said once each (mounts.clone_mount)
_NO_CLONE_TOLD: set[str] = set()

T = TypeVar("T")


class Mounting(ManagerCore):
    def mount_layers(self, pin: Pin, undo: list[Callable[[], None]], dir_fd: int) -> None:
        ram, disk = self.ram(pin.id), self.disk(pin.id)
        os.makedirs(ram, mode=0o700, exist_ok=True)
        os.makedirs(disk, mode=0o700, exist_ok=True)
        ramarea.mount(
            ram, backend=self.ram_backend, size=self.tmpfs_size(), source=SOURCE_PREFIX + pin.id
        )
        undo.append(lambda: ramarea.unmount(ram))
        self.bind_staging(dir_fd, disk)
        undo.append(lambda: mounts.umount(disk))

    @staticmethod
    def bind_staging(dir_fd: int, disk: str) -> None:
        """Bind the directory behind `dir_fd` on `disk`: private before anything else is mounted
        (a shared bind would receive the overlay too), and nosymfollow, so that every write-back
        through it stays inside the directory even when its users plant symlinks meanwhile."""
        mounts.bind(f"/proc/self/fd/{dir_fd}", disk, private=True, nosymfollow=True)
        st, want = os.stat(disk), os.fstat(dir_fd)
        if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
            mounts.umount(disk)
            raise PinRefused(f"the staging bind {disk} does not show the directory pinned")

    def staging_for(self, pid: str, path: str) -> None:
        """A staging bind of `path` for a write-back at start-up (after a power cut the runtime
        dir is empty): reached without symlinks and mounted nosymfollow, as at pin time."""
        disk = self.disk(pid)
        os.makedirs(disk, mode=0o700, exist_ok=True)
        dir_fd = open_dir_nofollow(path)
        try:
            self.bind_staging(dir_fd, disk)
        finally:
            os.close(dir_fd)

    @contextlib.contextmanager
    def journal_links(self, pid: str, path: str) -> Iterator[Callable[[str], LinkRoute | None]]:
        """Where a generation of the pin's journal and the directory below the pin are, both
        below one private copy of the mount the directory is on (mounts.clone_mount: no path
        leads to it, and it goes when the block ends, also if the daemon dies): a write-back
        then links the generation's files into place instead of writing them again. The
        function gives None (copy) when the journal is on another mount; the apply copies too
        when the route does not reach both (links.same_dir)."""
        shared = self._clone_shared(pid, path)
        if shared is None:
            yield lambda _gen: None
            return
        mountpoint, clone = shared
        try:
            target = os.path.relpath(path, mountpoint)
            journal = os.path.relpath(os.path.realpath(self.journal(pid)), mountpoint)

            def route(gen: str) -> LinkRoute | None:
                return LinkRoute(
                    clone, os.path.join(journal, os.path.basename(gen)).removeprefix("./"),
                    "" if target == "." else target,
                )  # fmt: skip

            yield route
        finally:
            os.close(clone)

    def journal_shares_mount(self, pid: str, path: str) -> bool:
        """Whether the journal of `pid` is on the mount the directory `path` is on (where a
        write-back can link the journal's files into place: journal_links)."""
        return self._shared_mount(pid, path) is not None

    def _shared_mount(self, pid: str, path: str) -> str | None:
        try:
            os.makedirs(self.journal(pid), mode=0o700, exist_ok=True)
            under = mounts.mount_containing(os.path.dirname(path))
            if mounts.mount_containing(self.journal(pid)).mount_id != under.mount_id:
                return None
        except OSError:
            return None
        return under.mountpoint

    def _clone_shared(self, pid: str, path: str) -> tuple[str, int] | None:
        """(mount point, descriptor of a private copy of that mount) when the journal of `pid`
        and the directory `path` are on one mount, else None."""
        mountpoint = self._shared_mount(pid, path)
        if mountpoint is None:
            return None
        try:
            return mountpoint, mounts.clone_mount(mountpoint)
        except OSError as e:
            if path not in _NO_CLONE_TOLD:  # once: checkpoints ask for it too
                _NO_CLONE_TOLD.add(path)
                log.info(
                    "%s: no private copy of its mount (%s): the journal is copied into place,"
                    " not linked, a write-back holds the files it replaces inside the"
                    " directory, and a checkpoint copies files copied up from the disk whole",
                    path,
                    e,
                )
            return None

    def hold_place(self, pid: str, path: str) -> writeback.HoldPlace:
        """Where a write-back of the pin at `path` keeps the disk files it replaces: in its
        journal when that is on the directory's mount (a reader of the directory never sees
        it), else at the directory's top (writeback.HoldPlace)."""
        inside = writeback.HoldPlace.inside(self.disk(pid))
        shared = self._clone_shared(pid, path)
        if shared is None:
            return inside
        mountpoint, clone = shared
        journal = os.path.realpath(self.journal(pid))
        target = os.path.relpath(path, mountpoint)
        place = writeback.HoldPlace(
            self.disk(pid),
            root_fd=clone,
            target_rel="" if target == "." else target,
            hold_rel=os.path.join(os.path.relpath(journal, mountpoint), writeback.JOURNAL_HOLD),
            shown=os.path.join(journal, writeback.JOURNAL_HOLD),
        )
        if not place.reaches(self.disk(pid), journal):
            place.close()
            return inside
        return place

    def drop_journal(self, pid: str, path: str) -> None:
        """Remove the pin's journal; a hold directory left in it is moved into the directory
        first (never removed with it), and the journal stays when that fails, or when its
        stash holds renamed directories of an apply cut short (the next apply resumes it)."""
        if writeback.holds_stashed(self.journal(pid), writeback.JOURNAL_STASH):
            log.error(
                "%s: %s holds directories of %s that an interrupted write-back moved there;"
                " the journal is kept for the next write-back to resume",
                path,
                os.path.join(self.journal(pid), writeback.JOURNAL_STASH),
                path,
            )
            return
        if os.path.lexists(os.path.join(self.journal(pid), writeback.JOURNAL_HOLD)):
            place = self.hold_place(pid, path)
            try:
                if not place.rescue():
                    return
            finally:
                place.close()
        shutil.rmtree(self.journal(pid), ignore_errors=True)

    def check_in_place(self, pin: Pin) -> None:
        """After mounting through the descriptor: the mount must be at the pin's path. If the
        directory (or a parent) was renamed meanwhile, it is somewhere else: roll back."""
        top = mounts.mount_at(pin.path)
        if top is None or top.source != SOURCE_PREFIX + pin.id:
            raise PinRefused(
                f"cannot pin {pin.path}: the directory was moved or replaced during the pin"
            )

    def unmount_path(self, pin: Pin) -> None:
        """Unmount the pin's mount at its path, and only that: never a mount that a renamed
        parent or a planted symlink now shows there."""
        top = mounts.mount_at(pin.path)
        ours = top is not None and top.source == SOURCE_PREFIX + pin.id
        if os.path.realpath(pin.path) != pin.path or not ours:
            raise mounts.MountError(
                errno.EINVAL,
                f"cannot unmount {pin.path}: the pin's mount is no longer at that path (a"
                " parent directory was renamed or replaced by a symlink); its data stays in"
                f" {self.ram_side(pin)}",
                pin.path,
            )
        mounts.umount(pin.path)

    def unmount_placed(self, pin: Pin) -> None:
        """Rollback: unmount the pin's mount over the directory, wherever it landed."""
        pins_dir = os.path.join(self.runtime_dir, "pins") + "/"
        for entry in reversed(mounts.mountinfo()):
            placed = not entry.mountpoint.startswith(pins_dir)
            if entry.source == SOURCE_PREFIX + pin.id and placed:
                mounts.umount(entry.mountpoint)

    def beside_ram(self, pin: Pin, found: list[holders.Holder]) -> list[holders.Holder]:
        """Of the holders found at an unpin, leave out the files held on the disk below the
        pin (opened through the mount the directory is on, in this namespace): they do not
        keep the unmount from working, and nothing they write is in RAM."""
        if pin.under_mount is None or not found:
            return found
        described = handover.describe(found)
        return [h for h, d in zip(found, described, strict=True) if d.mount_id != pin.under_mount]

    def holders_of(self, pin: Pin, source: str) -> list[holders.Holder]:
        """Who holds the pin's mount, in any mount namespace (files on the disk below aside)."""
        return self.beside_ram(
            pin,
            holders.find_holders(pin.path, exclude_pids=self.exclude_pids(), mount_source=source),
        )

    def free_soon(
        self, pin: Pin, source: str, stop: Callable[[], str | None] = lambda: None
    ) -> bool:
        """Whether nothing holds the pin's mount now or within BUSY_GRACE (writers that hold a
        file only while they write let go in moments); False at once when `stop` gives a
        reason."""
        deadline = time.monotonic() + BUSY_GRACE
        while self.holders_of(pin, source):
            if time.monotonic() >= deadline or stop() is not None:
                return False
            time.sleep(BUSY_POLL)
        return True

    def unmount_when_free(self, pin: Pin, source: str, *, before: Callable[[], T]) -> T:
        """Unmount the pin's mount over its directory once nothing holds it: holders in this or
        any other mount namespace (after our unmount, a namespace that still shows the pin
        would keep writing into RAM about to be freed). Writers that hold a file only while
        they write are waited for up to BUSY_GRACE; after that UnpinBusy names the holders.
        Never a lazy detach. `before` runs right before each try, while nothing holds the
        directory; what it returned the last time is returned."""
        deadline = time.monotonic() + BUSY_GRACE
        while True:
            found = self.holders_of(pin, source)
            if not found:
                taken = before()
                self.set_state(pin, "draining")
                try:
                    self.unmount_soon(pin)
                    return taken
                except mounts.MountBusy as exc:
                    self.set_state(pin, "pinned")
                    if time.monotonic() < deadline:
                        time.sleep(BUSY_POLL)
                        continue
                    found = self.holders_of(pin, source)
                    raise UnpinBusy(
                        f"{pin.path} is busy: "
                        + (holder_list(found) if found else "no holder found"),
                        found,
                    ) from exc
                except BaseException:
                    self.set_state(pin, "pinned")
                    raise
            if time.monotonic() >= deadline:
                raise UnpinBusy(f"{pin.path} is in use by " + holder_list(found), found)
            time.sleep(BUSY_POLL)

    def unmount_soon(self, pin: Pin) -> None:
        """Unmount the pin's mount, trying again for up to UMOUNT_SPIN: a writer that opens,
        writes and closes holds the mount busy only for moments, and a full holders scan
        between tries would let it write much more into RAM (an eviction is a race with it)."""
        deadline = time.monotonic() + UMOUNT_SPIN
        while True:
            try:
                self.unmount_path(pin)
                return
            except mounts.MountBusy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(UMOUNT_SPIN_POLL)

    def remount(self, pin: Pin) -> None:
        """After a failed write-back: show the RAM side again, so nothing written is hidden."""
        dir_fd = -1
        try:
            # through a descriptor of the very directory on disk (the staging bind shows it),
            # never the path as it is now: it may have been swapped for a symlink meanwhile
            dir_fd = open_dir_nofollow(pin.path)
            st, want = os.fstat(dir_fd), os.stat(self.disk(pin.id))
            if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
                raise PinRefused(f"{pin.path} is no longer the directory that was pinned")
            target = f"/proc/self/fd/{dir_fd}"
            self.mode(pin).cover(pin, target)
        except Exception as exc:
            log.critical(
                "%s: write-back failed and the RAM copy could not be mounted again"
                " (%s); the data is safe in %s",
                pin.path,
                exc,
                self.ram_side(pin),
            )
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        self.set_state(pin, "pinned")

    def release(self, pin: Pin) -> None:
        mounts.umount(self.disk(pin.id))
        ramarea.unmount(self.ram(pin.id))
        shutil.rmtree(self.base(pin.id), ignore_errors=True)
        writeback.discard_journal(self.journal(pin.id))
        self.drop_journal(pin.id, pin.path)
        with self.lock:
            self.pins.pop(pin.path, None)
        self.save_state()

    def release_staging(self, pin: Pin) -> None:
        if os.path.ismount(self.disk(pin.id)):
            mounts.umount(self.disk(pin.id))
        shutil.rmtree(self.base(pin.id), ignore_errors=True)
        self.drop_journal(pin.id, pin.path)
        with self.lock:
            self.pins.pop(pin.path, None)
        self.save_state()
