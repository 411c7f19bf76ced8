"""Mounting, unmounting and reading the mount table.

mount(2) and umount2(2) are called directly through libc: mount(8) would add its own parsing,
fstab lookups and helpers, and turn the kernel's errno into text that cannot be matched. Every
operation checks what it can before the syscall, so that an error names the path that is wrong
rather than a bare EINVAL from the kernel.

There is deliberately no lazy unmount (MNT_DETACH) here: detaching a pin that still has users
shows the disk again at the path while the old users keep writing into RAM that is about to be
freed (DESIGN.md §4).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from rampiped import tree

# <sys/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_SHARED = 1 << 20
MS_PRIVATE = 0x40000
MS_NOSYMFOLLOW = 0x100  # Linux 5.10: symlinks on the mount are not followed by path lookups
UMOUNT_NOFOLLOW = 0x8  # a symlink as the last component of the target is not followed

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int

# Names of the directories overlayfs creates inside its workdir: a workdir holding only these
# was used by an overlay before and may be reused.
_OVERLAY_WORKDIR_ENTRIES = frozenset({"work", "index"})

# Characters that the legacy overlay option string treats as separators or escapes. The layer
# paths rampiped passes are its own (under the runtime dir), so refusing them costs nothing and
# avoids depending on how a given kernel unescapes them.
_OVERLAY_SPECIAL = (",", ":", "\\")


class MountError(OSError):
    """A mount operation failed; the message names the operation, the path(s) and the reason."""

    def __init__(self, err: int, message: str, path: str | None = None) -> None:
        super().__init__(err, message)
        self.message = message
        self.filename = path

    def __str__(self) -> str:
        return self.message


class MountBusy(MountError):
    """umount(2) said EBUSY: something still uses the mount. Find out what with
    `rampiped.holders.find_holders`; never detach it lazily."""


def _errno_text(err: int) -> str:
    name = errno.errorcode.get(err, str(err))
    meaning = {
        errno.EBUSY: "busy",
        errno.EPERM: "not permitted (needs CAP_SYS_ADMIN in the mount namespace's user namespace)",
        errno.ENODEV: "filesystem type not supported by this kernel",
        errno.ENOENT: "no such file or directory",
        errno.ENOTDIR: "not a directory",
        errno.ENOMEM: "out of kernel memory",
        errno.EACCES: "permission denied",
    }.get(err, os.strerror(err))
    return f"{meaning} ({name})"


def _fail(what: str, err: int, path: str) -> MountError:
    cls = MountBusy if err == errno.EBUSY else MountError
    return cls(err, f"{what}: {_errno_text(err)}", path)


def _mount(
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None,
) -> int:
    """Returns 0 or the errno of mount(2)."""
    rc = _libc.mount(
        os.fsencode(source) if source is not None else None,
        os.fsencode(target),
        fstype.encode() if fstype is not None else None,
        flags,
        os.fsencode(data) if data is not None else None,
    )
    return ctypes.get_errno() if rc != 0 else 0


def _umount(target: str) -> int:
    # Mount points are directories; a symlink in their place was put there by someone else.
    rc = _libc.umount2(os.fsencode(target), UMOUNT_NOFOLLOW)
    return ctypes.get_errno() if rc != 0 else 0


def _check_exists(what: str, role: str, path: str) -> os.stat_result:
    """stat() `path`; the error says which role (mount point, layer, source) is wrong."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise MountError(errno.ENOENT, f"{what}: {role} {path} does not exist", path) from None
    except OSError as e:
        err = e.errno or errno.EIO
        raise MountError(
            err, f"{what}: cannot stat {role} {path}: {_errno_text(err)}", path
        ) from None


def _check_dir(what: str, role: str, path: str) -> os.stat_result:
    st = _check_exists(what, role, path)
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(errno.ENOTDIR, f"{what}: {role} {path} is not a directory", path)
    return st


def mount_tmpfs(
    target: str, *, size: int, mode: int, uid: int, gid: int, source: str = "rampiped"
) -> None:
    """Mount a tmpfs of `size` bytes on `target` whose root has `mode`, `uid` and `gid`.

    `source` shows in /proc/*/mountinfo; give each pin its own so that a mount namespace that
    still holds a copy of it can be recognised (`holders.find_holders(mount_source=...)`)."""
    what = f"cannot mount tmpfs on {target}"
    if size <= 0:
        raise MountError(errno.EINVAL, f"{what}: size must be positive, not {size}", target)
    if not 0 <= mode <= 0o7777:
        raise MountError(errno.EINVAL, f"{what}: mode {mode:o} is not a permission mode", target)
    _check_dir(what, "mount point", target)
    data = f"size={size},mode={mode:04o},uid={uid},gid={gid}"
    err = _mount(source, target, "tmpfs", MS_NOSUID | MS_NODEV, data)
    if err:
        raise _fail(f"{what} (options {data})", err, target)


