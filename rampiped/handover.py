"""Writers that keep their files open: moving them between the disk and RAM with their own
"reopen" command (a watch root's or pin's `reopen:`, e.g. `systemctl kill -s HUP rsyslog`).

A server that holds its log open keeps writing to the file it opened, whatever is mounted over
the directory later. Many reopen their files on a signal. With such a command:

* pin: the overlay is mounted, the command runs, and then every process that still holds a file
  of the directory must hold it through the overlay. One that still holds the disk file below
  (it ignored the signal) would write past the overlay; the pin is rolled back.
* unpin: an overlay whose files are held cannot be unmounted. The RAM layer is copied to the
  journal and applied to the disk (while the overlay is still mounted, which is otherwise never
  done: here the overlay is detached right after and only serves the descriptors already open
  on it), the overlay is detached from the path, so that the path shows the disk holding
  everything written so far, and the command runs. Once nobody holds a file of the detached
  overlay any more, what the writers wrote in between (after the copy and before they
  reopened) is merged into the disk: appended where the disk file only grew at its end since,
  written as a `.rampiped-conflict` copy next to it where both sides were rewritten.

Holders are told apart by mount id (/proc/PID/fdinfo/N `mnt_id`), never by path or st_dev:
after the mount both the overlay file and the disk file have the same path, and an overlay file
reports the device of the layer it comes from.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shlex
import shutil
import stat
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import IO

from rampiped import durable, holders, mounts, writeback

log = logging.getLogger("rampiped")

REOPEN_TIMEOUT = 30  # seconds the reopen command may take (it usually signals and returns)
SETTLE_DEADLINE = 5.0  # seconds the writers get to reopen their files after the command
POLL = 0.1
MARKER = "handover.json"  # in the pin's journal dir: the disk was written, do not apply again
CONFLICT_SUFFIX = writeback.CONFLICT_SUFFIX

_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8
_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


# -- the command ---------------------------------------------------------------------------------


def reopen_argv(command: str) -> list[str]:
    """The reopen command as run: split like a shell would (no shell runs it), and ended after
    REOPEN_TIMEOUT seconds by coreutils' timeout (exit 124) so that a hung command cannot stall
    the pins."""
    return ["timeout", "--kill-after=5", str(REOPEN_TIMEOUT), *shlex.split(command)]


def run_reopen(command: str, path: str, runner: writeback.Runner) -> bool:
    """Run the reopen command; a failure is logged (the holder check that follows decides)."""
    argv = reopen_argv(command)
    res = runner(argv)
    if res.returncode == 0:
        log.info("%s: ran %r to make its writers reopen their files", path, command)
        return True
    # writeback.describe_exit explains rsync's exit codes, not this command's; timeout(1) itself
    # answers 124 (time is up), 126 (cannot run the command) and 127 (no such command)
    why = {
        124: f"did not finish within {REOPEN_TIMEOUT} s",
        126: "could not be run (exit code 126: not executable)",
        127: "could not be run (exit code 127: command not found)",
    }.get(res.returncode, f"exited with code {res.returncode}")
    if res.returncode < 0:
        why = writeback.describe_exit(res.returncode)  # "was killed by SIGTERM"
    detail = (res.stderr or res.stdout).strip().splitlines()
    log.warning(
        "%s: the reopen command %s %s%s",
        path,
        shlex.join(argv),
        why,
        f": {detail[-1]}" if detail else "",
    )
    return False


# -- holders by mount id -------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldFile:
    pid: int
    command: str
    what: str  # "fd 3 /srv/log/app.log"
    mount_id: int | None  # the mount the object was reached through; None: unknown (mmap)
    writable: bool  # an fd open for writing

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command}): {self.what}"


def _fd_facts(pid: int, fd: str) -> tuple[int | None, bool]:
    mnt: int | None = None
    writable = False
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "mnt_id":
                mnt = int(value)
            elif key == "flags":
                writable = int(value, 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
    return mnt, writable


def _link_mount(link: str) -> int | None:
    try:
        fd = os.open(link, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return mounts.mount_id_of_fd(fd)
    finally:
        os.close(fd)


def describe(found: list[holders.Holder]) -> list[HeldFile]:
    """What each holder holds, with the mount it reached it through."""
    out = []
    for h in found:
        kind, _, rest = h.what.partition(" ")
        mnt: int | None = None
        writable = False
        try:
            if kind == "fd":
                mnt, writable = _fd_facts(h.pid, rest.split(" ", 1)[0])
            elif kind in ("cwd", "root"):
                mnt = _link_mount(f"/proc/{h.pid}/{kind}")
        except (OSError, ValueError):
            pass  # gone meanwhile: judged as unknown
        out.append(HeldFile(h.pid, h.command, h.what, mnt, writable))
    return out


def only_writers(found: list[holders.Holder]) -> bool:
    """Every holder holds only files open for writing (what a reopen command can move); a
    working directory, a mapping or a file open for reading stays where it is."""
    return all(held.what.startswith("fd ") and held.writable for held in describe(found))


def not_on(found: list[holders.Holder], mount_id: int) -> list[HeldFile]:
    """The holdings reached through another mount than `mount_id` (or an unknown one)."""
    return [held for held in describe(found) if held.mount_id != mount_id]


def fds_on_mount(mount_id: int, exclude_pids: Collection[int] = ()) -> list[HeldFile]:
    """Processes with an open file, working or root directory on the mount `mount_id`, which
    may be detached (then no path leads to it and only the ids tell)."""
    skip = set(exclude_pids) | {os.getpid()}
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        pid = int(name)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        for kind in ("cwd", "root"):
            if _link_mount(f"/proc/{pid}/{kind}") == mount_id:
                out.append(HeldFile(pid, comm, kind, mount_id, False))
        for fd in fds:
            try:
                mnt, writable = _fd_facts(pid, fd)
                if mnt == mount_id:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    out.append(HeldFile(pid, comm, f"fd {fd} {target}", mnt, writable))
            except (OSError, ValueError):
                continue
    return out


def wait_until_empty(
    scan: Callable[[], list[HeldFile]], deadline: float = SETTLE_DEADLINE
) -> list[HeldFile]:
    """Poll `scan` until it finds nothing or `deadline` seconds have passed; returns the last
    finding."""
    end = time.monotonic() + deadline
    while True:
        found = scan()
        if not found or time.monotonic() >= end:
            return found
        time.sleep(POLL)


def listing(found: list[HeldFile]) -> str:
    shown = "; ".join(str(h) for h in found[:5])
    return shown + (f" and {len(found) - 5} more" if len(found) > 5 else "")


# -- detaching -----------------------------------------------------------------------------------


def detach(path: str) -> None:
    """umount2(path, MNT_DETACH): only after the disk was made to hold everything the overlay
    showed, and to be followed by the reopen command and `merge_window`."""
    if _libc.umount2(os.fsencode(path), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        raise mounts.MountError(
            err, f"cannot detach the overlay at {path}: {os.strerror(err)}", path
        )


# -- the record of what was applied ---------------------------------------------------------------


def generation_files(gen: str) -> dict[str, list[int]]:
    """Size and mtime of each regular file of a journal generation (before it is applied)."""
    out: dict[str, list[int]] = {}
    for dirpath, _dirs, files in os.walk(gen):
        for name in files:
            full = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(full)
                if stat.S_ISREG(st.st_mode):
                    out[os.path.relpath(full, gen)] = [st.st_size, st.st_mtime_ns]
    return out


def after_apply(files: dict[str, list[int]], disk: str) -> dict[str, list[int]]:
    """The record of an apply: for each file of the generation, its size and mtime there and
    the size and mtime of the disk file right after the apply."""
    out: dict[str, list[int]] = {}
    for rel, (size, mtime) in files.items():
        with contextlib.suppress(OSError):
            st = os.lstat(os.path.join(disk, rel))
            if stat.S_ISREG(st.st_mode):
                out[rel] = [size, mtime, st.st_size, st.st_mtime_ns]
    return out


def write_marker(journal: str, doc: dict[str, object]) -> None:
    durable.write_json(os.path.join(journal, MARKER), doc)


def read_marker(journal: str) -> dict[str, object] | None:
    try:
        with open(os.path.join(journal, MARKER)) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("unreadable %s/%s: %s", journal, MARKER, exc)
        return {}
    return doc if isinstance(doc, dict) else {}


# -- merging what landed in RAM after the apply ----------------------------------------------


@dataclass
class MergeResult:
    files: int = 0
    bytes: int = 0
    appended: int = 0
    conflicts: list[str] = field(default_factory=list)


def _same_prefix(a: str, b: str, size: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            chunk = fa.read(n)
            if chunk != fb.read(n) or len(chunk) != n:
                return False
            left -= n
    return True


def _pour(fs: IO[bytes], fd: IO[bytes]) -> int:
    """Write the rest of `fs` into `fd`; returns the bytes written."""
    n = 0
    while chunk := fs.read(1 << 20):
        fd.write(chunk)
        n += len(chunk)
    return n


def _append(src: str, offset: int, dst: str) -> int:
    with open(src, "rb") as fs, open(dst, "ab") as fd:
        fs.seek(offset)
        n = _pour(fs, fd)
        fd.flush()
        os.fsync(fd.fileno())
    return n


def _rewrite(src: str, dst: str) -> int:
    with open(src, "rb") as fs, open(dst, "r+b") as fd:
        n = _pour(fs, fd)
        fd.truncate()
        fd.flush()
        os.fsync(fd.fileno())
    return n


def _copy(src: str, dst: str) -> int:
    st = os.lstat(src)
    tmp = f"{dst}.rampiped-tmp"
    shutil.copyfile(src, tmp, follow_symlinks=False)
    os.chown(tmp, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(tmp, stat.S_IMODE(st.st_mode))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    return st.st_size


def merge_window(upper: str, disk: str, applied: dict[str, list[int]]) -> MergeResult:
    """Bring into `disk` the regular files that changed in `upper` after the apply recorded in
    `applied` (`after_apply`): the writers' last lines before they reopened on the disk.
    Deletions and renames in that moment are not carried (the disk keeps the file). What a
    writer appended to a disk file meanwhile is never overwritten: the RAM side's new bytes are
    appended after it, or, when the RAM side was not merely appended to, written next to it
    as NAME.rampiped-conflict."""
    res = MergeResult()
    for dirpath, _dirs, files in os.walk(upper):
        for name in files:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, upper)
            dst = os.path.join(disk, rel)
            try:
                ust = os.lstat(src)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(ust.st_mode):
                continue  # whiteouts, symlinks, fifos: carried by the apply already
            try:
                dst_st: os.stat_result | None = os.lstat(dst)
            except FileNotFoundError:
                dst_st = None
            if dst_st is not None and not stat.S_ISREG(dst_st.st_mode):
                continue  # the disk has a directory or a link there now: leave it
            rec = applied.get(rel)
            if rec is not None:
                gen_size, gen_mtime, disk_size, disk_mtime = rec
                if ust.st_size == gen_size and ust.st_mtime_ns == gen_mtime:
                    continue  # unchanged since the apply
                if dst_st is None:
                    res.bytes += _copy(src, dst)
                    res.files += 1
                    continue
                # In place, never by rename: a writer that reopened on the disk holds this inode.
                if ust.st_size >= gen_size and _same_prefix(src, dst, gen_size):
                    res.bytes += _append(src, gen_size, dst)
                    res.files += 1
                    res.appended += 1
                    continue
                if dst_st.st_size == disk_size and dst_st.st_mtime_ns == disk_mtime:
                    res.bytes += _rewrite(src, dst)
                    res.files += 1
                    continue
            elif dst_st is None:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                res.bytes += _copy(src, dst)
                res.files += 1
                continue
            elif dst_st.st_size == 0:
                # created on both sides after the apply (a writer reopened with O_CREAT and had
                # written nothing yet): the RAM side's lines go first
                res.bytes += _append(src, 0, dst)
                res.files += 1
                res.appended += 1
                continue
            conflict = dst + CONFLICT_SUFFIX
            res.bytes += _copy(src, conflict)
            res.files += 1
            res.conflicts.append(os.path.relpath(conflict, disk))
    with contextlib.suppress(OSError):
        durable.syncfs(disk)
    return res
