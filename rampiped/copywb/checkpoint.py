"""Checkpoints of a copy pin (RAM copy to the disk bind, while applications keep writing) and
the final sync (the last checkpoint, verified, once they have stopped)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import Iterable
from functools import partial

from rampiped import appends, durable
from rampiped.appends import append_grown, candidates, disk_prefix, still_prefix
from rampiped.commands import CommandResult, exclude_pattern, files_from
from rampiped.copywb.databases import databases_in, sqlite_uri, with_companions, write_databases
from rampiped.copywb.renamed import rename_on_disk, renamed_meanwhile
from rampiped.copywb.results import CheckpointIncomplete, CheckpointResult, CopyError, NotVerified
from rampiped.copywb.sides import DATA, verify_source, verify_target
from rampiped.copywb.snapshot import differences, kind_letter, snapshot
from rampiped.copywb.staged import left_by_exclusion, move_staged, stage_files, staged_files
from rampiped.ledger import Ledger, settled, with_links
from rampiped.ledger import Scan as LedgerScan
from rampiped.ledger import scan as ledger_scan
from rampiped.renames import renamed
from rampiped.writeback import (
    CLOCK_SLACK_NS,
    SCRATCH_NAME,
    Runner,
    SyncError,
    exclude_file,
    pause_point,
    rsync_stat,
    run_command,
    run_pass,
    scratch_dir,
    source_churn_only,
)
from rampiped.writeback import RSYNC_COPY as _RSYNC

_STAT_LABELS = {
    "files": "Number of regular files transferred",
    "bytes": "Total transferred file size",
    "deleted": "Number of deleted files",
}


def rsync_stats(stdout: str) -> dict[str, int]:
    return {key: rsync_stat(stdout, label) for key, label in _STAT_LABELS.items()}


def copy_listed(
    run: Runner,
    ram: str,
    disk: str,
    name: str,
    rels: list[str],
    skip: Iterable[str],
    missing: str,
    *,
    files: bool = True,
) -> tuple[list[str], CommandResult]:
    """rsync exactly the entries `rels` of `ram`/data to `disk`, even when size and mtime look
    equal (-I), each written whole (--fsync), with `skip` (databases and their companions)
    excluded. --no-r: only the listed entries (-a would recurse into a listed directory);
    `missing` says what becomes of a listed entry gone from RAM (--delete-missing-args,
    --ignore-missing-args). The list is written into `ram` as `name`, outside the copy, and
    removed again. `files`: whether a regular file is among them (rsync's scratch directory
    is made only then). Returns the command line and what `run` returned for it."""
    data = os.path.join(ram, DATA)
    listing = os.path.join(ram, name)
    with open(listing, "wb") as f:
        f.write(b"\0".join(os.fsencode(p) for p in rels) + b"\0")
    excludes = [f"--exclude={exclude_pattern(p)}" for p in sorted(skip)]
    argv = [
        *_RSYNC, "--fsync", "--stats", "--no-r", "-I", missing, "--force",
        "--from0", f"--files-from={listing}", *excludes, data + "/", disk + "/",
    ]  # fmt: skip
    try:
        with scratch_dir(disk, needed=files) as scratch:
            argv[-2:-2] = scratch
            result = run(argv)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listing)
    return argv, result


def checkpoint(
    ram: str,
    disk: str,
    *,
    pin_id: str,
    runner: Runner = run_command,
    stable_attempts: int = 3,
    ledger: Ledger | None = None,
    full: bool = False,
) -> CheckpointResult:
    """Make `disk` equal `ram`/data while applications keep writing into it.

    1. rsync -aHAX --delete --fsync of everything but the databases and their companions
       (temporary name + fsync + rename per file, never in place). Whether a file changed is
       decided by its content, not by size and mtime alone: `ledger` (the result's `ledger` of
       the last checkpoint, or of the copy-in) says what the disk holds, and files whose
       content differs from it are copied even when rsync's quick check would skip them (a
       same-size rewrite that kept its mtime, stores through a shared mapping). Without a
       ledger the pass compares every file's content (--checksum: reads the disk side).
       When the ledger knows the entries the last checkpoint left equal on disk (their
       stamps), and not `full`, the pass looks only at the entries whose stamp moved since
       (any change of content, name, mode, owner, attributes or times moves the ctime; one
       that came too close to that checkpoint's start is not known as equal) and at those
       whose content differs: an entry gone from RAM is deleted on disk
       (--delete-missing-args). A checkpoint of one change in 20,000 files then reads
       nothing of the other 19,999 but their content in RAM;
    2. files whose stamp changed during the pass may be torn: copied again (only they), up to
       `stable_attempts` times; those that never held still are reported in `unstable`;
    3. each database through SQLite's backup API, settled and renamed into place;
    4. syncfs on the disk's filesystem, or where one journal commit takes every change made
       before it (durable.fsync_commits_all), that commit: every file written was fsynced.
    Raises UnsafeSource/UnsafeTarget before touching anything when a side is not what it must
    be, SyncError when rsync fails, CheckpointIncomplete when a database could not be
    written (everything else was)."""
    start = time.monotonic()
    verify_source(ram, pin_id)
    verify_target(ram, disk)
    data = os.path.join(ram, DATA)
    # entries whose ctime is this close to the start may change again with the same ctime
    # (the kernel's coarse clock): not recorded as known equal
    recent_ns = time.time_ns() - CLOCK_SLACK_NS
    before = snapshot(data)
    found = ledger_scan(data, [rel for rel, stamp in before.items() if stamp[0] == "f"])
    databases = databases_in(data, before)
    excludes = [f"--exclude={exclude_pattern(p)}" for p in sorted(with_companions(databases))]
    # files renamed in RAM: renamed on disk (renames.py), and the ledger with them
    # on a filesystem that commits in order, the renames and the appended tails are made
    # durable by the sync after the stage, not by an fsync each: a few journal commits per
    # checkpoint, however many files
    # (and where one commit takes everything before it, the data is written out and the
    # journal committed once, at the end, without syncfs's writing of all the metadata to its
    # place at once: it reaches its place later, merged over checkpoints, durable.py)
    batched = durable.commits_in_order(disk)
    moved: dict[str, str] = {}
    if ledger is not None:
        pairs = renamed(found, ledger, frozenset(with_companions(databases)), grown=True)
        moved = rename_on_disk(disk, pairs, ledger, batched=batched) if pairs else {}
        ledger = ledger.moved(moved)
    # looked at before the pass: afterwards every file it copied would look like a miss
    misses = _content_misses(data, disk, found, ledger) if ledger is not None else []
    compare = [] if ledger is not None else ["--checksum"]
    if os.path.lexists(os.path.join(data, SCRATCH_NAME)):
        raise CopyError(
            f"{data} holds an entry named {SCRATCH_NAME}, which write-back reserves: rename it"
            " (nothing was written)"
        )
    # files that only grew: their tail appended to the disk copy, and left out of the copy
    appended = (
        append_grown(
            data,
            disk,
            candidates(found, ledger, with_companions(databases)),
            ledger,
            batched=batched,
        )
        if ledger is not None
        else []
    )
    excludes += [f"--exclude={exclude_pattern(a.rel)}" for a in appended]
    # the files to write whole: staged, synced once, renamed into place (staged.py); then
    # the main pass, which finds them in place (it compares by size and mtime now: what
    # --checksum found different is in place too)
    listed = None
    if ledger is not None and ledger.entries is not None and not full:
        listed = sorted(set(differences(ledger.entries, before)) | set(ledger.changed(found)))
    whole_tree = ["--delete"] if listed is None else ["--no-r", "--delete-missing-args", "--force"]
    argv = [*_RSYNC, *whole_tree, "--fsync", "--stats", *excludes, data + "/", disk + "/"]
    with scratch_dir(disk) as scratch:
        staged_run = stage_files(
            runner,
            data,
            disk,
            os.path.join(disk, SCRATCH_NAME),
            [*compare, *excludes],
            only=None if ledger is None else ledger.changed(found),
        )
        # the stage, the tails and the renames on disk before the names show them
        durable.settle(
            disk,
            lambda: [*staged_files(os.path.join(disk, SCRATCH_NAME)),
                     *(os.path.join(disk, a.rel) for a in appended)],
        )  # fmt: skip
        appends.set_times(disk, appended)
        pause_point("copy-checkpoint:staged")
        moved_in = move_staged(disk, os.path.join(disk, SCRATCH_NAME))
        pause_point("copy-checkpoint:moved")
        # left out of the main pass: a file that changed since it was staged is found below
        # (a hard-linked one is left to the pass, which links its names: rsync -H)
        left_out = [rel for rel in moved_in if _one_name(data, rel)]
        with exclude_file(left_out) as exclude_from, files_from(listed or []) as listing:
            if exclude_from is not None:
                argv[-2:-2] = ["--from0", f"--exclude-from={exclude_from}"]
            if listed is not None:
                argv[-2:-2] = ["--from0", f"--files-from={listing}"]
            argv[-2:-2] = scratch
            result = (
                left_by_exclusion(run_pass(runner, argv), left_out)
                if listed is None or set(listed) - set(left_out)
                else CommandResult(0, "", "")
            )
    # 23/24 for files that vanished or changed while rsync read them: handled below
    if result.returncode != 0 and not source_churn_only(result):
        raise SyncError.from_command(f"checkpoint of {data} to {disk}", argv, result)
    pause_point("copy-checkpoint:copied")
    totals = rsync_stats(result.stdout)
    staged_stats = rsync_stats(staged_run.stdout)
    totals["files"] += staged_stats["files"]
    totals["bytes"] += staged_stats["bytes"]
    totals["files"] += len(appended)
    totals["bytes"] += sum(a.new_size - a.old_size for a in appended)

    # Files that changed while rsync read them: their copy may mix old and new bytes. A file
    # whose tail was appended and that only grew on meanwhile is a prefix on disk: the next
    # checkpoint appends the rest (it is not copied again now).
    after = snapshot(data)
    changed = [p for p in differences(before, after) if p != "."]
    changed = sorted(set(changed) | set(misses))
    # files renamed while the pass ran (a rotation that came just then): renamed on disk too,
    # where the old name there holds what RAM holds at the new one (each change once)
    moved_meanwhile = (
        renamed_meanwhile(data, disk, before, after, changed, batched=batched)
        if ledger is not None
        else {}
    )
    changed = [p for p in changed if p not in moved_meanwhile]
    grew_on = {a.rel for a in appended if a.rel in changed and still_prefix(data, a)}
    # each change once: a file that only grew while it was copied is a prefix on disk, and the
    # next checkpoint appends the rest (the others may be torn: copied again, up to
    # `stable_attempts` times)
    prefixes = {
        p: known
        for p in changed
        if p not in grew_on
        and p not in misses
        and (known := disk_prefix(data, disk, p)) is not None
    }
    changed = [p for p in changed if p not in grew_on and p not in prefixes]
    steady: list[str] = []  # copied again, and held still while that copy read them
    attempts = 0
    while changed and attempts < stable_attempts:
        attempts += 1
        new_dbs = databases_in(data, snapshot(data, changed)) - databases
        databases |= new_dbs
        skip = with_companions(databases)
        changed = [p for p in changed if p not in skip]
        if not changed:
            break
        verify_source(ram, pin_id)  # --delete-missing-args deletes on disk
        first = snapshot(data, changed)
        # a listed path gone from RAM is deleted on disk
        argv, redo = copy_listed(
            partial(run_pass, runner),
            ram,
            disk,
            ".rampiped-redo",
            changed,
            skip,
            "--delete-missing-args",
        )
        if redo.returncode != 0 and not source_churn_only(redo):
            raise SyncError.from_command(
                f"checkpoint of {data} to {disk} (changed files)", argv, redo
            )
        for key, value in rsync_stats(redo.stdout).items():
            totals[key] += value
        second = snapshot(data, changed)
        steady += [p for p in changed if first.get(p) == second.get(p)]
        moving = [p for p in changed if first.get(p) != second.get(p)]
        for p in moving:
            if (known := disk_prefix(data, disk, p)) is not None:
                prefixes[p] = known
        changed = [p for p in moving if p not in prefixes]
    unstable = changed

    failures: list[str] = []
    written = write_databases(data, disk, sorted(databases), totals, failures, by_pages=True)
    # the moves, the main pass's renames and deletions, the times: metadata (each file the
    # passes wrote was fsynced, and so were the databases)
    durable.sync(disk)
    skip = with_companions(databases)
    held = settled({rel: seen for rel, seen in found.items() if rel not in skip}, data, after)
    # the entries the disk now holds as they were when this checkpoint began: those that held
    # still while it ran, not too close to its start, and written if they were to be
    during = set(differences(before, after)) | set(unstable)
    held.entries = {
        rel: stamp for rel, stamp in before.items() if rel not in during and stamp[3] < recent_ns
    }
    redone = set(unstable) | (set(misses) - grew_on)
    for a in appended:
        if a.rel in grew_on or (a.rel in held.digests and a.rel not in redone):
            held.record(a.rel, a.digest, a.new_size, found[a.rel].ino)  # the disk file now
    for rel, (digest, size) in prefixes.items():
        if rel in found and rel not in skip:  # (one new since the scan is copied next time)
            held.record(rel, digest, size, found[rel].ino)
    for rel, (digest, size, ino) in moved_meanwhile.items():  # what the disk holds there now
        held.record(rel, digest, size, ino)
    # what the copies made again hold, so that the next checkpoint does not take them for
    # content it cannot know (and copy them once more)
    settled_again = settled(
        {rel: seen for rel, seen in ledger_scan(data, steady).items() if rel not in skip}, data
    )
    for rel in settled_again.digests:
        if rel not in unstable:
            held.record(
                rel,
                settled_again.digests[rel],
                settled_again.sizes[rel],
                settled_again.inodes.get(rel),
            )
    outcome = CheckpointResult(
        files=totals["files"],
        bytes=totals["bytes"],
        deleted=totals["deleted"],
        seconds=time.monotonic() - start,
        unstable=unstable,
        databases=written,
        ledger=held,
        appended=len(appended),
        renamed=len(moved) + len(moved_meanwhile),
        whole_bytes=appends.whole_bytes(totals["bytes"], appended, moved, found),
    )
    if failures:
        raise CheckpointIncomplete(
            f"checkpoint of {data} to {disk} left out {len(failures)} database(s): "
            + "; ".join(failures),
            outcome,
        )
    return outcome


def _one_name(data: str, rel: str) -> bool:
    try:
        return os.lstat(os.path.join(data, rel)).st_nlink == 1
    except OSError:
        return False  # gone from RAM: the pass deletes it on disk


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
        kind = kind_letter(st)
        row: tuple[object, ...] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        if kind == "f" and rel not in databases:
            row += (st.st_size, st.st_mtime_ns)
        elif kind == "l":
            row += (os.readlink(full),)
        out[rel] = row
    return out


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
    result = checkpoint(ram, disk, pin_id=pin_id, runner=runner, ledger=ledger, full=True)
    data = os.path.join(ram, DATA)
    databases = databases_in(data, snapshot(data))
    skip = with_companions(databases)
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
        conn = sqlite3.connect(
            sqlite_uri(os.path.join(disk, rel), mode="ro", immutable="1"), uri=True
        )
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
