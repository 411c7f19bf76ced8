"""Applying a layer to the directory on disk: deletions, the copy, times, verification."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from rampiped import durable, osutil
from rampiped.commands import Runner, SyncError, exclude_file, rsync_has_fsync, run_command
from rampiped.fsops import (
    at_rel,
    join,
    lstat_at,
    open_dir_at,
    open_rel,
    opened_dir,
    remove_at,
    syncfs_checked,
    walk_fds,
)
from rampiped.mounts import MountError
from rampiped.writeback.held import HeldFiles
from rampiped.writeback.layer import Layer, UpperDir, first_ten, renamed_dirs, scan_layer
from rampiped.writeback.links import (
    OVERLAY_XATTR_PREFIX,
    LinkRoute,
    link_files,
    linkable,
    same_dir,
)
from rampiped.writeback.moves import (
    Stash,
    _mark_stash_done,
    _move_renamed_dirs,
    _undo_moves,
    remove_stash,
)
from rampiped.writeback.names import JOURNAL_STASH, STASH_NAME
from rampiped.writeback.scratch import scratch_dir
from rampiped.writeback.verify import verify_applied

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyResult:
    files: int  # regular files written back
    bytes: int  # their data (each hard-linked inode once)
    deleted: int  # entries removed from disk (whiteouts, opaque dirs, type changes, replaced)
    seconds: float
    linked: int = 0  # of `files`, those linked from a journal generation (not written again)


def _apply_deletions(layer: Layer, target_fd: int, keep_newer_than: int | None = None) -> int:
    """Delete on disk what the layer removed: names under whiteouts, entries of directories
    without lower content (opaque) that the layer does not hold, and entries whose type the
    layer changed. Walks layer and disk together, fd-relative, never following a symlink.
    With `keep_newer_than` (ns), entries under whiteouts and opaque directories whose ctime is
    that late or later are kept: they were written on disk after the overlay was unmounted."""
    deleted = 0

    def remove(fd: int, name: str) -> int:
        if keep_newer_than is None:
            return remove_at(fd, name)
        return _remove_older(fd, name, keep_newer_than)

    def visit(d: UpperDir, fd: int) -> Iterator[tuple[UpperDir, int]]:
        nonlocal deleted
        if d.lower is None:
            for name in os.listdir(fd):
                if name not in d.children:
                    deleted += remove(fd, name)
        for name, kind in d.children.items():
            st = lstat_at(fd, name)
            if st is None:
                continue
            disk_kind = osutil.file_kind(st)
            if kind == "whiteout":
                deleted += remove(fd, name)
            elif kind == "dir":
                if disk_kind != "dir":
                    deleted += remove_at(fd, name)
                else:
                    yield layer.dirs[join(d.rel, name)], open_dir_at(fd, name)
            elif disk_kind != kind or (kind != "file" and st.st_nlink > 1):
                # rsync replaces a regular file by writing a new one and renaming it
                # over (that also breaks disk hard links, as copy-up did); anything
                # else of another type, or a hard-linked special file, goes first.
                deleted += remove_at(fd, name)

    walk_fds(layer.dirs[""], os.dup(target_fd), visit)
    return deleted


def _remove_older(dir_fd: int, name: str, newer_than: int) -> int:
    """Remove `name` below `dir_fd` like remove_at, but keep every entry whose ctime is
    `newer_than` (ns) or later, and the directories that lead to one; returns how many went."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        if st.st_ctime_ns >= newer_than:
            log.info("kept %s: written on disk during the write-back", name)
            return 0
        os.unlink(name, dir_fd=dir_fd)
        return 1
    removed = 0
    fd = open_dir_at(dir_fd, name)
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


def _set_times(layer: Layer, target_fd: int) -> None:
    """Give directories, symlinks and fifos the layer's times to the nanosecond. rsync
    compares their times to the second and leaves one made in the same second as the layer's
    with its own (a directory that rsync filled has the time of its last change)."""
    os.utime(target_fd, ns=layer.dirs[""].times[""])
    stack: list[tuple[UpperDir, int]] = [(layer.dirs[""], os.dup(target_fd))]
    try:
        while stack:
            d, fd = stack.pop()
            try:
                for name, ns in d.times.items():
                    if name == "" and d.rel == "":
                        continue
                    os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)
                    if d.children[name] == "dir":
                        stack.append((layer.dirs[join(d.rel, name)], open_dir_at(fd, name)))
            finally:
                os.close(fd)
    finally:
        for _, fd in stack:
            os.close(fd)


