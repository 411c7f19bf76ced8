"""Walking a directory tree the way rampiped needs it everywhere: symlinks are never followed,
and entries that vanish while we look are skipped (the trees are live: applications keep
writing while we measure, snapshot or copy them)."""

from __future__ import annotations

import os
import stat
from collections.abc import Container, Iterator

# a directory or entry removed, or a directory replaced by a file, while we walked
VANISHED: tuple[type[OSError], ...] = (FileNotFoundError, NotADirectoryError)


def walk(
    root: str,
    *,
    skip: Container[str] = (),
    tolerate: tuple[type[OSError], ...] = VANISHED,
) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to `root`, lstat) of every entry below `root`, `root` itself not
    included. Entries whose full path is in `skip` are neither yielded nor entered (mounts
    below `root`, for instance). Errors of the kinds in `tolerate` skip what they hit."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel_dir) if rel_dir else root)
        except tolerate:
            continue
        with it:
            for entry in it:
                if entry.path in skip:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except tolerate:
                    continue
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                yield rel, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(rel)
