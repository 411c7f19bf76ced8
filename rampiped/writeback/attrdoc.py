"""A small JSON document of the write-back kept in an attribute of its directory
(`trusted.rampiped.*`) instead of a file in it. An attribute is metadata: it is durable with
the directory's next commit, with no write-out of data first, and where one journal commit
takes every change before it in order (durable.fsync_commits_all), in order with what is done
after it. A file's content must be written out first, a write that waits behind every other
on a busy stick (about 90 ms on the benchmark's, while a reader found a file of the pin older
or a renamed directory missing). A document too large for an attribute, or a filesystem
without them, keeps its file."""

from __future__ import annotations

import errno
import json
import os

MOST = 3000  # bytes: within one ext4 block beside the directory's other attributes
_NOT_HERE = (errno.ENOTSUP, errno.ENOSPC, errno.E2BIG, errno.EPERM)


def put(dir_fd: int, name: str, doc: object) -> bool:
    """Set the attribute `name` of the directory `dir_fd` to `doc`; False when it cannot hold
    it (the caller writes its file instead)."""
    data = json.dumps(doc, sort_keys=True).encode()
    if len(data) > MOST:
        return False
    try:
        os.setxattr(dir_fd, name, data)
    except OSError as e:
        if e.errno in _NOT_HERE:
            return False
        raise
    return True


def get(dir_fd: int, name: str) -> bytes | None:
    """The document in the attribute `name` of the directory `dir_fd`, or None."""
    try:
        return os.getxattr(dir_fd, name)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise
