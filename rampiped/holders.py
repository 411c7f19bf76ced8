"""Which processes hold a directory: open files, working or root directories, file mappings,
and mount namespaces that still show a pin.

A pin is refused while anything holds its directory (a writer that kept an fd from before the
pin writes past the overlay), and an unpin whose unmount is busy names the holders instead of
detaching lazily (DESIGN.md §4). Holders are looked up in /proc, like fuser(1) and lsof(8) do,
but comparing the filesystem object held rather than only the path string:

* /proc/PID/fd/N, /proc/PID/cwd, /proc/PID/root and the paths in /proc/PID/maps name the object
  as the holding process sees it: for a process in another mount namespace the path is
  relative to that namespace's root and may differ from ours.
* Each path is mapped through the holder's own mount table to (superblock, path inside that
  filesystem) and compared with the regions `path` covers on our side: the filesystem path
  below each of our mounts stacked at or above `path`, and the whole of each mount below it.
  Thus an fd opened through a bind mount elsewhere, through a mount that a pin later covered
  (the writer that kept its fd), or through another namespace's copy of the mount all count.
* When the mounts the path could have come through disagree (a mount was placed over a
  directory after the file was opened), the kernel is asked which mount the object is on:
  `mnt_id` in /proc/PID/fdinfo/N, or an O_PATH open of /proc/PID/cwd, root or map_files.
  st_dev is not used: files on an overlay report the device of the layer they come from.

Limits: a process chrooted inside another mount namespace has its mount table relative to its
chroot while its fd paths are relative to the namespace root; the root link bridges that, but a
file opened outside the chroot is not mapped (mounts outside a process's root are not listed).
Threads that unshared their working directory (CLONE_FS) are seen through their thread group
leader only. A mount namespace kept alive only by a bind mount of its nsfs file, with no process
in it, cannot be found by scanning processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from rampiped import mounts
from rampiped.mounts import MountEntry

_DELETED = " (deleted)"

# Unit types a process can run in (systemd.unit(5)); slices only group other units.
_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str
    unit: str | None
    what: str  # "fd 3 /var/log/nginx/access.log", "cwd /var/log/nginx", "mmap /x/lib.so", ...

    def __str__(self) -> str:
        who = self.command if self.unit is None else f"{self.command}, {self.unit}"
        return f"pid {self.pid} ({who}): {self.what}"


@dataclass(frozen=True)
class HolderScan:
    """The result of one pass over /proc."""

    holders: tuple[Holder, ...]
    # Processes whose /proc entries this process may not read (EACCES/EPERM, e.g. a process
    # with capabilities we lack): they could not be judged either way.
    uninspected: tuple[int, ...]
    processes: int  # how many processes were looked at
    seconds: float  # monotonic duration of the scan


def unit_of(pid: int) -> str | None:
    """The systemd unit `pid` runs in (nginx.service, session-3.scope), or None when it runs
    in none or is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return unit_from_cgroup(f.read())
    except OSError:
        return None


def unit_from_cgroup(text: str) -> str | None:
    """The unit in the text of /proc/PID/cgroup: the innermost unit of the unified hierarchy's
    path ("0::"), else of cgroup v1's named systemd hierarchy. Slices only group units."""
    lines = text.splitlines()
    paths = [line[3:] for line in lines if line.startswith("0::")]
    paths += [line.split(":", 2)[2] for line in lines if ":name=systemd:" in line]
    for path in paths:
        for part in reversed(path.split("/")):
            if part.endswith(_UNIT_SUFFIXES):
                return part
    return None


def _command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return "?"


