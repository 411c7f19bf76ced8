"""Reading an overlay upper layer: entries, whiteouts, opaque and renamed directories."""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from dataclasses import dataclass, field

from rampiped import osutil
from rampiped.commands import SyncError
from rampiped.fsops import join
from rampiped.writeback.names import HOLD_NAME, SCRATCH_NAME, STASH_NAME

# Overlay features, chosen on purpose rather than inherited from the kernel's build defaults:
# - redirect_dir=on: renaming a directory that came from disk works (without it rename(2) fails
#   with EXDEV, which many programs do not handle); the kernel records the directory's lower
#   path in trusted.overlay.redirect and apply_upper follows it.
# - metacopy=off: a metadata change (chmod, chown, touch) copies the whole file up, so the upper
#   layer always holds complete data; with metacopy=on it could hold attributes whose data
#   only exists in the lower layer, and the layer could not be applied or journaled alone.
# - index=off: no index directory tying upper inodes to the lower's inode numbers and file
#   handles; the disk directory is rewritten at every unpin, so such state would go stale.
# - xino=off: no inode numbers composed from the lower's; nothing persistent depends on them.
OVERLAY_FEATURES = "redirect_dir=on,index=off,metacopy=off,xino=off"


@dataclass
class UpperDir:
    rel: str  # "" for the layer root
    opaque: bool
    redirect: str | None
    children: dict[str, str] = field(default_factory=dict)  # name -> kind
    lower: str | None = None  # the lower path its lower content comes from; None: no lower
    # (atime, mtime) in ns of the directory itself ("" in the root) and of its entries that
    # are neither regular files nor whiteouts
    times: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class Layer:
    root: str
    dirs: dict[str, UpperDir]  # parents before children (insertion order)
    files: int
    bytes: int
    link_groups: list[list[str]]  # regular files that share an inode in the layer


