"""Whether a checkpoint of an overlay pin's layer, and the apply of that generation, fit on
the disk: refused before anything is written (NoSpace) when they would not."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from rampiped import tree
from rampiped.commands import SyncError
from rampiped.engine import format_bytes
from rampiped.ledger import Ledger
from rampiped.ledger import Scan as LedgerScan
from rampiped.ledger import scan as ledger_scan

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
    *,
    linked: bool = False,
) -> SpaceNeed:
    """Refuse (NoSpace) a checkpoint or write-back of `upper` that would not fit: the new
    journal generation on the journal's filesystem, and the apply into `target` afterwards on
    the target's, both on one filesystem when they share it (the generation stays until the
    apply is verified). Filesystems that report no inode count (btrfs, tmpfs with nr_inodes=0)
    are checked for bytes only. `target_name`: the directory as its users know it.

    The content of the layer is read only when it matters: if the write-back fits even with
    every file counted as changed, no file is read (an eviction must unmount quickly).
    `linked`: the apply links the generation's files into place (links.py), so only the
    generation takes space for their data."""
    shown = target_name or target
    os.makedirs(journal, mode=0o700, exist_ok=True)
    jst, tst = os.statvfs(journal), os.statvfs(target)
    same = os.stat(journal).st_dev == os.stat(target).st_dev
    bound = space_need(upper, None)
    if linked:
        bound = dataclasses.replace(bound, apply_bytes=0)
    if ledger is None or _short_of_space(bound, jst, tst, same, what, shown, journal) is None:
        need = bound
    else:
        need = space_need(upper, ledger, bound.found)
        if linked:
            need = dataclasses.replace(need, apply_bytes=0)
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
