"""Making changes on the disk's filesystem durable, and in what order: syncfs, and where the
filesystem commits in order (ext3/ext4 with its journal) fewer syncs: data written out
(sync_file_range) and one journal commit where that takes every change made before it.

Checked on the filesystem of each path asked about; what cannot be told (an unknown type, a
superblock that cannot be read) is treated as the weaker case: every step synced on its own,
or syncfs.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterable

from rampiped import osutil
from rampiped.mounts import MountError, _errno_text, mountinfo


def commits_in_order(path: str) -> bool:
    """Whether the filesystem holding `path` makes its changes durable in the order they were
    made, each commit whole or not at all: ext3 or ext4 with its journal (jbd2), the one this
    is tested on. There a power cut leaves the state after some commit, so steps that only
    have to stay in order (link aside, then rename; a tail, then others) need no fsync each:
    one sync where one step must be durable before the next is made. Elsewhere (vfat, ext4
    without a journal, and xfs or btrfs, which are not tested so) False: every step is synced
    on its own."""
    try:
        if _fs_type_of_dev(os.stat(path).st_dev) not in ("ext3", "ext4"):
            return False
        name = _block_name(path)
        # jbd2 names a journal after its device and the journal's inode: loop0-8, sda1-8
        return any(e.rpartition("-")[0] == name for e in os.listdir("/proc/fs/jbd2"))
    except (OSError, MountError):
        return False


def _fs_type_of_dev(dev: int) -> str | None:
    """The type of the filesystem whose device number is `dev`, from any mount of it: also
    for a path that no mount table line leads to, such as /proc/self/fd/N of a directory in a
    private copy of a mount (open_tree), which the write-back reaches the disk through."""
    return next((e.fstype for e in mountinfo() if e.dev == dev), None)


_EXT4_MAGIC = 0xEF53
_FAST_COMMIT = 0x400  # s_feature_compat: ext4 fast commits (an fsync commits one inode only)


def _block_name(path: str) -> str:
    dev = os.stat(path).st_dev
    return os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))


def fsync_commits_all(path: str) -> bool:
    """Whether an fsync on the filesystem holding `path` commits everything done before it, as
    a syncfs would, without writing the metadata home at once: ext3 or ext4 with its journal
    (`commits_in_order`), ordered or writeback data (with data=journal, writing a file out
    does not put its data on the disk), and no fast commits (which commit the fsynced inode
    only). Checked in the superblock through the device node; when it cannot be read, False.
    And Linux 6.0 or later: before, the block of a long symlink (a target over 59 bytes) was
    written through the page cache, like a file's data, where since it is journalled metadata
    (ext4_init_symlink_block), which a commit takes with the rest. Then `commit` may stand for
    `syncfs` once the data that must be durable was written out (`write_out`)."""
    if not commits_in_order(path) or kernel_version() < (6, 0):
        return False
    try:
        name = _block_name(path)
        with open(f"/proc/fs/ext4/{name}/options") as f:
            options = f.read().split()
        if "data=ordered" not in options and "data=writeback" not in options:
            return False
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            sb = os.pread(fd, 1024, 1024)
        finally:
            os.close(fd)
    except OSError:
        return False
    if len(sb) < 0x60 or int.from_bytes(sb[0x38:0x3A], "little") != _EXT4_MAGIC:
        return False
    return not int.from_bytes(sb[0x5C:0x60], "little") & _FAST_COMMIT


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel, or of `release` ("6.1.0-18-amd64"); (0, 0) when
    it cannot be read."""
    found = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


_WRITE_OUT_BATCH = 256  # files open at once while their writeback is in flight


def write_out(paths: Iterable[str]) -> None:
    """The dirty pages of each regular file at `paths` written to the device and waited for
    (no journal commit: see `commit`). The writeback of a batch of files is started first and
    then waited for, so the device gets them together rather than one file per round trip. A
    path gone meanwhile, or not a regular file (a whiteout, a fifo: not opened), is left out."""
    batch: list[tuple[str, int]] = []
    try:
        for path in paths:
            fd = _open_regular(path)
            if fd is None:
                continue
            batch.append((path, fd))
            _write_out(path, fd, wait=False)
            if len(batch) >= _WRITE_OUT_BATCH:
                _finish_batch(batch)
        _finish_batch(batch)
    finally:
        for _, fd in batch:
            os.close(fd)


