"""A checkpoint's files taken from the directory below the overlay, not copied again.

The first append to a log that is on the disk copies it into the upper layer whole, and so does
a rename of a file that is on the disk only (logrotate's app.log.1 -> app.log.2). Copied into
the journal as such, every byte of it would reach the disk a second time. When the journal and
the directory are on one mount, the checkpoint links the disk's own file into the generation
instead (its inode: no data written) and appends the tail the layer added to it, the way a
file that only grew since the last generation gets its tail (appends.py).

Which files: those the journal holds no copy of yet and that the overlay copied up from the
disk (they carry its origin attribute; a file made through the overlay has none).

Why the directory's view does not change: the disk file is taken only where the layer holds an
entry at its name (the file itself, another file or a whiteout), so the overlay never shows it
again while mounted, and only when no directory of the layer is redirected (a renamed
directory reads the one below it by its old name). Why the generation is still what the layer
held: the disk file's content is read and must be, byte for byte, the first part of the
layer's file (all of it, for a renamed one), with the same mode, owner and extended
attributes; it must have one name (no other name changes with it), and the pin must have no
process that wrote the disk below it (late_bases: such a process could write it still). From
then on the disk file is the generation's copy: nothing but a checkpoint writes it, by an
append, and an apply puts that very inode in place (a name that shows it already is left
alone, links.py).

What a power cut leaves: the generation is complete only once renamed, as always; the tail of
a disk file is appended after its link, so a cut leaves the disk file a prefix of the layer's,
under its name below the overlay: what the directory held before, or longer (the documented
"a file that only grew may be longer")."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from rampiped import appends, durable, tree
from rampiped.appends import hash_range, xattrs
from rampiped.fsops import lstat_at, open_rel
from rampiped.ledger import Ledger, Seen, open_regular
from rampiped.writeback.links import LinkRoute, opened_at, same_dir
from rampiped.writeback.origins import REDIRECT_XATTR

ORIGIN_XATTR = "trusted.overlay.origin"
# to find the disk file a file renamed in the layer was: at most LOOKS others of its directory
# have their first HEAD bytes compared, and TRIES of those are read whole
LOOKS = 16
TRIES = 4
HEAD = 4096


@dataclass(frozen=True)
class Below:
    """The directory below a mounted overlay and the pin's journal, both below one private
    copy of their mount (link(2) does not cross mounts)."""

    root_fd: int
    journal: str  # the journal, relative to root_fd
    target: str  # the directory below the overlay, relative to root_fd ("" for the root)


@dataclass(frozen=True)
class Source:
    """The disk file a file of the layer is taken from."""

    lower: str  # its name below the overlay, relative to the directory
    size: int  # its size: the layer's file holds it as its first `size` bytes
    digest: str  # sha256 of its content
    ino: int


def reached(route: LinkRoute | None, journal: str, lower: str) -> Below | None:
    """`route` (to a generation of the journal at `journal`) as where the journal and the
    directory below the overlay (reached at `lower` outside the mount's copy, the staging
    bind) are; None when it does not reach both (links.same_dir)."""
    if route is None:
        return None
    found = LinkRoute(route.root_fd, os.path.dirname(route.source), route.target)
    if not same_dir(found, journal, lower):
        return None
    return Below(found.root_fd, found.source, found.target)


def pick(
    upper: str, found: Mapping[str, Seen], rels: Iterable[str], below: Below
) -> dict[str, Source]:
    """For each file `rels` of the layer that can be taken from the disk file below it (the
    module's rules), that file: at the same name, whose content is its first part; else
    one at another name of the same directory, covered by the layer, with its whole content
    and times. Reads the disk files compared."""
    wanted = sorted(
        rel
        for rel in rels
        if rel in found and found[rel].nlink == 1 and _copied_up(os.path.join(upper, rel))
    )
    if not wanted or _redirected(upper):
        return {}
    out: dict[str, Source] = {}
    look = _Look(upper, set(), {}, {})
    with opened_at(below.root_fd, below.target) as lower_root:
        for rel in wanted:
            parent = rel.rpartition("/")[0]
            lower_dir = open_rel(lower_root, parent) if parent else os.dup(lower_root)
            if lower_dir is None:
                continue
            try:
                got = look.source(rel, found[rel], lower_dir)
            finally:
                os.close(lower_dir)
            if got is not None:
                look.used.add(got.ino)
                out[rel] = got
    return out


@dataclass
class _Look:
    """What one `pick` has read of the disk below."""

    upper: str
    used: set[int]  # disk files taken already (one generation name each)
    digests: dict[int, str]  # inode -> sha256 of the disk files read
    # directory -> size -> the names there of files of that size that the layer covers
    by_size: dict[str, dict[int, list[str]]]

    def source(self, rel: str, seen: Seen, lower_dir: int) -> Source | None:
        parent, _, name = rel.rpartition("/")
        opened = open_regular(os.path.join(self.upper, rel))
        if opened is None:
            return None
        ram_fd, ram = opened
        try:
            if (ram.st_ino, ram.st_size) != (seen.ino, seen.size):
                return None  # changed since the scan: copied
            if not _copied_up(ram_fd):
                return None  # made in the layer: the disk has nothing of it
            ram_attrs = xattrs(ram_fd)
            head = os.pread(ram_fd, HEAD, 0)
            for n in self.names(parent, name, seen.size, lower_dir, head):
                st = lstat_at(lower_dir, n)
                if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    continue
                if st.st_ino in self.used or (st.st_mode, st.st_uid, st.st_gid) != (
                    ram.st_mode,
                    ram.st_uid,
                    ram.st_gid,
                ):
                    continue
                if st.st_size > seen.size:
                    continue
                got = _read(lower_dir, n, st, ram_attrs, self.digests)
                if got is None:
                    continue
                digest, size = got
                if size == seen.size:
                    same = digest == seen.digest
                else:
                    h = hashlib.sha256()
                    same = hash_range(ram_fd, 0, size, h) and h.hexdigest() == digest
                if same:
                    return Source(f"{parent}/{n}" if parent else n, size, digest, st.st_ino)
            return None
        finally:
            os.close(ram_fd)

    def names(
        self, parent: str, name: str, size: int, lower_dir: int, head: bytes
    ) -> Iterator[str]:
        """The disk's names to try for the layer's file `parent/name` of `size` bytes that
        begins with `head`: its own, then others (the directory read only then) that the layer
        covers, of that size first, then shorter ones, longest first, whose first bytes are
        those: a few of them (a renamed file, a file appended to and renamed)."""
        yield name
        sizes = self.sized(parent, lower_dir)
        others = [
            n
            for k in sorted((k for k in sizes if k <= size), key=lambda k: (k != size, -k))
            for n in sizes[k]
            if n != name
        ]
        tries = 0
        for n in others[:LOOKS]:
            if _begins(lower_dir, n, head):
                yield n
                tries += 1
                if tries == TRIES:
                    return

    def sized(self, parent: str, lower_dir: int) -> dict[int, list[str]]:
        """The regular files of one name in the disk's directory `parent` that the layer
        covers, by size (read once per pick)."""
        if parent not in self.by_size:
            sizes: dict[int, list[str]] = {}
            for n in sorted(_listdir(lower_dir)):
                st = lstat_at(lower_dir, n)
                if (
                    st is not None
                    and stat.S_ISREG(st.st_mode)
                    and st.st_nlink == 1
                    and _covered(self.upper, parent, n)
                ):
                    sizes.setdefault(st.st_size, []).append(n)
            self.by_size[parent] = sizes
        return self.by_size[parent]


def _open_read(dir_fd: int, name: str) -> int | None:
    """The disk file `name` open for reading, no symlink followed; None when it cannot be."""
    try:
        return os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd
        )
    except OSError:
        return None


def _begins(dir_fd: int, name: str, head: bytes) -> bool:
    """Whether the disk file `name` begins as `head` does (as far as either goes)."""
    fd = _open_read(dir_fd, name)
    if fd is None:
        return False
    try:
        got = os.pread(fd, len(head), 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    n = min(len(got), len(head))
    return got[:n] == head[:n]


def _read(
    dir_fd: int,
    name: str,
    st: os.stat_result,
    ram_attrs: dict[str, bytes] | None,
    digests: dict[int, str],
) -> tuple[str, int] | None:
    """(sha256, size) of the disk file `name` when it is still the inode `st` and has the
    extended attributes `ram_attrs`; else None."""
    fd = _open_read(dir_fd, name)
    if fd is None:
        return None
    try:
        now = os.fstat(fd)
        if (now.st_ino, now.st_size) != (st.st_ino, st.st_size) or xattrs(fd) != ram_attrs:
            return None
        if st.st_ino not in digests:
            h = hashlib.sha256()
            if not hash_range(fd, 0, st.st_size, h):
                return None
            digests[st.st_ino] = h.hexdigest()
        return digests[st.st_ino], st.st_size
    finally:
        os.close(fd)


def take(
    upper: str, gen_path: str, gen: str, below: Below, picked: dict[str, Source]
) -> tuple[list[appends.Appended], list[str]]:
    """Link the disk files `picked` into the generation being written (`gen`, its name in the
    journal, at `gen_path`) and append what the
    layer added to each (fromlower.py). Returns what was taken so, and the files left to
    copy (their link, if made, removed again)."""
    linked = link(below, gen, picked)
    taken = appends.append_grown(
        upper,
        gen_path,
        {rel: src.size for rel, src in linked.items()},
        Ledger(digests={rel: src.digest for rel, src in linked.items()}),
        batched=durable.commits_in_order(gen_path),
        names=dict.fromkeys(linked, 2),
    )
    left = sorted(set(picked) - {a.rel for a in taken})
    for rel in left:
        if rel in linked:  # the disk file, not what the layer holds: not in the generation
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(gen_path, rel))
    return taken, left


def unchanged(
    ledger: Ledger, found: Mapping[str, Seen], carried: Iterable[str], skip: set[str]
) -> dict[str, str]:
    """The files of the last generation that are the disk's own below the overlay and that
    did not change since (rel -> rel), outside the directories `carried` and `skip`: the
    new generation links them by name."""
    tops = tuple(f"{d}/" for d in carried)
    return {
        rel: rel
        for rel in ledger.below
        if rel not in skip
        and rel in found
        and ledger.digests.get(rel) == found[rel].digest
        and not rel.startswith(tops)
    }


def still_below(
    below: Below,
    gen: str,
    held: Ledger,
    ledger: Ledger | None,
    moved: dict[str, str],
    picked: dict[str, Source],
    taken: list[appends.Appended],
) -> dict[str, str]:
    """The files of the generation `gen` that are still the disk file below the overlay they
    were taken from, now or by an earlier checkpoint (rel -> its name there), and that the
    new ledger knows: their next tail is appended to that file."""
    pairs = {a.rel: picked[a.rel].lower for a in taken}
    if ledger is not None:
        gone = set(moved.values())
        pairs.update((rel, lower) for rel, lower in ledger.below.items() if rel not in gone)
        pairs.update((new, ledger.below[old]) for new, old in moved.items() if old in ledger.below)
    pairs = {rel: lower for rel, lower in pairs.items() if rel in held.digests}
    return still_shared(below, gen, pairs) if pairs else {}


def link(below: Below, gen: str, picked: Mapping[str, Source]) -> dict[str, Source]:
    """Link each picked disk file into the generation being written (`gen`: its directory's
    name in the journal) under the layer's name; the ones linked (the others are to be
    copied: gone, replaced, or their directory not in the generation)."""
    done: dict[str, Source] = {}
    with (
        opened_at(below.root_fd, below.target) as lower_root,
        opened_at(below.root_fd, os.path.join(below.journal, gen)) as gen_root,
    ):
        for rel, src in sorted(picked.items()):
            sparent, _, sname = src.lower.rpartition("/")
            dparent, _, dname = rel.rpartition("/")
            sfd = open_rel(lower_root, sparent) if sparent else os.dup(lower_root)
            dfd = open_rel(gen_root, dparent) if dparent else os.dup(gen_root)
            try:
                if sfd is None or dfd is None or lstat_at(dfd, dname) is not None:
                    continue
                st = lstat_at(sfd, sname)
                if st is None or (st.st_ino, st.st_nlink, st.st_size) != (src.ino, 1, src.size):
                    continue
                os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                linked = lstat_at(dfd, dname)
                if linked is None or linked.st_ino != src.ino:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(dname, dir_fd=dfd)
                    continue
                done[rel] = src
            finally:
                for fd in (sfd, dfd):
                    if fd is not None:
                        os.close(fd)
    return done


def still_shared(below: Below, gen: str, pairs: Mapping[str, str]) -> dict[str, str]:
    """Of `pairs` (a file of the generation `gen` -> the disk file below the overlay it was
    taken from), those that are still that disk file: the same inode, with these two names
    only. The others are to be copied when they change."""
    out = {}
    with (
        opened_at(below.root_fd, below.target) as lower_root,
        opened_at(below.root_fd, os.path.join(below.journal, gen)) as gen_root,
    ):
        for rel, lower in pairs.items():
            a = _lstat_rel(gen_root, rel)
            b = _lstat_rel(lower_root, lower)
            if (
                a is not None
                and b is not None
                and stat.S_ISREG(a.st_mode)
                and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
                and a.st_nlink == 2
            ):
                out[rel] = lower
    return out


def _lstat_rel(root_fd: int, rel: str) -> os.stat_result | None:
    parent, _, name = rel.rpartition("/")
    fd = open_rel(root_fd, parent) if parent else os.dup(root_fd)
    if fd is None:
        return None
    try:
        return lstat_at(fd, name)
    finally:
        os.close(fd)


def _copied_up(file: int | str) -> bool:
    """Whether the layer's file (an fd, or a path: no symlink followed) was copied up from
    the disk below (the overlay records its origin then; a file made through the overlay has
    none)."""
    try:
        if isinstance(file, int):
            os.getxattr(file, ORIGIN_XATTR)
        else:
            os.getxattr(file, ORIGIN_XATTR, follow_symlinks=False)
    except OSError:
        return False
    return True


def _covered(upper: str, parent: str, name: str) -> bool:
    """Whether the layer holds a non-directory entry at `parent/name` (a file or a whiteout):
    then the overlay never shows what the disk has there."""
    try:
        st = os.lstat(os.path.join(upper, parent, name))
    except OSError:
        return False
    return not stat.S_ISDIR(st.st_mode)


def _redirected(upper: str) -> bool:
    """Whether a directory of the layer is redirected (renamed through the overlay)."""
    for rel, st in tree.walk(upper, tolerate=(FileNotFoundError,)):
        if stat.S_ISDIR(st.st_mode):
            try:
                os.getxattr(os.path.join(upper, rel), REDIRECT_XATTR, follow_symlinks=False)
            except OSError:
                continue
            return True
    try:
        os.getxattr(upper, REDIRECT_XATTR, follow_symlinks=False)
    except OSError:
        return False
    return True


def _listdir(dir_fd: int) -> list[str]:
    try:
        return os.listdir(dir_fd)
    except OSError:
        return []