def _make_durable(target_fd: int, target: str, fsync: bool) -> None:
    """Everything the apply changed below `target`, durable. Where one journal commit takes
    every change before it (durable.fsync_commits_all) and every file written was synced
    already (rsync's --fsync, HeldFiles.write_own; a file linked from the journal was durable
    before), that one commit: the metadata stays in the journal until the kernel writes it
    home, merged with later changes, where syncfs would write all of it at once (the
    directory's times, which the apply has just set, are set again to what they are).
    Elsewhere syncfs."""
    if fsync and durable.fsync_commits_all(target):
        try:
            durable.commit(".", dir_fd=target_fd)
        except MountError as e:
            raise SyncError(f"cannot make {target} durable: {e}") from None
    else:
        syncfs_checked(target_fd, target)


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
    if at_or_below(ru, rt) or at_or_below(rt, ru):
        raise SyncError(f"layer {upper} and target {target} overlap: refusing")


def at_or_below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def apply_upper(
    upper: str,
    target: str,
    *,
    runner: Runner = run_command,
    keep_newer_than: int | None = None,
    window: HeldFiles | None = None,
    unchanged: frozenset[str] = frozenset(),
) -> ApplyResult:
    """Make `target` (the directory on disk) hold what the overlay showed, given the upper layer
    of that overlay (unmounted) or a journal copy of it. Raises SyncError, with `target`
    possibly partly written, unless the result was verified on disk.

    `keep_newer_than` (ns, wall clock; defaults to `window.threshold`): entries on disk that
    the layer deletes but whose ctime is that late or later are kept, and verification
    accepts what was written on disk from then on. `window`: the disk files held before the
    apply (HeldFiles.hold); what was appended to them meanwhile goes into the files written."""
    return apply_layer(
        upper,
        target,
        runner,
        keep_plan=False,
        keep_newer_than=keep_newer_than,
        window=window,
        unchanged=unchanged,
    )


@contextlib.contextmanager
def stash_place(
    link: LinkRoute | None, target_fd: int, target: str, source: str
) -> Iterator[tuple[int, Stash]]:
    """Where the apply of `source` (a generation or a copy of one, in the journal) moves
    renamed directories from, and the stash they wait in: with a route that reaches the
    journal and the directory through one copy of their mount, the directory as seen there
    and JOURNAL_STASH beside the generations (no name of rampiped's in the directory);
    otherwise `target_fd` and STASH_NAME inside it, as also when a stash is there already (an
    apply cut short is resumed where it started)."""
    if link is None or lstat_at(target_fd, STASH_NAME) is not None:
        yield target_fd, Stash.inside(target_fd, target)
        return
    moves_fd = open_rel(link.root_fd, link.target)
    journal_fd = open_rel(link.root_fd, os.path.dirname(link.source))
    try:
        if moves_fd is None or journal_fd is None:
            yield target_fd, Stash.inside(target_fd, target)
        else:
            label = os.path.join(os.path.dirname(source), JOURNAL_STASH)
            yield moves_fd, Stash(journal_fd, JOURNAL_STASH, label)
    finally:
        for fd in (moves_fd, journal_fd):
            if fd is not None:
                os.close(fd)


def _writes_files(layer: Layer, excluded: list[str]) -> bool:
    """Whether rsync writes a regular file of `layer`: one not in `excluded`."""
    skip = set(excluded)
    return any(
        kind == "file" and (f"{d.rel}/{name}" if d.rel else name) not in skip
        for d in layer.dirs.values()
        for name, kind in d.children.items()
    )


def _xattrs(path: str) -> dict[str, bytes]:
    """Every xattr of `path` (not followed), the overlay's own aside."""
    return {
        k: os.getxattr(path, k, follow_symlinks=False)
        for k in os.listxattr(path, follow_symlinks=False)
        if not k.startswith(OVERLAY_XATTR_PREFIX)
    }


def _rsync_has_work(layer: Layer, excluded: list[str], target_fd: int) -> bool:
    """Whether rsync would write anything the apply does not write itself: an entry of the
    layer that is not excluded and is neither a directory nor a whiteout (a regular file or
    a symlink not linked, a fifo), or a directory that the disk lacks or holds with another
    mode, owner or xattrs (rsync -aAX would set those; their times are _set_times'). Without
    any, rsync is not started: after an unmount, starting it took tens of milliseconds in
    which the path showed the disk's older files."""
    skip = set(excluded)
    for d in layer.dirs.values():
        have = os.fstat(target_fd) if not d.rel else at_rel(target_fd, d.rel, lstat_at)
        path = os.path.join(layer.root, d.rel) if d.rel else layer.root
        want = os.lstat(path)
        if have is None or not stat.S_ISDIR(have.st_mode):
            return True
        if (stat.S_IMODE(want.st_mode), want.st_uid, want.st_gid) != (
            stat.S_IMODE(have.st_mode),
            have.st_uid,
            have.st_gid,
        ):
            return True
        # (the top by "/.": the descriptor's link itself, not followed, has no xattrs)
        on_disk = f"/proc/self/fd/{target_fd}/{d.rel or '.'}"
        try:
            if _xattrs(path) != _xattrs(on_disk):
                return True
        except OSError:
            return True
        for name, kind in d.children.items():
            if kind not in ("dir", "whiteout") and join(d.rel, name) not in skip:
                return True
    return False


