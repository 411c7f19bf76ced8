"""rampiped's benchmark: `make bench` (root, in a private mount namespace).

Every comparison runs side by side in one run and is reported as a ratio: the machines this
runs on are noisy, and absolute figures do not compare between runs. What runs, in order:

1. the SQLite experiment starts in the background and runs for 10 minutes: a pmxcfs-like
   database at 10 transactions/s on a plain stick and on two copy-pinned sticks (checkpoints
   every 5 and every 1 minute), all at once, each on its own stick;
2. the stick's profile (fio);
3. the throughput matrix: workloads (a)-(d) x configurations (1)-(5), in interleaved rounds;
4. write-back throughput of large files, against the stick's sequential rate;
5. adaptive pinning in time: a write burst, the rate the daemon sees, pin and unpin;
6. bytes written back by (2) and (3) against a log2ram-style copy (4), same changes, same time;
7. the monitor: lossless event rate, cost to the writer, daemon CPU and memory;
   and the daemon's memory after writes in 100,000 directories (bench/daemon_memory.py);
   compressed RAM (bench/zram.py): RAM per stored byte, and (a)-(d) in a zram pin against
   tmpfs, with the CPU of each run;
8. the SQLite experiment ends; results go to bench/results/ (report.md, charts, summary.json).

Configurations (2) and (3) are the real daemon (`rampiped --config ...`) on simulated sticks
(bench/stick.py); (4) is bench/tmpfscopy.py; (5) a plain tmpfs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import monitor_capacity, report, workloads, zram
from bench.daemon_memory import daemon_memory
from bench.stick import Stick, blkio_root, profile, stick, sweep_stale_rules
from bench.tmpfscopy import TmpfsCopy
from rampiped import control
from rampiped.writeback import OVERLAY_FEATURES
from tests.system.daemon_harness import Daemon, Env, FsyncLogger, Writer
from tests.system.helpers import (
    LoopFs,
    diff_manifests,
    make_loopfs,
    manifest,
    mount_points,
    mountinfo,
    small_files,
    wait_for,
)

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024
CONFIGS = ("disk", "overlay", "copy", "tmpfs_copy", "kernel_overlay", "tmpfs")


@dataclass(frozen=True)
class Plan:
    """Sizes and durations. `QUICK` is the same run in miniature (the smoke test)."""

    sqlite_seconds: float = 600.0
    sqlite_rate: float = 10.0
    sqlite_intervals: tuple[float, ...] = (300.0, 60.0)
    profile_seconds: float = 5.0
    workload_seconds: float = 2.0
    rounds: int = 5
    large_file_mb: int = 32
    writeback_files: int = 3
    writeback_file_mb: int = 16
    wb_seconds: float = 60.0
    wb_interval: float = 15.0
    # a /var/log-like tree with real logrotate runs: seconds, checkpoint interval, rotations
    lr_seconds: float = 360.0
    lr_interval: float = 60.0
    lr_rotate: float = 120.0
    burst_seconds: float = 8.0
    burst_rate: float = 300.0
    half_life: float = 1.0
    pin_above: float = 50.0
    hot_for: float = 2.0
    unpin_below: float = 5.0
    cool_for: float = 5.0
    capacity_steps: int = 80_000
    ratio_rounds: int = 5
    ratio_steps: int = 40_000
    cpu_events_per_s: float = 10_000.0
    cpu_seconds: float = 10.0
    stick_mb: int = 512
    busy_tries: int = 20
    # the switch part's pins: the name of each figure and the MiB written into the pin
    switch_sizes: tuple[tuple[str, int], ...] = (("64m", 64), ("1g", 1024))
    memory_dirs: int = 100_000
    memory_half_life: float = 10.0  # the default: the table holds every candidate at its peak
    # the checkpoint cost part's pins: the name of each figure and the files of 200 bytes
    checkpoint_files: tuple[tuple[str, int], ...] = (("1k", 1_000), ("20k", 20_000))


QUICK = Plan(
    sqlite_seconds=20.0,
    sqlite_intervals=(10.0, 5.0),
    profile_seconds=1.0,
    workload_seconds=0.5,
    rounds=1,
    large_file_mb=4,
    writeback_files=2,
    writeback_file_mb=2,
    wb_seconds=6.0,
    wb_interval=2.0,
    lr_seconds=8.0,
    lr_interval=3.0,
    lr_rotate=4.0,
    burst_seconds=4.0,
    cool_for=2.0,
    capacity_steps=8_000,
    ratio_rounds=1,
    ratio_steps=4_000,
    cpu_seconds=2.0,
    stick_mb=128,
    busy_tries=3,
    switch_sizes=(("64m", 4), ("1g", 8)),
    memory_dirs=4_000,
    memory_half_life=1.0,
    checkpoint_files=(("1k", 100), ("20k", 400)),
)


def _dur(seconds: float) -> str:
    """A duration as the configuration file takes it."""
    return f"{seconds:g}s"


class Sampler:
    """Bytes written by sticks over time, sampled once a second, in groups (one chart each)."""

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self.groups: dict[str, dict[str, Any]] = {}
        self.series: dict[str, dict[str, list[tuple[float, float]]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self._thread.start()

    def watch(self, group: str, sticks: dict[str, Stick]) -> None:
        with self._lock:
            base = {name: s.bytes_written() for name, s in sticks.items()}
            self.groups[group] = {"t0": time.monotonic(), "sticks": sticks, "base": base}
            self.series[group] = {name: [(0.0, 0.0)] for name in sticks}

    def end(self, group: str) -> None:
        self._sample(group)
        with self._lock:
            self.groups.pop(group, None)

    def _sample(self, group: str) -> None:
        with self._lock:
            g = self.groups.get(group)
            if g is None:
                return
            t = time.monotonic() - g["t0"]
            for name, s in g["sticks"].items():
                with contextlib.suppress(OSError):
                    mb = (s.bytes_written() - g["base"][name]) / 1e6
                    self.series[group][name].append((round(t, 2), round(mb, 4)))

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            for group in list(self.groups):
                self._sample(group)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Bench:
    """The run's shared state: its temporary tree, everything to undo, results and series."""

    def __init__(self, plan: Plan, stack: contextlib.ExitStack, tmp: Path) -> None:
        self.plan = plan
        self.stack = stack
        self.t0 = time.monotonic()
        self.tmp = tmp
        self.results: dict[str, Any] = {}
        self.series: dict[str, Any] = {}
        self.facts: dict[str, Any] = {}  # what the report says in words
        self.images = self.mount_tmpfs(self.tmp / "images", "75%")
        self.sampler = Sampler()
        stack.callback(self.sampler.stop)

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", flush=True)

    def mount_tmpfs(self, path: Path, size: str = "2g") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"mode=0755,size={size}", "rp-bench", str(path)],
            check=True,
        )
        self.stack.callback(subprocess.run, ["umount", "-R", str(path)], capture_output=True)
        return path

    def new_stick(self, name: str, size_mb: int | None = None) -> Stick:
        s = self.stack.enter_context(
            stick(name, self.tmp / name, self.images, size_mb=size_mb or self.plan.stick_mb)
        )
        (s.mountpoint / "data").mkdir()
        return s

    def daemon(
        self, name: str, disk: Stick | LoopFs, log_level: str = "info", **config: Any
    ) -> tuple[Env, Daemon]:
        """The real daemon with its data on `disk` (journal there too) and its runtime dir on a
        tmpfs of its own; stopped (SIGTERM: everything written back) when the run ends."""
        home = self.tmp / f"daemon-{name}"
        home.mkdir()
        run = self.mount_tmpfs(home / "run", "64m")
        env = Env(
            home,
            LoopFs(disk.mountpoint, disk.device, disk.image),
            disk.mountpoint / "data",
            disk.mountpoint / "journal",
            run / "rampiped",
            home / "rampipe.conf",
        )
        env.write_config(**config)
        d = Daemon(env, "--log-level", log_level)
        self.stack.callback(stop_daemon, d)
        d.wait_ready()
        return env, d


