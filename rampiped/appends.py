"""A file that only grew since the last checkpoint is written back by appending its new tail
to the disk copy, not by a new copy of all of it: a log of 100 MiB that got 20 KiB costs 20 KiB.

How "only grew" is known, whatever the file's stamps say (cp -p, tar and rsync -a keep old
mtimes; a store through a shared mapping changes none): the ledger holds the digest and the
size of what the last checkpoint left on disk; the file in RAM is longer, and the digest of
its first `size` bytes, read now, is that digest. Anything else (a rewrite of the old part, a
truncate and regrow, a same-size rewrite, another mode or owner, hard links, the disk copy not
the size the ledger says) is copied whole, as before.

What a power cut leaves: the tail is written at the old end with pwrite; ext4 (data=ordered,
the default) commits the new size only with the data it covers, whenever it commits, so after
a cut the disk file is the old one, or the old one followed by a part of the tail: always a
prefix of what RAM held, never a torn middle and never garbage. Its mtime is set once the tail
is durable; a cut before that leaves the new content with the old mtime, which the next
start's copy-in reads as the file it is.

Few commits: on a filesystem that commits in order (`batched`, durable.commits_in_order) the
tails are not synced one by one. The caller syncs the filesystem once, with everything else
the checkpoint wrote, and then sets the times (`set_times`): one journal commit for all the
tails of a checkpoint, not one each. Elsewhere each tail is fsynced and its times set at once.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rampiped.fsops import open_rel
from rampiped.ledger import Ledger, Seen, open_regular

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Appended:
    rel: str
    old_size: int
    new_size: int
    digest: str  # sha256 of what the disk file holds now
    times_ns: tuple[int, int] = (0, 0)  # RAM's atime and mtime, for the disk copy
    ino: int = 0  # the disk copy's inode
    timed: bool = True  # its times set already (else set_times, after a sync)


def whole_bytes(
    written: int, appended: Iterable[Appended], renamed: Iterable[str], found: Mapping[str, Seen]
) -> int:
    """What a checkpoint that wrote `written` bytes would have written with each changed file
    whole: the tails it appended counted as their whole files, the files it renamed (their new
    names, in `found`) as written too."""
    return (
        written
        + sum(a.old_size for a in appended)
        + sum(found[rel].size for rel in renamed if rel in found)
    )


def candidates(found: Mapping[str, Seen], ledger: Ledger, skip: Iterable[str]) -> dict[str, int]:
    """Files that may only have grown: changed, longer than the disk copy the ledger knows,
    with one name. rel -> the size on disk."""
    left_out = set(skip)
    out = {}
    for rel in ledger.changed(found):
        seen = found.get(rel)
        old = ledger.sizes.get(rel)
        if seen is None or old is None or rel in left_out:
            continue
        if seen.nlink == 1 and seen.size > old > 0:
            out[rel] = old
    return out


def append_grown(
    data: str,
    disk: str,
    grown: dict[str, int],
    ledger: Ledger,
    step: Callable[[str], None] = lambda _name: None,
    *,
    batched: bool = False,
    names: Mapping[str, int] | None = None,
) -> list[Appended]:
    """Append to the disk copy below `disk` the tail of each file of `grown` (rel -> size
    on disk) that only grew in `data`; the others are left for the copy. `step` is told
    after each step of each file (tail:written, tail:synced, times:set). `batched`: no fsync
    and no times (no tail:synced, times:set): the caller syncs the filesystem, then calls
    set_times. `names`: rel -> how many names its disk copy has, where the caller knows
    them all to be its own (writeback/fromlower.py); one elsewhere."""
    out = []
    for rel in sorted(grown):
        links = 1 if names is None else names.get(rel, 1)
        done = _append_one(
            data, disk, rel, grown[rel], ledger.digests.get(rel), step, batched, links
        )
        if done is not None:
            out.append(done)
    return out


def set_times(
    disk: str, appended: Iterable[Appended], step: Callable[[str], None] = lambda _name: None
) -> None:
    """The times of the disk copies that `append_grown(batched=True)` appended to, once their
    tails are durable (after a syncfs of their filesystem); a copy that is no longer the file
    appended to is left alone. `step` is told after each (times:set)."""
    for a in appended:
        if a.timed:
            continue
        parent, _, name = a.rel.rpartition("/")
        dir_fd = open_rel_path(disk, parent)
        if dir_fd is None:
            continue
        try:
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(name, flags, dir_fd=dir_fd)
        except OSError:
            continue
        finally:
            os.close(dir_fd)
        try:
            if os.fstat(fd).st_ino == a.ino:
                os.utime(fd, ns=a.times_ns)
                step("times:set")
        finally:
            os.close(fd)


def _append_one(
    data: str,
    disk: str,
    rel: str,
    old: int,
    want: str | None,
    step: Callable[[str], None],
    batched: bool,
    links: int = 1,
) -> Appended | None:
    parent, _, name = rel.rpartition("/")
    found = open_file(data, rel)
    if found is None:
        return None
    src, sst = found
    try:
        dst_dir = open_rel_path(disk, parent)
        if dst_dir is None:
            return None
        try:
            dst = _open_disk_copy(dst_dir, name, src, sst, old, links)
        finally:
            os.close(dst_dir)
        if dst is None:
            return None
        try:
            h = hashlib.sha256()
            if not hash_range(src, 0, old, h) or h.hexdigest() != want:
                return None  # the old part changed: a new copy
            end = old
            while chunk := os.pread(src, _CHUNK, end):
                written = 0
                while written < len(chunk):
                    written += os.pwrite(dst, chunk[written:], end + written)
                h.update(chunk)
                end += len(chunk)
            step("tail:written")
            times = (sst.st_atime_ns, sst.st_mtime_ns)
            ino = os.fstat(dst).st_ino
            if batched:
                return Appended(rel, old, end, h.hexdigest(), times, ino, timed=False)
            os.fsync(dst)
            step("tail:synced")
            os.utime(dst, ns=times)
            step("times:set")
            return Appended(rel, old, end, h.hexdigest(), times, ino)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _open_disk_copy(
    dir_fd: int, name: str, ram_fd: int, ram: os.stat_result, old: int, links: int = 1
) -> int | None:
    """The disk copy, open for writing, when it is a regular file of `links` names (one, but
    where the caller knows them all), the size the ledger says, with RAM's mode and owner,
    and the same extended attributes; else None."""
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return None
    st = os.fstat(fd)
    same = (
        stat.S_ISREG(st.st_mode)
        and st.st_nlink == links
        and st.st_size == old
        and (st.st_mode, st.st_uid, st.st_gid) == (ram.st_mode, ram.st_uid, ram.st_gid)
        and xattrs(ram_fd) == xattrs(fd)
    )
    if not same:
        os.close(fd)
        return None
    return fd


def xattrs(fd: int) -> dict[str, bytes] | None:
    """The extended attributes that are the file's own: what rsync -X carries, but labels and
    the overlay's own (trusted.overlay.*: a file of the layer has them, the disk file it was
    copied up from has not; an apply drops them, links.py); None when unreadable."""
    try:
        return {
            k: os.getxattr(fd, k)
            for k in os.listxattr(fd)
            if not k.startswith(("security.", "trusted.overlay."))
        }
    except OSError:
        return None


def still_prefix(data: str, done: Appended) -> bool:
    """Whether the disk file `done` left is still a prefix of the file in RAM (it grew on
    while its tail was written, and nothing else): then the next checkpoint appends the rest,
    and it need not be copied again now."""
    found = open_file(data, done.rel)
    if found is None:
        return False
    fd, _st = found
    try:
        h = hashlib.sha256()
        return hash_range(fd, 0, done.new_size, h) and h.hexdigest() == done.digest
    finally:
        os.close(fd)


def hash_range(fd: int, start: int, end: int, h: Any) -> bool:
    """Feed bytes [start, end) of `fd` to `h`; False when the file is shorter now."""
    at = start
    while at < end:
        chunk = os.pread(fd, min(_CHUNK, end - at), at)
        if not chunk:
            return False
        h.update(chunk)
        at += len(chunk)
    return True


def open_file(root: str, rel: str) -> tuple[int, os.stat_result] | None:
    """The regular file `rel` below `root`, open for reading, and its fstat; reached without
    following a symlink. None when there is none."""
    parent, _, name = rel.rpartition("/")
    dir_fd = open_rel_path(root, parent)
    if dir_fd is None:
        return None
    try:
        return open_regular(name, dir_fd)
    finally:
        os.close(dir_fd)


def open_rel_path(root: str, rel: str) -> int | None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_rel(fd, rel)
    finally:
        os.close(fd)


def disk_prefix(data: str, disk: str, rel: str) -> tuple[str, int] | None:
    """(digest, size) of the disk copy of `rel` when it is a prefix of the file in RAM now
    (one name on each side), else None: a file that grew while a checkpoint copied it is then
    on disk as it was at some moment, and the next checkpoint appends the rest instead of this
    one copying it again. Reads the disk copy, which the checkpoint has just written (it is in
    the page cache)."""
    opened: list[int] = []
    try:
        for root in (disk, data):
            found = open_file(root, rel)
            if found is None:
                return None
            opened.append(found[0])
            if found[1].st_nlink != 1:
                return None
        disk_fd, ram_fd = opened
        size = os.fstat(disk_fd).st_size
        on_disk, in_ram = hashlib.sha256(), hashlib.sha256()
        if not hash_range(disk_fd, 0, size, on_disk) or not hash_range(ram_fd, 0, size, in_ram):
            return None
        digest = on_disk.hexdigest()
        return (digest, size) if digest == in_ram.hexdigest() else None
    finally:
        for fd in opened:
            os.close(fd)
