"""tree.walk on a small tree in a temporary directory (no mounts, no root needed)."""

from __future__ import annotations

import stat
from pathlib import Path

from rampiped import tree


def make(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("x")
    (root / "top").write_text("yy")
    (root / "outside").mkdir()
    (root / "outside" / "hidden").write_text("z")
    (root / "a" / "link").symlink_to(root / "outside")


def test_every_entry_once_relative_and_no_symlink_followed(tmp_path: Path) -> None:
    make(tmp_path)
    found = {rel: st for rel, st in tree.walk(str(tmp_path / "a"))}
    assert sorted(found) == ["b", "b/f", "link"]
    assert stat.S_ISLNK(found["link"].st_mode)
    assert found["b/f"].st_size == 1


def test_skip_is_neither_yielded_nor_entered(tmp_path: Path) -> None:
    make(tmp_path)
    rels = [rel for rel, _ in tree.walk(str(tmp_path), skip={str(tmp_path / "outside")})]
    assert sorted(rels) == ["a", "a/b", "a/b/f", "a/link", "top"]


def test_a_root_that_vanished_yields_nothing(tmp_path: Path) -> None:
    assert list(tree.walk(str(tmp_path / "gone"))) == []
    (tmp_path / "file").write_text("")
    assert list(tree.walk(str(tmp_path / "file"))) == []
