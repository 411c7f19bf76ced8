"""The benchmark's pieces with tiny sizes, so that `make bench` does not rot between runs: the
simulated stick (throttled, and gone afterwards), its profile, the workloads, the log2ram-style
copy, the report, and the whole run in miniature."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import report, workloads
from bench.run import QUICK, run
from bench.stick import MiB, Stick, profile, rules, stick
from bench.tmpfscopy import TmpfsCopy
from tests.system.helpers import diff_manifests, manifest, mount_points

pytestmark = pytest.mark.system


def tmpfs(path: Path) -> Path:
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g", "rp-bench-test", str(path)], check=True
    )
    return path


@pytest.fixture
def images(tmp_path: Path) -> Iterator[Path]:
    path = tmpfs(tmp_path / "images")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture
def ram(tmp_path: Path) -> Iterator[Path]:
    path = tmpfs(tmp_path / "ram")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-R", str(path)], capture_output=True)


def attached(image: Path) -> str:
    return subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True
    ).stdout.strip()


def test_stick_is_slow_counts_its_bytes_and_leaves_nothing_behind(
    tmp_path: Path, images: Path
) -> None:
    with stick("t", tmp_path / "stick", images, size_mb=64) as s:
        assert attached(s.image)
        s.throttle()
        assert rules()[s.dev] == {
            "write_iops": 200,
            "write_bps": 8 * MiB,
            "read_iops": 1000,
            "read_bps": 30 * MiB,
        }
        before = s.bytes_written()
        t0 = time.perf_counter()
        with open(s.mountpoint / "f", "wb") as f:
            f.write(b"x" * 4 * MiB)
            f.flush()
            os.fsync(f.fileno())
        elapsed = time.perf_counter() - t0
        assert s.bytes_written() - before >= 4 * MiB
        assert elapsed > 0.3, f"4 MiB reached an 8 MiB/s stick in {elapsed:.2f} s"
        dev, image = s.dev, s.image
    assert dev not in rules()
    assert not attached(image)
    assert not image.exists()
    assert str(tmp_path / "stick") not in mount_points()


def test_stick_cleans_up_when_the_body_fails(tmp_path: Path, images: Path) -> None:
    found: list[Stick] = []
    with pytest.raises(RuntimeError, match="boom"), stick("t", tmp_path / "s", images, 64) as s:
        s.throttle()
        found.append(s)
        raise RuntimeError("boom")
    assert found[0].dev not in rules()
    assert not attached(found[0].image)


def test_profile_measures_the_throttle(tmp_path: Path, images: Path) -> None:
    with stick("p", tmp_path / "stick", images, size_mb=128) as s:
        s.throttle()
        p = profile(s, seconds=1.0)
    assert 100 < p["stick_rand4k_direct_iops"] < 300, p
    assert 4 < p["stick_seq_write_MBps"] < 12, p
    assert 0 < p["stick_rand4k_fsync_per_s"] < 200, p
    assert 0 < p["stick_small_files_fsync_per_s"] < 200, p


def test_workloads_run_and_clean_up(ram: Path) -> None:
    d = ram / "w"
    d.mkdir()
    workloads.seed_db(d / workloads.DB_NAME)
    for name in workloads.WORKLOADS:
        kw: dict[str, Any] = {"file_mb": 2} if name == "large_seq" else {}
        res = workloads.run(name, d, 0.3, **kw)
        assert res["ops_per_s"] > 0, (name, res)
    assert sorted(p.name for p in d.iterdir()) == [workloads.DB_NAME]
    paced = workloads.run("sqlite", d, 1.0, rate=20)
    assert 10 <= paced["ops"] <= 22, paced


def test_log_day_makes_the_same_tree_everywhere(ram: Path) -> None:
    dirs = [ram / "a", ram / "b"]
    for d in dirs:
        workloads.seed_logs(d)
    workloads.log_day(dirs, 1.0, tick=0.02)
    a, b = (manifest(d, times=False) for d in dirs)
    assert diff_manifests(a, b) == []
    assert (dirs[0] / "app.log.4").exists() and (dirs[0] / "app.log").exists()


def test_tmpfs_copy_writes_back_what_changed(tmp_path: Path, images: Path) -> None:
    with stick("c", tmp_path / "stick", images, size_mb=64) as s:
        logs = s.mountpoint / "logs"
        workloads.seed_logs(logs)
        copy = TmpfsCopy(logs, tmp_path / "c-ram", tmp_path / "c-disk", interval=0)
        copy.start()
        try:
            assert mount_points().count(str(logs)) == 1
            workloads.log_day([logs], 0.5, tick=0.02)
            expected = manifest(logs, times=False)
        finally:
            copy.stop()
        assert str(logs) not in mount_points()
        assert diff_manifests(expected, manifest(logs, times=False)) == []
        assert copy.syncs == 1 and copy.bytes > 0


def test_report_writes_every_output(tmp_path: Path) -> None:
    results: dict[str, Any] = {key: 1.0 for key, *_ in report.TARGETS}
    results.update(
        {
            "overlay_vs_tmpfs_fsync_ratio": 0.5,  # missed: the report must say why
            "hot_for_s": 2.0,
            "machine_date": "2026-11-22",
        }
    )
    series = {
        "timing": {
            "rates": [(0.0, 0.0), (1.0, 500.0), (5.0, 2.0)],
            "marks": {"burst_start": 0.5, "pinned": 2.7, "burst_end": 3.0, "released": 9.0},
            "pin_above": 50,
            "unpin_below": 5,
            "path": "/x/burst",
        },
        "matrix_ops": {"logger": {"disk": [50.0], "tmpfs": [5e5]}},
        "sqlite_device_mb": {"plain": [(0.0, 0.0), (1.0, 2.0)]},
    }
    out = tmp_path / "results"
    report.write(out, results, series, {}, {"sqlite_intervals": [300.0, 60.0]})
    summary = json.loads((out / "summary.json").read_text())
    for key, *_ in report.TARGETS:
        assert key in summary
    md = (out / "report.md").read_text()
    assert "**overlay_vs_tmpfs_fsync_ratio** = 0.5:" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("rate_ema.png", "throughput.png", "device_bytes.png"):
        assert (out / name).stat().st_size > 1000, name


def test_the_whole_run_in_miniature(tmp_path: Path) -> None:
    out = tmp_path / "results"
    results = run(QUICK, out)
    summary = json.loads((out / "summary.json").read_text())
    for key, *_ in report.TARGETS:
        assert isinstance(summary.get(key), int | float), key
    assert summary["wb_trees_identical"] is True
    assert summary["lr_trees_identical"] is True
    assert summary["sqlite_plain_transactions"] > 0
    assert results["bench_total_s"] < 240
    assert not [m for m in mount_points() if "/rp-bench-" in m]
    leftover = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert "rp-bench-" not in leftover
