"""Write an SQLite database back by the pages that differ from the disk copy, under a rollback
journal in SQLite's own format, so that SQLite itself finishes or undoes a write that a power
cut interrupted.

What it does, in SQLite's order (src/pager.c; https://www.sqlite.org/atomiccommit.html):

1. A journal left beside the disk copy by a power cut is rolled back first, by SQLite: opening
   the database does that. A -wal or -shm beside it, or a journal that is still there after the
   open (not hot: never sealed, or left by another program), is not handled here (Unsupported:
   the caller's backup path settles and replaces the file).
2. A consistent image of the RAM database: the online backup API into an in-memory database
   inside one read transaction (any journal mode, WAL included), checked with quick_check,
   then serialized.
3. The disk copy is locked the way SQLite locks a database it writes (an EXCLUSIVE lock: the
   pending, reserved and shared bytes), then compared with the image page by page. It must be
   a database of the same page size, a regular file with one name, below SQLite's lock page
   (1 GiB); otherwise Unsupported. So is a write whose journal and pages would cost more than
   the whole file, when the caller says so (try_write_back does).
4. `<db>-journal` gets the original content of every page that changes or is cut off by a
   shrink, and the original size; header first with its magic and record count zero, then the
   records, fsync, then magic and count (the journal is now hot), fsync, fsync the directory.
5. The changed pages go into the database (page 1 with the change counter moved on, as SQLite
   does at each commit), the file is truncated to the new size, fsync.
6. Deleting the journal commits; the directory is synced.

A power cut before the journal is sealed leaves the database untouched and a journal that is
not hot (the next write-back leaves it to the backup path, which removes it). A cut after the
seal and before 6 leaves a hot journal: the first process that opens the database with SQLite
rolls it back to the old checkpoint's content (a copy-in with rsync carries the journal along
with the database). After 6, the disk holds the new checkpoint. Writes are whole pages
at page boundaries, and the sector size written into the journal is SQLite's own default on
Linux (512: it assumes, as this module does, that a write does not damage bytes around it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import sqlite3
import stat
import struct
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from rampiped.fsops import opened_dir, read_at

log = logging.getLogger(__name__)

HEADER = b"SQLite format 3\x00"
JOURNAL_SUFFIX = "-journal"
# pager.c aJournalMagic: the first 8 bytes of every journal header
JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")
# the journal header's size, which is also the "sector size" recorded in it: what SQLite's unix
# VFS reports for files with SQLITE_IOCAP_POWERSAFE_OVERWRITE (pager.c setSectorSize)
SECTOR = 512
# os.h: the byte range SQLite locks; the page holding PENDING_BYTE is never used by SQLite and
# a journal record naming it ends a rollback (pager.c PAGER_SJ_PGNO), so databases that reach
# it are left to the backup path
PENDING_BYTE = 0x40000000
_LOCK_LENGTH = 2 + 510  # pending, reserved, then SHARED_SIZE bytes (os_unix.c)

Step = Callable[[str], None]


class Unsupported(Exception):
    """This database cannot be written by its pages; the message says why (the caller writes
    it whole instead)."""


@dataclass(frozen=True)
class Written:
    pages: int  # pages written into the database
    bytes: int  # bytes written to disk: those pages and the journal
    size: int  # the database's size afterwards


# -- the journal format (pure) ------------------------------------------------------------


def checksum(page: bytes, nonce: int) -> int:
    """pager.c pager_cksum: the nonce plus every 200th byte of the page, counted from the end
    (offset page_size - 200, then 200 less, while above 0), modulo 2**32."""
    total = nonce
    for i in range(len(page) - 200, 0, -200):
        total += page[i]
    return total & 0xFFFFFFFF


def journal_header(nonce: int, original_pages: int, page_size: int) -> bytes:
    """The first header of a journal as SQLite writes it before its records (pager.c
    writeJournalHdr in full-sync mode): magic and record count zero, so that the journal is not
    hot until `seal` writes them."""
    fields = struct.pack(">IIII", nonce, original_pages, SECTOR, page_size)
    return bytes(12) + fields + bytes(SECTOR - 12 - len(fields))


def seal(records: int) -> bytes:
    """The first 12 bytes of the header once the records are on disk (pager.c syncJournal):
    from then on the journal is hot."""
    return JOURNAL_MAGIC + struct.pack(">I", records)


def journal_record(pgno: int, page: bytes, nonce: int) -> bytes:
    """One page record: page number (from 1), the page's original content, its checksum."""
    return struct.pack(">I", pgno) + page + struct.pack(">I", checksum(page, nonce))


def page_size_of(header: bytes) -> int | None:
    """The page size a database header names, or None when it is not a database header."""
    if len(header) < 100 or not header.startswith(HEADER):
        return None
    (raw,) = struct.unpack(">H", header[16:18])
    size = 65536 if raw == 1 else raw
    if size < 512 or size & (size - 1):
        return None
    return size


