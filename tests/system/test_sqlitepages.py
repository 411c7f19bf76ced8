"""Databases written back by their changed pages (rampiped/sqlitepages.py), on a loop ext4: what
reaches the device, and a power cut after every write and sync of the write-back (the write-back
stops there; nothing of rampiped runs afterwards, SQLite alone opens the disk copy)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rampiped import sqlitepages as sp
from tests.system.helpers import LoopFs, bytes_written, make_loopfs, syncfs_path
from tests.system.test_copymode import Layout, db_state, layout, make_loopfs_from, sql
from tests.system.test_copymode import make_db as make_pve_db

__all__ = ["layout"]  # the fixture, used by name

pytestmark = pytest.mark.system

ROWS = 120


class Cut(BaseException):
    """The power cut: nothing after the step where it is raised runs."""


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LoopFs]:
    with make_loopfs(tmp_path / "disk", size_mb=64) as fs:
        yield fs


def make_db(path: Path, mode: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE tree(inode INTEGER PRIMARY KEY, version INTEGER, data BLOB)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO tree VALUES(?, 0, randomblob(3000))", [(i,) for i in range(ROWS)])
    conn.execute("COMMIT")
    conn.close()


def content(path: Path) -> list[tuple[Any, ...]]:
    """What the database holds, after SQLite's own open (which rolls back a hot journal);
    integrity_check must say ok."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return conn.execute("SELECT inode, version, hex(data) FROM tree ORDER BY inode").fetchall()
    finally:
        conn.close()


def cli_check(path: Path) -> str:
    return subprocess.run(
        ["sqlite3", str(path), "PRAGMA integrity_check"], capture_output=True, text=True, check=True
    ).stdout.strip()


def first_copy(ram_db: Path, disk_db: Path) -> None:
    """The disk copy as the backup path writes it."""
    src, dst = sqlite3.connect(ram_db), sqlite3.connect(disk_db)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


# how the RAM database changes between the two checkpoints
CHANGES: dict[str, tuple[str, ...]] = {
    "in place": ("UPDATE tree SET version = 1, data = randomblob(3000) WHERE inode IN (3, 77)",),
    "grown": ("INSERT INTO tree SELECT inode + 1000, 2, randomblob(3000) FROM tree",),
    "shrunk": ("DELETE FROM tree WHERE inode % 2 = 0", "VACUUM"),
}


@contextlib.contextmanager
def scenario(
    disk: LoopFs, tmp_path: Path, change: str
) -> Iterator[tuple[Path, Path, Callable[[], None]]]:
    """A RAM database and its disk copy one checkpoint behind; yields (ram db, disk db, reset:
    puts the old disk copy back, journal gone)."""
    ram = tmp_path / "ram"
    ram.mkdir()
    ram_db, disk_db = ram / "config.db", disk.mountpoint / "config.db"
    make_db(ram_db, mode="wal")
    first_copy(ram_db, disk_db)
    old_bytes = disk_db.read_bytes()
    sql(ram_db, *CHANGES[change])

    def reset() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(disk_db) + sp.JOURNAL_SUFFIX)
        disk_db.write_bytes(old_bytes)

    yield ram_db, disk_db, reset
    shutil.rmtree(ram)


def cut_at(n: int, seen: list[str]) -> Callable[[str], None]:
    def step(name: str) -> None:
        seen.append(name)
        if len(seen) == n:
            raise Cut(name)

    return step


