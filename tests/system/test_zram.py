"""ram.backend zram: each pin's RAM area is a compressed RAM device of its own with ext4 on it.
Overlay and copy pins keep every kind of change through it; a pin filled past its budget is
evicted (open-write-close writers) or refuses the write with ENOSPC (a writer that keeps its
file open), never with EIO and never by going read-only, and loses nothing; a pin survives a
kill -9 of the daemon and is adopted; the devices are freed when the pins go.

zram devices are global (not of a mount namespace): the `zram` fixture resets and removes
every device that appeared during the test, whatever happened, after the mounts are gone."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampiped import pins as pinsmod
from rampiped import ramarea
from tests.system import safety
from tests.system.changes import CHANGES, populate, write
from tests.system.daemon_harness import VENV_BIN, Env, make_env, running
from tests.system.helpers import (
    diff_manifests,
    drop_caches,
    drop_lone_link_groups,
    manifest,
    mountinfo,
    wait_for,
)
from tests.system.test_safety_budget import grow, pin_adaptively
from tests.system.test_volatile import USERS, make_cache

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def zram_devices() -> set[int]:
    return {int(n[4:]) for n in os.listdir("/sys/block") if n.startswith("zram")}


def offered() -> list[str]:
    n = ramarea.hot_add()
    try:
        return ramarea.algorithms(n)
    finally:
        ramarea.free(n)


@pytest.fixture
def zram() -> Iterator[list[str]]:
    """The compressors this kernel offers; every zram device added meanwhile is removed."""
    if os.geteuid() != 0 or not os.path.isdir(ramarea.ZRAM_CONTROL):
        pytest.skip("needs root and zram (/sys/class/zram-control)")
    before = zram_devices()
    try:
        yield offered()
    finally:
        # the test's mounts are gone by now (make_env unmounts its tree)
        left = sorted(zram_devices() - before)
        for n in left:
            ramarea.free(n)


def zram_env(env: Env, compression: str, **overrides: object) -> None:
    ram = {"max": "64M", "min_free": "64M", "backend": "zram", "compression": compression}
    extra = overrides.pop("ram", {})
    assert isinstance(extra, dict)
    env.write_config(ram={**ram, **extra}, **overrides)


def ram_area(env: Env, path: Path) -> dict[str, str]:
    """The mount of the pin's RAM area, which must be ext4 on a zram device."""
    pid = pinsmod.pin_id(str(path))
    found = [m for m in mountinfo() if m["mountpoint"] == f"{env.runtime}/pins/{pid}/ram"]
    assert len(found) == 1, found
    area = found[0]
    assert (area["fstype"], area["source"]) == ("ext4", pinsmod.SOURCE_PREFIX + pid), area
    n = ramarea.device_of(area["mountpoint"])
    assert n is not None, f"{area['mountpoint']} is not on a zram device"
    return area


def the_pin(env: Env, path: Path) -> dict[str, object]:
    found = [p for p in env.status()["pins"] if p["path"] == str(path)]
    assert len(found) == 1, env.status()["pins"]
    return found[0]


def no_new_devices(before: set[int]) -> None:
    wait_for(lambda: zram_devices() <= before, 10, "the pins' zram devices removed")


@contextlib.contextmanager
def manual_pins(tmp: Path, compression: str, name: str, disk_mb: int) -> Iterator[tuple[Env, Path]]:
    """Adaptive pinning off, and the directory `name` to pin; when the test is done, the pins'
    zram devices must be gone."""
    before = zram_devices()
    with make_env(tmp, disk_mb=disk_mb) as env:
        zram_env(env, compression, adaptive={"enabled": False})
        d = env.data / name
        d.mkdir()
        yield env, d
        no_new_devices(before)


# -- every change survives ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["overlay", "copy"])
def test_a_zram_pin_keeps_every_kind_of_change(tmp_path: Path, zram: list[str], mode: str) -> None:
    with manual_pins(tmp_path, zram[0], "hot", 256) as (env, hot):
        outside = tmp_path / "outside"
        write(outside / "victim", "must survive")
        populate(hot, outside)
        for i in range(20):  # text that compresses, like a log
            write(
                hot / "logs" / f"app{i}.log", "".join(f"{i} GET /x {n} 200\n" for n in range(2000))
            )
        with running(env) as daemon:
            done = env.ctl("pin", str(hot), "--mode", mode)
            assert done.returncode == 0, done.stderr
            area = ram_area(env, hot)
            top = env.mounted_at(hot)
            assert top is not None and top["source"] == area["source"], top
            for name, change in CHANGES.items():
                if mode == "copy" and name == "content":
                    continue  # same size and mtime: see test_static_pins
                change(hot)
            st = the_pin(env, hot)
            assert st["ram_backend"] == "zram"
            stored, ram = st["stored_bytes"], st["ram_bytes"]
            assert isinstance(stored, int) and isinstance(ram, int)
            assert 0 < ram < stored, st
            assert st["ram_per_stored_byte"] == round(ram / stored, 3)
            status = env.status()
            assert status["ram"]["stored_bytes"] == stored
            expected = drop_lone_link_groups(manifest(hot))
            assert daemon.stop() == 0, daemon.log_text()
        assert env.mounted_at(hot) is None
        drop_caches()
        assert diff_manifests(expected, drop_lone_link_groups(manifest(hot))) == []
        assert (outside / "victim").read_text() == "must survive"


