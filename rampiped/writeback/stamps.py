"""What a disk file was before a write-back replaced it (stamps and digests)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from rampiped.fsops import (
    at_rel,
    common_prefix,
    join,
    lstat_at,
    open_dir_at,
    open_rel,
    opened_dir,
    read_at,
)
from rampiped.ledger import open_regular
from rampiped.writeback import attrdoc
from rampiped.writeback.layer import Layer, scan_layer

_HELD_INDEX = "held.json"
# the first save of a hold's index (HeldFiles._save)
INDEX_ATTRIBUTE = "trusted.rampiped.held"


_HELD_VERSION = 1


# File timestamps come from the kernel's coarse clock, which may lag the wall clock by a tick
# (1 to 10 ms); a change right after a moment t can therefore carry a ctime slightly before t.
CLOCK_SLACK_NS = 100_000_000


# Files up to this size are compared whole (sha256) to tell an append from a rewrite; larger
# ones by their first and last _EDGE bytes before the old end, which an append leaves alone
# and a rewrite almost always changes.
_FULL_DIGEST_MAX = 1 << 20


_EDGE = 64 << 10


@dataclass(frozen=True)
class Stamp:
    """A disk file that the apply replaces, as it was before the unmount. ino 0: there was no
    file at that name (the RAM layer created it); ino -1: not known (it changed meanwhile)."""

    source: str  # where it is on disk before the apply (differs under renamed directories)
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    digest: str


def _digest_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    spans = [(0, size)] if size <= _FULL_DIGEST_MAX else [(0, _EDGE), (size - _EDGE, _EDGE)]
    for offset, length in spans:
        h.update(read_at(fd, length, offset))
    return h.hexdigest()


def _stamp_at(dir_fd: int, name: str, source: str, *, read: bool = True) -> Stamp | None:
    """The stamp of the regular file `name`; without `read`, its digest is to be taken from
    the layer's copy once it is needed (see _with_layer_digests)."""
    found = open_regular(name, dir_fd)
    if found is None:
        return None
    fd, st = found
    try:
        return Stamp(
            source,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            _digest_fd(fd, st.st_size) if read else _DIGEST_FROM_LAYER,
        )
    finally:
        os.close(fd)


_ABSENT_DIGEST = hashlib.sha256(b"").hexdigest()


# touched_entries: a disk file not in the layer yet, its digest to be taken from the layer
_DIGEST_FROM_LAYER = "from-layer"


def _replaced_files(layer: Layer) -> Iterator[tuple[str, str, str]]:
    """(rel, source on disk, kind in the layer) of every regular file or symlink of the layer
    that can replace a disk entry: its directory has lower content."""
    for rel, d in layer.dirs.items():
        if d.lower is None:
            continue
        for name, kind in d.children.items():
            if kind in ("file", "symlink"):
                yield join(rel, name), join(d.lower, name), kind


def stamp_of(root: str, rel: str) -> Stamp | None:
    """The stamp of the regular file `rel` below `root` (no symlink followed on the way),
    or None when there is none."""
    with opened_dir(root) as root_fd:
        return at_rel(root_fd, rel, lambda pfd, name: _stamp_at(pfd, name, rel))


def shared_stamp(root: str, rel: str, copy: str) -> Stamp | None:
    """The stamp of the regular file `rel` below `root` cut to the bytes it shares, from its
    start, with the regular file `copy` (RAM's copy of it). A write-back that takes this as the
    disk file's state before it keeps what the disk file holds beyond those bytes: appended to
    RAM's version, or as a conflict file. None when `rel` is not a regular file."""
    found = _shared(root, rel, copy)
    return None if found is None else found[0]


def is_prefix(root: str, rel: str, copy: str) -> bool:
    """Whether the regular file `rel` below `root` holds only the first bytes of the regular
    file `copy` (False when either is something else)."""
    found = _shared(root, rel, copy)
    return found is not None and found[2] and found[0].size == found[1]


def _shared(root: str, rel: str, copy: str) -> tuple[Stamp, int, bool] | None:
    """shared_stamp, the file's whole size, and whether `copy` is a regular file."""

    def at(pfd: int, name: str) -> tuple[Stamp, int, bool] | None:
        found = open_regular(name, pfd)
        if found is None:
            return None
        fd, st = found
        try:
            other = open_regular(copy)
            shared = 0
            if other is not None:
                try:
                    shared = _shared_length(fd, other[0], min(st.st_size, other[1].st_size))
                finally:
                    os.close(other[0])
            stamp = Stamp(
                rel, st.st_ino, shared, st.st_mtime_ns, st.st_ctime_ns, _digest_fd(fd, shared)
            )
            return stamp, st.st_size, other is not None
        finally:
            os.close(fd)

    with opened_dir(root) as root_fd:
        return at_rel(root_fd, rel, at)


