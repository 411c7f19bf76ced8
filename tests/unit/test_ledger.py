"""The content ledger (rampiped/ledger.py) and the test that tells rsync's complaints about a
live source apart from real failures (sync.source_churn_only). The ledger reads files, so its
tests use a temporary directory; they need no privileges."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rampiped.ledger import Ledger, scan, settled, with_links
from rampiped.writeback import CommandResult, source_churn_only


def _write(path: Path, data: bytes, mtime_ns: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_same_size_rewrite_with_the_old_mtime_is_changed(tmp_path: Path) -> None:
    _write(tmp_path / "a.conf", b"setting = old\n", 1_700_000_000_000_000_000)
    _write(tmp_path / "b.conf", b"setting = one\n")
    known = Ledger.of(scan(str(tmp_path)))
    _write(tmp_path / "a.conf", b"setting = NEW\n", 1_700_000_000_000_000_000)
    assert known.changed(scan(str(tmp_path))) == ["a.conf"]


def test_an_unchanged_tree_has_no_changes_and_new_files_are_changed(tmp_path: Path) -> None:
    _write(tmp_path / "d/x", b"x")
    known = Ledger.of(scan(str(tmp_path)))
    assert known.changed(scan(str(tmp_path))) == []
    _write(tmp_path / "d/y", b"y")
    assert known.changed(scan(str(tmp_path))) == ["d/y"]
    assert Ledger().changed(scan(str(tmp_path))) == ["d/x", "d/y"]


def test_a_changed_file_brings_the_other_names_of_its_inode(tmp_path: Path) -> None:
    _write(tmp_path / "a", b"1")
    os.link(tmp_path / "a", tmp_path / "b")
    _write(tmp_path / "c", b"3")
    found = scan(str(tmp_path))
    assert with_links(found, ["a"]) == {"a", "b"}
    assert with_links(found, ["c"]) == {"c"}
    known = Ledger.of(found)
    with open(tmp_path / "b", "r+b") as f:
        f.write(b"2")
    assert known.changed(scan(str(tmp_path))) == ["a", "b"]


def test_symlinks_and_directories_are_not_in_the_ledger(tmp_path: Path) -> None:
    _write(tmp_path / "f", b"f")
    os.symlink("f", tmp_path / "link")
    (tmp_path / "dir").mkdir()
    assert sorted(scan(str(tmp_path))) == ["f"]


def test_settled_leaves_out_what_moved_after_the_scan(tmp_path: Path) -> None:
    _write(tmp_path / "still", b"s")
    _write(tmp_path / "moving", b"m")
    _write(tmp_path / "gone", b"g")
    found = scan(str(tmp_path))
    _write(tmp_path / "moving", b"mm")
    os.unlink(tmp_path / "gone")
    assert settled(found, str(tmp_path)).digests == {"still": found["still"].digest}


@pytest.mark.parametrize(
    ("code", "stderr", "churn"),
    [
        (0, "", False),
        (24, 'file has vanished: "/r/d/f1"\n', True),
        (
            23,
            'file has vanished: "/r/d/f1"\n'
            'rsync: [sender] send_files failed to open "/r/d/f2": Is a directory (21)\n'
            "rsync error: some files/attrs were not transferred (see previous errors) "
            "(code 23) at main.c(1394) [sender=3.5.0]\n",
            True,
        ),
        (
            23,
            'rsync: [sender] read errors mapping "/r/f": No data available (61)\n'
            "WARNING: f failed verification -- update discarded (will try again).\n",
            True,
        ),
        (
            23,
            'rsync: [receiver] mkstemp "/d/.f.XXXXXX" failed: Permission denied (13)\n'
            "rsync error: some files/attrs were not transferred (see previous errors) "
            "(code 23) at main.c(1394) [sender=3.5.0]\n",
            False,
        ),
        # a name deleted through an overlay became a whiteout, which a nodev tmpfs won't open
        (
            23,
            'rsync: [sender] send_files failed to open "/r/f": Permission denied (13)\n',
            True,
        ),
        (
            23,
            'directory has vanished: "/r/d"\n'
            "rsync: [generator] get_acl: sys_acl_get_file(n39, ACL_TYPE_DEFAULT): "
            "Permission denied (13)\n",
            True,
        ),
        (23, "WARNING: parent dir is absent in the file list: n03\n", True),
        (23, 'rsync: [sender] read errors mapping "/r/f": Input/output error (5)\n', False),
        (2, "Invalid packet at end of run (17) [sender]\n", False),
        (23, "", False),
        (11, 'rsync: write failed on "/d/f": No space left on device (28)\n', False),
    ],
)
def test_source_churn_only(code: int, stderr: str, churn: bool) -> None:
    assert source_churn_only(CommandResult(code, "", stderr)) is churn
