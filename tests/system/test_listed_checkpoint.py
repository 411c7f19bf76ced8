"""A copy pin's checkpoint looks only at what changed since the last one (copywb/checkpoint.py):
the entries whose stamp moved since then, and the files whose content differs from what the
disk holds. Every kind of change a directory sees must still reach the disk: content, names,
kinds, links, modes, owners, times, extended attributes and ACLs, deletions of whole trees."""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rampiped.commands import CommandResult, run_command
from rampiped.writeback import CLOCK_SLACK_NS
from tests.system.changes import CHANGES, populate
from tests.system.helpers import diff_manifests, manifest, small_files, wait_for
from tests.system.test_copymode import Layout, layout
from tests.system.test_early_write_back import commit, run

pytestmark = pytest.mark.system

__all__ = ["layout"]  # the fixture, used by name


def main_passes(into: list[list[str]]) -> Callable[[list[str]], CommandResult]:
    """A runner that records, for each main pass (not the stage, not a copy again of what
    changed meanwhile), what it was given to look at: the listed entries, or ["<all>"]."""

    def run(argv: list[str]) -> CommandResult:
        if "--delete" in argv:
            into.append(["<all>"])
        elif "--delete-missing-args" in argv and "-I" not in argv:
            listing = next(a for a in argv if a.startswith("--files-from="))
            with open(listing.partition("=")[2], "rb") as f:
                into.append([p.decode() for p in f.read().split(b"\0") if p])
        return run_command(argv)

    return run


def settle(layout: Layout) -> None:
    """Let the clock pass the slack after the newest change of the RAM side: entries that
    recent are not recorded as known equal (the kernel's coarse clock)."""
    newest = max(os.lstat(p).st_ctime_ns for p in [layout.data, *layout.data.rglob("*")])
    wait_for(lambda: time.time_ns() > newest + CLOCK_SLACK_NS, 5, "the clock to move on")


