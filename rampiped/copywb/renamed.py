"""A copy pin's checkpoint renames on disk what was renamed in RAM (rampiped/renames.py).

In two phases, so that no old file is lost while the names move round (app.log.1 becomes
app.log.2 while app.log becomes app.log.1): each old name's disk file is first linked into the
scratch directory, then each link is renamed to its new name. The old names stay until the
copy that follows replaces or deletes them. A power cut in between leaves every name with the
last checkpoint's file or the new one's (the links in the scratch directory are extra names,
removed at the next start)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from rampiped.appends import open_rel_path
from rampiped.fsops import lstat_at
from rampiped.ledger import Ledger
from rampiped.writeback import SCRATCH_NAME, pause_point, scratch_dir


def rename_on_disk(
    disk: str,
    pairs: dict[str, str],
    ledger: Ledger,
    step: Callable[[str], None] = pause_point,
    *,
    batched: bool = False,
) -> dict[str, str]:
    """Rename below `disk` each old name of `pairs` (new -> old) to its new name, where the
    disk file at the old name is the one the ledger knows (regular, one name, its size) and
    the new name's directory exists; returns the pairs done. `step` is told after each phase
    (copy-checkpoint:renames-linked, copy-checkpoint:renames-done) and each rename
    (copy-checkpoint:renamed-one). `batched` (a filesystem that commits in order,
    mounts.commits_in_order): no fsync after each rename; the links are made before the
    renames, so any commit leaves each name old or new, and the checkpoint's next syncfs
    makes them durable."""
    ready: dict[str, str] = {}
    done: dict[str, str] = {}
    with scratch_dir(disk):
        root = os.open(disk, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            scratch = os.open(
                SCRATCH_NAME, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root
            )
            try:
                for n, (new, old) in enumerate(sorted(pairs.items())):
                    if _link_old(disk, old, ledger.sizes.get(old), scratch, str(n)):
                        ready[new] = str(n)
                step("copy-checkpoint:renames-linked")
                for new, tmp in ready.items():
                    if _rename_new(disk, new, scratch, tmp, synced=not batched):
                        done[new] = pairs[new]
                        step("copy-checkpoint:renamed-one")
                if not batched:
                    os.fsync(scratch)
                step("copy-checkpoint:renames-done")
            finally:
                os.close(scratch)
        finally:
            os.close(root)
    return done


def _link_old(disk: str, old: str, size: int | None, scratch: int, tmp: str) -> bool:
    parent, _, name = old.rpartition("/")
    fd = open_rel_path(disk, parent)
    if fd is None:
        return False
    try:
        st = lstat_at(fd, name)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size != size:
            return False
        os.link(name, tmp, src_dir_fd=fd, dst_dir_fd=scratch, follow_symlinks=False)
        return True
    finally:
        os.close(fd)


def _rename_new(disk: str, new: str, scratch: int, tmp: str, *, synced: bool) -> bool:
    parent, _, name = new.rpartition("/")
    fd = open_rel_path(disk, parent)
    if fd is None:
        return False  # a new directory: the copy makes it, and the file in it
    try:
        st = lstat_at(fd, name)
        if st is not None and stat.S_ISDIR(st.st_mode):
            return False
        os.rename(tmp, name, src_dir_fd=scratch, dst_dir_fd=fd)
        if synced:
            os.fsync(fd)
        return True
    finally:
        os.close(fd)
