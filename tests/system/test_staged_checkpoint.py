"""A copy pin's checkpoint writes the files it writes whole with few journal commits: staged
in the scratch directory without an fsync each, made durable by one commit, then renamed into
place (copywb/staged.py). The device's own counter shows what that spares; a power cut at each
step (the device image copied, ext4 committing metadata only where rampiped syncs) leaves each
name its old file or its new one, whole."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from rampiped import durable
from rampiped.commands import CommandResult, run_command
from rampiped.copywb import checkpoint as checkpoint_module
from rampiped.copywb import staged
from tests.system.helpers import bytes_written, small_files, syncfs_path, tree
from tests.system.test_copymode import Layout, layout, make_loopfs_from

pytestmark = pytest.mark.system

__all__ = ["layout"]  # the fixture, used by name

KiB = 1 << 10
MiB = 1 << 20


def test_the_first_checkpoint_of_many_small_files_costs_few_commits(layout: Layout) -> None:
    """2,000 new files of 200 bytes (a 1 KiB block each on this small ext4): the checkpoint
    writes less than 4 KiB per file in all (1.8 KiB measured; with a temporary file, an fsync
    and a rename per file, 11.5 KiB), and the disk holds them all."""
    layout.copy_in()
    layout.bind_over()
    try:
        small_files(layout.orig, 2000, "new", dirs=20)
        syncfs_path(layout.loop.mountpoint)
        before = bytes_written(layout.loop)
        res = layout.checkpoint()
        syncfs_path(layout.loop.mountpoint)
        took = bytes_written(layout.loop) - before
        assert res.files == 2000, res
        assert tree(layout.disk) == tree(layout.data)
        print(
            f"\n2,000 small files: {took / MiB:.1f} MiB written ({took / 2000 / KiB:.1f} KiB each)"
        )
        assert took < 2000 * 4 * KiB, took
    finally:
        layout.unbind()
    assert not (layout.disk / ".rampiped-tmp").exists()


def test_a_checkpoint_of_one_change_stages_one_directory(layout: Layout) -> None:
    """After a checkpoint of 2,000 files in 20 directories, one file rewritten: with the
    ledger known, the stage gets that file and its directory only (rsync --compare-dest
    alone made every directory of the tree in it, and removed them again)."""
    layout.copy_in()
    layout.bind_over()
    try:
        small_files(layout.orig, 2000, "new", dirs=20)
        ledger = layout.checkpoint().ledger
        (layout.orig / "d07" / "f7").write_text("changed".ljust(200, "."))
        syncfs_path(layout.loop.mountpoint)
        before = bytes_written(layout.loop)
        res = layout.checkpoint(ledger=ledger)
        syncfs_path(layout.loop.mountpoint)
        took = bytes_written(layout.loop) - before
        assert res.files == 1, res
        assert tree(layout.disk) == tree(layout.data)
        print(f"\none change among 2,000 files: {took / KiB:.0f} KiB written")
        assert took < 75 * KiB, took  # 51 KiB measured; 102 KiB staging every directory
    finally:
        layout.unbind()
    assert not (layout.disk / ".rampiped-tmp").exists()


def test_a_checkpoint_moves_what_it_staged_and_the_main_pass_does_the_rest(
    layout: Layout,
) -> None:
    """New files in new directories, rewritten files, a hard-linked pair, a file where the disk
    has a directory, a symlink, deletions: the disk ends up as RAM is."""
    (layout.orig / "keep").mkdir()
    (layout.orig / "keep" / "old.txt").write_text("old\n")
    (layout.orig / "gone.txt").write_text("deleted in RAM\n")
    (layout.orig / "was-dir").mkdir()
    (layout.orig / "was-dir" / "x").write_text("x\n")
    layout.copy_in()
    layout.bind_over()
    try:
        o = layout.orig
        (o / "keep" / "old.txt").write_text("rewritten in RAM, longer\n")
        (o / "fresh" / "deep").mkdir(parents=True)
        (o / "fresh" / "deep" / "f.txt").write_text("fresh\n")
        (o / "pair-a").write_text("one inode\n")
        os.link(o / "pair-a", o / "keep" / "pair-b")
        (o / "gone.txt").unlink()
        (o / "was-dir" / "x").unlink()
        (o / "was-dir").rmdir()
        (o / "was-dir").write_text("a file now\n")
        os.symlink("keep/old.txt", o / "link")
        os.chmod(o / "keep" / "old.txt", 0o600)
        layout.checkpoint()
        assert tree(layout.disk) == tree(layout.data)
        a, b = os.stat(layout.disk / "pair-a"), os.stat(layout.disk / "keep" / "pair-b")
        assert a.st_ino == b.st_ino
        assert os.stat(layout.disk / "keep" / "old.txt").st_mode & 0o777 == 0o600
    finally:
        layout.unbind()
    assert not (layout.disk / ".rampiped-tmp").exists()


def contents(d: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in d.rglob("*")
        if p.is_file() and ".rampiped-tmp" not in p.parts
    }


def test_a_power_cut_at_each_step_leaves_each_name_old_or_new(
    layout: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut before the stage is written out, after it is, after the moves, after the main pass
    and after the checkpoint returned: each name shows its old file or its new one, a log that
    only grew shows a prefix at least as long as its old content, and the last cut shows the
    new state whole (the checkpoint's one commit, at its end, made it durable)."""
    subprocess.run(["mount", "-o", "remount,commit=600", str(layout.loop.mountpoint)], check=True)
    # here the checkpoint writes its data out and commits once by an fsync, not by syncfs:
    # that is what is cut
    assert durable.fsync_commits_all(str(layout.disk))
    for i in range(30):
        (layout.orig / f"f{i}").write_bytes(os.urandom(3000 + 100 * i))
    for i in range(4):
        (layout.orig / f"log{i}").write_bytes(b"line\n" * (500 + 50 * i))
    layout.copy_in()
    layout.bind_over()
    try:
        ledger = layout.checkpoint().ledger
        old = contents(layout.disk)
        for i in range(0, 30, 2):
            (layout.orig / f"f{i}").write_bytes(os.urandom(5000 + 100 * i))
        (layout.orig / "new").mkdir()
        for i in range(5):
            (layout.orig / "new" / f"n{i}").write_bytes(os.urandom(4000))
        for i in range(4):
            with open(layout.orig / f"log{i}", "ab") as f:
                f.write(os.urandom(3000 + 1000 * i).hex().encode())
        target = "a-target-too-long-for-the-inode-itself/" * 3  # a block of its own
        (layout.orig / "long-link").symlink_to(target)
        new = contents(layout.data)
        images: list[tuple[str, Path]] = []

        def cut(label: str) -> None:
            image = tmp_path / f"{label}.img"
            subprocess.run(
                ["cp", "--sparse=always", str(layout.loop.image), str(image)], check=True
            )
            images.append((label, image))

        def runner(argv: list[str]) -> CommandResult:
            # the main pass: of the whole tree, or of what changed since the last checkpoint
            # (a listed pass; the copies again of files that changed meanwhile add -I)
            main = "--delete" in argv or ("--delete-missing-args" in argv and "-I" not in argv)
            if main:
                cut("staged-and-moved")  # the renames done, not yet committed
            result = run_command(argv)
            cut("main-pass-done" if main else "staged")
            return result

        def move_staged(disk: str, scratch: str) -> list[str]:
            cut("stage-written")
            return staged.move_staged(disk, scratch)

        monkeypatch.setattr(checkpoint_module, "move_staged", move_staged)
        result = layout.checkpoint(ledger=ledger, runner=runner)
        assert result.appended == 4, result
        cut("returned")
        assert [label for label, _ in images] == [
            "staged", "stage-written", "staged-and-moved", "main-pass-done", "returned",
        ]  # fmt: skip
        for n, (label, image) in enumerate(images):
            with make_loopfs_from(image, tmp_path / f"rebooted-{n}") as rebooted:
                found = contents(rebooted / "pve-cluster")
                link = rebooted / "pve-cluster" / "long-link"
                if label == "returned":  # made by the main pass, committed at the end
                    assert os.readlink(link) == target
            image.unlink()
            if label == "returned":
                assert found == new
            for name in set(old) | set(new):
                if name.startswith("log"):  # only grew: a prefix, at least the old content
                    assert new[name].startswith(found[name]), (label, name)
                    assert found[name].startswith(old[name]), (label, name)
                    if label == "returned":
                        assert found[name] == new[name], (label, name)
                else:
                    assert found.get(name) in (old.get(name), new.get(name)), (label, name)
    finally:
        layout.unbind()
    assert contents(layout.disk) == new
