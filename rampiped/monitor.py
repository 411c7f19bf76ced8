"""Write events per directory, from fanotify, read by one thread of the daemon.

The kernel reports each change as a record naming the directory (by file handle) and the entry
that changed. A daemon thread reads the fanotify fd with large reads and adds each record to a
counter keyed by its directory handle; the main loop wakes on `fileno()`, calls `drain()`, and
gets a `Batch`: absolute directory path -> number of write events since the last drain. Handles
become paths only there, once per directory per drain (`open_by_handle_at` + the fd's link in
/proc), through a small cache.

What counts: create, delete, rename (from and to), modify, close after writing and attribute
changes (chmod, chown, utimes, xattrs: they dirty inodes on disk like any other write; DESIGN
§3 lists the first five). The kernel merges a record into a queued one for the same directory,
name and process, joining their kinds; one record therefore stands for as many events as it
has kinds (create + write + close of a new file is 3, whether the reader saw one merged record
or three). Repeats of a kind that merged away are not counted: a file appended to 1000 times
while the reader was busy counts as one modify. While events come, the reader reads every 5 ms
(`coalesce`), so one file written without pause counts up to about 200 modify events a second,
while writes spread over many files count one each.

Kernel facts this relies on, checked on Linux 6.18 (tests/system/test_monitor.py):
- Filesystem marks with directory handles (FAN_REPORT_DFID_NAME) work on ext4 and tmpfs. They
  are refused on overlayfs (EOPNOTSUPP: its handles cannot be decoded), and writes through an
  overlay do not reach a mark on the filesystem of its lower layer. They do reach a mark on the
  filesystem that holds the upper layer (the runtime tmpfs), attributed to the directory in
  the upper layer: to see writes into a pinned directory, watch the upper layer's filesystem
  and map upper paths back to the pin. Copy-ups add events of their own there (in the upper
  directories and in the overlay's work directory, which is not anyone's load).
- The queue is bounded (fs.fanotify.max_queued_events, 16384 by default). When it is full the
  kernel drops events and queues one overflow record, counted in `Batch.lost`; a lost event
  means some directory was busier than the counts say, so callers must treat `lost` as load.
- Records carry the process id (thread group) that caused them. The daemon's own writes (its
  rsync and copies) must not look like load: `ignore_pid` covers a process, its descendants and
  its process group, and the monitor's own process is always ignored (not its children). A
  descendant is recognised through /proc when its first record is read; one that has exited
  by then (a helper living for less than a read interval) is counted.
- `add_filesystem` keeps an fd of the path it was given, for `open_by_handle_at`; it is a
  read-only directory fd because the kernel refuses an O_PATH fd there (EBADF). An open fd
  keeps its mount busy: call `remove_filesystem` before unmounting; after that the
  monitor holds nothing on that mount (the filesystem mark itself does not pin a mount).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import math
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyfanotify import ext

log = logging.getLogger(__name__)

FAN_MODIFY: int = ext.FAN_MODIFY
FAN_ATTRIB: int = ext.FAN_ATTRIB
FAN_CLOSE_WRITE: int = ext.FAN_CLOSE_WRITE
FAN_CREATE: int = ext.FAN_CREATE
FAN_DELETE: int = ext.FAN_DELETE
FAN_MOVED_FROM: int = ext.FAN_MOVED_FROM
FAN_MOVED_TO: int = ext.FAN_MOVED_TO
FAN_ONDIR: int = ext.FAN_ONDIR
FAN_Q_OVERFLOW: int = ext.FAN_Q_OVERFLOW

WRITE_EVENTS = (
    FAN_MODIFY
    | FAN_CLOSE_WRITE
    | FAN_CREATE
    | FAN_DELETE
    | FAN_MOVED_FROM
    | FAN_MOVED_TO
    | FAN_ATTRIB
)
MARK_MASK = WRITE_EVENTS | FAN_ONDIR  # ONDIR: directories created, removed and renamed count too
# Without FAN_MODIFY: the kernel builds and merges an event for every write(2) on a marked
# filesystem, whether or not the reader asks for it often; measured on tmpfs, 4k writes with
# fsync ran at 0.40 of their unwatched speed with FAN_MODIFY in the mask and at 1.00 without.
# The RAM side of a pin is watched so: closes after writing, creations, deletions, renames and
# attribute changes still show how busy it is, at no cost to the writes that were moved to RAM.
QUIET_MARK_MASK = MARK_MASK & ~FAN_MODIFY

_INIT_FLAGS: int = (
    ext.FAN_CLASS_NOTIF | ext.FAN_REPORT_DFID_NAME | ext.FAN_CLOEXEC | ext.FAN_NONBLOCK
)
_INIT_O_FLAGS: int = os.O_RDONLY | os.O_LARGEFILE | ext.O_CLOEXEC
_MARK_FS: int = ext.FAN_MARK_FILESYSTEM
_METADATA_VERSION: int = ext.FANOTIFY_METADATA_VERSION

# struct fanotify_event_metadata (24 bytes: event_len u32, vers u8, reserved u8,
# metadata_len u16, mask u64, fd s32, pid s32) followed by the first info record's header
# (info_type u8, pad u8, len u16), fsid (2 x s32) and struct file_handle's handle_bytes u32.
# One unpack per record gives what the hot loop needs: length, kinds, pid, handle size.
_META_LEN = 24
_RECORD = struct.Struct("=I4xQ4xi4x8xI")  # event_len, mask, pid, handle_bytes
_META = struct.Struct("=IBxHQii")  # event_len, vers, metadata_len, mask, fd, pid
_INFO_HEADER = struct.Struct("=BxH")  # info_type, len
# Where the directory key starts in a record: fsid, then the file_handle (handle_bytes,
# handle_type, f_handle). The key is those bytes as they are; key[8:] is a ready
# struct file_handle for open_by_handle_at.
_KEY_START = _META_LEN + 4
_KEY_FIXED = 16  # fsid 8 + handle_bytes 4 + handle_type 4
# FAN_EVENT_INFO_TYPE_FID, _DFID_NAME, _DFID: the same fsid + file_handle layout.
_INFO_TYPES = (1, 2, 3)

_READ_SIZE = 1 << 20
_WAKE_INTERVAL = 0.1  # at most ~10 wake-ups of the main loop per second under load
_COALESCE = 0.005  # pause after a read with data: fewer, larger reads; far below queue-fill time
_CACHE_TTL = 5.0  # directories get renamed: a cached path is trusted this long
_CACHE_MAX = 10_000
_VERDICTS_MAX = 10_000
_MAX_ANCESTRY = 64


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


@dataclass(frozen=True)
class Batch:
    """What happened since the last `drain()`.

    `counts`: absolute directory path -> write events in it. `events`: all counted events
    (those in `counts` plus `unresolved`). `lost`: queue overflows the kernel reported (each
    stands for an unknown number of dropped events). `ignored`: events caused by ignored
    processes (not in `events`). `unresolved`: events whose directory could not be named (it
    was removed, or its filesystem is no longer watched)."""

    counts: dict[str, int] = field(default_factory=dict)
    events: int = 0
    lost: int = 0
    ignored: int = 0
    unresolved: int = 0


@dataclass
class _Filesystem:
    fsid: bytes
    dev: int
    refs: list[tuple[str, int]]  # (path given to add_filesystem, its directory fd)
    mask: int = MARK_MASK


_libc = ctypes.CDLL(None, use_errno=True)
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


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


class Monitor:
    """Counts write events per directory on whole filesystems.

    Use from one thread (the main loop): `add_filesystem`, `remove_filesystem`, `drain`,
    `ignore_pid`, `unignore_pid`, `stop`. The reader is a daemon thread started by `start()`.
    """

    available = True

    def __init__(
        self,
        *,
        wake_interval: float = _WAKE_INTERVAL,
        coalesce: float = _COALESCE,
        cache_ttl: float = _CACHE_TTL,
        cache_max: int = _CACHE_MAX,
        read_size: int = _READ_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wake_interval = wake_interval
        self._coalesce = coalesce
        self._cache_ttl = cache_ttl
        self._cache_max = cache_max
        self._read_size = read_size
        self._clock = clock
        self._own_pid = os.getpid()

        self._ctx: int = ext.create()
        try:
            self._fan_fd: int = ext.init(self._ctx, _INIT_FLAGS, _INIT_O_FLAGS)
        except OSError as exc:
            raise MonitorError(
                f"cannot start the fanotify monitor: fanotify_init: {exc.strerror}", exc.errno
            ) from exc
        # Events name directories by handle, opened with open_by_handle_at; a container's
        # filter may refuse that call (LXC's default policy does) while allowing fanotify, which
        # would leave every event unresolved. Asked with a bad fd: EBADF where it is allowed.
        if _open_by_handle_at(-1, None, 0) < 0:
            err = ctypes.get_errno()
            if err in (errno.EPERM, errno.EACCES, errno.ENOSYS):
                os.close(self._fan_fd)
                raise MonitorError(
                    f"cannot start the fanotify monitor: open_by_handle_at: {os.strerror(err)}",
                    err,
                )
        # Two eventfds: `_wake_fd` is the main loop's (readable: something to drain),
        # `_ctl_fd` wakes the reader thread for stop/pause.
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ctl_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

        self._lock = threading.Lock()
        # Shared with the reader thread, under _lock:
        self._agg: collections.defaultdict[bytes, int] = collections.defaultdict(int)
        self._pending_lost = 0
        self._pending_ignored = 0
        self._signalled = False
        self._ignored_pids: dict[int, float] = {}  # pid -> ignored until (monotonic; inf)
        self._verdicts: dict[int, bool] = {}  # pid -> ignored?, reset on every change
        self._next_expiry = math.inf  # earliest end of an unignore_pid grace period
        self._totals = {"events": 0, "lost": 0, "ignored": 0, "records": 0, "reads": 0}
        self._error: BaseException | None = None

        # Thread control.
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pause_requested = False
        self._paused = threading.Event()
        self._resume = threading.Event()
        self._closed = False

        # Owned by the calling thread.
        self._filesystems: dict[bytes, _Filesystem] = {}
        self._cache: dict[bytes, str] = {}
        self._cache_since = clock()
        self._unresolved_total = 0
        self._batches = 0

    # ----------------------------------------------------------------- filesystems

    def add_filesystem(self, path: str, *, modify: bool = True) -> None:
        """Watch the whole filesystem that holds `path` (counted: as many `remove_filesystem`
        calls as `add_filesystem` calls end the watch). `modify=False` leaves every write(2)
        out (QUIET_MARK_MASK): for the RAM side of pins, where it would cost the most."""
        mask = MARK_MASK if modify else QUIET_MARK_MASK
        self._check_open()
        path = os.path.abspath(path)
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
                    try:
                        ext.mark(self._ctx, ext.FAN_MARK_ADD | _MARK_FS, mask, fd, ".")
                    except OSError as exc:
                        raise _mark_error(path, "watch", exc) from exc
                    known.mask |= mask
                known.refs.append((path, fd))
                return
            try:
                ext.mark(self._ctx, ext.FAN_MARK_ADD | _MARK_FS, mask, fd, ".")
            except OSError as exc:
                raise _mark_error(path, "watch", exc) from exc
            self._filesystems[fsid] = _Filesystem(fsid, dev, [(path, fd)], mask)
            log.debug("watching the filesystem of %s (fsid %s)", path, fsid.hex())
        except BaseException:
            os.close(fd)
            raise

    def remove_filesystem(self, path: str) -> None:
        """Undo one `add_filesystem(path)`; the last one removes the mark. Closes the fd kept
        for `path` so that its mount can be unmounted."""
        self._check_open()
        path = os.path.abspath(path)
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
        if len(fs.refs) == 1:
            try:
                ext.mark(self._ctx, ext.FAN_MARK_REMOVE | _MARK_FS, fs.mask, fd, ".")
            except OSError as exc:
                # ENOENT: the kernel dropped the mark already (the filesystem went away).
                if exc.errno != errno.ENOENT:
                    raise _mark_error(path, "stop watching", exc) from exc
            del self._filesystems[fs.fsid]
            self._cache.clear()
            log.debug("stopped watching the filesystem of %s", path)
        del fs.refs[i]
        os.close(fd)

    def watched(self) -> list[str]:
        """The paths given to `add_filesystem` that are still in effect."""
        return [p for fs in self._filesystems.values() for p, _ in fs.refs]

    # ----------------------------------------------------------------- pids

    def ignore_pid(self, pid: int) -> None:
        """Do not count events caused by `pid`, its descendants or its process group (the
        daemon's own rsync forks helpers)."""
        with self._lock:
            self._ignored_pids[pid] = math.inf
            self._verdicts.clear()

    def unignore_pid(self, pid: int, after: float = 5.0) -> None:
        """Count `pid` again `after` seconds from now: its last events are read later than
        they happen."""
        with self._lock:
            if pid in self._ignored_pids:
                until = self._clock() + after
                self._ignored_pids[pid] = until
                self._next_expiry = min(self._next_expiry, until)

    # ----------------------------------------------------------------- thread

    def start(self) -> None:
        self._check_open()
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="rampiped-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the reader, close every fd; idempotent."""
        if self._closed:
            return
        self._stopping = True
        self._resume.set()
        if self._thread is not None:
            os.eventfd_write(self._ctl_fd, 1)
            self._thread.join()
        self._closed = True
        for fs in self._filesystems.values():
            for _, fd in fs.refs:
                os.close(fd)
        self._filesystems.clear()
        for fd in (self._fan_fd, self._wake_fd, self._ctl_fd):
            os.close(fd)

    def __enter__(self) -> Monitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pause(self) -> None:
        """Stop reading the kernel queue until `resume()` (tests: let the queue overflow)."""
        if self._thread is None:
            return
        self._resume.clear()
        self._paused.clear()
        self._pause_requested = True
        os.eventfd_write(self._ctl_fd, 1)
        while not self._paused.wait(0.1):
            if not self._thread.is_alive():
                return  # it stopped on an error; drain() reports it

    def resume(self) -> None:
        self._pause_requested = False
        self._resume.set()

    def fileno(self) -> int:
        """Readable when `drain()` has something: at most every `wake_interval` seconds, and
        right after the first event that follows a drain."""
        return self._wake_fd

    # ----------------------------------------------------------------- results

    def drain(self) -> Batch:
        """Take what was counted since the last call and name the directories."""
        self._check_open()
        with self._lock:
            agg = self._agg
            self._agg = collections.defaultdict(int)
            lost, self._pending_lost = self._pending_lost, 0
            ignored, self._pending_ignored = self._pending_ignored, 0
            self._signalled = False
            try:
                os.eventfd_read(self._wake_fd)
            except BlockingIOError:
                pass
            error = self._error
        if error is not None:
            raise MonitorError(f"the fanotify reader stopped: {error}") from error

        now = self._clock()
        if now - self._cache_since > self._cache_ttl or len(self._cache) > self._cache_max:
            self._cache.clear()
            self._cache_since = now
        counts: dict[str, int] = {}
        events = unresolved = 0
        cache = self._cache
        for key, n in agg.items():
            events += n
            path = cache.get(key)
            if path is None:
                path = self._resolve(key)
                if path is None:
                    unresolved += n
                    continue
                cache[key] = path
            counts[path] = counts.get(path, 0) + n
        self._unresolved_total += unresolved
        self._batches += 1
        return Batch(counts, events, lost, ignored, unresolved)

    def stats(self) -> dict[str, int]:
        """Totals since creation: events (counted), lost, ignored, unresolved, records (as
        read, after the kernel's merging), reads, batches (drains)."""
        with self._lock:
            out = dict(self._totals)
        out["unresolved"] = self._unresolved_total
        out["batches"] = self._batches
        return out

    # ----------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise MonitorError("the fanotify monitor was stopped")

    def _resolve(self, key: bytes) -> str | None:
        fs = self._filesystems.get(key[:8])
        if fs is None:
            return None  # its filesystem is no longer watched
        mount_fd = fs.refs[0][1]
        fd = _open_by_handle_at(mount_fd, key[8:], os.O_PATH | os.O_CLOEXEC)
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

    def _is_ignored(self, pid: int) -> bool:
        """Is `pid` ignored, a descendant of an ignored pid or in its process group? Called
        with _lock held, once per pid until the verdicts are reset."""
        ignored = self._ignored_pids
        if pid == self._own_pid or pid in ignored:
            return True
        if not ignored:
            return False
        seen = 0
        current = pid
        while current > 1 and seen < _MAX_ANCESTRY:
            try:
                with open(f"/proc/{current}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                return False  # gone before we looked: counted, we cannot tell
            # Fields after the command name (which may hold spaces and parentheses).
            fields = stat[stat.rindex(b")") + 2 :].split()
            ppid, pgrp, session = int(fields[1]), int(fields[2]), int(fields[3])
            if pgrp in ignored or session in ignored or ppid in ignored:
                return True
            current = ppid
            seen += 1
        return False

    def _expire_ignored(self, now: float) -> None:
        """End the grace periods that are over; with _lock held. Verdicts are only reset here
        and in ignore_pid: a pid's ancestry does not change to include an ignored pid without
        an ignore_pid call, so "not ignored" stays true until then (pid reuse included)."""
        for pid, until in list(self._ignored_pids.items()):
            if until <= now:
                del self._ignored_pids[pid]
        self._next_expiry = min(self._ignored_pids.values(), default=math.inf)
        self._verdicts.clear()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by the next drain()
            log.error("the fanotify reader stopped: %s", exc)
            with self._lock:
                self._error = exc
                self._wake_locked()

    def _wake_locked(self) -> None:
        if not self._signalled:
            os.eventfd_write(self._wake_fd, 1)
            self._signalled = True

    def _loop(self) -> None:
        fan_fd = self._fan_fd
        poller = select.poll()
        poller.register(fan_fd, select.POLLIN)
        poller.register(self._ctl_fd, select.POLLIN)
        clock = self._clock
        next_wake = 0.0  # earliest time of the next wake-up of the main loop
        read = os.read
        read_size = self._read_size
        while True:
            now = clock()
            timeout: float | None = None
            with self._lock:
                pending = bool(self._agg) or self._pending_lost > 0
                if pending and not self._signalled:
                    if now >= next_wake:
                        self._wake_locked()
                        next_wake = now + self._wake_interval
                    else:
                        timeout = next_wake - now
            ready = poller.poll(None if timeout is None else max(1, int(timeout * 1000) + 1))
            if self._stopping:
                return
            if any(fd == self._ctl_fd for fd, _ in ready):
                try:
                    os.eventfd_read(self._ctl_fd)
                except BlockingIOError:
                    pass
                if self._pause_requested:
                    self._paused.set()
                    self._resume.wait()
                    if self._stopping:
                        return
                    continue
            got = False
            while True:
                try:
                    data = read(fan_fd, read_size)
                except BlockingIOError:
                    break
                got = True
                self._check_format(data)
                with self._lock:
                    self._totals["reads"] += 1
                    if self._next_expiry <= clock() or len(self._verdicts) > _VERDICTS_MAX:
                        self._expire_ignored(clock())
                    self._parse(data)
                if len(data) < read_size // 2:
                    break  # the queue is (nearly) empty; do not spend a read on EAGAIN
            if got and self._coalesce > 0:
                # Let the next events gather: one read of many records costs far less than
                # many reads of one, and merging in the queue only helps.
                time.sleep(self._coalesce)

    def _parse(self, data: bytes) -> None:
        """Add the records in `data` to the counters; called with _lock held. The hot loop:
        one unpack, one slice and a few dict operations per record."""
        unpack = _RECORD.unpack_from
        agg = self._agg
        verdicts = self._verdicts
        weights = _WEIGHTS
        n = len(data)
        off = 0
        records = counted = ignored = lost = 0
        while off < n:
            try:
                event_len, mask, pid, hb = unpack(data, off)
            except struct.error:  # a short record at the end: only an overflow record is
                event_len, _vers, _ml, mask, _fd, pid = _META.unpack_from(data, off)
                hb = 0
            records += 1
            w = weights.get(mask)
            if w is None:
                if mask & FAN_Q_OVERFLOW:
                    lost += 1
                    off += event_len
                    continue
                w = _WEIGHTS[mask] = (mask & WRITE_EVENTS).bit_count()
            v = verdicts.get(pid)
            if v is None:
                v = verdicts[pid] = self._is_ignored(pid)
            if v:
                ignored += w
            elif event_len > _META_LEN:
                start = off + _KEY_START
                agg[data[start : start + _KEY_FIXED + hb]] += w
                counted += w
            off += event_len
        totals = self._totals
        totals["records"] += records
        totals["events"] += counted
        totals["ignored"] += ignored
        totals["lost"] += lost
        self._pending_ignored += ignored
        self._pending_lost += lost

    @staticmethod
    def _check_format(data: bytes) -> None:
        """The hot loop assumes the record layout of the first record; check it once a read
        (every record of a group has the same layout)."""
        event_len, vers, meta_len, _mask, _fd, _pid = _META.unpack_from(data, 0)
        if vers != _METADATA_VERSION or meta_len != _META_LEN:
            raise MonitorError(
                f"fanotify record format {vers} (metadata {meta_len} bytes) is not the"
                f" expected {_METADATA_VERSION} ({_META_LEN} bytes)"
            )
        if event_len > meta_len:
            info_type, _len = _INFO_HEADER.unpack_from(data, meta_len)
            if info_type not in _INFO_TYPES:
                raise MonitorError(f"unexpected fanotify info record type {info_type}")


# mask -> events it stands for; overflow records are never entered, so a miss checks for them.
_WEIGHTS: dict[int, int] = {}


class DisabledMonitor:
    """Stands in for `Monitor` where fanotify is refused (`reason` says how): it watches
    nothing and never has anything to drain. The daemon runs on without adaptive pinning;
    `available` tells the two apart."""

    available = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def add_filesystem(self, path: str, *, modify: bool = True) -> None:
        raise MonitorError(f"cannot watch {path}: {self.reason}")

    def remove_filesystem(self, path: str) -> None:
        raise MonitorError(f"cannot stop watching {path}: it is not watched")

    def watched(self) -> list[str]:
        return []

    def ignore_pid(self, pid: int) -> None:
        pass

    def unignore_pid(self, pid: int, after: float = 5.0) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def drain(self) -> Batch:
        return Batch()

    def stats(self) -> dict[str, int]:
        return dict.fromkeys(
            ("events", "lost", "ignored", "records", "reads", "unresolved", "batches"), 0
        )