@dataclass(frozen=True)
class Plan:
    page_size: int
    old_pages: int
    new_pages: int
    write: list[int]  # page numbers (from 1) whose new content goes into the database
    journal: list[int]  # page numbers whose old content goes into the journal first

    @property
    def empty(self) -> bool:
        return not self.write and self.old_pages == self.new_pages

    @property
    def cost(self) -> int:
        """Bytes the write-back writes: the journal and the pages."""
        return SECTOR + len(self.journal) * (self.page_size + 8) + len(self.write) * self.page_size


# bytes 24..27 change counter, 28..31 size in pages, 40..43 schema cookie, 92..95 the change
# counter the size is valid for, 96..99 SQLite's version: what a commit moves on in page 1
_COUNTER, _SIZE, _COOKIE, _VALID_FOR, _VERSION = 24, 28, 40, 92, 96


_major, _minor, _patch = sqlite3.sqlite_version_info
_VERSION_NUMBER = _major * 1_000_000 + _minor * 1000 + _patch  # SQLITE_VERSION_NUMBER


def _u32(data: bytes | bytearray, offset: int) -> int:
    value: int = struct.unpack_from(">I", data, offset)[0]
    return value


def plan(old: bytes, new: bytearray, page_size: int) -> Plan:
    """What to write to turn the database `old` into `new` (both whole files of `page_size`
    pages). Page 1's change counter, size, schema cookie and version fields do not count as a
    difference; when anything else differs, they are set in `new` the way a commit into `old`
    sets them (the counter and the cookie one more than `old`'s, as sqlite3_backup does for an
    existing database), and page 1 is written."""
    old_pages, new_pages = len(old) // page_size, len(new) // page_size
    for offset in (_COUNTER, _COOKIE, _VALID_FOR, _VERSION):
        new[offset : offset + 4] = old[offset : offset + 4]
    struct.pack_into(">I", new, _SIZE, new_pages)
    view = memoryview(new)
    write = []
    for n in range(new_pages):
        start, end = n * page_size, (n + 1) * page_size
        if n >= old_pages or view[start:end] != old[start:end]:
            write.append(n + 1)
    if not write and old_pages == new_pages:
        return Plan(page_size, old_pages, new_pages, [], [])
    counter = (_u32(old, _COUNTER) + 1) & 0xFFFFFFFF
    struct.pack_into(">I", new, _COUNTER, counter)
    struct.pack_into(">I", new, _VALID_FOR, counter)
    struct.pack_into(">I", new, _COOKIE, (_u32(old, _COOKIE) + 1) & 0xFFFFFFFF)
    struct.pack_into(">I", new, _VERSION, _VERSION_NUMBER)
    if 1 not in write:
        write.insert(0, 1)
    # a shrink cuts pages off: a rollback must put them back
    journal = [p for p in write if p <= old_pages] + list(range(new_pages + 1, old_pages + 1))
    return Plan(page_size, old_pages, new_pages, write, journal)


# -- the write-back -----------------------------------------------------------------------


def _no_step(_name: str) -> None:
    pass