def stop_daemon(d: Daemon) -> None:
    try:
        code = d.stop(timeout=300)
        if code != 0:
            tail = "\n".join(d.lines[-20:])
            print(
                f"warning: rampiped exited {code} at the end of the run:\n{tail}", file=sys.stderr
            )
    except Exception:
        d.kill()
        raise


def status(env: Env) -> dict[str, Any]:
    response = control.call(str(env.runtime / "control.sock"), "status", timeout=60)
    result: dict[str, Any] = response["result"]
    return result


def command(env: Env, cmd: str, path: Path) -> dict[str, Any]:
    response = control.call(str(env.runtime / "control.sock"), cmd, {"path": str(path)})
    if not response.get("ok"):
        raise RuntimeError(f"rampipectl {cmd} {path}: {response.get('error')}")
    result: dict[str, Any] = response.get("result") or {}
    return result


def mounted(path: Path, fstype: str | None = None) -> bool:
    found = None
    for m in mountinfo():
        if m["mountpoint"] == str(path):
            found = m
    return found is not None and (fstype is None or found["fstype"] == fstype)


# --------------------------------------------------------------------------- 1. SQLite


class SqliteRun:
    """(b) at 10 transactions/s for `sqlite_seconds`: plain stick against copy pins."""

    def __init__(self, b: Bench) -> None:
        self.b = b
        self.sticks: dict[str, Stick] = {}
        self.envs: dict[str, Env] = {}
        self.daemons: dict[str, Daemon] = {}
        self.writers: dict[str, subprocess.Popen[str]] = {}
        self.stop_file = b.tmp / "sqlite.stop"

    def dir(self, name: str) -> Path:
        return self.sticks[name].mountpoint / "data" / "pve"

    def start(self) -> None:
        p = self.b.plan
        names = ["plain"] + [f"copy_{iv:g}s" for iv in p.sqlite_intervals]
        for name in names:
            self.sticks[name] = self.b.new_stick(f"sql-{name}")
            self.dir(name).mkdir()
            workloads.seed_db(self.dir(name) / workloads.DB_NAME)
            self.sticks[name].sync()
        for name, iv in zip(names[1:], p.sqlite_intervals, strict=True):
            env, d = self.b.daemon(
                f"sql-{name}",
                self.sticks[name],
                log_level="debug",  # checkpoints are logged at debug
                adaptive={"enabled": False},
                pins=[{"path": str(self.dir(name)), "mode": "copy", "sync_interval": _dur(iv)}],
                ram={"max": "256M"},
            )
            pins = {x["path"]: x for x in status(env)["pins"]}
            if pins.get(str(self.dir(name)), {}).get("state") != "pinned":
                raise RuntimeError(f"the static pin of {self.dir(name)} is not there: {pins}")
            self.envs[name], self.daemons[name] = env, d
        for s in self.sticks.values():
            s.throttle()
            s.sync()
        self.b.sampler.watch("sqlite", self.sticks)
        self.base = {name: s.bytes_written() for name, s in self.sticks.items()}
        self.started = time.monotonic()
        for name in names:
            self.writers[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.workloads",
                    "sqlite",
                    str(self.dir(name)),
                    str(p.sqlite_seconds),
                    "--rate",
                    str(p.sqlite_rate),
                    "--stop-file",
                    str(self.stop_file),
                ],
                stdout=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
            self.b.stack.callback(_end_process, self.writers[name], self.stop_file)

    def finish(self) -> None:
        p = self.b.plan
        left = self.started + p.sqlite_seconds - time.monotonic()
        if left > 0:
            self.b.say(f"waiting {left:.0f} s for the SQLite experiment to end")
        tx = {}
        for name, w in self.writers.items():
            out, _ = w.communicate(timeout=max(0, left) + 120)
            if w.returncode != 0:
                raise RuntimeError(f"the SQLite writer on {name} exited {w.returncode}")
            tx[name] = json.loads(out)["ops"]
        for s in self.sticks.values():
            s.sync()  # what the window left dirty belongs to the window
        window = {name: s.bytes_written() - self.base[name] for name, s in self.sticks.items()}
        self.b.sampler.end("sqlite")
        r = self.b.results
        r["sqlite_seconds"] = p.sqlite_seconds
        for name in self.sticks:
            r[f"sqlite_{name}_device_bytes"] = window[name]
            r[f"sqlite_{name}_transactions"] = tx[name]
        for name, d in self.daemons.items():
            r[f"sqlite_{name}_checkpoints"] = sum(
                1 for line in d.lines if "checkpoint of" in line and "failed" not in line
            )
        names = list(self.sticks)
        r["sqlite_device_write_reduction"] = round(window["plain"] / max(1, window[names[1]]), 1)
        if len(names) > 2:
            r["sqlite_device_write_reduction_1m"] = round(
                window["plain"] / max(1, window[names[2]]), 1
            )
        # what any write-back must write: the new content of the pages that changed between
        # two checkpoints (the same transactions, counted on a database of its own); the
        # plain stick over that many bytes per checkpoint is the most a reduction can be
        rate_tx = p.sqlite_rate or 10.0
        for iv, name, key in zip(
            p.sqlite_intervals,
            names[1:],
            ["sqlite_device_write_reduction", "sqlite_device_write_reduction_1m"],
            strict=False,
        ):
            need, size = workloads.changed_bytes(self.b.tmp, round(rate_tx * iv))
            r[f"sqlite_{name}_changed_bytes_per_checkpoint"] = need
            r["sqlite_db_bytes"] = size
            least = need * max(1, r[f"sqlite_{name}_checkpoints"])
            r[f"{key}_bound"] = round(window["plain"] / least, 1)
        # the final write-back at unpin, which the window does not include
        for name, env in self.envs.items():
            before = self.sticks[name].bytes_written()
            res = command(env, "unpin", self.dir(name))
            self.sticks[name].sync()
            r[f"sqlite_{name}_final_writeback_device_bytes"] = (
                self.sticks[name].bytes_written() - before
            )
            r[f"sqlite_{name}_final_writeback_file_bytes"] = res.get("bytes", 0)
        self.b.series["sqlite_device_mb"] = self.b.sampler.series["sqlite"]


def _end_process(proc: subprocess.Popen[str], stop_file: Path) -> None:
    if proc.poll() is None:
        stop_file.touch()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- 2. profile


def stick_profile(b: Bench) -> Stick:
    s = b.new_stick("profile")
    s.throttle()
    b.results.update(profile(s, b.plan.profile_seconds))
    b.facts["stick_model"] = s.model.describe()
    return s


# --------------------------------------------------------------------------- 3. matrix


