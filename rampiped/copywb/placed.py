"""The entries of a copy pin's write-back after the unmount that rsync would make under a
temporary name in the directory, made in the hold directory instead and renamed into place
through the private copy of the mount (HoldPlace.staging): a reader of the directory sees the
old entry or the new one at its name, never another name.

rsync makes such names for a symlink it replaces (`.NAME.PID` beside it) and for a regular file
it writes (in its --temp-dir, the scratch directory at the directory's top). The files with
one name are the write-back's own already (HeldFiles.write_own); this takes the symlinks and
the hard-link groups. The rest is left to rsync, as is everything when the hold directory is
inside the directory (the journal on another mount)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from rampiped.copywb.snapshot import Snapshot
from rampiped.fsops import append_from, copy_attributes, lstat_at, open_rel
from rampiped.pause import pause_point
from rampiped.writeback.holdplace import HoldPlace, Staging


@dataclass
class Placed:
    rels: set[str] = field(default_factory=set)  # entries put in place
    files: int = 0  # regular files among them, by name
    bytes: int = 0  # their data, each inode once


def place_in_hold(data: str, place: HoldPlace, rels: list[str], in_ram: Snapshot) -> Placed:
    """Put in place, from RAM (`data`, its snapshot `in_ram`), the symlinks of `rels` and the
    hard-link groups all of whose names are in `rels`, where the disk holds no directory at
    any of their names; what is placed rsync must leave out. A parent directory the disk does
    not have yet is made first, with RAM's mode and owner (rsync, which is given it too, then
    gives it the rest, and its times once its entries are in). A group's file is synced before
    its renames (rsync's --fsync); the caller's syncfs makes the rest durable. Raises OSError."""
    done = Placed()
    wanted = set(rels)
    groups: dict[int, list[str]] = {}
    for rel, st in in_ram.items():
        if st[0] == "f":
            groups.setdefault(st[4], []).append(rel)
    with place.staging() as staging:
        if staging is None:
            return done
        dirs = _Parents(staging, data, in_ram, wanted)
        for rel in rels:
            if in_ram.get(rel, ("",))[0] == "l" and _place_symlink(staging, dirs, data, rel):
                done.rels.add(rel)
        for names in groups.values():
            if len(names) > 1 and wanted.issuperset(names):
                size = _place_group(staging, dirs, data, sorted(names))
                if size is not None:
                    done.rels.update(names)
                    done.files += len(names)
                    done.bytes += size
    return done


class _Parents:
    """Makes a directory of RAM's that the disk does not have yet, through the copy of the
    mount, where rsync is to write it too (it is among the entries written back)."""

    def __init__(self, staging: Staging, data: str, in_ram: Snapshot, wanted: set[str]) -> None:
        self.staging, self.data, self.in_ram, self.wanted = staging, data, in_ram, wanted

    def make(self, rel: str) -> None:
        """Make the missing directories of `rel` (a directory's path), top down, walking
        down fd by fd (as fsops._make_dirs_rel, which replaces what is in the way: here that
        is left to rsync, as is a directory not to be written)."""
        fd = os.dup(self.staging.target_fd)
        try:
            parts: list[str] = []
            for part in rel.split("/") if rel else []:
                parts.append(part)
                if lstat_at(fd, part) is None and not self._mkdir(fd, part, "/".join(parts)):
                    return
                below = open_rel(fd, part)  # None: not a real directory
                if below is None:
                    return
                os.close(fd)
                fd = below
        finally:
            os.close(fd)

    def _mkdir(self, parent_fd: int, name: str, rel: str) -> bool:
        """Make `rel` (at `name` in `parent_fd`) as RAM has it: whether it is there now."""
        if rel not in self.wanted or self.in_ram.get(rel, ("",))[0] != "d":
            return False
        try:
            st = os.lstat(os.path.join(self.data, rel))
        except OSError:
            return False  # gone from RAM meanwhile
        if not stat.S_ISDIR(st.st_mode):
            return False
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            return True  # made on the disk meanwhile: open_rel judges it
        os.chown(name, st.st_uid, st.st_gid, dir_fd=parent_fd, follow_symlinks=False)
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=parent_fd)
        return True


@contextlib.contextmanager
def _parents(staging: Staging, dirs: _Parents, rels: list[str]) -> Iterator[dict[str, int] | None]:
    """The disk's parent directory of each of `rels` (by rel), through the copy of the mount,
    made when RAM has it and the disk not yet; None when one is missing still or a name there
    is a directory."""
    fds: dict[str, int] = {}
    try:
        for rel in rels:
            dirs.make(os.path.dirname(rel))
            fd = open_rel(staging.target_fd, os.path.dirname(rel))
            if fd is None:
                yield None
                return
            fds[rel] = fd
            have = lstat_at(fd, os.path.basename(rel))
            if have is not None and stat.S_ISDIR(have.st_mode):
                yield None
                return
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def _tmp_name() -> str:
    return f"placed-{secrets.token_hex(4)}"


def _rename_in(staging: Staging, tmp: str, parent_fd: int, rel: str) -> None:
    os.rename(tmp, os.path.basename(rel), src_dir_fd=staging.hold_fd, dst_dir_fd=parent_fd)


def _place_symlink(staging: Staging, dirs: _Parents, data: str, rel: str) -> bool:
    """A symlink of RAM without xattrs (rsync -X copies those), as it is there."""
    src = os.path.join(data, rel)
    try:
        st = os.lstat(src)
        if not stat.S_ISLNK(st.st_mode) or os.listxattr(src, follow_symlinks=False):
            return False
        points_to = os.readlink(src)
    except OSError:
        return False  # gone from RAM meanwhile: rsync's --ignore-missing-args
    with _parents(staging, dirs, [rel]) as parents:
        if parents is None:
            return False
        tmp = _tmp_name()
        hold = staging.hold_fd
        os.symlink(points_to, tmp, dir_fd=hold)
        try:
            os.chown(tmp, st.st_uid, st.st_gid, dir_fd=hold, follow_symlinks=False)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=hold, follow_symlinks=False)
            _rename_in(staging, tmp, parents[rel], rel)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=hold)
            raise
    return True


def _place_group(staging: Staging, dirs: _Parents, data: str, names: list[str]) -> int | None:
    """A hard-link group of RAM, as one new inode at each of its names (rsync -H keeps it
    one): its size, or None when it cannot be placed this way."""
    src = os.path.join(data, names[0])
    with _parents(staging, dirs, names) as parents:
        if parents is None:
            return None
        hold = staging.hold_fd
        tmp = _tmp_name()
        made: list[str] = []
        try:
            try:
                fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return None  # gone from RAM meanwhile
            try:
                st = os.fstat(fin)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                out = os.open(tmp, flags, 0o600, dir_fd=hold)
                made.append(tmp)
                try:
                    append_from(fin, out, 0)
                    copy_attributes(src, out)  # as HeldFiles.write_own gives its files
                    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                    os.fsync(out)
                finally:
                    os.close(out)
            finally:
                os.close(fin)
            for rel in names:
                # a name of its own in the hold directory for each rename: the first rename
                # would take the one name away from the next
                extra = _tmp_name()
                os.link(tmp, extra, src_dir_fd=hold, dst_dir_fd=hold, follow_symlinks=False)
                made.append(extra)
                _rename_in(staging, extra, parents[rel], rel)
                made.remove(extra)
                pause_point("placed:one")  # the group's other names still the old file
        finally:
            for name in made:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=hold)
        return st.st_size