def bind(
    source: str,
    target: str,
    *,
    private: bool = True,
    readonly: bool = False,
    nosymfollow: bool = False,
) -> None:
    """Bind `source` onto `target` (not recursively: submounts of `source` are not carried).

    With `private`, the new mount leaves its peer group before anything else happens to it: a
    bind of a directory on a shared mount joins that mount's peer group, and would receive
    every later mount below the source path, the pin's own overlay included. If the parent of
    `target` is itself shared, the bind still appears in that parent's peers for the instant
    before it is made private; keep staging binds below a private mount to avoid that.

    With `nosymfollow`, no path lookup through the new mount follows a symlink on it: a
    directory that other users can write into may be swapped for a symlink at any moment, and
    what root writes through such a bind must stay inside it.

    On failure after the bind was made, the bind is undone before the error is raised."""
    what = f"cannot bind {source} on {target}"
    src = _check_exists(what, "source", source)
    dst = _check_exists(what, "target", target)
    if stat.S_ISDIR(src.st_mode) != stat.S_ISDIR(dst.st_mode):
        kind = "a directory" if stat.S_ISDIR(src.st_mode) else "not a directory"
        raise MountError(
            errno.ENOTDIR,
            f"{what}: source is {kind} but target is "
            + ("a directory" if stat.S_ISDIR(dst.st_mode) else "not a directory"),
            target,
        )
    err = _mount(source, target, None, MS_BIND, None)
    if err:
        raise _fail(what, err, target)
    try:
        if private:
            err = _mount(None, target, None, MS_PRIVATE, None)
            if err:
                raise _fail(f"cannot make the bind of {source} on {target} private", err, target)
        if readonly or nosymfollow:
            flags = MS_BIND | MS_REMOUNT
            flags |= (MS_RDONLY if readonly else 0) | (MS_NOSYMFOLLOW if nosymfollow else 0)
            err = _mount(None, target, None, flags, None)
            if err:
                how = " and ".join(
                    w for w, on in (("read-only", readonly), ("nosymfollow", nosymfollow)) if on
                )
                raise _fail(f"cannot make the bind of {source} on {target} {how}", err, target)
    except MountError:
        _umount(target)  # best effort: the original error is the one to report
        raise


def make_private(path: str) -> None:
    """Take the mount at `path` out of its peer group (MS_PRIVATE): mounts below it no longer
    propagate to or from other namespaces."""
    err = _mount(None, path, None, MS_PRIVATE, None)
    if err == errno.EINVAL and not is_mountpoint(path):
        raise MountError(err, f"cannot make {path} private: not a mount point (EINVAL)", path)
    if err:
        raise _fail(f"cannot make {path} private", err, path)


def make_shared(path: str) -> None:
    """Put the mount at `path` in a peer group (MS_SHARED); after make_private, a group of its
    own: mounts and unmounts below it then reach the copies that namespaces created later
    hold as slaves, and nothing from outside propagates in."""
    err = _mount(None, path, None, MS_SHARED, None)
    if err:
        raise _fail(f"cannot make {path} shared", err, path)


def overlay_options(
    *, lower: str, upper: str, work: str, features: str, what: str = "bad overlay options"
) -> str:
    """The option string of `mount_overlay`, checked for characters that would need escaping
    and for layer options hidden in `features`; errors start with `what`."""
    for role, path in (("lowerdir", lower), ("upperdir", upper), ("workdir", work)):
        bad = sorted({c for c in _OVERLAY_SPECIAL if c in path})
        if bad:
            raise MountError(
                errno.EINVAL,
                f"{what}: {role} {path} contains {' '.join(repr(c) for c in bad)}, which the "
                "overlay option string uses as separators; use a path without them",
                path,
            )
        if not os.path.isabs(path):
            raise MountError(errno.EINVAL, f"{what}: {role} {path} is not absolute", path)
    for opt in features.split(","):
        key = opt.split("=", 1)[0].strip()
        if not key:
            raise MountError(errno.EINVAL, f"{what}: empty option in features {features!r}")
        if key in ("lowerdir", "upperdir", "workdir", "lowerdir+", "datadir+"):
            raise MountError(
                errno.EINVAL, f"{what}: features {features!r} must not set the layers ({key})"
            )
    return f"lowerdir={lower},upperdir={upper},workdir={work},{features}"


