"""Volatile pins end to end: the real daemon mounts a size-capped tmpfs, owned like the
directory, over every match of a glob before it says it started; `keep` subdirectories are
bound from the disk and persist, everything else is gone at stop and nothing is written back;
a home that appears later is pinned on reload; a restart after kill -9 adopts the pins.

The disk is seen through a bind of the loop filesystem made before the daemon starts (the
pinned paths show the tmpfs once pinned)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.daemon_harness import Env, make_env, running
from tests.system.helpers import mountinfo, wait_for

pytestmark = pytest.mark.system

SIZE = 8 * 1024 * 1024
USERS = {"alice": (1001, 1001, 0o700), "bob": (1002, 1003, 0o750)}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as e:
        yield e


@contextlib.contextmanager
def disk_view(env: Env) -> Iterator[Path]:
    """The loop filesystem as it is on disk, whatever is mounted over its directories later."""
    view = env.tmp / "disk-view"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(env.disk.mountpoint), str(view)], check=True)
    try:
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=False)


def home(env: Env, user: str) -> Path:
    return env.data / "home" / user


def make_cache(env: Env, user: str) -> Path:
    uid, gid, mode = USERS.get(user, (1004, 1004, 0o700))
    cache = home(env, user) / ".cache"
    (cache / "pip" / "wheels").mkdir(parents=True)
    (cache / "old-file").write_text("on disk before the pin\n")
    (cache / "pip" / "wheels" / "a.whl").write_text("kept wheel\n")
    for path in (home(env, user), cache, cache / "pip", cache / "pip" / "wheels"):
        os.chown(path, uid, gid)
    os.chmod(cache, mode)
    os.chmod(cache / "pip", 0o751)
    return cache


def volatile_config(env: Env) -> None:
    env.write_config(
        adaptive={"enabled": False},
        pins=[
            {
                "path": str(env.data / "home" / "*" / ".cache"),
                "mode": "volatile",
                "size": "8M",
                "keep": ["pip", "mesa/shaders"],
            }
        ],
    )


def mount_rows(path: Path) -> list[dict[str, str]]:
    return [m for m in mountinfo() if m["mountpoint"] == str(path)]


def mounts_below(path: Path) -> list[str]:
    return sorted(
        m["mountpoint"]
        for m in mountinfo()
        if m["mountpoint"] == str(path) or m["mountpoint"].startswith(str(path) + "/")
    )


def test_tmpfs_owned_like_the_directory_keeps_persist_nothing_else_does(env: Env) -> None:
    caches = {user: make_cache(env, user) for user in USERS}
    volatile_config(env)
    with disk_view(env) as view, running(env) as daemon:
        for user, cache in caches.items():
            # pinned before "started" (static pins are made before READY)
            assert daemon.log_text().index(f"pinned {cache}: static pin (volatile)") < (
                daemon.log_text().index("rampiped 0.1.0 started")
            )
            rows = mount_rows(cache)
            assert [r["fstype"] for r in rows] == ["tmpfs"], rows
            assert "size=8192k" in rows[0]["options"]
            uid, gid, mode = USERS[user]
            st = os.stat(cache)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode)
            # the disk's content is hidden, except what is kept
            assert sorted(os.listdir(cache)) == ["mesa", "pip"]
            assert (cache / "pip" / "wheels" / "a.whl").read_text() == "kept wheel\n"
            assert mounts_below(cache) == [
                str(cache),
                str(cache / "mesa/shaders"),
                str(cache / "pip"),
            ]
            # the keep mount points are owned like the directories on disk
            pst = os.stat(cache / "pip")
            assert (pst.st_uid, pst.st_gid, stat.S_IMODE(pst.st_mode)) == (uid, gid, 0o751)
            # a keep directory missing on disk was made there, owned like its parent
            disk_cache = view / "data" / "home" / user / ".cache"
            for rel in ("mesa", "mesa/shaders"):
                dst = os.stat(disk_cache / rel)
                assert (dst.st_uid, dst.st_gid, stat.S_IMODE(dst.st_mode)) == (uid, gid, mode)
            # writes
            (cache / "scratch").write_text("only in RAM\n")
            (cache / "pip" / "new.whl").write_text("written to the kept dir\n")
            (cache / "mesa" / "shaders" / "s.bin").write_bytes(b"\x01\x02")
            (cache / "mesa" / "not-kept").write_text("in RAM\n")
            assert (disk_cache / "pip" / "new.whl").read_text() == "written to the kept dir\n"
            assert not (disk_cache / "scratch").exists()
            assert (disk_cache / "old-file").read_text() == "on disk before the pin\n"
        # the size cap: the tmpfs refuses what does not fit
        with pytest.raises(OSError) as info, open(caches["alice"] / "big", "wb") as f:
            f.write(b"x" * (SIZE + 4096))
            f.flush()
            os.fsync(f.fileno())
        assert info.value.errno == errno.ENOSPC
        (caches["alice"] / "big").unlink()
        status = {p["path"]: p for p in env.status()["pins"]}
        assert status[str(caches["alice"])]["mode"] == "volatile"
        assert status[str(caches["alice"])]["dirty_bytes"] == 0
        # nothing to checkpoint, and saying so is not an error
        assert env.ctl("sync").returncode == 0
        assert daemon.stop() == 0
        log = daemon.log_text()
    for cache in caches.values():
        assert mounts_below(cache) == [], "a mount was left at stop"
        assert f"unpinned {cache}: stopping; wrote 0 files" in log
        assert sorted(os.listdir(cache)) == ["mesa", "old-file", "pip"]
        assert (cache / "old-file").read_text() == "on disk before the pin\n"
        assert (cache / "pip" / "new.whl").read_text() == "written to the kept dir\n"
        assert (cache / "mesa" / "shaders" / "s.bin").read_bytes() == b"\x01\x02"
        assert sorted(os.listdir(cache / "mesa")) == ["shaders"]


def test_a_new_home_is_pinned_on_reload(env: Env) -> None:
    alice = make_cache(env, "alice")
    volatile_config(env)
    with running(env) as daemon:
        assert [r["fstype"] for r in mount_rows(alice)] == ["tmpfs"]
        carol = make_cache(env, "carol")
        assert mount_rows(carol) == []
        env.ctl("reload", check=True)
        wait_for(lambda: mount_rows(carol), 20, "carol's cache to be pinned on reload")
        daemon.wait_log(rf"pinned {carol}: static pin \(volatile\)")
        st = os.stat(carol)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1004, 1004, 0o700)
        assert sorted(os.listdir(carol)) == ["mesa", "pip"]
        # a pin that leaves the configuration is unmounted on reload, nothing written back
        (carol / "scratch").write_text("x")
        env.write_config(adaptive={"enabled": False})
        env.ctl("reload", check=True)
        wait_for(lambda: not mount_rows(alice) and not mount_rows(carol), 20, "unpins on reload")
        assert not (carol / "scratch").exists()
        assert daemon.stop() == 0


def test_restart_after_kill_adopts_without_stacking(env: Env) -> None:
    cache = make_cache(env, "alice")
    volatile_config(env)
    with running(env) as daemon:
        (cache / "scratch").write_text("survives a daemon crash\n")
        before = mounts_below(cache)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
    assert mounts_below(cache) == before
    with running(env) as daemon:
        daemon.wait_log(rf"adopted {cache} \(volatile, static\)")
        assert mounts_below(cache) == before  # nothing mounted twice
        assert (cache / "scratch").read_text() == "survives a daemon crash\n"
        assert daemon.stop() == 0
    assert mounts_below(cache) == []
    assert not (cache / "scratch").exists()


def test_a_keep_that_is_a_symlink_refuses_the_pin(env: Env) -> None:
    cache = make_cache(env, "alice")
    (env.tmp / "elsewhere").mkdir()
    shutil.rmtree(cache / "pip")
    os.symlink(env.tmp / "elsewhere", cache / "pip")
    volatile_config(env)
    with running(env) as daemon:
        daemon.wait_log(rf"cannot pin {cache}: {cache}/pip on disk is a symlink")
        assert mount_rows(cache) == []
        assert mounts_below(env.tmp / "elsewhere") == []
        assert sorted(os.listdir(cache)) == ["old-file", "pip"]
        assert daemon.stop() == 0


def test_without_size_the_tmpfs_is_one_and_a_half_times_ram_max(env: Env) -> None:
    """The documented default of `size`: the size every pin's tmpfs has (ram.max, plus half
    of it again as room for the writes that arrive while the coldest pin is evicted)."""
    cache = make_cache(env, "alice")
    env.write_config(
        adaptive={"enabled": False},
        ram={"max": "256M"},
        pins=[{"path": str(cache), "mode": "volatile"}],
    )
    with running(env) as daemon:
        rows = mount_rows(cache)
        assert [r["fstype"] for r in rows] == ["tmpfs"], rows
        assert "size=393216k" in rows[0]["options"]  # 384 MiB
        assert daemon.stop() == 0
