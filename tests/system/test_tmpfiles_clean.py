"""max_age of a volatile pin, with the real systemd-tmpfiles: `rampiped-tmpfiles write` lists
the pin the daemon mounted, `systemd-tmpfiles --clean` removes what nobody used for max_age and
leaves the directory, new files, files copied in with old times, open files and `keep`
directories; the daemon does not unmount a pin while the list names it; the directory on disk
is never cleaned.

Age is judged by every timestamp (ctime and birth time included), which os.utime cannot set
back: the files are made old by letting max_age (2s) pass. /run/tmpfiles.d is a tmpfs of the
test's own mount namespace."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampiped import tmpfiles
from tests.system.daemon_harness import Daemon, Env, make_env, running
from tests.system.helpers import holding_open, mountinfo, release, wait_for

pytestmark = pytest.mark.system

HELPER = Path(sys.executable).parent / "rampiped-tmpfiles"
MAX_AGE = 2.0


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as e:
        yield e


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """/run/tmpfiles.d as a tmpfs of this mount namespace only."""
    d = Path(tmpfiles.RUN_DIR)
    made = not d.exists()
    d.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "rp-tmpfiles.d", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)
        if made:
            with contextlib.suppress(OSError):
                d.rmdir()


@contextlib.contextmanager
def disk_view(env: Env) -> Iterator[Path]:
    view = env.tmp / "disk-view"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(env.disk.mountpoint), str(view)], check=True)
    try:
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=False)


def helper(env: Env, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HELPER), command],
        env={**os.environ, "RAMPIPED_CONFIG": str(env.config_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def clean(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-tmpfiles", "--clean", str(conf)],
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def tmpfs_at(path: Path) -> bool:
    rows = [m for m in mountinfo() if m["mountpoint"] == str(path)]
    return bool(rows) and rows[-1]["fstype"] == "tmpfs"


def test_old_files_go_new_open_and_kept_ones_stay(env: Env, run_dir: Path) -> None:
    cache = env.data / "home" / "alice" / ".cache"
    (cache / "pip").mkdir(parents=True)
    (cache / "on-disk").write_text("on disk before the pin\n")
    pin = {"path": str(cache), "mode": "volatile", "size": "8M", "keep": ["pip"]}
    env.write_config(adaptive={"enabled": False}, pins=[{**pin, "max_age": f"{MAX_AGE:g}s"}])
    conf = run_dir / tmpfiles.CONF_NAME
    with disk_view(env) as view:
        with running(env) as daemon:
            check_clean_up(env, daemon, cache, conf, pin)
        disk = view / cache.relative_to(env.disk.mountpoint)
        assert sorted(os.listdir(disk)) == ["on-disk", "pip"]
        assert (disk / "on-disk").read_text() == "on disk before the pin\n"


def check_clean_up(
    env: Env, daemon: Daemon, cache: Path, conf: Path, pin: dict[str, object]
) -> None:
    assert tmpfs_at(cache)
    # made now, old by the time systemd-tmpfiles runs
    (cache / "old").write_text("unused\n")
    (cache / "old-dir" / "deeper").mkdir(parents=True)
    (cache / "old-dir" / "deeper" / "f").write_text("unused\n")
    (cache / "held").write_text("open, unused\n")
    (cache / "held-dir").mkdir()
    (cache / "held-dir" / "f").write_text("in a directory a process works in\n")
    (cache / "pip" / "old.whl").write_text("in a keep directory: on disk\n")
    born = max(os.stat(cache / n).st_ctime for n in ("old", "held", "pip/old.whl"))
    wait_for(lambda: time.time() > born + MAX_AGE + 1.0, 10, "max_age to pass")
    # new, and new with old times (cp -p, tar x): their ctime and birth time are new
    (cache / "new").write_text("new\n")
    (cache / "copied").write_text("copied with its times\n")
    twenty_minutes_ago = time.time() - 1200
    os.utime(cache / "copied", (twenty_minutes_ago, twenty_minutes_ago))
    cwd_holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        cwd=cache / "held-dir",
        stdin=subprocess.PIPE,
    )
    try:
        with holding_open(cache / "held") as holder:
            written = helper(env, "write")
            assert written.returncode == 0, written.stderr
            assert written.stderr == (
                f"rampiped-tmpfiles: {cache}: files unused for 2s go; 2 in use\n"
            )
            assert conf.read_text().splitlines()[3:] == [
                f"e {cache} - - - 2s",
                f"x {cache}/held",
                f"x {cache}/held-dir",
            ]
            result = clean(conf)
            assert result.returncode == 0, result.stderr
            assert release(holder) == 0
    finally:
        cwd_holder.kill()
        cwd_holder.wait()
    assert f'Removing "{cache}/old"' in result.stderr
    assert tmpfs_at(cache)
    assert sorted(os.listdir(cache)) == ["copied", "held", "held-dir", "new", "pip"]
    assert (cache / "held").read_text() == "open, unused\n"
    assert (cache / "held-dir" / "f").exists()
    assert (cache / "pip" / "old.whl").read_text() == "in a keep directory: on disk\n"

    # while the list names the pin, the daemon does not unmount it (a clean-up that read
    # the list would otherwise clean the directory on disk)
    env.write_config(adaptive={"enabled": False})
    env.ctl("reload", check=True)
    daemon.wait_log(r"systemd-tmpfiles --clean is removing old files in it \(max_age\)")
    assert tmpfs_at(cache)
    removed = helper(env, "remove")
    assert (removed.returncode, removed.stderr) == (0, "")
    assert not conf.exists()
    wait_for(lambda: not tmpfs_at(cache), 30, "the unpin, retried once the clean-up is over")
    daemon.wait_log(rf"unpinned {cache}: no longer in the configuration")

    # the pin is gone: nothing of it is listed, the directory on disk is as it was
    env.write_config(adaptive={"enabled": False}, pins=[{**pin, "max_age": "1s"}])
    again = helper(env, "write")
    assert (again.returncode, again.stderr) == (0, "")
    assert not conf.exists()
    assert daemon.stop() == 0