def mount_overlay(
    target: str, *, lower: str, upper: str, work: str, features: str, source: str
) -> None:
    """Mount an overlay of `lower` (read-only layer) and `upper` (where writes go) on `target`.

    `features` are the behaviour options chosen on purpose (e.g.
    "redirect_dir=on,index=off,metacopy=off,xino=off"), never left to the kernel's defaults.
    Checked first: every layer and the target exist and are directories; upper and work are on
    the same mount and in separate subtrees; work is empty or an old overlay workdir; the
    options fit into one page (the limit of mount(2)'s data)."""
    what = f"cannot mount overlay on {target}"
    _check_dir(what, "mount point", target)
    _check_dir(what, "lowerdir", lower)
    _check_dir(what, "upperdir", upper)
    _check_dir(what, "workdir", work)
    data = overlay_options(lower=lower, upper=upper, work=work, features=features, what=what)

    upper_mnt = mount_containing(upper)
    work_mnt = mount_containing(work)
    if upper_mnt.mount_id != work_mnt.mount_id:
        raise MountError(
            errno.EXDEV,
            f"{what}: upperdir {upper} ({upper_mnt.fstype} mounted at {upper_mnt.mountpoint}) "
            f"and workdir {work} ({work_mnt.fstype} mounted at {work_mnt.mountpoint}) are not on "
            "the same mount",
            work,
        )
    layers = [("lowerdir", lower), ("upperdir", upper), ("workdir", work)]
    for i, (role_a, a) in enumerate(layers):
        for role_b, b in layers[i + 1 :]:
            real_a, real_b = os.path.realpath(a), os.path.realpath(b)
            if _within(real_a, real_b) or _within(real_b, real_a):
                raise MountError(
                    errno.EINVAL,
                    f"{what}: {role_a} {a} and {role_b} {b} overlap; the layers must be "
                    "separate directories, none inside another",
                    b,
                )
    try:
        leftovers = sorted(set(os.listdir(work)) - _OVERLAY_WORKDIR_ENTRIES)
    except OSError as e:
        raise MountError(
            e.errno or errno.EIO,
            f"{what}: cannot list workdir {work}: {_errno_text(e.errno or 0)}",
            work,
        ) from None
    if leftovers:
        shown = ", ".join(leftovers[:5]) + (", ..." if len(leftovers) > 5 else "")
        raise MountError(
            errno.ENOTEMPTY,
            f"{what}: workdir {work} is not empty and not an overlay workdir (holds {shown})",
            work,
        )
    page = os.sysconf("SC_PAGESIZE")
    if len(os.fsencode(data)) + 1 > page:
        raise MountError(
            errno.E2BIG,
            f"{what}: the option string is {len(os.fsencode(data))} bytes, more than mount(2) "
            f"accepts ({page - 1})",
            target,
        )
    err = _mount(source, target, "overlay", 0, data)
    if err:
        raise _fail(f"{what} (options {data})", err, target)


