"""Local users against the root daemon: watch roots such as /home/*/.cache are writable by
their users, who may swap a directory for a symlink or rename trees while rampiped pins it or
writes it back. rampiped must never read or write outside the managed directory.

The hostile steps are done by the test on a tree owned by an unprivileged user (uid 65534); the
daemon cannot tell who renamed what. Each race is placed exactly with the daemon's test pause
point (RAMPIPED_TEST_PAUSE_AT): the daemon waits there until the marker file is removed."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import Env, running
from tests.system.helpers import diff_manifests, manifest, mountinfo, wait_for

pytestmark = pytest.mark.system

USER = 65534


daemon = safety.paused_daemon
ctl_async = safety.ctl_async


def chown_tree(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, USER, USER)


def layout(env: Env) -> tuple[Path, Path, Path]:
    """A user's tree data/u/x (x has files and a subdirectory `sub`), and `outside`: a root
    directory the user must never make rampiped touch."""
    outside = env.disk.mountpoint / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    u = env.data / "u"
    x = u / "x"
    (x / "sub").mkdir(parents=True)
    (x / "a.txt").write_text("a\n")
    (x / "sub" / "old.txt").write_text("old\n")
    chown_tree(u)
    return u, x, outside


def swap_for_symlink(x: Path, to: Path) -> Path:
    moved = x.with_name(x.name + ".moved")
    x.rename(moved)
    x.symlink_to(to)
    os.lchown(x, USER, USER)
    return moved


def mount_options(mount_id: str) -> list[str]:
    """The per-mount options (field 6 of mountinfo), where nosymfollow shows."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[0] == mount_id:
                return fields[5].split(",")
    return []


def mounts_under(path: Path) -> list[str]:
    return [m["mountpoint"] for m in mountinfo() if m["mountpoint"].startswith(str(path))]


def test_symlink_swapped_in_during_the_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        _u, x, outside = layout(env)
        before = manifest(outside)
        with daemon(env, monkeypatch, "pin:layers", marker):
            pin = ctl_async(env, "pin", str(x))
            safety.wait_paused(marker, "pin:layers")
            moved = swap_for_symlink(x, outside)
            safety.count("bad inputs")
            marker.unlink()
            _, err = pin.communicate(timeout=60)
            assert pin.returncode == 1
            assert "moved or replaced during the pin" in err, err
            assert env.status()["pins"] == []
        assert mounts_under(outside) == [] and mounts_under(moved) == []
        assert diff_manifests(before, manifest(outside)) == []
        assert (moved / "a.txt").read_text() == "a\n"
        assert safety.no_leftover_mounts(env.runtime) == []


def test_parent_renamed_during_the_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        u, x, _outside = layout(env)
        with daemon(env, monkeypatch, "pin:layers", marker):
            pin = ctl_async(env, "pin", str(x))
            safety.wait_paused(marker, "pin:layers")
            u.rename(u.with_name("u2"))
            safety.count("bad inputs")
            marker.unlink()
            _, err = pin.communicate(timeout=60)
            assert pin.returncode == 1 and "moved or replaced" in err, err
        assert mounts_under(env.data) == []
        assert (env.data / "u2" / "x" / "a.txt").read_text() == "a\n"


def test_symlink_planted_in_the_directory_during_the_write_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    # the write-back after the unmount, all of it (as for a pin that cannot be written back
    # before: a renamed directory, a mapped file): the user plants the symlink in the moment
    # the path shows the disk as it was pinned
    monkeypatch.setenv("RAMPIPED_TEST_LATE_WRITEBACK", "1")
    with safety.manual_env(tmp_path) as env:
        _u, x, outside = layout(env)
        before = manifest(outside)
        with daemon(env, monkeypatch, "unpin:unmounted", marker):
            env.ctl("pin", str(x), check=True)
            (x / "sub" / "new.txt").write_text("written in RAM\n")
            unpin = ctl_async(env, "unpin", str(x))
            safety.wait_paused(marker, "unpin:unmounted")
            # the overlay is gone: the user now sees the disk and swaps `sub` for a symlink
            swap_for_symlink(x / "sub", outside)
            safety.count("bad inputs")
            marker.unlink()
            _, err = unpin.communicate(timeout=60)
            assert unpin.returncode == 0, err
        assert diff_manifests(before, manifest(outside)) == []
        assert (x / "sub").is_dir() and not (x / "sub").is_symlink()
        assert (x / "sub" / "new.txt").read_text() == "written in RAM\n"


