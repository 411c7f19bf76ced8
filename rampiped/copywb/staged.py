"""A copy pin's checkpoint writes whole files with few journal commits: every file that is to
be written whole is first copied into a stage (STAGE in the scratch directory, on the disk's
filesystem, where no reader looks: the copy covers the path), without an fsync each; one sync
makes them all durable (syncfs, or where one journal commit takes everything before it, their
data written out and that commit: durable.commit); then each is renamed over its name, and the
checkpoint's main rsync pass leaves them out (a file that changed since it was staged is the
checkpoint's "changed meanwhile" case, as a file that changed while the pass copied it) and
only deletes, makes directories, symlinks and links, and sets metadata. The renames are
committed by the checkpoint's closing sync: the filesystem's journal commits a few times per
checkpoint, not once per file.

Why a power cut loses nothing: a name is renamed to a staged file only after that file's data
is on disk, so each name shows its old file or its new one, whole, as with rsync's own
temporary file, fsync and rename per file. The stage is in the scratch directory, which the
next start removes.

What the stage does not move (a name that is a directory on disk, or the other way round, a
file that rsync could not stage) is written by the main pass as before: temporary file, fsync,
rename."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat

from rampiped.commands import (
    RSYNC_COPY,
    CommandResult,
    Runner,
    describe_exit,
    files_from,
    run_pass,
    source_churn_only,
)
from rampiped.fsops import join, lstat_at, open_dir_at, opened_dir

log = logging.getLogger(__name__)

STAGE = "stage"  # in the scratch directory (writeback.SCRATCH_NAME)
_MAKE_WAY = re.compile(r"could not make way for new [a-z ]+: (.+)")


def stage_argv(data: str, disk: str, stage: str, options: list[str]) -> list[str]:
    """rsync of the files of `data` that `disk` does not hold (by rsync's quick check, or by
    content with --checksum in `options`) into the empty directory `stage`: --compare-dest
    leaves out what `disk` holds already, -m the directories left empty. rsync writes each
    under a temporary name and renames it when it is complete, so what the stage holds under
    a file's name is a whole copy, also when the run failed."""
    return [
        *RSYNC_COPY, "-m", "--stats", *options, f"--compare-dest={disk}", data + "/", stage + "/",
    ]  # fmt: skip


def stage_files(
    runner: Runner,
    data: str,
    disk: str,
    scratch: str,
    options: list[str],
    only: list[str] | None = None,
) -> CommandResult:
    """Copy into the stage (made here, in `scratch`) what the checkpoint writes whole: with
    `only`, of those files (the ledger's changed ones; rsync then makes only their parent
    directories in the stage, not every directory of the tree: --compare-dest leaves them
    there, -m prunes only directories left empty on the sending side). A run that failed is
    not an error: the stage is a saving, and what it lacks the main pass writes (it fails
    there too when it must: a disk that cannot be written)."""
    stage = os.path.join(scratch, STAGE)
    os.mkdir(stage, 0o700)
    if only is not None and not only:
        return CommandResult(0, "", "")  # nothing to write whole
    with contextlib.ExitStack() as stack:
        if only is not None:
            listing = stack.enter_context(files_from(sorted(only)))
            options = [*options, "--from0", f"--files-from={listing}"]
        argv = stage_argv(data, disk, stage, options)
        result = run_pass(runner, argv)
    if result.returncode != 0 and not source_churn_only(result):
        log.info(
            "%s: staging the files to write whole %s; the main pass writes what it lacks: %s",
            data,
            describe_exit(result.returncode),
            next(iter(result.stderr.strip().splitlines()), ""),
        )
    return result


def left_by_exclusion(result: CommandResult, moved: list[str]) -> CommandResult:
    """`result` of the main pass without rsync's complaints that it could not replace a
    directory by a file (or the like) because files below it were left out of the pass (moved
    in from the stage): that name changed kind in RAM after the staging, so the checkpoint
    copies it again (as a change made while it ran), and that pass has nothing left out."""
    kept = []
    for line in result.stderr.splitlines():
        m = _MAKE_WAY.fullmatch(line.strip())
        if m is not None and any(rel.startswith(m.group(1).rstrip("/") + "/") for rel in moved):
            continue
        kept.append(line)
    if len(kept) == len(result.stderr.splitlines()):
        return result
    return CommandResult(result.returncode, result.stdout, "\n".join(kept))


def staged_files(scratch: str) -> list[str]:
    """The paths of the regular files in the stage of `scratch` (none when nothing was
    staged): what must be written out before they are renamed into place."""
    stage = os.path.join(scratch, STAGE)
    if not os.path.isdir(stage):
        return []
    with opened_dir(stage) as fd:
        return [os.path.join(stage, rel) for rel in _files_below_fd(fd, "")]


def move_staged(disk: str, scratch: str) -> list[str]:
    """Rename each staged regular file over its name in `disk` (and a staged directory whose
    name `disk` does not have, whole); returns the regular files moved (those of a moved
    directory too). Call once the stage is durable (see the checkpoint): the renames must not reach
    the disk before the data."""
    moved: list[str] = []
    with opened_dir(os.path.join(scratch, STAGE)) as stage_fd, opened_dir(disk) as disk_fd:
        stack = [("", os.dup(stage_fd), os.dup(disk_fd))]
        while stack:
            rel, sfd, dfd = stack.pop()
            try:
                with os.scandir(sfd) as it:
                    entries = list(it)  # listed before any is renamed away
                for entry in entries:
                    moved += _move_one(entry, join(rel, entry.name), sfd, dfd, stack)
            finally:
                os.close(sfd)
                os.close(dfd)
    return moved


def _move_one(
    entry: os.DirEntry[str], rel: str, sfd: int, dfd: int, stack: list[tuple[str, int, int]]
) -> list[str]:
    name = entry.name
    there = lstat_at(dfd, name)
    if entry.is_dir(follow_symlinks=False):
        if there is None:
            files = _files_below(sfd, name, rel)
            os.rename(name, name, src_dir_fd=sfd, dst_dir_fd=dfd)
            return files
        if stat.S_ISDIR(there.st_mode):
            stack.append((rel, open_dir_at(sfd, name), open_dir_at(dfd, name)))
        return []
    if not entry.is_file(follow_symlinks=False):
        return []  # symlinks and the like: the main pass makes them
    if there is not None and stat.S_ISDIR(there.st_mode):
        return []  # a directory to replace: the main pass does it (--force)
    os.rename(name, name, src_dir_fd=sfd, dst_dir_fd=dfd)
    return [rel]


def _files_below(parent_fd: int, name: str, rel: str) -> list[str]:
    fd = open_dir_at(parent_fd, name)
    try:
        return _files_below_fd(fd, rel)
    finally:
        os.close(fd)


def _files_below_fd(fd: int, rel: str) -> list[str]:
    out: list[str] = []
    with os.scandir(fd) as it:
        for entry in it:
            child = join(rel, entry.name)
            if entry.is_dir(follow_symlinks=False):
                out += _files_below(fd, entry.name, child)
            elif entry.is_file(follow_symlinks=False):
                out.append(child)
    return out
