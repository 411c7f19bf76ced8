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
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from rampiped import osutil, tree
from rampiped.engine import format_bytes
from rampiped.ledger import Ledger, open_regular, settled, with_links
from rampiped.ledger import Scan as LedgerScan
from rampiped.ledger import scan as ledger_scan

log = logging.getLogger(__name__)
_T = TypeVar("_T")

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

# rsync copying a tree as it is (checkpoints here and in copy mode). --modify-window=-1: rsync's
# quick check (and whether it sets a directory's times) compares whole seconds by default, so a
# same-size rewrite within the second of the last copy would be skipped for good, or hard-linked
# from the last generation, stale. -1 compares nanoseconds (receivers >= 3.1.3).
# --no-inc-recursive: with incremental recursion, rsync -H deadlocked in 6 of 79 runs against a
# tree churned without pause (all its processes waiting in poll() for each other); with the
# whole file list built first, in none of 342.
RSYNC_COPY = ("rsync", "-aHAX", "--no-inc-recursive", "--numeric-ids", "--modify-window=-1")

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


# --- test pause points ------------------------------------------------------------------------

# For the crash and power-cut tests only, and inert unless both variables are set: when
# RAMPIPED_TEST_PAUSE_AT names stages (comma-separated; see the pause_point calls:
# "pin:layers", "pin:overlay-mounted", "pin:bound", "pin:mounted", "checkpoint:copied",
# "checkpoint:renamed", "copy-checkpoint:copied", "unpin:copy-synced", "unpin:unmounted",
# "copy-window:written", "unpin:journaled", "unpin:applied", "held:appended"), the thread
# that reaches it writes the stage into RAMPIPED_TEST_PAUSE_FILE and blocks until that file is
# removed, so that a test can kill -9 the daemon, drop its RAM, or play a hostile user at
# exactly that point of the operation.
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
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]}: command not found")
    except PermissionError as e:
        return CommandResult(126, "", f"{argv[0]}: {e.strerror}")
    return communicate_watched(proc)


# rsync -H deadlocks now and then when the files of its source change under it (seen here: 6
# of 79 runs of `rsync -aHAX` against a tree churned without pause; with --no-inc-recursive,
# which RSYNC_COPY passes since, none of 342): its
# sender, generator and receiver all wait in poll() for each other, forever, and the worker
# with them. A command whose processes all sit in poll() or select() while none of them reads
# or writes a byte for this long is killed and reported as hung. A process waiting for the
# disk (fsync on a slow stick, state D) is not waiting in poll(): a slow write-back is never
# taken for a hang.
HANG_AFTER = 10.0
HUNG_EXIT = 30  # rsync's own code for "timeout in data send/receive"
_WATCH_EVERY = 2.0


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _waiting_and_io(pids: list[int]) -> tuple[bool, int]:
    """(every process waits in poll/select, bytes read and written by all of them so far)."""
    waiting, io = True, 0
    for p in pids:
        try:
            with open(f"/proc/{p}/wchan") as f:
                wchan = f.read()
            with open(f"/proc/{p}/io") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("rchar", "wchar"):
                        io += int(value)
        except (OSError, ValueError):
            continue  # gone meanwhile
        if "poll" not in wchan and "select" not in wchan:
            waiting = False
    return waiting, io