def test_staging_bind_does_not_follow_symlinks(tmp_path: Path) -> None:
    with safety.manual_env(tmp_path) as env:
        _u, x, outside = layout(env)
        with running(env):
            env.ctl("pin", str(x), check=True)
            staging = [
                (m["mountpoint"], mount_options(m["id"]))
                for m in mountinfo()
                if m["mountpoint"].startswith(str(env.runtime / "pins"))
                and m["mountpoint"].endswith("/disk")
            ]
            assert len(staging) == 1
            safety.count("bad inputs")
            assert "nosymfollow" in staging[0][1], staging[0]
            # a symlink in the directory on disk, seen through the staging bind, goes nowhere
            disk = Path(staging[0][0])
            (disk / "link").symlink_to(outside)
            with pytest.raises(OSError) as info:
                (disk / "link" / "passwd").read_text()
            assert info.value.errno == 40  # ELOOP
            (disk / "link").unlink()
            env.ctl("unpin", str(x), check=True)


@pytest.mark.parametrize("fault", ["kill", "power"])
def test_directory_swapped_for_a_symlink_before_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """The daemon dies during a write-back (or the power goes); before it starts again the
    user replaces the directory by a symlink to a root directory. After a kill the staging bind
    still holds the real directory, and the start finishes the write-back into it (wherever it
    was moved); after a power cut nothing holds it, and the start refuses the path until the
    directory is back. Nothing is ever written through the symlink."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        _u, x, outside = layout(env)
        before = manifest(outside)
        with daemon(env, monkeypatch, "unpin:unmounted", marker) as dm:
            env.ctl("pin", str(x), check=True)
            safety.write_version(x / "sub" / "f", "sub/f", 1)
            env.ctl("sync", str(x), check=True)  # a journal generation for the power cut
            unpin = ctl_async(env, "unpin", str(x))
            safety.wait_paused(marker, "unpin:unmounted")
            dm.kill()
            unpin.wait(30)
            if fault == "power":
                safety.drop_ram(env.runtime.parent, env.data)
                safety.count("power cuts")
            else:
                safety.count("crash points")
        moved = swap_for_symlink(x, outside)
        safety.count("bad inputs")
        with daemon(env, monkeypatch) as dm:
            if fault == "kill":
                dm.wait_log(r"finished an interrupted draining")
            else:
                # kept and reported as stranded (retried), never written through the symlink
                dm.wait_log(
                    re.escape(str(x)) + r": NOT WRITTEN BACK: .* only in \S+/gen-\d+; .*symlink"
                )
        assert diff_manifests(before, manifest(outside)) == []
        assert mounts_under(outside) == []
        x.unlink()
        moved.rename(x)
        if fault == "power":
            with daemon(env, monkeypatch) as dm:
                dm.wait_log(r"applied the checkpoint journal")
        assert safety.no_leftover_mounts(env.runtime) == []
        assert safety.check_tree(x, {"sub/f": 1}) == []
        assert diff_manifests(before, manifest(outside)) == []


def test_parent_renamed_while_pinned(tmp_path: Path) -> None:
    """A pinned directory cannot be renamed (it is a mount point), but its parent can. The
    unpin must not unmount whatever now sits at the old path; the data stays reachable."""
    with safety.manual_env(tmp_path) as env:
        u, x, _outside = layout(env)
        with running(env):
            env.ctl("pin", str(x), check=True)
            (x / "ram.txt").write_text("in RAM\n")
            u2 = u.with_name("u2")
            u.rename(u2)
            x.mkdir(parents=True)  # a decoy where the pin used to be
            safety.count("bad inputs")
            proc = env.ctl("unpin", str(x))
            assert proc.returncode == 1
            assert "no longer at that path" in proc.stderr, proc.stderr
            assert (u2 / "x" / "ram.txt").read_text() == "in RAM\n"
            x.rmdir()
            u.rmdir()
            u2.rename(u)
            wait_for(lambda: env.ctl("unpin", str(x)).returncode == 0, 60, "the unpin")
        assert (x / "ram.txt").read_text() == "in RAM\n"
        assert mounts_under(env.data) == []
