"""Files written whole: a temporary name marked as rampiped's, fsync, rename."""

from __future__ import annotations

import os
import secrets

from rampiped import durable, osutil

# Temporary names of databases being written on disk; a crash can leave one behind, and the
# next checkpoint's --delete removes it (it does not exist in RAM).
TMP_MARK = ".rampiped-tmp-"


def fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def tmp_path(path: str) -> str:
    """A fresh temporary name next to `path`, marked as rampiped's (TMP_MARK)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{TMP_MARK}{secrets.token_hex(4)}")


def write_atomic(path: str, data: bytes) -> None:
    """osutil.write_atomic by way of a temporary name marked as rampiped's (tmp_path), with one
    journal commit where that takes every change before it (durable.fsync_commits_all)."""
    ordered = durable.fsync_commits_all(os.path.dirname(path) or ".")
    osutil.write_atomic(path, data, tmp=os.path.basename(tmp_path(path)), ordered=ordered)
