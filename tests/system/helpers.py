"""Helpers of the system tier: loop filesystems, waiting with a deadline, mount tables and the
manifest oracle (what a tree holds, as a dict that compares equal when nothing was lost)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rampiped.osutil import syncfs
from rampiped.sqlitepages import PENDING_BYTE
from rampiped.writeback.stamps import INDEX_ATTRIBUTE


@dataclass
class LoopFs:
    mountpoint: Path
    device: str
    image: Path


@contextlib.contextmanager
def make_loopfs(
    mountpoint: Path,
    size_mb: int = 256,
    fstype: str = "ext4",
    inodes: int | None = None,
    features: str = "",
) -> Iterator[LoopFs]:
    """Create an image, attach it to a loop device, make a filesystem and mount it.

    Everything is undone on exit, also when the body raised: the mounts below the mount point
    are unmounted recursively and the loop device is detached."""
    image = mountpoint.parent / (mountpoint.name + ".img")
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    device = ""
    for _ in range(20):  # another test may take the free device between find and attach
        proc = subprocess.run(
            ["losetup", "--find", "--show", str(image)], capture_output=True, text=True
        )
        if proc.returncode == 0:
            device = proc.stdout.strip()
            break
    if not device:
        raise RuntimeError(f"losetup --find --show {image} failed: {proc.stderr.strip()}")
    try:
        # lazy_*_init=0: ext4 would otherwise zero its inode tables and journal in the
        # background after the mount (16 MiB in the first seconds of a 256 MiB one), writes that
        # tests reading the device's counters would take for rampiped's
        ext_options = ["-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
        subprocess.run(
            [
                "mkfs." + fstype,
                "-q",
                *ext_options,
                *(["-N", str(inodes)] if inodes else []),
                *(["-O", features] if features else []),
                device,
            ]
            if fstype.startswith("ext")
            else ["mkfs." + fstype, device],
            check=True,
            capture_output=True,
        )
        subprocess.run(["mount", device, str(mountpoint)], check=True, capture_output=True)
        try:
            yield LoopFs(mountpoint, device, image)
        finally:
            unmount_tree(mountpoint)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)
        with contextlib.suppress(OSError):
            image.unlink()


def unmount_tree(path: Path) -> None:
    """Unmount everything at and below `path`, deepest first (never lazily)."""
    for _ in range(3):
        below = [m for m in mount_points() if m == str(path) or m.startswith(str(path) + "/")]
        if not below:
            return
        for m in sorted(below, key=len, reverse=True):
            subprocess.run(["umount", m], capture_output=True)


def mountinfo() -> list[dict[str, str]]:
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            a = left.split()
            b = right.split()
            rows.append(
                {
                    "id": a[0],
                    "parent": a[1],
                    "root": _unescape(a[3]),
                    "mountpoint": _unescape(a[4]),
                    "fstype": b[0],
                    "source": b[1],
                    "options": b[2] if len(b) > 2 else "",
                }
            )
    return rows


def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape") if "\\" in s else s


def mount_points() -> list[str]:
    return [m["mountpoint"] for m in mountinfo()]


def fstype_at(path: Path | str) -> str | None:
    found = None
    for m in mountinfo():
        if m["mountpoint"] == str(path):
            found = m["fstype"]
    return found


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `cond` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def remount(fs: LoopFs) -> None:
    """The loop filesystem unmounted and mounted again: what it holds is read from the device."""
    os.sync()
    for argv in (["umount", str(fs.mountpoint)], ["mount", fs.device, str(fs.mountpoint)]):
        proc = subprocess.run(argv, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def _xattrs(path: str) -> dict[str, str]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        if name.startswith("trusted.overlay."):
            out[name] = "LEAKED"  # an overlay attribute on disk is a defect: make it show
            continue
        if name.startswith(("user.", "system.posix_acl", "security.", "trusted.")):
            try:
                out[name] = os.getxattr(path, name, follow_symlinks=False).hex()
            except OSError:
                pass
    return out


def manifest(root: Path | str, times: bool = True, dir_times: bool = False) -> dict[str, Any]:
    """Everything a tree holds: for each relative path its type, mode, owner, size, content hash,
    symlink target, xattrs (ACLs included), mtime and hard-link groups."""
    root = str(root)
    out: dict[str, Any] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            entry: dict[str, Any] = {
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "xattrs": _xattrs(full),
            }
            if stat.S_ISDIR(st.st_mode):
                entry["type"] = "dir"
                if dir_times:
                    entry["mtime"] = st.st_mtime_ns
            elif stat.S_ISLNK(st.st_mode):
                entry["type"] = "symlink"
                entry["target"] = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                entry["type"] = "file"
                entry["size"] = st.st_size
                with open(full, "rb") as f:
                    entry["sha256"] = hashlib.sha256(f.read()).hexdigest()
                if times:
                    entry["mtime"] = st.st_mtime_ns
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    entry["link_group"] = inodes.setdefault(key, rel)
            elif stat.S_ISFIFO(st.st_mode):
                entry["type"] = "fifo"
            elif stat.S_ISCHR(st.st_mode):
                entry["type"] = f"chr {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                entry["type"] = "other"
            out[rel] = entry
    return out


def diff_manifests(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences, empty when equal."""
    out = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            out.append(f"+ {key}: {b[key]}")
        elif key not in b:
            out.append(f"- {key}: {a[key]}")
        elif a[key] != b[key]:
            fields = {k for k in set(a[key]) | set(b[key]) if a[key].get(k) != b[key].get(k)}
            out.append(
                f"~ {key}: "
                + ", ".join(f"{k}: {a[key].get(k)!r} != {b[key].get(k)!r}" for k in sorted(fields))
            )
    return out


