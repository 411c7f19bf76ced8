"""Compressed RAM (`ram.backend: zram`): `--only zram`.

Two measures:

- `ram_ratio`: RAM per stored byte of the area a pin gets, made the way the daemon makes it,
  on the log tree, the SQLite database and access logs.
- `throughput`: workloads (a)-(d) in a static copy pin of the real daemon with `ram.backend:
  zram` (its files on the compressed device, as a user's would be), against a plain tmpfs, a
  copy pin of a second daemon on the default tmpfs backend, and a zram area alone (made as
  the daemon makes one, no daemon: what the backend costs without rampiped), in interleaved
  rounds (the order rotates each round), medians. With each run the CPU it cost: the
  kernel's and the daemon's own.

Where compression runs: zram compresses a page when a write reaches the device, in the task
that submits it: the writer's fsync, a flusher kworker, or a syncfs. The daemon compresses
nothing; what it spends while a workload runs is its fanotify reader and its loop. So the
kernel's CPU is the figure that carries the cost of compression, and the plain tmpfs and the
tmpfs pin beside it show what the same run costs the kernel without it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from bench import workloads
from rampiped import osutil, ramarea
from rampiped.pins.model import SOURCE_PREFIX, TMPFS_HEADROOM
from tests.system.helpers import mountinfo

if TYPE_CHECKING:
    from bench.run import Bench
    from tests.system.daemon_harness import Env

COMPRESSION = "lz4"
# a plain tmpfs; a copy pin on tmpfs; a zram area alone (no daemon); a copy pin on zram
CONFIGS = ("tmpfs", "tmpfs_pin", "zram_area", "zram")
PINS = ("tmpfs_pin", "zram")
RAM_MAX = 256 << 20  # the pins' ram.max; their areas are TMPFS_HEADROOM times that
_TICK = os.sysconf("SC_CLK_TCK")
_KTHREADD = 2  # the parent of every kernel thread


def _usable(b: Bench, what: str) -> bool:
    """Whether this kernel offers zram with COMPRESSION; if not, the reason is recorded."""
    unusable = ramarea.check(ramarea.Backend("zram", COMPRESSION))
    if unusable is not None:
        b.say(f"{what} not measured: {unusable}")
        b.results["zram_not_measured"] = unusable
    return unusable is None


def ram_ratio(b: Bench) -> None:
    """RAM used per stored byte with ram.backend zram (the area a pin gets, made the way the
    daemon makes it): on the log tree (workloads.seed_logs) and on the SQLite load's database
    (workloads.seed_db). The larger of the two is `zram_ram_per_stored_byte`. Beside it, the
    same for text that holds no random tokens: access logs (workloads.seed_access_logs) and a
    database of configuration files in pmxcfs's layout (workloads.seed_text_db); the larger
    of those two is `zram_ram_per_stored_byte_text`."""
    r = b.results
    if not _usable(b, "compressed RAM"):
        return
    seeds: tuple[tuple[str, Callable[[Path], None]], ...] = (
        ("logs", lambda d: workloads.seed_logs(d / "logs")),
        ("sqlite", lambda d: workloads.seed_db(d / "db.sqlite")),
        ("access_logs", lambda d: workloads.seed_access_logs(d / "logs")),
        ("text_db", lambda d: workloads.seed_text_db(d / "config.db")),
    )
    for name, seed in seeds:
        area = b.tmp / f"zram-{name}"
        area.mkdir()
        backend = ramarea.Backend("zram", COMPRESSION)
        ramarea.mount(str(area), backend=backend, size=256 << 20, source="rp-bench-zram")
        try:
            seed(area)
            os.sync()
            u = ramarea.usage(str(area))
        finally:
            ramarea.unmount(str(area))
        r[f"zram_ram_per_stored_byte_{name}"] = u.ratio
        r[f"zram_stored_mb_{name}"] = round(u.stored / 1e6, 2)
        r[f"zram_ram_mb_{name}"] = round(u.ram / 1e6, 2)
    r["zram_compression"] = COMPRESSION
    r["zram_ram_per_stored_byte"] = max(
        r["zram_ram_per_stored_byte_logs"], r["zram_ram_per_stored_byte_sqlite"]
    )
    r["zram_ram_per_stored_byte_text"] = max(
        r["zram_ram_per_stored_byte_access_logs"], r["zram_ram_per_stored_byte_text_db"]
    )


# --------------------------------------------------------------------------- CPU counters


@dataclass(frozen=True)
class Counters:
    """CPU seconds so far, read at one moment (kernel threads apart: see measure)."""

    machine: float  # the whole machine: system + irq + softirq of /proc/stat
    writer_sys: float  # this process's waited children (the workloads, fio): system time
    own_sys: float  # this process's system time (the syncfs after a run)
    daemon: float  # the daemon's user + system, its children's included (0: no daemon)
    zram_written: int  # bytes the zram device received (0: no device)


def _machine_kernel_seconds() -> float:
    with open("/proc/stat") as f:
        cpu = f.readline().split()  # cpu user nice system idle iowait irq softirq ...
    return (int(cpu[3]) + int(cpu[6]) + int(cpu[7])) / _TICK


def _kthread_seconds() -> dict[int, float]:
    """Each kernel thread's CPU seconds (kworkers, the flushers), by pid."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the name: state ppid ...
            if int(fields[1]) == _KTHREADD:
                out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def _kthread_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU of kernel threads between two reads; one that started between them counts whole,
    one that ended between them is lost (kworkers come and go; most live long)."""
    return sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in after.items())


def _daemon_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def _zram_written(n: int | None) -> int:
    if n is None:
        return 0
    with open(f"/sys/block/zram{n}/stat") as f:
        return int(f.read().split()[6]) * 512  # sectors written


def counters(pid: int | None, zram: int | None) -> Counters:
    return Counters(
        machine=_machine_kernel_seconds(),
        writer_sys=resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime,
        own_sys=resource.getrusage(resource.RUSAGE_SELF).ru_stime,
        daemon=_daemon_seconds(pid),
        zram_written=_zram_written(zram),
    )


@dataclass(frozen=True)
class Run:
    """One run of a workload, its CPU in seconds."""

    ops_per_s: float
    ops: float  # operations done; MB for (d)
    wall: float  # seconds, the syncfs after it included
    kernel: float  # writer_sys + kthreads + the syncfs: the kernel's work for this run
    writer_sys: float  # where zram compresses what a writer's fsync writes
    kthreads: float  # where it compresses what the flushers write back
    machine: float  # the whole machine's kernel time, whatever else ran meanwhile
    daemon: float
    zram_written: int


def measure(
    wl: str, directory: Path, seconds: float, kw: dict[str, Any], pid: int | None, zram: int | None
) -> Run:
    """One run of workload `wl` in `directory`, then a syncfs of its filesystem: what the run
    left dirty is compressed inside its own window, not in the next run's (on tmpfs, nothing).
    The kernel threads are read outside the window (reading /proc is not the run's work)."""
    k0 = _kthread_seconds()
    c0 = counters(pid, zram)
    t0 = time.perf_counter()
    res = workloads.run(wl, directory, seconds, **kw)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        osutil.syncfs(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    c1 = counters(pid, zram)
    kthreads = _kthread_delta(k0, _kthread_seconds())
    writer_sys = c1.writer_sys - c0.writer_sys
    return Run(
        ops_per_s=res["ops_per_s"],
        ops=res["bytes"] / 1e6 if wl == "large_seq" else res["ops"],
        wall=wall,
        kernel=writer_sys + kthreads + c1.own_sys - c0.own_sys,
        writer_sys=writer_sys,
        kthreads=kthreads,
        machine=c1.machine - c0.machine,
        daemon=c1.daemon - c0.daemon,
        zram_written=c1.zram_written - c0.zram_written,
    )


# --------------------------------------------------------------------------- the pins


def _mount_of(path: Path) -> dict[str, str]:
    """The mount on `path` (the last one: the one it shows)."""
    found = None
    for m in mountinfo():
        if m["mountpoint"] == str(path):
            found = m
    if found is None:
        raise RuntimeError(f"{path} is not a mount point: the static pin is not there")
    return found


def _free_left(devices: list[tuple[int, str]]) -> None:
    """After the daemons stopped: a zram device of theirs still there (the daemon's unpin
    removes it; a daemon that was killed does not) is reset and removed. Recognised by its
    number and its filesystem's label, the pin's id: a number alone may be another's by now."""
    for n, label in devices:
        if not os.path.exists(f"/sys/block/zram{n}") or ramarea._label(n) != label:
            continue
        print(f"warning: zram{n} ({label}) was left by the daemon; removing it", file=sys.stderr)
        try:
            ramarea.free(n)
        except OSError as exc:
            print(f"warning: zram{n} stays: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------- throughput


def throughput(b: Bench) -> None:
    """(a)-(d) in a zram copy pin, a tmpfs copy pin, a zram area alone and a plain tmpfs,
    interleaved; the ops/s and the CPU of each run. Checkpoints are off (sync.interval 0): a
    checkpoint is write-back, measured in the other parts, and would fall into some runs."""
    p = b.plan
    r = b.results
    if not _usable(b, "zram throughput"):
        return
    dirs = {"tmpfs": b.mount_tmpfs(b.tmp / "z-tmpfs") / "w"}
    area = b.tmp / "z-zram-area"
    area.mkdir()
    backend = ramarea.Backend("zram", COMPRESSION)
    ramarea.mount(
        str(area), backend=backend, size=int(RAM_MAX * TMPFS_HEADROOM), source="rp-bench-zram-area"
    )
    b.stack.callback(ramarea.unmount, str(area))
    dirs["zram_area"] = area / "w"
    sticks = {cfg: b.new_stick(f"z-{cfg.replace('_', '-')}") for cfg in PINS}
    for cfg, s in sticks.items():
        dirs[cfg] = s.mountpoint / "data" / "w"
    for d in dirs.values():
        d.mkdir()
        workloads.seed_db(d / workloads.DB_NAME)
    for s in sticks.values():
        s.sync()
    left: list[tuple[int, str]] = []
    b.stack.callback(_free_left, left)  # after the daemons' stop, registered below
    pids: dict[str, int | None] = {"tmpfs": None, "zram_area": None}
    devices: dict[str, int | None] = {"tmpfs": None, "zram_area": ramarea.device_of(str(area))}
    envs = {}
    for cfg in PINS:
        ram: dict[str, Any] = {"max": f"{RAM_MAX >> 20}M"}
        if cfg == "zram":
            ram.update(backend="zram", compression=COMPRESSION)
        envs[cfg], daemon = b.daemon(
            f"z-{cfg.replace('_', '-')}",
            sticks[cfg],
            ram=ram,
            adaptive={"enabled": False},
            pins=[{"path": str(dirs[cfg]), "mode": "copy"}],
        )
        pids[cfg], devices[cfg] = daemon.proc.pid, _check_pin(envs[cfg], cfg, dirs[cfg])
        n = devices[cfg]
        if n is not None:
            label = ramarea._label(n)
            if label is not None:
                left.append((n, label))
            b.facts["zram_pin_mount"] = (
                f"`{_mount_of(dirs[cfg])['source']}` on {dirs[cfg]}, type ext4: /dev/zram{n},"
                f" compressor {_chosen(n)}"
            )
    runs: dict[str, dict[str, list[Run]]] = {}
    for rnd in range(p.rounds):
        for wl in workloads.WORKLOADS:
            order = CONFIGS[rnd % len(CONFIGS) :] + CONFIGS[: rnd % len(CONFIGS)]
            for cfg in order:
                kw: dict[str, Any] = {"file_mb": p.large_file_mb} if wl == "large_seq" else {}
                run = measure(wl, dirs[cfg], p.workload_seconds, kw, pids[cfg], devices[cfg])
                runs.setdefault(wl, {}).setdefault(cfg, []).append(run)
        b.say(f"zram round {rnd + 1}/{p.rounds} done")
    for cfg in PINS:  # still the same pins
        if _check_pin(envs[cfg], cfg, dirs[cfg]) != devices[cfg]:
            raise RuntimeError(f"the pin of {dirs[cfg]} moved to another device during the runs")
    summarize(r, runs)
    r["zram_bench_rounds"] = p.rounds
    r["zram_bench_seconds_per_run"] = p.workload_seconds
    b.series["zram_runs"] = {
        wl: {cfg: [vars(x) for x in v] for cfg, v in row.items()} for wl, row in runs.items()
    }


def _check_pin(env: Env, cfg: str, path: Path) -> int | None:
    """The number of the zram device under the copy pin of `path` (None: tmpfs). Raises when
    the pin is not there, or not on the backend `cfg` says."""
    from bench.run import status

    pins = {x["path"]: x for x in status(env)["pins"]}
    pin = pins.get(str(path))
    if pin is None or pin.get("state") != "pinned":
        raise RuntimeError(f"the static pin of {path} is not there: {pins}")
    m = _mount_of(path)
    n = ramarea.device_of(str(path))
    if cfg == "zram":
        fine = n is not None and m["fstype"] == "ext4" and pin.get("ram_backend") == "zram"
        if fine and n is not None and _chosen(n) != COMPRESSION:
            raise RuntimeError(f"zram{n} compresses with {_chosen(n)}, not {COMPRESSION}")
    else:
        fine = n is None and m["fstype"] == "tmpfs" and pin.get("ram_backend") == "tmpfs"
    if not fine or not m["source"].startswith(SOURCE_PREFIX):
        raise RuntimeError(f"the pin of {path} is not on {cfg}: mount {m}, status {pin}")
    return n


def _chosen(n: int) -> str:
    """The compressor device `n` uses (comp_algorithm marks it with [])."""
    for a in ramarea._read(f"/sys/block/zram{n}/comp_algorithm").split():
        if a.startswith("["):
            return a.strip("[]")
    return "?"


def summarize(r: dict[str, Any], runs: dict[str, dict[str, list[Run]]]) -> None:
    """The medians of `runs` (workload -> configuration -> runs) as flat figures."""

    def med(values: list[float], digits: int) -> float:
        return round(statistics.median(values), digits)

    spread = 1.0
    for wl, row in runs.items():
        for cfg, rs in row.items():
            r[f"{cfg}_ops_{wl}"] = med([x.ops_per_s for x in rs], 1)
            r[f"{cfg}_kernel_cpu_s_{wl}"] = med([x.kernel for x in rs], 3)
            r[f"{cfg}_kernel_cpu_us_per_op_{wl}"] = med([1e6 * x.kernel / x.ops for x in rs], 1)
            r[f"{cfg}_machine_kernel_cpu_s_{wl}"] = med([x.machine for x in rs], 3)
            if cfg in PINS:
                r[f"{cfg}_daemon_cpu_pct_{wl}"] = med([100 * x.daemon / x.wall for x in rs], 2)
            if cfg.startswith("zram"):
                r[f"{cfg}_device_mb_per_run_{wl}"] = med([x.zram_written / 1e6 for x in rs], 1)
            ops = [x.ops_per_s for x in rs]
            if min(ops) > 0:
                spread = max(spread, max(ops) / min(ops))
        ops_of = {cfg: r[f"{cfg}_ops_{wl}"] for cfg in row}
        r[f"zram_vs_tmpfs_{wl}_ratio"] = round(ops_of["zram"] / ops_of["tmpfs"], 3)
        r[f"zram_vs_tmpfs_pin_{wl}_ratio"] = round(ops_of["zram"] / ops_of["tmpfs_pin"], 3)
        r[f"tmpfs_pin_vs_tmpfs_{wl}_ratio"] = round(ops_of["tmpfs_pin"] / ops_of["tmpfs"], 3)
        r[f"zram_area_vs_tmpfs_{wl}_ratio"] = round(ops_of["zram_area"] / ops_of["tmpfs"], 3)
    for cfg, rs in runs.get("large_seq", {}).items():  # (d) counts MB: CPU per GB written
        r[f"{cfg}_kernel_cpu_s_per_gb_large_seq"] = med([1e3 * x.kernel / x.ops for x in rs], 2)
    for cfg in PINS:
        mine = [x for row in runs.values() for x in row.get(cfg, [])]
        wall = sum(x.wall for x in mine)
        r[f"{cfg}_daemon_cpu_pct"] = round(100 * sum(x.daemon for x in mine) / wall, 2)
    zram_runs = [x for row in runs.values() for x in row.get("zram", [])]
    kernel = sum(x.kernel for x in zram_runs)
    if kernel > 0:
        r["zram_kernel_cpu_writer_share"] = round(sum(x.writer_sys for x in zram_runs) / kernel, 3)
        r["zram_kernel_cpu_kthread_share"] = round(sum(x.kthreads for x in zram_runs) / kernel, 3)
    r["zram_throughput_spread"] = round(spread, 3)
