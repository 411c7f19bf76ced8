"""A checkpoint's generation made of the last one, with only what changed replaced.

A checkpoint wrote a whole new generation: rsync linked every file that did not change to the
last generation's copy. In a pin of 20,000 files that was 20,000 links made and 20,000 removed
with the old generation, megabytes of metadata for a one-file change. Now a directory none of
whose entries changed since the last generation was read is left out of the new part, and the
new generation is the last one with the rest of the new part put in place: the cost follows
the change.

Unchanged is proven, not guessed (`survey`): every entry below the directory (and the
directory itself) has a ctime older than the moment the last generation was read (the RAM
side's own clock, `Ledger.taken_ns`), every regular file has the content the last generation
holds (the ledger's digest: a store through a shared mapping changes no ctime), and the
directory is the one that was at that path then (its inode: moving directories sets the
ctime of the one moved, not of what is below it).

The plan (`_plan`): the directories above a kept one are merged entry by entry (each keeps
its place; its attributes and times are set from the new part); in them every entry is
replaced by the new part's, unless it is kept, or the same file on both sides (rsync linked
it); every other directory is replaced whole.

Why a power cut loses nothing: the new part is written and synced first, then the plan (which
entries to replace, which directories to merge, their times) is written and synced, and the
new part is renamed `gen-K.carry`: from then on the generation is "the last one once this
plan is carried out". Every reader of the journal (journal._generations) first carries out
such a plan: each replaced entry is moved aside into `gen-K.trash` and the new one moved in,
each step done once (a step's own traces say whether it was: the entry in the trash, the new
one gone from the new part), then everything is synced and the last generation renamed
`gen-K`."""

from __future__ import annotations

import json
import os
import re
import stat

from rampiped import durable, osutil, tree
from rampiped.commands import SyncError
from rampiped.fsops import (
    _fsync_dir,
    copy_dir_attrs,
    join,
    lstat_at,
    open_rel,
    opened_dir,
    ordered_at,
    remove_at,
)
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
    directory of the layer now (for the next ledger). None kept without the ledger's clock
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
    out: list[str] = []
    if not limit:
        return out, dirs
    assert previous is not None
    with opened_dir(previous) as pfd:
        for rel in dirs:
            if rel in dirty or rel.rpartition("/")[0] not in dirty:
                continue  # changed, or below a directory kept whole
            fd = open_rel(pfd, rel)  # a real directory there, reached without a symlink
            if fd is not None:
                os.close(fd)
                out.append(rel)
    return sorted(out), dirs


def commit(jfd: int, tmp: str, gen: str, previous: str, kept: list[str]) -> None:
    """Turn the synced generation `tmp` (written without the directories `kept`) and the
    generation `previous` into `gen`: `previous` keeps `kept` and gets the rest of `tmp`, then
    is renamed `gen` (see the module docstring). All names are relative to the journal `jfd`."""
    ops, merged = _plan(jfd, tmp, previous, kept)
    times = {}
    for rel in merged:  # read before anything is moved out of them
        st = os.stat(os.path.join(tmp, rel) if rel else tmp, dir_fd=jfd)
        times[rel] = [st.st_atime_ns, st.st_mtime_ns]
    doc = {"from": previous, "ops": ops, "merged": times}
    # where the journal commits in order, the plan's rename is committed with the one below:
    # never the renamed generation without its plan
    ordered = durable.fsync_commits_all(f"/proc/self/fd/{jfd}")
    data = json.dumps(doc).encode()
    osutil.write_atomic_at(jfd, _list_name(gen), data, mode=0o600, ordered=ordered, commit=False)
    os.rename(tmp, f"{gen}.carry", src_dir_fd=jfd, dst_dir_fd=jfd)
    _fsync_dir(jfd)
    pause_point("checkpoint:carrying")
    finish(jfd, f"{gen}.carry")


