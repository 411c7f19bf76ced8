"""The fanotify monitor against the real kernel: per-directory counts of writes made by other
processes, ignored processes, queue overflow, removing a filesystem, and overlays (writes seen
on the RAM filesystem of the upper layer, not on the disk below)."""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampiped.config import WatchRoot
from rampiped.monitor import Batch, Monitor, MonitorError
from rampiped.rates import Attributor, RateTable
from tests.system.helpers import LoopFs, mount_points, unmount_tree, wait_for

pytestmark = pytest.mark.system

# A writer process driven line by line over stdin; it answers "ok" after each command, so the
# test knows the writes happened. `spawn` starts a child writer (for ignored descendants) and
# `child CMD...` hands a command to it.
WRITER = r"""
import os, subprocess, sys
child = None
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "files":  # files DIR N PREFIX: create, write one byte, close N new files
        d, n, prefix = args[0], int(args[1]), args[2]
        for i in range(n):
            fd = os.open(f"{d}/{prefix}{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, b"x")
            os.close(fd)
    elif cmd == "churn":  # churn DIR N PREFIX: create and delete N new names
        d, n, prefix = args[0], int(args[1]), args[2]
        for i in range(n):
            os.close(os.open(f"{d}/{prefix}{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.unlink(f"{d}/{prefix}{i}")
    elif cmd == "tree":  # tree ROOT PREFIX N BUSY: N candidates of 4 new directories (itself
        # and 3 below it), one file each; after each candidate, one file in BUSY
        root, prefix, n, busy = args[0], args[1], int(args[2]), args[3]
        for c in range(n):
            for j in range(4):
                d = f"{root}/{prefix}{c}" + ("" if j == 0 else f"/s{j}")
                os.mkdir(d)
                os.close(os.open(f"{d}/f", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.close(os.open(f"{busy}/{prefix}{c}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    elif cmd == "mkdir":
        os.mkdir(args[0])
    elif cmd == "rename":
        os.rename(args[0], args[1])
    elif cmd == "chmod":
        os.chmod(args[0], 0o600)
    elif cmd == "unlink":
        os.unlink(args[0])
    elif cmd == "spawn":
        child = subprocess.Popen(
            [sys.executable, "-c", sys.argv[1], sys.argv[1]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        print("ok", child.pid, flush=True)
        continue
    elif cmd == "child":
        child.stdin.write(" ".join(args) + "\n")
        child.stdin.flush()
        if child.stdout.readline().split()[0] != "ok":
            sys.exit(3)
    else:
        sys.exit(2)
    print("ok", flush=True)
if child is not None:
    child.stdin.close()
    child.wait()
"""


class Writer:
    """A separate process that writes where the test tells it to (paths relative to `cwd`)."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, WRITER],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid

    def do(self, command: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert answer[:1] == ["ok"], f"writer failed on {command!r}: {answer}"
        return answer[1:]

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


@contextlib.contextmanager
def writer(cwd: Path) -> Iterator[Writer]:
    w = Writer(cwd)
    try:
        yield w
    finally:
        if w.proc.poll() is None:
            w.close()


class Tally:
    """Everything the monitor reported, drained as the daemon's loop would."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.counts: dict[str, int] = {}
        self.events = self.lost = self.ignored = self.unresolved = 0

    def drain(self) -> Tally:
        batch: Batch = self.monitor.drain()
        for path, n in batch.counts.items():
            self.counts[path] = self.counts.get(path, 0) + n
        self.events += batch.events
        self.lost += batch.lost
        self.ignored += batch.ignored
        self.unresolved += batch.unresolved
        return self

    def wait_count(self, path: Path, n: int, timeout: float = 10.0) -> None:
        """Until `path` has at least `n` events. Events are read in the order they happen, so
        once a write made last (a sentinel) is counted, every earlier one has been read."""
        wait_for(
            lambda: self.drain().counts.get(str(path), 0) >= n,
            timeout,
            f"{n} events in {path} (have {self.counts})",
        )

    def settle(self, directory: Path, events: int = 3) -> None:
        """A sentinel: another process makes one file in `directory` (create, modify, close:
        3 events; `events` for a mark that leaves some out), and once that is counted every
        earlier event has been read."""
        with writer(directory.parent) as sentinel:
            sentinel.do(f"files {directory.name} 1 s")
        self.wait_count(directory, events)


@pytest.fixture
def monitor(loopfs: LoopFs, runtime_tmpfs: Path) -> Iterator[Monitor]:
    # Depends on both filesystems so that it is torn down (its fds closed) before they are
    # unmounted.
    m = Monitor()
    m.start()
    try:
        yield m
    finally:
        m.stop()


def _root(kind: str, loopfs: LoopFs, runtime_tmpfs: Path) -> Path:
    return loopfs.mountpoint if kind == "loopfs" else runtime_tmpfs


