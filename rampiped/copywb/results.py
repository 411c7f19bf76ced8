"""What copy-mode operations return, and the errors they raise."""

from __future__ import annotations

from dataclasses import dataclass, field

from rampiped.copywb.snapshot import Snapshot
from rampiped.errors import RampipeError
from rampiped.ledger import Ledger


class CopyError(RampipeError):
    """A copy-mode operation could not be done; the message says why and what to do."""


class TooLarge(CopyError):
    pass


class CopyRace(CopyError):
    def __init__(self, message: str, paths: list[str]) -> None:
        super().__init__(message)
        self.paths = paths


class UnsafeSource(CopyError):
    """The RAM side is not the expected, filled RAM copy of this pin: syncing from it could
    delete the disk copy."""


class UnsafeTarget(CopyError):
    """The disk side is not the pin's bind of the original directory."""


class CheckpointIncomplete(CopyError):
    """Everything else was written, but some databases could not be; `result` says what was."""

    def __init__(self, message: str, result: CheckpointResult) -> None:
        super().__init__(message)
        self.result = result


class NotVerified(CopyError):
    """After a final sync the disk does not hold what RAM holds."""

    def __init__(self, message: str, differences: list[str], ledger: Ledger | None = None) -> None:
        super().__init__(message)
        self.differences = differences
        self.ledger = ledger  # what the disk holds after the sync that did not verify


@dataclass(frozen=True)
class CopyResult:
    files: int  # regular files in the copy (names: a hard-linked file counts per name)
    bytes: int  # as dir_size counts them: files (each inode once) and symlinks
    seconds: float
    attempts: int  # passes needed until one saw no change on disk
    # The source as it was when the last pass ended: after the bind mount, changed_since(src,
    # snapshot) names writes that reached the disk in between (they would be lost).
    snapshot: Snapshot = field(repr=False, compare=False, default_factory=dict)


@dataclass(frozen=True)
class CheckpointResult:
    files: int  # regular files written (databases included)
    bytes: int  # bytes of those files
    deleted: int  # entries deleted on disk
    seconds: float
    unstable: list[str]  # changed during every attempt; on disk as last seen (whole)
    databases: list[str]  # written through SQLite's backup API
    # what the disk holds of each file after it, by content (see ledger.py); databases and
    # their companions are left out (every checkpoint writes them through the backup API)
    ledger: Ledger | None = field(default=None, repr=False, compare=False)
    appended: int = 0  # of `files`, those that only grew: their tail appended (appends.py)
    renamed: int = 0  # files renamed on disk as they were in RAM (renames.py), not copied
    whole_bytes: int = 0  # what writing each changed file whole would have written
