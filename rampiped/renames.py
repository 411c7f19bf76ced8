"""Files renamed in RAM since the last write-back, known by inode and content: written back
as renames (logrotate's app.log -> app.log.1 -> app.log.2 costs metadata, not the files again).

A file of the RAM side keeps its inode when it is renamed. The ledger records, for each name,
the inode the file had and the digest of what the disk (or the journal) holds for it. A file
now at a name whose record is not its content, with one name, whose inode another name held
then, and which that other name no longer holds, was renamed from there. It is taken as such
only when its content is what was recorded for the old name (or, where the caller appends the
rest, begins with it: `grown`); a rename that cannot be proven this way is copied."""

from __future__ import annotations

from rampiped.ledger import Ledger, Scan


def renamed(found: Scan, ledger: Ledger, skip: frozenset[str], *, grown: bool) -> dict[str, str]:
    """new name -> old name, for the files of `found` renamed since `ledger` was recorded
    (names in `skip` left out). With `grown`, also those that grew after the rename (their
    content then checked by the append, appends.py)."""
    by_ino: dict[int, list[str]] = {}
    for rel, ino in ledger.inodes.items():
        by_ino.setdefault(ino, []).append(rel)
    out: dict[str, str] = {}
    taken: set[str] = set()
    for rel in sorted(found):
        seen = found[rel]
        if rel in skip or seen.nlink != 1 or ledger.digests.get(rel) == seen.digest:
            continue
        for old in by_ino.get(seen.ino, ()):
            now = found.get(old)
            if (
                old == rel
                or old in taken
                or old in skip
                or (now is not None and now.ino == seen.ino)
            ):
                continue
            same = ledger.digests.get(old) == seen.digest
            longer = grown and seen.size > ledger.sizes.get(old, seen.size)
            if same or longer:
                out[rel] = old
                taken.add(old)
                break
    return out