@dataclass
class Matrix:
    dirs: dict[str, Path]
    sticks: dict[str, Stick]
    env: Env
    tmpfs_dir: Path
    ops: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def matrix(b: Bench, plain: Stick) -> Matrix:
    p = b.plan
    sticks = {
        "disk": plain,
        "overlay": b.new_stick("m-overlay"),
        "copy": b.new_stick("m-copy"),
        "tmpfs_copy": b.new_stick("m-tmpfs-copy"),
    }
    tmpfs_dir = b.mount_tmpfs(b.tmp / "m-tmpfs")
    dirs = {name: s.mountpoint / "data" / "w" for name, s in sticks.items()}
    dirs["tmpfs"] = tmpfs_dir / "w"
    dirs["kernel_overlay"] = kernel_overlay(b, plain) / "w"
    for d in dirs.values():
        d.mkdir()
        workloads.seed_db(d / workloads.DB_NAME)
    for s in sticks.values():
        s.sync()
    interval = 300.0  # the default sync.interval, for (2), (3) and (4) alike
    env, _ = b.daemon(
        "matrix",
        sticks["overlay"],
        ram={"max": "2G", "min_free": "256M"},
        sync={"interval": _dur(interval)},
        adaptive={"hot_for": "1s", "cool_for": "30m"},
        pins=[{"path": str(dirs["copy"]), "mode": "copy"}],
    )
    copy = TmpfsCopy(dirs["tmpfs_copy"], b.tmp / "m4-ram", b.tmp / "m4-disk", interval)
    copy.start()
    b.stack.callback(copy.stop, False)
    for s in sticks.values():
        s.throttle()
    # (2) is adaptive: make it hot and let the daemon pin it
    t0 = time.monotonic()
    writer = Writer(dirs["overlay"], rate=300)
    try:
        wait_for(lambda: mounted(dirs["overlay"], "overlay"), 60, "the adaptive pin of (2)")
    finally:
        writer.stop()
    b.results["matrix_adaptive_pin_s"] = round(time.monotonic() - t0, 2)
    m = Matrix(dirs, sticks, env, tmpfs_dir)
    for r in range(p.rounds):
        for wl in workloads.WORKLOADS:
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            for cfg in order:
                kw: dict[str, Any] = {"file_mb": p.large_file_mb} if wl == "large_seq" else {}
                res = workloads.run(wl, dirs[cfg], p.workload_seconds, **kw)
                m.ops.setdefault(wl, {}).setdefault(cfg, []).append(res["ops_per_s"])
        b.say(f"matrix round {r + 1}/{p.rounds} done")
    if not mounted(dirs["overlay"], "overlay"):
        raise RuntimeError(f"(2) {dirs['overlay']} was unpinned during the matrix")
    med = {wl: {cfg: statistics.median(v) for cfg, v in row.items()} for wl, row in m.ops.items()}
    res = b.results
    for wl, row in med.items():
        for cfg, v in row.items():
            res[f"ops_{wl}_{cfg}"] = round(v, 1)
        for cfg in CONFIGS[:-1]:
            res[f"ratio_{wl}_{cfg}_vs_tmpfs"] = round(row[cfg] / row["tmpfs"], 3)
        res[f"spread_{wl}"] = round(
            max(max(v) / min(v) for v in m.ops[wl].values() if min(v) > 0), 3
        )
    fanotify_cost(b, dirs["tmpfs"])
    res["overlay_vs_tmpfs_fsync_ratio"] = res["ratio_logger_overlay_vs_tmpfs"]
    res["kernel_overlay_vs_tmpfs_fsync_ratio"] = res["ratio_logger_kernel_overlay_vs_tmpfs"]
    res["overlay_small_files_vs_tmpfs_ratio"] = res["ratio_small_files_overlay_vs_tmpfs"]
    res["kernel_overlay_small_files_vs_tmpfs_ratio"] = res[
        "ratio_small_files_kernel_overlay_vs_tmpfs"
    ]
    res["copy_vs_tmpfs_fsync_ratio"] = res["ratio_logger_copy_vs_tmpfs"]
    res["pinned_vs_disk_fsync_ratio"] = round(med["logger"]["overlay"] / med["logger"]["disk"], 1)
    res["matrix_rounds"] = p.rounds
    res["matrix_seconds_per_run"] = p.workload_seconds
    b.series["matrix_ops"] = m.ops
    return m


def kernel_overlay(b: Bench, plain: Stick) -> Path:
    """(6) an overlay that only the kernel serves, with the options of a pin's (upper and
    work on a tmpfs, its lower on the plain stick): what the overlay itself costs, with no
    daemon, no fanotify mark and no checkpoint."""
    ram = b.mount_tmpfs(b.tmp / "m-kov-ram")
    lower = plain.mountpoint / "data" / "kov-lower"
    lower.mkdir(parents=True)
    for d in ("upper", "work"):
        (ram / d).mkdir()
    target = b.tmp / "m-kov"
    target.mkdir()
    subprocess.run(
        [
            "mount", "-t", "overlay", "rp-bench-kov", "-o",
            f"lowerdir={lower},upperdir={ram / 'upper'},workdir={ram / 'work'},"
            f"{OVERLAY_FEATURES},volatile",
            str(target),
        ],
        check=True,
    )  # fmt: skip
    b.stack.callback(subprocess.run, ["umount", str(target)], capture_output=True)
    return target


@contextlib.contextmanager
def fanotify_mark(path: Path, mask: int) -> Iterator[None]:
    """A filesystem mark like the daemon's (same flags; `mask` chosen), and a thread that reads
    and drops the events: what writing on a watched filesystem costs in the kernel alone."""
    from pyfanotify import ext

    ctx = ext.create()
    flags = ext.FAN_CLASS_NOTIF | ext.FAN_REPORT_DFID_NAME | ext.FAN_CLOEXEC | ext.FAN_NONBLOCK
    fan = ext.init(ctx, flags, os.O_RDONLY | os.O_LARGEFILE | ext.O_CLOEXEC)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([fan], [], [], 0.1)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(fan, 1 << 16)

    thread = threading.Thread(target=drain, daemon=True)
    try:
        ext.mark(ctx, ext.FAN_MARK_ADD | ext.FAN_MARK_FILESYSTEM, mask, dfd, ".")
        thread.start()
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(5)
        os.close(fan)  # closing the group removes its marks
        os.close(dfd)


def fanotify_cost(b: Bench, directory: Path) -> None:
    """(a) on a plain tmpfs: unwatched, with the daemon's mark, and with that mark less
    FAN_MODIFY, interleaved; why pinned directories lose fsync throughput."""
    from rampiped.monitor import FAN_MODIFY, MARK_MASK

    runs: dict[str, list[float]] = {"bare": [], "full": [], "no_modify": []}
    masks = {"full": MARK_MASK, "no_modify": MARK_MASK & ~FAN_MODIFY}
    for _ in range(max(1, b.plan.rounds - 2)):
        for label in runs:
            if label == "bare":
                res = workloads.logger(directory, b.plan.workload_seconds)
            else:
                with fanotify_mark(directory, masks[label]):
                    res = workloads.logger(directory, b.plan.workload_seconds)
            runs[label].append(res["ops_per_s"])
    bare = statistics.median(runs["bare"])
    for label in ("full", "no_modify"):
        b.results[f"fanotify_{label}_mark_logger_ratio"] = round(
            statistics.median(runs[label]) / bare, 3
        )


def ledger_cost(b: Bench) -> None:
    """What deciding by content costs each write-back (rampiped/ledger.py): every regular file
    of the RAM side read and digested, on a tmpfs like a pin's. Two trees: large files (the
    read rate), and many small ones (the cost per file). Median of the plan's rounds."""
    from rampiped import ledger

    root = b.mount_tmpfs(b.tmp / "ledger", "1g")
    large = root / "large"
    nbytes = _write_large(large, 4, b.plan.large_file_mb)
    small = root / "small"
    small.mkdir()
    count = 2_000 if b.plan == QUICK else 10_000
    for i in range(count):
        sub = small / f"d{i % 100:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}").write_bytes(os.urandom(200))
    times: dict[str, list[float]] = {"large": [], "small": []}
    for _ in range(max(1, b.plan.rounds)):
        for label, tree in (("large", large), ("small", small)):
            t = time.perf_counter()
            found = ledger.scan(str(tree))
            times[label].append(time.perf_counter() - t)
            assert len(found) == (4 if label == "large" else count)
    large_s = statistics.median(times["large"])
    small_s = statistics.median(times["small"])
    b.results["ledger_read_mib_per_s"] = round(nbytes / MiB / large_s, 1)
    b.results["ledger_s_per_gib"] = round(large_s * (1 << 30) / nbytes, 3)
    b.results["ledger_s_per_10k_small_files"] = round(small_s * 10_000 / count, 3)


