"""Writing a RAM layer back to disk: overlay upper layers, checkpoint journals, rsync.

An overlay upper layer is not a plain tree. Whiteouts (character devices 0:0) stand for deleted
names, `trusted.overlay.opaque` marks directories that replaced the disk's, and
`trusted.overlay.redirect` marks directories that were renamed (their disk content lives under
another path). `apply_upper` turns such a layer into plain changes of the directory on disk so
that the directory then holds what the merged view showed:

1. scan the layer and refuse (before touching anything) what it cannot apply faithfully: real
   device nodes, metacopy files, whiteouts in xattr form, malformed redirects;
2. move every redirect origin into a stash directory inside the target (same filesystem, so a
   rename), deepest first, then move each one to the place its directory was renamed to. A plan
   file in the stash records the progress, so an apply that was cut short (power loss) resumes
   instead of moving directories twice;
3. delete what whiteouts, opaque directories and type changes removed, fd-relative and without
   following symlinks;
4. copy everything else with rsync (no --delete anywhere: an empty layer deletes nothing);
5. syncfs, then verify that the disk shows every entry of the layer.

A real device node in a pinned tree is not supported: the layer is refused.

Checkpoints copy the upper layer of a mounted overlay, whiteouts and overlay xattrs included,
into a journal of generations on disk (`checkpoint`); after a crash the last complete generation
is applied with the same rules (`apply_journal`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

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

# Inside the target directory (its filesystem, so moving an origin there is a rename).
STASH_NAME = ".rampiped-apply"
_PLAN_NAME = "plan.json"
_PLAN_VERSION = 1

_GEN_RE = re.compile(r"gen-([0-9]+)")
_GEN_TMP_RE = re.compile(r"gen-([0-9]+)\.tmp")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Exit codes of rsync (rsync(1), EXIT VALUES), and the shell's 126/127.
RSYNC_EXIT_MEANINGS: dict[int, str] = {
    1: "syntax or usage error",
    2: "protocol incompatibility",
    3: "errors selecting input/output files or directories",
    4: "requested action not supported",
    5: "error starting client-server protocol",
    6: "daemon unable to append to log file",
    10: "error in socket I/O",
    11: "error in file I/O (for example a full disk or a failing device)",
    12: "error in the rsync protocol data stream (often the receiver died: disk full, I/O error)",
    13: "errors with program diagnostics",
    14: "error in IPC code",
    20: "received SIGUSR1 or SIGINT",
    21: "some error returned by waitpid()",
    22: "error allocating core memory buffers",
    23: "partial transfer due to error (some files or attributes were not transferred)",
    24: "partial transfer due to vanished source files",
    25: "the --max-delete limit stopped deletions",
    30: "timeout in data send/receive",
    35: "timeout waiting for daemon connection",
    126: "the command could not be executed",
    127: "rsync is not installed (command not found)",
}


def overlay_options(lower: str, upper: str, work: str) -> str:
    """The -o argument of `mount -t overlay` for one pin, with the features fixed above."""
    for role, path in (("lowerdir", lower), ("upperdir", upper), ("workdir", work)):
        if not os.path.isabs(path):
            raise ValueError(f"overlay {role} must be an absolute path: {path!r}")
        bad = sorted({c for c in path if c in ",:\\" or c.isspace() or ord(c) < 32})
        if bad:
            # mount(8) splits options at commas and overlayfs splits lowerdir at colons; an
            # escaped path is easy to get subtly wrong, so such paths are refused outright.
            raise ValueError(
                f"overlay {role} {path!r} contains {', '.join(repr(c) for c in bad)}, "
                "which overlay mount options cannot carry"
            )
    return f"lowerdir={lower},upperdir={upper},workdir={work},{OVERLAY_FEATURES}"


# --- test pause points ------------------------------------------------------------------------

# For the crash and power-cut tests only, and inert unless both variables are set: when
# RAMPIPED_TEST_PAUSE_AT names a stage (see the pause_point calls: "pin:layers", "pin:mounted",
# "checkpoint:copied", "checkpoint:renamed", "copy-checkpoint:copied", "unpin:unmounted",
# "unpin:journaled", "unpin:applied"), the thread that reaches it writes the stage into
# RAMPIPED_TEST_PAUSE_FILE and blocks until that file is removed, so that a test can kill -9
# the daemon, drop its RAM, or play a hostile user at exactly that point of the operation.
PAUSE_ENV = "RAMPIPED_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "RAMPIPED_TEST_PAUSE_FILE"


def pause_point(stage: str) -> None:
    wanted = os.environ.get(PAUSE_ENV)
    marker = os.environ.get(PAUSE_FILE_ENV)
    if not wanted or not marker or stage not in wanted.split(","):
        return
    log.warning("test pause point %s reached: blocking (%s is set)", stage, PAUSE_ENV)
    with open(marker, "w") as f:
        f.write(stage + "\n")
    while os.path.exists(marker):
        time.sleep(0.05)
    log.warning("test pause point %s released", stage)


# --- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[list[str]], CommandResult]


def run_command(argv: list[str]) -> CommandResult:
    """Run a command to completion and capture its output (the default Runner)."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]}: command not found")
    except PermissionError as e:
        return CommandResult(126, "", f"{argv[0]}: {e.strerror}")
    return CommandResult(
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


class SyncError(Exception):
    """A write-back or checkpoint that did not complete; the message says what to look at."""

    def __init__(
        self, message: str, *, argv: list[str] | None = None, returncode: int | None = None
    ) -> None:
        super().__init__(message)
        self.argv = argv
        self.returncode = returncode

    @classmethod
    def from_command(cls, action: str, argv: list[str], result: CommandResult) -> SyncError:
        return cls(
            f"{action} failed: `{shlex.join(argv)}` {describe_exit(result.returncode)}"
            + _cause_hint(result.stderr)
            + _tail(result.stderr),
            argv=argv,
            returncode=result.returncode,
        )


def describe_exit(returncode: int) -> str:
    """'exited with code 23 (partial transfer ...)' or 'was killed by signal SIGKILL'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    meaning = RSYNC_EXIT_MEANINGS.get(returncode, "unknown exit code")
    return f"exited with code {returncode} ({meaning})"


def _cause_hint(stderr: str) -> str:
    if "No space left on device" in stderr:
        return "; cause: the disk is full (No space left on device)"
    if "Disk quota exceeded" in stderr:
        return "; cause: a disk quota is exceeded"
    if "Input/output error" in stderr:
        return "; cause: an I/O error on a device"
    if "Read-only file system" in stderr:
        return "; cause: the filesystem is read-only"
    return ""


def _tail(text: str, lines: int = 8, chars: int = 1500) -> str:
    text = text.strip()
    if not text:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])[-chars:]
    return f"; stderr: {tail}"


_FSYNC_SUPPORT: dict[str | None, bool] = {}


def _rsync_has_fsync(runner: Runner) -> bool:
    """Whether this rsync knows --fsync (3.2.4 and later); raises if rsync is missing."""
    key = shutil.which("rsync")
    if key in _FSYNC_SUPPORT:
        return _FSYNC_SUPPORT[key]
    argv = ["rsync", "--version"]
    result = runner(argv)
    if result.returncode == 127:
        raise SyncError(
            f"rsync is not installed: `{shlex.join(argv)}` {describe_exit(127)}",
            argv=argv,
            returncode=127,
        )
    found = re.search(r"version\s+v?(\d+)\.(\d+)\.(\d+)", result.stdout)
    version = tuple(int(g) for g in found.groups()) if found else (0, 0, 0)
    supported = version >= (3, 2, 4)
    if result.returncode == 0:
        _FSYNC_SUPPORT[key] = supported
    return supported


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyResult:
    files: int  # regular files written back
    bytes: int  # their data (each hard-linked inode once)
    deleted: int  # entries removed from disk (whiteouts, opaque dirs, type changes, replaced)
    seconds: float


@dataclass(frozen=True)
class CheckpointResult:
    generation: int
    files: int  # regular files copied (unchanged ones are hard links to the last generation)
    bytes: int
    seconds: float


# --- reading a layer --------------------------------------------------------------------------


@dataclass
class _UpperDir:
    rel: str  # "" for the layer root
    opaque: bool
    redirect: str | None
    children: dict[str, str] = field(default_factory=dict)  # name -> kind
    lower: str | None = None  # the lower path its lower content comes from; None: no lower
    # (atime, mtime) in ns of the directory itself ("" in the root) and of its entries that
    # are neither regular files nor whiteouts
    times: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class _Layer:
    root: str
    dirs: dict[str, _UpperDir]  # parents before children (insertion order)
    files: int
    bytes: int
    link_groups: list[list[str]]  # regular files that share an inode in the layer


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _xattr_text(path: str, name: str) -> str | None:
    try:
        return os.fsdecode(os.getxattr(path, name, follow_symlinks=False))
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _kind(st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "whiteout" if st.st_rdev == 0 else "chardev"
    if stat.S_ISBLK(mode):
        return "blockdev"
    return "other"


def _scan_layer(root: str) -> _Layer:
    """Read the layer's structure; raise SyncError for anything apply cannot reproduce."""
    try:
        st = os.lstat(root)
    except OSError as e:
        raise SyncError(f"layer {root} cannot be read: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise SyncError(f"layer {root} is not a directory (a symlink or a file): refusing it")
    dirs: dict[str, _UpperDir] = {"": _UpperDir("", False, None)}
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
            child_rel = _join(rel, name)
            child_path = os.path.join(path, name)
            try:
                cst = os.lstat(child_path)
                attrs = set(os.listxattr(child_path, follow_symlinks=False))
            except OSError as e:
                raise SyncError(f"layer entry {child_path} cannot be read: {e.strerror}") from e
            kind = _kind(cst)
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
                dirs[child_rel] = _UpperDir(child_rel, opaque_value == "y", redirect)
                queue.append(child_rel)
            elif kind == "file":
                files += 1
                key = (cst.st_dev, cst.st_ino)
                if key not in seen_inodes:
                    nbytes += cst.st_size
                    seen_inodes[key] = []
                if cst.st_nlink > 1:
                    seen_inodes[key].append(child_rel)
        if rel == "" and STASH_NAME in current.children:
            problems.append(f"{root} holds an entry named {STASH_NAME}, which write-back reserves")
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise SyncError(f"refusing to apply layer {root}, nothing was changed: {shown}{more}")
    layer = _Layer(root, dirs, files, nbytes, [g for g in seen_inodes.values() if len(g) > 1])
    _resolve_lower_paths(layer)
    return layer


def _valid_redirect(value: str) -> bool:
    if "\0" in value or not value:
        return False
    # A relative redirect is one name in the parent's lower directory.
    parts = value[1:].split("/") if value.startswith("/") else [value]
    return all(p not in ("", ".", "..") for p in parts)


def _resolve_lower_paths(layer: _Layer) -> None:
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
            d.lower = _join(parent_lower, d.redirect)
        else:
            d.lower = _join(parent_lower, name)


def _moves(layer: _Layer) -> list[tuple[str, str]]:
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


# --- fd-relative operations on the target -----------------------------------------------------


def _open_dir_at(dir_fd: int, name: str) -> int:
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dir_fd: int, name: str) -> int:
    """Remove `name` below `dir_fd`, a whole tree if it is a directory, never following a
    symlink; returns how many entries went."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return 1
    removed = 0
    fd = _open_dir_at(dir_fd, name)
    # (parent fd, name in parent, own fd, names still to remove)
    stack: list[tuple[int, str, int, list[str]]] = [(dir_fd, name, fd, os.listdir(fd))]
    try:
        while stack:
            parent_fd, own_name, own_fd, pending = stack[-1]
            if not pending:
                stack.pop()
                os.close(own_fd)
                os.rmdir(own_name, dir_fd=parent_fd)
                removed += 1
                continue
            child = pending.pop()
            cst = os.stat(child, dir_fd=own_fd, follow_symlinks=False)
            if stat.S_ISDIR(cst.st_mode):
                child_fd = _open_dir_at(own_fd, child)
                stack.append((own_fd, child, child_fd, os.listdir(child_fd)))
            else:
                os.unlink(child, dir_fd=own_fd)
                removed += 1
    finally:
        for _, _, own_fd, _ in stack:
            os.close(own_fd)
    return removed


@contextlib.contextmanager
def _opened(path: str) -> Iterator[int]:
    fd = os.open(path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_rel(root_fd: int, rel: str) -> int | None:
    """Open directory `rel` below root_fd without following symlinks; None when any component
    is missing or is not a real directory."""
    fd = os.dup(root_fd)
    if not rel:
        return fd
    try:
        for part in rel.split("/"):
            try:
                nfd = _open_dir_at(fd, part)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return None
                raise
            os.close(fd)
            fd = nfd
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def _make_dirs_rel(root_fd: int, rel: str) -> tuple[int, int]:
    """Open directory `rel` below root_fd, creating missing components and replacing any
    component that is not a real directory (the layer has a directory there, so the merged
    view did too). Returns (fd, entries deleted)."""
    deleted = 0
    fd = os.dup(root_fd)
    try:
        for part in rel.split("/") if rel else []:
            st = _lstat_at(fd, part)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                deleted += _remove_at(fd, part)
                st = None
            if st is None:
                os.mkdir(part, 0o700, dir_fd=fd)  # rsync gives it the layer's mode later
            nfd = _open_dir_at(fd, part)
            os.close(fd)
            fd = nfd
        result, fd = fd, -1
        return result, deleted
    finally:
        if fd >= 0:
            os.close(fd)


def _fsync_dir(fd: int) -> None:
    os.fsync(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int, path: str) -> None:
    """Flush the whole filesystem holding `fd`; it also reports earlier writeback errors."""
    if _libc.syncfs(ctypes.c_int(fd)) != 0:
        err = ctypes.get_errno()
        raise SyncError(f"syncfs on {path} failed: {os.strerror(err)} (errno {err})")


# --- the stash: moving renamed directories, resumable -----------------------------------------


def _layer_identity(upper: str) -> str:
    st = os.lstat(upper)
    return f"{os.path.realpath(upper)}:{st.st_dev}:{st.st_ino}:{st.st_ctime_ns}"


def _read_plan(stash_fd: int) -> dict[str, object] | None:
    try:
        fd = os.open(_PLAN_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stash_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    try:
        plan = json.loads(data)
    except ValueError:
        return None
    return plan if isinstance(plan, dict) and plan.get("version") == _PLAN_VERSION else None


def _write_plan(stash_fd: int, plan: dict[str, object]) -> None:
    """Atomically (temporary file, fsync, rename, fsync of the directory)."""
    tmp = _PLAN_NAME + ".tmp"
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=stash_fd,
    )
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps(plan, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, _PLAN_NAME, src_dir_fd=stash_fd, dst_dir_fd=stash_fd)
    _fsync_dir(stash_fd)


def _remove_stash(target_fd: int, target: str) -> None:
    st = _lstat_at(target_fd, STASH_NAME)
    if st is None:
        return
    stash_fd = _open_dir_at(target_fd, STASH_NAME)
    try:
        leftover = [n for n in os.listdir(stash_fd) if n not in (_PLAN_NAME, _PLAN_NAME + ".tmp")]
        if leftover:
            raise SyncError(
                f"{target}/{STASH_NAME} still holds {leftover[:5]} after write-back; left in "
                "place for inspection"
            )
        for n in (_PLAN_NAME, _PLAN_NAME + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(n, dir_fd=stash_fd)
    finally:
        os.close(stash_fd)
    os.rmdir(STASH_NAME, dir_fd=target_fd)
    _fsync_dir(target_fd)


def _clear_finished_stash(target_fd: int, target: str) -> None:
    st = _lstat_at(target_fd, STASH_NAME)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        stash_fd = _open_dir_at(target_fd, STASH_NAME)
        try:
            plan = _read_plan(stash_fd)
            others = [n for n in os.listdir(stash_fd) if n not in (_PLAN_NAME, _PLAN_NAME + ".tmp")]
        finally:
            os.close(stash_fd)
        if not others and (plan is None or plan.get("phase") == "done"):
            _remove_stash(target_fd, target)
            return
    raise SyncError(
        f"{target}/{STASH_NAME} holds an interrupted write-back and there is no journal to "
        f"resume it from: {target} is partly written; inspect it by hand"
    )


def _move_renamed_dirs(
    target_fd: int, target: str, upper: str, moves: list[tuple[str, str]]
) -> tuple[int, bool]:
    """Stash every origin, then place each at its destination. Returns (entries deleted,
    whether a stash directory exists now). Resumes a plan left by an interrupted apply of the
    same layer; refuses one left by another layer."""
    identity = _layer_identity(upper)
    encoded = [[o, d] for o, d in moves]
    deleted = 0
    st = _lstat_at(target_fd, STASH_NAME)
    plan: dict[str, object] | None = None
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise SyncError(f"{target}/{STASH_NAME} exists and is not a directory; refusing")
        stash_fd = _open_dir_at(target_fd, STASH_NAME)
        try:
            plan = _read_plan(stash_fd)
            others = [n for n in os.listdir(stash_fd) if n not in (_PLAN_NAME, _PLAN_NAME + ".tmp")]
        finally:
            os.close(stash_fd)
        same = plan is not None and plan.get("layer") == identity and plan.get("moves") == encoded
        if same:
            log.info("resuming an interrupted write-back of %s into %s", upper, target)
        elif (plan is not None and plan.get("phase") == "done" and not others) or (
            plan is None and not others
        ):
            _remove_stash(target_fd, target)  # a finished apply's leftover: nothing pending
            plan = None
        else:
            raise SyncError(
                f"{target}/{STASH_NAME} holds an interrupted write-back of another layer "
                f"({plan.get('layer') if plan else 'no readable plan'}); {target} is partly "
                "written. Refusing to apply a different layer on top; inspect it by hand"
            )
    if plan is None:
        if not moves:
            return 0, False
        # Before touching anything: every origin must be a real directory on disk, or this
        # layer does not belong to this directory.
        for origin, dest in moves:
            fd = _open_rel(target_fd, origin)
            if fd is None:
                raise SyncError(
                    f"refusing to apply layer {upper} to {target}, nothing was changed: the "
                    f"directory renamed to {dest!r} came from {origin!r}, which is not a "
                    "directory on disk (is this the layer of another directory?)"
                )
            os.close(fd)
        os.mkdir(STASH_NAME, 0o700, dir_fd=target_fd)
        plan = {"version": _PLAN_VERSION, "layer": identity, "moves": encoded, "phase": "stash"}
        stash_fd = _open_dir_at(target_fd, STASH_NAME)
        try:
            _write_plan(stash_fd, plan)
        finally:
            os.close(stash_fd)
        _fsync_dir(target_fd)

    stash_fd = _open_dir_at(target_fd, STASH_NAME)
    try:
        if plan["phase"] == "stash":
            for i, (origin, _dest) in enumerate(moves):
                if _lstat_at(stash_fd, str(i)) is not None:
                    continue  # moved before the interruption
                parent, _, name = origin.rpartition("/")
                pfd = _open_rel(target_fd, parent)
                if pfd is None or _lstat_at(pfd, name) is None:
                    if pfd is not None:
                        os.close(pfd)
                    raise SyncError(f"renamed origin {origin!r} vanished from {target}")
                try:
                    log.debug("stashing %s/%s", target, origin)
                    os.rename(name, str(i), src_dir_fd=pfd, dst_dir_fd=stash_fd)
                    _fsync_dir(pfd)
                finally:
                    os.close(pfd)
            _fsync_dir(stash_fd)
            plan["phase"] = "place"
            _write_plan(stash_fd, plan)
        if plan["phase"] == "place":
            order = sorted(range(len(moves)), key=lambda i: (moves[i][1].count("/"), moves[i][1]))
            for i in order:
                if _lstat_at(stash_fd, str(i)) is None:
                    continue  # placed before the interruption
                dest = moves[i][1]
                parent, _, name = dest.rpartition("/")
                pfd, n = _make_dirs_rel(target_fd, parent)
                deleted += n
                try:
                    if _lstat_at(pfd, name) is not None:
                        deleted += _remove_at(pfd, name)
                    log.debug("placing %s at %s/%s", moves[i][0], target, dest)
                    os.rename(str(i), name, src_dir_fd=stash_fd, dst_dir_fd=pfd)
                    _fsync_dir(pfd)
                finally:
                    os.close(pfd)
            plan["phase"] = "placed"
            _write_plan(stash_fd, plan)
    finally:
        os.close(stash_fd)
    return deleted, True


def _undo_moves(target_fd: int, target: str, upper: str) -> bool:
    """Reverse the moves of this layer's plan (placements first, deepest destination first;
    then origins back, shallowest first) and remove the stash. False when there is no plan of
    this layer (nothing was moved, or the stash belongs to another layer: left alone)."""
    if _lstat_at(target_fd, STASH_NAME) is None:
        return False
    stash_fd = _open_dir_at(target_fd, STASH_NAME)
    try:
        plan = _read_plan(stash_fd)
        if plan is None or plan.get("layer") != _layer_identity(upper):
            return False
        raw = plan.get("moves")
        assert isinstance(raw, list)
        moves = [(str(o), str(d)) for o, d in raw]
        placement = sorted(range(len(moves)), key=lambda i: (moves[i][1].count("/"), moves[i][1]))
        for i in reversed(placement if plan.get("phase") != "stash" else []):
            if _lstat_at(stash_fd, str(i)) is not None:
                continue  # never placed
            parent, _, name = moves[i][1].rpartition("/")
            pfd = _open_rel(target_fd, parent)
            if pfd is None or _lstat_at(pfd, name) is None:
                if pfd is not None:
                    os.close(pfd)
                raise SyncError(f"the directory moved to {target}/{moves[i][1]} is gone")
            try:
                os.rename(name, str(i), src_dir_fd=pfd, dst_dir_fd=stash_fd)
            finally:
                os.close(pfd)
        for i in reversed(range(len(moves))):  # stash order reversed: shallowest origin first
            if _lstat_at(stash_fd, str(i)) is None:
                continue  # never stashed
            parent, _, name = moves[i][0].rpartition("/")
            pfd, _ = _make_dirs_rel(target_fd, parent)
            try:
                if _lstat_at(pfd, name) is not None:
                    # made by this apply after the origin moved out (the layer holds it)
                    _remove_at(pfd, name)
                os.rename(str(i), name, src_dir_fd=stash_fd, dst_dir_fd=pfd)
                _fsync_dir(pfd)
            finally:
                os.close(pfd)
    finally:
        os.close(stash_fd)
    _remove_stash(target_fd, target)
    return True


def _mark_stash_done(target_fd: int) -> None:
    stash_fd = _open_dir_at(target_fd, STASH_NAME)
    try:
        plan = _read_plan(stash_fd)
        if plan is not None:
            plan["phase"] = "done"
            _write_plan(stash_fd, plan)
    finally:
        os.close(stash_fd)


# --- deletions --------------------------------------------------------------------------------


def _apply_deletions(layer: _Layer, target_fd: int) -> int:
    """Delete on disk what the layer removed: names under whiteouts, entries of directories
    without lower content (opaque) that the layer does not hold, and entries whose type the
    layer changed. Walks layer and disk together, fd-relative, never following a symlink."""
    deleted = 0
    # (layer directory, fd of the disk directory) still to visit
    stack: list[tuple[_UpperDir, int]] = [(layer.dirs[""], os.dup(target_fd))]
    try:
        while stack:
            d, fd = stack.pop()
            try:
                if d.lower is None:
                    for name in os.listdir(fd):
                        if name not in d.children:
                            deleted += _remove_at(fd, name)
                for name, kind in d.children.items():
                    st = _lstat_at(fd, name)
                    if st is None:
                        continue
                    disk_kind = _kind(st)
                    if kind == "whiteout":
                        deleted += _remove_at(fd, name)
                    elif kind == "dir":
                        if disk_kind != "dir":
                            deleted += _remove_at(fd, name)
                        else:
                            stack.append((layer.dirs[_join(d.rel, name)], _open_dir_at(fd, name)))
                    elif disk_kind != kind or (kind != "file" and st.st_nlink > 1):
                        # rsync replaces a regular file by writing a new one and renaming it
                        # over (that also breaks disk hard links, as copy-up did); anything
                        # else of another type, or a hard-linked special file, goes first.
                        deleted += _remove_at(fd, name)
            finally:
                os.close(fd)
    finally:
        for _, fd in stack:
            os.close(fd)
    return deleted


def _set_times(layer: _Layer, target_fd: int) -> None:
    """Give directories, symlinks and fifos the layer's times to the nanosecond. rsync
    compares their times to the second and leaves one made in the same second as the layer's
    with its own (a directory that rsync filled has the time of its last change)."""
    os.utime(target_fd, ns=layer.dirs[""].times[""])
    stack: list[tuple[_UpperDir, int]] = [(layer.dirs[""], os.dup(target_fd))]
    try:
        while stack:
            d, fd = stack.pop()
            try:
                for name, ns in d.times.items():
                    if name == "" and d.rel == "":
                        continue
                    os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)
                    if d.children[name] == "dir":
                        stack.append((layer.dirs[_join(d.rel, name)], _open_dir_at(fd, name)))
            finally:
                os.close(fd)
    finally:
        for _, fd in stack:
            os.close(fd)


# --- apply ------------------------------------------------------------------------------------


def _rsync_apply_argv(upper: str, target: str, fsync: bool) -> list[str]:
    argv = [
        "rsync",
        "-aHAX",  # recursive, symlinks, perms, times, owner, group, specials; links, ACLs, xattrs
        "--numeric-ids",
        # Every file in the layer changed (it was copied up); size and mtime equal to the disk's
        # prove nothing, and a skipped file would get its attributes changed in place, on an
        # inode that disk hard links may share.
        "--ignore-times",
        "--no-devices",  # whiteouts were handled above; real devices were refused
        "--filter=-x trusted.overlay.*",
        "--info=nonreg0",  # no line per skipped whiteout
    ]
    if fsync:
        argv.append("--fsync")
    argv += [upper.rstrip("/") + "/", target.rstrip("/") + "/"]
    return argv


def _check_paths(upper: str, target: str) -> None:
    try:
        st = os.lstat(target)
    except OSError as e:
        raise SyncError(f"target {target} cannot be used: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise SyncError(f"target {target} is not a directory (a symlink or a file): refusing")
    try:
        ust = os.lstat(upper)
    except FileNotFoundError as e:
        raise SyncError(
            f"layer {upper} does not exist: refusing to write back (nothing was changed)"
        ) from e
    if not stat.S_ISDIR(ust.st_mode):
        raise SyncError(f"layer {upper} is not a directory: refusing to write back")
    ru, rt = os.path.realpath(upper), os.path.realpath(target)
    if _at_or_below(ru, rt) or _at_or_below(rt, ru):
        raise SyncError(f"layer {upper} and target {target} overlap: refusing")


def _at_or_below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def apply_upper(upper: str, target: str, *, runner: Runner = run_command) -> ApplyResult:
    """Make `target` (the directory on disk) hold what the overlay showed, given the upper layer
    of that overlay (unmounted) or a journal copy of it. Raises SyncError, with `target`
    possibly partly written, unless the result was verified on disk."""
    return _apply(upper, target, runner, keep_plan=False)


def _apply(upper: str, target: str, runner: Runner, *, keep_plan: bool) -> ApplyResult:
    start = time.monotonic()
    upper = os.path.abspath(upper)
    target = os.path.abspath(target)
    _check_paths(upper, target)
    layer = _scan_layer(upper)
    moves = _moves(layer)
    fsync = _rsync_has_fsync(runner)
    deleted = 0
    with _opened(target) as target_fd:
        try:
            try:
                n, stashed = _move_renamed_dirs(target_fd, target, upper, moves)
                deleted += n
                deleted += _apply_deletions(layer, target_fd)
            except OSError as e:
                raise SyncError(
                    f"write-back of {upper} into {target} failed while moving or deleting "
                    f"{e.filename or ''}: {e.strerror}; {target} is partly written, the layer "
                    "is unchanged"
                ) from e
            argv = _rsync_apply_argv(upper, target, fsync)
            result = runner(argv)
            if result.returncode != 0:
                raise SyncError.from_command(
                    f"write-back of {upper} into {target} (partly written; the layer is unchanged)",
                    argv,
                    result,
                )
            try:
                _set_times(layer, target_fd)
            except OSError as e:
                raise SyncError(
                    f"write-back of {upper} into {target}: setting the times of "
                    f"{e.filename or 'a directory'} failed: {e.strerror}"
                ) from e
            _syncfs(target_fd, target)
            problems = verify_applied(upper, target)
            if problems:
                shown = "; ".join(problems[:10])
                more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
                raise SyncError(
                    f"write-back of {upper} into {target} did not verify: {shown}{more}"
                )
        except SyncError as e:
            # Put renamed directories back where the layer expects them, so that the same
            # layer can be mounted over the directory again (everything else apply did is
            # hidden under the layer or repeated by it) and a later apply starts afresh. A
            # process that dies here instead leaves the plan, and the next apply resumes it.
            try:
                moved_back = _undo_moves(target_fd, target, upper)
            except (OSError, SyncError) as undo_error:
                raise SyncError(
                    f"{e}; moving the renamed directories back also failed ({undo_error}); "
                    f"the next apply of {upper} resumes from {target}/{STASH_NAME}",
                    argv=e.argv,
                    returncode=e.returncode,
                ) from e
            if moved_back:
                raise SyncError(
                    f"{e}; the directories renamed in the layer were moved back",
                    argv=e.argv,
                    returncode=e.returncode,
                ) from e
            raise
        if stashed:
            if keep_plan:
                _mark_stash_done(target_fd)
            else:
                _remove_stash(target_fd, target)
            os.utime(target_fd, ns=layer.dirs[""].times[""])  # the stash touched the root
    return ApplyResult(layer.files, layer.bytes, deleted, time.monotonic() - start)


# --- verification -----------------------------------------------------------------------------


def _interesting_xattrs(path: str | None, name: str, dir_fd: int | None) -> dict[str, bytes]:
    """xattrs that write-back must carry (ACLs and user/trusted ones); overlay ones separately."""
    # os.listxattr/getxattr take a path or an fd, not dir_fd: read via /proc/self/fd.
    full = f"/proc/self/fd/{dir_fd}/{name}" if dir_fd is not None else (path or name)
    out: dict[str, bytes] = {}
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError:
        return out
    for n in names:
        if n.startswith("security."):
            continue  # labels follow the disk's policy, not the layer
        try:
            out[n] = os.getxattr(full, n, follow_symlinks=False)
        except OSError:
            pass
    return out


def verify_applied(upper: str, target: str) -> list[str]:
    """Differences between a layer and the disk after applying it ([] when none): every entry
    the layer holds is on disk with the same type, mode, owner, size, mtime, symlink target,
    xattrs and hard links; names under whiteouts are absent; directories without lower content
    hold nothing else; no trusted.overlay.* attribute reached the disk."""
    layer = _scan_layer(upper)
    diffs: list[str] = []
    with _opened(target) as target_fd:
        ust = os.lstat(upper)
        tst = os.fstat(target_fd)
        diffs += _compare("/", ust, tst)
        stack: list[tuple[_UpperDir, int]] = [(layer.dirs[""], os.dup(target_fd))]
        try:
            while stack:
                d, fd = stack.pop()
                try:
                    diffs += _verify_dir(layer, d, fd, stack)
                finally:
                    os.close(fd)
        finally:
            for _, fd in stack:
                os.close(fd)
        for group in layer.link_groups:
            inodes = set()
            for rel in group:
                parent, _, name = rel.rpartition("/")
                pfd = _open_rel(target_fd, parent)
                if pfd is None:
                    continue
                try:
                    st = _lstat_at(pfd, name)
                finally:
                    os.close(pfd)
                if st is not None:
                    inodes.add((st.st_dev, st.st_ino))
            if len(inodes) > 1:
                diffs.append(f"{group}: hard links in the layer are separate files on disk")
    return diffs


def _verify_dir(
    layer: _Layer, d: _UpperDir, fd: int, stack: list[tuple[_UpperDir, int]]
) -> list[str]:
    diffs: list[str] = []
    upper_dir = os.path.join(layer.root, d.rel) if d.rel else layer.root
    if d.lower is None:
        for name in os.listdir(fd):
            if name not in d.children and not (d.rel == "" and name == STASH_NAME):
                diffs.append(f"{_join(d.rel, name)}: on disk but not in the layer")
    for name, kind in d.children.items():
        rel = _join(d.rel, name)
        st = _lstat_at(fd, name)
        if kind == "whiteout":
            if st is not None:
                diffs.append(f"{rel}: deleted in the layer, still on disk ({_kind(st)})")
            continue
        if st is None:
            diffs.append(f"{rel}: missing on disk")
            continue
        ust = os.lstat(os.path.join(upper_dir, name))
        diffs += _compare(rel, ust, st)
        if _kind(st) != kind:
            continue
        if kind == "symlink":
            want = os.readlink(os.path.join(upper_dir, name))
            have = os.readlink(name, dir_fd=fd)
            if want != have:
                diffs.append(f"{rel}: symlink target {have!r} on disk, {want!r} in the layer")
        want_x = {
            k: v
            for k, v in _interesting_xattrs(os.path.join(upper_dir, name), name, None).items()
            if not k.startswith("trusted.overlay.")
        }
        have_x = _interesting_xattrs(None, name, fd)
        leaked = sorted(k for k in have_x if k.startswith("trusted.overlay."))
        if leaked:
            diffs.append(f"{rel}: overlay attributes reached the disk: {leaked}")
        have_x = {k: v for k, v in have_x.items() if not k.startswith("trusted.overlay.")}
        if want_x != have_x:
            keys = sorted(k for k in set(want_x) | set(have_x) if want_x.get(k) != have_x.get(k))
            diffs.append(f"{rel}: xattrs differ: {keys}")
        if kind == "dir":
            stack.append((layer.dirs[rel], _open_dir_at(fd, name)))
    return diffs


def _compare(rel: str, want: os.stat_result, have: os.stat_result) -> list[str]:
    kind_w, kind_h = _kind(want), _kind(have)
    if kind_w != kind_h:
        return [f"{rel}: {kind_h} on disk, {kind_w} in the layer"]
    out = []
    for label, a, b in (
        ("mode", stat.S_IMODE(want.st_mode), stat.S_IMODE(have.st_mode)),
        ("uid", want.st_uid, have.st_uid),
        ("gid", want.st_gid, have.st_gid),
    ):
        if a != b:
            shown = (oct(a), oct(b)) if label == "mode" else (a, b)
            out.append(f"{rel}: {label} {shown[1]} on disk, {shown[0]} in the layer")
    if kind_w == "file" and want.st_size != have.st_size:
        out.append(f"{rel}: size {have.st_size} on disk, {want.st_size} in the layer")
    # A directory's mtime moves whenever an entry is added or removed, also by a process that
    # writes into the directory on disk while the write-back runs (the overlay is unmounted by
    # then): it carries no data, and failing the write-back over it would keep the pin in RAM,
    # growing, for nothing. _set_times still gives directories the layer's times.
    if want.st_mtime_ns != have.st_mtime_ns and kind_w != "dir":
        out.append(f"{rel}: mtime {have.st_mtime_ns} on disk, {want.st_mtime_ns} in the layer")
    return out


# --- checkpoint journal -----------------------------------------------------------------------


def _generations(journal_fd: int) -> tuple[dict[int, str], list[str]]:
    complete: dict[int, str] = {}
    partial: list[str] = []
    for name in os.listdir(journal_fd):
        if m := _GEN_RE.fullmatch(name):
            st = _lstat_at(journal_fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                complete[int(m.group(1))] = name
        elif _GEN_TMP_RE.fullmatch(name):
            partial.append(name)
    return complete, partial


def _parse_stat(text: str, label: str) -> int:
    m = re.search(re.escape(label) + r":\s*([0-9][0-9,.']*)", text)
    return int(re.sub(r"[^0-9]", "", m.group(1))) if m else 0


def checkpoint(upper: str, journal: str, *, runner: Runner = run_command) -> CheckpointResult:
    """Copy the upper layer of a mounted overlay (whiteouts, trusted.overlay.* attributes and
    all: a faithful copy of the layer) into a new generation of `journal`, on disk outside the
    pinned tree. The generation is written as gen-N.tmp, flushed, renamed to gen-N and the
    older ones removed: a power cut at any point leaves the last complete generation. Files
    unchanged since the last generation are hard links to it."""
    start = time.monotonic()
    upper = os.path.abspath(upper)
    journal = os.path.abspath(journal)
    if _at_or_below(os.path.realpath(journal), os.path.realpath(upper)):
        raise ValueError(f"journal {journal} must not be inside the layer {upper}")
    try:
        ust = os.lstat(upper)
    except FileNotFoundError as e:
        raise SyncError(f"layer {upper} does not exist: no checkpoint taken") from e
    if not stat.S_ISDIR(ust.st_mode):
        raise SyncError(f"layer {upper} is not a directory: no checkpoint taken")
    if not os.path.isdir(journal):
        parent = os.path.dirname(journal)
        os.makedirs(journal, mode=0o700, exist_ok=True)
        with _opened(parent) as pfd:
            _fsync_dir(pfd)
    with _opened(journal) as jfd:
        complete, partial = _generations(jfd)
        for name in partial:  # a checkpoint cut short: never used, removed now
            _remove_at(jfd, name)
        latest = max(complete, default=0)
        gen = latest + 1
        tmp_name = f"gen-{gen}.tmp"
        # --modify-window=-1: compare times to the nanosecond; rsync's default of whole
        # seconds would hard-link a same-size rewrite within one second from the last
        # generation, stale
        argv = ["rsync", "-aHAX", "--numeric-ids", "--modify-window=-1", "--stats"]
        if latest:
            argv.append(f"--link-dest={journal}/{complete[latest]}")
        argv += [upper + "/", f"{journal}/{tmp_name}/"]
        _rsync_has_fsync(runner)  # says "rsync is not installed" when it is not
        result = runner(argv)
        # 24: a file vanished while the live layer was copied (deleted or renamed through the
        # overlay meanwhile); the next checkpoint sees the new state, and this one is as good
        # as any copy of a layer that is being written.
        if result.returncode not in (0, 24):
            raise SyncError.from_command(f"checkpoint of {upper} into {journal}", argv, result)
        pause_point("checkpoint:copied")
        tmp_fd = _open_dir_at(jfd, tmp_name)
        try:
            _syncfs(tmp_fd, f"{journal}/{tmp_name}")
        finally:
            os.close(tmp_fd)
        os.rename(tmp_name, f"gen-{gen}", src_dir_fd=jfd, dst_dir_fd=jfd)
        _fsync_dir(jfd)
        pause_point("checkpoint:renamed")
        for name in complete.values():
            _remove_at(jfd, name)
        _fsync_dir(jfd)
    return CheckpointResult(
        gen,
        _parse_stat(result.stdout, "Number of regular files transferred"),
        _parse_stat(result.stdout, "Total transferred file size"),
        time.monotonic() - start,
    )


def latest_generation(journal: str) -> str | None:
    """Path of the newest complete generation in `journal`, or None."""
    try:
        with _opened(journal) as jfd:
            complete, _ = _generations(jfd)
    except FileNotFoundError:
        return None
    if not complete:
        return None
    return os.path.join(os.path.abspath(journal), complete[max(complete)])


def apply_journal(journal: str, target: str, *, runner: Runner = run_command) -> ApplyResult | None:
    """Apply the newest complete generation of `journal` to `target` (as apply_upper does),
    verify it, then remove the generations. None when there is no complete generation.

    Meant for the start after a crash: the disk directory was the lower layer and nothing
    writes into a mounted lower, so it is unchanged since the pin, and applying the newest
    generation gives exactly the merged view at that checkpoint. If this apply is cut short,
    running it again resumes it (the generation stays until the apply is verified)."""
    if _at_or_below(os.path.realpath(journal), os.path.realpath(target)):
        raise ValueError(f"journal {journal} must not be inside the pinned directory {target}")
    gen = latest_generation(journal)
    if gen is None:
        discard_journal(journal)
        if os.path.isdir(target):
            # A crash after the generations were removed but before the finished apply's
            # stash was: that leftover goes. An unfinished one (an apply straight from a RAM
            # layer that was cut short) is reported, never guessed at.
            with _opened(os.path.abspath(target)) as target_fd:
                _clear_finished_stash(target_fd, target)
        return None
    result = _apply(gen, target, runner, keep_plan=True)
    root = os.lstat(gen)
    discard_journal(journal)
    with _opened(os.path.abspath(target)) as target_fd:
        if _lstat_at(target_fd, STASH_NAME) is not None:
            _remove_stash(target_fd, target)
            os.utime(target_fd, ns=(root.st_atime_ns, root.st_mtime_ns))
    return result


def discard_journal(journal: str) -> None:
    """Remove every generation (complete or partial) of `journal`; the directory stays."""
    try:
        jfd = os.open(journal, _DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        complete, partial = _generations(jfd)
        for name in sorted(partial) + [complete[k] for k in sorted(complete)]:
            _remove_at(jfd, name)
        _fsync_dir(jfd)
    finally:
        os.close(jfd)
