"""A pin's RAM area (`<runtime_dir>/pins/<id>/ram`): where its overlay upper and work, or its
copy, live; a volatile pin's is mounted over the directory itself (`mount_over`).
`ram.backend` says what it is:

- tmpfs: a tmpfs of the pin's size (the default).
- zram: a compressed RAM block device of the pin's own (hot_add through
  /sys/class/zram-control), compressed with `ram.compression`, with an ext4 filesystem on it.

Full is ENOSPC, never EIO. A zram device that refuses a page (at its `mem_limit`) fails the
page cache's write-back of data whose write(2) has already returned: the filesystem sees an
I/O error, the data is gone, and a filesystem mounted errors=remount-ro goes read-only (the
known failure of zram-backed RAM disks elsewhere). So the device is given no memory limit, and
the filesystem is what fills: its data blocks are the pin's size, like the tmpfs's, so that a
write that does not fit fails at once with ENOSPC for that writer. Measured: an ext4 filled with
random (incompressible) data holds `mem_used_total` at 1.003 times what it stores, so a zram
area never takes more RAM than the tmpfs of the same size would; compressible data takes less,
which is what the budget then counts (mm_stat's mem_used_total: `Usage.counted`). Deleted data
gives its memory back: the filesystem is mounted with `discard`, which frees the device's pages
at once.

The mount carries the pin's source name (`rampiped-<id>`) like every mount rampiped makes, so
that adoption after a crash, holder searches and unmounts recognise it unchanged: the source
of a block filesystem is the path that mount(2) was given, so the device is mounted through a
symlink of that name, looked up relative to a working directory that only the mounting
thread has (unshare(CLONE_FS)). Its copies (a copy pin's bind) show the same name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rampiped import mounts, volatile
from rampiped.engine import format_bytes

if TYPE_CHECKING:
    from rampiped import config

log = logging.getLogger("rampiped")


FSTYPES = ("tmpfs", "ext4")  # what a RAM area's mount is, by backend
ZRAM_CONTROL = "/sys/class/zram-control"
_CLONE_FS = 0x00000200
# ext4 without a journal (a RAM area does not survive a power cut anyway), 4 KiB blocks and
# 256-byte inodes (nanosecond change times, which checkpoints compare, whatever the size),
# one inode per 4 KiB like tmpfs's generous limit, no reserved blocks (rampiped's writers are
# often root). A small filesystem would otherwise get 1 KiB blocks and 128-byte inodes.
MKFS = ("mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-i", "4096", "-m", "0")
MKFS_OPTIONS = ("-O", "^has_journal", "-E", "nodiscard,lazy_itable_init=0")
# discard: deleted data gives its memory back; errors=continue: never read-only
MOUNT_OPTIONS = "discard,errors=continue"
# the inode tables take 1/16 of the device (256 bytes per 4 KiB); the device is that much
# larger than the pin's size so that the data blocks are the size (the tables cost no memory:
# zram keeps a page of zeros as a flag)
INODE_SHARE = 16
EXT4_ROOT_INO = 2
LABEL_PREFIX = "rp-"  # + the pin's id: the label of a RAM area's ext4 (see reclaim)
_PIN_ID = re.compile(r"[0-9a-f]{12}")
# below the default high watermark (0.9) and any sensible one: see Usage.counted
AREA_FULL = 0.75
RESET_WAIT, RESET_POLL = 2.0, 0.01  # a device just unmounted may be closed a moment later

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True)
class Backend:
    name: str = "tmpfs"
    compression: str = "lz4"


TMPFS = Backend()


def backend_of(ram: config.RamConfig) -> Backend:
    return Backend(ram.backend, ram.compression)


@dataclass(frozen=True)
class Usage:
    """What a RAM area holds: `stored` bytes of files, in `ram` bytes of memory."""

    stored: int
    ram: int
    backend: str = "tmpfs"

    def counted(self, ram_limit: int) -> int:
        """What the RAM budget counts for this area: the memory it takes, until its files alone
        reach AREA_FULL of `ram_limit`; from there what they store, so that the engine evicts
        it when it is as full as a tmpfs pin it would evict (a zram area holds as many bytes
        as a tmpfs one: without this, well compressed data would fill the filesystem long
        before the memory reached the high watermark, and the writers would get ENOSPC)."""
        if self.backend == "zram" and self.stored >= ram_limit * AREA_FULL:
            return max(self.ram, self.stored)
        return self.ram

    @property
    def ratio(self) -> float:
        """RAM used per stored byte (1.0 for tmpfs; lower the better the data compresses)."""
        return round(self.ram / self.stored, 3) if self.stored else 1.0


def status_fields(usage: Usage) -> dict[str, object]:
    """A pin's fields in `rampipectl status --json` beside its `ram_bytes`."""
    return {
        "ram_backend": usage.backend,
        "stored_bytes": usage.stored,
        "ram_per_stored_byte": usage.ratio,
    }