def drop_lone_link_groups(m: dict[str, Any]) -> dict[str, Any]:
    """A copy of manifest `m` without hard-link groups that have a single member in the tree.

    An overlay shows a disk file whose hard-link partner was copied up (and so separated from
    it) with the disk inode's link count; written back, that file really has fewer links. The
    groups that matter, two or more names sharing an inode, are kept."""
    sizes: dict[str, int] = {}
    for entry in m.values():
        if "link_group" in entry:
            sizes[entry["link_group"]] = sizes.get(entry["link_group"], 0) + 1
    out = {}
    for key, entry in m.items():
        if sizes.get(entry.get("link_group", ""), 0) == 1:
            entry = {k: v for k, v in entry.items() if k != "link_group"}
        out[key] = entry
    return out


_HOLD_OPEN = (
    "import sys; f = open(sys.argv[1], 'a'); f.write(sys.argv[2]); f.flush();"
    " print('ready', flush=True); sys.stdin.read(); f.write(sys.argv[3])"
)


@contextlib.contextmanager
def holding_open(path: Path, first: str = "", last: str = "") -> Iterator[subprocess.Popen[str]]:
    """A separate process that holds `path` open for appending: it has written `first` when
    this yields, and writes `last` when `release`d. Killed at the end whatever happened."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_OPEN, str(path), first, last],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def release(proc: subprocess.Popen[str]) -> int:
    """Let a `holding_open` process write its last text and exit; its exit status."""
    assert proc.stdin is not None
    proc.stdin.close()
    return proc.wait(10)


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry below `root` by relative path: a regular file's bytes, "dir", "-> TARGET"
    for a symlink, the type otherwise."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    out[rel] = f.read()
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = "-> " + os.readlink(full)
            else:
                out[rel] = f"type {stat.S_IFMT(st.st_mode):o}"
    return out


@contextlib.contextmanager
def sqlite_shared_lock(db: Path) -> Iterator[None]:
    """SQLite's SHARED lock on `db` (a read lock on its shared byte range, os_unix.c), waited
    for; an open-file-description lock, so that it also excludes this process's own
    checkpoints (a classic POSIX lock would not)."""
    fd = os.open(db, os.O_RDONLY | os.O_CLOEXEC)
    try:
        shared = struct.pack("@hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, PENDING_BYTE + 2, 510, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, shared)
        yield
    finally:
        os.close(fd)  # releases the lock


def bytes_written(fs: LoopFs) -> int:
    """Bytes the loop device of `fs` wrote so far: its own counter (sectors, field 7 of
    /sys/block/loopN/stat), the filesystem's journal and metadata included."""
    fields = Path(f"/sys/block/{Path(fs.device).name}/stat").read_text().split()
    return int(fields[6]) * 512


def syncfs_path(path: Path) -> None:
    """syncfs(2) of the filesystem that holds `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)


def held_index(hold: Path) -> bytes | None:
    """The index of a hold directory: its file, else its first save, in the directory's
    attribute (rampiped.writeback.stamps.INDEX_ATTRIBUTE); None without either."""
    index = hold / "held.json"
    data = index.read_bytes() if index.exists() else None
    if not data:
        with contextlib.suppress(OSError):
            data = os.getxattr(hold, INDEX_ATTRIBUTE)
    return data


def small_files(where: Path, n: int, tag: str, dirs: int = 100) -> None:
    """`n` files of 200 bytes, `TAG I ...`, spread over `dirs` directories d00, d01, ... below
    `where` (the checkpoint-cost workload of the tests and the benchmark)."""
    for i in range(n):
        sub = where / f"d{i % dirs:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}").write_text(f"{tag} {i} ".ljust(200, "."))