def umount(target: str) -> None:
    """Unmount `target` with a plain umount2(target, 0).

    EBUSY raises `MountBusy` and leaves the mount in place: find the holders and try again
    later. There is no lazy variant on purpose."""
    err = _umount(target)
    if not err:
        return
    what = f"cannot unmount {target}"
    if err == errno.EINVAL:
        raise MountError(err, f"{what}: not a mount point (EINVAL)", target)
    raise _fail(what, err, target)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/PID/mountinfo, unescaped (see proc(5))."""

    mount_id: int
    parent_id: int
    major_minor: str  # "8:1": the superblock's device number
    root: str  # the directory of the filesystem that is mounted (not "/" for binds)
    mountpoint: str  # relative to the reading process's root
    options: str  # per-mount options: "rw,nosuid,relatime"
    optional_fields: tuple[str, ...]  # "shared:12", "master:3", "propagate_from:2", "unbindable"
    fstype: str
    source: str
    super_options: str  # per-superblock options: "rw,size=65536k,mode=755"

    @property
    def dev(self) -> int:
        major, minor = self.major_minor.split(":")
        return os.makedev(int(major), int(minor))

    @property
    def shared(self) -> int | None:
        """The peer group id when this mount is shared, else None."""
        return _tagged(self.optional_fields, "shared:")

    @property
    def master(self) -> int | None:
        """The peer group this mount receives propagation from (a slave), else None."""
        return _tagged(self.optional_fields, "master:")


def _tagged(fields: Iterable[str], tag: str) -> int | None:
    for f in fields:
        if f.startswith(tag):
            return int(f[len(tag) :])
    return None


_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unescape(raw: bytes) -> str:
    """Undo the kernel's octal escapes (\\040 space, \\011 tab, \\012 newline, \\134 backslash);
    names that are not UTF-8 round-trip through os.fsdecode."""
    if b"\\" in raw:
        raw = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), raw)
    return os.fsdecode(raw)


def parse_mountinfo(data: bytes) -> list[MountEntry]:
    entries = []
    for line in data.splitlines():
        if not line:
            continue
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    major_minor=fields[2].decode(),
                    root=_unescape(fields[3]),
                    mountpoint=_unescape(fields[4]),
                    options=fields[5].decode(),
                    optional_fields=tuple(f.decode() for f in fields[6:sep]),
                    fstype=_unescape(fields[sep + 1]),
                    source=_unescape(fields[sep + 2]),
                    super_options=_unescape(fields[sep + 3]) if len(fields) > sep + 3 else "",
                )
            )
        except (ValueError, IndexError):
            raise ValueError(f"unexpected line in mountinfo: {line!r}") from None
    return entries


def mountinfo(pid: int | str = "self") -> list[MountEntry]:
    """The mount table of `pid`'s mount namespace, mount points as seen from its root.

    Raises FileNotFoundError / ProcessLookupError when the process is gone."""
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        return parse_mountinfo(f.read())


def _within(path: str, top: str) -> bool:
    """`path` is `top` or below it, comparing whole components (/x/ab is not below /x/a)."""
    return path == top or top == "/" or path.startswith(top + "/")


def _strictly_below(path: str, top: str) -> bool:
    return path != top and _within(path, top)


def is_mountpoint(path: str) -> bool:
    """Something is mounted at `path` (also when a later mount hides it)."""
    real = os.path.realpath(path)
    return any(e.mountpoint == real for e in mountinfo())


def mounts_below(path: str) -> list[MountEntry]:
    """Mounts strictly below `path`, in mount table order."""
    real = os.path.realpath(path)
    return [e for e in mountinfo() if _strictly_below(e.mountpoint, real)]


def _top_of_stack(entries: list[MountEntry]) -> MountEntry | None:
    """Of several mounts on one mount point, the one mounted last (not a parent of another)."""
    if not entries:
        return None
    parents = {e.parent_id for e in entries}
    tops = [e for e in entries if e.mount_id not in parents]
    return (tops or entries)[-1]


def mount_at(path: str) -> MountEntry | None:
    """The uppermost mount whose mount point is `path`, or None."""
    real = os.path.realpath(path)
    return _top_of_stack([e for e in mountinfo() if e.mountpoint == real])


def fdinfo_mount_id(fdinfo: str) -> int:
    """The mount id in a /proc/PID/fdinfo/N file: the mount the descriptor's object was
    reached through (in the namespace of the process that opened it)."""
    with open(fdinfo) as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOSYS, f"no mnt_id in {fdinfo} (Linux < 3.15)")


def mount_id_of_fd(fd: int) -> int:
    """The id of the mount an open file descriptor of this process refers to."""
    return fdinfo_mount_id(f"/proc/self/fdinfo/{fd}")


def mount_containing(path: str) -> MountEntry:
    """The mount that `path` resolves into.

    Asked of the kernel (the mount id of an O_PATH descriptor) rather than worked out from the
    longest mount point prefix, which is wrong when a mount hides another or a path crosses a
    mount that was moved."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        mnt_id = mount_id_of_fd(fd)
    finally:
        os.close(fd)
    for e in mountinfo():
        if e.mount_id == mnt_id:
            return e
    # Only when the mount was detached between open and reading the table.
    raise MountError(
        errno.ENOENT, f"{path} is on mount {mnt_id}, which is not in the mount table", path
    )


def fs_type(path: str) -> str:
    """The filesystem type of the mount `path` is on ("ext4", "tmpfs", "overlay", ...)."""
    return mount_containing(path).fstype


def du(path: str) -> int:
    """Bytes allocated to the tree at `path` (st_blocks * 512), each inode counted once, symlinks
    not followed and mounts below `path` not entered."""
    root = os.path.realpath(path)
    skip = {e.mountpoint for e in mountinfo() if _strictly_below(e.mountpoint, root)}
    seen: set[tuple[int, int]] = set()
    st = os.lstat(root)
    total = st.st_blocks * 512
    if not stat.S_ISDIR(st.st_mode):
        return total
    for _rel, st in tree.walk(root, skip=skip):
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:  # hard links: the inode once
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
        total += st.st_blocks * 512
    return total


SYS_OPEN_TREE = 428  # the same number on every architecture (Linux 5.2)
OPEN_TREE_CLONE = 1
AT_FDCWD = -100


def clone_mount(path: str) -> int:
    """A private copy of the mount at `path` that no path leads to (open_tree(2) with
    OPEN_TREE_CLONE; not recursive: submounts are not in it), as a descriptor of its root.
    The copy goes away when the descriptor is closed; nothing is left in the mount table, even
    when the process dies. Raises MountError (ENOSYS before Linux 5.2)."""
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPEN_TREE),
        ctypes.c_int(AT_FDCWD),
        os.fsencode(path),
        ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC),
    )
    if fd < 0:
        raise _fail(f"cannot clone the mount at {path}", ctypes.get_errno(), path)
    return int(fd)