def _within(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


def _tail(path: str, mountpoint: str) -> str:
    """The part of `path` below `mountpoint` ("" or "/..."); `path` must be within it."""
    if path == mountpoint:
        return ""
    return path if mountpoint == "/" else path[len(mountpoint) :]


def _join(root: str, tail: str) -> str:
    if not tail:
        return root
    return tail if root == "/" else root + tail


@dataclass
class _Table:
    """One mount namespace's mount table, as seen by one of its processes, indexed by mount
    point (made relative to the namespace root) and by mount id."""

    by_point: dict[str, list[MountEntry]] = field(default_factory=dict)
    by_id: dict[int, MountEntry] = field(default_factory=dict)
    points: dict[int, str] = field(default_factory=dict)  # mount id -> namespace-root path

    @classmethod
    def of(cls, entries: Iterable[MountEntry], root_prefix: str = "/") -> _Table:
        table = cls()
        for e in entries:
            point = e.mountpoint
            if root_prefix != "/":  # a chrooted process: its table is relative to its root
                point = root_prefix if point == "/" else root_prefix + point
            table.by_point.setdefault(point, []).append(e)
            table.by_id[e.mount_id] = e
            table.points[e.mount_id] = point
        return table

    def candidates(self, path: str) -> list[MountEntry]:
        """Mounts whose mount point is `path` or one of its ancestors."""
        found = list(self.by_point.get("/", ()))
        i = 0
        while True:
            i = path.find("/", i + 1)
            prefix = path if i < 0 else path[:i]
            if prefix and prefix != "/":
                found.extend(self.by_point.get(prefix, ()))
            if i < 0:
                return found


class _Regions:
    """What `path` covers on our side, as (superblock, directory inside that filesystem)."""

    def __init__(self, entries: Iterable[MountEntry], target: str) -> None:
        self.dirs: dict[str, list[str]] = {}
        for e in entries:
            if _within(target, e.mountpoint):
                rel = _join(e.root, _tail(target, e.mountpoint))
            elif _within(e.mountpoint, target):
                rel = e.root
            else:
                continue
            self.dirs.setdefault(e.major_minor, []).append(rel)

    def covers(self, entry: MountEntry, point: str, path: str) -> bool:
        """`path`, reached through `entry` mounted at `point`, is inside a region."""
        dirs = self.dirs.get(entry.major_minor)
        if not dirs:
            return False
        rel = _join(entry.root, _tail(path, point))
        return any(_within(rel, d) for d in dirs)


@dataclass
class _Namespace:
    table: _Table
    pids: list[int] = field(default_factory=list)  # its processes that were scanned


class _Scanner:
    def __init__(self, target: str, mount_source: str | None) -> None:
        self.own_ns = os.readlink("/proc/self/ns/mnt")
        own_entries = mounts.mountinfo()
        self.own_table = _Table.of(own_entries)
        self.regions = _Regions(own_entries, target)
        self.mount_source = mount_source
        # An unmount propagates through the parent of the unmounted mount: to the child at the
        # same place in every mount that receives propagation from that parent. Collect the
        # peer groups of the parents of our mounts of the pin.
        own_by_id = {e.mount_id: e for e in own_entries}
        self.pin_groups = {
            parent.shared
            for e in own_entries
            if e.source == mount_source
            and (parent := own_by_id.get(e.parent_id)) is not None
            and parent.shared is not None
        }
        # Propagation between peer groups, master -> groups that are also its slaves, learnt
        # from every table read: a mount "shared:M master:N" passes on what N propagates.
        self.relays: dict[int, set[int]] = {}
        self._learn_propagation(own_entries)
        self.namespaces: dict[tuple[str, str], _Namespace] = {}
        self.verdicts: dict[tuple[int, str], bool | None] = {}  # None: ask the kernel

    def _learn_propagation(self, entries: Iterable[MountEntry]) -> None:
        for e in entries:
            if e.shared is not None and e.master is not None:
                self.relays.setdefault(e.master, set()).add(e.shared)

    def namespace(self, pid: int, ns: str, root: str) -> _Namespace:
        key = (ns, root)
        found = self.namespaces.get(key)
        if found is None:
            entries = mounts.mountinfo(pid)
            self._learn_propagation(entries)
            found = self.namespaces[key] = _Namespace(_Table.of(entries, root))
        return found

    def pin_holders(self) -> list[tuple[int, str]]:
        """(pid, what) for the processes of other namespaces that still show the pin and will
        not lose it by propagation when we unmount ours: copies whose parent does not receive
        propagation from the parent of ours, and copies with something mounted inside them
        (propagation leaves those in place, and private; a mount right on top of a copy does
        not keep it: the kernel unmounts the copy and puts the covering mount in its place)."""
        if self.mount_source is None:
            return []
        groups = set(self.pin_groups)
        todo = list(groups)
        while todo:
            for g in self.relays.get(todo.pop(), ()):
                if g not in groups:
                    groups.add(g)
                    todo.append(g)
        out = []
        for ns in self.namespaces.values():
            # Mounts that have a mount inside them (not merely on top of them).
            parents = {
                e.parent_id
                for e in ns.table.by_id.values()
                if (up := ns.table.by_id.get(e.parent_id)) is not None
                and up.mountpoint != e.mountpoint
            }
            for e in ns.table.by_id.values():
                if e.source != self.mount_source:
                    continue
                parent = ns.table.by_id.get(e.parent_id)
                follows = parent is not None and (
                    parent.shared in groups or parent.master in groups
                )
                if follows and e.mount_id not in parents:
                    continue  # goes with our unmount, or makes it fail with EBUSY
                point = ns.table.points[e.mount_id]
                out += [(pid, f"mount namespace still shows the pin at {point}") for pid in ns.pids]
        return out

    def holds(self, table: _Table, path: str, exact: Callable[[], int]) -> bool:
        """The object at `path` (as the holder sees it) is inside the target on our side."""
        if not path.startswith("/"):
            return False  # socket:[..], pipe:[..], anon_inode:..., or a detached mount
        if path.endswith(_DELETED):
            path = path[: -len(_DELETED)]
        key = (id(table), path)  # the same libraries and logs show up in many processes
        if key in self.verdicts:
            verdict = self.verdicts[key]
        else:
            verdicts = {
                self.regions.covers(e, table.points[e.mount_id], path)
                for e in table.candidates(path)
            }
            verdict = self.verdicts[key] = (verdicts == {True}) if len(verdicts) <= 1 else None
        if verdict is not None:
            return verdict
        # The object could have come through mounts that disagree: ask the kernel which one.
        entry = table.by_id.get(exact())
        return entry is not None and self.regions.covers(entry, table.points[entry.mount_id], path)

    def scan_process(self, pid: int) -> list[str]:
        """What `pid` holds inside the target; raises OSError when it vanished or is closed
        to us."""
        proc = f"/proc/{pid}"
        ns_id = os.readlink(f"{proc}/ns/mnt")
        root = os.readlink(f"{proc}/root")
        if ns_id != self.own_ns:
            ns = self.namespace(pid, ns_id, root)
            table = ns.table
            note = f" (in mount namespace {ns_id})"
        else:
            # In our namespace the links are relative to our root, chrooted or not.
            ns, table, note = None, self.own_table, ""
        found: list[str] = []

        cwd = os.readlink(f"{proc}/cwd")
        if self.holds(table, cwd, _mount_id_via_open(f"{proc}/cwd")):
            found.append(f"cwd {cwd}{note}")
        if self.holds(table, root, _mount_id_via_open(f"{proc}/root")):
            found.append(f"root {root}{note}")

        try:
            fds = os.listdir(f"{proc}/fd")
        except FileNotFoundError:
            fds = []
        for name in sorted(fds, key=int):
            try:
                held = os.readlink(f"{proc}/fd/{name}")
                exact = _mount_id_via_fdinfo(f"{proc}/fdinfo/{name}")
                if self.holds(table, held, exact):
                    found.append(f"fd {name} {held}{note}")
            except FileNotFoundError:
                continue  # closed meanwhile

        for mapped, span in _mapped_files(pid):
            try:
                if self.holds(table, mapped, _mount_id_via_open(f"{proc}/map_files/{span}")):
                    found.append(f"mmap {mapped}{note}")
            except FileNotFoundError:
                continue  # unmapped meanwhile

        if ns is not None:
            ns.pids.append(pid)
        return found


def _mount_id_via_open(link: str) -> Callable[[], int]:
    """Asks for the mount of what a /proc magic link points to, by opening it (O_PATH)."""

    def ask() -> int:
        fd = os.open(link, os.O_PATH | os.O_CLOEXEC)
        try:
            return mounts.mount_id_of_fd(fd)
        finally:
            os.close(fd)

    return ask


def _mount_id_via_fdinfo(fdinfo: str) -> Callable[[], int]:
    def ask() -> int:
        return mounts.fdinfo_mount_id(fdinfo)

    return ask


def _mapped_files(pid: int) -> list[tuple[str, str]]:
    """Distinct files mapped by `pid` with the address range of one mapping of each."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    seen: dict[bytes, bytes] = {}
    for line in data.splitlines():
        # "start-end perms offset dev inode   /path": only the path can contain " /".
        i = line.find(b" /")
        if i >= 0:
            seen.setdefault(line[i + 1 :], line[: line.find(b" ")])
    return [
        # \012 is the one character maps escapes in a path
        (os.fsdecode(raw.replace(b"\\012", b"\n")), span.decode())
        for raw, span in seen.items()
    ]


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def scan_holders(
    path: str, *, exclude_pids: Collection[int] = (), mount_source: str | None = None
) -> HolderScan:
    """Every process, other than this one and `exclude_pids`, that holds something at or
    below `path`: an open file, its working or root directory, or a file mapping. With
    `mount_source`, also every process in another mount namespace whose table still has a
    mount with that source and that will not follow our unmount by propagation: after the
    unmount here it would keep writing into RAM that is about to be freed. Call it again after
    the unmount: copies that propagation could not remove show up then.

    Processes that exit during the scan are skipped; processes we may not inspect are listed
    in `uninspected`."""
    start = time.monotonic()
    target = os.path.realpath(path)
    scanner = _Scanner(target, mount_source)
    skip = set(exclude_pids) | {os.getpid()}
    found: dict[int, list[str]] = {}
    uninspected: list[int] = []
    count = 0
    for pid in _pids():
        if pid in skip:
            continue
        count += 1
        try:
            found[pid] = scanner.scan_process(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited during the scan
        except OSError:
            uninspected.append(pid)  # EACCES/EPERM: we may not look
    for pid, what in scanner.pin_holders():
        found[pid].append(what)
    holders: list[Holder] = []
    for pid, whats in found.items():
        if whats:  # read once per process, not once per thing it holds
            command, unit = _command_of(pid), unit_of(pid)
            holders += [Holder(pid, command, unit, what) for what in whats]
    return HolderScan(tuple(holders), tuple(uninspected), count, time.monotonic() - start)


def find_holders(
    path: str, *, exclude_pids: Collection[int] = (), mount_source: str | None = None
) -> list[Holder]:
    """`scan_holders(...).holders` as a list."""
    return list(scan_holders(path, exclude_pids=exclude_pids, mount_source=mount_source).holders)