def _open_regular(path: str) -> int | None:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        err = e.errno or errno.EIO
        raise MountError(err, f"cannot write out {path}: {_errno_text(err)}", path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since
        os.close(fd)
        return None
    return fd


def _write_out(path: str, fd: int, *, wait: bool) -> None:
    try:
        osutil.write_out(fd, wait=wait)
    except OSError as e:
        err = e.errno or errno.EIO
        raise MountError(err, f"cannot write out {path}: {_errno_text(err)}", path) from None


def _finish_batch(batch: list[tuple[str, int]]) -> None:
    while batch:
        path, fd = batch[-1]
        try:
            _write_out(path, fd, wait=True)
        finally:
            batch.pop()
            os.close(fd)


def commit(directory: str, dir_fd: int | None = None) -> None:
    """On a filesystem where `fsync_commits_all` holds: commit its journal with every change
    made before this call. The times of `directory` (one of rampiped's own, or the top of a
    pinned directory on disk, whose times the write-back sets anyway; relative to `dir_fd` when
    given) are set again to what they are, which puts its inode in the running transaction, and
    an fsync of it commits that transaction and each one before it. Data is durable only where
    it was written out before (`write_out`, an fsync, or `syncfs`); the metadata stays in the
    journal until the kernel writes it home, merged with the next changes, where `syncfs` would
    write it at once."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        err = e.errno or errno.EIO
        raise MountError(
            err, f"cannot commit the filesystem of {directory}: {_errno_text(err)}", directory
        ) from None


def syncfs(path: str) -> None:
    """Write out every dirty page and inode of the filesystem that holds `path` (syncfs(2))."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        osutil.syncfs(fd)
    except OSError as e:
        err = e.errno or errno.EIO  # always set by osutil.syncfs
        raise MountError(
            err, f"cannot sync the filesystem of {path}: {_errno_text(err)}", path
        ) from None
    finally:
        os.close(fd)


def settle(path: str, files: Callable[[], Iterable[str]]) -> None:
    """Make the data of the regular `files` (asked for only when needed) on the filesystem of
    `path` reach the disk before any change made after this call (the rename that shows them).
    Where one journal commit takes everything before it (`fsync_commits_all`) they are written
    out: on the device before any later commit, which takes the metadata made so far with it,
    in order. Elsewhere syncfs: everything durable now. Raises MountError."""
    if fsync_commits_all(path):
        write_out(files())
    else:
        syncfs(path)


def sync(path: str) -> None:
    """Make every change made so far on the filesystem of `path` (a directory of rampiped's
    own, or the top of a pinned directory on disk: see `commit`) durable, where the data was
    written out or fsynced before: one journal commit where that takes everything, else
    syncfs. Raises MountError."""
    if fsync_commits_all(path):
        commit(path)
    else:
        syncfs(path)


def write_json(path: str, doc: object, *, commit: bool = True, written_out: bool = True) -> None:
    """osutil.write_json_atomic, with one journal commit where that takes every change before
    it (`fsync_commits_all`: the file written out, then the directory's fsync), else two; not
    even that when not `commit`, nor the write-out when not `written_out` (see `write_at`)."""
    directory, name = os.path.split(path)
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_at(
            dir_fd,
            name,
            osutil.json_bytes(doc),
            mode=0o666,
            commit=commit,
            written_out=written_out,
        )
    finally:
        os.close(dir_fd)


def write_at(
    dir_fd: int,
    name: str,
    data: bytes,
    *,
    tmp: str | None = None,
    mode: int,
    commit: bool = True,
    written_out: bool = True,
) -> None:
    """osutil.write_atomic_at, with one journal commit where that takes every change before
    it (see `write_json`); not even that when not `commit` (the caller commits later: there
    only, elsewhere the file and the directory are synced as always), and without the data's
    write-out when not `written_out` either (osutil.write_atomic_at: a power cut may leave
    the name empty)."""
    ordered = fsync_commits_all(f"/proc/self/fd/{dir_fd}")
    osutil.write_atomic_at(
        dir_fd,
        name,
        data,
        tmp=tmp,
        mode=mode,
        ordered=ordered,
        commit=commit,
        written_out=written_out,
    )
