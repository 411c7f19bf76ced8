"""SQLite databases of a copy pin: found by their header, read through SQLite's online backup
API inside one read transaction, and renamed into place on disk only after the stale
companions there were settled by SQLite itself (rampiped.copymode says why)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Iterable

from rampiped import sqlitepages
from rampiped.copywb.atomic import fsync_dir, fsync_path, tmp_path
from rampiped.copywb.results import CopyError
from rampiped.copywb.snapshot import Snapshot
from rampiped.fsops import open_rel
from rampiped.pause import pause_point
from rampiped.writeback.holdplace import HoldPlace, Staging

log = logging.getLogger(__name__)

SQLITE_HEADER = b"SQLite format 3\x00"
# Files SQLite keeps next to a database: write-ahead log, its shared-memory index, rollback
# journal. They belong to one particular database file and are never copied on their own.
DB_COMPANIONS = ("-wal", "-shm", "-journal")
# A database holding a write lock longer than this is reported, not waited for forever.
DB_LOCK_WAIT = 10.0
# The smallest SQLite page; a database file is a whole number of pages.
_MIN_PAGE = 512


def is_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False


def databases_in(root: str, snap: Snapshot) -> set[str]:
    """Regular files that are SQLite databases: a whole number of (>= 512 byte) pages and the
    header. The size test spares reading every file's first bytes."""
    found = set()
    for rel, (kind, size, *_rest) in snap.items():
        if (
            kind == "f"
            and size >= _MIN_PAGE
            and size % _MIN_PAGE == 0
            and is_sqlite(os.path.join(root, rel))
        ):
            found.add(rel)
    return found


def with_companions(databases: Iterable[str]) -> set[str]:
    return {db + suffix for db in databases for suffix in ("", *DB_COMPANIONS)}