def test_only_changed_pages_reach_the_disk(disk: LoopFs, tmp_path: Path) -> None:
    with scenario(disk, tmp_path, "in place") as (ram_db, disk_db, _reset):
        size = disk_db.stat().st_size
        syncfs_path(disk.mountpoint)
        before = bytes_written(disk)
        done = sp.write_back(str(ram_db), str(disk_db), lock_wait=5)
        syncfs_path(disk.mountpoint)
        device = bytes_written(disk) - before
        assert done.size == size and 2 <= done.pages <= 5, done
        # the pages and their journal: a few pages, not the database (~90 pages)
        assert done.bytes == done.pages * 4096 + sp.SECTOR + (done.pages) * (4096 + 8)
        assert device < size / 4, (device, size)
        assert content(disk_db) == content(ram_db)
        assert sorted(os.listdir(disk.mountpoint)) == ["config.db", "lost+found"]
        # nothing changed since: nothing is written
        assert sp.write_back(str(ram_db), str(disk_db), lock_wait=5).pages == 0


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_power_cut_after_any_step_leaves_old_or_new(
    disk: LoopFs, tmp_path: Path, change: str
) -> None:
    with scenario(disk, tmp_path, change) as (ram_db, disk_db, reset):
        old = content(disk_db)
        reset()  # content() above opened it: start from the bytes as written
        new = content(ram_db)
        assert old != new
        steps: list[str] = []
        sp.write_back(str(ram_db), str(disk_db), lock_wait=5, step=steps.append)
        assert steps[-2:] == ["journal:deleted", "directory:synced"]
        assert len(steps) > 8
        for n in range(1, len(steps) + 1):
            reset()
            seen: list[str] = []
            with pytest.raises(Cut):
                sp.write_back(str(ram_db), str(disk_db), lock_wait=5, step=cut_at(n, seen))
            committed = "journal:deleted" in seen
            assert content(disk_db) == (new if committed else old), (n, seen[-1])
            # SQLite rolled a sealed journal back and deleted it; an unsealed one is not hot
            left = os.path.exists(str(disk_db) + sp.JOURNAL_SUFFIX)
            assert left == ("journal:sealed" not in seen), (n, seen[-1])
            assert cli_check(disk_db) == "ok"


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_torn_page_write_is_rolled_back(disk: LoopFs, tmp_path: Path, change: str) -> None:
    """Half of a page reached the disk when the power went: after each whole page written."""
    with scenario(disk, tmp_path, change) as (ram_db, disk_db, reset):
        old = content(disk_db)
        reset()
        steps: list[str] = []
        sp.write_back(str(ram_db), str(disk_db), lock_wait=5, step=steps.append)
        sealed = steps.index("journal:directory-synced") + 1
        pages = steps.count("page:written")
        for k in range(pages):
            reset()
            todo = sp.plan(disk_db.read_bytes(), image := sp.image(str(ram_db), 5), 4096)
            with pytest.raises(Cut):
                sp.write_back(str(ram_db), str(disk_db), lock_wait=5, step=cut_at(sealed + k, []))
            # k pages are written; the next one reached the disk half
            offset = (todo.write[k] - 1) * 4096
            with open(disk_db, "r+b") as f:
                f.seek(offset)
                f.write(image[offset : offset + 2048])
            assert content(disk_db) == old, k
            assert cli_check(disk_db) == "ok"


