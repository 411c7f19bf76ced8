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
from collections.abc import Callable, Mapping

from rampiped.appends import open_rel_path
from rampiped.fsops import lstat_at
from rampiped.ledger import Ledger, Stamp
from rampiped.ledger import scan as ledger_scan
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
    durable.commits_in_order): no fsync after each rename; the links are made before the
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


def renamed_meanwhile(
    data: str,
    disk: str,
    before: Mapping[str, Stamp],
    after: Mapping[str, Stamp],
    changed: list[str],
    *,
    batched: bool,
) -> dict[str, tuple[str, int, int]]:
    """Files of `changed` renamed in RAM while a checkpoint's pass ran (a rotation that came
    just then), renamed on disk too rather than copied again: a regular file now at a name that
    held another file or none when the pass began, whose inode was then at another name that no
    longer holds it, and whose old name on disk holds, by content (digest and size), mode,
    owner, mtime and extended attributes, what RAM holds at the new name now. Returns new name
    -> (digest, size, inode) of what the disk holds there now, for the ledger; what cannot be
    proven so is left to the copy."""
    was_at = {st[4]: rel for rel, st in before.items() if st[0] == "f"}
    pairs: dict[str, str] = {}
    for new in changed:
        now = after.get(new)
        if now is None or now[0] != "f":
            continue
        then = before.get(new)
        old = was_at.get(now[4])
        if old is None or old == new or (then is not None and then[4] == now[4]):
            continue
        still = after.get(old)
        if still is not None and still[4] == now[4]:
            continue  # a second name of the same file, not a rename
        pairs[new] = old
    if not pairs:
        return {}
    in_ram = ledger_scan(data, list(pairs))
    on_disk = ledger_scan(disk, list(pairs.values()))
    proven: dict[str, str] = {}
    sizes = Ledger()
    for new, old in pairs.items():
        ram, there = in_ram.get(new), on_disk.get(old)
        if ram is None or there is None or ram.nlink != 1 or there.nlink != 1:
            continue
        if (ram.digest, ram.size) != (there.digest, there.size):
            continue
        if _meta(os.path.join(data, new)) != _meta(os.path.join(disk, old)):
            continue
        proven[new] = old
        sizes.sizes[old] = there.size
    done = rename_on_disk(disk, proven, sizes, batched=batched) if proven else {}
    return {new: (in_ram[new].digest, in_ram[new].size, in_ram[new].ino) for new in done}


def _meta(path: str) -> tuple[object, ...] | None:
    try:
        st = os.lstat(path)
        names = sorted(os.listxattr(path, follow_symlinks=False))
        attrs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
    except OSError:
        return None
    return (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, attrs)
