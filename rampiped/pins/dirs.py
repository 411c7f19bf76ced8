"""Reaching a pinned directory safely, and what is measured of it before a pin."""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from rampiped import fsops, tree
from rampiped.pins.model import PinRefused

_COPIED_XATTR_PREFIXES = ("user.", "system.posix_acl_", "security.")


def copy_root_attributes(src: str, dst: str) -> None:
    """Give `dst` the owner, mode, ACLs and xattrs of `src` (the overlay's merged root shows the
    upper root's attributes, not the disk directory's)."""
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        if name.startswith(_COPIED_XATTR_PREFIXES):
            with contextlib.suppress(OSError):
                os.setxattr(
                    dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False
                )
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def open_dir_nofollow(path: str) -> int:
    """An O_PATH descriptor of the directory `path`, reached from / one component at a time
    without following any symlink. Raises PinRefused when a component is a symlink or not a
    directory: the directories rampiped manages may be writable by other users, who could
    otherwise point root's mounts and writes anywhere."""
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise PinRefused(f"cannot pin {path!r}: not a normalised absolute path")
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return fsops.walk_dirs(
            root,
            [part for part in path.split("/") if part],
            os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
        )
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise PinRefused(
                f"cannot pin {path}: /{exc.filename} is a symlink or not a directory"
            ) from exc
        raise
    finally:
        os.close(root)


def largest_file(path: str) -> int:
    """Size of the largest regular file below `path` (symlinks not followed)."""
    return max(
        (st.st_size for _rel, st in tree.walk(path) if stat.S_ISREG(st.st_mode)),
        default=0,
    )
