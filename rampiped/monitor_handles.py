"""Naming the directories fanotify records point at: a file handle becomes a path through
`open_by_handle_at` and the fd's link in /proc, and the answer is kept in a bounded cache.

The cache is what keeps the daemon's memory from growing with every directory ever written:
it holds at most `max_entries` handles (the least recently used one goes first) and trusts a
path for `ttl` seconds (directories get renamed). A handle that falls out is simply resolved
again the next time its directory is written.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int

# Enough for the directories a busy machine writes within the ttl; an entry (key, path,
# expiry, the ordered dict's links) takes about 350 bytes, so ~1.4 MiB at most.
CACHE_MAX = 4096
CACHE_TTL = 5.0  # directories get renamed: a cached path is trusted this long


# glibc keeps the pages of freed blocks in its heap, for the next blocks: after the daemon met
# thousands of directories at once (large dicts of them, made and dropped on every tick), they
# stay with the process long after the directories were forgotten. malloc_trim(3) gives them
# back: in `make bench` (daemon_rss_mb_100k_dirs, before the reader kept one buffer for its
# reads) 44.8 MiB after writes in 100,000 directories instead of 57. It takes under a
# millisecond when little is free, a few when much is.
_malloc_trim = getattr(_libc, "malloc_trim", None)
if _malloc_trim is not None:
    _malloc_trim.argtypes = [ctypes.c_size_t]
    _malloc_trim.restype = ctypes.c_int


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc; elsewhere nothing)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def handles_refused() -> int | None:
    """The errno with which this process is refused `open_by_handle_at` (a container's filter
    may refuse it while allowing fanotify: LXC's default policy does), or None. Asked with a
    bad fd: EBADF where the call is allowed."""
    if _open_by_handle_at(-1, None, 0) < 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES, errno.ENOSYS):
            return err
    return None


def resolve(mount_fd: int, handle: bytes) -> str | None:
    """The path of the directory `handle` (a struct file_handle) names on the filesystem of
    `mount_fd`, or None when it is gone."""
    fd = _open_by_handle_at(mount_fd, handle, os.O_PATH | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        if err != errno.ESTALE:  # ESTALE: the directory is gone; anything else is odd
            log.debug("open_by_handle_at: %s", os.strerror(err))
        return None
    try:
        if os.fstat(fd).st_nlink == 0:
            return None  # removed, still open somewhere
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    finally:
        os.close(fd)


class HandleCache:
    """Handle key -> path, at most `max_entries` of them, each trusted for `ttl` seconds after
    it was resolved. Times are arguments (monotonic seconds)."""

    __slots__ = ("_entries", "max_entries", "ttl")

    def __init__(self, max_entries: int = CACHE_MAX, ttl: float = CACHE_TTL) -> None:
        if max_entries < 1:
            raise ValueError(f"a handle cache holds at least one entry, not {max_entries}")
        self.max_entries = max_entries
        self.ttl = ttl
        # key -> (path, trusted until); oldest use first
        self._entries: collections.OrderedDict[bytes, tuple[str, float]] = collections.OrderedDict()

    def get(self, key: bytes, now: float) -> str | None:
        """The cached path of `key`, or None when it is not cached or no longer trusted."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry[1]:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, path: str, now: float) -> None:
        entries = self._entries
        entries[key] = (path, now + self.ttl)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