# --------------------------------------------------------------------------- 4. write-back


def _write_large(directory: Path, files: int, file_mb: int) -> int:
    directory.mkdir(exist_ok=True)
    chunk = os.urandom(MiB)
    for i in range(files):
        with open(directory / f"large{i}.bin", "wb") as f:
            for _ in range(file_mb):
                f.write(chunk)
    return files * file_mb * MiB


def writeback(b: Bench, m: Matrix) -> None:
    """Large files written into (2) and (3), then written back: (2) by unpinning it, (3) by a
    checkpoint; plain rsync from a tmpfs to the stick alongside, all against fio's rate."""
    p = b.plan
    seq = b.results["stick_seq_write_bytes_per_s"]
    r = b.results
    # (2) overlay: unpin writes the upper layer back (through its journal)
    payload = _write_large(m.dirs["overlay"] / "big", p.writeback_files, p.writeback_file_mb)
    s = m.sticks["overlay"]
    s.sync()
    dev0 = s.bytes_written()
    t0 = time.perf_counter()
    res = command(m.env, "unpin", m.dirs["overlay"])
    t = time.perf_counter() - t0
    r["writeback_overlay_payload_bytes"] = payload
    r["writeback_overlay_file_bytes"] = res["bytes"]
    r["writeback_overlay_seconds"] = round(t, 2)
    r["writeback_overlay_device_bytes"] = s.bytes_written() - dev0
    r["writeback_overlay_bytes_per_s"] = round(res["bytes"] / t, 0)
    # (3) copy: a checkpoint writes the changed files back. One now first: the periodic one
    # (sync.interval, counted from the pin, made about when the matrix started) would come due
    # while the files are written, and take part of them before the measured one
    command(m.env, "sync", m.dirs["copy"])
    payload = _write_large(m.dirs["copy"] / "big", p.writeback_files, p.writeback_file_mb)
    s = m.sticks["copy"]
    s.sync()
    dev0 = s.bytes_written()
    t0 = time.perf_counter()
    command(m.env, "sync", m.dirs["copy"])
    t = time.perf_counter() - t0
    last = {x["path"]: x for x in status(m.env)["pins"]}[str(m.dirs["copy"])]["last_sync"]
    r["writeback_copy_file_bytes"] = last["bytes"]
    r["writeback_copy_seconds"] = round(t, 2)
    r["writeback_copy_device_bytes"] = s.bytes_written() - dev0
    r["writeback_copy_bytes_per_s"] = round(last["bytes"] / t, 0)
    # rsync alone, tmpfs to the plain stick
    src = m.tmpfs_dir / "big"
    payload = _write_large(src, p.writeback_files, p.writeback_file_mb)
    s = m.sticks["disk"]
    s.sync()
    t0 = time.perf_counter()
    subprocess.run(
        ["rsync", "-a", "--fsync", str(src) + "/", str(m.dirs["disk"] / "big") + "/"], check=True
    )
    s.sync()
    t = time.perf_counter() - t0
    r["writeback_rsync_bytes_per_s"] = round(payload / t, 0)
    r["writeback_vs_disk_seq_ratio"] = round(r["writeback_overlay_bytes_per_s"] / seq, 3)
    r["writeback_copy_vs_disk_seq_ratio"] = round(r["writeback_copy_bytes_per_s"] / seq, 3)
    r["writeback_rsync_vs_disk_seq_ratio"] = round(r["writeback_rsync_bytes_per_s"] / seq, 3)
    r["writeback_MBps"] = round(r["writeback_overlay_bytes_per_s"] / 1e6, 2)


# --------------------------------------------------------------------------- 5. timing


def timing(b: Bench) -> None:
    """A burst of writes into a cold directory; the daemon's rate (EMA) over time, and the times
    from the start of the burst to pinned and from its end to unpinned."""
    p = b.plan
    s = b.new_stick("timing")
    burst = s.mountpoint / "data" / "burst"
    burst.mkdir()
    for i in range(10):
        (burst / f"old{i}.log").write_text(f"line {i}\n" * 100)
    s.sync()
    env, d = b.daemon(
        "timing",
        s,
        adaptive={
            "half_life": _dur(p.half_life),
            "pin_above": p.pin_above,
            "hot_for": _dur(p.hot_for),
            "unpin_below": p.unpin_below,
            "cool_for": _dur(p.cool_for),
        },
    )
    s.throttle()
    marks: dict[str, float] = {}
    rates: list[tuple[float, float]] = []
    done = threading.Event()
    t_base = time.monotonic()

    def watch_mounts() -> None:
        while not done.is_set():
            now = time.monotonic()
            pinned = mounted(burst, "overlay")
            if pinned and "pinned" not in marks:
                marks["pinned"] = now
            if not pinned and "pinned" in marks and "unmounted" not in marks:
                marks["unmounted"] = now
            time.sleep(0.01)

    def watch_rate() -> None:
        # the pin leaves the status once its write-back is done: that is "unpinned"
        while not done.is_set():
            now = time.monotonic()
            with contextlib.suppress(Exception):
                st = status(env)
                rate = 0.0
                for c in st["candidates"] + st["pins"]:
                    if c["path"] == str(burst):
                        rate = c["rate"]
                rates.append((round(now - t_base, 2), rate))
                listed = any(x["path"] == str(burst) for x in st["pins"])
                if listed:
                    marks.setdefault("listed", now)
                elif "listed" in marks and "released" not in marks:
                    marks["released"] = now
            done.wait(0.1)

    threads = [threading.Thread(target=f, daemon=True) for f in (watch_mounts, watch_rate)]
    for t in threads:
        t.start()
    try:
        done.wait(1.0)  # a second of the cold directory on the chart
        writer = Writer(burst, rate=p.burst_rate)
        marks["burst_start"] = time.monotonic()
        try:
            done.wait(p.burst_seconds)
        finally:
            ops = writer.stop()
        marks["burst_end"] = time.monotonic()
        wait_for(lambda: "released" in marks, p.cool_for + 120, "the unpin after the burst")
        done.wait(1.0)
    finally:
        done.set()
        for t in threads:
            t.join(5)
    if "pinned" not in marks or marks["pinned"] > marks["burst_end"]:
        raise RuntimeError(
            "the burst did not pin the directory while it lasted:\n" + "\n".join(d.lines[-30:])
        )
    r = b.results
    r["time_to_pin_s"] = round(marks["pinned"] - marks["burst_start"], 2)
    r["time_to_unpin_s"] = round(marks["released"] - marks["burst_end"], 2)
    r["time_to_unmount_s"] = round(marks["unmounted"] - marks["burst_end"], 2)
    r["hot_for_s"] = p.hot_for
    r["cool_for_s"] = p.cool_for
    r["half_life_s"] = p.half_life
    r["pin_above_events_per_s"] = p.pin_above
    r["unpin_below_events_per_s"] = p.unpin_below
    r["burst_seconds"] = p.burst_seconds
    r["burst_writes_per_s"] = round(ops / p.burst_seconds, 0)
    r["burst_peak_rate_events_per_s"] = max((x[1] for x in rates), default=0.0)
    b.series["timing"] = {
        "rates": rates,
        "marks": {k: round(v - t_base, 2) for k, v in marks.items()},
        "pin_above": p.pin_above,
        "unpin_below": p.unpin_below,
        "path": str(burst),
    }
    for line in d.lines:
        if f"pinned {burst}:" in line or f"unpinned {burst}:" in line:
            b.facts.setdefault("timing_log", []).append(line)


