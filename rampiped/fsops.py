"""File operations relative to a directory fd, never following a symlink on the way."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rampiped import durable, mounts, osutil, tree
from rampiped.commands import SyncError

_T = TypeVar("_T")


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def open_dir_at(dir_fd: int, name: str) -> int:
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(dir_fd: int, name: str) -> int:
    """Remove `name` below `dir_fd`, a whole tree if it is a directory, never following a
    symlink; returns how many entries went."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return 1
    removed = 0
    fd = open_dir_at(dir_fd, name)
    # (parent fd, name in parent, own fd, names still to remove)
    stack: list[tuple[int, str, int, list[str]]] = [(dir_fd, name, fd, os.listdir(fd))]
    try:
        while stack:
            parent_fd, own_name, own_fd, pending = stack[-1]
            if not pending:
                stack.pop()
                os.close(own_fd)
                os.rmdir(own_name, dir_fd=parent_fd)
                removed += 1
                continue
            child = pending.pop()
            cst = os.stat(child, dir_fd=own_fd, follow_symlinks=False)
            if stat.S_ISDIR(cst.st_mode):
                child_fd = open_dir_at(own_fd, child)
                stack.append((own_fd, child, child_fd, os.listdir(child_fd)))
            else:
                os.unlink(child, dir_fd=own_fd)
                removed += 1
    finally:
        for _, _, own_fd, _ in stack:
            os.close(own_fd)
    return removed


def walk_fds(key: _T, fd: int, visit: Callable[[_T, int], Iterable[tuple[_T, int]]]) -> None:
    """Depth first from the directory descriptor `fd` (taken over): visit(key, fd) for it and
    for each (key, descriptor) of a subdirectory that a visit yields, every descriptor closed
    after its visit, or when a visit raised before it was visited."""
    stack: list[tuple[_T, int]] = [(key, fd)]
    try:
        while stack:
            key, fd = stack.pop()
            try:
                for child in visit(key, fd):
                    stack.append(child)
            finally:
                os.close(fd)
    finally:
        for _, fd in stack:
            os.close(fd)