def _xattr_text(path: str, name: str) -> str | None:
    try:
        return os.fsdecode(os.getxattr(path, name, follow_symlinks=False))
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def scan_layer(root: str) -> Layer:
    """Read the layer's structure; raise SyncError for anything apply cannot reproduce."""
    try:
        st = os.lstat(root)
    except OSError as e:
        raise SyncError(f"layer {root} cannot be read: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise SyncError(f"layer {root} is not a directory (a symlink or a file): refusing it")
    dirs: dict[str, UpperDir] = {"": UpperDir("", False, None)}
    dirs[""].times[""] = (st.st_atime_ns, st.st_mtime_ns)
    queue = deque([""])
    files = 0
    nbytes = 0
    seen_inodes: dict[tuple[int, int], list[str]] = {}
    problems: list[str] = []
    while queue:
        rel = queue.popleft()
        current = dirs[rel]
        path = os.path.join(root, rel) if rel else root
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise SyncError(f"layer directory {path} cannot be read: {e.strerror}") from e
        for name in names:
            child_rel = join(rel, name)
            child_path = os.path.join(path, name)
            try:
                cst = os.lstat(child_path)
                attrs = set(os.listxattr(child_path, follow_symlinks=False))
            except OSError as e:
                raise SyncError(f"layer entry {child_path} cannot be read: {e.strerror}") from e
            kind = osutil.file_kind(cst)
            if rel == "" and name == SCRATCH_NAME and kind == "whiteout":
                continue  # rampiped's own: hides its scratch directory on disk (see HIDDEN)
            current.children[name] = kind
            if kind not in ("file", "whiteout"):  # rsync sets file times exactly
                current.times[name] = (cst.st_atime_ns, cst.st_mtime_ns)
            if kind in ("chardev", "blockdev", "other"):
                problems.append(
                    f"{child_path} is a device node ({kind} "
                    f"{os.major(cst.st_rdev)}:{os.minor(cst.st_rdev)}); device nodes in a "
                    "pinned directory are not supported"
                )
            if "trusted.overlay.metacopy" in attrs:
                problems.append(
                    f"{child_path} is a metacopy entry (its data is not in the layer); "
                    "the overlay must be mounted with metacopy=off"
                )
            if "trusted.overlay.whiteout" in attrs:
                problems.append(f"{child_path} is an xattr whiteout, which overlayfs never writes")
            if kind != "dir" and "trusted.overlay.redirect" in attrs:
                problems.append(f"{child_path} is a redirected non-directory (metacopy layer)")
            if kind == "dir":
                opaque_value = (
                    _xattr_text(child_path, "trusted.overlay.opaque")
                    if "trusted.overlay.opaque" in attrs
                    else None
                )
                if opaque_value not in (None, "y"):
                    problems.append(
                        f"{child_path} has trusted.overlay.opaque={opaque_value!r}, "
                        "which this write-back does not understand"
                    )
                redirect = (
                    _xattr_text(child_path, "trusted.overlay.redirect")
                    if "trusted.overlay.redirect" in attrs
                    else None
                )
                if redirect is not None and not _valid_redirect(redirect):
                    problems.append(f"{child_path} has a malformed redirect {redirect!r}")
                    redirect = None
                dirs[child_rel] = UpperDir(child_rel, opaque_value == "y", redirect)
                queue.append(child_rel)
            elif kind == "file":
                files += 1
                key = (cst.st_dev, cst.st_ino)
                if key not in seen_inodes:
                    nbytes += cst.st_size
                    seen_inodes[key] = []
                if cst.st_nlink > 1:
                    seen_inodes[key].append(child_rel)
        if rel == "":
            for reserved in (STASH_NAME, HOLD_NAME, SCRATCH_NAME):
                if reserved in current.children:
                    problems.append(
                        f"{root} holds an entry named {reserved}, which write-back reserves"
                    )
    if problems:
        raise SyncError(
            f"refusing to apply layer {root}, nothing was changed: {first_ten(problems)}"
        )
    layer = Layer(root, dirs, files, nbytes, [g for g in seen_inodes.values() if len(g) > 1])
    _resolve_lower_paths(layer)
    return layer


def first_ten(problems: list[str]) -> str:
    more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
    return "; ".join(problems[:10]) + more


def _valid_redirect(value: str) -> bool:
    if "\0" in value or not value:
        return False
    # A relative redirect is one name in the parent's lower directory.
    parts = value[1:].split("/") if value.startswith("/") else [value]
    return all(p not in ("", ".", "..") for p in parts)


def _resolve_lower_paths(layer: Layer) -> None:
    """Which lower path each upper directory's lower content comes from, as the kernel looks
    it up: an opaque directory has none; an absolute redirect names a path from the lower root;
    a relative one a name in the parent's lower directory; otherwise the parent's lower path
    and the directory's own name. The root always merges with the lower root."""
    for rel, d in layer.dirs.items():
        if rel == "":
            d.lower = ""
            continue
        parent_rel, _, name = rel.rpartition("/")
        parent_lower = layer.dirs[parent_rel].lower
        if d.opaque:
            d.lower = None  # the kernel stops at an opaque directory before reading a redirect
        elif d.redirect is not None and d.redirect.startswith("/"):
            d.lower = d.redirect[1:]
        elif parent_lower is None:
            d.lower = None
        elif d.redirect is not None:
            d.lower = join(parent_lower, d.redirect)
        else:
            d.lower = join(parent_lower, name)


def renamed_dirs(layer: Layer) -> list[tuple[str, str]]:
    """(origin, destination) of every renamed directory that brings disk content along, in
    stash order: deepest origin first, so that moving an origin out never carries along
    another origin that still has to go somewhere else."""
    moves = []
    for rel, d in layer.dirs.items():
        if d.redirect is None or d.lower is None or d.lower == rel:
            continue
        moves.append((d.lower, rel))
    origins = [o for o, _ in moves]
    dup = sorted({o for o in origins if origins.count(o) > 1})
    if dup:
        raise SyncError(
            f"refusing to apply layer {layer.root}, nothing was changed: several directories "
            f"claim the same renamed origin {dup[0]!r}"
        )
    for origin, dest in moves:
        if origin.split("/")[0] == STASH_NAME or dest.split("/")[0] == STASH_NAME:
            raise SyncError(f"refusing to apply layer {layer.root}: redirect touches {STASH_NAME}")
    moves.sort(key=lambda m: (-m[0].count("/"), m[0]))
    return moves