def busy_pin(b: Bench) -> None:
    """A logger that opens, appends, fsyncs and closes 200 times a second, started in a new
    directory `busy_tries` times: how long until the directory is pinned (hot_for is 1 s, and a
    refused pin would wait 5 s for its next try), and how many tries were refused."""
    s = b.new_stick("busy")
    env, d = b.daemon("busy", s, adaptive={"hot_for": "1s", "cool_for": "30m"})
    waits: list[float] = []
    for i in range(b.plan.busy_tries):
        where = s.mountpoint / "data" / f"logs{i:02d}"
        logger = FsyncLogger(where / "app.log")
        t = time.monotonic()
        try:
            try:
                wait_for(lambda where=where: mounted(where, "overlay"), 60, f"the pin of {where}")
            except AssertionError as exc:
                raise RuntimeError(f"{exc}:\n" + "\n".join(d.lines[-20:])) from None
            waits.append(time.monotonic() - t)
        finally:
            logger.stop()

        def cooled(where: Path = where) -> bool:  # or it is pinned again at once
            st = status(env)
            return all(
                c["rate"] < 5 for c in st["pins"] + st["candidates"] if c["path"] == str(where)
            )

        wait_for(cooled, 60, f"the rate of {where} to fall")
        try:
            command(env, "unpin", where)
        except RuntimeError as exc:
            if "keeps trying" not in str(exc):  # asked while its pin was still being made
                raise
        wait_for(lambda where=where: not mounted(where), 60, f"the unpin of {where}")
    refused = sum(1 for line in d.lines if "not pinned: cannot pin" in line)
    r = b.results
    r["busy_writer_tries"] = len(waits)
    r["busy_writer_pinned_within_hot_for_plus_2s"] = sum(1 for w in waits if w <= 1.0 + 2.0)
    r["busy_writer_pin_s_median"] = round(statistics.median(waits), 2)
    r["busy_writer_pin_s_max"] = round(max(waits), 2)
    r["busy_writer_refusals"] = refused


# The unpin's own line: what it wrote after the unmount, and how long after the unmount the
# disk held all of it (rampiped/pins/overlay.py)
_SWITCH_LINE = re.compile(
    r"written back before the unmount .*; after it, (\d+) files, .* in (\d+) ms"
)


