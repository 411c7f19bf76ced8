"""The write-back of a copy pin after the unmount: what it starts from, and what it brings back.

Once the copy no longer covers the path, processes that open files there write on disk. A
write-back that still has to run then (RAM changed after the verified sync, or a pin rolled
back after its bind) must neither overwrite nor delete what they write. So it writes only the
entries RAM changed (never an rsync --delete of the whole tree), deletes only entries still as
they were while the copy covered the path, and holds the disk files it replaces
(writeback.HeldFiles): bytes appended to them meanwhile follow the RAM version, a rewrite is
kept as NAME.rampiped-conflict (window_write.WindowWriteBack).

This module holds the Window (the disk as it was before the unmount, saved with the pin's
journal so that a later daemon finishes the write-back) and import_window (a write-back that
failed: what was written on disk meanwhile comes into RAM)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rampiped.copywb.atomic import tmp_path, write_atomic
from rampiped.copywb.databases import DB_COMPANIONS, databases_in, with_companions
from rampiped.copywb.results import CopyError
from rampiped.copywb.sides import DATA
from rampiped.copywb.snapshot import Snapshot, Stamp, snapshot
from rampiped.ledger import Ledger
from rampiped.ledger import scan as ledger_scan
from rampiped.writeback import CONFLICT_SUFFIX, HOLD_NAME, stamp_of
from rampiped.writeback import Stamp as StampOfFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """The disk as it was while nothing but rampiped could write it (the copy covered the
    path), and since when RAM's changes are not on disk yet."""

    before: Snapshot
    since: float  # the tmpfs's clock (PinManager.ram_clock): RAM entries changed from then on
    threshold: int  # ns, wall clock, shortly before the unmount (writeback.HeldFiles)
    # the disk files that RAM's changes replace, with their content digests, as they were
    # then: bytes appended to one of them afterwards are told from a rewrite by these
    stamps: Mapping[str, StampOfFile] = field(default_factory=dict)
    # RAM files whose content the disk does not hold although their stamps say nothing
    # changed (stores through a shared mapping, a rewrite that kept size and mtime)
    forced: frozenset[str] = frozenset()

    @classmethod
    def take(
        cls, ram: str, disk: str, since: float, threshold: int, ledger: Ledger | None = None
    ) -> Window:
        """While the copy still covers the path (nothing but rampiped writes the disk).
        `ledger`: what the disk holds, by content (None: not known; then RAM's files are
        compared with the disk's)."""
        before = snapshot(disk)
        data = os.path.join(ram, DATA)
        in_ram = snapshot(data)
        # databases go through the backup API whenever their stamps or companions changed
        # (SQLite writes with write(2), never through its mapping), so they are not compared
        skip = with_companions(databases_in(data, in_ram))
        content = {r: s for r, s in ledger_scan(data).items() if r not in skip}
        known = ledger if ledger is not None else Ledger.of(ledger_scan(disk, content))
        bare = cls(before, since, threshold, forced=frozenset(known.changed(content)))
        changed = ram_changes(in_ram, bare)
        stamps = {}
        for rel in [*changed, *changed_databases(data, in_ram, changed)]:
            if before.get(rel, ("",))[0] == "f":
                found = stamp_of(disk, rel)
                if found is not None:
                    stamps[rel] = found
        return cls(before, since, threshold, stamps, bare.forced)

    def save(self, path: str) -> None:
        doc = {
            "since": self.since,
            "threshold": self.threshold,
            "before": {rel: list(st) for rel, st in self.before.items()},
            "stamps": {rel: dataclasses.asdict(st) for rel, st in self.stamps.items()},
            "forced": sorted(self.forced),
        }
        write_atomic(path, json.dumps(doc).encode())

    @classmethod
    def load(cls, path: str) -> Window | None:
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
            before = {
                str(rel): (str(st[0]), int(st[1]), int(st[2]), int(st[3]), int(st[4]))
                for rel, st in doc["before"].items()
            }
            stamps = {str(rel): StampOfFile(**st) for rel, st in doc.get("stamps", {}).items()}
            forced = frozenset(str(rel) for rel in doc.get("forced", []))
            return cls(before, float(doc["since"]), int(doc["threshold"]), stamps, forced)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CopyError(f"{path} is unreadable ({exc}): cannot finish the write-back") from exc


