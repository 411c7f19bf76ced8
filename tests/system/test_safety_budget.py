"""The RAM budget: ram.max, ram.high_watermark and ram.min_free are enforced. A pinned
directory that keeps growing past the budget through open-write-close writes never sees a
failed write: rampiped evicts it in time (the tmpfs of a pin has headroom above the
watermark for the writes that land while the eviction runs). A pin whose largest file (or, in
copy mode, whose content) does not fit in what is left of the budget is refused up front.
MemAvailable under min_free evicts too."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.system import safety
from tests.system.daemon_harness import Env, Writer, make_env, running
from tests.system.helpers import wait_for

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]

# As much free memory asked for as this machine has (more is refused as a configuration
# error): MemAvailable is always below it, so the pressure is there at once.
ALL_OF_THE_MEMORY = str(psutil.virtual_memory().total)

# Appends nothing: every file is new, written whole with open-write-close, at `rate` bytes/s.
GROWER = r"""
import errno, json, os, sys, time
from tests.system.safety import content
root, rate, total, size = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
os.makedirs(root, exist_ok=True)
print('ready', flush=True)
written, failures, start, n = [], [], time.monotonic(), 0
while n * size < total:
    name = 'g%05d' % n
    try:
        with open(os.path.join(root, name), 'wb') as f:
            f.write(content(name, 1, size))
        written.append(name)
    except OSError as e:
        failures.append('%s: %s' % (name, errno.errorcode.get(e.errno, e.errno)))
    n += 1
    delay = start + n * size / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(json.dumps({'written': written, 'failures': failures,
                  'seconds': time.monotonic() - start}), flush=True)
"""


def pin_adaptively(env: Env, d: Path) -> None:
    """Make `d` hot first (small appends), so that it is pinned adaptively (evictable)."""
    warm = Writer(d / "warm", rate=100)
    try:
        wait_for(lambda: env.overlay_at(d), 30, "the adaptive pin")
    finally:
        warm.stop()


def grow(d: Path, rate: int, total: int, size: int) -> dict[str, Any]:
    """Run GROWER into `d` to its end: the names written, the failures, the seconds."""
    proc = subprocess.Popen(
        [sys.executable, "-c", GROWER, str(d), str(rate), str(total), str(size)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    result: dict[str, Any] = json.loads(proc.stdout.readline())
    proc.wait(30)
    return result


@pytest.mark.parametrize("mib_per_s", [20, 80])
def test_growing_pin_is_evicted_before_any_write_fails(tmp_path: Path, mib_per_s: int) -> None:
    with make_env(tmp_path, disk_mb=512) as env:
        env.write_config(ram={"max": "64M", "high_watermark": "90%", "min_free": "64M"})
        d = env.data / "grow"
        d.mkdir()
        with running(env) as dm:
            pin_adaptively(env, d)
            result = grow(d, mib_per_s << 20, 160 << 20, 1 << 18)
            dm.wait_log(r"unpinned " + re.escape(str(d)) + r": evicted: RAM used by pins")
            evictions = [x for x in dm.lines if "evicted: RAM used by pins" in x]
            # it may have been pinned again since: a clean stop writes everything back
            assert dm.stop() == 0, dm.log_text()
        assert not env.overlay_at(d)
        # 160 MiB through a 64 MiB budget: not one write failed, nothing lost
        assert result["failures"] == [], result["failures"][:10]
        assert len(result["written"]) == 640
        assert evictions, "the budget was never enforced"
        problems = safety.check_tree(d, {name: 1 for name in result["written"]})
        assert problems == []


def test_a_pin_that_cannot_fit_is_refused(tmp_path: Path) -> None:
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False}, ram={"max": "16M", "min_free": "64M"})
        big = env.data / "big"
        safety.write_version(big / "huge.img", "huge.img", 0, size=20 << 20)
        with running(env):
            for mode, what in (("overlay", "its largest file"), ("copy", "its content")):
                proc = env.ctl("pin", str(big), "--mode", mode)
                assert proc.returncode == 1, proc
                assert f"cannot pin {big}: {what} (20.0 MiB) does not fit in the RAM budget" in (
                    proc.stderr
                ), proc.stderr
                assert not env.overlay_at(big)
            assert env.status()["pins"] == []


def test_memavailable_below_min_free_evicts(tmp_path: Path) -> None:
    with make_env(tmp_path) as env:
        cfg = {"ram": {"max": "256M", "min_free": "64M"}, "adaptive": {"cool_for": "1h"}}
        env.write_config(**cfg)
        d = env.data / "hot"
        with running(env) as dm:
            w = Writer(d, rate=200)
            try:
                wait_for(lambda: env.overlay_at(d), 30, "the adaptive pin")
            finally:
                n = w.stop()
            env.write_config(
                ram={"max": "256M", "min_free": ALL_OF_THE_MEMORY}, adaptive={"cool_for": "1h"}
            )
            env.ctl("reload", check=True)
            dm.wait_log(r"unpinned " + re.escape(str(d)) + r": evicted: MemAvailable .* below")
            assert not env.overlay_at(d)
            # and nothing is pinned while it lasts, however hot
            w = Writer(d, rate=200)
            try:
                wait_for(
                    lambda: any(
                        c["path"] == str(d) and "min_free" in (c["blocked"] or "")
                        for c in env.status()["candidates"]
                    ),
                    30,
                    "the hot directory to be blocked by min_free",
                )
                assert not env.overlay_at(d)
            finally:
                n += w.stop()
        lines = sum(len((d / f"f{i:03d}.log").read_text().splitlines()) for i in range(50))
        assert lines == n  # every line written, before, during and after the pin


def test_appends_during_an_eviction_are_kept(tmp_path: Path) -> None:
    with make_env(tmp_path) as env:
        env.write_config(ram={"max": "256M", "min_free": "64M"}, adaptive={"cool_for": "1h"})
        d = env.data / "hot"
        with running(env) as dm:
            w = Writer(d, rate=200)
            try:
                wait_for(lambda: env.overlay_at(d), 30, "the adaptive pin")
                env.write_config(
                    ram={"max": "256M", "min_free": ALL_OF_THE_MEMORY}, adaptive={"cool_for": "1h"}
                )
                env.ctl("reload", check=True)
                dm.wait_log(r"unpinned " + re.escape(str(d)) + r": evicted", timeout=20)
            finally:
                n = w.stop()
        lines = sum(len((d / f"f{i:03d}.log").read_text().splitlines()) for i in range(50))
        assert lines == n