def apply_layer(
    upper: str,
    target: str,
    runner: Runner,
    *,
    keep_plan: bool,
    keep_newer_than: int | None = None,
    window: HeldFiles | None = None,
    unchanged: frozenset[str] = frozenset(),
    link: LinkRoute | None = None,
) -> ApplyResult:
    """apply_upper's work (see there). `unchanged`: regular files of the layer that the
    directory holds already, as they are in the layer (written there before and verified):
    left out of the copy, so that a write-back after an earlier one writes only the rest.
    `link`: where `upper` (a journal generation, synced) and `target` are below one mount;
    the generation's regular files are then linked into place rather than copied (links.py)."""
    if keep_newer_than is None and window is not None:
        keep_newer_than = window.threshold
    start = time.monotonic()
    upper = os.path.abspath(upper)
    target = os.path.abspath(target)
    _check_paths(upper, target)
    layer = scan_layer(upper)
    moves = renamed_dirs(layer)
    fsync = rsync_has_fsync(runner)
    deleted = 0
    if link is not None and not same_dir(link, upper, target):
        log.info("%s: not on the mount of %s; copied, not linked", upper, target)
        link = None
    linked = 0
    with (
        opened_dir(target) as target_fd,
        stash_place(link, target_fd, target, upper) as (moves_fd, stash),
    ):
        try:
            try:
                n, stashed = _move_renamed_dirs(moves_fd, target, stash, upper, moves)
                deleted += n
                deleted += _apply_deletions(layer, target_fd, keep_newer_than)
            except OSError as e:
                raise SyncError(
                    f"write-back of {upper} into {target} failed while moving or deleting "
                    f"{e.filename or ''}: {e.strerror}; {target} is partly written, the layer "
                    "is unchanged"
                ) from e
            own = window.own_writes(layer) if window is not None else []
            own = [rel for rel in own if rel not in unchanged]
            to_link = [] if link is None else linkable(layer, [*own, *unchanged])
            excluded = own + sorted(unchanged) + to_link
            with (
                exclude_file(excluded) as exclude_from,
                scratch_dir(target, needed=_writes_files(layer, excluded)) as scratch,
            ):
                if _rsync_has_work(layer, excluded, target_fd):
                    argv = _rsync_apply_argv(upper, target, fsync, exclude_from, scratch)
                    result = runner(argv)
                    if result.returncode != 0:
                        raise SyncError.from_command(
                            f"write-back of {upper} into {target} (partly written; the layer"
                            " is unchanged)",
                            argv,
                            result,
                        )
                if link is not None:
                    try:
                        linked, _ = link_files(link, to_link)
                    except OSError as e:
                        raise SyncError(
                            f"write-back of {upper} into {target} failed while linking "
                            f"{e.filename or 'a file'} from the journal: {e.strerror or e}; "
                            f"{target} is partly written, the journal is unchanged"
                        ) from e
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
            _make_durable(target_fd, target, fsync)
            problems = verify_applied(upper, target, newer_than=keep_newer_than)
            if problems:
                raise SyncError(
                    f"write-back of {upper} into {target} did not verify: {first_ten(problems)}"
                )
        except SyncError as e:
            # Put renamed directories back where the layer expects them, so that the same
            # layer can be mounted over the directory again (everything else apply did is
            # hidden under the layer or repeated by it) and a later apply starts afresh. A
            # process that dies here instead leaves the plan, and the next apply resumes it.
            try:
                moved_back = _undo_moves(moves_fd, target, stash, upper)
            except (OSError, SyncError) as undo_error:
                raise SyncError(
                    f"{e}; moving the renamed directories back also failed ({undo_error}); "
                    f"the next apply of {upper} resumes from {stash.label}",
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
                _mark_stash_done(stash)
            else:
                remove_stash(stash)
            os.utime(target_fd, ns=layer.dirs[""].times[""])  # the stash touched the root
    kept = [os.lstat(os.path.join(upper, rel)) for rel in unchanged]
    kept_bytes = sum({(st.st_dev, st.st_ino): st.st_size for st in kept}.values())
    return ApplyResult(
        layer.files - len(kept),
        layer.bytes - kept_bytes,
        deleted,
        time.monotonic() - start,
        linked,
    )