def test_torn_journal_before_its_seal_is_not_hot(disk: LoopFs, tmp_path: Path) -> None:
    with scenario(disk, tmp_path, "in place") as (ram_db, disk_db, reset):
        old = content(disk_db)
        reset()
        journal = Path(str(disk_db) + sp.JOURNAL_SUFFIX)
        with pytest.raises(Cut):
            sp.write_back(str(ram_db), str(disk_db), lock_wait=5, step=cut_at(1, []))
        assert journal.read_bytes()[:1] == b"\0"
        with open(journal, "r+b") as f:
            f.truncate(journal.stat().st_size // 2)
        assert content(disk_db) == old
        # not hot, so SQLite left it there; the next write-back leaves it to the backup path
        with pytest.raises(sp.Unsupported, match="journal beside it"):
            sp.write_back(str(ram_db), str(disk_db), lock_wait=5)


def test_a_hot_journal_is_rolled_back_before_the_pages_are_compared(
    disk: LoopFs, tmp_path: Path
) -> None:
    with scenario(disk, tmp_path, "grown") as (ram_db, disk_db, reset):
        reset()
        steps: list[str] = []
        with pytest.raises(Cut):
            sp.write_back(str(ram_db), str(disk_db), lock_wait=5, step=cut_at(6, steps))
        assert steps[-1] == "page:written"
        assert os.path.exists(str(disk_db) + sp.JOURNAL_SUFFIX)
        # the next checkpoint, no SQLite open in between
        sp.write_back(str(ram_db), str(disk_db), lock_wait=5)
        assert not os.path.exists(str(disk_db) + sp.JOURNAL_SUFFIX)
        assert content(disk_db) == content(ram_db)


def test_what_cannot_be_written_by_pages_is_left_to_the_backup_path(
    disk: LoopFs, tmp_path: Path
) -> None:
    with scenario(disk, tmp_path, "in place") as (ram_db, disk_db, reset):
        before = disk_db.read_bytes()
        cases: list[tuple[Callable[[], None], str]] = [
            (lambda: disk_db.unlink(), "no database file on disk"),
            (lambda: Path(str(disk_db) + "-wal").write_bytes(b"x"), "-wal beside it"),
            (lambda: os.link(disk_db, disk.mountpoint / "other"), "one name"),
            (lambda: disk_db.write_bytes(b"not a database" * 1000), "not a database"),
            (
                lambda: sql(
                    disk_db, "PRAGMA journal_mode=delete", "PRAGMA page_size=1024", "VACUUM"
                ),
                "4096-byte",
            ),
        ]
        for spoil, reason in cases:
            reset()
            spoil()
            spoiled = disk_db.read_bytes() if disk_db.exists() else None
            with pytest.raises(sp.Unsupported, match=reason):
                sp.write_back(str(ram_db), str(disk_db), lock_wait=5)
            assert (disk_db.read_bytes() if disk_db.exists() else None) == spoiled
            for extra in ("config.db-wal", "other"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(disk.mountpoint / extra)
        reset()
        assert disk_db.read_bytes() == before


def test_more_changed_than_the_whole_file_costs_is_left_to_the_backup_path(
    disk: LoopFs, tmp_path: Path
) -> None:
    with scenario(disk, tmp_path, "shrunk") as (ram_db, disk_db, reset):
        reset()
        before = disk_db.read_bytes()
        with pytest.raises(sp.Unsupported, match="pages changed"):
            sp.write_back(str(ram_db), str(disk_db), lock_wait=5, at_most=1.0)
        assert disk_db.read_bytes() == before
        assert not os.path.exists(str(disk_db) + sp.JOURNAL_SUFFIX)
        assert sp.try_write_back(str(ram_db), str(disk_db), lock_wait=5) is None
    with scenario(disk, tmp_path, "in place") as (ram_db, disk_db, reset):
        done = sp.try_write_back(str(ram_db), str(disk_db), lock_wait=5)
        assert done is not None and done.bytes < done.size / 4


def test_a_checkpoint_writes_a_database_by_its_pages(
    layout: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    db = layout.orig / "config.db"
    make_pve_db(db, mode="wal")
    size = db.stat().st_size
    layout.copy_in()
    layout.bind_over()
    sql(db, "UPDATE tree SET version = 7, data = randomblob(3000) WHERE inode = 42")
    with caplog.at_level(logging.DEBUG, logger="rampiped.sqlitepages"):
        result = layout.checkpoint()
    assert result.databases == ["config.db"]
    assert 0 < result.bytes < size / 10, (result.bytes, size)
    assert "changed pages written under a rollback journal" in caplog.text
    assert db_state(layout.disk / "config.db") == db_state(db)
    layout.unbind()
    layout.final_sync()
    assert sorted(p.name for p in layout.disk.iterdir()) == ["config.db"]


def test_power_cut_keeps_what_reached_the_device(disk: LoopFs, tmp_path: Path) -> None:
    """After each step, the device as it is (what ext4 did not write out is not in the image;
    commit=600: metadata only where rampiped syncs), mounted again as after a reboot."""
    subprocess.run(["mount", "-o", "remount,commit=600", str(disk.mountpoint)], check=True)
    with scenario(disk, tmp_path, "in place") as (ram_db, disk_db, reset):
        old = content(disk_db)
        reset()
        new = content(ram_db)
        steps: list[str] = []
        sp.write_back(str(ram_db), str(disk_db), lock_wait=5, step=steps.append)
        assert steps.count("page:written") >= 2
        for n, name in enumerate(steps, 1):
            reset()
            syncfs_path(disk.mountpoint)  # the old checkpoint is on the device
            with pytest.raises(Cut):
                sp.write_back(str(ram_db), str(disk_db), lock_wait=5, step=cut_at(n, []))
            image = tmp_path / "after-cut.img"
            subprocess.run(["cp", "--sparse=always", str(disk.image), str(image)], check=True)
            with make_loopfs_from(image, tmp_path / f"rebooted-{n}") as rebooted:
                found = content(rebooted / "config.db")
                assert cli_check(rebooted / "config.db") == "ok"
            image.unlink()
            if name == "directory:synced":
                assert found == new, name
            elif name == "journal:deleted":  # the unlink is not synced yet: either
                assert found in (old, new), name
            else:
                assert found == old, name
