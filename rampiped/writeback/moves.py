"""Moving renamed directories into place, resumable after a crash (the stash)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from rampiped import durable
from rampiped.commands import SyncError
from rampiped.fsops import (
    _fsync_dir,
    _make_dirs_rel,
    lstat_at,
    open_dir_at,
    open_rel,
    opened_dir,
    remove_at,
)
from rampiped.writeback import attrdoc
from rampiped.writeback.names import STASH_NAME

log = logging.getLogger(__name__)


_PLAN_NAME = "plan.json"


_PLAN_VERSION = 1
# Where one journal commit takes every change before it, in order (durable.fsync_commits_all),
# the plan is kept in this attribute of the stash directory: metadata, durable in order with
# the renames after it, where a file's content would have to be written out first (a write
# that waits behind every other on a busy stick, while the renamed directory is missing from
# its new name: from the unmount to its placement). A plan too large for it is a file.
_PLAN_XATTR = "trusted.rampiped.plan"
# The phases of a plan, in order. Past "stash" a phase is an empty file in the stash
# (PHASE_MARK + phase) rather than a new plan, for the same reason: a name is metadata.
_PHASES = ("stash", "place", "placed", "done")
_PHASE_MARK = "phase-"


@dataclass(frozen=True)
class Stash:
    """Where the renamed directories of an apply wait between their origin and their place:
    the directory `name` below `parent_fd`, on the mount of the descriptor the moves are made
    from (a rename does not cross mounts). Inside the target (STASH_NAME), or in the pin's
    journal when the apply reaches both through one private copy of their mount (JOURNAL_STASH:
    no name of rampiped's in the directory then)."""

    parent_fd: int
    name: str
    label: str  # its path, for messages

    @classmethod
    def inside(cls, target_fd: int, target: str) -> Stash:
        return cls(target_fd, STASH_NAME, f"{target}/{STASH_NAME}")

    def lstat(self) -> os.stat_result | None:
        return lstat_at(self.parent_fd, self.name)

    def open(self) -> int:
        return open_dir_at(self.parent_fd, self.name)


def _layer_identity(upper: str) -> str:
    st = os.lstat(upper)
    return f"{os.path.realpath(upper)}:{st.st_dev}:{st.st_ino}:{st.st_ctime_ns}"


def _read_plan(stash_fd: int) -> dict[str, object] | None:
    data = attrdoc.get(stash_fd, _PLAN_XATTR)
    if data is None:
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
    if (
        not isinstance(plan, dict)
        or plan.get("version") != _PLAN_VERSION
        or plan.get("phase") not in _PHASES
    ):
        return None
    for phase in _PHASES[_PHASES.index(plan["phase"]) + 1 :]:
        if lstat_at(stash_fd, _PHASE_MARK + phase) is not None:
            plan["phase"] = phase
    return plan


def _set_phase(stash_fd: int, plan: dict[str, object], phase: str, each: bool) -> None:
    """Move the plan on to `phase`: its empty file in the stash (see _PHASES), committed
    with it where `each` step is (the filesystem does not commit in order)."""
    fd = os.open(
        _PHASE_MARK + phase,
        os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=stash_fd,
    )
    os.close(fd)
    if each:
        _fsync_dir(stash_fd)
    plan["phase"] = phase


def write_json_at(
    dir_fd: int, name: str, doc: object, *, commit: bool = True, written_out: bool = True
) -> None:
    """Write `name` below `dir_fd` atomically and durably (durable.write_at), by way of
    NAME.tmp (which the stash's cleanup knows), readable by root only. Not `commit`: durable
    with the next commit only, where the filesystem commits in order (durable.write_at); nor
    `written_out`: a power cut may then leave it empty."""
    data = json.dumps(doc, sort_keys=True).encode()
    durable.write_at(
        dir_fd,
        name,
        data,
        tmp=name + ".tmp",
        mode=0o600,
        commit=commit,
        written_out=written_out,
    )


def _write_plan(stash_fd: int, plan: dict[str, object], *, commit: bool = True) -> None:
    """The plan of a new stash: in its attribute where that needs no commit (see _PLAN_XATTR),
    else in its file."""
    if not commit and attrdoc.put(stash_fd, _PLAN_XATTR, plan):
        return
    write_json_at(stash_fd, _PLAN_NAME, plan, commit=commit)


_PLAN_FILES = (_PLAN_NAME, _PLAN_NAME + ".tmp", *(_PHASE_MARK + p for p in _PHASES))


def _stashed(stash_fd: int) -> list[str]:
    """The directories in the stash (everything but the plan files)."""
    return [n for n in os.listdir(stash_fd) if n not in _PLAN_FILES]


def _stash_state(stash: Stash) -> tuple[dict[str, object] | None, list[str]]:
    """The plan of the stash directory (None: none readable) and what it holds."""
    stash_fd = stash.open()
    try:
        return _read_plan(stash_fd), _stashed(stash_fd)
    finally:
        os.close(stash_fd)


def _stash_finished(plan: dict[str, object] | None, stashed: list[str]) -> bool:
    """A stash that a finished apply left (or one cut short before it moved anything)."""
    return not stashed and (plan is None or plan.get("phase") == "done")


def remove_stash(stash: Stash) -> None:
    if stash.lstat() is None:
        return
    stash_fd = stash.open()
    try:
        leftover = _stashed(stash_fd)
        if leftover:
            raise SyncError(
                f"{stash.label} still holds {leftover[:5]} after write-back; left in place for"
                " inspection"
            )
        for n in _PLAN_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(n, dir_fd=stash_fd)
    finally:
        os.close(stash_fd)
    os.rmdir(stash.name, dir_fd=stash.parent_fd)
    _fsync_dir(stash.parent_fd)


def holds_stashed(parent: str, name: str) -> bool:
    """Whether the stash `name` in the directory `parent` holds directories (an apply cut
    short between moving an origin out and placing it): user data that nothing but the
    apply's resume may remove."""
    try:
        with opened_dir(parent) as fd:
            stash = Stash(fd, name, os.path.join(parent, name))
            st = stash.lstat()
            return st is not None and stat.S_ISDIR(st.st_mode) and bool(_stash_state(stash)[1])
    except FileNotFoundError:
        return False


def clear_finished_stash(stash: Stash, target: str) -> None:
    st = stash.lstat()
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode) and _stash_finished(*_stash_state(stash)):
        remove_stash(stash)
        return
    raise SyncError(
        f"{stash.label} holds an interrupted write-back and there is no journal to resume it"
        f" from: {target} is partly written; inspect it by hand"
    )


