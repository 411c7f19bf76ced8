"""Copy mode: the data path of a pin whose directory is copied into RAM and bind-mounted back
over its own path (DESIGN.md §4, "pin (copy mode)" and "checkpoint").

Layout of a pin (the mounts are made by the pin manager):

    <runtime>/pins/<id>/ram                 a tmpfs, source "rampiped-<id>"
    <runtime>/pins/<id>/ram/data            the copy, bind-mounted over the original path
    <runtime>/pins/<id>/ram/.rampiped-pin   sentinel: JSON {"id", "path"}, written last by copy_in
    <runtime>/pins/<id>/disk                a private bind of the original directory

What this module guarantees:

- copy_in never returns a copy that missed a write: it compares a snapshot of the source taken
  before each pass with one taken after it and copies again until a pass saw nothing change,
  or refuses (CopyRace).
- Nothing is ever deleted on disk from a source that is not the expected RAM copy: every pass
  that deletes calls verify_source first (mounted tmpfs of this pin, sentinel naming it). An
  empty or unmounted RAM directory has no sentinel, so it can never wipe the disk copy.
- Every file lands on disk whole: a temporary name, fsync, rename (rsync --fsync, never
  --inplace), then syncfs. A power cut leaves each file either as it was or as the last
  checkpoint wrote it.
- SQLite databases are never copied as bytes while they may change: they are read through
  SQLite's online backup API inside one read transaction (a consistent snapshot, whatever the
  journal mode), and their -wal/-shm/-journal files are never copied. Stale companions on disk
  are settled by SQLite itself and removed *before* the new database is renamed into place,
  because SQLite trusts any -wal or hot -journal it finds next to a database: a stale WAL
  replayed onto a fresh copy silently rolls it back, a stale hot journal corrupts it (both
  reproduced in tests/system/test_copymode.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import secrets
import shutil
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rampiped import mounts, osutil, sqlitepages, tree
from rampiped.engine import format_bytes
from rampiped.errors import RampipeError
from rampiped.ledger import Ledger, settled, with_links
from rampiped.ledger import Scan as LedgerScan
from rampiped.ledger import scan as ledger_scan
from rampiped.writeback import (
    CONFLICT_SUFFIX,
    HOLD_NAME,
    SCRATCH_NAME,
    HeldFiles,
    Runner,
    SyncError,
    pause_point,
    rsync_stat,
    run_command,
    run_pass,
    scratch_dir,
    source_churn_only,
    stamp_of,
)
from rampiped.writeback import RSYNC_COPY as _RSYNC
from rampiped.writeback import Stamp as StampOfFile

log = logging.getLogger(__name__)

DATA = "data"
SENTINEL = ".rampiped-pin"
SOURCE_PREFIX = "rampiped-"
SQLITE_HEADER = b"SQLite format 3\x00"
# Files SQLite keeps next to a database: write-ahead log, its shared-memory index, rollback
# journal. They belong to one particular database file and are never copied on their own.
DB_COMPANIONS = ("-wal", "-shm", "-journal")
# Temporary names of databases being written on disk; a crash can leave one behind, and the
# next checkpoint's --delete removes it (it does not exist in RAM).
_TMP_MARK = ".rampiped-tmp-"
# A database holding a write lock longer than this is reported, not waited for forever.
DB_LOCK_WAIT = 10.0
# The smallest SQLite page; a database file is a whole number of pages.
_MIN_PAGE = 512

# (type, size, mtime_ns, ctime_ns, inode): any write, truncate, chmod, chown, rename-over or
# replacement changes at least one of them. Since Linux 6.13 ext4, xfs, btrfs and tmpfs use
# multigrain timestamps: once a time was read by stat, the next change gets a distinct one, so
# a same-size overwrite right after our stat cannot hide behind a coarse clock tick.
Stamp = tuple[str, int, int, int, int]
Snapshot = Mapping[str, Stamp]


class CopyError(RampipeError):
    """A copy-mode operation could not be done; the message says why and what to do."""


class TooLarge(CopyError):
    pass


class CopyRace(CopyError):
    def __init__(self, message: str, paths: list[str]) -> None:
        super().__init__(message)
        self.paths = paths


class UnsafeSource(CopyError):
    """The RAM side is not the expected, filled RAM copy of this pin: syncing from it could
    delete the disk copy."""


class UnsafeTarget(CopyError):
    """The disk side is not the pin's bind of the original directory."""


class CheckpointIncomplete(CopyError):
    """Everything else was written, but some databases could not be; `result` says what was."""

    def __init__(self, message: str, result: CheckpointResult) -> None:
        super().__init__(message)
        self.result = result


class NotVerified(CopyError):
    """After a final sync the disk does not hold what RAM holds."""

    def __init__(self, message: str, differences: list[str], ledger: Ledger | None = None) -> None:
        super().__init__(message)
        self.differences = differences
        self.ledger = ledger  # what the disk holds after the sync that did not verify


@dataclass(frozen=True)
class CopyResult:
    files: int  # regular files in the copy (names: a hard-linked file counts per name)
    bytes: int  # as dir_size counts them: files (each inode once) and symlinks
    seconds: float
    attempts: int  # passes needed until one saw no change on disk
    # The source as it was when the last pass ended: after the bind mount, changed_since(src,
    # snapshot) names writes that reached the disk in between (they would be lost).
    snapshot: Snapshot = field(repr=False, compare=False, default_factory=dict)


