"""A layer as the disk below the overlay holds it: each renamed directory at its origin.

While an overlay serves the path, the origin of a directory renamed through it is that
directory's lower directory: the kernel follows the redirect to it at every lookup. Moving the
origin away would empty the directory in the view; writing into it is as hidden as writing
anywhere else below the overlay, since the upper directory shadows every entry such a write
changes (a file changed or made through the overlay is in the upper directory, a deleted one
leaves a whiteout there). So an unpin that writes back before its unmount (OverlayMode.
write_early) applies this copy of the generation, with every renamed directory's content at
its origin, and after the unmount only the moves are left: the apply of the generation itself
stashes each origin, with what was written into it, and places it at its new name.

The copy is made of hard links to the generation's entries (no data is written) and new
directories with the generation's owner, mode, attributes and times, the redirect left out.
It cannot be made, and the renamed directories are then written after the unmount, when an
entry would land where another does (a directory renamed, then a new entry made under its
old name) or an origin is not inside a directory that the disk keeps (one that a directory of
the layer replaced)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from rampiped.fsops import copy_dir_attrs, join, opened_dir
from rampiped.writeback.layer import Layer, renamed_dirs, scan_layer

REDIRECT_XATTR = "trusted.overlay.redirect"


@dataclass(frozen=True)
class AtOrigins:
    """A layer with its renamed directories at their origins (at_origins)."""

    path: str
    # entries that are not directories: name in the layer -> in `path` (None: the same names,
    # `path` being the layer itself, which renamed no directory)
    names: dict[str, str] | None = None

    def rels(self, rels: frozenset[str]) -> frozenset[str]:
        """Names of the layer's entries `rels` in this copy of it."""
        if self.names is None:
            return rels
        return frozenset(self.names[r] for r in rels if r in self.names)


def places(layer: Layer) -> tuple[dict[str, str], dict[str, str]] | None:
    """Where each directory of the layer (rel -> place) and each other entry (rel -> place)
    is below the overlay: a renamed directory at its origin, everything in it with it. None
    when two entries would share a place, or an origin is not inside a directory whose own
    lower directory is the one at that place (the disk keeps it until the unmount)."""
    moved = {dest for _origin, dest in renamed_dirs(layer)}
    dirs: dict[str, str] = {}
    for rel, d in layer.dirs.items():  # parents before children
        parent, _, name = rel.rpartition("/")
        if rel in moved and d.lower is not None:
            dirs[rel] = d.lower
        else:
            dirs[rel] = join(dirs[parent], name) if rel else ""
    holder = {place: rel for rel, place in dirs.items()}
    if len(holder) != len(dirs):
        return None
    for rel in moved:
        up = dirs[rel].rpartition("/")[0]
        keeper = holder.get(up)
        if keeper is None or layer.dirs[keeper].lower != up:
            return None
    others: dict[str, str] = {}
    taken: set[str] = set()
    for rel, d in layer.dirs.items():
        for name, kind in d.children.items():
            if kind == "dir":
                continue
            place = join(dirs[rel], name)
            if place in holder:
                if kind == "whiteout" and holder[place] in moved:
                    continue  # the rename's own whiteout: the move takes the origin away
                return None
            if place in taken:
                return None
            taken.add(place)
            others[join(rel, name)] = place
    return dirs, others


def at_origins(gen: str, dest: str) -> AtOrigins | None:
    """Make at `dest` (which must not exist) the generation `gen` (a synced copy of a layer,
    in the journal) with its renamed directories at their origins; `gen` itself when it
    renamed none. None, and nothing made, when places() refuses the layer."""
    layer = scan_layer(gen)
    if not renamed_dirs(layer):
        return AtOrigins(gen)
    found = places(layer)
    if found is None:
        return None
    dirs, others = found

    def depth(rel: str) -> tuple[int, str]:
        place = dirs[rel]
        return (place.count("/") + 1 if place else 0, place)

    os.mkdir(dest, 0o700)
    try:
        for rel in sorted(dirs, key=depth):
            if dirs[rel]:
                os.mkdir(os.path.join(dest, dirs[rel]), 0o700)
            _copy_attrs(os.path.join(gen, rel), os.path.join(dest, dirs[rel]))
        for rel, place in others.items():
            os.link(os.path.join(gen, rel), os.path.join(dest, place), follow_symlinks=False)
        for rel in sorted(dirs, key=depth, reverse=True):  # the links changed their mtimes
            st = os.lstat(os.path.join(gen, rel))
            os.utime(os.path.join(dest, dirs[rel]), ns=(st.st_atime_ns, st.st_mtime_ns))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return AtOrigins(dest, others)


def _copy_attrs(src: str, dst: str) -> None:
    """copy_dir_attrs between two directories of the journal, the redirect left out."""
    with opened_dir(src) as s_fd, opened_dir(dst) as d_fd:
        copy_dir_attrs(s_fd, d_fd, skip=(REDIRECT_XATTR,))