def status_text(usages: list[Usage]) -> str:
    """For the STATUS line: what compressed pins store, when there are any."""
    zram = [u for u in usages if u.backend == "zram"]
    if not zram:
        return ""
    stored, ram = sum(u.stored for u in usages), sum(u.ram for u in usages)
    return f" ({format_bytes(stored)} stored, {Usage(stored, ram).ratio:.2f} RAM per byte)"


class ZramError(OSError):
    """A zram device could not be set up or released; the message names it and why."""


# -- the devices ------------------------------------------------------------------------------


def _sys(n: int, attr: str) -> str:
    return f"/sys/block/zram{n}/{attr}"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise ZramError(
            exc.errno or errno.EIO, f"cannot write {value!r} to {path}: {exc}"
        ) from None


def hot_add() -> int:
    """A new zram device; its number."""
    try:
        return int(_read(os.path.join(ZRAM_CONTROL, "hot_add")))
    except OSError as exc:
        raise ZramError(
            exc.errno or errno.EIO, f"cannot add a zram device ({ZRAM_CONTROL}/hot_add): {exc}"
        ) from None


def free(n: int) -> None:
    """Reset zram device `n` (its memory is freed) and remove it. A device still open (a mount
    elsewhere) refuses the reset with EBUSY: raises, the device and its data stay."""
    deadline = time.monotonic() + RESET_WAIT
    while True:
        try:
            _write(_sys(n, "reset"), "1")
            break
        except ZramError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
            time.sleep(RESET_POLL)
    _write(os.path.join(ZRAM_CONTROL, "hot_remove"), str(n))


def algorithms(n: int) -> list[str]:
    """The compressors device `n` offers (comp_algorithm lists them, the chosen one in [])."""
    return [a.strip("[]") for a in _read(_sys(n, "comp_algorithm")).split()]


def device_of(path: str) -> int | None:
    """The number of the zram device whose filesystem holds `path`, or None (tmpfs)."""
    try:
        return _zram_number(os.stat(path).st_dev)
    except OSError:
        return None


def _zram_number(dev: int) -> int | None:
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None  # an anonymous device: tmpfs, overlay
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{major}:{minor}"))
    return int(name[4:]) if name.startswith("zram") and name[4:].isdigit() else None


def mm_stat(n: int) -> dict[str, int]:
    """Device `n`'s memory: orig_data_size (stored), compr_data_size, mem_used_total (what
    the memory holds: the compressed data and the allocator's overhead)."""
    fields = ("orig_data_size", "compr_data_size", "mem_used_total")
    values = _read(_sys(n, "mm_stat")).split()
    return {name: int(v) for name, v in zip(fields, values[:3], strict=True)}


# -- start-up check ---------------------------------------------------------------------------