@dataclass(frozen=True)
class CheckpointResult:
    files: int  # regular files written (databases included)
    bytes: int  # bytes of those files
    deleted: int  # entries deleted on disk
    seconds: float
    unstable: list[str]  # changed during every attempt; on disk as last seen (whole)
    databases: list[str]  # written through SQLite's backup API
    # what the disk holds of each file after it, by content (see ledger.py); databases and
    # their companions are left out (every checkpoint writes them through the backup API)
    ledger: Ledger | None = field(default=None, repr=False, compare=False)


# -- sizes ------------------------------------------------------------------------------------


def dir_size(path: str) -> int:
    """Bytes the tree at `path` takes as a copy in tmpfs: the apparent size of regular files
    (each inode once: rsync -H keeps hard links) and symlinks. Apparent, not allocated: rsync
    without --sparse writes holes out in full. Symlinks are not followed."""
    total = 0
    seen: set[int] = set()
    for _rel, st in tree.walk(path):
        if stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1:
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
            total += st.st_size
        elif stat.S_ISLNK(st.st_mode):
            total += st.st_size
    return total


def check_fits(path: str, max_size: int | None) -> None:
    """Raise TooLarge when the directory has grown past the pin's max_size."""
    if max_size is None:
        return
    size = dir_size(path)
    if size <= max_size:
        return
    have, limit = format_bytes(size), format_bytes(max_size)
    if have == limit:  # 64.0 MiB is more than 64.0 MiB: show the bytes
        have, limit = f"{have} ({size} bytes)", f"{limit} ({max_size} bytes)"
    raise TooLarge(
        f"{path} is {have}, more than max_size {limit}: not pinned "
        "(raise max_size or clean the directory)"
    )


# -- snapshots --------------------------------------------------------------------------------


# Snapshots name the kind of an entry in one letter (osutil.file_kind's "file" is "f", and so
# on; sockets, devices and whiteouts are all "o"): the copy window of an unpin is saved to
# disk with them (COPY_WINDOW), and a daemon reads back what an earlier one saved.
_KIND_LETTERS = {"file": "f", "dir": "d", "symlink": "l", "fifo": "p"}


def _kind(st: os.stat_result) -> str:
    return _KIND_LETTERS.get(osutil.file_kind(st), "o")


