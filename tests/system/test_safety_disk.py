"""Disk faults during write-back: the disk fills up, is remounted read-only, rsync is missing
or fails. In every case the RAM data is kept (the directory still shows it), the error names
the exact command and its cause, the write-back is retried with backoff, and nothing is
reported as written that is not."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from rampiped import mounts
from tests.system import safety
from tests.system.daemon_harness import Env, make_env, running
from tests.system.helpers import wait_for

pytestmark = pytest.mark.system

FILES = {f"f{i:02d}": 1 for i in range(30)}  # 30 files of 1 MiB in RAM


def write_files(d: Path, version: int = 1) -> dict[str, int]:
    for name in FILES:
        safety.write_version(d / name, name, version, size=1 << 20)
    return {name: version for name in FILES}


def fill_disk(env: Env, leave: int) -> Path:
    """Fill the disk up to `leave` free bytes with a file outside the pinned directory."""
    filler = env.disk.mountpoint / "filler"
    st = os.statvfs(env.disk.mountpoint)
    size = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return filler


def pin_state(env: Env, d: Path) -> dict[str, object]:
    pins = [p for p in env.status()["pins"] if p["path"] == str(d)]
    assert len(pins) == 1, env.status()["pins"]
    return pins[0]


def test_disk_full_during_unpin_keeps_ram_and_retries(tmp_path: Path) -> None:
    # 128 MiB: an overlay write-back needs room for the changed data twice (its journal copy,
    # then the directory's), see "Guarantees and limits"
    with make_env(tmp_path, disk_mb=128) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        d.mkdir()
        with running(env) as dm:
            env.ctl("pin", str(d), check=True)
            expected = write_files(d)
            filler = fill_disk(env, leave=4 << 20)
            proc = env.ctl("unpin", str(d))
            safety.count("disk faults")
            assert proc.returncode == 1
            assert "rampiped keeps trying" in proc.stderr
            line = dm.wait_log(r"write-back of \S+ failed, staying pinned").string
            # refused before writing: the journal generation and the apply would not both fit
            # (a generation that cannot be applied strands data in the journal)
            assert "not enough space: it needs" in line, line
            assert "MiB are free" in line or "KiB are free" in line, line
            assert "retrying in 5s" in line, line
            # nothing lost: still pinned, every file readable as written
            assert env.overlay_at(d)
            assert pin_state(env, d)["state"] == "pinned"
            assert safety.check_tree(d, expected) == []
            filler.unlink()
            dm.wait_log(r"unpinned " + re.escape(str(d)), timeout=60)
        assert not env.overlay_at(d)
        assert safety.check_tree(d, expected) == []


def test_checkpoint_on_a_full_disk_is_not_reported_as_written_and_backs_off(
    tmp_path: Path,
) -> None:
    with make_env(tmp_path, disk_mb=128) as env:
        env.write_config(adaptive={"enabled": False}, sync={"interval": "1s"})
        d = env.data / "app"
        d.mkdir()
        with running(env) as dm:
            env.ctl("pin", str(d), check=True)
            expected = write_files(d)
            filler = fill_disk(env, leave=4 << 20)
            safety.count("disk faults")
            first = dm.wait_log(r"checkpoint of \S+ failed").string
            assert "not enough space: it needs" in first, first
            record = pin_state(env, d)["last_sync"]
            assert isinstance(record, dict) and record["ok"] is False, record
            proc = env.ctl("sync", str(d))
            assert proc.returncode == 1 and "not enough space" in proc.stderr, proc.stderr
            # with sync.interval 1s and no backoff a failure would be logged every second
            time.sleep(4)  # an observation window, not synchronisation
            failures = [x for x in dm.lines if re.search(r"checkpoint of \S+ failed", x)]
            assert len(failures) <= 3, failures
            assert safety.check_tree(d, expected) == []
            filler.unlink()
            wait_for(
                lambda: (pin_state(env, d)["last_sync"] or {}).get("ok") is True,  # type: ignore[union-attr]
                60,
                "a checkpoint once the disk has room",
            )
            env.ctl("unpin", str(d), check=True)
        assert safety.check_tree(d, expected) == []


def test_disk_remounted_read_only(tmp_path: Path) -> None:
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        with running(env) as dm:
            env.ctl("pin", str(d), check=True)
            expected = write_files(d)
            subprocess.run(["mount", "-o", "remount,ro", str(env.disk.mountpoint)], check=True)
            try:
                safety.count("disk faults")
                proc = env.ctl("sync", str(d))
                assert proc.returncode == 1
                assert "Read-only file system" in proc.stderr, proc.stderr
                proc = env.ctl("unpin", str(d))
                assert proc.returncode == 1
                line = dm.wait_log(r"write-back of \S+ failed, staying pinned").string
                assert "read-only" in line.lower(), line
                assert env.overlay_at(d)
                assert safety.check_tree(d, expected) == []
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(env.disk.mountpoint)], check=True)
            dm.wait_log(r"unpinned " + re.escape(str(d)), timeout=60)
        assert safety.check_tree(d, expected) == []


def test_rsync_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        empty = tmp_path / "empty-bin"
        empty.mkdir()
        with monkeypatch.context() as m:
            m.setenv("PATH", str(empty))
            with running(env) as dm:
                env.ctl("pin", str(d), check=True)
                expected = write_files(d)
                safety.count("disk faults")
                proc = env.ctl("sync", str(d))
                assert proc.returncode == 1
                assert "rsync is not installed" in proc.stderr
                assert "`rsync --version` exited with code 127" in proc.stderr
                proc = env.ctl("unpin", str(d))
                assert proc.returncode == 1 and "rsync is not installed" in proc.stderr
                assert env.overlay_at(d)
                assert safety.check_tree(d, expected) == []
                dm.kill()  # the pin stays mounted for the next start
        assert env.overlay_at(d)
        with running(env) as dm:  # rsync is back
            dm.wait_log(r"adopted " + re.escape(str(d)))
            env.ctl("unpin", str(d), check=True)
        assert not env.overlay_at(d)
        assert safety.check_tree(d, expected) == []


def test_rsync_failing_on_a_copy_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        before = write_files(d, version=0)
        with monkeypatch.context() as m:
            flag = safety.failing_rsync(tmp_path, m)
            with running(env) as dm:
                env.ctl("pin", str(d), "--mode", "copy", check=True)
                expected = write_files(d, version=1)
                flag.touch()
                safety.count("disk faults")
                proc = env.ctl("sync", str(d))
                assert proc.returncode == 1
                assert "exited with code 11 (error in file I/O" in proc.stderr, proc.stderr
                assert "cause: an I/O error on a device" in proc.stderr
                assert "`rsync -aHAX --no-inc-recursive --numeric-ids" in proc.stderr
                record = pin_state(env, d)["last_sync"]
                assert isinstance(record, dict) and record["ok"] is False
                # the disk still holds what it held: nothing was written and called written
                disk_side = env.runtime / "pins"
                staged = next(disk_side.glob("*/disk"))
                assert safety.check_tree(staged, before) == []
                assert env.ctl("unpin", str(d)).returncode == 1
                assert safety.check_tree(d, expected) == []
                flag.unlink()
                dm.wait_log(r"unpinned " + re.escape(str(d)), timeout=60)
        assert safety.check_tree(d, expected) == []


def test_a_write_back_that_fails_after_the_unmount_mounts_the_overlay_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overlay is mounted volatile (on tmpfs); the kernel leaves a mark in its workdir and
    refuses to mount those layers again while it is there. After a write-back that failed
    after the unmount, the RAM side is mounted again all the same (the mark removed: the same
    boot, the layers intact), with everything written, and the next try succeeds."""
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        write_files(d, version=0)
        with monkeypatch.context() as m:
            m.setenv("RAMPIPED_TEST_LATE_WRITEBACK", "1")  # written back after the unmount
            flag = safety.failing_rsync(tmp_path, m)
            with running(env) as dm:
                env.ctl("pin", str(d), check=True)
                expected = write_files(d, version=1)
                options = [e.super_options for e in mounts.mountinfo() if e.mountpoint == str(d)]
                # shown as "volatile", or "fsync=volatile" since Linux 6.15
                shown = set(options[-1].split(",")) if options else set()
                assert shown & {"volatile", "fsync=volatile"}, options
                flag.touch()
                safety.count("disk faults")
                assert env.ctl("unpin", str(d)).returncode == 1
                dm.wait_log(r"write-back of \S+ failed, staying pinned")
                assert "could not be mounted again" not in dm.log_text()
                assert env.overlay_at(d)
                assert safety.check_tree(d, expected) == []
                flag.unlink()
                dm.wait_log(r"unpinned " + re.escape(str(d)), timeout=60)
        assert not env.overlay_at(d)
        assert safety.check_tree(d, expected) == []