@contextlib.contextmanager
def opened_dir(path: str) -> Iterator[int]:
    fd = os.open(path, DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def open_rel(root_fd: int, rel: str) -> int | None:
    """Open directory `rel` below root_fd without following symlinks; None when any component
    is missing or is not a real directory."""
    try:
        return walk_dirs(root_fd, rel.split("/") if rel else [])
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise


def walk_dirs(root_fd: int, parts: Iterable[str], flags: int = DIR_FLAGS) -> int:
    """A descriptor of the directory reached from root_fd through `parts`, one component at a
    time, opened with `flags` (O_NOFOLLOW in them: no symlink followed). An OSError names
    the components up to the one that failed in its `filename`."""
    fd = os.dup(root_fd)
    done: list[str] = []
    try:
        for part in parts:
            done.append(part)
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                e.filename = "/".join(done)
                raise
            os.close(fd)
            fd = nfd
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def at_rel(root_fd: int, rel: str, fn: Callable[[int, str], _T]) -> _T | None:
    """fn(parent fd, name) for the entry `rel` below root_fd, its parent reached without
    following symlinks; None when that parent is missing or not a real directory."""
    parent, _, name = rel.rpartition("/")
    pfd = open_rel(root_fd, parent)
    if pfd is None:
        return None
    try:
        return fn(pfd, name)
    finally:
        os.close(pfd)


def _make_dirs_rel(root_fd: int, rel: str) -> tuple[int, int]:
    """Open directory `rel` below root_fd, creating missing components and replacing any
    component that is not a real directory (the layer has a directory there, so the merged
    view did too). Returns (fd, entries deleted)."""
    deleted = 0
    fd = os.dup(root_fd)
    try:
        for part in rel.split("/") if rel else []:
            st = lstat_at(fd, part)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                deleted += remove_at(fd, part)
                st = None
            if st is None:
                os.mkdir(part, 0o700, dir_fd=fd)  # rsync gives it the layer's mode later
            nfd = open_dir_at(fd, part)
            os.close(fd)
            fd = nfd
        result, fd = fd, -1
        return result, deleted
    finally:
        if fd >= 0:
            os.close(fd)


def _fsync_dir(fd: int) -> None:
    os.fsync(fd)


def syncfs_checked(fd: int, path: str) -> None:
    """Flush the whole filesystem holding `fd`; it also reports earlier writeback errors."""
    try:
        osutil.syncfs(fd)
    except OSError as e:
        err = e.errno or errno.EIO  # always set by osutil.syncfs
        raise SyncError(f"syncfs on {path} failed: {os.strerror(err)} (errno {err})") from None


def settle_at(dir_fd: int, name: str, label: str, *, written: Iterable[str] = ()) -> None:
    """Make the data of the regular files below the directory `name` of `dir_fd`, and at the
    paths `written`, reach the disk before any change made after this call (the rename that
    shows them). Where one journal commit takes everything before it
    (durable.fsync_commits_all), that data is written out: on the device before any later
    commit, which takes the metadata made so far with it, in order (the caller's next fsync, a
    rename's, commits it all; the metadata then stays in the journal until the kernel writes it
    to its place, merged with later changes). Elsewhere syncfs (`syncfs_checked`): everything
    durable now. `label` names the directory in errors."""
    path = f"/proc/self/fd/{dir_fd}/{name}"

    def files() -> list[str]:
        below = [rel for rel, st in tree.walk(path) if stat.S_ISREG(st.st_mode)]
        return [*(os.path.join(path, rel) for rel in below), *written]

    try:
        durable.settle(path, files)
    except mounts.MountError as e:
        raise SyncError(f"cannot make {label} durable: {e}") from None


def ordered_at(dir_fd: int, name: str, label: str) -> None:
    """After changes of metadata only (renames, times, removals) below the directory `name` of
    `dir_fd`, whose data was durable before: make sure they reach the disk before any change
    made after this. On a filesystem that commits in order (durable.commits_in_order) nothing
    is needed, since a later commit takes them first; elsewhere syncfs (`syncfs_checked`).
    `label` names the directory in errors."""
    if durable.commits_in_order(f"/proc/self/fd/{dir_fd}/{name}"):
        return
    syncfs_checked(dir_fd, label)


def changed_since(dir_fd: int, name: str, newer_than: int) -> bool:
    """Whether `name` below `dir_fd`, or anything below it, has a ctime of `newer_than` or later
    (what _remove_older keeps)."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return False
    if st.st_ctime_ns >= newer_than:
        return True
    if not stat.S_ISDIR(st.st_mode):
        return False
    fd = open_dir_at(dir_fd, name)
    try:
        return any(changed_since(fd, child, newer_than) for child in os.listdir(fd))
    finally:
        os.close(fd)


# A write cut short (kill -9 in the middle of it, a power cut before its pages all reached the
# disk) ends at a page boundary of the file. A partial match shorter than this is more likely
# another writer's bytes that start like ours (a timestamp) than our write cut short.
_PAGE = 4096


def common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i + _PAGE <= n and a[i : i + _PAGE] == b[i : i + _PAGE]:
        i += _PAGE
    while i < n and a[i] == b[i]:
        i += 1
    return i


def read_at(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while length > 0 and (chunk := os.pread(fd, min(length, 1 << 20), offset)):
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def copy_dir_attrs(
    src_fd: int, dst_fd: int, *, skip: Iterable[str] = (), times: tuple[int, int] | None = None
) -> None:
    """Give the directory `dst_fd` the owner, mode and extended attributes (ACLs among them)
    of `src_fd`: its own attributes that `src_fd` lacks are removed, those named in `skip`
    are neither copied nor kept. With `times` (atime, mtime in ns), those too."""
    st = os.fstat(src_fd)
    os.fchown(dst_fd, st.st_uid, st.st_gid)
    left_out = set(skip)
    wanted = set(os.listxattr(src_fd)) - left_out
    for attr in set(os.listxattr(dst_fd)) - wanted:
        os.removexattr(dst_fd, attr)
    for attr in sorted(wanted):
        os.setxattr(dst_fd, attr, os.getxattr(src_fd, attr))
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    if times is not None:
        os.utime(dst_fd, ns=times)


def append_from(src_fd: int, dst_fd: int, offset: int) -> int:
    """Append src_fd's bytes from `offset` to its current end onto dst_fd; returns the count."""
    n = 0
    while chunk := os.pread(src_fd, 1 << 20, offset + n):
        view = memoryview(chunk)
        while view:
            written = os.write(dst_fd, view)
            view = view[written:]
        n += len(chunk)
    return n


def copy_attributes(src: str, fd: int) -> None:
    """Owner, mode and xattrs (ACLs included; not security labels nor overlay's) of `src`."""
    st = os.lstat(src)
    os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        if name.startswith(("security.", "trusted.overlay.")):
            continue
        os.setxattr(fd, name, os.getxattr(src, name, follow_symlinks=False))
