"""Where a write-back keeps the disk files it replaces (writeback.HeldFiles): outside the
user's directory when it can be.

The held files are hard links, so the hold directory must be on the directory's filesystem
and reached through the same mount as the directory (link(2) does not cross mounts). When the
pin's journal is on the mount the directory is on (the usual case: /var/lib and /var/log on
the root filesystem), the hold directory is `JOURNAL_HOLD` in the journal, reached with the
directory through a private copy of that mount (mounts.clone_mount: no path leads to it, and
it goes when its descriptor is closed): a reader of the directory never sees it. Otherwise it
is HOLD_NAME at the directory's top, as before.

A hold directory in the journal must never go with the journal: when one is left at a point
where the journal is removed (a write-back whose carrying failed, a power cut), `rescue`
moves it into the directory, where the next start and the next unpin look for it too."""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from rampiped.fsops import DIR_FLAGS, _fsync_dir, lstat_at, open_dir_at, open_rel
from rampiped.writeback.names import HOLD_NAME

log = logging.getLogger(__name__)

JOURNAL_HOLD = "held"  # the hold directory's name in a pin's journal


@dataclass(frozen=True)
class Staging:
    """The hold directory and the directory, both through the private copy of their mount
    (`hold_fd`, `target_fd`: a rename from one to the other stays on one mount), and the hold
    directory's own path (`hold_path`, in the journal: root's, for a program that takes a
    path, such as SQLite, which resolves /proc/self/fd links to paths the copy does not have)."""

    hold_fd: int
    target_fd: int
    hold_path: str


class HoldPlace:
    """The directory a write-back replaces files in (`target`, a path that reaches it, such as
    the staging bind) and where its hold directory goes."""

    def __init__(
        self,
        target: str,
        *,
        root_fd: int | None = None,
        target_rel: str = "",
        hold_rel: str = "",
        shown: str | None = None,
    ) -> None:
        self.target = os.path.abspath(target)
        self.root_fd = root_fd  # a private copy of the mount holding both, or None
        self.target_rel = target_rel  # the directory, below root_fd
        self.hold_rel = hold_rel  # the hold directory, below root_fd
        # the hold directory by path: for messages, and with root_fd its own path in the
        # journal (root's), for a program that takes a path (Staging.hold_path)
        self.shown = shown or os.path.join(self.target, HOLD_NAME)
        self._close = weakref.finalize(self, os.close, root_fd) if root_fd is not None else None

    @classmethod
    def inside(cls, target: str) -> HoldPlace:
        """HOLD_NAME at the top of `target`."""
        return cls(target)

    @property
    def outside(self) -> bool:
        return self.root_fd is not None

    def close(self) -> None:
        if self._close is not None:
            self._close()

    def open_target(self) -> int | None:
        """A descriptor of the directory (through the copy of the mount when there is one);
        None when it is gone."""
        if self.root_fd is None:
            try:
                return os.open(self.target, DIR_FLAGS)
            except FileNotFoundError:
                return None
        return open_rel(self.root_fd, self.target_rel)

    @contextlib.contextmanager
    def hold_parent(self) -> Iterator[tuple[int, str] | None]:
        """(descriptor of the hold directory's parent, its name there), or None when that
        parent is gone; the descriptor is closed when the block ends."""
        if self.root_fd is None:
            fd, name = self.open_target(), HOLD_NAME
        else:
            parent, _, name = self.hold_rel.rpartition("/")
            fd = open_rel(self.root_fd, parent)
        if fd is None:
            yield None
            return
        try:
            yield fd, name
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Staging | None]:
        """Where a file written whole can be made so that no reader of the directory sees it
        until it is renamed into place (Staging); None when the hold directory is inside the
        directory, or either is gone. Its descriptors are closed when the block ends."""
        if self.root_fd is None:
            yield None
            return
        target_fd = self.open_target()
        hold_fd = None
        try:
            with self.hold_parent() as parent:
                if parent is not None and lstat_at(parent[0], parent[1]) is not None:
                    hold_fd = open_dir_at(parent[0], parent[1])
            if target_fd is None or hold_fd is None:
                yield None
            else:
                yield Staging(hold_fd, target_fd, self.shown)
        finally:
            for fd in (hold_fd, target_fd):
                if fd is not None:
                    os.close(fd)

    def reaches(self, target: str, hold_parent: str) -> bool:
        """Whether the copy of the mount reaches the directory `target` and the hold
        directory's parent `hold_parent` (paths outside it) as the same inodes: a directory
        that is a mount point of its own is not the one below it in the copy."""
        assert self.root_fd is not None
        for rel, path in (
            (self.target_rel, target),
            (self.hold_rel.rpartition("/")[0], hold_parent),
        ):
            fd = open_rel(self.root_fd, rel)
            if fd is None:
                return False
            try:
                a, b = os.fstat(fd), os.stat(path)
            except OSError:
                return False
            finally:
                os.close(fd)
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                return False
        return True

    def rescue(self) -> bool:
        """Move a hold directory left in the journal into the directory (HOLD_NAME), before
        the journal is removed. True when none is left in the journal."""
        if self.root_fd is None:
            return True
        with self.hold_parent() as parent:
            if parent is None or lstat_at(parent[0], parent[1]) is None:
                return True
            target_fd = self.open_target()
            if target_fd is None:
                log.error(
                    "%s is gone: the files written during a write-back stay in %s",
                    self.target,
                    self.shown,
                )
                return False
            try:
                if lstat_at(target_fd, HOLD_NAME) is not None:
                    log.error(
                        "%s/%s exists already: the files written during a write-back stay in %s",
                        self.target,
                        HOLD_NAME,
                        self.shown,
                    )
                    return False
                os.rename(parent[1], HOLD_NAME, src_dir_fd=parent[0], dst_dir_fd=target_fd)
                _fsync_dir(target_fd)
                _fsync_dir(parent[0])
            finally:
                os.close(target_fd)
        log.warning(
            "%s: the files written during an unfinished write-back are kept in %s/%s; the next"
            " unpin of it (or the next start) carries them over",
            self.target,
            self.target,
            HOLD_NAME,
        )
        return True