def same_content(a: Stamp | None, b: Stamp | None) -> bool:
    """Same kind, and for a file the same size and mtime, for a symlink the same length: what
    rsync -a leaves after copying `a` to `b`."""
    if a is None or b is None:
        return a is b
    if a[0] != b[0]:
        return False
    if a[0] == "f":
        return a[1:3] == b[1:3]
    if a[0] == "l":
        return a[1] == b[1]
    return True


def ram_changes(in_ram: Snapshot, window: Window) -> list[str]:
    """RAM entries changed since window.since, not as the disk held them before, or whose
    content the disk does not hold (window.forced)."""
    from_ns = since_ns(window.since)
    return sorted(
        rel
        for rel, st in in_ram.items()
        if st[3] >= from_ns or not same_content(st, window.before.get(rel)) or rel in window.forced
    )


def changed_databases(data: str, in_ram: Snapshot, changed: Iterable[str]) -> list[str]:
    """The databases in RAM that the write-back writes: changed themselves, or through a
    companion only (a writer that never checkpointed leaves its rows in the -wal)."""
    changed_set = set(changed)
    return sorted(
        db
        for db in databases_in(data, in_ram)
        if changed_set & {db, *(db + s for s in DB_COMPANIONS)}
    )


def since_ns(since: float) -> int:
    """A moment of the tmpfs's clock in seconds as ns, a microsecond early: the margin for the
    float it travelled in."""
    return int(since * 1e9) - 1000


def import_window(ram: str, disk: str, window: Window) -> list[str]:
    """A write-back after the unmount failed and the copy is to cover the path again: copy into
    RAM what processes wrote on disk meanwhile (the copy hides it from then on, and the next
    checkpoint, RAM to disk with --delete, would remove it). A file RAM changed too comes in as
    NAME.rampiped-conflict. Returns what was copied."""
    data = os.path.join(ram, DATA)
    in_ram = snapshot(data)
    on_disk = snapshot(disk)
    ram_changed = set(ram_changes(in_ram, window))
    # held files made conflict files: another name of the same file (a hard link) is no
    # second conflict
    conflicts = {
        st[4] for rel, st in on_disk.items() if st[0] == "f" and rel.endswith(CONFLICT_SUFFIX)
    }
    taken: list[str] = []
    for rel in sorted(on_disk, key=lambda r: r.count("/")):
        st = on_disk[rel]
        if rel == "." or rel == HOLD_NAME or rel.startswith(HOLD_NAME + "/"):
            continue
        if st == window.before.get(rel) or same_content(st, in_ram.get(rel)):
            continue  # untouched since the unmount, or what the write-back wrote
        src = os.path.join(disk, rel)
        dst = os.path.join(data, rel)
        if rel in ram_changed:
            if st[0] != "f" or os.path.lexists(src + CONFLICT_SUFFIX) or st[4] in conflicts:
                continue  # RAM's version wins; a held rewrite comes in under its own name
            dst += CONFLICT_SUFFIX
        parent = os.path.dirname(dst)
        if not os.path.isdir(parent):
            continue  # its directory was taken already, whole
        if st[0] == "d":
            if os.path.lexists(dst):
                continue
            shutil.copytree(src, dst, symlinks=True)
        elif st[0] in ("f", "l"):
            tmp = tmp_path(dst)
            shutil.copy2(src, tmp, follow_symlinks=False)
            os.replace(tmp, dst)
        else:
            continue
        taken.append(rel)
    if taken:
        log.warning(
            "%s: brought back into RAM what was written on disk while the write-back ran: %s",
            data,
            ", ".join(taken[:10]),
        )
    return taken
