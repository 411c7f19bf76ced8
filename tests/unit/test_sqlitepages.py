"""The rollback journal that sqlitepages writes, against the journals SQLite itself writes and
against SQLite's own rollback; and the page plan on synthetic databases."""

from __future__ import annotations

import os
import sqlite3
import struct
from pathlib import Path

import pytest

from rampiped import sqlitepages as sp

PAGE = 4096


def make_db(path: Path, rows: int = 60) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES(?, randomblob(3000))", [(i,) for i in range(rows)])
    conn.execute("COMMIT")
    conn.close()


def rows(path: Path) -> list[tuple[int, bytes]]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return conn.execute("SELECT k, v FROM t ORDER BY k").fetchall()
    finally:
        conn.close()


def segments(journal: bytes) -> list[tuple[bytes, list[bytes]]]:
    """(header, records) of each sealed segment of a journal SQLite wrote."""
    out = []
    offset = 0
    while offset + sp.SECTOR <= len(journal) and journal[offset:].startswith(sp.JOURNAL_MAGIC):
        header = journal[offset : offset + sp.SECTOR]
        (count,) = struct.unpack(">I", header[8:12])
        start = offset + sp.SECTOR
        records = [
            journal[start + i * (PAGE + 8) : start + (i + 1) * (PAGE + 8)] for i in range(count)
        ]
        out.append((header, records))
        end = start + count * (PAGE + 8)
        offset = -(-end // sp.SECTOR) * sp.SECTOR  # the next header starts on a sector
    return out


def test_journal_header_and_records_are_sqlites_own(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    make_db(db)
    original = db.read_bytes()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA cache_size=2")  # spills: SQLite seals a segment per page
        conn.execute("BEGIN")
        conn.execute("UPDATE t SET v = randomblob(3000)")
        journal = Path(str(db) + "-journal").read_bytes()
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    found = segments(journal)
    assert len(found) >= 5
    for header, records in found:
        nonce, original_pages = struct.unpack(">II", header[12:20])
        assert original_pages == len(original) // PAGE
        ours = sp.journal_header(nonce, original_pages, PAGE)
        assert sp.seal(len(records)) + ours[12:] == header
        for record in records:
            (pgno,) = struct.unpack(">I", record[:4])
            page = original[(pgno - 1) * PAGE : pgno * PAGE]
            assert sp.journal_record(pgno, page, nonce) == record


def test_unsealed_header_is_what_sqlite_writes_before_its_sync(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    make_db(db)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute("UPDATE t SET v = randomblob(3000) WHERE k = 3")
        header = Path(str(db) + "-journal").read_bytes()[: sp.SECTOR]
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    (nonce,) = struct.unpack(">I", header[12:16])
    assert header[:12] == bytes(12)  # not hot: the first byte is zero
    assert sp.journal_header(nonce, os.path.getsize(db) // PAGE, PAGE) == header


@pytest.mark.parametrize(
    ("page_size", "nonce", "bytes_at", "expected"),
    [
        (512, 0, {312: 7, 112: 9, 0: 200}, 16),  # offset 0 never counts
        (1024, 5, {824: 1, 624: 2, 424: 3, 224: 4, 24: 5, 1023: 99}, 20),
        (4096, 0xFFFFFFFF, {3896: 2}, 1),  # wraps at 2**32
    ],
)
def test_checksum_adds_every_200th_byte_from_the_end(
    page_size: int, nonce: int, bytes_at: dict[int, int], expected: int
) -> None:
    page = bytearray(page_size)
    for offset, value in bytes_at.items():
        page[offset] = value
    assert sp.checksum(bytes(page), nonce) == expected


def db_bytes(pages: list[bytes], counter: int = 7, cookie: int = 3) -> bytes:
    """A synthetic database: page 1 with a header, then the given pages (1-byte fills)."""
    first = bytearray(PAGE)
    first[:16] = sp.HEADER
    struct.pack_into(">H", first, 16, PAGE)
    struct.pack_into(">I", first, 24, counter)
    struct.pack_into(">I", first, 28, 1 + len(pages))
    struct.pack_into(">I", first, 40, cookie)
    struct.pack_into(">I", first, 92, counter)
    return bytes(first) + b"".join(p * PAGE for p in pages)


@pytest.mark.parametrize(
    ("old", "new", "write", "journal"),
    [
        (b"abc", b"abc", [], []),
        (b"abc", b"aXc", [1, 3], [1, 3]),
        (b"abc", b"abcde", [1, 5, 6], [1]),  # grown: new pages need no journal
        (b"abc", b"aX", [1, 3], [1, 3, 4]),  # shrunk: the pages cut off go into the journal
    ],
)
def test_plan_writes_what_differs_and_journals_what_it_overwrites(
    old: bytes, new: bytes, write: list[int], journal: list[int]
) -> None:
    before = db_bytes([bytes([c]) for c in old])
    after = bytearray(db_bytes([bytes([c]) for c in new], counter=1, cookie=1))
    todo = sp.plan(before, after, PAGE)
    assert (todo.write, todo.journal) == (write, journal)
    assert todo.cost == sp.SECTOR + len(journal) * (PAGE + 8) + len(write) * PAGE
    assert (todo.old_pages, todo.new_pages) == (1 + len(old), 1 + len(new))
    moved_on = 8 if write else 7  # the change counter, as a commit into `before` sets it
    assert struct.unpack_from(">IIII", after, 24)[:2] == (moved_on, 1 + len(new))
    assert struct.unpack_from(">I", after, 92)[0] == moved_on
    assert struct.unpack_from(">I", after, 40)[0] == (4 if write else 3)


def test_sqlite_rolls_back_a_journal_written_here(tmp_path: Path) -> None:
    """Grown and changed in place, then torn: SQLite's first open puts the old database back."""
    db = tmp_path / "a.db"
    make_db(db)
    before = rows(db)
    old = db.read_bytes()
    new_db = tmp_path / "b.db"
    make_db(new_db, rows=90)
    new = bytearray(new_db.read_bytes())
    todo = sp.plan(old, new, PAGE)
    assert todo.new_pages > todo.old_pages and todo.journal
    nonce = 0x1234ABCD
    journal = sp.seal(len(todo.journal)) + sp.journal_header(nonce, todo.old_pages, PAGE)[12:]
    for p in todo.journal:
        journal += sp.journal_record(p, old[(p - 1) * PAGE : p * PAGE], nonce)
    Path(str(db) + "-journal").write_bytes(journal)
    with open(db, "r+b") as f:
        for p in todo.write:
            f.seek((p - 1) * PAGE)
            f.write(new[(p - 1) * PAGE : p * PAGE][: PAGE // 2])  # every page torn
    assert rows(db) == before
    assert not os.path.exists(str(db) + "-journal")
    assert db.read_bytes() == old
