"""The filesystems a fanotify group watches (filesystem marks, counted per path asked for),
and the errors of the monitor, with the test that tells "fanotify is refused here" apart from
a problem with one path.

`Marks.add` keeps an fd of the path it was given, for `open_by_handle_at`; it is a read-only
directory fd because the kernel refuses an O_PATH fd there (EBADF). An open fd keeps its
mount busy: `Marks.remove` closes it (the filesystem mark itself does not pin a mount).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import dataclass

from pyfanotify import ext

log = logging.getLogger(__name__)

_MARK_FS: int = ext.FAN_MARK_FILESYSTEM


class MonitorError(OSError):
    """The monitor cannot do what was asked; the message names the path and the reason.
    An OSError, so that callers handling failed system calls handle this too; `errno` is that
    of the failed system call when there was one (str() stays the message)."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err


# What fanotify_init fails with where fanotify is refused: a container's seccomp filter (EPERM,
# or ENOSYS from filters that pretend the call does not exist), a kernel built without fanotify
# (ENOSYS) or too old for directory handles (EINVAL). fanotify_mark: the same filters, and a
# user namespace without CAP_SYS_ADMIN over the filesystem (EPERM); its EINVAL can be about
# one path, so it is not taken for a refusal.
_INIT_REFUSED = frozenset({errno.EPERM, errno.EACCES, errno.ENOSYS, errno.EINVAL})
_MARK_REFUSED = frozenset({errno.EPERM, errno.EACCES, errno.ENOSYS})


def fanotify_refused(exc: BaseException) -> bool:
    """Does `exc` (from `Monitor()` or `add_filesystem`) say that fanotify cannot be used
    here at all, as opposed to a problem with one path?"""
    if not isinstance(exc, MonitorError):
        return False
    if ": fanotify_init: " in str(exc):
        return exc.errno in _INIT_REFUSED
    if ": open_by_handle_at: " in str(exc):  # Monitor() refuses to start without it
        return exc.errno in _MARK_REFUSED
    if ": fanotify_mark: " in str(exc):
        return exc.errno in _MARK_REFUSED
    return False


class _Statfs(ctypes.Structure):
    # struct statfs of 64-bit Linux (glibc): only f_fsid is used, the fsid that records carry.
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs)]
_fstatfs.restype = ctypes.c_int


def _fsid_of(fd: int, path: str) -> bytes:
    buf = _Statfs()
    if _fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise MonitorError(f"cannot watch {path}: statfs failed: {os.strerror(err)}")
    return bytes(buf.f_fsid)


def _mark_error(path: str, action: str, exc: OSError) -> MonitorError:
    hint = ""
    if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENODEV):
        hint = (
            " (this filesystem cannot report directory handles; overlayfs cannot: watch the"
            " filesystem that holds its upper layer instead)"
        )
    elif exc.errno == errno.EXDEV:
        hint = " (its filesystem id is not unique; events on it could not be told apart)"
    elif exc.errno == errno.EPERM:
        hint = " (fanotify needs CAP_SYS_ADMIN, and a seccomp filter that allows it)"
    elif exc.errno == errno.ENOSPC:
        hint = " (too many marks: fs.fanotify.max_user_marks)"
    return MonitorError(f"cannot {action} {path}: fanotify_mark: {exc.strerror}{hint}", exc.errno)


@dataclass
class _Filesystem:
    fsid: bytes
    dev: int
    refs: list[tuple[str, int]]  # (path given to add, its directory fd)
    mask: int


class Marks:
    """The watched filesystems of the fanotify group `ctx`, by fsid (the one records carry).
    Used from one thread."""

    def __init__(self, ctx: int) -> None:
        self._ctx = ctx
        self._filesystems: dict[bytes, _Filesystem] = {}

    def add(self, path: str, mask: int) -> None:
        """Watch the whole filesystem that holds the absolute `path` for `mask` (counted: as
        many `remove` calls as `add` calls end the watch)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise MonitorError(f"cannot watch {path}: {exc.strerror}") from exc
        try:
            fsid = _fsid_of(fd, path)
            dev = os.fstat(fd).st_dev
            known = self._filesystems.get(fsid)
            if known is not None:
                if known.dev != dev:
                    raise MonitorError(
                        f"cannot watch {path}: its filesystem id {fsid.hex()} is also that of"
                        f" the filesystem at {known.refs[0][0]}; events could not be told apart"
                    )
                if mask & ~known.mask:  # a mark's mask only grows (FAN_MARK_ADD ORs it in)
                    self._mark(ext.FAN_MARK_ADD, mask, fd, path, "watch")
                    known.mask |= mask
                known.refs.append((path, fd))
                return
            self._mark(ext.FAN_MARK_ADD, mask, fd, path, "watch")
            self._filesystems[fsid] = _Filesystem(fsid, dev, [(path, fd)], mask)
            log.debug("watching the filesystem of %s (fsid %s)", path, fsid.hex())
        except BaseException:
            os.close(fd)
            raise

    def remove(self, path: str) -> bool:
        """Undo one `add(path)` and close the fd kept for it; the last one removes the mark
        (returns True: directories of that filesystem can no longer be named)."""
        found = next(
            (
                (fs, i)
                for fs in self._filesystems.values()
                for i, (p, _) in enumerate(fs.refs)
                if p == path
            ),
            None,
        )
        if found is None:
            raise MonitorError(f"cannot stop watching {path}: it is not watched")
        fs, i = found
        fd = fs.refs[i][1]
        last = len(fs.refs) == 1
        if last:
            try:
                self._mark(ext.FAN_MARK_REMOVE, fs.mask, fd, path, "stop watching")
            except MonitorError as exc:
                # ENOENT: the kernel dropped the mark already (the filesystem went away).
                if exc.errno != errno.ENOENT:
                    raise
            del self._filesystems[fs.fsid]
            log.debug("stopped watching the filesystem of %s", path)
        del fs.refs[i]
        os.close(fd)
        return last

    def _mark(self, flags: int, mask: int, fd: int, path: str, action: str) -> None:
        try:
            ext.mark(self._ctx, flags | _MARK_FS, mask, fd, ".")
        except OSError as exc:
            raise _mark_error(path, action, exc) from exc

    def mount_fd(self, fsid: bytes) -> int | None:
        """An fd on the watched filesystem `fsid` (for open_by_handle_at), or None."""
        fs = self._filesystems.get(fsid)
        return None if fs is None else fs.refs[0][1]

    def watched(self) -> list[str]:
        """The paths given to `add` that are still in effect."""
        return [p for fs in self._filesystems.values() for p, _ in fs.refs]

    def close(self) -> None:
        """Close every kept fd (the group's fd is closed by its owner, which ends the marks)."""
        for fs in self._filesystems.values():
            for _, fd in fs.refs:
                os.close(fd)
        self._filesystems.clear()