def _uri(path: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return "file:" + urllib.parse.quote(os.path.abspath(path)) + "?" + query


def image(src: str, lock_wait: float) -> bytearray:
    """The database `src` as one committed state, whole: the backup API copies it into an
    in-memory database inside one read transaction of `src` (which also rolls back a hot
    journal beside it, as any SQLite client does). Unsupported when the copy fails
    quick_check."""
    source = sqlite3.connect(
        _uri(src, mode="rw"), uri=True, timeout=lock_wait, isolation_level=None
    )
    try:
        memory = sqlite3.connect(":memory:", isolation_level=None)
        try:
            source.execute("BEGIN")
            source.execute("SELECT count(*) FROM sqlite_master").fetchone()
            source.backup(memory)
            source.execute("COMMIT")
            verdict = memory.execute("PRAGMA quick_check").fetchall()
            if verdict != [("ok",)]:
                problems = "; ".join(str(row[0]) for row in verdict[:3])
                raise Unsupported(f"its copy fails quick_check ({problems})")
            return bytearray(memory.serialize())
        finally:
            memory.close()
    finally:
        source.close()


def _roll_back_hot_journal(dst: str, lock_wait: float) -> None:
    """A journal beside the disk copy: let SQLite roll it back (its first open does, when the
    journal is hot). Companions that are still there afterwards are the backup path's."""
    if os.path.lexists(dst + JOURNAL_SUFFIX):
        conn = sqlite3.connect(_uri(dst, mode="rw"), uri=True, timeout=lock_wait)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
        if not os.path.lexists(dst + JOURNAL_SUFFIX):
            log.info("%s: SQLite rolled back the journal an interrupted write left", dst)
    left = [s for s in (JOURNAL_SUFFIX, "-wal", "-shm") if os.path.lexists(dst + s)]
    if left:
        raise Unsupported(f"{', '.join(dst + s for s in left)} beside it")


def _lock(fd: int) -> None:
    """SQLite's EXCLUSIVE lock (os_unix.c): a process that opens the disk copy meanwhile gets
    SQLITE_BUSY instead of half-written pages. The lock is released when `fd` closes."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _LOCK_LENGTH, PENDING_BYTE, os.SEEK_SET)
    except OSError as exc:
        raise Unsupported(f"SQLite's lock on it is taken ({exc.strerror})") from None


def write_back(
    src: str, dst: str, *, lock_wait: float, at_most: float | None = None, step: Step = _no_step
) -> Written:
    """Make the disk database `dst` hold what the database `src` holds, writing the pages that
    differ under a rollback journal (see the module's description). Unsupported when this
    cannot be done by pages, or when it would write more than `at_most` times the database's
    size (nothing was written then); an OSError may leave a hot journal, which SQLite rolls
    back at the next open. `step` is called after each write and sync (the power-cut tests
    stop there)."""
    _roll_back_hot_journal(dst, lock_wait)
    new = image(src, lock_wait)
    size = page_size_of(bytes(new[:100]))
    if size is None or len(new) % size:
        raise Unsupported("its copy has no valid header")  # never: SQLite made it
    directory, name = os.path.split(dst)
    with opened_dir(directory or ".") as dir_fd:
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            raise Unsupported(f"no database file on disk ({exc.strerror})") from None
        try:
            _lock(fd)
            st = os.fstat(fd)
            old = _disk_copy(fd, st, size, len(new))
            todo = plan(old, new, size)
            if todo.empty:
                return Written(0, 0, st.st_size)
            if at_most is not None and todo.cost > at_most * len(new):
                raise Unsupported(
                    f"{len(todo.write)} of its {todo.new_pages} pages changed: the journal and"
                    " the pages would cost more than the whole file"
                )
            journal_bytes = _write_journal(dir_fd, name, st, old, todo, step)
            for pgno in todo.write:
                _write_all(fd, new[(pgno - 1) * size : pgno * size], (pgno - 1) * size)
                step("page:written")
            if todo.new_pages < todo.old_pages:
                os.ftruncate(fd, todo.new_pages * size)
                step("database:truncated")
            os.fsync(fd)
            step("database:synced")
            os.unlink(name + JOURNAL_SUFFIX, dir_fd=dir_fd)  # the commit
            step("journal:deleted")
            os.fsync(dir_fd)
            step("directory:synced")
            return Written(len(todo.write), len(todo.write) * size + journal_bytes, len(new))
        finally:
            os.close(fd)


def _disk_copy(fd: int, st: os.stat_result, size: int, new_size: int) -> bytes:
    """The disk database's bytes, when it can be written by pages of `size` bytes into a
    database of `new_size` bytes."""
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        raise Unsupported("not a regular file with one name")
    if page_size_of(read_at(fd, 100, 0)) != size:
        raise Unsupported(f"the disk copy is not a database of {size}-byte pages")
    if st.st_size % size:
        raise Unsupported("the disk copy is not a whole number of pages")
    if max(st.st_size, new_size) > PENDING_BYTE:
        raise Unsupported("larger than 1 GiB (SQLite's lock page)")
    old = read_at(fd, st.st_size, 0)
    if len(old) != st.st_size:
        raise Unsupported("the disk copy changed size while it was read")
    return old


def _write_journal(
    dir_fd: int, name: str, st: os.stat_result, old: bytes, todo: Plan, step: Step
) -> int:
    """Write and seal `name`-journal holding the original pages of `todo`; its size."""
    nonce = secrets.randbits(32)
    size = todo.page_size
    journal = name + JOURNAL_SUFFIX
    fd = os.open(
        journal,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        stat.S_IMODE(st.st_mode),
        dir_fd=dir_fd,
    )
    try:
        with contextlib.suppress(PermissionError):
            os.fchown(fd, st.st_uid, st.st_gid)  # as SQLite does for its journals when root
        parts = [journal_header(nonce, todo.old_pages, size)]
        parts += [journal_record(p, old[(p - 1) * size : p * size], nonce) for p in todo.journal]
        data = b"".join(parts)
        _write_all(fd, data, 0)
        step("journal:written")
        os.fsync(fd)
        step("journal:synced")
        _write_all(fd, seal(len(todo.journal)), 0)
        os.fsync(fd)
        step("journal:sealed")
    finally:
        os.close(fd)
    os.fsync(dir_fd)
    step("journal:directory-synced")
    return len(data)


def _write_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def try_write_back(src: str, dst: str, *, lock_wait: float) -> Written | None:
    """write_back, or None when the database is better written whole: it cannot be written by
    pages, or so many pages changed that their old content in the journal and their new content
    would cost more than the whole file (the reason is logged at debug; a write cut short by an
    error leaves a hot journal, which SQLite rolls back when the whole-file path opens the disk
    copy)."""
    try:
        done = write_back(src, dst, lock_wait=lock_wait, at_most=1.0)
    except (Unsupported, OSError, sqlite3.Error) as exc:
        log.debug(
            "database %s: not by its pages (%s): written whole, through the backup API", dst, exc
        )
        return None
    log.debug(
        "database %s: %d changed pages written under a rollback journal (%d bytes for %d)",
        dst,
        done.pages,
        done.bytes,
        done.size,
    )
    return done