def _shared_length(a_fd: int, b_fd: int, limit: int, chunk: int = 1 << 20) -> int:
    """How many bytes, from the start, two files hold alike (up to `limit`)."""
    done = 0
    while done < limit:
        n = min(chunk, limit - done)
        a, b = read_at(a_fd, n, done), read_at(b_fd, n, done)
        same = common_prefix(a, b)
        done += same
        if same < n or len(a) < n or len(b) < n:
            break
    return done


def touched_entries(upper: str, lower: str, *, read: bool = True) -> dict[str, Stamp]:
    """Before the unmount (the overlay still mounted, its lower unchanging): the disk files
    that applying `upper` will replace, keyed by their path in the layer. Regular files of the
    layer with no disk file at their name get an absent stamp (ino 0). Entries that vanish
    while the layer is read are skipped (the apply's own scan is authoritative). Without
    `read`, no disk file is read: each digest is taken from the layer's copy when it is held
    (right after an early write-back, the disk file and that copy are the same, unless RAM
    changed it in the last moment, when a disk write to it is kept as a conflict file)."""
    layer = scan_layer(upper)
    out: dict[str, Stamp] = {}
    with opened_dir(lower) as lower_fd:
        for rel, source, kind in _replaced_files(layer):
            parent, _, name = source.rpartition("/")
            pfd = open_rel(lower_fd, parent)
            if pfd is None:
                found = None
            else:
                try:
                    found = _stamp_at(pfd, name, source, read=read)
                    exists = lstat_at(pfd, name) is not None
                finally:
                    os.close(pfd)
            if found is not None:
                out[rel] = found
            elif kind == "file" and (pfd is None or not exists):
                out[rel] = Stamp(source, 0, 0, 0, 0, _ABSENT_DIGEST)
        # A disk file beside those that is not in the layer yet may be copied up between this
        # scan and the unmount, and written on disk right after it: record what it is now
        # (nothing writes a mounted lower); its digest is taken from the layer's copy, once
        # the layer is unmounted (HeldFiles.hold)
        for rel, d in layer.dirs.items():
            if d.lower is None:
                continue
            pfd = open_rel(lower_fd, d.lower)
            if pfd is None:
                continue
            try:
                for name in os.listdir(pfd):
                    if name in d.children:
                        continue
                    st = lstat_at(pfd, name)
                    if st is not None and stat.S_ISREG(st.st_mode):
                        out[join(rel, name)] = Stamp(
                            join(d.lower, name),
                            st.st_ino,
                            st.st_size,
                            st.st_mtime_ns,
                            st.st_ctime_ns,
                            _DIGEST_FROM_LAYER,
                        )
            finally:
                os.close(pfd)
    return out


def _with_layer_digests(
    upper: str, snapshot: dict[str, Stamp], rels: list[str]
) -> dict[str, Stamp]:
    """`snapshot` with the digest of each of `rels` that was recorded without one (copied up
    after touched_entries looked) taken from the layer's copy: the copy-up copied the disk
    file as it was, so when RAM only appended to it, its first `size` bytes are the disk's.
    When the copy is shorter than that (RAM truncated it) the stamp is dropped: unknown."""
    out = dict(snapshot)
    with opened_dir(upper) as upper_fd:
        for rel in rels:
            base = out.get(rel)
            if base is None or base.digest != _DIGEST_FROM_LAYER:
                continue
            del out[rel]
            found = at_rel(upper_fd, rel, lambda pfd, name: open_regular(name, pfd))
            if found is None:
                continue
            fd, st = found
            try:
                if st.st_size >= base.size:
                    out[rel] = dataclasses.replace(base, digest=_digest_fd(fd, base.size))
            finally:
                os.close(fd)
    return out


def _read_index(parent_fd: int, name: str) -> bytes:
    """The hold's index: its file, written by every save but the first, else the first,
    in the hold directory's attribute (INDEX_ATTRIBUTE); FileNotFoundError without either."""
    hold_fd = open_dir_at(parent_fd, name)
    try:
        try:
            fd = os.open(_HELD_INDEX, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=hold_fd)
        except FileNotFoundError:
            data = None
        else:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        if not data:
            data = attrdoc.get(hold_fd, INDEX_ATTRIBUTE) or data
    finally:
        os.close(hold_fd)
    if data is None:
        raise FileNotFoundError(_HELD_INDEX)
    return data