def communicate_watched(proc: subprocess.Popen[str]) -> CommandResult:
    """proc.communicate(), killing the command when it hangs (see HANG_AFTER)."""
    stalled_since: float | None = None
    last_io = -1
    while True:
        try:
            out, err = proc.communicate(timeout=_WATCH_EVERY)
            return CommandResult(proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            pass
        pids = _tree(proc.pid)
        waiting, io = _waiting_and_io(pids)
        now = time.monotonic()
        if not waiting or io != last_io:
            stalled_since, last_io = None, io
            continue
        if stalled_since is None:
            stalled_since = now
        elif now - stalled_since >= HANG_AFTER:
            for p in reversed(pids):  # the deepest first: none cleans up after the others
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)
            out, err = proc.communicate()
            return CommandResult(
                HUNG_EXIT,
                out,
                (err or "")
                + f"\nrampiped: no byte read or written for {HANG_AFTER:.0f} s with every process"
                " of the command waiting on another: hung, killed\n",
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
        tail = _tail(result.stderr)
        first = _first_unexpected(result.stderr)
        return cls(
            f"{action} failed: `{shlex.join(argv)}` {describe_exit(result.returncode)}"
            + _cause_hint(result.stderr)
            + (f"; first error: {first}" if first and first not in tail else "")
            + tail,
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


# What rsync says when a file of a live tree changes under it while it reads: a file gone,
# shrunk (read errors mapping, then a failed verification), or replaced by a directory or a
# symlink. The sender's errnos: ENOENT, ENOTDIR, EISDIR, EINVAL (readlink of what is no longer
# a symlink), ELOOP, ENODATA, ESTALE, and EACCES (a name deleted through an overlay became a
# whiteout, a device that its nodev tmpfs does not open; root reads everything else there).
# The generator's reads of ACLs and xattrs of an entry that changed kind meanwhile. Anything
# else (a receiver's write error, a full disk) is not.
_CHURN_LINES = (
    re.compile(r"rsync: \[sender\] .* \((2|13|20|21|22|40|61|116)\)"),
    re.compile(
        r"rsync: \[generator\] (get_acl|get_xattr|rsync_xal_get)\b.*"
        r" \((2|13|20|21|40|61)\)"
    ),
    re.compile(r"(rsync: )?(file|directory) has vanished: .*"),
    # a listed file's directory gone or no longer a directory when the list was read
    re.compile(r"WARNING: parent dir is absent in the file list: .*"),
    re.compile(r"(WARNING|ERROR): .* failed verification -- update discarded.*"),
    re.compile(r"rsync error: some files(/attrs were not transferred| vanished) .*"),
    re.compile(r"rsync warning: some files vanished .*"),
)


def run_pass(runner: Runner, argv: list[str], tries: int = 3) -> CommandResult:
    """One rsync pass over a live tree, run again (up to `tries` times in all) when it hung
    (HUNG_EXIT) or aborted with a protocol error (2: rsync -H does under churn, "Invalid packet
    at end of run"); a pass is idempotent. Any other outcome is returned as it is."""
    result = runner(argv)
    for _ in range(tries - 1):
        if result.returncode not in (HUNG_EXIT, 2):
            break
        log.warning("`%s` %s; running it again", argv[0], describe_exit(result.returncode))
        result = runner(argv)
    return result


def _first_unexpected(stderr: str) -> str | None:
    """The first line of rsync's stderr that is not about its source changing under it: the
    one that failed the run (the tail shown may hold only churn lines)."""
    for ln in stderr.splitlines():
        ln = ln.strip()
        if ln and not any(p.fullmatch(ln) for p in _CHURN_LINES):
            return ln[:500]
    return None


def source_churn_only(result: CommandResult) -> bool:
    """rsync exited 23 or 24 only because files of the live source changed while it read
    them: the transfer is complete but for those files, which the next pass takes."""
    if result.returncode == 24:
        return True
    if result.returncode != 23:
        return False
    lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
    return bool(lines) and all(any(p.fullmatch(ln) for p in _CHURN_LINES) for ln in lines)


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
    # what the new generation holds of each file of the layer, by content (see ledger.py)
    ledger: Ledger | None = field(default=None, repr=False, compare=False)


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
            kind = osutil.file_kind(cst)
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
        if rel == "":
            for reserved in (STASH_NAME, HOLD_NAME, SCRATCH_NAME):
                if reserved in current.children:
                    problems.append(
                        f"{root} holds an entry named {reserved}, which write-back reserves"
                    )
    if problems:
        raise SyncError(
            f"refusing to apply layer {root}, nothing was changed: {_first_ten(problems)}"
        )
    layer = _Layer(root, dirs, files, nbytes, [g for g in seen_inodes.values() if len(g) > 1])
    _resolve_lower_paths(layer)
    return layer


def _first_ten(problems: list[str]) -> str:
    more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
    return "; ".join(problems[:10]) + more


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


# --- rampiped's own names in a user's directory ----------------------------------------------
#
# rsync writes each file as a temporary `.NAME.XXXXXX` next to it and renames it into place; a
# crash (kill -9, power cut) in between leaves that temporary in the user's directory, where
# nothing tells it from a user's file. So every rsync that writes into a pinned directory on
# disk gets a scratch directory of its own at the directory's top (--temp-dir: same
# filesystem, so the rename stays atomic), which exists only while rsync runs, and the
# start-up recovery removes what a crash left of it and of rampiped's other temporary names.
SCRATCH_NAME = ".rampiped-tmp"
# copymode's `.NAME.rampiped-tmp-XXXXXXXX`, handover's `NAME.rampiped-tmp`, the write-back
# window's `.NAME.rampiped-new`
_LEFTOVER_RE = re.compile(r"\..+\.rampiped-tmp-[0-9a-f]{8}|.+\.rampiped-tmp|\..+\.rampiped-new")


@contextlib.contextmanager
def scratch_dir(target: str) -> Iterator[list[str]]:
    """rsync's options for writing into `target` (a pinned directory on disk) with its
    temporary files in `target`/SCRATCH_NAME, created empty (a leftover removed) and removed
    again afterwards; the scratch directory is excluded, so --delete leaves it alone."""
    with _opened(target) as tfd:
        if _lstat_at(tfd, SCRATCH_NAME) is not None:
            _remove_at(tfd, SCRATCH_NAME)
        os.mkdir(SCRATCH_NAME, 0o700, dir_fd=tfd)
        try:
            yield [
                f"--temp-dir={os.path.join(target, SCRATCH_NAME)}",
                f"--exclude=/{SCRATCH_NAME}",
            ]
        finally:
            with contextlib.suppress(FileNotFoundError):
                _remove_at(tfd, SCRATCH_NAME)


def scrub_leftovers(root: str | int) -> list[str]:
    """Remove what a crash left of rampiped's temporary files below `root` (a pinned directory
    on disk, or a RAM copy; a path or a descriptor of it, O_PATH will do): the scratch
    directory at the top and every name of the temporary patterns, without following
    symlinks. Returns the relative paths removed."""
    if isinstance(root, str):
        root_fd = os.open(root, _DIR_FLAGS)
    else:
        root_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)
    removed: list[str] = []
    stack: list[tuple[str, int]] = [("", root_fd)]
    try:
        if _lstat_at(root_fd, SCRATCH_NAME) is not None:
            _remove_at(root_fd, SCRATCH_NAME)
            removed.append(SCRATCH_NAME)
        while stack:
            rel, fd = stack.pop()
            try:
                for entry in os.scandir(fd):
                    child = _join(rel, entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                            stack.append((child, _open_dir_at(fd, entry.name)))
                    elif _LEFTOVER_RE.fullmatch(entry.name):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.name, dir_fd=fd)
                            removed.append(child)
            finally:
                os.close(fd)
    finally:
        for _, fd in stack:
            os.close(fd)
    return removed


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


def _at_rel(root_fd: int, rel: str, fn: Callable[[int, str], _T]) -> _T | None:
    """fn(parent fd, name) for the entry `rel` below root_fd, its parent reached without
    following symlinks; None when that parent is missing or not a real directory."""
    parent, _, name = rel.rpartition("/")
    pfd = _open_rel(root_fd, parent)
    if pfd is None:
        return None
    try:
        return fn(pfd, name)
    finally:
        os.close(pfd)


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


def _syncfs(fd: int, path: str) -> None:
    """Flush the whole filesystem holding `fd`; it also reports earlier writeback errors."""
    try:
        osutil.syncfs(fd)
    except OSError as e:
        err = e.errno or errno.EIO  # always set by osutil.syncfs
        raise SyncError(f"syncfs on {path} failed: {os.strerror(err)} (errno {err})") from None


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


def _write_json_at(dir_fd: int, name: str, doc: object) -> None:
    """Write `name` below `dir_fd` atomically and durably (osutil.write_atomic_at), by way of
    NAME.tmp (which the stash's cleanup knows), readable by root only."""
    data = json.dumps(doc, sort_keys=True).encode()
    osutil.write_atomic_at(dir_fd, name, data, tmp=name + ".tmp", mode=0o600)


def _write_plan(stash_fd: int, plan: dict[str, object]) -> None:
    _write_json_at(stash_fd, _PLAN_NAME, plan)


_PLAN_FILES = (_PLAN_NAME, _PLAN_NAME + ".tmp")


def _stashed(stash_fd: int) -> list[str]:
    """The directories in the stash (everything but the plan files)."""
    return [n for n in os.listdir(stash_fd) if n not in _PLAN_FILES]


def _stash_state(target_fd: int) -> tuple[dict[str, object] | None, list[str]]:
    """The plan of the stash directory in the target (None: none readable) and what it holds."""
    stash_fd = _open_dir_at(target_fd, STASH_NAME)
    try:
        return _read_plan(stash_fd), _stashed(stash_fd)
    finally:
        os.close(stash_fd)


def _stash_finished(plan: dict[str, object] | None, stashed: list[str]) -> bool:
    """A stash that a finished apply left (or one cut short before it moved anything)."""
    return not stashed and (plan is None or plan.get("phase") == "done")


def _remove_stash(target_fd: int, target: str) -> None:
    st = _lstat_at(target_fd, STASH_NAME)
    if st is None:
        return
    stash_fd = _open_dir_at(target_fd, STASH_NAME)
    try:
        leftover = _stashed(stash_fd)
        if leftover:
            raise SyncError(
                f"{target}/{STASH_NAME} still holds {leftover[:5]} after write-back; left in "
                "place for inspection"
            )
        for n in _PLAN_FILES:
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
    if stat.S_ISDIR(st.st_mode) and _stash_finished(*_stash_state(target_fd)):
        _remove_stash(target_fd, target)
        return
    raise SyncError(
        f"{target}/{STASH_NAME} holds an interrupted write-back and there is no journal to "
        f"resume it from: {target} is partly written; inspect it by hand"
    )


def _placement_order(moves: list[tuple[str, str]]) -> list[int]:
    """Indexes of `moves` in the order their directories are placed: shallowest destination
    first (undone in reverse)."""
    return sorted(range(len(moves)), key=lambda i: (moves[i][1].count("/"), moves[i][1]))


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
        plan, others = _stash_state(target_fd)
        same = plan is not None and plan.get("layer") == identity and plan.get("moves") == encoded
        if same:
            log.info("resuming an interrupted write-back of %s into %s", upper, target)
        elif _stash_finished(plan, others):
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
            for i in _placement_order(moves):
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
        placement = _placement_order(moves) if plan.get("phase") != "stash" else []
        for i in reversed(placement):
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


def _apply_deletions(layer: _Layer, target_fd: int, keep_newer_than: int | None = None) -> int:
    """Delete on disk what the layer removed: names under whiteouts, entries of directories
    without lower content (opaque) that the layer does not hold, and entries whose type the
    layer changed. Walks layer and disk together, fd-relative, never following a symlink.
    With `keep_newer_than` (ns), entries under whiteouts and opaque directories whose ctime is
    that late or later are kept: they were written on disk after the overlay was unmounted."""
    deleted = 0

    def remove(fd: int, name: str) -> int:
        if keep_newer_than is None:
            return _remove_at(fd, name)
        return _remove_older(fd, name, keep_newer_than)

    # (layer directory, fd of the disk directory) still to visit
    stack: list[tuple[_UpperDir, int]] = [(layer.dirs[""], os.dup(target_fd))]
    try:
        while stack:
            d, fd = stack.pop()
            try:
                if d.lower is None:
                    for name in os.listdir(fd):
                        if name not in d.children:
                            deleted += remove(fd, name)
                for name, kind in d.children.items():
                    st = _lstat_at(fd, name)
                    if st is None:
                        continue
                    disk_kind = osutil.file_kind(st)
                    if kind == "whiteout":
                        deleted += remove(fd, name)
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


def _written_since(dir_fd: int, name: str, newer_than: int) -> bool:
    """Whether `name` below `dir_fd`, or anything below it, has a ctime of `newer_than` or later
    (what _remove_older keeps)."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return False
    if st.st_ctime_ns >= newer_than:
        return True
    if not stat.S_ISDIR(st.st_mode):
        return False
    fd = _open_dir_at(dir_fd, name)
    try:
        return any(_written_since(fd, child, newer_than) for child in os.listdir(fd))
    finally:
        os.close(fd)


def _remove_older(dir_fd: int, name: str, newer_than: int) -> int:
    """Remove `name` below `dir_fd` like _remove_at, but keep every entry whose ctime is
    `newer_than` (ns) or later, and the directories that lead to one; returns how many went."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        if st.st_ctime_ns >= newer_than:
            log.info("kept %s: written on disk during the write-back", name)
            return 0
        os.unlink(name, dir_fd=dir_fd)
        return 1
    removed = 0
    fd = _open_dir_at(dir_fd, name)
    try:
        for child in os.listdir(fd):
            removed += _remove_older(fd, child, newer_than)
        empty = not os.listdir(fd)
    finally:
        os.close(fd)
    # the directory's own ctime as it was before the removals above changed it
    if empty and st.st_ctime_ns < newer_than:
        os.rmdir(name, dir_fd=dir_fd)
        removed += 1
    return removed


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


def _rsync_apply_argv(
    upper: str,
    target: str,
    fsync: bool,
    exclude_from: str | None = None,
    scratch: list[str] | None = None,
) -> list[str]:
    argv = [
        "rsync",
        "-aHAX",  # recursive, symlinks, perms, times, owner, group, specials; links, ACLs, xattrs
        "--no-inc-recursive",  # see RSYNC_COPY
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
    if exclude_from is not None:
        argv += ["--from0", f"--exclude-from={exclude_from}"]
    argv += scratch or []
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


def apply_upper(
    upper: str,
    target: str,
    *,
    runner: Runner = run_command,
    keep_newer_than: int | None = None,
    window: HeldFiles | None = None,
) -> ApplyResult:
    """Make `target` (the directory on disk) hold what the overlay showed, given the upper layer
    of that overlay (unmounted) or a journal copy of it. Raises SyncError, with `target`
    possibly partly written, unless the result was verified on disk.

    `keep_newer_than` (ns, wall clock; defaults to `window.threshold`): entries on disk that
    the layer deletes but whose ctime is that late or later are kept, and verification
    accepts what was written on disk from then on. `window`: the disk files held before the
    apply (HeldFiles.hold); what was appended to them meanwhile goes into the files written."""
    return _apply(
        upper, target, runner, keep_plan=False, keep_newer_than=keep_newer_than, window=window
    )


def _apply(
    upper: str,
    target: str,
    runner: Runner,
    *,
    keep_plan: bool,
    keep_newer_than: int | None = None,
    window: HeldFiles | None = None,
) -> ApplyResult:
    if keep_newer_than is None and window is not None:
        keep_newer_than = window.threshold
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
                deleted += _apply_deletions(layer, target_fd, keep_newer_than)
            except OSError as e:
                raise SyncError(
                    f"write-back of {upper} into {target} failed while moving or deleting "
                    f"{e.filename or ''}: {e.strerror}; {target} is partly written, the layer "
                    "is unchanged"
                ) from e
            own = window.own_writes(layer) if window is not None else []
            with _exclude_file(own) as exclude_from, scratch_dir(target) as scratch:
                argv = _rsync_apply_argv(upper, target, fsync, exclude_from, scratch)
                result = runner(argv)
            if result.returncode != 0:
                raise SyncError.from_command(
                    f"write-back of {upper} into {target} (partly written; the layer is unchanged)",
                    argv,
                    result,
                )
            if window is not None:
                try:
                    window.write_own(upper, target_fd, own)
                except OSError as e:
                    raise SyncError(
                        f"write-back of {upper} into {target} failed while writing "
                        f"{e.filename or 'a file'}: {e.strerror}; {target} is partly written"
                    ) from e
            try:
                _set_times(layer, target_fd)
            except OSError as e:
                raise SyncError(
                    f"write-back of {upper} into {target}: setting the times of "
                    f"{e.filename or 'a directory'} failed: {e.strerror}"
                ) from e
            _syncfs(target_fd, target)
            problems = verify_applied(upper, target, newer_than=keep_newer_than)
            if problems:
                raise SyncError(
                    f"write-back of {upper} into {target} did not verify: {_first_ten(problems)}"
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


# --- writes on disk during the write-back window ---------------------------------------------

# Between the unmount of an overlay and the end of its write-back the path shows the disk, and
# a process that opens a file anew there (a logger's open-append-close) writes into the disk
# file that the write-back is about to replace with the RAM version. Before the unmount,
# `touched_entries` records those disk files (through the lower layer, which nothing writes
# while it is mounted); right after it, `HeldFiles.hold` keeps their inodes alive with hard
# links in HOLD_NAME inside the target (same filesystem) and records the snapshot there, so a
# start after a crash can finish the job. The apply then writes those files itself: the RAM
# version into a new file, what was appended to the disk file so far after it, a rename over
# the name, and what arrived in the meantime after that (so lines stay in the order they were
# written, up to the moment of the rename). After the apply, `merge` carries what still came
# in, and what was not a plain append is kept as NAME.rampiped-conflict.
HOLD_NAME = ".rampiped-held"
CONFLICT_SUFFIX = ".rampiped-conflict"  # the name rampiped.handover uses too
_HELD_INDEX = "held.json"
_HELD_VERSION = 1
# File timestamps come from the kernel's coarse clock, which may lag the wall clock by a tick
# (1 to 10 ms); a change right after a moment t can therefore carry a ctime slightly before t.
CLOCK_SLACK_NS = 100_000_000
# Files up to this size are compared whole (sha256) to tell an append from a rewrite; larger
# ones by their first and last _EDGE bytes before the old end, which an append leaves alone
# and a rewrite almost always changes.
_FULL_DIGEST_MAX = 1 << 20
_EDGE = 64 << 10


@dataclass(frozen=True)
class Stamp:
    """A disk file that the apply replaces, as it was before the unmount. ino 0: there was no
    file at that name (the RAM layer created it); ino -1: not known (it changed meanwhile)."""

    source: str  # where it is on disk before the apply (differs under renamed directories)
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    digest: str


def _digest_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    spans = [(0, size)] if size <= _FULL_DIGEST_MAX else [(0, _EDGE), (size - _EDGE, _EDGE)]
    for offset, length in spans:
        h.update(_read_at(fd, length, offset))
    return h.hexdigest()


def _stamp_at(dir_fd: int, name: str, source: str) -> Stamp | None:
    found = open_regular(name, dir_fd)
    if found is None:
        return None
    fd, st = found
    try:
        return Stamp(
            source,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            _digest_fd(fd, st.st_size),
        )
    finally:
        os.close(fd)


_ABSENT_DIGEST = hashlib.sha256(b"").hexdigest()
# touched_entries: a disk file not in the layer yet, its digest to be taken from the layer
_DIGEST_FROM_LAYER = "from-layer"


def _replaced_files(layer: _Layer) -> Iterator[tuple[str, str, str]]:
    """(rel, source on disk, kind in the layer) of every regular file or symlink of the layer
    that can replace a disk entry: its directory has lower content."""
    for rel, d in layer.dirs.items():
        if d.lower is None:
            continue
        for name, kind in d.children.items():
            if kind in ("file", "symlink"):
                yield _join(rel, name), _join(d.lower, name), kind


def stamp_of(root: str, rel: str) -> Stamp | None:
    """The stamp of the regular file `rel` below `root` (no symlink followed on the way),
    or None when there is none."""
    with _opened(root) as root_fd:
        return _at_rel(root_fd, rel, lambda pfd, name: _stamp_at(pfd, name, rel))


def shared_stamp(root: str, rel: str, copy: str) -> Stamp | None:
    """The stamp of the regular file `rel` below `root` cut to the bytes it shares, from its
    start, with the regular file `copy` (RAM's copy of it). A write-back that takes this as the
    disk file's state before it keeps what the disk file holds beyond those bytes: appended to
    RAM's version, or as a conflict file. None when `rel` is not a regular file."""

    def at(pfd: int, name: str) -> Stamp | None:
        found = open_regular(name, pfd)
        if found is None:
            return None
        fd, st = found
        try:
            other = open_regular(copy)
            shared = 0
            if other is not None:
                try:
                    shared = _shared_length(fd, other[0], min(st.st_size, other[1].st_size))
                finally:
                    os.close(other[0])
            return Stamp(
                rel, st.st_ino, shared, st.st_mtime_ns, st.st_ctime_ns, _digest_fd(fd, shared)
            )
        finally:
            os.close(fd)

    with _opened(root) as root_fd:
        return _at_rel(root_fd, rel, at)


def _shared_length(a_fd: int, b_fd: int, limit: int, chunk: int = 1 << 20) -> int:
    """How many bytes, from the start, two files hold alike (up to `limit`)."""
    done = 0
    while done < limit:
        n = min(chunk, limit - done)
        a, b = _read_at(a_fd, n, done), _read_at(b_fd, n, done)
        same = _common_prefix(a, b)
        done += same
        if same < n or len(a) < n or len(b) < n:
            break
    return done


def touched_entries(upper: str, lower: str) -> dict[str, Stamp]:
    """Before the unmount (the overlay still mounted, its lower unchanging): the disk files
    that applying `upper` will replace, keyed by their path in the layer. Regular files of the
    layer with no disk file at their name get an absent stamp (ino 0). Entries that vanish
    while the layer is read are skipped (the apply's own scan is authoritative)."""
    layer = _scan_layer(upper)
    out: dict[str, Stamp] = {}
    with _opened(lower) as lower_fd:
        for rel, source, kind in _replaced_files(layer):
            parent, _, name = source.rpartition("/")
            pfd = _open_rel(lower_fd, parent)
            if pfd is None:
                found = None
            else:
                try:
                    found = _stamp_at(pfd, name, source)
                    exists = _lstat_at(pfd, name) is not None
                finally:
                    os.close(pfd)
            if found is not None:
                out[rel] = found
            elif kind == "file" and (pfd is None or not exists):
                out[rel] = Stamp(source, 0, 0, 0, 0, _ABSENT_DIGEST)
        # A disk file beside those that is not in the layer yet may be copied up between this
        # scan and the unmount, and written on disk right after it: record what it is now
        # (nothing writes a mounted lower); its digest is taken from the layer's copy, once
        # the layer is unmounted (HeldFiles.hold)
        for rel, d in layer.dirs.items():
            if d.lower is None:
                continue
            pfd = _open_rel(lower_fd, d.lower)
            if pfd is None:
                continue
            try:
                for name in os.listdir(pfd):
                    if name in d.children:
                        continue
                    st = _lstat_at(pfd, name)
                    if st is not None and stat.S_ISREG(st.st_mode):
                        out[_join(rel, name)] = Stamp(
                            _join(d.lower, name),
                            st.st_ino,
                            st.st_size,
                            st.st_mtime_ns,
                            st.st_ctime_ns,
                            _DIGEST_FROM_LAYER,
                        )
            finally:
                os.close(pfd)
    return out


def _with_layer_digests(
    upper: str, snapshot: dict[str, Stamp], rels: list[str]
) -> dict[str, Stamp]:
    """`snapshot` with the digest of each of `rels` that was recorded without one (copied up
    after touched_entries looked) taken from the layer's copy: the copy-up copied the disk
    file as it was, so when RAM only appended to it, its first `size` bytes are the disk's.
    When the copy is shorter than that (RAM truncated it) the stamp is dropped: unknown."""
    out = dict(snapshot)
    with _opened(upper) as upper_fd:
        for rel in rels:
            base = out.get(rel)
            if base is None or base.digest != _DIGEST_FROM_LAYER:
                continue
            del out[rel]
            found = _at_rel(upper_fd, rel, lambda pfd, name: open_regular(name, pfd))
            if found is None:
                continue
            fd, st = found
            try:
                if st.st_size >= base.size:
                    out[rel] = dataclasses.replace(base, digest=_digest_fd(fd, base.size))
            finally:
                os.close(fd)
    return out


@dataclass
class _Held:
    rel: str
    link: str  # name in the hold directory
    base: Stamp
    done: int | None = None  # bytes of the held file already carried into the file at rel
    conflict: bool = False
    append: _Append | None = None  # recorded before each write that carries bytes (_Append)


@dataclass(frozen=True)
class _Append:
    """One write of held bytes onto the end of the file at a held file's name, recorded in the
    index before it is made: after a crash, that file's bytes from `size` on tell how much of
    it landed (other processes may append there by name too, before and after it)."""

    ino: int  # of the file at the name
    size: int  # its size right before the write
    length: int  # bytes of the held file, from `done` on, in that write


# One write of carried bytes at most (each is recorded in the index before it is made).
_APPEND_CHUNK = 1 << 20
# After a crash, how far past the recorded size the whole write is looked for: bytes other
# processes appended by name between the record and the write come before it.
_APPEND_SLACK = 64 << 10
# A write cut short (kill -9 in the middle of it, a power cut before its pages all reached the
# disk) ends at a page boundary of the file. A partial match shorter than this is more likely
# another writer's bytes that start like ours (a timestamp) than our write cut short.
_PAGE = 4096
_MIN_PARTIAL = 512


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i + _PAGE <= n and a[i : i + _PAGE] == b[i : i + _PAGE]:
        i += _PAGE
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _landed(planned: bytes, tail: bytes, start: int) -> int:
    """How many bytes of `planned`, written in one write at the end of a file then `start`
    bytes long, that file holds; `tail` is its content from `start` on (with what others
    appended by name before or after). The whole write found anywhere in `tail` landed;
    otherwise what matches from `start` on counts up to a page boundary, if that is at least
    _MIN_PARTIAL bytes. Bytes that only repeat ours cannot be told from ours."""
    if not planned:
        return 0
    if planned in tail:
        return len(planned)
    cut = (start + _common_prefix(planned, tail)) // _PAGE * _PAGE - start
    return cut if cut >= _MIN_PARTIAL else 0


def _read_at(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while length > 0 and (chunk := os.pread(fd, min(length, 1 << 20), offset)):
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


@contextlib.contextmanager
def _exclude_file(rels: list[str]) -> Iterator[str | None]:
    """An rsync --exclude-from file (NUL-separated, --from0) naming exactly `rels`."""
    if not rels:
        yield None
        return
    fd, path = tempfile.mkstemp(prefix="rampiped-exclude-")
    try:
        with os.fdopen(fd, "wb") as f:
            for rel in rels:
                pattern = "/" + rel
                if any(c in rel for c in "*?["):
                    # a backslash escapes only in a pattern that has wildcards (rsync(1))
                    pattern = re.sub(r"([*?\[\\])", r"\\\1", pattern)
                f.write(os.fsencode(pattern) + b"\0")
        yield path
    finally:
        os.unlink(path)


def _copy_fd(src_fd: int, dst_fd: int, offset: int) -> int:
    """Append src_fd's bytes from `offset` to its current end onto dst_fd; returns the count."""
    n = 0
    while chunk := os.pread(src_fd, 1 << 20, offset + n):
        view = memoryview(chunk)
        while view:
            written = os.write(dst_fd, view)
            view = view[written:]
        n += len(chunk)
    return n


def _copy_attributes(src: str, fd: int) -> None:
    """Owner, mode and xattrs (ACLs included; not security labels nor overlay's) of `src`."""
    st = os.lstat(src)
    os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        if name.startswith(("security.", "trusted.overlay.")):
            continue
        os.setxattr(fd, name, os.getxattr(src, name, follow_symlinks=False))


class HeldFiles:
    """The disk files an apply replaces, kept alive (hard links in `target`/HOLD_NAME) from the
    unmount until what was written into them meanwhile is carried over (see above)."""

    def __init__(self, target: str, threshold: int, entries: list[_Held]) -> None:
        self.target = target
        # ns, wall clock: what changed on disk from then on was written in the window
        self.threshold = threshold
        self.entries = entries

    @classmethod
    def hold(cls, upper: str, target: str, snapshot: dict[str, Stamp], threshold: int) -> HeldFiles:
        """Right after the unmount, before anything replaces them: link every disk file the
        apply of `upper` replaces into the hold directory, and record the snapshot there."""
        layer = _scan_layer(upper)
        items = [(rel, source) for rel, source, _kind in _replaced_files(layer)]
        snapshot = _with_layer_digests(upper, snapshot, [rel for rel, _source in items])
        return cls._hold_items(target, items, snapshot, threshold)

    @classmethod
    def hold_paths(
        cls, target: str, rels: Iterable[str], snapshot: dict[str, Stamp], threshold: int
    ) -> HeldFiles:
        """The same for a write-back that replaces the files at `rels` (relative to `target`)
        rather than a layer's (a copy pin's, after its unmount)."""
        return cls._hold_items(target, [(rel, rel) for rel in rels], snapshot, threshold)

    @classmethod
    def _hold_items(
        cls,
        target: str,
        items: Iterable[tuple[str, str]],
        snapshot: dict[str, Stamp],
        threshold: int,
    ) -> HeldFiles:
        target = os.path.abspath(target)
        earlier = cls.load(target)
        if earlier is not None:  # left by an unpin cut short: finish it before starting over
            earlier.merge()
            earlier.finish()
        entries: list[_Held] = []
        with _opened(target) as target_fd:
            os.mkdir(HOLD_NAME, 0o700, dir_fd=target_fd)
            hold_fd = _open_dir_at(target_fd, HOLD_NAME)
            try:
                for rel, source in items:
                    parent, _, name = source.rpartition("/")
                    pfd = _open_rel(target_fd, parent)
                    if pfd is None:
                        continue
                    try:
                        st = _lstat_at(pfd, name)
                        if st is None or not stat.S_ISREG(st.st_mode):
                            continue
                        base = snapshot.get(rel)
                        if base is None:  # copied up after the snapshot
                            if st.st_ctime_ns < threshold:
                                base = _stamp_at(pfd, name, source)
                        elif base.ino not in (0, st.st_ino):
                            base = None  # replaced on disk meanwhile
                        if base is None:
                            base = Stamp(source, -1, 0, 0, 0, "")
                        link = str(len(entries))
                        os.link(
                            name, link, src_dir_fd=pfd, dst_dir_fd=hold_fd, follow_symlinks=False
                        )
                    finally:
                        os.close(pfd)
                    entries.append(_Held(rel, link, base))
                held = cls(target, threshold, entries)
                held._save(hold_fd)
                _fsync_dir(hold_fd)
            finally:
                os.close(hold_fd)
            _fsync_dir(target_fd)
        return held

    @classmethod
    def load(cls, target: str) -> HeldFiles | None:
        """The hold directory an unpin cut short (crash, power cut) left in `target`, if any."""
        target = os.path.abspath(target)
        try:
            with open(os.path.join(target, HOLD_NAME, _HELD_INDEX), "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            try:
                st = os.lstat(os.path.join(target, HOLD_NAME))
            except FileNotFoundError:
                return None
            # cut short before the index was written: nothing was replaced yet, and the
            # directory was made right after the unmount
            return cls(target, st.st_ctime_ns - CLOCK_SLACK_NS, [])
        except ValueError as e:
            raise SyncError(f"{target}/{HOLD_NAME}/{_HELD_INDEX} is unreadable: {e}") from e
        entries = [
            _Held(
                str(e["rel"]),
                str(e["link"]),
                Stamp(**e["base"]),
                e.get("done"),
                bool(e.get("conflict", False)),
                _Append(**e["append"]) if e.get("append") else None,  # older indexes have none
            )
            for e in doc.get("entries", [])
        ]
        return cls(target, int(doc.get("threshold", 0)), entries)

    def _save(self, hold_fd: int) -> None:
        doc = {
            "version": _HELD_VERSION,
            "threshold": self.threshold,
            "entries": [
                {
                    "rel": e.rel,
                    "link": e.link,
                    "base": dataclasses.asdict(e.base),
                    "done": e.done,
                    "conflict": e.conflict,
                    "append": dataclasses.asdict(e.append) if e.append else None,
                }
                for e in self.entries
            ],
        }
        # durable on return: a recorded append (_Append) must be on disk before the append it
        # announces is
        _write_json_at(hold_fd, _HELD_INDEX, doc)

    def inodes(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of the held files still linked."""
        out = set()
        for e in self.entries:
            try:
                st = os.lstat(os.path.join(self.target, HOLD_NAME, e.link))
            except FileNotFoundError:
                continue
            out.add((st.st_dev, st.st_ino))
        return out

    def own_writes(self, layer: _Layer) -> list[str]:
        """The held files that the apply writes itself rather than rsync: regular files of
        the layer without hard links in it (a hard-linked group is left to rsync -H)."""
        linked = {rel for group in layer.link_groups for rel in group}
        kinds = {rel: kind for rel, _source, kind in _replaced_files(layer)}
        return [e.rel for e in self.entries if kinds.get(e.rel) == "file" and e.rel not in linked]

    def write_own(self, upper: str, target_fd: int, rels: list[str]) -> None:
        """For each of `rels`: the layer's file into a new file next to it, the bytes appended
        to the held disk file so far after it (when it was appended to), a rename over the
        name, then what was appended in between."""
        by_rel = {e.rel: e for e in self.entries}
        hold_fd = _open_dir_at(target_fd, HOLD_NAME)
        try:
            for rel in rels:
                e = by_rel[rel]
                parent, _, name = rel.rpartition("/")
                pfd, _ = _make_dirs_rel(target_fd, parent)
                try:
                    self._write_one(upper, rel, e, hold_fd, pfd, name)
                finally:
                    os.close(pfd)
            self._save(hold_fd)
        finally:
            os.close(hold_fd)

    def _write_one(self, upper: str, rel: str, e: _Held, hold_fd: int, pfd: int, name: str) -> None:
        src = os.path.join(upper, rel)
        tmp = f".{name}.rampiped-new"
        # an apply resumed after a crash writes the layer's version again (and carries the
        # held file's appends into it from the start): a recorded append is moot
        e.done = None
        e.append = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=pfd)
        held_fd = os.open(e.link, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=hold_fd)
        try:
            out = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=pfd,
            )
            try:
                with open(src, "rb") as f:
                    _copy_fd(f.fileno(), out, 0)
                _copy_attributes(src, out)
                ust = os.lstat(src)
                os.utime(out, ns=(ust.st_atime_ns, ust.st_mtime_ns))
                appended = self._appended(e, held_fd)
                if appended:
                    e.done = e.base.size + _copy_fd(held_fd, out, e.base.size)
                os.fsync(out)
            finally:
                os.close(out)
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            _fsync_dir(pfd)
            if appended and e.done is not None:
                self._append_since(e, held_fd, hold_fd, pfd, name)
        finally:
            os.close(held_fd)

    @staticmethod
    def _appended(e: _Held, held_fd: int) -> bool:
        """Whether the held file differs from the snapshot only by bytes added at its end."""
        st = os.fstat(held_fd)
        if e.base.ino == -1:
            return False
        if e.base.ino == 0:
            return True  # created on disk in the window: everything in it is new
        if st.st_size == e.base.size and st.st_mtime_ns == e.base.mtime_ns:
            return False  # unchanged (so far)
        return st.st_size >= e.base.size and _digest_fd(held_fd, e.base.size) == e.base.digest

    @staticmethod
    def _unchanged(e: _Held, st: os.stat_result) -> bool:
        return (
            e.base.ino == st.st_ino
            and e.base.size == st.st_size
            and e.base.mtime_ns == st.st_mtime_ns
        )

    def _append_since(self, e: _Held, held_fd: int, hold_fd: int, pfd: int, name: str) -> int:
        """Append the held file's bytes from `done` on to the file at `name`, one write at a
        time, each recorded in the index first: a crash between a write and the save of the
        new `done` then neither repeats it nor drops it (see _settle_append)."""
        assert e.done is not None
        if e.append is not None:
            self._settle_append(e, held_fd, pfd, name)
        if os.fstat(held_fd).st_size <= e.done:
            return 0
        total = 0
        dst = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            while chunk := os.pread(held_fd, _APPEND_CHUNK, e.done):
                st = os.fstat(dst)
                e.append = _Append(st.st_ino, st.st_size, len(chunk))
                self._save(hold_fd)
                n = os.write(dst, chunk)
                os.fsync(dst)
                pause_point("held:appended")
                # the caller's save records the new `done`; until then the record above
                # lets a start after a crash find this write in the file
                e.done += n
                e.append = None
                total += n
        finally:
            os.close(dst)
        return total

    def _settle_append(self, e: _Held, held_fd: int, pfd: int, name: str) -> None:
        """After a crash: advance `done` by what the recorded append left in the file at
        `name`. Nothing when that file is another one now (what landed went with the old)."""
        assert e.done is not None and e.append is not None
        rec, e.append = e.append, None
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=pfd
            )
        except FileNotFoundError:
            return
        try:
            st = os.fstat(fd)
            if st.st_ino != rec.ino or not stat.S_ISREG(st.st_mode):
                return
            tail = _read_at(fd, rec.length + _APPEND_SLACK, rec.size)
        finally:
            os.close(fd)
        e.done += _landed(_read_at(held_fd, rec.length, e.done), tail, rec.size)

    def merge(self, *, conflicts_only: bool = False) -> list[str]:
        """Carry what was written into the held files since the last look into the files now
        at their names: bytes appended go after the file's end; a held file changed otherwise
        is linked as NAME.rampiped-conflict (a WARNING names it). With `conflicts_only` (the
        apply failed and the RAM layer is mounted again, hiding the disk files at those names)
        every changed held file becomes a conflict file. Returns the conflict files made."""
        made: list[str] = []
        try:
            target_fd = os.open(self.target, _DIR_FLAGS)
        except FileNotFoundError:
            return made
        try:
            if _lstat_at(target_fd, HOLD_NAME) is None:
                return made
            hold_fd = _open_dir_at(target_fd, HOLD_NAME)
            try:
                for e in self.entries:
                    if e.conflict:
                        continue
                    try:
                        held_fd = os.open(
                            e.link, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=hold_fd
                        )
                    except FileNotFoundError:
                        continue
                    try:
                        made += self._merge_one(e, held_fd, hold_fd, target_fd, conflicts_only)
                    finally:
                        os.close(held_fd)
                self._save(hold_fd)
            finally:
                os.close(hold_fd)
        finally:
            os.close(target_fd)
        return made

    def _merge_one(
        self, e: _Held, held_fd: int, hold_fd: int, target_fd: int, conflicts_only: bool
    ) -> list[str]:
        st = os.fstat(held_fd)
        if e.done is None and self._unchanged(e, st):
            return []
        parent, _, name = e.rel.rpartition("/")
        pfd = _open_rel(target_fd, parent)
        if pfd is None:
            return self._conflict(e, hold_fd, target_fd)
        try:
            dst = _lstat_at(pfd, name)
            plain = dst is not None and stat.S_ISREG(dst.st_mode)
            if conflicts_only or not plain:
                if e.done is None and e.base.ino == 0 and st.st_size == 0:
                    return []
                return self._conflict(e, hold_fd, target_fd)
            assert dst is not None
            if (dst.st_dev, dst.st_ino) == (st.st_dev, st.st_ino):
                # never replaced (a write-back cut short before it got there): what was
                # written into it is at its name already
                return []
            if e.done is None:
                if not self._appended(e, held_fd):
                    return self._conflict(e, hold_fd, target_fd)
                e.done = e.base.size
            self._append_since(e, held_fd, hold_fd, pfd, name)
            return []
        finally:
            os.close(pfd)

    def _conflict(self, e: _Held, hold_fd: int, target_fd: int) -> list[str]:
        parent, _, name = e.rel.rpartition("/")
        conflict = name + CONFLICT_SUFFIX
        pfd = _open_rel(target_fd, parent)
        if pfd is None:
            log.error(
                "%s/%s was written on disk during the write-back but its directory is gone; "
                "the data stays in %s/%s/%s",
                self.target,
                e.rel,
                self.target,
                HOLD_NAME,
                e.link,
            )
            return []
        try:
            tmp = conflict + ".tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=pfd)
            os.link(e.link, tmp, src_dir_fd=hold_fd, dst_dir_fd=pfd, follow_symlinks=False)
            os.rename(tmp, conflict, src_dir_fd=pfd, dst_dir_fd=pfd)
            _fsync_dir(pfd)
        finally:
            os.close(pfd)
        e.conflict = True
        shown = _join(parent, conflict)
        log.warning(
            "%s/%s was rewritten on disk during the write-back (not only appended to): that "
            "version is kept as %s/%s, the RAM version is at the name",
            self.target,
            e.rel,
            self.target,
            shown,
        )
        return [shown]

    def finish(self) -> None:
        """Drop the hold directory (the held files that are not conflict files go with it)."""
        with _opened(self.target) as target_fd:
            if _lstat_at(target_fd, HOLD_NAME) is None:
                return
            _remove_at(target_fd, HOLD_NAME)
            _fsync_dir(target_fd)


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


def verify_applied(upper: str, target: str, *, newer_than: int | None = None) -> list[str]:
    """Differences between a layer and the disk after applying it ([] when none): every entry
    the layer holds is on disk with the same type, mode, owner, size, mtime, symlink target,
    xattrs and hard links; names under whiteouts are absent; directories without lower content
    hold nothing else; no trusted.overlay.* attribute reached the disk.

    With `newer_than` (ns), what was written on disk from then on (the directory showed the
    disk while the layer was applied) is not a difference: a regular file whose mtime differs
    from the layer's and is that late (appended to after the apply wrote it), and entries under
    whiteouts or in opaque directories whose ctime is that late (created meanwhile)."""
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
                    diffs += _verify_dir(layer, d, fd, stack, newer_than)
                finally:
                    os.close(fd)
        finally:
            for _, fd in stack:
                os.close(fd)
        for group in layer.link_groups:
            inodes = set()
            for rel in group:
                st = _at_rel(target_fd, rel, _lstat_at)
                if st is not None:
                    inodes.add((st.st_dev, st.st_ino))
            if len(inodes) > 1:
                diffs.append(f"{group}: hard links in the layer are separate files on disk")
    return diffs


def _verify_dir(
    layer: _Layer,
    d: _UpperDir,
    fd: int,
    stack: list[tuple[_UpperDir, int]],
    newer_than: int | None = None,
) -> list[str]:
    diffs: list[str] = []
    upper_dir = os.path.join(layer.root, d.rel) if d.rel else layer.root

    def written_since(name: str) -> bool:
        return newer_than is not None and _written_since(fd, name, newer_than)

    if d.lower is None:
        for name in os.listdir(fd):
            reserved = d.rel == "" and name in (STASH_NAME, HOLD_NAME)
            if name not in d.children and not reserved and not written_since(name):
                diffs.append(f"{_join(d.rel, name)}: on disk but not in the layer")
    for name, kind in d.children.items():
        rel = _join(d.rel, name)
        st = _lstat_at(fd, name)
        if kind == "whiteout":
            if st is not None and not written_since(name):
                diffs.append(f"{rel}: deleted in the layer, still on disk ({osutil.file_kind(st)})")
            continue
        if st is None:
            diffs.append(f"{rel}: missing on disk")
            continue
        ust = os.lstat(os.path.join(upper_dir, name))
        appended = (
            newer_than is not None
            and st.st_mtime_ns != ust.st_mtime_ns
            and st.st_mtime_ns >= newer_than
        )
        diffs += _compare(rel, ust, st, written_after=appended)
        if osutil.file_kind(st) != kind:
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


def _compare(
    rel: str, want: os.stat_result, have: os.stat_result, *, written_after: bool = False
) -> list[str]:
    kind_w, kind_h = osutil.file_kind(want), osutil.file_kind(have)
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
    if written_after and kind_w == "file":
        return out  # written on disk after the apply: its size and mtime are the writer's
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


def rsync_stat(text: str, label: str) -> int:
    """A figure of rsync --stats output (`label`: the text before its colon); 0 when absent."""
    m = re.search(re.escape(label) + r":\s*([0-9][0-9,.']*)", text)
    return int(re.sub(r"[^0-9]", "", m.group(1))) if m else 0


def checkpoint(
    upper: str,
    journal: str,
    *,
    runner: Runner = run_command,
    ledger: Ledger | None = None,
    found: LedgerScan | None = None,
) -> CheckpointResult:
    """Copy the upper layer of a mounted overlay (whiteouts, trusted.overlay.* attributes and
    all: a faithful copy of the layer) into a new generation of `journal`, on disk outside the
    pinned tree. The generation is written as gen-N.tmp, flushed, renamed to gen-N and the
    older ones removed: a power cut at any point leaves the last complete generation.

    `ledger`: what the last generation holds of each file, by content (the result's `ledger`
    of the checkpoint that wrote it). With it, files whose content is still what the last
    generation holds are hard links to it; every other file is copied, whatever its size and
    mtime say (rsync's --link-dest alone links a same-size rewrite that kept its mtime, and a
    file changed through a shared mapping, to the stale copy). Without it (not known, e.g. a
    pin adopted after a restart) every file is copied. `found`: the layer read just before
    (SpaceNeed.found), instead of reading it again here."""
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
    # read before the copy: a file that changes after this is copied again next time, since
    # its content then differs from what the new ledger records
    found = ledger_scan(upper) if found is None else found
    with _opened(journal) as jfd:
        complete, partial = _generations(jfd)
        for name in partial:  # a checkpoint cut short: never used, removed now
            _remove_at(jfd, name)
        latest = max(complete, default=0)
        gen = latest + 1
        tmp_name = f"gen-{gen}.tmp"
        argv = [*RSYNC_COPY, "--stats"]
        linked = bool(latest) and ledger is not None
        if linked:
            argv.append(f"--link-dest={journal}/{complete[latest]}")
        argv += [upper + "/", f"{journal}/{tmp_name}/"]
        _rsync_has_fsync(runner)  # says "rsync is not installed" when it is not
        result = run_pass(runner, argv)
        # 23/24 for source churn only: a file vanished, shrank or became a directory while
        # the live layer was copied; the next checkpoint sees the new state (the ledger leaves
        # those files out), and this one is as good as any copy of a layer being written.
        if result.returncode != 0 and not source_churn_only(result):
            raise SyncError.from_command(f"checkpoint of {upper} into {journal}", argv, result)
        files = rsync_stat(result.stdout, "Number of regular files transferred")
        nbytes = rsync_stat(result.stdout, "Total transferred file size")
        if linked:
            assert ledger is not None
            stale = _linked_stale(
                ledger.changed(found), f"{journal}/{complete[latest]}", f"{journal}/{tmp_name}"
            )
            if stale:
                redo = _copy_listed(runner, upper, f"{journal}/{tmp_name}", journal, stale, found)
                files += rsync_stat(redo.stdout, "Number of regular files transferred")
                nbytes += rsync_stat(redo.stdout, "Total transferred file size")
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
        gen, files, nbytes, time.monotonic() - start, ledger=settled(found, upper)
    )


# Left free beyond what a write-back needs: the filesystem's own reserve is already out of
# f_bavail, this is for the directories, the scratch files and what other writers add meanwhile.
SPACE_MARGIN = 8 << 20
INODE_MARGIN = 64


class NoSpace(SyncError):
    """A checkpoint or write-back that would not fit on the disk: refused before writing."""


@dataclass(frozen=True)
class SpaceNeed:
    journal_bytes: int  # the new generation's copied files
    journal_inodes: int
    apply_bytes: int  # the apply writes every file of the layer anew
    apply_inodes: int
    found: LedgerScan = field(repr=False)  # the layer's files, read for this (see checkpoint)


def space_need(upper: str, ledger: Ledger | None, found: LedgerScan | None = None) -> SpaceNeed:
    """What a checkpoint of `upper` into the journal, and the apply of that generation into
    the directory afterwards, write: files whose content the last generation does not hold
    (all of them without a ledger) into the journal, every file of the layer into the
    directory; an inode per directory and entry written. `found`: the layer's scan, if made."""
    if found is None:
        found = ledger_scan(upper)
    changed = set(found) if ledger is None else set(ledger.changed(found))
    seen: set[int] = set()
    layer_bytes = changed_bytes = 0
    for rel, s in found.items():
        if s.ino in seen:
            continue
        seen.add(s.ino)
        layer_bytes += s.size
        if rel in changed:
            changed_bytes += s.size
    entries = sum(1 for _ in tree.walk(upper))
    dirs = entries - len(found)
    return SpaceNeed(changed_bytes, dirs + len(changed), layer_bytes, entries, found)


def check_space(
    upper: str,
    journal: str,
    target: str,
    ledger: Ledger | None,
    what: str,
    target_name: str | None = None,
) -> SpaceNeed:
    """Refuse (NoSpace) a checkpoint or write-back of `upper` that would not fit: the new
    journal generation on the journal's filesystem, and the apply into `target` afterwards on
    the target's, both on one filesystem when they share it (the generation stays until the
    apply is verified). Filesystems that report no inode count (btrfs, tmpfs with nr_inodes=0)
    are checked for bytes only. `target_name`: the directory as its users know it.

    The content of the layer is read only when it matters: if the write-back fits even with
    every file counted as changed, no file is read (an eviction must unmount quickly)."""
    shown = target_name or target
    os.makedirs(journal, mode=0o700, exist_ok=True)
    jst, tst = os.statvfs(journal), os.statvfs(target)
    same = os.stat(journal).st_dev == os.stat(target).st_dev
    bound = space_need(upper, None)
    if ledger is None or _short_of_space(bound, jst, tst, same, what, shown, journal) is None:
        need = bound
    else:
        need = space_need(upper, ledger, bound.found)
    refusal = _short_of_space(need, jst, tst, same, what, shown, journal)
    if refusal is not None:
        raise NoSpace(refusal)
    return need


def _short_of_space(
    need: SpaceNeed,
    jst: os.statvfs_result,
    tst: os.statvfs_result,
    same: bool,
    what: str,
    shown: str,
    journal: str,
) -> str | None:
    """Why `need` does not fit (None: it fits)."""
    checks = (
        [
            (
                shown,
                tst,
                need.journal_bytes + need.apply_bytes,
                need.journal_inodes + need.apply_inodes,
            )
        ]
        if same
        else [
            (journal, jst, need.journal_bytes, need.journal_inodes),
            (shown, tst, need.apply_bytes, need.apply_inodes),
        ]
    )
    shared = " (journal and directory share it)" if same else ""
    for where, st, nbytes, inodes in checks:
        free = st.f_bavail * st.f_frsize
        if nbytes + SPACE_MARGIN > free:
            return (
                f"{what}: not enough space: it needs {format_bytes(nbytes)} on the filesystem of "
                f"{where}{shared}, {format_bytes(free)} are free; the changes stay in RAM until"
                " space is freed"
            )
        if st.f_files and inodes + INODE_MARGIN > st.f_favail:
            return (
                f"{what}: not enough inodes: it needs {inodes} on the filesystem of {where}"
                f"{shared}, {st.f_favail} are free; the changes stay in RAM until some are freed"
            )
    return None


def _linked_stale(changed: list[str], previous: str, new: str) -> list[str]:
    """Of the files whose content changed, those that --link-dest linked to the previous
    generation's copy (the same inode in both): their new generation holds stale content."""
    out = []
    for rel in changed:
        try:
            a = os.lstat(os.path.join(previous, rel))
            b = os.lstat(os.path.join(new, rel))
        except (FileNotFoundError, NotADirectoryError):
            continue  # not in the previous generation: copied, not linked
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            out.append(rel)
    return out


def _copy_listed(
    runner: Runner, src: str, dst: str, list_dir: str, rels: list[str], found: LedgerScan
) -> CommandResult:
    """Copy exactly the files `rels` (with the other names of their hard-link groups) from
    `src` to `dst`, even when size and mtime look equal (-I): a new file renamed over each
    name, which breaks a hard link to an older copy. A file gone meanwhile is skipped (24).
    The list is written into `list_dir`, outside both trees."""
    listed = sorted(with_links(found, rels))
    listing = os.path.join(list_dir, ".rampiped-copy-list")
    with open(listing, "wb") as f:
        f.write(b"\0".join(os.fsencode(p) for p in listed) + b"\0")
    argv = [
        *RSYNC_COPY, "--stats", "--no-r", "-I", "--from0", f"--files-from={listing}",
        src + "/", dst + "/",
    ]  # fmt: skip
    try:
        result = run_pass(runner, argv)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listing)
    if result.returncode != 0 and not source_churn_only(result):
        raise SyncError.from_command(
            f"checkpoint of {src} into {dst} (changed files)", argv, result
        )
    return result


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


def apply_journal(
    journal: str,
    target: str,
    *,
    runner: Runner = run_command,
    keep_newer_than: int | None = None,
    window: HeldFiles | None = None,
) -> ApplyResult | None:
    """Apply the newest complete generation of `journal` to `target` (as apply_upper does),
    verify it, then remove the generations. None when there is no complete generation.
    `keep_newer_than` and `window` as in apply_upper.

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
    result = _apply(
        gen, target, runner, keep_plan=True, keep_newer_than=keep_newer_than, window=window
    )
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
