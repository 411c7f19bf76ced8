"""An overlay unpin writes each changed byte to the disk once: its journal generation is on the
mount the directory is on, and the apply links the generation's files into place instead of
copying them. The disk's own write counter tells: about the changed data, not twice that. The
directory then shows what the view showed (contents, hard links, xattrs, modes), with no
overlay attribute on disk. With the journal on another filesystem, the files are copied."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import Env, make_env, running
from tests.system.helpers import LoopFs, bytes_written, drop_caches, make_loopfs, remount, tree

pytestmark = pytest.mark.system

MiB = 1 << 20
BIG = 6  # files of 8 MiB
PAYLOAD = BIG * 8 * MiB


def fill(d: Path) -> None:
    """What the pin holds: new and rewritten big files, a hard-linked pair, a file with a user
    xattr and its own mode, a symlink, a deletion, a new directory."""
    for i in range(BIG):
        with open(d / f"big{i}.bin", "wb") as f:
            f.write(os.urandom(8 * MiB))
    (d / "pair-a").write_text("one inode, two names\n")
    os.link(d / "pair-a", d / "sub" / "pair-b")
    os.setxattr(d / "sub" / "old.txt", "user.note", b"kept")
    (d / "sub" / "old.txt").write_text("rewritten in RAM\n")
    os.chmod(d / "sub" / "old.txt", 0o600)
    os.chown(d / "big1.bin", 4321, 4321)  # another user's: linked all the same
    os.chmod(d / "big1.bin", 0o000)
    os.symlink("sub/old.txt", d / "link")
    (d / "gone.txt").unlink()
    (d / "fresh").mkdir()
    (d / "fresh" / "f.txt").write_text("fresh\n")


def seed(d: Path) -> None:
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "old.txt").write_text("on disk\n")
    (d / "gone.txt").write_text("deleted in RAM\n")
    with open(d / "big0.bin", "wb") as f:
        f.write(os.urandom(8 * MiB))


def view(d: Path) -> dict[str, object]:
    return {
        "tree": tree(d),
        "pair": os.stat(d / "pair-a").st_ino == os.stat(d / "sub" / "pair-b").st_ino,
        "xattr": os.getxattr(d / "sub" / "old.txt", "user.note"),
        "mode": os.stat(d / "sub" / "old.txt").st_mode & 0o777,
        "other": (lambda st: (st.st_uid, st.st_gid, st.st_mode & 0o777))(os.stat(d / "big1.bin")),
    }


def overlay_xattrs(d: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = os.path.join(root, name)
            found += [
                f"{p}: {k}"
                for k in os.listxattr(p, follow_symlinks=False)
                if k.startswith("trusted.overlay.")
            ]
    return found


def unpin_and_count(env: Env, d: Path, disks: list[LoopFs]) -> tuple[list[int], str]:
    """Pin `d`, fill it, unpin it: what each device wrote during the unpin, and the log."""
    with running(env) as dm:
        env.ctl("pin", str(d), check=True)
        fill(d)
        expected = view(d)
        os.sync()
        before = [bytes_written(fs) for fs in disks]
        result = env.ctl("unpin", str(d))
        assert result.returncode == 0, dm.log_text()[-3000:]
        os.sync()
        written = [bytes_written(fs) - b for fs, b in zip(disks, before, strict=True)]
        assert dm.stop() == 0
        log = dm.log_text()
    assert not env.overlay_at(d)
    remount(env.disk)
    drop_caches()
    assert view(d) == expected
    assert overlay_xattrs(d) == []
    assert not os.path.exists(d / ".rampiped-tmp")
    return written, log


def test_an_overlay_unpin_writes_each_changed_byte_once(tmp_path: Path) -> None:
    with make_env(tmp_path, disk_mb=512) as env:
        d = env.data / "app"
        seed(d)
        (written,), log = unpin_and_count(env, d, [env.disk])
        # the journal generation, metadata and the filesystem's journal: not the data twice
        print(f"\nunpin of {PAYLOAD / MiB:.0f} MiB of changes: {written / MiB:.1f} MiB written")
        assert PAYLOAD <= written < 1.25 * PAYLOAD, f"{written / MiB:.1f} MiB written"
        m = re.search(r"written back before the unmount \((\d+) files, .*; (\d+) linked", log)
        assert m is not None, log[-3000:]
        assert int(m.group(2)) >= BIG and int(m.group(2)) <= int(m.group(1))


def test_a_journal_on_another_filesystem_is_copied_into_place(tmp_path: Path) -> None:
    with (
        make_env(tmp_path, disk_mb=512) as env,
        make_loopfs(tmp_path / "jdisk", size_mb=256) as jdisk,
    ):
        env = dataclasses.replace(env, journal=jdisk.mountpoint / "journal")
        env.write_config()
        d = env.data / "app"
        seed(d)
        (on_disk, on_journal), log = unpin_and_count(env, d, [env.disk, jdisk])
        assert on_disk >= PAYLOAD and on_journal >= PAYLOAD
        assert re.search(r"before the unmount \(\d+ files, [^;]*; 0 linked", log), log[-3000:]


def test_a_disk_file_written_right_after_the_switch_keeps_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file written back before the unmount is the journal's own inode. A process that
    appends to it, and rewrites another in place, on disk right after the unmount changes
    that inode; the write-back after the unmount (here: another file changed in RAM in the
    last moment) must leave both as the processes made them, and a plain disk would have
    them the same way."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        with safety.paused_daemon(env, monkeypatch, "unpin:recorded,unpin:unmounted", marker):
            env.ctl("pin", str(d), check=True)
            (d / "a.log").write_text("a1\n")
            (d / "b.log").write_text("b1\n")
            (d / "c.dat").write_bytes(b"x" * 4096)
            unpin = safety.ctl_async(env, "unpin", str(d))
            safety.wait_paused(marker, "unpin:recorded")
            assert env.overlay_at(d)
            with open(d / "a.log", "a") as f:  # in RAM, in the last moment
                f.write("a2\n")
            safety.release(marker)
            safety.wait_paused(marker, "unpin:unmounted")
            assert not env.overlay_at(d)
            with open(d / "b.log", "a") as f:  # on disk now
                f.write("b2 after the switch\n")
            with open(d / "c.dat", "r+b") as f:
                f.write(b"y" * 4096)  # same size, in place
            safety.release(marker)
            out, err = unpin.communicate(timeout=120)
            assert unpin.returncode == 0, (out, err)
        remount(env.disk)
        drop_caches()
        assert tree(d) == {
            "a.log": b"a1\na2\n",
            "b.log": b"b1\nb2 after the switch\n",
            "c.dat": b"y" * 4096,
        }