# -- full ---------------------------------------------------------------------------------------


def test_a_growing_zram_pin_is_evicted_before_any_write_fails(
    tmp_path: Path, zram: list[str]
) -> None:
    """Open-write-close writers, well compressed data: the pin is evicted when its files reach
    the watermark, before its filesystem fills (its RAM alone would never reach it)."""
    before = zram_devices()
    with make_env(tmp_path, disk_mb=512) as env:
        zram_env(env, zram[0], ram={"high_watermark": "90%"})
        d = env.data / "grow"
        d.mkdir()
        with running(env) as dm:
            pin_adaptively(env, d)
            ram_area(env, d)
            result = grow(d, 80 * MiB, 160 * MiB, MiB // 4)
            dm.wait_log(r"unpinned " + re.escape(str(d)) + r": evicted: RAM used by pins")
            assert dm.stop() == 0, dm.log_text()
        assert not env.overlay_at(d)
        assert result["failures"] == [], result["failures"][:10]
        assert len(result["written"]) == 640
        assert safety.check_tree(d, {name: 1 for name in result["written"]}) == []
        no_new_devices(before)


HOLDER = r"""
import errno, hashlib, json, os, sys
path, chunk = sys.argv[1], int(sys.argv[2])
h, written, error = hashlib.sha256(), 0, None
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
print('ready', flush=True)
while error is None:
    data = os.urandom(chunk)  # incompressible: the memory grows as fast as the files
    try:
        n = os.write(fd, data)
    except OSError as e:
        error = errno.errorcode.get(e.errno, e.errno)
        break
    h.update(data[:n])
    written += n
    if n < chunk:
        continue  # short write: the next one says why
synced = None
try:
    os.fsync(fd)
except OSError as e:
    synced = errno.errorcode.get(e.errno, e.errno)
os.close(fd)
print(json.dumps({'written': written, 'sha': h.hexdigest(), 'error': error,
                  'fsync': synced}), flush=True)
"""


def test_a_full_zram_pin_refuses_a_held_open_writer_with_enospc(
    tmp_path: Path, zram: list[str]
) -> None:
    """A manual pin (never evicted) and one writer that keeps its file open: its write fails
    with ENOSPC once the area is full; no EIO, not even at fsync; never read-only; what it
    wrote is all there and reaches the disk; deleting gives the memory back."""
    with manual_pins(tmp_path, zram[0], "full", 512) as (env, d):
        (d / "small.log").write_text("before the pin\n")
        with running(env) as dm:
            assert env.ctl("pin", str(d), "--mode", "overlay").returncode == 0
            area = ram_area(env, d)
            n = ramarea.device_of(area["mountpoint"])
            assert n is not None
            proc = subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(d / "big.bin"), str(MiB)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            result = json.loads(proc.stdout.readline())
            assert proc.wait(30) == 0
            assert result["error"] == "ENOSPC", result
            assert result["fsync"] is None, result
            # about the size of the tmpfs the pin would have had (ram.max 64M * 1.5)
            assert 80 * MiB < result["written"] <= 96 * MiB, result
            area = ram_area(env, d)
            assert area["options"].split(",")[0] == "rw", area
            assert (d / "big.bin").stat().st_size == result["written"]
            # others still write what fits once room is made; nothing is read-only
            full = ramarea.mm_stat(n)["mem_used_total"]
            (d / "big.bin").unlink()
            wait_for(
                lambda: ramarea.mm_stat(n)["mem_used_total"] < full // 4,
                10,
                "the deleted file's memory given back (discard)",
            )
            safety.write_version(d / "after.bin", "after.bin", 1, size=8 * MiB)
            with open(d / "again.bin", "wb") as f:
                f.write(os.urandom(4 * MiB))
                f.flush()
                os.fsync(f.fileno())
            held = hashlib.sha256((d / "again.bin").read_bytes()).hexdigest()
            expected = manifest(d)
            assert dm.stop() == 0, dm.log_text()
        assert not env.overlay_at(d)
        drop_caches()
        assert diff_manifests(expected, manifest(d)) == []
        assert hashlib.sha256((d / "again.bin").read_bytes()).hexdigest() == held
        assert safety.check_tree(d, {"after.bin": 1}, minimum=True) == []
        assert (d / "small.log").read_text() == "before the pin\n"


# -- crash --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["overlay", "copy"])
def test_a_zram_pin_is_adopted_after_kill_9(tmp_path: Path, zram: list[str], mode: str) -> None:
    with manual_pins(tmp_path, zram[0], "crash", 256) as (env, d):
        safety.write_version(d / "old", "old", 0)
        with running(env) as dm:
            assert env.ctl("pin", str(d), "--mode", mode).returncode == 0
            area = ram_area(env, d)
            for i in range(50):
                safety.write_version(d / f"n{i}", f"n{i}", 1)
            (d / "old").unlink()
            expected = manifest(d)
            dm.proc.send_signal(signal.SIGKILL)
            dm.proc.wait(10)
        assert ram_area(env, d)["id"] == area["id"]  # the area survived the crash
        with running(env) as dm:
            dm.wait_log(rf"adopted {re.escape(str(d))} \({mode}, manual\)")
            st = the_pin(env, d)
            assert st["ram_backend"] == "zram" and st["state"] == "pinned", st
            safety.write_version(d / "late", "late", 2)
            expected = {**expected, **{k: v for k, v in manifest(d).items() if "late" in k}}
            assert dm.stop() == 0, dm.log_text()
        assert env.mounted_at(d) is None
        drop_caches()
        assert diff_manifests(expected, manifest(d)) == []
        assert not (d / "old").exists()


# -- start-up check -----------------------------------------------------------------------------


def test_a_compressor_the_kernel_lacks_stops_the_start(tmp_path: Path, zram: list[str]) -> None:
    from rampiped import config

    missing = [a for a in config.ZRAM_ALGORITHMS if a not in zram]
    if not missing:
        pytest.skip("this kernel offers every compressor")
    with make_env(tmp_path) as env:
        zram_env(env, missing[0])
        proc = subprocess.run(
            [str(VENV_BIN / "rampiped"), "--config", str(env.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 78, proc.stderr
        assert (
            f"not starting: ram.backend is zram, ram.compression {missing[0]}: this kernel's zram"
            f" does not offer {missing[0]}; it offers " + ", ".join(zram)
        ) in proc.stderr
        assert not safety.pin_mounts()


# -- volatile -----------------------------------------------------------------------------------


def test_a_volatile_pin_on_zram(tmp_path: Path, zram: list[str]) -> None:
    """Owned like the directory, keeps persist, nothing else does, full is ENOSPC, adopted
    after kill -9, its device freed at the stop."""
    before = zram_devices()
    with make_env(tmp_path) as env:
        cache = make_cache(env, "bob")
        pin = {"path": str(cache), "mode": "volatile", "size": "8M", "keep": ["pip"]}
        zram_env(env, zram[0], adaptive={"enabled": False}, pins=[pin])
        with running(env) as daemon:
            top = env.mounted_at(cache)
            assert top is not None
            pid = pinsmod.pin_id(str(cache))
            assert (top["fstype"], top["source"]) == ("ext4", pinsmod.SOURCE_PREFIX + pid), top
            assert ramarea.device_of(str(cache)) is not None
            st = os.stat(cache)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == USERS["bob"]
            assert sorted(os.listdir(cache)) == ["pip"]
            (cache / "scratch").write_text("only in RAM\n")
            (cache / "pip" / "new.whl").write_text("kept\n")
            with pytest.raises(OSError) as info, open(cache / "big", "wb") as f:
                while True:
                    f.write(os.urandom(MiB))
                    f.flush()
            assert info.value.errno == errno.ENOSPC
            (cache / "big").unlink()
            (cache / "after-full").write_text("still writable\n")
            assert the_pin(env, cache)["ram_backend"] == "zram"
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(10)
        with running(env) as daemon:
            daemon.wait_log(rf"adopted {re.escape(str(cache))} \(volatile, static\)")
            assert (cache / "after-full").read_text() == "still writable\n"
            assert daemon.stop() == 0, daemon.log_text()
        assert env.mounted_at(cache) is None
        assert sorted(os.listdir(cache)) == ["old-file", "pip"]
        assert (cache / "pip" / "new.whl").read_text() == "kept\n"
        no_new_devices(before)


def test_a_device_left_by_a_crash_is_removed_at_start(tmp_path: Path, zram: list[str]) -> None:
    """A RAM area unmounted but whose device was not removed (a crash in between) gives its
    memory back at the next start; a device still mounted is left alone."""
    backend = ramarea.Backend("zram", zram[0])
    with make_env(tmp_path) as env:
        zram_env(env, zram[0], adaptive={"enabled": False})
        left, used = tmp_path / "left", tmp_path / "used"
        for area, pid in ((left, "0123456789ab"), (used, "ba9876543210")):
            area.mkdir()
            ramarea.mount(str(area), backend=backend, size=8 * MiB, source=f"rampiped-{pid}")
        n_left, n_used = ramarea.device_of(str(left)), ramarea.device_of(str(used))
        assert n_left is not None and n_used is not None
        (left / "data").write_bytes(os.urandom(MiB))
        subprocess.run(["umount", str(left)], check=True)  # the device stays
        assert n_left in zram_devices()
        with running(env) as daemon:
            daemon.wait_log(
                rf"removed zram{n_left}, the RAM area of pin 0123456789ab left by a crash"
            )
            assert n_left not in zram_devices()
            assert n_used in zram_devices()
            assert ramarea.device_of(str(used)) == n_used
            assert daemon.stop() == 0
        ramarea.unmount(str(used))
        assert n_used not in zram_devices()
