"""How many write events per second the monitor counts without losing any, what watching
costs the writing workload, and what the reader thread costs at a moderate rate.

The workload: writer processes, each creating a one-byte file, writing it and closing it, over
and over, across many directories, and deleting the file made 256 steps earlier (so the
filesystem's inodes do not run out). Each step is 4 events: create, modify, close after write,
delete. Every name is used once, so the number of events the monitor must count is exact.

Run as root in a private mount namespace (it makes its own loop filesystem):
    unshare -m --propagation private .venv/bin/python -m bench.monitor_capacity
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rampiped.monitor import Monitor
from tests.system.helpers import make_loopfs

EVENTS_PER_STEP = 4
N_DIRS = 64

# The writer: argv root, writer id, steps, directories, target steps/s (0: as fast as it can).
# It waits for a line on stdin so that every writer starts at once, and prints its timing.
WRITER = r"""
import json, os, sys, time
root, wid = sys.argv[1], sys.argv[2]
steps, ndirs, rate = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
dirs = [f"{root}/d{i}" for i in range(ndirs)]
flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
keep = 256
def name(i):
    return f"{dirs[i % ndirs]}/{wid}-{i}"
sys.stdin.readline()
t0 = time.perf_counter()
for i in range(steps):
    fd = os.open(name(i), flags)
    os.write(fd, b"x")
    os.close(fd)
    if i >= keep:
        os.unlink(name(i - keep))
    if rate and i % 16 == 0:
        ahead = t0 + i / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
for i in range(max(0, steps - keep), steps):
    os.unlink(name(i))
