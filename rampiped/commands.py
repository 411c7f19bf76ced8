"""Running commands (rsync, cp, the reopen command): results, errors that explain
themselves, a watch for hung commands, and the rsync facts the write-back depends on."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[list[str]], CommandResult]


def run_command(argv: list[str], stop: Callable[[], str | None] | None = None) -> CommandResult:
    """Run a command to completion and capture its output (the default Runner). `stop`: asked
    every STOP_EVERY seconds while it runs; a reason it gives kills the command (STOPPED_EXIT,
    the reason in stderr)."""
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
    return communicate_watched(proc, stop)


def guarded(runner: Runner, stop: Callable[[], str | None]) -> Runner:
    """`runner` with `stop` asked before each command and, when it is run_command, while the
    command runs: a reason it gives stops the work (STOPPED_EXIT, the reason in stderr)."""

    def run(argv: list[str]) -> CommandResult:
        reason = stop()
        if reason is not None:
            return CommandResult(STOPPED_EXIT, "", f"rampiped: not started: {reason}\n")
        return run_command(argv, stop) if runner is run_command else runner(argv)

    return run


# rsync -H deadlocks now and then when the files of its source change under it (seen here: 6
# of 79 runs of `rsync -aHAX` against a tree churned without pause; with --no-inc-recursive,
# which RSYNC_COPY passes since, none of 342): its
# sender, generator and receiver all wait in poll() for each other, forever, and the worker
# with them. A command whose processes all sit in poll() or select() while none of them reads
# or writes a byte for this long is killed and reported as hung. A process waiting for the
# disk (fsync on a slow stick, state D) is not waiting in poll(): a slow write-back is never
# taken for a hang.
HANG_AFTER = 10.0
# Where such a process waits (its wchan): poll() or select(), or the open(2) of a fifo that no
# process opens from the other end (fs/pipe.c). rsync never reads a fifo (it copies one as a
# special file); its sender opens one only when a file it listed as a regular file was
# replaced by a fifo since, and then waits forever while the others poll() for it.
_WAITING = ("poll", "select", "wait_for_partner")


HUNG_EXIT = 30  # rsync's own code for "timeout in data send/receive"
STOPPED_EXIT = 20  # rsync's own code for "received SIGUSR1 or SIGINT": stopped on request


_WATCH_EVERY = 2.0
STOP_EVERY = 0.02  # statvfs and the like: cheap


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
        if not any(w in wchan for w in _WAITING):
            waiting = False
    return waiting, io


def _kill_tree(pids: list[int]) -> None:
    for p in reversed(pids):  # the deepest first: none cleans up after the others
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def communicate_watched(
    proc: subprocess.Popen[str], stop: Callable[[], str | None] | None = None
) -> CommandResult:
    """proc.communicate(), killing the command when it hangs (see HANG_AFTER) or when `stop`,
    asked every STOP_EVERY seconds, gives a reason."""
    stalled_since: float | None = None
    last_io = -1
    watched = time.monotonic()
    while True:
        try:
            out, err = proc.communicate(timeout=_WATCH_EVERY if stop is None else STOP_EVERY)
            return CommandResult(proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            pass
        reason = None if stop is None else stop()
        if reason is not None:
            _kill_tree(_tree(proc.pid))
            out, err = proc.communicate()
            return CommandResult(
                STOPPED_EXIT, out, (err or "") + f"\nrampiped: stopped: {reason}\n"
            )
        if time.monotonic() - watched < _WATCH_EVERY:
            continue
        watched = time.monotonic()
        pids = _tree(proc.pid)
        waiting, io = _waiting_and_io(pids)
        now = time.monotonic()
        if not waiting or io != last_io:
            stalled_since, last_io = None, io
            continue
        if stalled_since is None:
            stalled_since = now
        elif now - stalled_since >= HANG_AFTER:
            _kill_tree(pids)
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


def rsync_has_fsync(runner: Runner) -> bool:
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


def exclude_pattern(rel: str) -> str:
    """An rsync pattern that matches exactly the path `rel` below the transfer root.

    rsync honours backslash escapes only in patterns holding a wildcard, so the last character
    becomes a one-character class (which also is a wildcard) and every other wildcard or
    backslash is escaped."""
    body = "".join("\\" + c if c in "*?[\\" else c for c in rel[:-1])
    return "/" + body + "[\\" + rel[-1] + "]"


@contextlib.contextmanager
def exclude_file(rels: list[str]) -> Iterator[str | None]:
    """An rsync --exclude-from file (NUL-separated, --from0) naming exactly `rels`
    (exclude_pattern each); None when there are none."""
    if not rels:
        yield None
        return
    with _nul_list("rampiped-exclude-", [exclude_pattern(rel) for rel in rels]) as path:
        yield path


@contextlib.contextmanager
def files_from(rels: list[str]) -> Iterator[str]:
    """An rsync --files-from file (NUL-separated, --from0) listing `rels`."""
    with _nul_list("rampiped-files-", rels) as path:
        yield path


@contextlib.contextmanager
def _nul_list(prefix: str, lines: list[str]) -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix=prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            for line in lines:
                f.write(os.fsencode(line) + b"\0")
        yield path
    finally:
        os.unlink(path)