@pytest.mark.parametrize("kind", ["loopfs", "tmpfs"])
def test_counts_per_directory_exactly(
    kind: str, monitor: Monitor, loopfs: LoopFs, runtime_tmpfs: Path
) -> None:
    root = _root(kind, loopfs, runtime_tmpfs)
    for d in ("a", "b", "c"):
        (root / d).mkdir()
    monitor.add_filesystem(str(root))
    tally = Tally(monitor)
    with writer(root) as w:
        # Each name gets each kind of event once, so merging in the kernel queue cannot change
        # the count: a new file written once and closed is create + modify + close = 3.
        w.do("files a 20 f")  # 60
        w.do("rename a/f0 a/g0")  # moved from f0, moved to g0: 2
        w.do("chmod a/f1")  # attribute change: 1
        w.do("unlink a/g0")  # 1
        w.do("mkdir a/sub")  # 1 in a
        w.do("files a/sub 5 s")  # 15 in a/sub
        w.do("files b 7 f")  # 21
    tally.settle(root / "c")
    assert tally.counts == {
        str(root / "a"): 65,
        str(root / "a" / "sub"): 15,
        str(root / "b"): 21,
        str(root / "c"): 3,
    }
    assert (tally.events, tally.lost, tally.unresolved) == (104, 0, 0)


def test_a_quiet_mark_leaves_each_write_out(monitor: Monitor, runtime_tmpfs: Path) -> None:
    """The RAM side of a pin is watched without FAN_MODIFY; adding the same filesystem with
    modify=True later widens the mark."""
    root = runtime_tmpfs
    for d in ("a", "b", "c", "d"):
        (root / d).mkdir()
    monitor.add_filesystem(str(root), modify=False)
    tally = Tally(monitor)
    with writer(root) as w:
        w.do("files a 20 f")  # create + close each: 40, no modify
    tally.settle(root / "c", 2)  # create + close, no modify
    assert tally.counts == {str(root / "a"): 40, str(root / "c"): 2}
    monitor.add_filesystem(str(root))
    with writer(root) as w:
        w.do("files b 5 f")  # 15 again
    tally.settle(root / "d")
    assert tally.counts[str(root / "b")] == 15
    monitor.remove_filesystem(str(root))
    monitor.remove_filesystem(str(root))


def test_own_process_is_ignored(monitor: Monitor, loopfs: LoopFs) -> None:
    root = loopfs.mountpoint
    (root / "c").mkdir()
    monitor.add_filesystem(str(root))
    tally = Tally(monitor)
    for i in range(4):
        (root / f"mine{i}").write_text("x")  # by this process: create, modify, close each
    tally.settle(root / "c")
    assert tally.counts == {str(root / "c"): 3}
    assert tally.ignored == 12


def test_ignored_pid_and_its_descendants_are_not_counted(monitor: Monitor, loopfs: LoopFs) -> None:
    root = loopfs.mountpoint
    for d in ("a", "b", "c"):
        (root / d).mkdir()
    monitor.add_filesystem(str(root))
    tally = Tally(monitor)
    with writer(root) as w:
        monitor.ignore_pid(w.pid)
        w.do("files a 10 f")  # 30, ignored
        w.do("spawn")
        w.do("child files b 10 f")  # 30 by a child of the ignored pid, ignored
        # The child must still exist when its events are read (it is looked up then).
        wait_for(lambda: tally.drain().ignored >= 60, 10, "60 ignored events")
        monitor.unignore_pid(w.pid, after=0.0)
        w.do("files a 2 late")  # after the grace period: counted (6)
        w.do("child files b 2 late")  # 6
    tally.settle(root / "c")
    assert tally.counts == {str(root / "a"): 6, str(root / "b"): 6, str(root / "c"): 3}
    assert tally.ignored == 60


def test_unignored_pid_stays_ignored_for_events_read_later(
    monitor: Monitor, loopfs: LoopFs
) -> None:
    root = loopfs.mountpoint
    for d in ("a", "c"):
        (root / d).mkdir()
    monitor.add_filesystem(str(root))
    tally = Tally(monitor)
    monitor.pause()  # the events wait in the kernel queue, as under load
    try:
        with writer(root) as w:
            monitor.ignore_pid(w.pid)
            w.do("files a 10 f")
        monitor.unignore_pid(w.pid, after=60.0)
        with writer(root) as sentinel:
            sentinel.do("files c 1 s")
    finally:
        monitor.resume()
    tally.wait_count(root / "c", 3)
    assert tally.counts == {str(root / "c"): 3}
    assert tally.ignored == 30


