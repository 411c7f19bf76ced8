"""The write-back of a copy pin after the unmount (see window.py): only the entries RAM
changed, deletions only of what is still as it was, the disk files it replaces held."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass

from rampiped import durable
from rampiped.copywb.checkpoint import copy_listed, rsync_stats
from rampiped.copywb.databases import databases_in, with_companions, write_databases
from rampiped.copywb.placed import place_in_hold
from rampiped.copywb.results import CheckpointResult, NotVerified
from rampiped.copywb.sides import DATA, verify_source, verify_target
from rampiped.copywb.snapshot import Snapshot, Stamp, entry_stamp, kind_letter, snapshot
from rampiped.copywb.window import Window, changed_databases, ram_changes, since_ns
from rampiped.fsops import opened_dir
from rampiped.writeback import (
    CONFLICT_SUFFIX,
    HeldFiles,
    HoldPlace,
    Runner,
    SyncError,
    pause_point,
    run_command,
    stamp_of,
)
from rampiped.writeback import Stamp as StampOfFile

log = logging.getLogger(__name__)


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
        if entry_stamp(os.lstat(os.path.join(disk, rel))) != was:
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
        elif entry_stamp(st) == was or (
            # one of several names of a file: its change time moved when we held or deleted
            # another name; a write moves its mtime (multigrain timestamps, see Stamp)
            was[4] in linked and st.st_ino == was[4] and entry_stamp(st)[:3] == was[:3]
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
    """A write-back after the unmount (see window.py), prepared: the disk files it replaces are
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
    def prepare(
        cls, ram: str, disk: str, window: Window, *, pin_id: str, hold: HoldPlace | None = None
    ) -> WindowWriteBack:
        """RAM must not change any more (nothing holds it). `hold`: where the replaced disk
        files are held (default: at the top of `disk`)."""
        verify_source(ram, pin_id)
        verify_target(ram, disk)
        data = os.path.join(ram, DATA)
        in_ram = snapshot(data)
        changed = ram_changes(in_ram, window)
        databases = databases_in(data, in_ram)
        skip = with_companions(databases)
        # never "." in the list: rsync would copy the whole top level (see --dirs in rsync(1))
        listed = [
            rel
            for rel in changed
            if rel not in skip and rel != "." and not _written_before(data, disk, rel, window)
        ]
        dbs = changed_databases(data, in_ram, changed)
        replaced = _one_name_per_file(disk, [rel for rel in [*listed, *dbs] if rel != "."], in_ram)
        bases = {
            rel: _window_base(disk, rel, window.before.get(rel), window.stamps.get(rel))
            for rel in replaced
        }
        held = HeldFiles.hold_paths(hold or disk, replaced, bases, window.threshold)
        return cls(ram, disk, window, in_ram, listed, dbs, skip, held)

    def own_writes(self) -> set[str]:
        """The files that RAM changed and this write-back writes itself rather than rsync
        (HeldFiles.write_own): regular files with one name in RAM (hard links go to rsync)
        that replace a held file, and, when the hold directory is outside the directory,
        those that replace no file at all (their new file is made there, not as rsync's in
        the directory)."""
        names: dict[int, int] = {}
        for st in self.in_ram.values():
            if st[0] == "f":
                names[st[4]] = names.get(st[4], 0) + 1
        held = {e.rel for e in self.held.entries}
        return {
            rel
            for rel in self.listed
            if rel in self.in_ram
            and self.in_ram[rel][0] == "f"
            and names[self.in_ram[rel][4]] == 1
            and (
                rel in held
                or (self.held.place.outside and not os.path.lexists(os.path.join(self.disk, rel)))
            )
        }

    def write(self, runner: Runner = run_command) -> CheckpointResult:
        start = time.monotonic()
        ram, disk = self.ram, self.disk
        data = os.path.join(ram, DATA)
        deleted, _kept = _delete_gone(disk, self.window.before, self.in_ram)
        top = os.lstat(data)
        if top.st_ctime_ns >= since_ns(self.window.since):
            # the directory's own owner and mode (rsync is not given "." above)
            os.chown(disk, top.st_uid, top.st_gid, follow_symlinks=False)
            os.chmod(disk, stat.S_IMODE(top.st_mode))
        totals = {"files": 0, "bytes": 0, "deleted": deleted}
        own = self.own_writes()
        rest = [rel for rel in self.listed if rel not in own]
        placed = place_in_hold(data, self.held.place, rest, self.in_ram)
        totals["files"] += placed.files
        totals["bytes"] += placed.bytes
        rest = [rel for rel in rest if rel not in placed.rels]
        if rest:
            # no --delete: deletions were done above
            argv, result = copy_listed(
                runner,
                ram,
                disk,
                ".rampiped-window",
                rest,
                self.skip,
                "--ignore-missing-args",
                files=any(self.in_ram.get(rel, ("",))[0] == "f" for rel in rest),
            )
            if result.returncode not in (0, 24):
                raise SyncError.from_command(f"write-back of {data} to {disk}", argv, result)
            stats = rsync_stats(result.stdout)
            totals["files"] += stats["files"]
            totals["bytes"] += stats["bytes"]
        if own:
            # RAM's version, then what was appended to the held disk file so far, renamed over
            # the name, then what came in between: a line appended on disk right after the
            # unmount stays before those appended to the new file (rsync, then a merge, put it
            # after them)
            with opened_dir(disk) as disk_fd:
                self.held.write_own(data, disk_fd, sorted(own))
            totals["files"] += len(own)
            totals["bytes"] += sum(self.in_ram[rel][1] for rel in own)
        # what was appended to the replaced files so far goes after RAM's version now, before
        # a process that opens the name anew appends to that version: the order a plain disk
        # would have (the caller's merges carry what comes later, and retry a failure here)
        try:
            self.held.merge()
        except (OSError, SyncError) as exc:
            log.warning("%s: carrying the appends made meanwhile failed (%s); retried", disk, exc)
        pause_point("copy-window:written")
        written = write_databases(data, disk, self.databases, totals, place=self.held.place)
        durable.syncfs(disk)
        missing = []
        for rel in self.listed:
            try:
                ok = kind_letter(os.lstat(os.path.join(disk, rel))) == self.in_ram[rel][0]
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