@pytest.mark.parametrize("change", ["all", *CHANGES])
def test_a_listed_checkpoint_takes_every_kind_of_change(
    layout: Layout, tmp_path: Path, change: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    populate(layout.orig, outside)
    layout.copy_in()
    layout.bind_over()
    try:
        settle(layout)
        ledger = layout.checkpoint().ledger
        assert ledger is not None and ledger.entries
        for name, fn in CHANGES.items():
            if change in ("all", name):
                fn(layout.orig)
        view = manifest(layout.data)
        passes: list[list[str]] = []
        res = layout.checkpoint(ledger=ledger, runner=main_passes(passes))
        assert passes and passes[0] != ["<all>"], passes
        assert diff_manifests(view, manifest(layout.disk)) == []
        assert res.ledger is not None
        # and the next one, with nothing changed, looks at nothing the last one settled
        settle(layout)
        again = layout.checkpoint(ledger=res.ledger, runner=main_passes(passes))
        assert diff_manifests(view, manifest(layout.disk)) == []
        layout.final_sync(ledger=again.ledger)
    finally:
        layout.unbind()
    assert diff_manifests(view, manifest(layout.orig)) == []


def test_a_checkpoint_of_one_change_looks_at_that_change(layout: Layout) -> None:
    small_files(layout.orig, 2_000, "old", dirs=20)
    layout.copy_in()
    layout.bind_over()
    try:
        settle(layout)
        ledger = layout.checkpoint().ledger
        settle(layout)
        (layout.orig / "d03" / "f3").write_text("changed".ljust(200))
        os.chmod(layout.orig / "d04" / "f4", 0o600)
        os.unlink(layout.orig / "d05" / "f5")
        passes: list[list[str]] = []
        res = layout.checkpoint(ledger=ledger, runner=main_passes(passes))
        # (the rewritten file is listed too, and left out: staged and moved in before the
        # pass), and the directory whose entry went, for its times
        assert passes == [["d03/f3", "d04/f4", "d05", "d05/f5"]], passes
        assert diff_manifests(manifest(layout.data), manifest(layout.disk)) == []
        assert not (layout.disk / "d05" / "f5").exists()
        assert res.ledger is not None and res.ledger.entries is not None
        # what changed right before the checkpoint began may change again with the same
        # ctime: looked at again next time; the rest is known equal
        assert "d03/f3" not in res.ledger.entries and "d04/f4" not in res.ledger.entries
        assert "d06/f6" in res.ledger.entries
    finally:
        layout.unbind()


def test_without_a_record_of_the_entries_the_pass_looks_at_all(layout: Layout) -> None:
    """The first checkpoint after the copy-in, and the final sync, look at every entry."""
    small_files(layout.orig, 50, "old", dirs=5)
    layout.copy_in()
    layout.bind_over()
    try:
        passes: list[list[str]] = []
        first = layout.checkpoint(runner=main_passes(passes))
        assert passes == [["<all>"]]
        layout.final_sync(ledger=first.ledger, runner=main_passes(passes))
        assert passes == [["<all>"], ["<all>"]]
    finally:
        layout.unbind()


def test_real_programs_between_two_listed_checkpoints(layout: Layout, tmp_path: Path) -> None:
    """What real programs do to a directory between two checkpoints, the second one looking
    only at what moved: cp -p and tar keep old mtimes on new content of the same size, rsync
    -a renames over files, git writes objects and renames its index, a store through a shared
    mapping changes no stamp, a rotation renames, touch -d moves a time back, setfattr and
    chmod change only metadata."""
    orig = layout.orig
    (orig / "same.txt").write_text("A" * 100)
    (orig / "mapped.bin").write_bytes(b"\0" * 8192)
    (orig / "app.log").write_text("line 1\n")
    (orig / "meta").write_text("meta")
    run("git", "init", "-q", orig / "repo")
    (orig / "repo" / "f").write_text("one\n")
    run("git", "-C", orig / "repo", "add", "f")
    commit(orig / "repo", "1", "-qm")
    src = tmp_path / "src"
    (src / "tree").mkdir(parents=True)
    (src / "same.txt").write_text("B" * 100)
    (src / "tree" / "t.txt").write_text("from tar")
    os.utime(src / "same.txt", (1_000_000_000, 1_000_000_000))
    os.utime(src / "tree" / "t.txt", (1_000_000_000, 1_000_000_000))
    run("tar", "-C", src, "-cf", tmp_path / "t.tar", "tree")
    layout.copy_in()
    layout.bind_over()
    mapped = open(orig / "mapped.bin", "r+b")  # noqa: SIM115 (open across the checkpoints)
    mapping = mmap.mmap(mapped.fileno(), 0)
    try:
        mapping[0:5] = b"first"  # the page is writable from now on: later stores move no stamp
        mapping.flush()
        settle(layout)
        ledger = layout.checkpoint().ledger
        settle(layout)
        os.utime(orig / "same.txt", (1_000_000_000, 1_000_000_000))  # as cp -p will leave it
        ledger = layout.checkpoint(ledger=ledger).ledger
        settle(layout)
        run("cp", "-p", src / "same.txt", orig / "same.txt")  # same size, same old mtime
        run("tar", "-C", orig, "-xf", tmp_path / "t.tar")
        run("rsync", "-a", src / "tree" / "", orig / "synced")
        (orig / "repo" / "f").write_text("two\n")
        commit(orig / "repo", "2", "-qam")
        stamp = (orig / "mapped.bin").stat().st_ctime_ns
        mapping[100:105] = b"store"
        mapping.flush()
        assert (orig / "mapped.bin").stat().st_ctime_ns == stamp  # no stamp moved
        os.rename(orig / "app.log", orig / "app.log.1")  # a rotation
        (orig / "app.log").write_text("line 2\n")
        run("touch", "-d", "2001-01-01", orig / "meta")
        run("setfattr", "-n", "user.k", "-v", "v", orig / "meta")
        os.chmod(orig / "meta", 0o600)
        view = manifest(layout.data)
        passes: list[list[str]] = []
        res = layout.checkpoint(ledger=ledger, runner=main_passes(passes))
        assert passes and passes[0] != ["<all>"], passes
        assert diff_manifests(view, manifest(layout.disk)) == []
        run("git", "-C", layout.disk / "repo", "fsck", "--strict")
        mapping.close()
        mapped.close()
        layout.final_sync(ledger=res.ledger)
    finally:
        if not mapping.closed:
            mapping.close()
        mapped.close()
        layout.unbind()
    assert (orig / "same.txt").read_text() == "B" * 100
    assert (orig / "mapped.bin").read_bytes()[100:105] == b"store"
