"""What the disk holds of each regular file of a pin's RAM side, known by content.

Whether a file changed is never decided by its size and mtime alone:
- on tmpfs, stores through a shared writable mapping change neither mtime nor ctime once the
  page is mapped writable (tmpfs has no writeback to write-protect it again; a page first read
  is mapped writable at once), so tdb, LMDB with MDB_WRITEMAP and any program that maps its data
  file change files that look untouched;
- `cp -p`, `tar`, `rsync -a`, `dpkg` and `touch -d` put old mtimes on new content of the same
  size, which rsync's quick check (and its --link-dest) takes for the old file.

So each write-back records the content digest of every regular file it leaves on disk (or in
the journal), and the next one reads every regular file of the RAM side (cheap: it is in RAM)
and writes those whose digest differs, whatever their stamps say. The cost is one read of the
RAM side per write-back and a digest per file (sha256: about 1.7 GB/s on the machines this is
tested on); `make bench` reports it.

The record lives in the daemon's memory only. A pin whose record is not known (adopted after a
restart of the daemon) is written back by content comparison once (rsync --checksum, or a full
copy of an overlay layer), which makes the record known again."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rampiped import tree

# An entry's stamp (copywb/snapshot.py): kind letter, size, mtime, ctime, inode
Stamp = tuple[str, int, int, int, int]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Seen:
    """A regular file as a scan found it: its identity and stamps, and its content digest."""

    ino: int
    nlink: int
    size: int
    mtime_ns: int
    ctime_ns: int
    digest: str


Scan = Mapping[str, Seen]


def open_regular(name: str, dir_fd: int | None = None) -> tuple[int, os.stat_result] | None:
    """An fd and the fstat of the regular file `name` (below `dir_fd`), no symlink followed;
    None when there is none: gone, or something else (a symlink, a directory, a device; a
    whiteout on a nodev tmpfs answers EACCES, a fifo ENXIO, never blocking)."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd
        )
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EACCES):
            return None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def digest_file(path: str) -> tuple[os.stat_result, str] | None:
    """The lstat and the sha256 of the regular file at `path` (no symlink followed), or None
    when there is none (gone, or not a regular file)."""
    found = open_regular(path)
    if found is None:
        return None
    fd, st = found
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
        return st, h.hexdigest()
    finally:
        os.close(fd)


def scan(root: str, paths: Iterable[str] | None = None) -> dict[str, Seen]:
    """Every regular file below `root` (or the given relative `paths` only) with its content
    digest. Files that vanish while we look are left out."""
    rels = (
        list(paths)
        if paths is not None
        else [rel for rel, st in tree.walk(root) if stat.S_ISREG(st.st_mode)]
    )
    out: dict[str, Seen] = {}
    for rel in rels:
        found = digest_file(os.path.join(root, rel))
        if found is not None:
            st, digest = found
            out[rel] = Seen(
                st.st_ino, st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest
            )
    return out


def scan_stamps(root: str) -> dict[str, Seen]:
    """Every regular file below `root` with its identity and stamps, nothing read (no
    digest): for a caller that can tell changes by ctime (see journal.checkpoint)."""
    return {
        rel: Seen(st.st_ino, st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ctime_ns, "")
        for rel, st in tree.walk(root, tolerate=(FileNotFoundError,))
        if stat.S_ISREG(st.st_mode)
    }


@dataclass
class Ledger:
    """rel -> digest of the content the disk (or the journal) holds for that RAM file, and
    its size (see appends.py: a file that only grew gets its tail appended)."""

    digests: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    # the RAM file's inode then (see renames.py: a file renamed in RAM keeps its inode)
    inodes: dict[str, int] = field(default_factory=dict)
    # the RAM side's clock (ns) before the write-back this ledger describes read anything: an
    # entry whose ctime is older is as it was then (0: not known; see writeback/carry.py)
    taken_ns: int = 0
    # the RAM side's directories then: rel -> inode (a directory moved in keeps its own)
    dirs: dict[str, int] = field(default_factory=dict)
    # a copy pin's entries that the disk holds as they were: rel -> stamp (copywb/snapshot.py)
    # of each entry its checkpoint wrote or found equal and that held still while it ran;
    # None: not known, the next checkpoint looks at every entry (copywb/checkpoint.py)
    entries: Mapping[str, Stamp] | None = None
    # an overlay journal's files that are the disk's own file below the overlay: rel -> its
    # name there (writeback/fromlower.py)
    below: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, found: Scan) -> Ledger:
        out = cls()
        for rel, seen in found.items():
            out.record(rel, seen.digest, seen.size, seen.ino)
        return out

    def record(self, rel: str, digest: str, size: int, ino: int | None = None) -> None:
        self.digests[rel] = digest
        self.sizes[rel] = size
        if ino is not None:
            self.inodes[rel] = ino
        else:
            self.inodes.pop(rel, None)

    def moved(self, pairs: Mapping[str, str]) -> Ledger:
        """This ledger with the entries of each old name (value) under its new name (key): what
        the disk holds once those files were renamed there (renames.py)."""
        out = Ledger(
            dict(self.digests),
            dict(self.sizes),
            dict(self.inodes),
            self.taken_ns,
            self.dirs,
            self.entries,
            dict(self.below),
        )
        for new, old in pairs.items():
            out.digests[new] = self.digests[old]
            out.sizes[new] = self.sizes[old]
            out.inodes[new] = self.inodes[old]
        return out

    def changed(self, found: Scan) -> list[str]:
        """Files of `found` whose content is not what the disk holds for them (or that the
        disk has no record of), with every other name of their hard-link groups (rsync -H
        links only names copied together)."""
        out = {rel for rel, seen in found.items() if self.digests.get(rel) != seen.digest}
        return sorted(with_links(found, out))


def settled(found: Scan, root: str, now: Mapping[str, Stamp] | None = None) -> Ledger:
    """The ledger after a write-back that read `root` from the moment `found` was taken: files
    whose stamps moved since then are left out (they changed while being copied, or vanished
    or changed type, which rsync reports and skips), so the next write-back copies them.
    `now`: the stamps of `root` taken after the write-back read it (copywb/snapshot.py:
    kind, size, mtime, ctime, inode), instead of a stat of each file here."""
    out = Ledger()
    for rel, seen in found.items():
        if now is not None:
            if now.get(rel) == ("f", seen.size, seen.mtime_ns, seen.ctime_ns, seen.ino):
                out.record(rel, seen.digest, seen.size, seen.ino)
            continue
        try:
            st = os.lstat(os.path.join(root, rel))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        ) == (seen.ino, seen.size, seen.mtime_ns, seen.ctime_ns):
            out.record(rel, seen.digest, seen.size, seen.ino)
    return out


def with_links(found: Scan, rels: Iterable[str]) -> set[str]:
    """`rels` and every other name of `found` that shares an inode with one of them."""
    chosen = set(rels)
    linked = {found[rel].ino for rel in chosen if rel in found and found[rel].nlink > 1}
    if linked:
        chosen |= {rel for rel, seen in found.items() if seen.ino in linked}
    return chosen