def test_overflow_is_reported_not_silent(monitor: Monitor, loopfs: LoopFs) -> None:
    root = loopfs.mountpoint
    for d in ("a", "c"):
        (root / d).mkdir()
    monitor.add_filesystem(str(root))
    tally = Tally(monitor)
    queue = int(Path("/proc/sys/fs/fanotify/max_queued_events").read_text())
    monitor.pause()
    try:
        with writer(root) as w:
            # Distinct names do not merge: more records than the queue holds.
            w.do(f"churn a {queue + 5000} n")
    finally:
        monitor.resume()
    wait_for(lambda: tally.drain().lost > 0, 10, "an overflow to be reported")
    assert 0 < tally.counts.get(str(root / "a"), 0) < 3 * (queue + 5000)
    # Counting goes on after an overflow.
    tally.settle(root / "c")
    assert monitor.stats()["lost"] == tally.lost >= 1


def test_remove_filesystem_stops_events_and_frees_the_mount(
    monitor: Monitor, loopfs: LoopFs, runtime_tmpfs: Path
) -> None:
    disk = loopfs.mountpoint
    (disk / "a").mkdir()
    (runtime_tmpfs / "s").mkdir()
    monitor.add_filesystem(str(disk))
    monitor.add_filesystem(str(runtime_tmpfs))
    tally = Tally(monitor)
    with writer(disk) as w:
        w.do("files a 5 f")
        tally.wait_count(disk / "a", 15)
        # While watched, the monitor's fd keeps the mount busy: it must be removed first.
        busy = subprocess.run(["umount", str(disk)], capture_output=True, text=True)
        assert busy.returncode != 0 and "busy" in busy.stderr
        monitor.remove_filesystem(str(disk))
        assert monitor.watched() == [str(runtime_tmpfs)]
        w.do("files a 5 g")
        w.do(f"files {runtime_tmpfs}/s 1 s")
    tally.wait_count(runtime_tmpfs / "s", 3)
    assert tally.counts == {str(disk / "a"): 15, str(runtime_tmpfs / "s"): 3}
    subprocess.run(["umount", str(disk)], check=True, capture_output=True)
    assert str(disk) not in mount_points()
    with pytest.raises(MonitorError, match="not watched"):
        monitor.remove_filesystem(str(disk))


def test_add_filesystem_is_counted_per_filesystem(monitor: Monitor, loopfs: LoopFs) -> None:
    root = loopfs.mountpoint
    for d in ("a", "c"):
        (root / d).mkdir()
    monitor.add_filesystem(str(root))
    monitor.add_filesystem(str(root / "a"))  # the same filesystem: one mark, two users
    monitor.remove_filesystem(str(root))
    tally = Tally(monitor)
    with writer(root) as w:
        w.do("files a 2 f")
        w.do("files c 1 s")
    tally.wait_count(root / "c", 3)
    assert tally.counts == {str(root / "a"): 6, str(root / "c"): 3}
    monitor.remove_filesystem(str(root / "a"))
    assert monitor.watched() == []


def test_writes_through_an_overlay_show_on_the_upper_tmpfs_only(
    monitor: Monitor, loopfs: LoopFs, runtime_tmpfs: Path
) -> None:
    disk = loopfs.mountpoint
    lower = disk / "dir"
    (lower / "x").mkdir(parents=True)
    (lower / "x" / "old").write_text("on disk\n")
    (disk / "c").mkdir()
    upper, work = runtime_tmpfs / "upper", runtime_tmpfs / "work"
    upper.mkdir()
    work.mkdir()
    options = (
        f"lowerdir={lower},upperdir={upper},workdir={work},"
        "redirect_dir=on,index=off,metacopy=off,xino=off"
    )
    subprocess.run(
        ["mount", "-t", "overlay", "rp-test", "-o", options, str(lower)],
        check=True,
        capture_output=True,
    )
    try:
        # Filesystem marks need decodable handles; overlayfs has none.
        with pytest.raises(MonitorError, match="Operation not supported"):
            monitor.add_filesystem(str(lower))
        monitor.add_filesystem(str(disk))
        monitor.add_filesystem(str(runtime_tmpfs))
        tally = Tally(monitor)
        with writer(lower) as w:
            w.do("files x 5 f")  # through the overlay
            w.do("mkdir y")
            w.do("files y 4 f")
            w.do(f"files {disk}/c 1 s")  # on the disk directly: the sentinel
        tally.wait_count(disk / "c", 3)
        assert tally.counts.get(str(upper / "x"), 0) >= 15
        assert tally.counts.get(str(upper / "y"), 0) >= 12
        on_disk = {p: n for p, n in tally.counts.items() if p.startswith(str(disk) + "/")}
        assert on_disk == {str(disk / "c"): 3}
        assert all(p.startswith(str(runtime_tmpfs)) for p in set(tally.counts) - set(on_disk))
        assert sorted(p.name for p in (upper / "x").iterdir()) == [f"f{i}" for i in range(5)]
        monitor.remove_filesystem(str(runtime_tmpfs))
        monitor.remove_filesystem(str(disk))
    finally:
        unmount_tree(lower)
    assert str(lower) not in mount_points()
    # The monitor holds nothing on the tmpfs any more.
    subprocess.run(["umount", str(runtime_tmpfs)], check=True, capture_output=True)


