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

The write-back (checkpoints, databases, the final sync, the write-back after the unmount) is
in the package rampiped.copywb; its names are importable from here as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time

from rampiped import durable, tree
from rampiped.copywb.atomic import TMP_MARK, write_atomic
from rampiped.copywb.checkpoint import checkpoint, final_sync
from rampiped.copywb.databases import (
    DB_COMPANIONS,
    DB_LOCK_WAIT,
    SQLITE_HEADER,
    settle_database,
)
from rampiped.copywb.results import (
    CheckpointIncomplete,
    CheckpointResult,
    CopyError,
    CopyRace,
    CopyResult,
    NotVerified,
    TooLarge,
    UnsafeSource,
    UnsafeTarget,
)
from rampiped.copywb.sides import (
    DATA,
    SENTINEL,
    SOURCE_PREFIX,
    require_pin_tmpfs,
    verify_source,
)
from rampiped.copywb.snapshot import Snapshot, Stamp, changed_since, differences, snapshot
from rampiped.copywb.window import Window, import_window
from rampiped.copywb.window_write import WindowWriteBack
from rampiped.engine import format_bytes
from rampiped.writeback import RSYNC_COPY as _RSYNC
from rampiped.writeback import SCRATCH_NAME, Runner, SyncError, run_command

__all__ = [
    "DATA",
    "DB_COMPANIONS",
    "DB_LOCK_WAIT",
    "SENTINEL",
    "SOURCE_PREFIX",
    "SQLITE_HEADER",
    "CheckpointIncomplete",
    "CheckpointResult",
    "CopyError",
    "CopyRace",
    "CopyResult",
    "NotVerified",
    "Snapshot",
    "Stamp",
    "TooLarge",
    "UnsafeSource",
    "UnsafeTarget",
    "Window",
    "WindowWriteBack",
    "changed_since",
    "check_fits",
    "checkpoint",
    "copy_in",
    "dir_size",
    "final_sync",
    "import_window",
    "settle_database",
    "snapshot",
    "verify_source",
]

log = logging.getLogger(__name__)


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
    require_pin_tmpfs(ram, pin_id, f"refusing to copy {src} into {ram}")
    sentinel = os.path.join(ram, SENTINEL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sentinel)  # a copy in progress is never a valid source
    if not stat.S_ISDIR(os.lstat(src).st_mode):
        raise CopyError(f"cannot copy {src} into RAM: not a directory")
    data = os.path.join(ram, DATA)
    os.makedirs(data, exist_ok=True)
    # A database's temporary copy that a power cut left on disk is not brought into RAM; so the
    # first checkpoint's --delete removes it from the disk.
    # exactly copywb.atomic.tmp_path's names (8 hex digits): a user's look-alike is copied like
    # any file
    leftovers = [f"--exclude=.*{TMP_MARK}" + "[0-9a-f]" * 8, f"--exclude=/{SCRATCH_NAME}"]
    argv = [*_RSYNC, "--delete", *leftovers, src.rstrip("/") + "/", data + "/"]
    attempt = 0
    while True:
        attempt += 1
        before = snapshot(src)
        result = runner(argv)
        if result.returncode not in (0, 24):  # 24: a file vanished, i.e. it changed: again
            raise SyncError.from_command(f"copying {src} into RAM", argv, result)
        after = snapshot(src)
        changed = differences(before, after)
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
    # what the pin starts from is durable on disk before writes go to RAM only: a file
    # written just before the pin may still be in the page cache, and a checkpoint commits
    # what it writes itself, not every dirty page of the filesystem
    durable.syncfs(src)
    write_atomic(sentinel, json.dumps({"id": pin_id, "path": path or src}).encode())
    files = sum(1 for s in after.values() if s[0] == "f")
    size = sum({s[4]: s[1] for s in after.values() if s[0] in "fl"}.values())  # as dir_size
    return CopyResult(files, size, time.monotonic() - start, attempt, after)