print(json.dumps({"steps": steps, "seconds": time.perf_counter() - t0}))
"""


@dataclass
class Run:
    steps: int  # all writers together
    writer_seconds: float  # the slowest writer
    events_expected: int
    events_seen: int
    lost: int
    catch_up_seconds: float  # from the start until the monitor had counted everything

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.writer_seconds

    @property
    def events_per_s(self) -> float:
        return self.events_seen / max(self.writer_seconds, self.catch_up_seconds)


def _prepare(root: Path) -> None:
    for i in range(N_DIRS):
        (root / f"d{i}").mkdir(parents=True, exist_ok=True)


def _start_writers(
    root: Path, writers: int, steps: int, rate: float
) -> list[subprocess.Popen[str]]:
    procs = []
    for w in range(writers):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WRITER,
                    str(root),
                    f"w{w}",
                    str(steps),
                    str(N_DIRS),
                    str(rate),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish_writers(procs: list[subprocess.Popen[str]]) -> list[dict[str, float]]:
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"writer exited with status {p.returncode}")
        out.append(json.loads(stdout))
    return out


def workload(
    root: Path, writers: int, steps: int, rate: float = 0.0, monitor: Monitor | None = None
) -> Run:
    """Run the writers; with a monitor, drain it every 100 ms (as the daemon's loop would)
    until it has counted every event or stopped counting."""
    _prepare(root)
    procs = _start_writers(root, writers, steps, rate)
    expected = writers * steps * EVENTS_PER_STEP
    if monitor is not None:
        monitor.drain()
    t0 = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    seen = lost = 0
    caught_up = 0.0
    if monitor is not None:
        last_change = time.perf_counter()
        while True:
            select.select([monitor], [], [], 0.1)
            batch = monitor.drain()
            seen += batch.events
            lost += batch.lost
            now = time.perf_counter()
            if batch.events or batch.lost:
                last_change = now
            done = all(p.poll() is not None for p in procs)
            if done and seen >= expected:
                caught_up = now - t0
                break
            if done and now - last_change > 2.0:  # events were lost: nothing more will come
                caught_up = last_change - t0
                break
    results = _finish_writers(procs)
    return Run(
        steps=writers * steps,
        writer_seconds=max(r["seconds"] for r in results),
        events_expected=expected,
        events_seen=seen,
        lost=lost,
        catch_up_seconds=caught_up,
    )


def _thread_cpu_seconds(tid: int) -> float:
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _reader_tid() -> int:
    for t in threading.enumerate():
        if t.name == "rampiped-monitor" and t.native_id is not None:
            return t.native_id
    raise RuntimeError("the monitor's reader thread is not running")


def capacity(root: Path, steps: int = 80_000, coalesce: float | None = None) -> dict[str, float]:
    """Full speed with one and two writers, then paced runs at rising rates: the highest
    rate counted completely with no overflow is the lossless capacity."""
    out: dict[str, float] = {}
    best = 0.0
    root.mkdir(parents=True, exist_ok=True)
    with Monitor() if coalesce is None else Monitor(coalesce=coalesce) as monitor:
        monitor.add_filesystem(str(root))
        trials: list[tuple[str, int, float]] = [
            ("full_1w", 1, 0.0),
            ("full_2w", 2, 0.0),
            ("full_4w", 4, 0.0),  # more writers than cores: they compete with the reader
        ]
        trials += [(f"paced_{r // 1000}k", 2, r / EVENTS_PER_STEP / 2) for r in (150_000, 200_000)]
        for label, writers, rate in trials:
            records0 = monitor.stats()["records"]
            run = workload(root / label, writers, steps // writers, rate, monitor)
            records = monitor.stats()["records"] - records0
            out[f"{label}_records_per_s"] = round(
                records / max(run.writer_seconds, run.catch_up_seconds), 0
            )
            clean = run.lost == 0 and run.events_seen == run.events_expected
            out[f"{label}_writer_events_per_s"] = round(run.steps_per_s * EVENTS_PER_STEP, 0)
            out[f"{label}_monitor_events_per_s"] = round(run.events_per_s, 0)
            out[f"{label}_lost"] = run.lost
            out[f"{label}_missing_events"] = run.events_expected - run.events_seen
            if clean:
                best = max(best, run.events_per_s)
        out["monitor_events_per_s_lossless"] = round(best, 0)
        stats = monitor.stats()
        out["records_per_read"] = round(stats["records"] / max(1, stats["reads"]), 1)
        monitor.remove_filesystem(str(root))
    return out


def workload_ratio(root: Path, rounds: int = 5, steps: int = 40_000) -> dict[str, float]:
    """Steps/s of one full-speed writer with the monitor running over without it,
    interleaved, median of the per-round ratios."""
    ratios = []
    bare_rates = []
    root.mkdir(parents=True, exist_ok=True)
    for r in range(rounds):
        bare = workload(root / f"bare{r}", 1, steps)
        with Monitor() as monitor:
            monitor.add_filesystem(str(root))
            watched = workload(root / f"watched{r}", 1, steps, monitor=monitor)
            monitor.remove_filesystem(str(root))
        ratios.append(watched.steps_per_s / bare.steps_per_s)
        bare_rates.append(bare.steps_per_s * EVENTS_PER_STEP)
    return {
        "monitored_workload_ratio": round(statistics.median(ratios), 3),
        "monitored_workload_ratio_min": round(min(ratios), 3),
        "unmonitored_writer_events_per_s": round(statistics.median(bare_rates), 0),
    }


def cpu_at_rate(
    root: Path, events_per_s: float = 10_000, seconds: float = 10.0
) -> dict[str, float]:
    """CPU of the reader thread and of the whole process (reader + draining every 100 ms)
    while one writer makes `events_per_s`."""
    steps_per_s = events_per_s / EVENTS_PER_STEP
    root.mkdir(parents=True, exist_ok=True)
    with Monitor() as monitor:
        monitor.add_filesystem(str(root))
        tid = _reader_tid()
        t_cpu0 = _thread_cpu_seconds(tid)
        p0 = os.times()
        w0 = time.perf_counter()
        run = workload(root / "cpu", 1, int(steps_per_s * seconds), steps_per_s, monitor)
        wall = time.perf_counter() - w0
        p1 = os.times()
        t_cpu1 = _thread_cpu_seconds(tid)
        stats = monitor.stats()
        monitor.remove_filesystem(str(root))
    return {
        "cpu_rate_events_per_s": round(run.events_seen / wall, 0),
        "cpu_lost": run.lost,
        "reader_thread_cpu_percent": round(100 * (t_cpu1 - t_cpu0) / wall, 1),
        "process_cpu_percent": round(
            100 * ((p1.user - p0.user) + (p1.system - p0.system)) / wall, 1
        ),
        "cpu_records_per_read": round(stats["records"] / max(1, stats["reads"]), 1),
        "rss_mib": round(_rss_kib() / 1024, 1),
    }


def reader_ceiling(root: Path, records: int = 15_000) -> dict[str, float]:
    """How fast the reader empties a full queue: with the reader paused, one writer queues
    `records` merged records (each name's create, write, close and delete merge into one);
    then the reader resumes and the time to count them all is taken."""
    root.mkdir(parents=True, exist_ok=True)
    with Monitor() as monitor:
        monitor.add_filesystem(str(root))
        _prepare(root / "ceiling")
        monitor.pause()
        procs = _start_writers(root / "ceiling", 1, records, 0.0)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        _finish_writers(procs)
        before = monitor.stats()["records"]
        t0 = time.perf_counter()
        monitor.resume()
        deadline = t0 + 10
        while monitor.stats()["records"] - before < records and time.perf_counter() < deadline:
            time.sleep(0.0005)
        seconds = time.perf_counter() - t0
        got = monitor.stats()["records"] - before
        batch = monitor.drain()
        monitor.remove_filesystem(str(root))
    return {
        "reader_records_per_s_from_full_queue": round(got / seconds, 0),
        "reader_events_per_s_from_full_queue": round(batch.events / seconds, 0),
        "ceiling_lost": batch.lost,
    }


def run(workdir: Path) -> dict[str, float]:
    """All figures; `workdir` is a directory on the filesystem to write on."""
    out: dict[str, float] = {}
    out.update(capacity(workdir / "capacity"))
    out.update(workload_ratio(workdir / "ratio"))
    out.update(cpu_at_rate(workdir / "cpu"))
    out.update(reader_ceiling(workdir / "ceiling"))
    out["max_queued_events"] = int(Path("/proc/sys/fs/fanotify/max_queued_events").read_text())
    return out


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="rp-bench-") as tmp,
        make_loopfs(Path(tmp) / "disk", size_mb=1024) as fs,
    ):
        print(json.dumps(run(fs.mountpoint), indent=2))


if __name__ == "__main__":
    main()