def check(backend: Backend) -> str | None:
    """Why `backend` cannot be used on this machine (what to do about it), or None."""
    if backend.name != "zram":
        return None
    what = f"ram.backend is zram, ram.compression {backend.compression}"
    if not os.path.isdir(ZRAM_CONTROL):
        with_modprobe = shutil.which("modprobe")
        if with_modprobe:
            subprocess.run([with_modprobe, "zram"], capture_output=True, check=False, timeout=30)
    if not os.path.isdir(ZRAM_CONTROL):
        return (
            f"{what}: this kernel has no zram ({ZRAM_CONTROL} is missing after `modprobe zram`);"
            " set ram.backend: tmpfs"
        )
    if shutil.which(MKFS[0]) is None:
        return f"{what}: {MKFS[0]} is not installed (package e2fsprogs)"
    try:
        n = hot_add()
        try:
            offered = algorithms(n)
        finally:
            free(n)
    except OSError as exc:
        return f"{what}: {exc}"
    if backend.compression not in offered:
        return (
            f"{what}: this kernel's zram does not offer {backend.compression}; it offers "
            + ", ".join(offered)
        )
    return None


# -- areas ------------------------------------------------------------------------------------


def mount(target: str, *, backend: Backend, size: int, source: str) -> None:
    """A RAM area of `size` bytes on `target`, root-owned with mode 0700, carrying `source`."""
    if backend.name != "zram":
        mounts.mount_tmpfs(target, size=size, mode=0o700, uid=0, gid=0, source=source)
        return
    _zram_area(target, target, os.path.dirname(target), backend, size, source, (0o700, 0, 0))


def mount_over(
    dir_fd: int, path: str, *, backend: Backend, size: int, source: str, link_dir: str
) -> None:
    """A volatile pin's RAM area on the directory `dir_fd` (at `path`), with its owner and
    mode. `link_dir`: a directory of root's for the moment of the mount (see _mount_named)."""
    if backend.name != "zram":
        volatile.mount_tmpfs_at(dir_fd, path, size=size, source=source)
        return
    st = os.fstat(dir_fd)
    owner = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    _zram_area(volatile.fd_path(dir_fd), path, link_dir, backend, size, source, owner)