def _plan(
    jfd: int, new: str, previous: str, kept: list[str]
) -> tuple[list[tuple[str, bool, bool]], list[str]]:
    """What turns `previous` into the new generation: each entry to replace (rel, whether
    `previous` has one there, whether `new` has one), and the directories merged entry by
    entry (those with a kept directory below them), parents first. An entry that is the same
    regular file on both sides (rsync linked it) is left alone."""
    above = {""}
    for rel in kept:
        while rel:
            rel = rel.rpartition("/")[0]
            above.add(rel)
    kept_set = set(kept)
    ops: list[tuple[str, bool, bool]] = []
    merged: list[str] = []

    def at(root: str, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(os.path.join(root, rel), dir_fd=jfd) if rel else None
        except FileNotFoundError:
            return None

    def visit(x: str) -> None:
        merged.append(x)
        names = _names(jfd, os.path.join(new, x) if x else new)
        names |= _names(jfd, os.path.join(previous, x) if x else previous)
        for name in sorted(names):
            rel = join(x, name)
            if rel in kept_set:
                continue
            n, p = at(new, rel), at(previous, rel)
            if rel in above and n is not None and stat.S_ISDIR(n.st_mode):
                visit(rel)  # (a directory in `previous` too: it holds a kept one)
            elif not (
                n is not None
                and p is not None
                and stat.S_ISREG(n.st_mode)
                and (n.st_dev, n.st_ino) == (p.st_dev, p.st_ino)
            ):
                ops.append((rel, p is not None, n is not None))

    visit("")
    return ops, merged


def _names(jfd: int, rel: str) -> set[str]:
    fd = open_rel(jfd, rel)  # no symlink followed
    if fd is None:
        raise SyncError(f"journal: {rel} is not a directory")
    try:
        return set(os.listdir(fd))
    finally:
        os.close(fd)


def pending(jfd: int) -> list[str]:
    """Generations left to finish (`gen-K.carry`), oldest first."""
    found = [n for n in os.listdir(jfd) if CARRY_RE.fullmatch(n)]
    return sorted(found, key=lambda n: int(n[4:].partition(".")[0]))


def finish(jfd: int, name: str) -> None:
    """Carry out the plan of the generation `name` (gen-K.carry) on the one it names: each
    entry to replace moved aside into gen-K.trash (if not yet) and the new one moved in (if
    not yet), the merged directories given the new attributes and times; sync; rename it
    gen-K; remove what is left. Each step is done once, also when this runs again after an
    interruption."""
    found = CARRY_RE.fullmatch(name)
    assert found is not None
    gen = found.group(1)
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        list_fd = os.open(_list_name(gen), flags, dir_fd=jfd)
        with os.fdopen(list_fd, "rb") as f:
            plan = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise SyncError(f"journal generation {name} lacks its plan ({e})") from e
    previous, trash = plan["from"], f"{gen}.trash"
    if lstat_at(jfd, previous) is not None:
        if lstat_at(jfd, trash) is None:
            os.mkdir(trash, 0o700, dir_fd=jfd)
        for i, (rel, had_old, has_new) in enumerate(plan["ops"]):
            _replace(jfd, name, previous, trash, i, rel, had_old, has_new)
            if i == 0:
                pause_point("checkpoint:carried-one")
        for rel in reversed(plan["merged"]):  # children first: their times stay
            src = os.path.join(name, rel) if rel else name
            dst = os.path.join(previous, rel) if rel else previous
            _copy_attrs(jfd, src, dst, tuple(plan["merged"][rel]))
        # the moves before the rename (the new part's data was durable already)
        ordered_at(jfd, previous, previous)
        os.rename(previous, gen, src_dir_fd=jfd, dst_dir_fd=jfd)
        _fsync_dir(jfd)
    elif lstat_at(jfd, gen) is None:
        raise SyncError(f"journal generation {name}: neither {previous} nor {gen} is there")
    for leftover in (trash, name):
        if lstat_at(jfd, leftover) is not None:
            remove_at(jfd, leftover)
    os.unlink(_list_name(gen), dir_fd=jfd)
    _fsync_dir(jfd)


def _replace(
    jfd: int, new: str, previous: str, trash: str, i: int, rel: str, had_old: bool, has_new: bool
) -> None:
    parent, _, base = rel.rpartition("/")
    pfd = open_rel(jfd, os.path.join(previous, parent) if parent else previous)
    nfd = open_rel(jfd, os.path.join(new, parent) if parent else new)
    tfd = open_rel(jfd, trash)
    try:
        if pfd is None or nfd is None or tfd is None:
            raise SyncError(f"journal generation {new}: the directory of {rel} is missing")
        in_new = lstat_at(nfd, base) is not None
        aside = had_old and lstat_at(tfd, str(i)) is None and (in_new or not has_new)
        if aside and lstat_at(pfd, base) is not None:  # (not yet moved aside)
            os.rename(base, str(i), src_dir_fd=pfd, dst_dir_fd=tfd)
        if has_new and in_new:
            os.rename(base, base, src_dir_fd=nfd, dst_dir_fd=pfd)
    finally:
        for fd in (pfd, nfd, tfd):
            if fd is not None:
                os.close(fd)


def _copy_attrs(jfd: int, src: str, dst: str, times: tuple[int, int]) -> None:
    """copy_dir_attrs from the directory `src` onto `dst`, both reached from the journal
    without following a symlink."""
    s_fd, d_fd = open_rel(jfd, src), open_rel(jfd, dst)
    try:
        if s_fd is None or d_fd is None:
            raise SyncError(f"journal: {src} or {dst} is not a directory")
        copy_dir_attrs(s_fd, d_fd, times=times)
    finally:
        for fd in (s_fd, d_fd):
            if fd is not None:
                os.close(fd)