def _placement_order(moves: list[tuple[str, str]]) -> list[int]:
    """Indexes of `moves` in the order their directories are placed: shallowest destination
    first (undone in reverse)."""
    return sorted(range(len(moves)), key=lambda i: (moves[i][1].count("/"), moves[i][1]))


@contextlib.contextmanager
def _parent_of(target_fd: int, rel: str, gone: str) -> Iterator[tuple[int, str]]:
    """(descriptor of the directory holding `rel` below target_fd, its name in there), while
    the block runs; SyncError(`gone`) when that directory or the entry is missing."""
    parent, _, name = rel.rpartition("/")
    pfd = open_rel(target_fd, parent)
    if pfd is None or lstat_at(pfd, name) is None:
        if pfd is not None:
            os.close(pfd)
        raise SyncError(gone)
    try:
        yield pfd, name
    finally:
        os.close(pfd)


def _move_renamed_dirs(
    target_fd: int, target: str, stash: Stash, upper: str, moves: list[tuple[str, str]]
) -> tuple[int, bool]:
    """Stash every origin, then place each at its destination. Returns (entries deleted,
    whether a stash directory exists now). Resumes a plan left by an interrupted apply of the
    same layer; refuses one left by another layer.

    Each step is synced before the next where a power cut could otherwise keep a later step
    and lose an earlier one. Where one journal commit takes every change before it, in order
    (durable.fsync_commits_all), none is: a cut keeps the steps up to some point, which is
    what the plan resumes from, and the apply's closing commit makes them all durable. On a
    slow stick that shortens the moment in which a renamed directory is missing from its new
    name from one commit per step to the renames themselves."""
    identity = _layer_identity(upper)
    each = not durable.fsync_commits_all(f"/proc/self/fd/{target_fd}")

    def sync_dir(fd: int) -> None:
        if each:
            _fsync_dir(fd)

    encoded = [[o, d] for o, d in moves]
    deleted = 0
    st = stash.lstat()
    plan: dict[str, object] | None = None
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise SyncError(f"{stash.label} exists and is not a directory; refusing")
        plan, others = _stash_state(stash)
        same = plan is not None and plan.get("layer") == identity and plan.get("moves") == encoded
        if same:
            log.info("resuming an interrupted write-back of %s into %s", upper, target)
        elif _stash_finished(plan, others):
            remove_stash(stash)  # a finished apply's leftover: nothing pending
            plan = None
        else:
            raise SyncError(
                f"{stash.label} holds an interrupted write-back of another layer "
                f"({plan.get('layer') if plan else 'no readable plan'}); {target} is partly "
                "written. Refusing to apply a different layer on top; inspect it by hand"
            )
    if plan is None:
        if not moves:
            return 0, False
        # Before touching anything: every origin must be a real directory on disk, or this
        # layer does not belong to this directory.
        for origin, dest in moves:
            fd = open_rel(target_fd, origin)
            if fd is None:
                raise SyncError(
                    f"refusing to apply layer {upper} to {target}, nothing was changed: the "
                    f"directory renamed to {dest!r} came from {origin!r}, which is not a "
                    "directory on disk (is this the layer of another directory?)"
                )
            os.close(fd)
        os.mkdir(stash.name, 0o700, dir_fd=stash.parent_fd)
        plan = {"version": _PLAN_VERSION, "layer": identity, "moves": encoded, "phase": "stash"}
        stash_fd = stash.open()
        try:
            _write_plan(stash_fd, plan, commit=each)
        finally:
            os.close(stash_fd)
        sync_dir(stash.parent_fd)

    stash_fd = stash.open()
    try:
        if plan["phase"] == "stash":
            for i, (origin, _dest) in enumerate(moves):
                if lstat_at(stash_fd, str(i)) is not None:
                    continue  # moved before the interruption
                gone = f"renamed origin {origin!r} vanished from {target}"
                with _parent_of(target_fd, origin, gone) as (pfd, name):
                    log.debug("stashing %s/%s", target, origin)
                    os.rename(name, str(i), src_dir_fd=pfd, dst_dir_fd=stash_fd)
                    sync_dir(pfd)
            sync_dir(stash_fd)
            _set_phase(stash_fd, plan, "place", each)
        if plan["phase"] == "place":
            for i in _placement_order(moves):
                if lstat_at(stash_fd, str(i)) is None:
                    continue  # placed before the interruption
                dest = moves[i][1]
                parent, _, name = dest.rpartition("/")
                pfd, n = _make_dirs_rel(target_fd, parent)
                deleted += n
                try:
                    if lstat_at(pfd, name) is not None:
                        deleted += remove_at(pfd, name)
                    log.debug("placing %s at %s/%s", moves[i][0], target, dest)
                    os.rename(str(i), name, src_dir_fd=stash_fd, dst_dir_fd=pfd)
                    sync_dir(pfd)
                finally:
                    os.close(pfd)
            _set_phase(stash_fd, plan, "placed", each)
    finally:
        os.close(stash_fd)
    return deleted, True


