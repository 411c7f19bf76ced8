"""What an unpin writes after its unmount (what changed in the instant before it) makes no name
in the directory that the directory does not show in the end: no temporary name of rsync's or
rampiped's, however briefly. inotify sees every name made, so this does not depend on a
reader's luck. The case that made one before: a symlink replaced in that instant, which
rsync replaces by way of `.NAME.PID` beside it, and, in a copy pin, a hard-linked file, which
rsync writes in its scratch directory at the directory's top."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import running
from tests.system.helpers import drop_caches, remount, tree
from tests.system.namewatch import NameWatch

pytestmark = pytest.mark.system

# the last pause before the unmount: the write-back before it is done
BEFORE_UNMOUNT = {"overlay": "unpin:recorded", "copy": "unpin:copy-synced"}


def replace_symlink(path: Path, points_to: str) -> None:
    """As `ln -sfn` does: a symlink at a new name, renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    os.symlink(points_to, tmp)
    os.rename(tmp, path)


def stamp(path: Path) -> tuple[int, int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns


def same_inode(a: Path, b: Path) -> bool:
    return os.lstat(a).st_ino == os.lstat(b).st_ino


@pytest.mark.parametrize("mode", ["overlay", "copy"])
def test_the_write_back_after_the_unmount_makes_no_name_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    marker = tmp_path / "paused"
    stage = BEFORE_UNMOUNT[mode]
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        (d / "sub").mkdir(parents=True)
        os.symlink("v0", d / "current")
        os.symlink("x0", d / "sub/link")
        os.symlink("kept", d / "untouched")
        (d / "state.txt").write_text("0\n")
        (d / "app.log").write_text("line 0\n")
        (d / "linked-a").write_text("a0\n")
        os.link(d / "linked-a", d / "sub/linked-b")
        archive = tmp_path / "unpacked.tar"
        packed = tmp_path / "packed"
        (packed / "sub").mkdir(parents=True)
        (packed / "sub/t-a").write_text("tar\n")
        os.link(packed / "sub/t-a", packed / "sub/t-b")
        os.symlink("t-a", packed / "sub/t-link")
        subprocess.run(["tar", "-cf", str(archive), "-C", str(packed), "sub"], check=True)
        watch = NameWatch(d)  # the disk directory's inodes, below the pin too
        try:
            with safety.paused_daemon(env, monkeypatch, stage, marker) as dm:
                env.ctl("pin", "--mode", mode, str(d), check=True)
                replace_symlink(d / "current", "v1")  # written back before the unmount
                (d / "state.txt").write_text("1\n")
                unpin = safety.ctl_async(env, "unpin", str(d))
                try:
                    safety.wait_paused(marker, stage)
                    # the instant before the unmount: left for the write-back after it
                    replace_symlink(d / "current", "v2")
                    # real programs too: ln -sfn replaces a symlink, tar makes a hard-link
                    # pair and a symlink, cp -p rewrites a file in place
                    subprocess.run(["ln", "-sfn", "x1", str(d / "sub/link")], check=True)
                    os.symlink("y", d / "sub/new-link")
                    subprocess.run(["tar", "-xf", str(archive), "-C", str(d)], check=True)
                    # and into a directory the disk does not have yet: the pair's parents are
                    # made before it is placed
                    (d / "fresh").mkdir(mode=0o750)
                    subprocess.run(["tar", "-xf", str(archive), "-C", str(d / "fresh")], check=True)
                    tmp = d / "state.txt.tmp"
                    tmp.write_text("2\n")
                    tmp.rename(d / "state.txt")
                    (d / "new.txt").write_text("new\n")
                    with open(d / "app.log", "a") as f:
                        f.write("line 1\n")
                    (tmp_path / "copied").write_text("line 0\ncopied\n")
                    subprocess.run(
                        ["cp", "-p", str(tmp_path / "copied"), str(d / "cp.log")], check=True
                    )
                    with open(d / "linked-a", "a") as f:
                        f.write("a1\n")
                    expected = tree(d)
                    fresh = {rel: stamp(d / rel) for rel in ("fresh", "fresh/sub")}
                    one_inode = same_inode(d / "linked-a", d / "sub/linked-b")
                    watch.take()  # what the write-back before the unmount made, hidden
                    safety.release(marker)
                    out, err = unpin.communicate(timeout=120)
                    assert unpin.returncode == 0, (out, err, dm.log_text()[-3000:])
                finally:
                    safety.release(marker)
                    if unpin.poll() is None:
                        unpin.kill()
                        unpin.communicate()
            made = watch.made()
        finally:
            watch.close()
        assert not env.mounted_at(d)
        assert sorted(made - set(expected)) == []
        remount(env.disk)
        drop_caches()
        assert tree(d) == expected
        # a hard-link group written back is one inode again, as the view showed it
        assert same_inode(d / "linked-a", d / "sub/linked-b") == one_inode
        assert same_inode(d / "sub/t-a", d / "sub/t-b")
        assert same_inode(d / "fresh/sub/t-a", d / "fresh/sub/t-b")
        assert {rel: stamp(d / rel) for rel in fresh} == fresh


@pytest.mark.parametrize("fault", ["kill", "power"])
def test_a_crash_between_the_names_of_a_hard_link_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A copy pin's hard-link group is placed name by name (each rename atomic): a kill of
    the daemon after the first name, or a power cut there, loses nothing. After a kill the
    next start finishes the write-back and the directory shows the view; after a power cut
    (RAM lost) each name holds one of the versions the pin showed, whole: the group may be
    split then, as with rsync -H, which places a group name by name too."""
    marker = tmp_path / "paused"
    synced = BEFORE_UNMOUNT["copy"]
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        (d / "a").write_text("v0\n")
        os.link(d / "a", d / "b")
        os.symlink("t0", d / "l")
        with safety.paused_daemon(env, monkeypatch, f"{synced},placed:one", marker) as dm:
            env.ctl("pin", "--mode", "copy", str(d), check=True)
            with open(d / "a", "a") as f:
                f.write("v1\n")  # written back before the unmount
            unpin = safety.ctl_async(env, "unpin", str(d))
            try:
                safety.wait_paused(marker, synced)
                with open(d / "a", "a") as f:
                    f.write("v2\n")  # left for after the unmount
                replace_symlink(d / "l", "t1")
                view = tree(d)
                safety.release(marker)
                safety.wait_paused(marker, "placed:one")
                safety.fault(fault, env, dm)
                unpin.communicate(timeout=60)
            finally:
                safety.release(marker)
                if unpin.poll() is None:
                    unpin.kill()
                    unpin.communicate()
        with running(env) as again:
            again.wait_log(
                r"finished an interrupted draining" if fault == "kill" else r"RAM copy lost"
            )
            assert env.status()["pins"] == []
            log = again.log_text()
            assert again.stop() == 0, log[-3000:]
        remount(env.disk)
        drop_caches()
        got = tree(d)
        assert not [n for n in os.listdir(d) if "rampiped" in n], os.listdir(d)
        if fault == "kill":
            assert got == view, log[-3000:]
        else:
            assert got["a"] in (b"v0\nv1\n", b"v0\nv1\nv2\n"), got
            assert got["b"] in (b"v0\nv1\n", b"v0\nv1\nv2\n"), got
            assert got["l"] in ("-> t0", "-> t1"), got
            print(f"\nafter the power cut: {got}")