def sqlite_uri(path: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return "file:" + urllib.parse.quote(os.path.abspath(path)) + "?" + query


_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


class _LockWait(Exception):
    pass


def _backup(src: str, tmp: str) -> None:
    """A consistent copy of the database `src` into the new file `tmp`, through SQLite.

    The source is opened read-write, like any SQLite client does: a hot journal left by a crash
    is rolled back first. Its read transaction is taken with a busy timeout, and the backup
    copies every page within it (one step), so it sees one committed state whatever the
    journal mode. The copy itself needs no journal: it becomes visible only by rename."""
    deadline = time.monotonic() + DB_LOCK_WAIT

    def give_up_when_stuck(status: int, remaining: int, total: int) -> None:
        if status in (_SQLITE_BUSY, _SQLITE_LOCKED) and time.monotonic() > deadline:
            raise _LockWait

    source = sqlite3.connect(
        sqlite_uri(src, mode="rw"), uri=True, timeout=DB_LOCK_WAIT, isolation_level=None
    )
    try:
        source.execute("BEGIN")
        source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        target = sqlite3.connect(tmp, isolation_level=None)
        try:
            target.execute("PRAGMA journal_mode=OFF")
            target.execute("PRAGMA synchronous=OFF")
            source.backup(target, pages=-1, progress=give_up_when_stuck, sleep=0.05)
        finally:
            target.close()
        source.execute("COMMIT")
    except _LockWait:
        raise CopyError(
            f"cannot checkpoint the database {src}: locked for more than {DB_LOCK_WAIT:g} s"
        ) from None
    finally:
        source.close()
    # A separate read that ignores companion files (immutable): the backup made none, and a
    # WAL-mode header must not make this check create -wal/-shm next to the temporary file.
    check = sqlite3.connect(sqlite_uri(tmp, mode="ro", immutable="1"), uri=True)
    try:
        verdict = check.execute("PRAGMA quick_check").fetchall()
    finally:
        check.close()
    if verdict != [("ok",)]:
        problems = "; ".join(str(row[0]) for row in verdict[:3])
        raise CopyError(
            f"not writing the database {src} to disk: its copy fails quick_check ({problems}); "
            "the disk keeps the last good copy"
        )


def _copy_metadata(src: str, st: os.stat_result, dst: str) -> None:
    """Owner, xattrs (ACLs included), mode and times of `src` onto the new file `dst`, as
    rsync -aAX would. Inherited default ACLs of the disk directory are removed first."""
    os.chown(dst, st.st_uid, st.st_gid)
    wanted = {n: os.getxattr(src, n, follow_symlinks=False) for n in os.listxattr(src)}
    for name in os.listxattr(dst):
        if name not in wanted and name.startswith(("user.", "system.posix_acl_", "trusted.")):
            os.removexattr(dst, name)
    for name, value in wanted.items():
        os.setxattr(dst, name, value)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def settle_database(path: str) -> list[str]:
    """Make the database file `path` on disk whole on its own, then remove its companions.

    A -wal or hot -journal next to a database is part of it; next to a different database (the
    copy about to be renamed over it) it is poison: SQLite replays it without checking where it
    came from. So SQLite itself first finishes what the companions hold (rolls back a hot
    journal, checkpoints a WAL; both crash-safe by SQLite's design), and only then are they
    removed, durably. A power cut at any point leaves a valid database. Returns the companions
    that were there (all gone now)."""
    present = [path + s for s in DB_COMPANIONS if os.path.lexists(path + s)]
    if not present:
        return []
    if is_sqlite(path):
        try:
            conn = sqlite3.connect(
                sqlite_uri(path, mode="rw"), uri=True, timeout=DB_LOCK_WAIT, isolation_level=None
            )
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                    if busy:
                        raise CopyError(f"cannot settle {path}: another process uses it")
            finally:
                conn.close()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise CopyError(f"cannot settle {path}: {exc} (another process uses it)") from exc
            log.warning("%s on disk cannot be opened (%s); replacing it anyway", path, exc)
        except sqlite3.DatabaseError as exc:
            log.warning("%s on disk is damaged (%s); replacing it anyway", path, exc)
        with contextlib.suppress(FileNotFoundError):
            fsync_path(path)
    for companion in present:  # SQLite may have removed them already
        with contextlib.suppress(FileNotFoundError):
            os.unlink(companion)
    fsync_dir(os.path.dirname(path) or ".")
    return present


def _checkpoint_database(
    data: str,
    disk: str,
    rel: str,
    *,
    by_pages: bool = False,
    staging: Staging | None = None,
) -> int | None:
    """Write RAM's database `rel` to disk; the bytes written, or None when it vanished.
    `by_pages`: its changed pages in place when it can (sqlitepages), else whole. `staging`
    (HoldPlace.staging): the whole file is made in the hold directory and renamed into place
    from there, so that no reader of the directory sees its temporary name; else it is made
    next to its name (tmp_path)."""
    src = os.path.join(data, rel)
    dst = os.path.join(disk, rel)
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        return None
    if by_pages and (done := sqlitepages.try_write_back(src, dst, lock_wait=DB_LOCK_WAIT)):
        _copy_metadata(src, st, dst)
        return done.bytes
    directory = os.path.dirname(dst)
    staged = None  # (hold directory, parent directory, name in the hold directory)
    if staging is not None:
        parent_fd = open_rel(staging.target_fd, os.path.dirname(rel))
        if parent_fd is None:
            raise CopyError(f"cannot checkpoint the database {src}: {directory} is gone")
        staged = (staging.hold_fd, parent_fd, f"db-{secrets.token_hex(4)}")
        tmp = os.path.join(staging.hold_path, staged[2])
    else:
        tmp = tmp_path(dst)
    try:
        try:
            _backup(src, tmp)
        except sqlite3.OperationalError as exc:
            if not os.path.exists(src):
                return None  # deleted in RAM meanwhile: the next checkpoint deletes it on disk
            raise CopyError(f"cannot checkpoint the database {src}: {exc}") from exc
        _copy_metadata(src, st, tmp)
        fsync_path(tmp)
        settle_database(dst)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)  # RAM replaced a directory by this database
        pause_point("database:staged")
        if staged is not None:
            hold_fd, parent_fd, name = staged
            os.rename(name, os.path.basename(rel), src_dir_fd=hold_fd, dst_dir_fd=parent_fd)
        else:
            os.rename(tmp, dst)
    finally:
        for leftover in (tmp, *(tmp + s for s in DB_COMPANIONS)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        if staged is not None:
            os.close(staged[1])
    fsync_dir(directory)
    return os.stat(dst).st_size


def write_databases(
    data: str,
    disk: str,
    rels: Iterable[str],
    totals: dict[str, int],
    failures: list[str] | None = None,
    *,
    by_pages: bool = False,
    place: HoldPlace | None = None,
) -> list[str]:
    """Write RAM's databases `rels` to disk one by one (_checkpoint_database), counting each in
    `totals` ("files", "bytes"), then put RAM's directory times back; returns those written (a
    database gone from RAM meanwhile is not). A database that cannot be written raises, or,
    given `failures`, is recorded there while the others are still written. `by_pages`: as
    in _checkpoint_database (the write-back after an unmount writes whole files: it holds the
    disk files it replaces). `place`: where that write-back holds them; with its hold
    directory outside the directory, each database is made there (HoldPlace.staging)."""
    written: list[str] = []
    with place.staging() if place is not None else contextlib.nullcontext() as staging:
        for rel in rels:
            try:
                size = _checkpoint_database(data, disk, rel, by_pages=by_pages, staging=staging)
            except (CopyError, OSError, sqlite3.Error) as exc:
                if failures is None:
                    raise
                failures.append(str(exc))
                continue
            if size is not None:
                written.append(rel)
                totals["files"] += 1
                totals["bytes"] += size
    _restore_dir_times(data, disk, written)
    return written


def _restore_dir_times(data: str, disk: str, rels: Iterable[str]) -> None:
    """Renaming a database into a directory changed its mtime on disk: put RAM's back."""
    for rel in {os.path.dirname(r) for r in rels}:
        try:
            st = os.lstat(os.path.join(data, rel) if rel else data)
            os.utime(
                os.path.join(disk, rel) if rel else disk,
                ns=(st.st_atime_ns, st.st_mtime_ns),
                follow_symlinks=False,
            )
        except FileNotFoundError:
            pass
