"""rampiped's own temporary names in a user's directory: where rsync writes, and the
clean-up of what an interrupted write-back left."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from rampiped.fsops import DIR_FLAGS, join, lstat_at, open_dir_at, opened_dir, remove_at, walk_fds
from rampiped.writeback.names import SCRATCH_NAME

# copymode's `.NAME.rampiped-tmp-XXXXXXXX`, handover's `NAME.rampiped-tmp`, the write-back
# window's `.NAME.rampiped-new`
_LEFTOVER_RE = re.compile(r"\..+\.rampiped-tmp-[0-9a-f]{8}|.+\.rampiped-tmp|\..+\.rampiped-new")


@contextlib.contextmanager
def scratch_dir(target: str, *, needed: bool = True) -> Iterator[list[str]]:
    """rsync's options for writing into `target` (a pinned directory on disk) with its
    temporary files in `target`/SCRATCH_NAME, created empty (a leftover removed) and removed
    again afterwards; the scratch directory is excluded, so --delete leaves it alone. Not
    `needed` (rsync writes no regular file: the directory shows no name of rampiped's own):
    only the exclusion."""
    if not needed:
        yield [f"--exclude=/{SCRATCH_NAME}"]
        return
    with opened_dir(target) as tfd:
        if lstat_at(tfd, SCRATCH_NAME) is not None:
            remove_at(tfd, SCRATCH_NAME)
        os.mkdir(SCRATCH_NAME, 0o700, dir_fd=tfd)
        try:
            yield [
                f"--temp-dir={os.path.join(target, SCRATCH_NAME)}",
                f"--exclude=/{SCRATCH_NAME}",
            ]
        finally:
            with contextlib.suppress(FileNotFoundError):
                remove_at(tfd, SCRATCH_NAME)


def scrub_leftovers(root: str | int) -> list[str]:
    """Remove what a crash left of rampiped's temporary files below `root` (a pinned directory
    on disk, or a RAM copy; a path or a descriptor of it, O_PATH will do): the scratch
    directory at the top and every name of the temporary patterns, without following
    symlinks. Returns the relative paths removed."""
    if isinstance(root, str):
        root_fd = os.open(root, DIR_FLAGS)
    else:
        root_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)
    removed: list[str] = []

    def visit(rel: str, fd: int) -> Iterator[tuple[str, int]]:
        if not rel and lstat_at(fd, SCRATCH_NAME) is not None:
            remove_at(fd, SCRATCH_NAME)
            removed.append(SCRATCH_NAME)
        for entry in os.scandir(fd):
            child = join(rel, entry.name)
            if entry.is_dir(follow_symlinks=False):
                try:
                    child_fd = open_dir_at(fd, entry.name)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                yield child, child_fd
            elif _LEFTOVER_RE.fullmatch(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=fd)
                    removed.append(child)

    walk_fds("", root_fd, visit)
    return removed
