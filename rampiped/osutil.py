"""Operating-system helpers that the rest of rampiped builds on: the one atomic, durable file
writer, syncfs(2) and sync_file_range(2), and the name of the kind of an entry.

A leaf: this module imports nothing from rampiped, so every other module may import it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import stat
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.syncfs.restype = ctypes.c_int
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.sync_file_range.restype = ctypes.c_int
# sync_file_range(2): start writeback of the dirty pages; and wait for any under way before,
# and for it after
_START = 2
_WRITE_AND_WAIT = 1 | 2 | 4

_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic_at(
    dir_fd: int,
    name: str,
    data: bytes,
    *,
    tmp: str | None = None,
    mode: int = 0o666,
    ordered: bool = False,
    commit: bool = True,
    written_out: bool = True,
) -> None:
    """Replace `name` in the directory `dir_fd` by a file holding `data`, atomically and
    durably: write a temporary file in the same directory (`tmp`, a name; NAME.tmp.PID unless
    given), fsync it, rename it over `name`, fsync the directory. A power cut leaves the old
    file or the new one, whole, never a mix. The temporary file is created with `mode` (less
    the umask), never through a symlink, and removed again when the write fails.

    `ordered`: the directory is on a filesystem where one journal commit takes every change
    made before it (durable.fsync_commits_all): the temporary file's data is written out
    (`write_out`) instead of fsynced, and the directory's fsync commits it with the rename:
    one journal commit instead of two. Not `commit` (with `ordered` only): not even that; the
    caller's next fsync on that filesystem commits it, in order, before what it made after.
    Not `written_out` either: the data is left to the kernel's writeback too, so a power cut
    after a commit may leave `name` empty (ext4 commits the rename, and the data has no blocks
    yet): only for a file whose readers take an empty or unreadable one for none at all."""
    tmp = tmp if tmp is not None else f"{name}.tmp.{os.getpid()}"
    fd = os.open(tmp, _TMP_FLAGS, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if ordered:
                if commit or written_out:
                    write_out(f.fileno())
            else:
                os.fsync(f.fileno())
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if commit or not ordered:
        os.fsync(dir_fd)


def write_atomic(
    path: str, data: bytes, *, tmp: str | None = None, mode: int = 0o666, ordered: bool = False
) -> None:
    """`write_atomic_at` for a path: `tmp` is a name in the directory of `path`."""
    directory, name = os.path.split(path)
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomic_at(dir_fd, name, data, tmp=tmp, mode=mode, ordered=ordered)
    finally:
        os.close(dir_fd)


def json_bytes(doc: object) -> bytes:
    """`doc` as JSON, keys sorted, indented for a person reading it."""
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def write_json_atomic(path: str, doc: object) -> None:
    """`doc` as JSON (`json_bytes`) at `path`, written with `write_atomic`: the runtime state
    (durable.write_json writes the records in a pin's journal directory)."""
    write_atomic(path, json_bytes(doc))


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object at `path` (one written by write_json_atomic); None when there is none
    or it is not one."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def syncfs(fd: int) -> None:
    """syncfs(2): write out every dirty page and inode of the filesystem that holds the open
    `fd`. It also reports writeback errors that filesystem met since `fd` was opened. Raises
    OSError with the errno."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_out(fd: int, *, wait: bool = True) -> None:
    """sync_file_range(2) over the whole file `fd`: its dirty pages written to the device and
    waited for, with the metadata that writeback changes (blocks allocated, size on disk) put in
    the filesystem's running journal transaction, which this does not commit. Not `wait`: the
    writeback only started (so that many files' writes are in flight at once; call again with
    `wait` for each). Raises OSError."""
    if _libc.sync_file_range(fd, 0, 0, _WRITE_AND_WAIT if wait else _START) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def file_kind(st: os.stat_result) -> str:
    """What an lstat result describes: dir, file, symlink, fifo, socket, whiteout (a character
    device 0:0, as overlayfs writes for a deleted name), chardev, blockdev or other."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "whiteout" if st.st_rdev == 0 else "chardev"
    if stat.S_ISBLK(mode):
        return "blockdev"
    return "other"