def _zram_area(
    target: str,
    path: str,
    link_dir: str,
    backend: Backend,
    size: int,
    source: str,
    owner: tuple[int, int, int],
) -> None:
    """A zram device with ext4 of `size` bytes of data mounted on `target` (seen at `path`),
    its root with `owner` (mode, uid, gid). Undone whole when a step fails."""
    n = hot_add()
    try:
        _write(_sys(n, "comp_algorithm"), backend.compression)  # before disksize, or refused
        blocks = -(-(size + size // INODE_SHARE) // 4096)
        _write(_sys(n, "disksize"), str(blocks * 4096))
        label = LABEL_PREFIX + source.rsplit("-", 1)[-1][:12]  # ext4 labels have 16 bytes
        argv = [*MKFS, *MKFS_OPTIONS, "-L", label, f"/dev/zram{n}"]
        res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
        if res.returncode != 0:
            raise ZramError(
                errno.EIO,
                f"`{shlex.join(argv)}` exited with {res.returncode}: {res.stderr.strip()}",
            )
        _mount_named(f"/dev/zram{n}", target, source, link_dir)
        # the new root, reached by `path` and checked to be it (a user may have swapped the
        # path for a symlink meanwhile): the root inode of ext4 on this device
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if _zram_number(st.st_dev) != n or st.st_ino != EXT4_ROOT_INO:
                raise ZramError(errno.EXDEV, f"{path} does not show the new filesystem")
            mode, uid, gid = owner
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.rmdir("lost+found", dir_fd=fd)  # the area's root holds only the pin's files
        finally:
            os.close(fd)
    except BaseException:
        try:
            if device_of(path) == n:
                mounts.umount(path)
            free(n)
        except OSError as exc:  # the first error is the one to report
            log.warning("%s: the zram device zram%d stays: %s", path, n, exc)
        raise


def _mount_named(device: str, target: str, source: str, link_dir: str) -> None:
    """Mount `device` on `target` through a symlink named `source` in `link_dir`, so that
    /proc/*/mountinfo shows `source`: in a thread of its own whose working directory is
    `link_dir`."""
    link = os.path.join(link_dir, source)
    os.symlink(device, link)
    result: dict[str, int] = {}

    def run() -> None:
        if _libc.unshare(_CLONE_FS) != 0:  # this thread's working directory only
            result["err"] = ctypes.get_errno()
            result["step"] = 1
            return
        os.chdir(link_dir)
        result["err"] = mounts._mount(
            source, target, "ext4", mounts.MS_NOSUID | mounts.MS_NODEV, MOUNT_OPTIONS
        )

    try:
        t = threading.Thread(target=run, name="ramarea-mount")
        t.start()
        t.join()
    finally:
        os.unlink(link)
    if result.get("err"):
        step = "unshare(CLONE_FS)" if result.get("step") else f"ext4 (options {MOUNT_OPTIONS})"
        raise mounts._fail(f"cannot mount {device} on {target}: {step}", result["err"], target)


def unmount(target: str) -> None:
    """Unmount the RAM area on `target`; a zram device is then reset (its memory freed) and
    removed."""
    n = device_of(target) if os.path.ismount(target) else None
    mounts.umount(target)
    release(n, target)


def release(n: int | None, where: str) -> None:
    """After the unmount of a RAM area (`where`) whose device was `n`: free it (None: tmpfs)."""
    if n is None:
        return
    try:
        free(n)
    except OSError as exc:
        log.warning("%s: the zram device zram%d stays: %s", where, n, exc)


def device_of_mount(entry: mounts.MountEntry) -> int | None:
    """The number of the zram device mounted at `entry`, or None."""
    return _zram_number(entry.dev)


def _label(n: int) -> str | None:
    """The label of the ext4 on device `n`, or None when it holds none."""
    try:
        fd = os.open(f"/dev/zram{n}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        sb = os.pread(fd, 1024, 1024)  # the superblock: magic at 0x38, volume name at 0x78
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(sb) < 0x88 or sb[0x38:0x3A] != b"\x53\xef":
        return None
    return sb[0x78:0x88].split(b"\0", 1)[0].decode("ascii", "replace")


def reclaim() -> list[str]:
    """At start: remove the zram devices of RAM areas that no mount uses any more (a crash
    between the unmount of a pin and the removal of its device, or during its set-up). A
    device still mounted, here or in another mount namespace, refuses the reset: left alone.
    Returns one line per device removed, for the log."""
    done: list[str] = []
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return done
    mounted = {e.dev for e in mounts.mountinfo()}
    for name in names:
        if not name.startswith("zram") or not name[4:].isdigit():
            continue
        n = int(name[4:])
        label = _label(n)
        try:
            dev = os.stat(f"/dev/zram{n}").st_rdev
        except OSError:
            continue
        pid = (label or "")[len(LABEL_PREFIX) :]
        if not (label or "").startswith(LABEL_PREFIX) or not _PIN_ID.fullmatch(pid):
            continue
        if dev in mounted:
            continue
        try:
            free(n)
        except OSError:
            continue  # in use: mounted elsewhere
        done.append(f"removed zram{n}, the RAM area of pin {pid} left by a crash")
    return done


def usage(path: str) -> Usage:
    """What the RAM area mounted on `path` holds, and the memory it takes."""
    try:
        st = os.statvfs(path)
    except OSError:
        return Usage(0, 0)
    stored = (st.f_blocks - st.f_bfree) * st.f_frsize
    n = device_of(path)
    if n is None:
        return Usage(stored, stored)
    try:
        mem = mm_stat(n)["mem_used_total"]
    except (OSError, KeyError, ValueError):
        mem = stored
    return Usage(stored, mem, "zram")
