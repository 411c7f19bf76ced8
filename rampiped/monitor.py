"""Write events per directory, from fanotify, read by one thread of the daemon.

The kernel reports each change as a record naming the directory (by file handle) and the entry
that changed. A daemon thread reads the fanotify fd with large reads and adds each record to a
counter keyed by its directory handle; the main loop wakes on `fileno()`, calls `drain()`, and
gets a `Batch`: absolute directory path -> number of write events since the last drain. Handles
become paths only there, once per directory per drain (`open_by_handle_at` + the fd's link in
/proc), through a cache of at most 4096 handles (rampiped/monitor_handles.py).

The monitor's memory does not grow with the directories ever written: the handle cache is
bounded, and so is the count between two drains (32,768 directories: more than the kernel's
queue holds, met only when the main loop stalls; the records of further directories are left
out and counted in `Batch.lost`, which is treated as load like the kernel's own overflow).
The parts: rampiped/monitor_records.py reads the records, rampiped/monitor_marks.py keeps the
filesystem marks, rampiped/monitor_handles.py names directories; this module runs the reader
thread and hands out batches.

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
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyfanotify import ext

from rampiped import monitor_handles
from rampiped.monitor_handles import HandleCache
from rampiped.monitor_marks import Marks, MonitorError, fanotify_refused
from rampiped.monitor_records import (
    FAN_ATTRIB,
    FAN_CLOSE_WRITE,
    FAN_CREATE,
    FAN_DELETE,
    FAN_MODIFY,
    FAN_MOVED_FROM,
    FAN_MOVED_TO,
    FAN_ONDIR,
    FAN_Q_OVERFLOW,
    INIT_FLAGS,
    INIT_O_FLAGS,
    MARK_MASK,
    QUIET_MARK_MASK,
    WRITE_EVENTS,
    check_format,
    count_records,
)

__all__ = [
    "FAN_ATTRIB",
    "FAN_CLOSE_WRITE",
    "FAN_CREATE",
    "FAN_DELETE",
    "FAN_MODIFY",
    "FAN_MOVED_FROM",
    "FAN_MOVED_TO",
    "FAN_ONDIR",
    "FAN_Q_OVERFLOW",
    "MARK_MASK",
    "QUIET_MARK_MASK",
    "WRITE_EVENTS",
    "Batch",
    "DisabledMonitor",
    "Monitor",
    "MonitorError",
    "fanotify_refused",
]

log = logging.getLogger(__name__)

_READ_SIZE = 1 << 20
_WAKE_INTERVAL = 0.1  # at most ~10 wake-ups of the main loop per second under load
_COALESCE = 0.005  # pause after a read with data: fewer, larger reads; far below queue-fill time
# Directories counted between two drains: twice the kernel's default queue (16384 records),
# so only a main loop that stalls meets it; about 100 bytes each, so at most ~3.5 MiB.
_AGG_MAX = 32_768
_VERDICTS_MAX = 10_000
_MAX_ANCESTRY = 64
_RELEASE_EVERY = 10.0  # seconds between giving the heap's free pages back (monitor_handles)


@dataclass(frozen=True)
class Batch:
    """What happened since the last `drain()`.

    `counts`: absolute directory path -> write events in it. `events`: all counted events
    (those in `counts` plus `unresolved`). `lost`: queue overflows the kernel reported, and
    reads whose records of further directories were left out because the count between two
    drains was full (each stands for an unknown number of unseen events). `ignored`: events
    caused by ignored processes (not in `events`). `unresolved`: events whose directory could
    not be named (it was removed, or its filesystem is no longer watched)."""

    counts: dict[str, int] = field(default_factory=dict)
    events: int = 0
    lost: int = 0
    ignored: int = 0
    unresolved: int = 0


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
        cache_ttl: float = monitor_handles.CACHE_TTL,
        cache_max: int = monitor_handles.CACHE_MAX,
        agg_max: int = _AGG_MAX,
        read_size: int = _READ_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wake_interval = wake_interval
        self._coalesce = coalesce
        self._agg_max = agg_max
        self._read_size = read_size
        self._clock = clock
        self._own_pid = os.getpid()

        self._ctx: int = ext.create()
        try:
            self._fan_fd: int = ext.init(self._ctx, INIT_FLAGS, INIT_O_FLAGS)
        except OSError as exc:
            raise MonitorError(
                f"cannot start the fanotify monitor: fanotify_init: {exc.strerror}", exc.errno
            ) from exc
        # Events name directories by handle, opened with open_by_handle_at; a container's
        # filter may refuse that call (LXC's default policy does) while allowing fanotify, which
        # would leave every event unresolved.
        err = monitor_handles.handles_refused()
        if err is not None:
            os.close(self._fan_fd)
            raise MonitorError(
                f"cannot start the fanotify monitor: open_by_handle_at: {os.strerror(err)}", err
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
        self._marks = Marks(self._ctx)
        self._cache = HandleCache(cache_max, cache_ttl)
        self._unresolved_total = 0
        self._batches = 0
        self._next_release = clock() + _RELEASE_EVERY

    # ----------------------------------------------------------------- filesystems

    def add_filesystem(self, path: str, *, modify: bool = True) -> None:
        """Watch the whole filesystem that holds `path` (counted: as many `remove_filesystem`
        calls as `add_filesystem` calls end the watch). `modify=False` leaves every write(2)
        out (QUIET_MARK_MASK): for the RAM side of pins, where it would cost the most."""
        mask = MARK_MASK if modify else QUIET_MARK_MASK
        self._check_open()
        self._marks.add(os.path.abspath(path), mask)

    def remove_filesystem(self, path: str) -> None:
        """Undo one `add_filesystem(path)`; the last one removes the mark. Closes the fd kept
        for `path` so that its mount can be unmounted."""
        self._check_open()
        if self._marks.remove(os.path.abspath(path)):
            self._cache.clear()

    def watched(self) -> list[str]:
        """The paths given to `add_filesystem` that are still in effect."""
        return self._marks.watched()

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
        self._marks.close()
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
        counts: dict[str, int] = {}
        events = unresolved = 0
        cache = self._cache
        for key, n in agg.items():
            events += n
            path = cache.get(key, now)
            if path is None:
                mount_fd = self._marks.mount_fd(key[:8])
                # None: its filesystem is no longer watched, or the directory is gone
                path = None if mount_fd is None else monitor_handles.resolve(mount_fd, key[8:])
                if path is None:
                    unresolved += n
                    continue
                cache.put(key, path, now)
            counts[path] = counts.get(path, 0) + n
        self._unresolved_total += unresolved
        self._batches += 1
        if now >= self._next_release:
            # drain() is the one call the main loop makes several times a second, busy or not
            self._next_release = now + _RELEASE_EVERY
            monitor_handles.release_free_memory()
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
        # One buffer for every read, and each read's records copied out at their size: a new
        # 1 MiB block a read left glibc's heap fragmented. In `make bench` the daemon's peak
        # after writes in 100,000 directories (daemon_peak_rss_mb_100k_dirs) went from 57.2
        # MiB to 49.5 with this.
        read_size = self._read_size
        buf = bytearray(read_size)
        view = memoryview(buf)
        readv = os.readv
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
                    data = view[: readv(fan_fd, (buf,))].tobytes()
                except BlockingIOError:
                    break
                got = True
                check_format(data)
                with self._lock:
                    self._totals["reads"] += 1
                    if self._next_expiry <= clock() or len(self._verdicts) > _VERDICTS_MAX:
                        self._expire_ignored(clock())
                    self._count(data)
                if len(data) < read_size // 2:
                    break  # the queue is (nearly) empty; do not spend a read on EAGAIN
            if got and self._coalesce > 0:
                # Let the next events gather: one read of many records costs far less than
                # many reads of one, and merging in the queue only helps.
                time.sleep(self._coalesce)

    def _count(self, data: bytes) -> None:
        """Add the records in `data` to the counters; called with _lock held."""
        got = count_records(data, self._agg, self._verdicts, self._is_ignored, self._agg_max)
        totals = self._totals
        totals["records"] += got.records
        totals["events"] += got.counted
        totals["ignored"] += got.ignored
        totals["lost"] += got.lost
        self._pending_ignored += got.ignored
        self._pending_lost += got.lost

    def cached_handles(self) -> int:
        """Directory handles whose path is cached (at most `cache_max`)."""
        return len(self._cache)


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
