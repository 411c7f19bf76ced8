"""The daemon's own memory when many directories are written: `--only memory`.

A watch root at depth 1 on a loop filesystem; in each of `memory_dirs` new directories one
small file is written, spread as candidates (the root's subdirectories) x 4 directories (the
candidate and 3 subdirectories), as a tree of many small projects or per-user spools would be.
The daemon sees every directory once: its handle cache, its map from directory to candidate
and its table of rates each meet a new key for every one of them. Its resident memory is read
at the start, after 10,000, 50,000 and all directories, and once the rates of the written
candidates have decayed and been forgotten (the last candidate reads exactly 0 in
`rampipectl explain`): `daemon_rss_mb_100k_dirs`, the figure with the goal.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

import psutil

from rampiped import control
from tests.system.helpers import make_loopfs, wait_for

if TYPE_CHECKING:
    from bench.run import Bench
    from tests.system.daemon_harness import Env

MiB = 1024 * 1024
DIRS_PER_CANDIDATE = 4
CHECKPOINTS = (10_000, 50_000)  # directories written when the RSS is read on the way


def _call(env: Env, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    response = control.call(str(env.runtime / "control.sock"), cmd, args or {}, timeout=60)
    if not response.get("ok"):
        raise RuntimeError(f"rampipectl {cmd}: {response.get('error')}")
    result: dict[str, Any] = response.get("result") or {}
    return result


def _rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / MiB, 1)


def _counted(env: Env) -> None:
    """Until the daemon has read everything written so far: its count of events stops moving
    (the reader drains the kernel queue within a fraction of a second)."""
    last = [-1]

    def still() -> bool:
        now = int(_call(env, "status")["monitor"]["events"])
        done = now == last[0]
        last[0] = now
        return done

    wait_for(still, 60, "the daemon to count the writes", interval=0.3)


def _write(root: str, first: int, last: int) -> None:
    """Candidates `first` .. `last - 1`: each directory gets one file of a few bytes."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for c in range(first, last):
        cand = f"{root}/c{c:06d}"
        for j in range(DIRS_PER_CANDIDATE):
            d = cand if j == 0 else f"{cand}/s{j}"
            os.mkdir(d)
            fd = os.open(f"{d}/f", flags, 0o644)
            try:
                os.write(fd, b"x\n")
            finally:
                os.close(fd)


def daemon_memory(b: Bench) -> None:
    p = b.plan
    r = b.results
    total = p.memory_dirs
    candidates = total // DIRS_PER_CANDIDATE
    # the image lives in RAM: 100,000 directories and files are 800 MB of blocks on ext4
    fs = b.stack.enter_context(
        make_loopfs(b.images / "memory", size_mb=1536, inodes=total * 2 + 20_000)
    )
    (fs.mountpoint / "data").mkdir()
    root = fs.mountpoint / "data" / "projects"
    root.mkdir()
    env, d = b.daemon(
        "memory",
        fs,
        adaptive={  # watch, never pin
            "watch": [{"path": str(root), "depth": 1}],
            "pin_above": 100_000_000,
            "half_life": f"{p.memory_half_life}s",
        },
    )
    pid = d.proc.pid
    _counted(env)
    r["daemon_rss_mb_dirs_start"] = _rss_mb(pid)
    done = 0
    t0 = time.monotonic()
    for mark in (*CHECKPOINTS, total):
        upto = min(mark, total) // DIRS_PER_CANDIDATE
        if upto <= done:
            continue
        _write(str(root), done, upto)
        done = upto
        _counted(env)
        label = f"{mark // 1000}k" if mark < total else "all"
        r[f"daemon_rss_mb_{label}_dirs_written"] = _rss_mb(pid)
    r["daemon_memory_write_s"] = round(time.monotonic() - t0, 1)
    r["daemon_memory_dirs"] = candidates * DIRS_PER_CANDIDATE
    r["daemon_memory_lost_events"] = int(_call(env, "status")["monitor"]["lost"])
    # the last candidate written is the last whose rate is forgotten: once it reads exactly 0
    # (a kept rate never does), every written candidate has been dropped from the table
    last = str(root / f"c{candidates - 1:06d}")
    t1 = time.monotonic()
    with contextlib.suppress(AssertionError):
        wait_for(
            lambda: _call(env, "explain", {"path": last})["rate"] == 0.0,
            40 * p.memory_half_life + 60,
            "the written candidates' rates to be forgotten",
            interval=0.5,
        )
    r["daemon_memory_forget_s"] = round(time.monotonic() - t1, 1)
    r["daemon_rss_mb_100k_dirs"] = _rss_mb(pid)
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                r["daemon_peak_rss_mb_100k_dirs"] = round(int(line.split()[1]) / 1024, 1)