def _undo_moves(target_fd: int, target: str, stash: Stash, upper: str) -> bool:
    """Reverse the moves of this layer's plan (placements first, deepest destination first;
    then origins back, shallowest first) and remove the stash. False when there is no plan of
    this layer (nothing was moved, or the stash belongs to another layer: left alone)."""
    if stash.lstat() is None:
        return False
    stash_fd = stash.open()
    try:
        plan = _read_plan(stash_fd)
        if plan is None or plan.get("layer") != _layer_identity(upper):
            return False
        raw = plan.get("moves")
        assert isinstance(raw, list)
        moves = [(str(o), str(d)) for o, d in raw]
        placement = _placement_order(moves) if plan.get("phase") != "stash" else []
        for i in reversed(placement):
            if lstat_at(stash_fd, str(i)) is not None:
                continue  # never placed
            gone = f"the directory moved to {target}/{moves[i][1]} is gone"
            with _parent_of(target_fd, moves[i][1], gone) as (pfd, name):
                os.rename(name, str(i), src_dir_fd=pfd, dst_dir_fd=stash_fd)
        for i in reversed(range(len(moves))):  # stash order reversed: shallowest origin first
            if lstat_at(stash_fd, str(i)) is None:
                continue  # never stashed
            parent, _, name = moves[i][0].rpartition("/")
            pfd, _ = _make_dirs_rel(target_fd, parent)
            try:
                if lstat_at(pfd, name) is not None:
                    # made by this apply after the origin moved out (the layer holds it)
                    remove_at(pfd, name)
                os.rename(str(i), name, src_dir_fd=stash_fd, dst_dir_fd=pfd)
                _fsync_dir(pfd)
            finally:
                os.close(pfd)
    finally:
        os.close(stash_fd)
    remove_stash(stash)
    return True


def _mark_stash_done(stash: Stash) -> None:
    stash_fd = stash.open()
    try:
        plan = _read_plan(stash_fd)
        if plan is not None:
            _set_phase(stash_fd, plan, "done", True)
    finally:
        os.close(stash_fd)
