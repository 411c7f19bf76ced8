"""Where a write-back holds the disk files it replaces (writeback.HoldPlace): in the pin's
journal, reached with the directory through a private copy of their mount, so that a reader of
the directory never sees it; and never removed with the journal: a hold left there is moved
into the directory (where the next start and unpin look) before the journal goes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampiped import mounts, pins
from rampiped.writeback import (
    HOLD_NAME,
    JOURNAL_STASH,
    HeldFiles,
    HoldPlace,
    attrdoc,
    holds_stashed,
)
from tests.system.helpers import held_index, make_loopfs

pytestmark = pytest.mark.system


@contextlib.contextmanager
def journal_place(tmp_path: Path) -> Iterator[tuple[Path, Path, HoldPlace]]:
    """A loop filesystem with a directory `data/app` (a.log in it) and a journal `journal/p1`;
    the hold place in that journal."""
    with make_loopfs(tmp_path / "fs", size_mb=64) as fs:
        d = fs.mountpoint / "data" / "app"
        journal = fs.mountpoint / "journal" / "p1"
        d.mkdir(parents=True)
        journal.mkdir(parents=True)
        (d / "a.log").write_text("disk 1\n")
        place = HoldPlace(
            str(d),
            root_fd=mounts.clone_mount(str(fs.mountpoint)),
            target_rel="data/app",
            hold_rel="journal/p1/held",
            shown=str(journal / "held"),
        )
        try:
            yield d, journal, place
        finally:
            place.close()


def replace_and_append(d: Path, held_link: Path) -> None:
    """RAM's version renamed over a.log, then a process that had the old a.log open appends to
    it (now only the hold's link names it)."""
    (d / ".new").write_text("disk 1\nram 2\n")
    os.rename(d / ".new", d / "a.log")
    with open(held_link, "a") as f:
        f.write("disk 3\n")


def test_the_hold_is_in_the_journal_and_carries_what_was_written(tmp_path: Path) -> None:
    with journal_place(tmp_path) as (d, journal, place):
        assert place.reaches(str(d), str(journal))
        held = HeldFiles.hold_paths(place, ["a.log"], {}, time.time_ns())
        assert os.listdir(d) == ["a.log"]  # nothing of ours in the directory
        assert held_index(journal / "held")
        replace_and_append(d, journal / "held" / "0")
        assert held.merge() == []
        held.finish()
        assert (d / "a.log").read_text() == "disk 1\nram 2\ndisk 3\n"
        assert not (journal / "held").exists()
        assert os.listdir(d) == ["a.log"]


@pytest.mark.parametrize("index_in", ["attribute", "file"])
def test_a_hold_left_in_the_journal_is_moved_into_the_directory_not_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index_in: str
) -> None:
    """`index_in`: where the hold's first index is, the hold directory's attribute, or its
    file (an index too large for the attribute)."""
    if index_in == "file":
        monkeypatch.setattr(attrdoc, "MOST", 0)
    with journal_place(tmp_path) as (d, journal, place):
        HeldFiles.hold_paths(place, ["a.log"], {}, time.time_ns())
        assert (journal / "held" / "held.json").exists() == (index_in == "file")
        replace_and_append(d, journal / "held" / "0")
        assert place.rescue()
        assert not (journal / "held").exists()
        assert held_index(d / HOLD_NAME)
        # where the next start or unpin finds it: both places are looked at
        left = HeldFiles.left(place)
        assert [h.place.outside for h in left] == [False]
        left[0].merge()
        left[0].finish()
        assert (d / "a.log").read_text() == "disk 1\nram 2\ndisk 3\n"
        assert os.listdir(d) == ["a.log"]


def test_a_hold_is_not_moved_over_one_already_in_the_directory(tmp_path: Path) -> None:
    with journal_place(tmp_path) as (d, journal, place):
        HeldFiles.hold_paths(place, ["a.log"], {}, time.time_ns())
        (d / HOLD_NAME).mkdir()
        assert not place.rescue()
        assert held_index(journal / "held")  # kept, not lost


def test_a_directory_with_a_mount_of_its_own_is_not_reached_through_the_copy(
    tmp_path: Path,
) -> None:
    """The copy of the mount shows what is below a mount point, not what is mounted on it: the
    place is refused (the caller then holds inside the directory)."""
    with journal_place(tmp_path) as (d, journal, place):
        subprocess.run(["mount", "-t", "tmpfs", "over", str(d)], check=True)
        try:
            assert not place.reaches(str(d), str(journal))
        finally:
            subprocess.run(["umount", str(d)], check=True)
        assert place.reaches(str(d), str(journal))


def test_a_journal_whose_stash_holds_directories_is_kept(tmp_path: Path) -> None:
    """A journal whose stash (JOURNAL_STASH) holds a directory that an interrupted apply moved
    out of the pinned one is never removed with the pin's journal: the next apply resumes from
    it. An empty stash (a finished apply's plan only) does not keep it."""
    run, journals = tmp_path / "run", tmp_path / "journal"
    mgr = pins.PinManager(str(run), str(journals), ram_limit=1 << 20)
    d = tmp_path / "data" / "app"
    d.mkdir(parents=True)
    journal = Path(mgr.journal("p1"))
    stash = journal / JOURNAL_STASH
    (stash / "0").mkdir(parents=True)
    (stash / "0" / "user-file").write_text("moved out of the directory\n")
    (stash / "plan.json").write_text("{}")
    assert holds_stashed(str(journal), JOURNAL_STASH)
    mgr.drop_journal("p1", str(d))
    assert (stash / "0" / "user-file").read_text() == "moved out of the directory\n"
    (stash / "0" / "user-file").unlink()
    (stash / "0").rmdir()
    assert not holds_stashed(str(journal), JOURNAL_STASH)
    mgr.drop_journal("p1", str(d))
    assert not journal.exists()