def switch(b: Bench) -> None:
    """An overlay pin of 64 MiB and of 1 GiB of new data unpinned on the throttled stick: how
    long from its unmount (the path shows the disk from then on) until the disk holds all of
    it, without and with a logger that appends (and fsyncs) a line every 20 ms through it. The
    unpin writes back before its unmount; after it, only what changed since is written."""
    for label, mb in b.plan.switch_sizes:
        # the data of both runs (each stays on the stick), a journal generation and room to spare
        s = b.new_stick(f"switch-{label}", size_mb=max(b.plan.stick_mb, 5 * mb + 256))
        env, d = b.daemon(
            f"switch-{label}",
            s,
            ram={"max": f"{2 * mb + 256}M", "min_free": "256M"},
            sync={"interval": 0},
            adaptive={"enabled": False},
        )
        s.throttle()
        for with_writer in (False, True):
            where = s.mountpoint / "data" / f"switch-{'writer' if with_writer else 'quiet'}"
            where.mkdir()
            command(env, "pin", where)
            files = max(1, mb // 16)
            _write_large(where / "big", files, mb // files)
            # a logger: open, append a line, fsync, close, 50 times a second
            writer = FsyncLogger(where / "app.log", rate=50) if with_writer else None
            behind = ShorterWatch(where / "app.log") if with_writer else None
            try:
                t0 = time.perf_counter()
                command(env, "unpin", where)
                took = time.perf_counter() - t0
            finally:
                if behind is not None:
                    behind.finish()
                if writer is not None:
                    writer.stop()
            found = [m for m in map(_SWITCH_LINE.search, d.lines) if m]
            if not found:
                raise RuntimeError("no write-back before the unmount:\n" + "\n".join(d.lines[-20:]))
            key = f"switch_ms_{label}" + ("_writer" if with_writer else "")
            b.results[key] = int(found[-1].group(2))
            b.results[f"{key}_files_after"] = int(found[-1].group(1))
            b.results[f"{key}_unpin_s"] = round(took, 2)
            shorter = ""
            if behind is not None:
                b.results[f"{key}_behind"] = round(behind.longest * 1000)
                shorter = (
                    "; a reader found the log shorter than before for"
                    f" {behind.longest * 1000:.0f} ms"
                )
            b.say(
                f"switch {label}{' with a writer' if with_writer else ''}: {found[-1].group(0)}"
                + shorter
            )
        if label == b.plan.switch_sizes[0][0]:
            switch_renamed(b, env, d, s.mountpoint / "data" / "switch-renamed", mb)


class ShorterWatch:
    """A reader of `path` (every millisecond) from now until `finish`: `longest`, the
    longest time in seconds that it found the file shorter than it had found it before (the
    path showing an older version of a file that is only appended to)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        most, since = 0, None
        while not self._stop.wait(0.001):
            now = time.perf_counter()
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size >= most:
                most = size
                if since is not None:
                    self.longest = max(self.longest, now - since)
                since = None
            elif since is None:
                since = now
        if since is not None:
            self.longest = max(self.longest, time.perf_counter() - since)

    def finish(self) -> None:
        self._stop.set()
        self._thread.join()


def switch_renamed(b: Bench, env: Env, d: Daemon, where: Path, mb: int) -> None:
    """The same unpin with a directory renamed through the pin (the overlay follows a redirect
    to its origin on disk): what the layer holds of it is written into the origin before the
    unmount, and it is moved to its new name after it, in which moment a reader finds that
    name missing: `switch_ms_renamed`, all that the unpin does after the unmount, the moves
    among it, and `switch_ms_renamed_missing`, the longest time a reader that looks without
    pause found the new name missing (the stick throttled)."""
    old = where / "old"
    old.mkdir(parents=True)
    for i in range(64):
        (old / f"f{i}").write_bytes(os.urandom(4096))
    os.sync()
    command(env, "pin", where)
    files = max(1, mb // 16)
    _write_large(where / "big", files, mb // files)
    (where / "old").rename(where / "new")
    (where / "new" / "f0").write_bytes(b"changed after the rename")
    seen = len(d.lines)
    stop = threading.Event()
    missing: list[float] = [0.0]  # the longest time the new name was missing, in seconds

    def look() -> None:
        since = None
        while not stop.is_set():
            now = time.perf_counter()
            if (where / "new" / "f0").exists():
                if since is not None:
                    missing[0] = max(missing[0], now - since)
                since = None
            elif since is None:
                since = now
        if since is not None:
            missing[0] = max(missing[0], time.perf_counter() - since)

    reader = threading.Thread(target=look, daemon=True)
    reader.start()
    t0 = time.perf_counter()
    try:
        command(env, "unpin", where)
    finally:
        took = time.perf_counter() - t0
        stop.set()
        reader.join()
    found = [m for m in map(_SWITCH_LINE.search, d.lines[seen:]) if m]
    if not found:
        raise RuntimeError("no write-back before the unmount:\n" + "\n".join(d.lines[-20:]))
    if (where / "old").exists() or (
        where / "new" / "f0"
    ).read_bytes() != b"changed after the rename":
        raise RuntimeError(f"{where}: the renamed directory is not where the pin showed it")
    b.results["switch_ms_renamed"] = int(found[-1].group(2))
    b.results["switch_ms_renamed_missing"] = round(missing[0] * 1000)
    b.results["switch_ms_renamed_unpin_s"] = round(took, 2)
    b.say(
        f"switch with a renamed directory: {found[-1].group(0)}; a reader found the new name"
        f" missing for {missing[0] * 1000:.0f} ms"
    )


def checkpoint_cost(b: Bench) -> None:
    """What a checkpoint costs on the throttled stick, by what it holds: a pin (each mode) of
    1,000 and of 20,000 new files of 200 bytes, checkpointed (the first checkpoint of new
    files), then one file rewritten and checkpointed again (one change). Bytes from the
    stick's own counter, the filesystem settled before and after each (Stick.settle: ext4
    writes journaled metadata to its place later, and a step is charged with its own); seconds
    of `rampipectl sync`."""
    r = b.results
    for mode in ("overlay", "copy"):
        for label, n in b.plan.checkpoint_files:
            name = f"cp-{mode}-{label}"
            # inodes for the files, their journal generation and the apply's links
            s = b.new_stick(name, size_mb=max(b.plan.stick_mb, n // 8))
            env, _d = b.daemon(name, s, sync={"interval": 0}, adaptive={"enabled": False})
            where = s.mountpoint / "data" / "many"
            where.mkdir()
            response = control.call(
                str(env.runtime / "control.sock"), "pin", {"path": str(where), "mode": mode}
            )
            if not response.get("ok"):
                raise RuntimeError(f"pin {where}: {response.get('error')}")
            s.throttle()
            small_files(where, n, "new")
            for step in ("new_files", "one_change"):
                if step == "one_change":
                    (where / "d00" / "f0").write_text("changed".ljust(200))
                s.settle()  # what the step before left for later is not this one's
                before = s.bytes_written()
                t0 = time.perf_counter()
                command(env, "sync", where)
                took = time.perf_counter() - t0
                s.settle()  # and what this one leaves for later is
                key = f"checkpoint_{step}_{label}_{mode}"
                r[f"{key}_bytes"] = s.bytes_written() - before
                r[f"{key}_s"] = round(took, 2)
                b.say(f"{key}: {r[f'{key}_bytes'] / 2**20:.2f} MiB, {took:.2f} s")
    for label, _n in b.plan.checkpoint_files:
        for step in ("one_change", "new_files"):
            keys = [f"checkpoint_{step}_{label}_{m}" for m in ("overlay", "copy")]
            r[f"checkpoint_bytes_{label}_{step}"] = max(r[f"{k}_bytes"] for k in keys)
            r[f"checkpoint_s_{label}_{step}"] = max(r[f"{k}_s"] for k in keys)


# --------------------------------------------------------------------------- 6. bytes back


def writeback_bytes(b: Bench) -> None:
    """The same log-directory changes for `wb_seconds` into (2) an overlay pin, (3) a copy pin
    and (4) a log2ram-style copy, each on its own stick, write-back every `wb_interval`; then
    the final write-back. Bytes written to each stick, from its own counters."""
    p = b.plan
    names = {"overlay": "wb-overlay", "copy": "wb-copy", "tmpfs_copy": "wb-log2ram"}
    sticks = {k: b.new_stick(v) for k, v in names.items()}
    dirs = {k: s.mountpoint / "data" / "logs" for k, s in sticks.items()}
    for d in dirs.values():
        workloads.seed_logs(d)
    for s in sticks.values():
        s.sync()
    envs = {}
    daemons = {}
    for mode in ("overlay", "copy"):
        envs[mode], daemons[mode] = b.daemon(
            f"wb-{mode}",
            sticks[mode],
            log_level="debug",
            adaptive={"enabled": False},
            pins=[{"path": str(dirs[mode]), "mode": mode, "sync_interval": _dur(p.wb_interval)}],
        )
    copy = TmpfsCopy(dirs["tmpfs_copy"], b.tmp / "wb4-ram", b.tmp / "wb4-disk", p.wb_interval)
    copy.start()
    b.stack.callback(copy.stop, False)
    for s in sticks.values():
        s.throttle()
        s.sync()
    b.sampler.watch("writeback", sticks)
    base = {k: s.bytes_written() for k, s in sticks.items()}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.workloads",
            "log_day",
            str(dirs["overlay"]),
            str(p.wb_seconds),
            "--more-dirs",
            str(dirs["copy"]),
            str(dirs["tmpfs_copy"]),
        ],
        check=True,
        capture_output=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    expected = manifest(dirs["overlay"], times=False)
    for k, s in sticks.items():  # written before the final write-back (not synced: as it came)
        b.results[f"wb_{k}_device_bytes_before_final"] = s.bytes_written() - base[k]
    file_bytes = {}
    for mode in ("overlay", "copy"):
        file_bytes[mode] = command(envs[mode], "unpin", dirs[mode])["bytes"]
    copy.stop(final_sync=True)
    for s in sticks.values():
        s.sync()
    b.sampler.end("writeback")
    dev = {k: s.bytes_written() - base[k] for k, s in sticks.items()}
    same = True
    for k, d in dirs.items():
        diff = diff_manifests(expected, manifest(d, times=False))
        if diff:
            same = False
            b.facts.setdefault("wb_differences", []).append(f"{k}: " + "; ".join(diff[:5]))
    r = b.results
    for k in sticks:
        r[f"wb_{k}_device_bytes"] = dev[k]
    r["wb_tmpfs_copy_rsync_file_bytes"] = copy.bytes
    r["wb_tmpfs_copy_syncs"] = copy.syncs
    r["wb_seconds"] = p.wb_seconds
    r["wb_interval_s"] = p.wb_interval
    r["wb_trees_identical"] = same
    r["writeback_bytes_overlay_vs_log2ram_style"] = round(dev["overlay"] / dev["tmpfs_copy"], 2)
    r["writeback_bytes_copy_vs_log2ram_style"] = round(dev["copy"] / dev["tmpfs_copy"], 2)
    r["writeback_bytes_vs_log2ram_style"] = max(
        r["writeback_bytes_overlay_vs_log2ram_style"], r["writeback_bytes_copy_vs_log2ram_style"]
    )
    for mode in envs:
        r[f"wb_{mode}_unpin_file_bytes"] = file_bytes[mode]
        r[f"wb_{mode}_checkpoints"] = 0
        for line in daemons[mode].lines:
            if any(
                w in line
                for w in ("checkpoint of", "unpinned", "copying again", "before the unmount")
            ):
                b.facts.setdefault("wb_log", []).append(f"({mode}) {line}")
                r[f"wb_{mode}_checkpoints"] += "checkpoint of" in line
    b.series["writeback_device_mb"] = b.sampler.series["writeback"]


def _by_content(root: Path, found: dict[str, Any]) -> dict[str, Any]:
    """`found` (a manifest of `root`) with each SQLite database compared by its rows, not its
    bytes: a copy made by SQLite's backup API carries another schema cookie and change counter
    (it bumps them so that other connections reread the schema), the rows are the same. And
    each gzip file (logrotate's compress) by what it holds: gzip writes the time it ran into
    its header, and the trees' logrotate runs may fall into different seconds."""
    out = dict(found)
    for rel, entry in found.items():
        if rel.endswith(".gz") and entry.get("type") == "file":
            inside = hashlib.sha256(gzip.decompress((root / rel).read_bytes())).hexdigest()
            out[rel] = {**entry, "size": None, "sha256": None, "gunzipped": inside}
        if rel.endswith(".db") and entry.get("type") == "file":
            con = sqlite3.connect(f"file:{root / rel}?mode=ro", uri=True)
            try:
                rows = "\n".join(con.iterdump())
            finally:
                con.close()
            out[rel] = {**entry, "size": None, "sha256": None, "rows": hash_text(rows)}
    return out


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def varlog_bytes(b: Bench) -> None:
    """A /var/log-like tree (syslog-style logs, a small SQLite state database) with real
    logrotate runs (create, copytruncate, compress) for `lr_seconds`, the same changes in (2) an
    overlay pin, (3) a copy pin, (4) a log2ram-style copy and on the plain stick with no RAM,
    each on its own stick; checkpoints (and the copy's syncs) every `lr_interval`. Bytes
    written to each stick, from its own counters."""
    p = b.plan
    names = {
        "overlay": "lr-overlay",
        "copy": "lr-copy",
        "tmpfs_copy": "lr-log2ram",
        "plain": "lr-plain",
    }
    sticks = {k: b.new_stick(v) for k, v in names.items()}
    dirs = {k: s.mountpoint / "data" / "log" for k, s in sticks.items()}
    for d in dirs.values():
        workloads.seed_varlog(d)
    for s in sticks.values():
        s.sync()
    envs, daemons = {}, {}
    for mode in ("overlay", "copy"):
        envs[mode], daemons[mode] = b.daemon(
            f"lr-{mode}",
            sticks[mode],
            log_level="debug",
            adaptive={"enabled": False},
            pins=[{"path": str(dirs[mode]), "mode": mode, "sync_interval": _dur(p.lr_interval)}],
        )
    copy = TmpfsCopy(dirs["tmpfs_copy"], b.tmp / "lr4-ram", b.tmp / "lr4-disk", p.lr_interval)
    copy.start()
    b.stack.callback(copy.stop, False)
    for s in sticks.values():
        s.throttle()
        s.sync()
    base = {k: s.bytes_written() for k, s in sticks.items()}
    state_dir = b.tmp / "lr-state"
    state_dir.mkdir(exist_ok=True)
    subprocess.run(
        [
            sys.executable, "-m", "bench.workloads", "varlog_day", str(dirs["plain"]),
            str(p.lr_seconds), "--more-dirs", str(dirs["overlay"]), str(dirs["copy"]),
            str(dirs["tmpfs_copy"]), "--rotate-every", str(p.lr_rotate),
            "--state-dir", str(state_dir),
        ],
        check=True,
        capture_output=True,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    r = b.results
    for mode in ("overlay", "copy"):
        pin = {x["path"]: x for x in status(envs[mode])["pins"]}[str(dirs[mode])]
        r[f"lr_{mode}_written_bytes"] = pin.get("written_bytes")
        r[f"lr_{mode}_whole_file_bytes"] = pin.get("whole_file_bytes")
        command(envs[mode], "unpin", dirs[mode])
    copy.stop(final_sync=True)
    for s in sticks.values():
        s.sync()
    dev = {k: s.bytes_written() - base[k] for k, s in sticks.items()}
    expected = _by_content(dirs["plain"], manifest(dirs["plain"], times=False))
    same = True
    for k, d in dirs.items():
        diff = diff_manifests(expected, _by_content(d, manifest(d, times=False)))
        if diff:
            same = False
            b.facts.setdefault("lr_differences", []).append(f"{k}: " + "; ".join(diff[:5]))
    for k in sticks:
        r[f"lr_{k}_device_bytes"] = dev[k]
    r["lr_seconds"] = p.lr_seconds
    r["lr_interval_s"] = p.lr_interval
    r["lr_rotate_s"] = p.lr_rotate
    r["lr_trees_identical"] = same
    for mode in ("overlay", "copy"):
        r[f"logrotate_bytes_{mode}_vs_log2ram_style"] = round(dev[mode] / dev["tmpfs_copy"], 2)
        r[f"logrotate_bytes_{mode}_vs_plain_stick"] = round(dev[mode] / dev["plain"], 2)
    r["logrotate_bytes_vs_log2ram_style"] = max(
        r["logrotate_bytes_overlay_vs_log2ram_style"], r["logrotate_bytes_copy_vs_log2ram_style"]
    )
    r["logrotate_bytes_vs_plain_stick"] = max(
        r["logrotate_bytes_overlay_vs_plain_stick"], r["logrotate_bytes_copy_vs_plain_stick"]
    )
    for mode in envs:
        for line in daemons[mode].lines:
            if "checkpoint of" in line or "unpinned" in line:
                b.facts.setdefault("lr_log", []).append(f"({mode}) {line}")


# --------------------------------------------------------------------------- 7. monitor


def _cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _daemon_events(env: Env) -> tuple[int, int]:
    mon = status(env)["monitor"]  # the reader thread's totals: counted as read
    return int(mon["events"]), int(mon["lost"])


def _settled_events(env: Env) -> tuple[int, int]:
    """The daemon's totals once nothing more arrives (earlier events are all counted)."""
    last = _daemon_events(env)
    for _ in range(50):
        time.sleep(0.1)
        now = _daemon_events(env)
        if now == last:
            break
        last = now
    return last


def monitor(b: Bench) -> None:
    p = b.plan
    r = b.results
    fs = b.stack.enter_context(make_loopfs(b.tmp / "mon", size_mb=2048))
    # two fresh, identical filesystems for the writer's speed: one watched, one not
    watched_fs = b.stack.enter_context(make_loopfs(b.tmp / "watched", size_mb=1024))
    bare = b.stack.enter_context(make_loopfs(b.tmp / "bare", size_mb=1024))
    (watched_fs.mountpoint / "data").mkdir()
    # the monitor alone, in this process, draining as the daemon's loop does
    cap = monitor_capacity.capacity(fs.mountpoint / "capacity", steps=p.capacity_steps)
    r["monitor_only_events_per_s_lossless"] = cap["monitor_events_per_s_lossless"]
    for key, value in cap.items():
        if key != "monitor_events_per_s_lossless":
            r[f"monitor_only_{key}"] = value
    (fs.mountpoint / "data").mkdir()
    env, d = b.daemon(
        "monitor",
        fs,
        adaptive={  # watch, never pin
            "watch": [
                {"path": str(fs.mountpoint / "data"), "depth": 1},
                {"path": str(watched_fs.mountpoint / "data"), "depth": 1},
            ],
            "pin_above": 100_000_000,
            "half_life": "10s",
        },
    )
    pid = d.proc.pid
    # the daemon at full speed: every event counted, none lost?
    best = 0.0
    for label, writers in (("full_1w", 1), ("full_2w", 2), ("full_4w", 4)):
        steps = p.capacity_steps // writers
        expected = writers * steps * monitor_capacity.EVENTS_PER_STEP
        root = fs.mountpoint / "data" / label
        monitor_capacity._prepare(root)  # its mkdirs are not the writers' events
        ev0, lost0 = _settled_events(env)
        run = monitor_capacity.workload(root, writers, steps)
        t_end = time.perf_counter()

        def counted(ev0: int = ev0, expected: int = expected) -> bool:
            return _daemon_events(env)[0] - ev0 >= expected

        with contextlib.suppress(AssertionError):  # events were lost: the count stays short
            wait_for(counted, 10, "the daemon to count every event", interval=0.02)
        lag = time.perf_counter() - t_end  # from the writers' end until all was counted
        ev1, lost1 = _daemon_events(env)
        seen, lost = ev1 - ev0, lost1 - lost0
        rate = seen / (run.writer_seconds + lag)
        r[f"daemon_{label}_events_per_s"] = round(rate, 0)
        r[f"daemon_{label}_lost"] = lost
        r[f"daemon_{label}_missing_events"] = expected - seen
        if lost == 0 and seen == expected:
            best = max(best, rate)
    r["monitor_events_per_s_lossless"] = round(best, 0)
    # CPU of the daemon at a steady 10k events/s
    steps_per_s = p.cpu_events_per_s / monitor_capacity.EVENTS_PER_STEP
    steps = int(steps_per_s * p.cpu_seconds)
    ev0, lost0 = _daemon_events(env)
    c0 = _cpu_seconds(pid)
    w0 = time.perf_counter()
    run = monitor_capacity.workload(fs.mountpoint / "data" / "cpu", 1, steps, steps_per_s)
    wall = time.perf_counter() - w0
    c1 = _cpu_seconds(pid)
    ev1, lost1 = _daemon_events(env)
    r["daemon_cpu_pct_at_10k_events"] = round(100 * (c1 - c0) / wall, 1)
    r["daemon_cpu_test_events_per_s"] = round((ev1 - ev0) / wall, 0)
    r["daemon_cpu_test_lost"] = lost1 - lost0
    proc = psutil.Process(pid)
    r["daemon_rss_mb"] = round(proc.memory_info().rss / MiB, 1)
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                r["daemon_peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    # what watching costs the writer: the same writer on the watched filesystem and on an
    # identical unwatched one, alternating, median of the ratios
    ratios = []
    cpu = wall = 0.0
    for i in range(p.ratio_rounds):
        c0, w0 = _cpu_seconds(pid), time.perf_counter()
        watched = monitor_capacity.workload(
            watched_fs.mountpoint / "data" / f"ratio{i}", 1, p.ratio_steps
        )
        cpu += _cpu_seconds(pid) - c0
        wall += time.perf_counter() - w0
        unwatched = monitor_capacity.workload(bare.mountpoint / f"ratio{i}", 1, p.ratio_steps)
        ratios.append(watched.steps_per_s / unwatched.steps_per_s)
    r["monitored_workload_ratio"] = round(statistics.median(ratios), 3)
    # the same with the monitor alone, in this process (no daemon): side by side
    only = monitor_capacity.workload_ratio(
        bare.mountpoint / "only", rounds=p.ratio_rounds, steps=p.ratio_steps
    )
    r["monitor_only_workload_ratio"] = only["monitored_workload_ratio"]
    r["monitored_workload_ratio_min"] = round(min(ratios), 3)
    r["monitored_workload_ratio_max"] = round(max(ratios), 3)
    r["daemon_cpu_pct_while_watched_writer_runs"] = round(100 * cpu / wall, 1)


# --------------------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    mem = psutil.virtual_memory().total
    distro = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    return {
        "date": datetime.date.today().isoformat(),
        "kernel": platform.release(),
        "cores": os.cpu_count() or 0,
        "ram_gib": round(mem / 1024**3, 1),
        "distro": distro,
        "python": platform.python_version(),
    }


def preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root (make bench): loop devices, mounts, fanotify, blkio rules")
    for tool in ("fio", "rsync", "mkfs.ext4", "losetup"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is missing (make deps installs it)")
    if not os.environ.get("RAMPIPED_TEST_MNTNS") and "--any-namespace" not in sys.argv:
        problems.append(
            "run through `make bench`: it gives the benchmark a private mount namespace"
            " (or pass --any-namespace inside `unshare -m --propagation private`)"
        )
    if problems:
        raise SystemExit("bench: cannot run:\n  " + "\n  ".join(problems))
    blkio_root()  # raises with the reason when the throttle is not available


def run(plan: Plan, out: Path, parts: set[str] | None = None) -> dict[str, Any]:
    """The whole benchmark (or the named parts); returns the summary and writes `out`."""

    def want(part: str) -> bool:
        return parts is None or part in parts

    cleared = sweep_stale_rules()
    if cleared:
        print(f"removed throttle rules left on free loop devices: {', '.join(cleared)}")
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="rp-bench-"))
        stack.callback(_remove_tree, tmp)  # last: after everything below it is unmounted
        b = Bench(plan, stack, tmp)
        b.say(f"working in {b.tmp}; plan: {json.dumps(asdict(plan))}")
        sql = None
        steps: list[tuple[str, Callable[[], Any]]] = []
        if want("sqlite"):
            sql = SqliteRun(b)
            steps.append(("SQLite experiment started (runs in the background)", sql.start))
        plain: list[Stick] = []
        steps.append(("stick profile", lambda: plain.append(stick_profile(b))))
        mat: list[Matrix] = []
        if want("matrix"):
            steps.append(("throughput matrix", lambda: mat.append(matrix(b, plain[0]))))
            steps.append(("write-back throughput", lambda: writeback(b, mat[0])))
        if want("timing"):
            steps.append(("pin timing", lambda: timing(b)))
        if want("wbbytes"):
            steps.append(("write-back bytes against log2ram", lambda: writeback_bytes(b)))
        if want("logrotate"):
            steps.append(("a /var/log with real logrotate runs", lambda: varlog_bytes(b)))
        if want("monitor"):
            steps.append(("monitor", lambda: monitor(b)))
        if want("memory"):
            steps.append(("daemon memory over many directories", lambda: daemon_memory(b)))
        if want("ledger"):
            steps.append(("content check cost", lambda: ledger_cost(b)))
        if want("switch"):
            steps.append(("the switch of an unpin", lambda: switch(b)))
        if want("busy"):
            steps.append(("pins of a busy logger", lambda: busy_pin(b)))
        if want("zram"):
            steps.append(("compressed RAM (zram): RAM per byte", lambda: zram.ram_ratio(b)))
            steps.append(("compressed RAM (zram): throughput, CPU", lambda: zram.throughput(b)))
        if want("checkpoints"):
            steps.append(("checkpoint cost by pin size", lambda: checkpoint_cost(b)))
        if sql is not None:
            steps.append(("SQLite experiment", sql.finish))
        for what, step in steps:
            t = time.monotonic()
            step()
            b.say(f"{what}: {time.monotonic() - t:.1f} s")
        results = dict(b.results)
        results.update({f"machine_{k}": v for k, v in machine().items()})
        results["bench_plan"] = "quick" if plan == QUICK else "full"
        facts, series = dict(b.facts), dict(b.series)
        results["bench_total_s"] = round(time.monotonic() - b.t0, 1)
    results["bench_total_s"] = round(time.monotonic() - b.t0, 1)  # teardown included
    report.write(out, results, series, facts, asdict(plan))
    return results


def _remove_tree(tmp: Path) -> None:
    below = [m for m in mount_points() if m == str(tmp) or m.startswith(str(tmp) + "/")]
    if below:
        print(f"warning: still mounted, {tmp} is left in place: {below}", file=sys.stderr)
        return
    shutil.rmtree(tmp, ignore_errors=True)


def _interrupted(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every cleanup


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the same run in miniature (a minute)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=[
            "sqlite",
            "matrix",
            "timing",
            "wbbytes",
            "logrotate",
            "monitor",
            "memory",
            "ledger",
            "busy",
            "switch",
            "zram",
            "checkpoints",
        ],
        help="run only these parts (the stick profile always runs)",
    )
    ap.add_argument("--any-namespace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    preflight()
    signal.signal(signal.SIGTERM, _interrupted)
    plan = QUICK if args.quick else Plan()
    results = run(plan, args.out, set(args.only) if args.only else None)
    print()
    print(report.summary_text(results))
    print(f"\nreport: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
