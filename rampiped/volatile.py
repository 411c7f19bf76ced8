"""Volatile pins: a size-capped tmpfs over a directory whose content need not survive (/tmp,
~/.cache), with `keep` subdirectories bind-mounted from the disk so that they do.

The directories are often writable by other users (a home's .cache): every path below the pin
is walked one component at a time with O_NOFOLLOW from descriptors, and mounts are made on
/proc/self/fd/N of those descriptors, so that a symlink swapped in at any moment cannot make
root mount somewhere else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable

from rampiped import mounts

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class KeepError(Exception):
    """A keep subdirectory cannot be set up; the message names it and why."""


def open_dir(path: str) -> int:
    """The directory at `path`, which must not be a symlink itself."""
    return os.open(path, _DIR_FLAGS)


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _named(exc: mounts.MountError, fds: dict[str, str]) -> mounts.MountError:
    """The error with /proc/self/fd/N replaced by the path it stands for."""
    text = str(exc)
    for proc, real in fds.items():
        text = text.replace(proc, real)
    return mounts.MountError(exc.errno or errno.EIO, text, exc.filename)


def mount_tmpfs_at(fd: int, path: str, *, size: int, source: str) -> None:
    """A tmpfs of `size` bytes on the directory `fd` (at `path`), with its owner and mode."""
    st = os.fstat(fd)
    try:
        mounts.mount_tmpfs(
            fd_path(fd),
            size=size,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            source=source,
        )
    except mounts.MountError as exc:
        raise _named(exc, {fd_path(fd): path}) from None


def bind_fd(src_fd: int, src: str, dst_fd: int, dst: str, *, private: bool) -> None:
    try:
        mounts.bind(fd_path(src_fd), fd_path(dst_fd), private=private)
    except mounts.MountError as exc:
        raise _named(exc, {fd_path(src_fd): src, fd_path(dst_fd): dst}) from None


def normal_keeps(keep: Iterable[str]) -> tuple[list[str], list[str]]:
    """The keep names to bind, shortest first, and those left out because an ancestor of theirs
    is kept already (its bind carries them)."""
    chosen: list[str] = []
    skipped: list[str] = []
    for name in sorted(set(keep), key=lambda k: (k.count("/"), k)):
        if any(name == c or name.startswith(c + "/") for c in chosen):
            skipped.append(name)
        else:
            chosen.append(name)
    return chosen, skipped


def bind_keep(
    name: str, disk_root: str, path: str, ram_mount_id: int, created: Callable[[str], None]
) -> None:
    """Bind the subdirectory `name` of the disk (reached through `disk_root`, the private
    staging bind of the pinned directory) onto the same place in the pin's tmpfs (mounted at
    `path` as mount `ram_mount_id`). Missing directories are made on disk with the owner and
    mode of their parent (`created` is told which), and in the tmpfs with those of the disk's."""
    parts = name.split("/")
    dfd = open_dir(disk_root)
    try:
        tfd = open_dir(path)
    except OSError:
        os.close(dfd)
        raise
    try:
        if mounts.mount_id_of_fd(tfd) != ram_mount_id:
            raise KeepError(f"{path} is no longer the pin's tmpfs")
        for i, part in enumerate(parts):
            shown = "/".join(parts[: i + 1])
            parent: os.stat_result | None = None  # set when the directory is made here
            try:
                nd = os.open(part, _DIR_FLAGS, dir_fd=dfd)
            except FileNotFoundError:
                parent = os.fstat(dfd)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=dfd)
                nd = _open_child(dfd, part, f"{path}/{shown} on disk")
            except OSError as exc:
                raise KeepError(_why(exc, f"{path}/{shown} on disk", dfd, part)) from None
            # handed over before anything else can fail, so that `finally` closes it
            os.close(dfd)
            dfd = nd
            if parent is not None:
                os.fchown(dfd, parent.st_uid, parent.st_gid)
                os.fchmod(dfd, stat.S_IMODE(parent.st_mode))
                created(shown)
            st = os.fstat(dfd)
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=tfd)
            nt = _open_child(tfd, part, f"{path}/{shown} in RAM")
            os.close(tfd)
            tfd = nt
            os.fchown(tfd, st.st_uid, st.st_gid)
            os.fchmod(tfd, stat.S_IMODE(st.st_mode))
        bind_fd(dfd, f"{path}/{name} on disk", tfd, f"{path}/{name}", private=False)
    finally:
        os.close(dfd)
        os.close(tfd)


def _open_child(dir_fd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise KeepError(_why(exc, shown, dir_fd, name)) from None


def _why(exc: OSError, shown: str, dir_fd: int, name: str) -> str:
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
            return f"{shown} is a symlink: a keep directory must be a real directory"
    if exc.errno == errno.ENOTDIR:
        return f"{shown} is not a directory"
    return f"{shown}: {exc.strerror}"