def _stamp(st: os.stat_result) -> Stamp:
    return (_kind(st), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def snapshot(root: str, paths: Iterable[str] | None = None) -> dict[str, Stamp]:
    """The stamp of every entry below `root` (relative paths, "." for the root), or of the
    given relative `paths` only. Entries that vanish while we look are left out."""
    out: dict[str, Stamp] = {}
    if paths is not None:
        for rel in paths:
            try:
                out[rel] = _stamp(os.lstat(os.path.join(root, rel)))
            except (FileNotFoundError, NotADirectoryError):
                pass
        return out
    out["."] = _stamp(os.lstat(root))
    for rel, st in tree.walk(root):
        out[rel] = _stamp(st)
    return out


def _differences(before: Snapshot, after: Snapshot) -> list[str]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def changed_since(root: str, before: Snapshot) -> list[str]:
    """Relative paths below `root` that were created, removed or changed since `before`."""
    return _differences(before, snapshot(root))


# -- the RAM side -----------------------------------------------------------------------------


def _require_pin_tmpfs(ram: str, pin_id: str, what: str) -> mounts.MountEntry:
    entry = mounts.mount_at(ram)
    if entry is None:
        raise UnsafeSource(
            f"{what}: {ram} is not a mount point (the RAM copy of pin {pin_id} is not mounted)"
        )
    expected = SOURCE_PREFIX + pin_id
    if entry.fstype != "tmpfs" or entry.source != expected:
        raise UnsafeSource(
            f"{what}: {ram} is mounted from {entry.source!r} ({entry.fstype}), "
            f"not the tmpfs {expected!r} of pin {pin_id}"
        )
    if os.stat(ram).st_dev != entry.dev:
        raise UnsafeSource(f"{what}: {ram} does not resolve into the mount {expected!r}")
    return entry


def verify_source(ram: str, pin_id: str) -> None:
    """Raise UnsafeSource unless `ram` is this pin's tmpfs, holding the sentinel that copy_in
    writes last, and a `data` directory. Called before anything may delete on disk."""
    what = f"refusing to sync from {ram}"
    _require_pin_tmpfs(ram, pin_id, what)
    sentinel = os.path.join(ram, SENTINEL)
    try:
        with open(sentinel, "rb") as f:
            content = json.loads(f.read())
    except FileNotFoundError:
        raise UnsafeSource(f"{what}: no {SENTINEL} (the copy into RAM never completed)") from None
    except (OSError, ValueError) as exc:
        raise UnsafeSource(f"{what}: cannot read {sentinel}: {exc}") from None
    if not isinstance(content, dict) or content.get("id") != pin_id:
        raise UnsafeSource(f"{what}: {sentinel} names {content!r}, not pin {pin_id}")
    data = os.path.join(ram, DATA)
    try:
        is_dir = stat.S_ISDIR(os.lstat(data).st_mode)
    except FileNotFoundError:
        is_dir = False
    if not is_dir:
        raise UnsafeSource(f"{what}: {data} is not a directory")


def _verify_target(ram: str, disk: str) -> None:
    """The disk side must be a mount (the pin's private bind): an unmounted `disk` is an empty
    directory in the runtime dir, and a checkpoint written there would look fine and be lost."""
    if mounts.mount_at(disk) is None:
        raise UnsafeTarget(
            f"refusing to write to {disk}: not a mount point (the disk side of the pin is gone)"
        )
    if os.stat(disk).st_dev == os.stat(ram).st_dev:
        raise UnsafeTarget(f"refusing to write to {disk}: it is on the RAM filesystem")


# -- small file operations --------------------------------------------------------------------


def _fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    _fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def _tmp_path(path: str) -> str:
    """A fresh temporary name next to `path`, marked as rampiped's (_TMP_MARK)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{_TMP_MARK}{secrets.token_hex(4)}")


def _write_atomic(path: str, data: bytes) -> None:
    """osutil.write_atomic by way of a temporary name marked as rampiped's (_tmp_path)."""
    osutil.write_atomic(path, data, tmp=os.path.basename(_tmp_path(path)))


def _is_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False


def _databases(root: str, snap: Snapshot) -> set[str]:
    """Regular files that are SQLite databases: a whole number of (>= 512 byte) pages and the
    header. The size test spares reading every file's first bytes."""
    found = set()
    for rel, (kind, size, *_rest) in snap.items():
        if (
            kind == "f"
            and size >= _MIN_PAGE
            and size % _MIN_PAGE == 0
            and _is_sqlite(os.path.join(root, rel))
        ):
            found.add(rel)
    return found


def _with_companions(databases: Iterable[str]) -> set[str]:
    return {db + suffix for db in databases for suffix in ("", *DB_COMPANIONS)}


def _exclude_pattern(rel: str) -> str:
    """An rsync pattern that matches exactly the path `rel` below the transfer root.

    rsync honours backslash escapes only in patterns holding a wildcard, so the last character
    becomes a one-character class (which also is a wildcard) and every other wildcard or
    backslash is escaped."""
    body = "".join("\\" + c if c in "*?[\\" else c for c in rel[:-1])
    return "/" + body + "[\\" + rel[-1] + "]"


_STAT_LABELS = {
    "files": "Number of regular files transferred",
    "bytes": "Total transferred file size",
    "deleted": "Number of deleted files",
}


def _rsync_stats(stdout: str) -> dict[str, int]:
    return {key: rsync_stat(stdout, label) for key, label in _STAT_LABELS.items()}


# -- copy in ----------------------------------------------------------------------------------


def copy_in(
    src: str,
    ram: str,
    *,
    pin_id: str,
    runner: Runner = run_command,
    attempts: int = 3,
    path: str | None = None,
) -> CopyResult:
    """Copy the directory `src` into `ram`/data with everything rsync -aHAX keeps, then write
    the sentinel (naming `pin_id` and `path`, the original directory, default `src`).

    A pass counts only when a snapshot of `src` taken after it equals the one taken before it;
    otherwise the copy runs again (--delete: the target is this pin's own tmpfs, checked
    first). After `attempts` passes that all saw changes: CopyRace, naming what changed."""
    start = time.monotonic()
    _require_pin_tmpfs(ram, pin_id, f"refusing to copy {src} into {ram}")
    sentinel = os.path.join(ram, SENTINEL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sentinel)  # a copy in progress is never a valid source
    if not stat.S_ISDIR(os.lstat(src).st_mode):
        raise CopyError(f"cannot copy {src} into RAM: not a directory")
    data = os.path.join(ram, DATA)
    os.makedirs(data, exist_ok=True)
    # A database's temporary copy that a power cut left on disk is not brought into RAM; so the
    # first checkpoint's --delete removes it from the disk.
    # exactly _tmp_path's names (8 hex digits): a user's look-alike is copied like any file
    leftovers = [f"--exclude=.*{_TMP_MARK}" + "[0-9a-f]" * 8, f"--exclude=/{SCRATCH_NAME}"]
    argv = [*_RSYNC, "--delete", *leftovers, src.rstrip("/") + "/", data + "/"]
    attempt = 0
    while True:
        attempt += 1
        before = snapshot(src)
        result = runner(argv)
        if result.returncode not in (0, 24):  # 24: a file vanished, i.e. it changed: again
            raise SyncError.from_command(f"copying {src} into RAM", argv, result)
        after = snapshot(src)
        changed = _differences(before, after)
        if not changed and result.returncode == 0:
            break
        if attempt >= attempts:
            shown = ", ".join(changed[:10]) + (
                f" and {len(changed) - 10} more" if changed[10:] else ""
            )
            raise CopyRace(
                f"{src} kept changing while it was copied into RAM ({attempts} passes); "
                f"changed: {shown or '(files vanished)'}: not pinned (stop the writer, or pin "
                "before it starts)",
                changed,
            )
        log.info("copy of %s into RAM raced %d changes, copying again", src, len(changed))
    _write_atomic(sentinel, json.dumps({"id": pin_id, "path": path or src}).encode())
    files = sum(1 for s in after.values() if s[0] == "f")
    size = sum({s[4]: s[1] for s in after.values() if s[0] in "fl"}.values())  # as dir_size
    return CopyResult(files, size, time.monotonic() - start, attempt, after)


# -- databases --------------------------------------------------------------------------------


def _uri(path: str, **params: str) -> str:
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
        _uri(src, mode="rw"), uri=True, timeout=DB_LOCK_WAIT, isolation_level=None
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
    check = sqlite3.connect(_uri(tmp, mode="ro", immutable="1"), uri=True)
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
    if _is_sqlite(path):
        try:
            conn = sqlite3.connect(
                _uri(path, mode="rw"), uri=True, timeout=DB_LOCK_WAIT, isolation_level=None
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
            _fsync_path(path)
    for companion in present:  # SQLite may have removed them already
        with contextlib.suppress(FileNotFoundError):
            os.unlink(companion)
    _fsync_dir(os.path.dirname(path) or ".")
    return present


def _checkpoint_database(data: str, disk: str, rel: str, *, by_pages: bool = False) -> int | None:
    """Write RAM's database `rel` to disk; the bytes written, or None when it vanished.
    `by_pages`: its changed pages in place when it can (sqlitepages), else whole."""
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
    tmp = _tmp_path(dst)
    try:
        try:
            _backup(src, tmp)
        except sqlite3.OperationalError as exc:
            if not os.path.exists(src):
                return None  # deleted in RAM meanwhile: the next checkpoint deletes it on disk
            raise CopyError(f"cannot checkpoint the database {src}: {exc}") from exc
        _copy_metadata(src, st, tmp)
        _fsync_path(tmp)
        settle_database(dst)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)  # RAM replaced a directory by this database
        os.rename(tmp, dst)
    finally:
        for leftover in (tmp, *(tmp + s for s in DB_COMPANIONS)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    _fsync_dir(directory)
    return os.stat(dst).st_size


# -- checkpoint -------------------------------------------------------------------------------


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


def checkpoint(
    ram: str,
    disk: str,
    *,
    pin_id: str,
    runner: Runner = run_command,
    stable_attempts: int = 3,
    ledger: Ledger | None = None,
) -> CheckpointResult:
    """Make `disk` equal `ram`/data while applications keep writing into it.

    1. rsync -aHAX --delete --fsync of everything but the databases and their companions
       (temporary name + fsync + rename per file, never in place). Whether a file changed is
       decided by its content, not by size and mtime alone: `ledger` (the result's `ledger` of
       the last checkpoint, or of the copy-in) says what the disk holds, and files whose
       content differs from it are copied even when rsync's quick check would skip them (a
       same-size rewrite that kept its mtime, stores through a shared mapping). Without a
       ledger the pass compares every file's content (--checksum: reads the disk side);
    2. files whose stamp changed during the pass may be torn: copied again (only they), up to
       `stable_attempts` times; those that never held still are reported in `unstable`;
    3. each database through SQLite's backup API, settled and renamed into place;
    4. syncfs on the disk's filesystem.
    Raises UnsafeSource/UnsafeTarget before touching anything when a side is not what it must
    be, SyncError when rsync fails, CheckpointIncomplete when a database could not be
    written (everything else was)."""
    start = time.monotonic()
    verify_source(ram, pin_id)
    _verify_target(ram, disk)
    data = os.path.join(ram, DATA)
    before = snapshot(data)
    found = ledger_scan(data)
    databases = _databases(data, before)
    excludes = [f"--exclude={_exclude_pattern(p)}" for p in sorted(_with_companions(databases))]
    # looked at before the pass: afterwards every file it copied would look like a miss
    misses = _content_misses(data, disk, found, ledger) if ledger is not None else []
    compare = [] if ledger is not None else ["--checksum"]
    if os.path.lexists(os.path.join(data, SCRATCH_NAME)):
        raise CopyError(
            f"{data} holds an entry named {SCRATCH_NAME}, which write-back reserves: rename it"
            " (nothing was written)"
        )
    argv = [*_RSYNC, "--delete", "--fsync", "--stats", *compare, *excludes, data + "/", disk + "/"]
    with scratch_dir(disk) as scratch:
        argv[-2:-2] = scratch
        result = run_pass(runner, argv)
    # 23/24 for files that vanished or changed while rsync read them: handled below
    if result.returncode != 0 and not source_churn_only(result):
        raise SyncError.from_command(f"checkpoint of {data} to {disk}", argv, result)
    pause_point("copy-checkpoint:copied")
    totals = _rsync_stats(result.stdout)

    # Files that changed while rsync read them: their copy may mix old and new bytes.
    after = snapshot(data)
    changed = [p for p in _differences(before, after) if p != "."]
    changed = sorted(set(changed) | set(misses))
    attempts = 0
    while changed and attempts < stable_attempts:
        attempts += 1
        new_dbs = _databases(data, snapshot(data, changed)) - databases
        databases |= new_dbs
        skip = _with_companions(databases)
        changed = [p for p in changed if p not in skip]
        if not changed:
            break
        verify_source(ram, pin_id)  # --delete-missing-args deletes on disk
        listing = os.path.join(ram, ".rampiped-redo")
        with open(listing, "wb") as f:
            f.write(b"\0".join(os.fsencode(p) for p in changed) + b"\0")
        excludes = [f"--exclude={_exclude_pattern(p)}" for p in sorted(skip)]
        first = snapshot(data, changed)
        # --no-r: only the listed entries (-a would recurse into listed directories); -I:
        # copy even when size and mtime look equal; a listed path gone from RAM is deleted.
        argv = [
            *_RSYNC, "--fsync", "--stats", "--no-r", "-I", "--delete-missing-args", "--force",
            "--from0", f"--files-from={listing}", *excludes, data + "/", disk + "/",
        ]  # fmt: skip
        with scratch_dir(disk) as scratch:
            argv[-2:-2] = scratch
            redo = run_pass(runner, argv)
        os.unlink(listing)
        if redo.returncode != 0 and not source_churn_only(redo):
            raise SyncError.from_command(
                f"checkpoint of {data} to {disk} (changed files)", argv, redo
            )
        for key, value in _rsync_stats(redo.stdout).items():
            totals[key] += value
        second = snapshot(data, changed)
        changed = [p for p in changed if first.get(p) != second.get(p)]
    unstable = changed

    written: list[str] = []
    failures: list[str] = []
    for rel in sorted(databases):
        try:
            size = _checkpoint_database(data, disk, rel, by_pages=True)
        except (CopyError, OSError, sqlite3.Error) as exc:
            failures.append(str(exc))
            continue
        if size is not None:
            written.append(rel)
            totals["files"] += 1
            totals["bytes"] += size
    _restore_dir_times(data, disk, written)
    mounts.syncfs(disk)
    skip = _with_companions(databases)
    outcome = CheckpointResult(
        files=totals["files"],
        bytes=totals["bytes"],
        deleted=totals["deleted"],
        seconds=time.monotonic() - start,
        unstable=unstable,
        databases=written,
        ledger=settled({rel: seen for rel, seen in found.items() if rel not in skip}, data),
    )
    if failures:
        raise CheckpointIncomplete(
            f"checkpoint of {data} to {disk} left out {len(failures)} database(s): "
            + "; ".join(failures),
            outcome,
        )
    return outcome


# -- final sync -------------------------------------------------------------------------------


def _meta(root: str, skip: set[str], databases: set[str]) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for rel in snapshot(root):
        if rel in skip and rel not in databases:
            continue
        full = os.path.join(root, rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue
        kind = _kind(st)
        row: tuple[object, ...] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        if kind == "f" and rel not in databases:
            row += (st.st_size, st.st_mtime_ns)
        elif kind == "l":
            row += (os.readlink(full),)
        out[rel] = row
    return out


def _since_ns(since: float) -> int:
    """A moment of the tmpfs's clock in seconds as ns, a microsecond early: the margin for the
    float it travelled in."""
    return int(since * 1e9) - 1000


def _content_misses(data: str, disk: str, found: LedgerScan, ledger: Ledger) -> list[str]:
    """Files whose content is not what the disk holds (per `ledger`) but whose disk copy has
    RAM's size and mtime, so rsync's quick check would skip them; with the other names of
    their hard-link groups (copied alone, a name would leave its group)."""
    out = []
    for rel in ledger.changed(found):
        seen = found[rel]
        try:
            on_disk = os.lstat(os.path.join(disk, rel))
        except OSError:
            continue  # missing on disk: the quick check copies it
        if on_disk.st_size == seen.size and on_disk.st_mtime_ns == seen.mtime_ns:
            out.append(rel)
    return sorted(with_links(found, out))


def final_sync(
    ram: str,
    disk: str,
    *,
    pin_id: str,
    runner: Runner = run_command,
    ledger: Ledger | None = None,
) -> CheckpointResult:
    """The last checkpoint, once the applications have stopped (the bind over the original path
    is unmounted): the same as checkpoint, then verified. Nothing may change any more, so a file
    that did not hold still or any difference between RAM and disk (type, mode, owner, size,
    mtime, link target; content, against what the checkpoint recorded; databases: a valid
    database on disk) raises NotVerified: the RAM copy must then not be dropped."""
    result = checkpoint(ram, disk, pin_id=pin_id, runner=runner, ledger=ledger)
    data = os.path.join(ram, DATA)
    databases = _databases(data, snapshot(data))
    skip = _with_companions(databases)
    in_ram, on_disk = _meta(data, skip, databases), _meta(disk, skip, databases)
    differences = [f"changed while syncing: {p}" for p in result.unstable]
    if result.ledger is not None:
        now = {rel: seen for rel, seen in ledger_scan(data).items() if rel not in skip}
        differences += [f"{p}: content changed while syncing" for p in result.ledger.changed(now)]
    for rel in sorted(in_ram.keys() | on_disk.keys()):
        if rel == ".":
            continue
        if in_ram.get(rel) != on_disk.get(rel):
            differences.append(f"{rel}: RAM {in_ram.get(rel)} disk {on_disk.get(rel)}")
    for rel in sorted(databases):
        conn = sqlite3.connect(_uri(os.path.join(disk, rel), mode="ro", immutable="1"), uri=True)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as exc:
            verdict = [(str(exc),)]
        finally:
            conn.close()
        if verdict != [("ok",)]:
            differences.append(f"{rel}: database on disk fails quick_check: {verdict[:3]}")
    if differences:
        raise NotVerified(
            f"{disk} does not hold what {data} holds after the final sync ("
            + "; ".join(differences[:5])
            + (f" and {len(differences) - 5} more" if differences[5:] else "")
            + "): keeping the RAM copy",
            differences,
            result.ledger,
        )
    return result


# -- write-back after the unmount ---------------------------------------------------------------
#
# Once the copy no longer covers the path, processes that open files there write on disk. A
# write-back that still has to run then (RAM changed after the verified sync, or a pin rolled
# back after its bind) must neither overwrite nor delete what they write. So it writes only the
# entries RAM changed (never an rsync --delete of the whole tree), deletes only entries still as
# they were while the copy covered the path, and holds the disk files it replaces
# (writeback.HeldFiles): bytes appended to them meanwhile follow the RAM version, a rewrite is kept
# as NAME.rampiped-conflict.


@dataclass(frozen=True)
class Window:
    """The disk as it was while nothing but rampiped could write it (the copy covered the
    path), and since when RAM's changes are not on disk yet."""

    before: Snapshot
    since: float  # the tmpfs's clock (PinManager.ram_clock): RAM entries changed from then on
    threshold: int  # ns, wall clock, shortly before the unmount (writeback.HeldFiles)
    # the disk files that RAM's changes replace, with their content digests, as they were
    # then: bytes appended to one of them afterwards are told from a rewrite by these
    stamps: Mapping[str, StampOfFile] = field(default_factory=dict)
    # RAM files whose content the disk does not hold although their stamps say nothing
    # changed (stores through a shared mapping, a rewrite that kept size and mtime)
    forced: frozenset[str] = frozenset()

    @classmethod
    def take(
        cls, ram: str, disk: str, since: float, threshold: int, ledger: Ledger | None = None
    ) -> Window:
        """While the copy still covers the path (nothing but rampiped writes the disk).
        `ledger`: what the disk holds, by content (None: not known; then RAM's files are
        compared with the disk's)."""
        before = snapshot(disk)
        data = os.path.join(ram, DATA)
        in_ram = snapshot(data)
        # databases go through the backup API whenever their stamps or companions changed
        # (SQLite writes with write(2), never through its mapping), so they are not compared
        skip = _with_companions(_databases(data, in_ram))
        content = {r: s for r, s in ledger_scan(data).items() if r not in skip}
        known = ledger if ledger is not None else Ledger.of(ledger_scan(disk, content))
        bare = cls(before, since, threshold, forced=frozenset(known.changed(content)))
        changed = _ram_changes(in_ram, bare)
        stamps = {}
        for rel in [*changed, *_changed_databases(data, in_ram, changed)]:
            if before.get(rel, ("",))[0] == "f":
                found = stamp_of(disk, rel)
                if found is not None:
                    stamps[rel] = found
        return cls(before, since, threshold, stamps, bare.forced)

    def save(self, path: str) -> None:
        doc = {
            "since": self.since,
            "threshold": self.threshold,
            "before": {rel: list(st) for rel, st in self.before.items()},
            "stamps": {rel: dataclasses.asdict(st) for rel, st in self.stamps.items()},
            "forced": sorted(self.forced),
        }
        _write_atomic(path, json.dumps(doc).encode())

    @classmethod
    def load(cls, path: str) -> Window | None:
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
            before = {
                str(rel): (str(st[0]), int(st[1]), int(st[2]), int(st[3]), int(st[4]))
                for rel, st in doc["before"].items()
            }
            stamps = {str(rel): StampOfFile(**st) for rel, st in doc.get("stamps", {}).items()}
            forced = frozenset(str(rel) for rel in doc.get("forced", []))
            return cls(before, float(doc["since"]), int(doc["threshold"]), stamps, forced)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CopyError(f"{path} is unreadable ({exc}): cannot finish the write-back") from exc


def _same_content(a: Stamp | None, b: Stamp | None) -> bool:
    """Same kind, and for a file the same size and mtime, for a symlink the same length: what
    rsync -a leaves after copying `a` to `b`."""
    if a is None or b is None:
        return a is b
    if a[0] != b[0]:
        return False
    if a[0] == "f":
        return a[1:3] == b[1:3]
    if a[0] == "l":
        return a[1] == b[1]
    return True


def _ram_changes(in_ram: Snapshot, window: Window) -> list[str]:
    """RAM entries changed since window.since, not as the disk held them before, or whose
    content the disk does not hold (window.forced)."""
    since_ns = _since_ns(window.since)
    return sorted(
        rel
        for rel, st in in_ram.items()
        if st[3] >= since_ns
        or not _same_content(st, window.before.get(rel))
        or rel in window.forced
    )


def _changed_databases(data: str, in_ram: Snapshot, changed: Iterable[str]) -> list[str]:
    """The databases in RAM that the write-back writes: changed themselves, or through a
    companion only (a writer that never checkpointed leaves its rows in the -wal)."""
    changed_set = set(changed)
    return sorted(
        db
        for db in _databases(data, in_ram)
        if changed_set & {db, *(db + s for s in DB_COMPANIONS)}
    )


def _hard_linked(before: Snapshot) -> set[int]:
    """Inodes of the disk files that had several names before the unmount. Every link or
    unlink of one of those names changes the change time of all of them: the write-back's own
    (holding a name, deleting another) must not make the others look written."""
    seen: set[int] = set()
    shared: set[int] = set()
    for st in before.values():
        if st[0] == "f":
            (shared if st[4] in seen else seen).add(st[4])
    return shared


def _window_base(disk: str, rel: str, was: Stamp | None, known: StampOfFile | None) -> StampOfFile:
    """The disk file at `rel` as it was before the unmount: as recorded then, or as the
    write-back finds it when it is still the same; otherwise unknown (a change to it is then
    kept as a conflict file)."""
    unknown = StampOfFile(rel, -1, 0, 0, 0, "")
    if known is not None:
        return known
    if was is None:
        return StampOfFile(rel, 0, 0, 0, 0, "")  # nothing there before: all of it is new
    try:
        if _stamp(os.lstat(os.path.join(disk, rel))) != was:
            return unknown
        found = stamp_of(disk, rel)
    except OSError:
        return unknown
    if found is None or (found.ino, found.size, found.mtime_ns, found.ctime_ns) != (
        was[4],
        was[1],
        was[2],
        was[3],
    ):
        return unknown
    return found


def _written_before(data: str, disk: str, rel: str, window: Window) -> bool:
    """A file that a write-back cut short (a crash) already put in place: the disk file is no
    longer the one there before the unmount, has RAM's owner and mode, and starts with RAM's
    content (bytes appended after it were carried there by the hold, or by a process that
    opened it anew). Writing it again would hide those bytes in a conflict file."""
    was = window.before.get(rel)
    try:
        ram_st = os.lstat(os.path.join(data, rel))
        disk_st = os.lstat(os.path.join(disk, rel))
    except OSError:
        return False
    if not (stat.S_ISREG(ram_st.st_mode) and stat.S_ISREG(disk_st.st_mode)):
        return False
    if was is not None and was[0] == "f" and was[4] == disk_st.st_ino:
        # still the old file (held since, so its inode number cannot have been reused; a
        # directory's or symlink's can, by the file written in its place)
        return False
    if (ram_st.st_mode, ram_st.st_uid, ram_st.st_gid) != (
        disk_st.st_mode,
        disk_st.st_uid,
        disk_st.st_gid,
    ) or disk_st.st_size < ram_st.st_size:
        return False
    try:
        with (
            open(os.path.join(data, rel), "rb") as a,
            open(os.path.join(disk, rel), "rb", opener=_nofollow) as b,
        ):
            left = ram_st.st_size
            while left > 0:
                chunk = a.read(min(left, 1 << 20))
                if not chunk or b.read(len(chunk)) != chunk:
                    return False
                left -= len(chunk)
    except OSError:
        return False
    return True


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def _delete_gone(disk: str, before: Snapshot, in_ram: Snapshot) -> tuple[int, list[str]]:
    """Delete on disk what RAM deleted (or replaced a directory with something else), when
    it is still as it was before the unmount; a directory only when nothing new is in it.
    Returns (entries deleted, entries kept because they were written meanwhile)."""
    gone = [
        rel
        for rel, was in before.items()
        if rel != "." and (rel not in in_ram or (was[0] == "d" and in_ram[rel][0] != "d"))
    ]
    deleted, kept = 0, []
    linked = _hard_linked(before)
    for rel in sorted(gone, key=lambda r: r.count("/"), reverse=True):
        full = os.path.join(disk, rel)
        try:
            st = os.lstat(full)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                continue  # gone already, or below a directory replaced meanwhile
            raise
        was = before[rel]
        if stat.S_ISDIR(st.st_mode):
            if was[0] != "d" or was[4] != st.st_ino:
                kept.append(rel)
                continue
            try:
                os.rmdir(full)
                deleted += 1
                continue
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if rel in in_ram:
                # RAM has a file here, and rsync --force would delete what was created in
                # the directory meanwhile: move the directory aside
                os.rename(full, full + CONFLICT_SUFFIX)
                log.warning(
                    "%s: files were created in this directory during the write-back, which"
                    " RAM replaced: the directory is kept as %s%s",
                    full,
                    full,
                    CONFLICT_SUFFIX,
                )
            kept.append(rel)
        elif _stamp(st) == was or (
            # one of several names of a file: its change time moved when we held or deleted
            # another name; a write moves its mtime (multigrain timestamps, see Stamp)
            was[4] in linked and st.st_ino == was[4] and _stamp(st)[:3] == was[:3]
        ):
            os.unlink(full)
            deleted += 1
        else:
            kept.append(rel)
    if kept:
        log.info(
            "%s: kept entries deleted in RAM but written on disk during the write-back: %s",
            disk,
            ", ".join(kept[:10]),
        )
    return deleted, kept


def _one_name_per_file(disk: str, rels: list[str], in_ram: Snapshot) -> list[str]:
    """`rels` without the further names of a disk file whose names are one file in RAM too (a
    hard-link group that rsync -H links again on disk): what is appended to a held file is
    carried to the file at its name, so a second name of it would carry the same bytes again
    into the same file."""
    seen: set[tuple[int, int]] = set()
    out = []
    for rel in rels:
        try:
            st = os.lstat(os.path.join(disk, rel))
        except OSError:
            out.append(rel)
            continue
        ram = in_ram.get(rel)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and ram is not None and ram[0] == "f":
            key = (st.st_ino, ram[4])
            if key in seen:
                continue
            seen.add(key)
        out.append(rel)
    return out


@dataclass
class WindowWriteBack:
    """A write-back after the unmount (see above), prepared: the disk files it replaces are
    held. `write` does it; the caller then settles `held` (merge, then finish) once the writers
    are done, or, when `write` raised, merges them as conflicts."""

    ram: str
    disk: str
    window: Window
    in_ram: Snapshot
    listed: list[str]  # entries rsync writes
    databases: list[str]  # databases written through SQLite's backup API
    skip: set[str]  # databases and their companions: never through rsync
    held: HeldFiles

    @classmethod
    def prepare(cls, ram: str, disk: str, window: Window, *, pin_id: str) -> WindowWriteBack:
        """RAM must not change any more (nothing holds it)."""
        verify_source(ram, pin_id)
        _verify_target(ram, disk)
        data = os.path.join(ram, DATA)
        in_ram = snapshot(data)
        changed = _ram_changes(in_ram, window)
        databases = _databases(data, in_ram)
        skip = _with_companions(databases)
        # never "." in the list: rsync would copy the whole top level (see --dirs in rsync(1))
        listed = [
            rel
            for rel in changed
            if rel not in skip and rel != "." and not _written_before(data, disk, rel, window)
        ]
        dbs = _changed_databases(data, in_ram, changed)
        replaced = _one_name_per_file(disk, [rel for rel in [*listed, *dbs] if rel != "."], in_ram)
        bases = {
            rel: _window_base(disk, rel, window.before.get(rel), window.stamps.get(rel))
            for rel in replaced
        }
        held = HeldFiles.hold_paths(disk, replaced, bases, window.threshold)
        return cls(ram, disk, window, in_ram, listed, dbs, skip, held)

    def write(self, runner: Runner = run_command) -> CheckpointResult:
        start = time.monotonic()
        ram, disk = self.ram, self.disk
        data = os.path.join(ram, DATA)
        deleted, _kept = _delete_gone(disk, self.window.before, self.in_ram)
        top = os.lstat(data)
        if top.st_ctime_ns >= _since_ns(self.window.since):
            # the directory's own owner and mode (rsync is not given "." above)
            os.chown(disk, top.st_uid, top.st_gid, follow_symlinks=False)
            os.chmod(disk, stat.S_IMODE(top.st_mode))
        totals = {"files": 0, "bytes": 0, "deleted": deleted}
        if self.listed:
            listing = os.path.join(ram, ".rampiped-window")
            with open(listing, "wb") as f:
                f.write(b"\0".join(os.fsencode(p) for p in self.listed) + b"\0")
            excludes = [f"--exclude={_exclude_pattern(p)}" for p in sorted(self.skip)]
            # only the listed entries (--files-from never recurses with --no-r); -I: copy even
            # when size and mtime look equal; no --delete: deletions were done above
            argv = [
                *_RSYNC, "--fsync", "--stats", "--no-r", "-I", "--ignore-missing-args", "--force",
                "--from0", f"--files-from={listing}", *excludes, data + "/", disk + "/",
            ]  # fmt: skip
            try:
                with scratch_dir(disk) as scratch:
                    argv[-2:-2] = scratch
                    result = runner(argv)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(listing)
            if result.returncode not in (0, 24):
                raise SyncError.from_command(f"write-back of {data} to {disk}", argv, result)
            stats = _rsync_stats(result.stdout)
            totals["files"] += stats["files"]
            totals["bytes"] += stats["bytes"]
        # what was appended to the replaced files so far goes after RAM's version now, before
        # a process that opens the name anew appends to that version: the order a plain disk
        # would have (the caller's merges carry what comes later, and retry a failure here)
        try:
            self.held.merge()
        except (OSError, SyncError) as exc:
            log.warning("%s: carrying the appends made meanwhile failed (%s); retried", disk, exc)
        pause_point("copy-window:written")
        written: list[str] = []
        for rel in self.databases:
            size = _checkpoint_database(data, disk, rel)
            if size is not None:
                written.append(rel)
                totals["files"] += 1
                totals["bytes"] += size
        _restore_dir_times(data, disk, written)
        mounts.syncfs(disk)
        missing = []
        for rel in self.listed:
            try:
                ok = _kind(os.lstat(os.path.join(disk, rel))) == self.in_ram[rel][0]
            except OSError:
                ok = False
            if not ok:
                missing.append(rel)
        if missing:
            raise NotVerified(
                f"{disk} lacks what the write-back wrote from {data}: "
                + ", ".join(missing[:5])
                + ": keeping the RAM copy",
                missing,
            )
        return CheckpointResult(
            files=totals["files"],
            bytes=totals["bytes"],
            deleted=totals["deleted"],
            seconds=time.monotonic() - start,
            unstable=[],
            databases=written,
        )


def import_window(ram: str, disk: str, window: Window) -> list[str]:
    """A write-back after the unmount failed and the copy is to cover the path again: copy into
    RAM what processes wrote on disk meanwhile (the copy hides it from then on, and the next
    checkpoint, RAM to disk with --delete, would remove it). A file RAM changed too comes in as
    NAME.rampiped-conflict. Returns what was copied."""
    data = os.path.join(ram, DATA)
    in_ram = snapshot(data)
    on_disk = snapshot(disk)
    ram_changed = set(_ram_changes(in_ram, window))
    # held files made conflict files: another name of the same file (a hard link) is no
    # second conflict
    conflicts = {
        st[4] for rel, st in on_disk.items() if st[0] == "f" and rel.endswith(CONFLICT_SUFFIX)
    }
    taken: list[str] = []
    for rel in sorted(on_disk, key=lambda r: r.count("/")):
        st = on_disk[rel]
        if rel == "." or rel == HOLD_NAME or rel.startswith(HOLD_NAME + "/"):
            continue
        if st == window.before.get(rel) or _same_content(st, in_ram.get(rel)):
            continue  # untouched since the unmount, or what the write-back wrote
        src = os.path.join(disk, rel)
        dst = os.path.join(data, rel)
        if rel in ram_changed:
            if st[0] != "f" or os.path.lexists(src + CONFLICT_SUFFIX) or st[4] in conflicts:
                continue  # RAM's version wins; a held rewrite comes in under its own name
            dst += CONFLICT_SUFFIX
        parent = os.path.dirname(dst)
        if not os.path.isdir(parent):
            continue  # its directory was taken already, whole
        if st[0] == "d":
            if os.path.lexists(dst):
                continue
            shutil.copytree(src, dst, symlinks=True)
        elif st[0] in ("f", "l"):
            tmp = _tmp_path(dst)
            shutil.copy2(src, tmp, follow_symlinks=False)
            os.replace(tmp, dst)
        else:
            continue
        taken.append(rel)
    if taken:
        log.warning(
            "%s: brought back into RAM what was written on disk while the write-back ran: %s",
            data,
            ", ".join(taken[:10]),
        )
    return taken
