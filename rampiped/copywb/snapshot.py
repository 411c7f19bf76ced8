"""Snapshots: the stamp of every entry of a tree, to tell what changed between two moments."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from rampiped import ledger, osutil, tree

# (type, size, mtime_ns, ctime_ns, inode): any write, truncate, chmod, chown, rename-over or
# replacement changes at least one of them. Since Linux 6.13 ext4, xfs, btrfs and tmpfs use
# multigrain timestamps: once a time was read by stat, the next change gets a distinct one, so
# a same-size overwrite right after our stat cannot hide behind a coarse clock tick.
Stamp = ledger.Stamp
Snapshot = Mapping[str, Stamp]


# Snapshots name the kind of an entry in one letter (osutil.file_kind's "file" is "f", and so
# on; sockets, devices and whiteouts are all "o"): the copy window of an unpin is saved to
# disk with them (COPY_WINDOW), and a daemon reads back what an earlier one saved.
_KIND_LETTERS = {"file": "f", "dir": "d", "symlink": "l", "fifo": "p"}


def kind_letter(st: os.stat_result) -> str:
    return _KIND_LETTERS.get(osutil.file_kind(st), "o")


def entry_stamp(st: os.stat_result) -> Stamp:
    return (kind_letter(st), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def snapshot(root: str, paths: Iterable[str] | None = None) -> dict[str, Stamp]:
    """The stamp of every entry below `root` (relative paths, "." for the root), or of the
    given relative `paths` only. Entries that vanish while we look are left out."""
    out: dict[str, Stamp] = {}
    if paths is not None:
        for rel in paths:
            try:
                out[rel] = entry_stamp(os.lstat(os.path.join(root, rel)))
            except (FileNotFoundError, NotADirectoryError):
                pass
        return out
    out["."] = entry_stamp(os.lstat(root))
    for rel, st in tree.walk(root):
        out[rel] = entry_stamp(st)
    return out


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def changed_since(root: str, before: Snapshot) -> list[str]:
    """Relative paths below `root` that were created, removed or changed since `before`."""
    return differences(before, snapshot(root))
