"""Carrying directories that did not change from one journal generation into the next.

A checkpoint writes a whole new generation: rsync links every file that did not change to the
last generation's copy. In a pin of 20,000 files that is 20,000 links made and 20,000 removed
with the old generation, megabytes of metadata for a one-file change. A directory none of
whose entries changed since the last generation was taken is moved into the new generation
instead, by one rename, with everything below it: the cost follows the change.

Unchanged is proven, not guessed: every entry below the directory (and the directory itself)
has a ctime older than the moment the last generation was read (the RAM side's own clock,
`Ledger.taken_ns`), and every regular file has the content the last generation holds (the
ledger's digest: a store through a shared mapping changes no ctime).

Why a power cut loses nothing: the new generation is first written without those directories
and synced, a list of them is written (synced), and the new generation is renamed to
`gen-K.carry`, a name that says "complete once the listed directories are in". Only then are
they moved out of the last generation. Every reader of the journal (journal._generations)
first finishes such a generation: it moves what is still in the old one (each rename is
atomic, each directory in one place or the other), restores the times of the directories
that received them, and renames it to `gen-K`."""

from __future__ import annotations

import json
import os
import re
import stat

from rampiped import osutil, tree
from rampiped.commands import SyncError
from rampiped.fsops import _fsync_dir, lstat_at, open_rel, syncfs_checked
from rampiped.ledger import Ledger
from rampiped.ledger import Scan as LedgerScan
from rampiped.pause import pause_point
from rampiped.writeback.names import SCRATCH_NAME

CARRY_RE = re.compile(r"(gen-[0-9]+)\.carry")


def _list_name(gen: str) -> str:
    return f"{gen}.carry.json"


def survey(
    upper: str, ledger: Ledger | None, found: LedgerScan, previous: str | None
) -> tuple[list[str], dict[str, int]]:
    """The topmost directories of the layer `upper` (not its root) that nothing below changed
    since the generation `previous` was read (see the module docstring), at the path and with
    the inode they had then, and that `previous` holds as directories; and the inode of every
    directory of the layer now (for the next ledger). None carried without the ledger's clock
    and directories."""
    limit = ledger.taken_ns if ledger is not None and previous is not None else 0
    dirty: set[str] = {""}
    dirs: dict[str, int] = {}
    for rel, st in tree.walk(upper, tolerate=(OSError,)):
        if rel == SCRATCH_NAME:
            continue  # the pin's own whiteout, never in a generation
        changed = st.st_ctime_ns >= limit
        if stat.S_ISREG(st.st_mode):
            seen = found.get(rel)
            known = None if ledger is None else ledger.digests.get(rel)
            changed = changed or seen is None or known != seen.digest
        if stat.S_ISDIR(st.st_mode):
            dirs[rel] = st.st_ino
            # moved here since, or made anew: another directory than the one there then
            changed = changed or ledger is None or ledger.dirs.get(rel) != st.st_ino
        if changed:  # it and every directory above it (each one marked has its own marked)
            mark = rel if stat.S_ISDIR(st.st_mode) else rel.rpartition("/")[0]
            while mark not in dirty:
                dirty.add(mark)
                mark = mark.rpartition("/")[0]
    out = []
    for rel in dirs:
        if not limit or rel in dirty or rel.rpartition("/")[0] not in dirty:
            continue  # changed, or below a directory carried whole
        try:
            assert previous is not None
            if stat.S_ISDIR(os.lstat(os.path.join(previous, rel)).st_mode):
                out.append(rel)
        except OSError:
            continue
    return sorted(out), dirs


def commit(jfd: int, tmp: str, gen: str, previous: str, dirs: list[str]) -> None:
    """Turn the synced generation `tmp` (written without `dirs`) into `gen`, with `dirs`
    moved in from the generation `previous`; all names relative to the journal `jfd`."""
    times = {}
    for parent in sorted({d.rpartition("/")[0] for d in dirs}):
        st = os.stat(os.path.join(tmp, parent) if parent else tmp, dir_fd=jfd)
        times[parent] = [st.st_atime_ns, st.st_mtime_ns]
    doc = {"from": previous, "dirs": dirs, "times": times}
    osutil.write_atomic_at(jfd, _list_name(gen), json.dumps(doc).encode(), mode=0o600)
    os.rename(tmp, f"{gen}.carry", src_dir_fd=jfd, dst_dir_fd=jfd)
    _fsync_dir(jfd)
    pause_point("checkpoint:carrying")
    finish(jfd, f"{gen}.carry")


def pending(jfd: int) -> list[str]:
    """Generations left to finish (`gen-K.carry`), oldest first."""
    found = [n for n in os.listdir(jfd) if CARRY_RE.fullmatch(n)]
    return sorted(found, key=lambda n: int(n[4:].partition(".")[0]))


def finish(jfd: int, name: str) -> None:
    """Move into the generation `name` (gen-K.carry) each listed directory still in the one it
    comes from, restore the times of their parents, sync, and rename it to gen-K."""
    gen = CARRY_RE.fullmatch(name)
    assert gen is not None
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        list_fd = os.open(_list_name(gen.group(1)), flags, dir_fd=jfd)
        with os.fdopen(list_fd, "rb") as f:
            listing = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise SyncError(
            f"journal generation {name} lacks its list of carried directories ({e})"
        ) from e
    previous, dirs, times = listing["from"], listing["dirs"], listing["times"]
    for rel in dirs:
        parent, _, base = rel.rpartition("/")
        src = open_rel(jfd, os.path.join(previous, parent) if parent else previous)
        dst = open_rel(jfd, os.path.join(name, parent) if parent else name)
        try:
            if dst is None:
                raise SyncError(f"journal generation {name} lacks the directory for {rel}")
            if lstat_at(dst, base) is not None:
                continue  # moved before an interruption
            if src is None or lstat_at(src, base) is None:
                raise SyncError(
                    f"journal generation {name}: {rel} is neither in it nor in {previous}"
                )
            os.rename(base, base, src_dir_fd=src, dst_dir_fd=dst)
            pause_point("checkpoint:carried-one")
        finally:
            for fd in (src, dst):
                if fd is not None:
                    os.close(fd)
    for parent, (atime, mtime) in times.items():
        os.utime(os.path.join(name, parent) if parent else name, ns=(atime, mtime), dir_fd=jfd)
    syncfs_checked(jfd, name)
    os.rename(name, gen.group(1), src_dir_fd=jfd, dst_dir_fd=jfd)
    _fsync_dir(jfd)
    os.unlink(_list_name(gen.group(1)), dir_fd=jfd)
    _fsync_dir(jfd)
