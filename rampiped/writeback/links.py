"""Applying a journal generation by linking its files into place: each changed byte reaches
the disk once, in the journal, and the directory gets the very same inodes.

The journal and the directory must be on one filesystem and reached through one mount (link(2)
and rename(2) do not cross mounts, not even two mounts of the same filesystem): the caller
passes a private copy of that mount that no path leads to (mounts.clone_mount) and where, in
it, the generation and the directory are. Every lookup below it is made fd by fd without
following a symlink, like the rest of the apply.

Why a power cut loses nothing: the generation is complete and synced before its apply starts,
and linking never changes its content. A file is linked under a temporary name in the scratch
directory, then renamed over its name, so the name shows the old file or the new one. A cut
before the apply's syncfs leaves the generation in the journal, and the next start applies it
again (a name that already shows the generation's inode is left as it is)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from rampiped.fsops import lstat_at, open_rel, remove_at
from rampiped.pause import pause_point
from rampiped.writeback.layer import Layer
from rampiped.writeback.names import SCRATCH_NAME

OVERLAY_XATTR_PREFIX = "trusted.overlay."
LINK_SCRATCH = "linking"  # beside the generations in the journal (see _scratch)
LINKED_KINDS = ("file", "symlink")


@dataclass(frozen=True)
class LinkRoute:
    """Where a generation and the directory it is applied to are, below one mount."""

    root_fd: int  # the root of a private copy of the mount that holds both
    source: str  # the generation, relative to root_fd ("" for the root itself)
    target: str  # the directory on disk, relative to root_fd


def linkable(layer: Layer, left_out: Iterable[str]) -> list[str]:
    """The regular files and symlinks of `layer` to link into place: all but `left_out`
    (written some other way, or already in place), and but the hard-link groups that
    `left_out` splits (rsync writes those, keeping the group one inode). A symlink is linked
    too: rsync replaces one by a symlink at a temporary name beside it (`.NAME.PID`), which a
    reader of the directory would see."""
    skip = set(left_out)
    for group in layer.link_groups:
        if any(rel in skip for rel in group):
            skip.update(group)
    return [
        rel
        for d in layer.dirs.values()
        for name, kind in d.children.items()
        if kind in LINKED_KINDS and (rel := f"{d.rel}/{name}" if d.rel else name) not in skip
    ]


def same_dir(route: LinkRoute, source: str, target: str) -> bool:
    """Whether the route reaches the generation `source` and the directory `target` (paths
    outside the copy of the mount): the same inodes, and the generation's root on one mount
    with the directory's."""
    pairs = ((route.source, source), (route.target, target))
    for rel, path in pairs:
        fd = open_rel(route.root_fd, rel)
        if fd is None:
            return False
        try:
            a, b = os.fstat(fd), os.stat(path)
        finally:
            os.close(fd)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            return False
    return True


def link_files(route: LinkRoute, rels: list[str]) -> tuple[int, int]:
    """Put each regular file and symlink `rels` of the generation in place in the directory,
    as the same inode: linked in a scratch directory beside the generation (_scratch), then
    renamed over its name. The trusted.overlay.* attributes the generation copied from the
    layer are removed first (they must not reach the disk). Returns (regular files linked,
    their bytes); a name that shows the generation's inode already is left alone. Raises
    OSError."""
    files = nbytes = 0
    seen: set[int] = set()
    with (
        opened_at(route.root_fd, route.source) as src_root,
        opened_at(route.root_fd, route.target) as dst_root,
        _scratch(route, dst_root) as scratch,
    ):
        for parent, names in _by_parent(sorted(rels)):
            with opened_at(src_root, parent) as sfd, opened_at(dst_root, parent) as dfd:
                for name in names:
                    st = _link_one(sfd, dfd, scratch, name)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    if not files:
                        pause_point("apply:linked-one")  # the rest still to link
                    files += 1
                    if st.st_ino not in seen:
                        seen.add(st.st_ino)
                        nbytes += st.st_size
    return files, nbytes


@contextlib.contextmanager
def _scratch(route: LinkRoute, dst_root: int) -> Iterator[int]:
    """The directory a file is linked into before its rename into place: LINK_SCRATCH beside
    the generation, in the journal (a reader of the directory never sees it), made afresh and
    removed afterwards; SCRATCH_NAME in the directory (made by the caller) for a generation at
    the top of the copy of the mount."""
    parent = os.path.dirname(route.source)
    if not route.source or parent == route.source:
        with opened_at(dst_root, SCRATCH_NAME) as fd:
            yield fd
        return
    with opened_at(route.root_fd, parent) as pfd:
        if lstat_at(pfd, LINK_SCRATCH) is not None:
            remove_at(pfd, LINK_SCRATCH)  # left by a crash: extra names of generation files
        os.mkdir(LINK_SCRATCH, 0o700, dir_fd=pfd)
        try:
            with opened_at(pfd, LINK_SCRATCH) as fd:
                yield fd
        finally:
            with contextlib.suppress(FileNotFoundError):
                remove_at(pfd, LINK_SCRATCH)


def _link_one(sfd: int, dfd: int, scratch: int, name: str) -> os.stat_result:
    """Put the generation's file `name` (below `sfd`) in place below `dfd`; its stat."""
    st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise OSError(f"{name}: neither a regular file nor a symlink in the generation")
    have = lstat_at(dfd, name)
    if have is not None and (have.st_dev, have.st_ino) == (st.st_dev, st.st_ino):
        return st  # linked by an apply before this one
    _drop_overlay_xattrs(sfd, name)
    tmp = f"{st.st_ino}.link"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=scratch)
    os.link(name, tmp, src_dir_fd=sfd, dst_dir_fd=scratch, follow_symlinks=False)
    os.rename(tmp, name, src_dir_fd=scratch, dst_dir_fd=dfd)
    return st


def _drop_overlay_xattrs(dir_fd: int, name: str) -> None:
    # by the descriptor's /proc link, not opened: a symlink cannot be opened for its xattrs
    path = f"/proc/self/fd/{dir_fd}/{name}"
    for key in os.listxattr(path, follow_symlinks=False):
        if key.startswith(OVERLAY_XATTR_PREFIX):
            with contextlib.suppress(OSError):
                os.removexattr(path, key, follow_symlinks=False)


def _by_parent(rels: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(parent, names) for sorted paths, each parent's names together."""
    groups: dict[str, list[str]] = {}
    for rel in rels:
        parent, _, name = rel.rpartition("/")
        groups.setdefault(parent, []).append(name)
    yield from groups.items()


@contextlib.contextmanager
def opened_at(root_fd: int, rel: str) -> Iterator[int]:
    fd = open_rel(root_fd, rel) if rel else os.dup(root_fd)
    if fd is None:
        raise FileNotFoundError(f"{rel}: missing or not a directory below the mount's copy")
    try:
        yield fd
    finally:
        os.close(fd)
