"""Volatile pins: a tmpfs over the directory that is never written back (caches, scratch),
with `keep` subdirectories bound from the disk."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from rampiped import holders, mounts, ramarea, tmpfiles, volatile
from rampiped.pins.dirs import open_dir_nofollow
from rampiped.pins.mode import Mode
from rampiped.pins.model import (
    SOURCE_PREFIX,
    Pin,
    PinRefused,
    PinRequest,
    SyncRecord,
    UnpinBusy,
    holder_list,
    pin_id,
)

log = logging.getLogger("rampiped")


class VolatileMode(Mode):
    name = "volatile"
    writes_back = False

    def ram_side(self, pin: Pin) -> str:
        return pin.path

    def ram_mount(self, pin: Pin) -> str:
        return pin.path

    def no_checkpoint(self, pin: Pin, wall: float) -> SyncRecord | None:
        return SyncRecord(wall, True, 0.0)  # nothing is ever written back

    def pin(self, path: str, req: PinRequest) -> Pin:
        """A tmpfs with the directory's owner and mode over it; nothing is copied in and nothing
        is written back (the disk content is hidden while it is mounted). `keep` subdirectories
        are bound from the disk through the private staging bind, so that they persist."""
        self.m.check_pinnable(path)
        origin, keep, size = req.origin, req.keep, req.size or self.m.tmpfs_size()
        pid = pin_id(path)
        pin = Pin(
            path=path,
            id=pid,
            mode="volatile",
            origin=origin,
            state="pinning",
            pinned_at=time.monotonic(),
            pinned_wall=time.time(),
            sync_interval=0.0,  # no checkpoints
            keep=tuple(keep),
            size=size,
        )
        self.m.register(pin, {"path": path, "mode": "volatile", "id": pid, "keep": list(keep)})
        undo: list[Callable[[], None]] = []
        dir_fd = -1
        try:
            dir_fd = open_dir_nofollow(path)
            disk = self.m.disk(pid)
            os.makedirs(disk, mode=0o700, exist_ok=True)
            self.m.bind_staging(dir_fd, disk)
            undo.append(lambda: mounts.umount(disk))
            ramarea.mount_over(
                dir_fd,
                path,
                backend=self.m.ram_backend,
                size=size,
                source=SOURCE_PREFIX + pid,
                link_dir=self.m.base(pid),
            )
            undo.append(lambda: self.unmount(pin))
            self.m.check_in_place(pin)
            top = mounts.mount_at(path)
            assert top is not None
            chosen, skipped = volatile.normal_keeps(keep)
            if skipped:
                log.info("%s: keep %s is inside another kept directory", path, ", ".join(skipped))
            for name in chosen:
                volatile.bind_keep(
                    name,
                    disk,
                    path,
                    top.mount_id,
                    created=lambda rel: log.info(
                        "%s: made %s on disk (a keep directory that did not exist)", path, rel
                    ),
                )
        except BaseException as exc:
            for step in reversed(undo):
                try:
                    step()
                except Exception as undo_exc:
                    log.error("rolling back the pin of %s: %s", path, undo_exc)
            with self.m.lock:
                self.m.pins.pop(path, None)
            self.m.save_state()
            if not os.path.ismount(self.m.disk(pid)):
                shutil.rmtree(self.m.base(pid), ignore_errors=True)
                shutil.rmtree(self.m.journal(pid), ignore_errors=True)
            if isinstance(exc, PinRefused):
                raise
            if isinstance(exc, (OSError, volatile.KeepError)):
                raise PinRefused(f"cannot pin {path}: {exc}") from exc
            raise
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        self.m.set_state(pin, "pinned")
        return pin

    def unmount(self, pin: Pin) -> None:
        """Unmount the keep binds (whatever is mounted inside the pin's tmpfs), then the tmpfs.
        Raises MountBusy with the keep binds put back when something is still in use."""
        top = mounts.mount_at(pin.path)
        if top is None or top.source != SOURCE_PREFIX + pin.id:
            return
        # max_age: a systemd-tmpfiles --clean that was told about this pin must find it still
        # mounted, or it would clean the directory on disk below (tmpfiles.py)
        with tmpfiles.unmount_guard(top.mountpoint, self.m.runtime_dir) as why_not:
            if why_not is not None:
                raise mounts.MountBusy(errno.EBUSY, f"{pin.path}: {why_not}", pin.path)
            inside = [e for e in mounts.mountinfo() if e.parent_id == top.mount_id]
            unmounted: list[str] = []
            try:
                for entry in reversed(inside):
                    if os.path.realpath(entry.mountpoint) != entry.mountpoint:
                        continue  # a planted symlink on the way: leave it (the tmpfs stays busy)
                    mounts.umount(entry.mountpoint)
                    unmounted.append(entry.mountpoint)
                self.m.unmount_path(pin)
                ramarea.release(ramarea.device_of_mount(top), pin.path)
            except mounts.MountError:
                if unmounted:
                    self.rebind_keeps(pin)
                raise

    def rebind_keeps(self, pin: Pin) -> None:
        top = mounts.mount_at(pin.path)
        if top is None:
            return
        for name in volatile.normal_keeps(pin.keep)[0]:
            if mounts.is_mountpoint(os.path.join(pin.path, name)):
                continue
            try:
                volatile.bind_keep(
                    name, self.m.disk(pin.id), pin.path, top.mount_id, created=lambda rel: None
                )
            except (OSError, volatile.KeepError) as exc:
                log.error("%s: could not bind keep %s again: %s", pin.path, name, exc)

    def unpin(self, pin: Pin) -> SyncRecord:
        """Unmount (nothing is written back: that is what volatile means)."""
        start, wall = time.monotonic(), time.time()
        found = holders.find_holders(
            pin.path, exclude_pids=self.m.exclude_pids(), mount_source=SOURCE_PREFIX + pin.id
        )
        if found:
            raise UnpinBusy(f"{pin.path} is in use by " + holder_list(found), found)
        self.m.set_state(pin, "draining")
        try:
            self.unmount(pin)
        except mounts.MountBusy as exc:
            self.m.set_state(pin, "pinned")
            found = holders.find_holders(
                pin.path, exclude_pids=self.m.exclude_pids(), mount_source=SOURCE_PREFIX + pin.id
            )
            raise UnpinBusy(
                f"{pin.path} is busy: " + (holder_list(found) if found else str(exc)),
                found,
            ) from exc
        except BaseException:
            self.m.set_state(pin, "pinned")
            raise
        self.m.release_staging(pin)
        return SyncRecord(wall, True, time.monotonic() - start)

    def reconcile(self, pid: str, path: str, rec: dict[str, Any]) -> str:
        top = mounts.mount_at(path)
        covered = top is not None and top.source == SOURCE_PREFIX + pid
        disk_mounted = os.path.ismount(self.m.disk(pid))
        keep = tuple(k for k in rec.get("keep") or () if isinstance(k, str))
        size = rec.get("size")
        pin = Pin.recorded(
            path,
            pid,
            "volatile",
            rec,
            state="pinned",
            origin="static",
            sync_interval=0.0,
            keep=keep,
            size=size if isinstance(size, int) else None,
        )
        if covered and disk_mounted and rec.get("state") == "pinned":
            with self.m.lock:
                self.m.pins[path] = pin
            return f"adopted {path} (volatile, {pin.origin}), pinned before a restart"
        if covered:
            self.unmount(pin)
        if disk_mounted:
            mounts.umount(self.m.disk(pid))
        shutil.rmtree(self.m.base(pid), ignore_errors=True)
        shutil.rmtree(self.m.journal(pid), ignore_errors=True)
        if not (covered or disk_mounted):
            return ""
        return f"{path}: removed a volatile pin left half made (nothing to write back)"