def test_fileno_wakes_promptly_and_at_most_ten_times_a_second(
    monitor: Monitor, loopfs: LoopFs
) -> None:
    root = loopfs.mountpoint
    (root / "a").mkdir()
    monitor.add_filesystem(str(root))
    monitor.drain()
    assert select.select([monitor], [], [], 0)[0] == []  # nothing to drain: not readable
    with writer(root) as w:
        w.do("files a 1 first")
        t0 = time.monotonic()
        assert select.select([monitor], [], [], 5)[0] == [monitor], "no wake-up within 5 s"
        assert time.monotonic() - t0 < 0.5
        # The wake-up may come between the create and the close: the rest follows.
        tally = Tally(monitor)
        tally.wait_count(root / "a", 3)
        assert tally.counts == {str(root / "a"): 3}

        # Under steady load: drain on every wake-up until the writer is done.
        assert w.proc.stdin is not None and w.proc.stdout is not None
        w.proc.stdin.write("churn a 60000 n\n")
        w.proc.stdin.flush()
        wakeups = lost = 0
        start = time.monotonic()
        while True:
            ready = select.select([monitor, w.proc.stdout], [], [], 10)[0]
            if monitor in ready:
                wakeups += 1
                lost += monitor.drain().lost
            if w.proc.stdout in ready:
                break
        elapsed = time.monotonic() - start
        assert w.proc.stdout.readline().split() == ["ok"]
        assert elapsed > 0.5, "the load did not last long enough to say anything"
        assert elapsed / 0.1 / 2 <= wakeups <= elapsed / 0.1 + 1, (wakeups, elapsed)
        assert lost == 0


def test_stop_is_idempotent_and_closes_everything(loopfs: LoopFs) -> None:
    m = Monitor()
    m.add_filesystem(str(loopfs.mountpoint))
    m.start()
    m.stop()
    m.stop()
    with pytest.raises(MonitorError, match="stopped"):
        m.drain()
    # Its fds are closed: the filesystem unmounts.
    subprocess.run(["umount", str(loopfs.mountpoint)], check=True, capture_output=True)


def test_memory_stays_bounded_over_thousands_of_directories(loopfs: LoopFs) -> None:
    """Writes in 5,000 new directories (two rounds of 625 candidates under a watch root at
    depth 1) while one directory stays busy, drained and rated as the daemon's loop does: the
    handle cache never holds more than its limit, the rates of the written candidates are
    forgotten once they decayed (the table holds one round at most, not both), and the busy
    directory's rate is reported all along."""
    root = loopfs.mountpoint / "projects"
    busy = root / "busy"
    busy.mkdir(parents=True)
    m = Monitor(cache_max=64)
    m.add_filesystem(str(root))
    m.start()
    rates = RateTable(0.5)
    attributor = Attributor([WatchRoot(str(root), 1)], [])
    most_cached = most_rated = 0

    def drain() -> None:
        nonlocal most_cached, most_rated
        now = time.monotonic()
        batch = m.drain()
        assert batch.lost == 0
        for dirpath, n in batch.counts.items():
            cand = attributor.candidate(dirpath)
            if cand is not None:
                rates.add(cand, n, now)
        rates.prune(now)
        most_cached = max(most_cached, m.cached_handles())
        most_rated = max(most_rated, len(rates))

    try:
        with writer(root) as w:
            assert w.proc.stdin is not None and w.proc.stdout is not None
            for prefix in ("a", "b"):
                w.proc.stdin.write(f"tree {root} {prefix} 625 {busy}\n")
                w.proc.stdin.flush()
                while not select.select([w.proc.stdout], [], [], 0.05)[0]:
                    drain()
                assert w.proc.stdout.readline().split() == ["ok"]
                drain()
                assert rates.rate(str(busy), time.monotonic()) > 0
                assert len(rates) > 10, "the candidates were never rated at all"

                # The busy directory goes on; every other candidate decays and is forgotten.
                def only_busy_left(prefix: str = prefix) -> bool:
                    w.do(f"files busy 5 {prefix}-{time.monotonic_ns()}-")
                    drain()
                    return set(rates.snapshot(time.monotonic(), floor=0.0)) == {str(busy)}

                wait_for(only_busy_left, 60, "the quiet candidates to be forgotten", interval=0.1)
                assert rates.rate(str(busy), time.monotonic()) > 1.0
        assert most_cached <= 64
        assert most_rated <= 625 + 1  # one round and the busy directory, never both rounds
        assert m.stats()["events"] >= 1250 * 4 * 2  # every directory's create and file seen
    finally:
        m.stop()
