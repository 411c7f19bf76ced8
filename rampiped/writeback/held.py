"""The write-back window: disk files written while a write-back replaces them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from rampiped.commands import SyncError
from rampiped.fsops import (
    _PAGE,
    _fsync_dir,
    _make_dirs_rel,
    append_from,
    common_prefix,
    copy_attributes,
    join,
    lstat_at,
    open_dir_at,
    open_rel,
    read_at,
    remove_at,
)
from rampiped.pause import pause_point
from rampiped.writeback import attrdoc
from rampiped.writeback.holdplace import HoldPlace
from rampiped.writeback.layer import Layer, scan_layer
from rampiped.writeback.moves import write_json_at
from rampiped.writeback.names import CONFLICT_SUFFIX
from rampiped.writeback.stamps import (
    _HELD_INDEX,
    _HELD_VERSION,
    CLOCK_SLACK_NS,
    INDEX_ATTRIBUTE,
    Stamp,
    _digest_fd,
    _read_index,
    _replaced_files,
    _stamp_at,
    _with_layer_digests,
)

log = logging.getLogger(__name__)


@dataclass
class _Held:
    rel: str
    link: str  # name in the hold directory
    base: Stamp
    done: int | None = None  # bytes of the held file already carried into the file at rel
    conflict: bool = False
    append: _Append | None = None  # recorded before each write that carries bytes (_Append)


@dataclass(frozen=True)
class _Append:
    """One write of held bytes onto the end of the file at a held file's name, recorded in the
    index before it is made: after a crash, that file's bytes from `size` on tell how much of
    it landed (other processes may append there by name too, before and after it)."""

    ino: int  # of the file at the name
    size: int  # its size right before the write
    length: int  # bytes of the held file, from `done` on, in that write


# One write of carried bytes at most (each is recorded in the index before it is made).
_APPEND_CHUNK = 1 << 20

# After a crash, how far past the recorded size the whole write is looked for: bytes other
# processes appended by name between the record and the write come before it.
_APPEND_SLACK = 64 << 10

_MIN_PARTIAL = 512


def _landed(planned: bytes, tail: bytes, start: int) -> int:
    """How many bytes of `planned`, written in one write at the end of a file then `start`
    bytes long, that file holds; `tail` is its content from `start` on (with what others
    appended by name before or after). The whole write found anywhere in `tail` landed;
    otherwise what matches from `start` on counts up to a page boundary, if that is at least
    _MIN_PARTIAL bytes. Bytes that only repeat ours cannot be told from ours."""
    if not planned:
        return 0
    if planned in tail:
        return len(planned)
    cut = (start + common_prefix(planned, tail)) // _PAGE * _PAGE - start
    return cut if cut >= _MIN_PARTIAL else 0


def _place(target: str | HoldPlace) -> HoldPlace:
    return target if isinstance(target, HoldPlace) else HoldPlace.inside(target)


def _hold_one(
    target_fd: int, hold_fd: int, source: str, link: str, base: Stamp | None, threshold: int
) -> Stamp | None:
    """Link the disk file at `source` into the hold directory as `link`; its base (what the
    window's writes are told apart from), or None when there is no regular file to hold."""
    parent, _, name = source.rpartition("/")
    pfd = open_rel(target_fd, parent)
    if pfd is None:
        return None
    try:
        st = lstat_at(pfd, name)
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        if base is None:  # copied up after the snapshot
            if st.st_ctime_ns < threshold:
                base = _stamp_at(pfd, name, source)
        elif base.ino not in (0, st.st_ino):
            base = None  # replaced on disk meanwhile
        if base is None:
            base = Stamp(source, -1, 0, 0, 0, "")
        os.link(name, link, src_dir_fd=pfd, dst_dir_fd=hold_fd, follow_symlinks=False)
        return base
    finally:
        os.close(pfd)


class HeldFiles:
    """The disk files an apply replaces, kept alive (hard links in a hold directory on their
    filesystem: see HoldPlace) from the unmount until what was written into them meanwhile is
    carried over (see above)."""

    def __init__(self, place: HoldPlace, threshold: int, entries: list[_Held]) -> None:
        self.place = place
        self.target = place.target
        # ns, wall clock: what changed on disk from then on was written in the window
        self.threshold = threshold
        self.entries = entries

    @classmethod
    def hold(
        cls,
        upper: str,
        target: str | HoldPlace,
        snapshot: dict[str, Stamp],
        threshold: int,
        *,
        only: frozenset[str] | None = None,
    ) -> HeldFiles:
        """Right after the unmount, before anything replaces them: link every disk file the
        apply of `upper` replaces (or those of `only`, when the apply replaces no other)
        into the hold directory, and record the snapshot there."""
        layer = scan_layer(upper)
        items = [
            (rel, source)
            for rel, source, _kind in _replaced_files(layer)
            if only is None or rel in only
        ]
        snapshot = _with_layer_digests(upper, snapshot, [rel for rel, _source in items])
        return cls._hold_items(_place(target), items, snapshot, threshold)

    @classmethod
    def hold_paths(
        cls,
        target: str | HoldPlace,
        rels: Iterable[str],
        snapshot: dict[str, Stamp],
        threshold: int,
    ) -> HeldFiles:
        """The same for a write-back that replaces the files at `rels` (relative to `target`)
        rather than a layer's (a copy pin's, after its unmount)."""
        return cls._hold_items(_place(target), [(rel, rel) for rel in rels], snapshot, threshold)

    @classmethod
    def _hold_items(
        cls,
        place: HoldPlace,
        items: Iterable[tuple[str, str]],
        snapshot: dict[str, Stamp],
        threshold: int,
    ) -> HeldFiles:
        for earlier in cls.left(place):  # left by an unpin cut short: finish it first
            earlier.merge()
            earlier.finish()
        entries: list[_Held] = []
        target_fd = place.open_target()
        if target_fd is None:
            raise SyncError(f"{place.target} is gone")
        try:
            with place.hold_parent() as parent:
                if parent is None:
                    raise SyncError(f"the parent of {place.shown} is gone")
                os.mkdir(parent[1], 0o700, dir_fd=parent[0])
                hold_fd = open_dir_at(parent[0], parent[1])
                try:
                    for rel, source in items:
                        link = str(len(entries))
                        base = _hold_one(target_fd, hold_fd, source, link, snapshot.get(rel),
                                         threshold)  # fmt: skip
                        if base is not None:
                            entries.append(_Held(rel, link, base))
                    held = cls(place, threshold, entries)
                    # holding nothing: nothing to keep, not committed (on a slow stick that
                    # took 56 ms of a renamed directory's missing moment); after a power cut
                    # `load` takes an empty or missing index for none
                    held._save(hold_fd, commit=bool(entries), written_out=bool(entries), first=True)
                    if entries:
                        _fsync_dir(hold_fd)
                        _fsync_dir(parent[0])
                finally:
                    os.close(hold_fd)
        finally:
            os.close(target_fd)
        return held

    @classmethod
    def left(cls, place: HoldPlace) -> list[HeldFiles]:
        """The hold directories an unpin cut short (crash, power cut) left: at `place`, and in
        the directory itself (where a hold outside it is moved when its journal goes)."""
        found = [cls.load(place)]
        if place.outside:
            found.append(cls.load(HoldPlace.inside(place.target)))
        return [held for held in found if held is not None]

    @classmethod
    def load(cls, target: str | HoldPlace) -> HeldFiles | None:
        """The hold directory an unpin cut short (crash, power cut) left at `target`, if any."""
        place = _place(target)
        with place.hold_parent() as parent:
            if parent is None:
                return None
            try:
                data = _read_index(parent[0], parent[1])
                if not data:  # holding nothing, not written out, and a power cut
                    raise FileNotFoundError(_HELD_INDEX)
                doc = json.loads(data)
            except FileNotFoundError:
                st = lstat_at(parent[0], parent[1])
                if st is None:
                    return None
                # cut short before the index was written: nothing was replaced yet, and the
                # directory was made right after the unmount
                return cls(place, st.st_ctime_ns - CLOCK_SLACK_NS, [])
            except ValueError as e:
                raise SyncError(f"{place.shown}/{_HELD_INDEX} is unreadable: {e}") from e
        entries = [
            _Held(
                str(e["rel"]),
                str(e["link"]),
                Stamp(**e["base"]),
                e.get("done"),
                bool(e.get("conflict", False)),
                _Append(**e["append"]) if e.get("append") else None,  # older indexes have none
            )
            for e in doc.get("entries", [])
        ]
        return cls(place, int(doc.get("threshold", 0)), entries)

    def _save(
        self, hold_fd: int, *, commit: bool = True, written_out: bool = True, first: bool = False
    ) -> None:
        """Durable on return (`commit`; the caller commits a `first` save). The `first`, right
        after the unmount and before the apply, goes to the hold directory's attribute where
        it fits: no write-out of data to wait for there (attrdoc)."""
        doc = {
            "version": _HELD_VERSION,
            "threshold": self.threshold,
            "entries": [
                {
                    "rel": e.rel,
                    "link": e.link,
                    "base": dataclasses.asdict(e.base),
                    "done": e.done,
                    "conflict": e.conflict,
                    "append": dataclasses.asdict(e.append) if e.append else None,
                }
                for e in self.entries
            ],
        }
        if first and attrdoc.put(hold_fd, INDEX_ATTRIBUTE, doc):
            return
        # durable on return (commit): a recorded _Append is on disk before the append it announces
        write_json_at(hold_fd, _HELD_INDEX, doc, commit=commit, written_out=written_out)

    @contextlib.contextmanager
    def _hold_dir(self) -> Iterator[int | None]:
        """A descriptor of the hold directory, or None when it is gone."""
        with self.place.hold_parent() as parent:
            if parent is None or lstat_at(parent[0], parent[1]) is None:
                yield None
                return
            hold_fd = open_dir_at(parent[0], parent[1])
            try:
                yield hold_fd
            finally:
                os.close(hold_fd)

    def inodes(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of the held files still linked."""
        out: set[tuple[int, int]] = set()
        with self._hold_dir() as hold_fd:
            if hold_fd is None:
                return out
            for e in self.entries:
                st = lstat_at(hold_fd, e.link)
                if st is not None:
                    out.add((st.st_dev, st.st_ino))
        return out

    def own_writes(self, layer: Layer) -> list[str]:
        """The held files that the apply writes itself rather than rsync: regular files of
        the layer without hard links in it (a hard-linked group is left to rsync -H)."""
        linked = {rel for group in layer.link_groups for rel in group}
        kinds = {rel: kind for rel, _source, kind in _replaced_files(layer)}
        return [e.rel for e in self.entries if kinds.get(e.rel) == "file" and e.rel not in linked]

    def write_own(self, upper: str, target_fd: int, rels: list[str]) -> None:
        """For each of `rels`: the layer's file into a new file, the bytes appended to the
        held disk file so far after it (when it was appended to), a rename over the name, then
        what was appended in between. A rel without a held file (a file new on disk; only when
        the hold directory is outside the directory) gets the layer's file alone.

        The new file is made in the hold directory when that is outside the directory (a
        reader of the directory never sees it; the rename goes through the copy of the mount),
        else as .NAME.rampiped-new next to its name."""
        by_rel = {e.rel: e for e in self.entries}
        own_target = self.place.open_target() if self.place.outside else None
        if self.place.outside and own_target is None:
            raise SyncError(f"{self.target} is gone")
        try:
            with self._hold_dir() as hold_fd:
                if hold_fd is None:
                    raise SyncError(f"{self.place.shown} is gone")
                for n, rel in enumerate(rels):
                    e = by_rel.get(rel)
                    if e is None and own_target is None:
                        raise SyncError(f"{rel}: not held, and no place for its new file")
                    parent, _, name = rel.rpartition("/")
                    base_fd = own_target if own_target is not None else target_fd
                    pfd, _ = _make_dirs_rel(base_fd, parent)
                    try:
                        if own_target is not None:
                            tmp, tmp_fd = f"new-{n}", hold_fd
                        else:
                            tmp, tmp_fd = f".{name}.rampiped-new", pfd
                        self._write_one(upper, rel, e, hold_fd, pfd, name, (tmp_fd, tmp))
                    finally:
                        os.close(pfd)
                self._save(hold_fd)
        finally:
            if own_target is not None:
                os.close(own_target)

    def _write_one(
        self,
        upper: str,
        rel: str,
        e: _Held | None,
        hold_fd: int,
        pfd: int,
        name: str,
        new: tuple[int, str],
    ) -> None:
        src = os.path.join(upper, rel)
        tmp_fd, tmp = new
        if e is not None:
            # an apply resumed after a crash writes the layer's version again (and carries
            # the held file's appends into it from the start): a recorded append is moot
            e.done = None
            e.append = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=tmp_fd)
        held_fd = (
            os.open(e.link, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=hold_fd)
            if e is not None
            else -1
        )
        try:
            out = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=tmp_fd,
            )
            try:
                with open(src, "rb") as f:
                    append_from(f.fileno(), out, 0)
                copy_attributes(src, out)
                ust = os.lstat(src)
                os.utime(out, ns=(ust.st_atime_ns, ust.st_mtime_ns))
                appended = e is not None and self._appended(e, held_fd)
                if e is not None and appended:
                    e.done = e.base.size + append_from(held_fd, out, e.base.size)
                os.fsync(out)
            finally:
                os.close(out)
            os.rename(tmp, name, src_dir_fd=tmp_fd, dst_dir_fd=pfd)
            _fsync_dir(pfd)
            if e is not None and appended and e.done is not None:
                self._append_since(e, held_fd, hold_fd, pfd, name)
        finally:
            if held_fd >= 0:
                os.close(held_fd)

    @staticmethod
    def _appended(e: _Held, held_fd: int) -> bool:
        """Whether the held file differs from the snapshot only by bytes added at its end."""
        st = os.fstat(held_fd)
        if e.base.ino == -1:
            return False
        if e.base.ino == 0:
            return True  # created on disk in the window: everything in it is new
        if st.st_size == e.base.size and st.st_mtime_ns == e.base.mtime_ns:
            return False  # unchanged (so far)
        return st.st_size >= e.base.size and _digest_fd(held_fd, e.base.size) == e.base.digest

    @staticmethod
    def _unchanged(e: _Held, st: os.stat_result) -> bool:
        return (
            e.base.ino == st.st_ino
            and e.base.size == st.st_size
            and e.base.mtime_ns == st.st_mtime_ns
        )

    def _append_since(self, e: _Held, held_fd: int, hold_fd: int, pfd: int, name: str) -> int:
        """Append the held file's bytes from `done` on to the file at `name`, one write at a
        time, each recorded in the index first: a crash between a write and the save of the
        new `done` then neither repeats it nor drops it (see _settle_append)."""
        assert e.done is not None
        if e.append is not None:
            self._settle_append(e, held_fd, pfd, name)
        if os.fstat(held_fd).st_size <= e.done:
            return 0
        total = 0
        dst = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            while chunk := os.pread(held_fd, _APPEND_CHUNK, e.done):
                st = os.fstat(dst)
                e.append = _Append(st.st_ino, st.st_size, len(chunk))
                self._save(hold_fd)
                n = os.write(dst, chunk)
                os.fsync(dst)
                pause_point("held:appended")
                # the caller's save records the new `done`; until then the record above
                # lets a start after a crash find this write in the file
                e.done += n
                e.append = None
                total += n
        finally:
            os.close(dst)
        return total

    def _settle_append(self, e: _Held, held_fd: int, pfd: int, name: str) -> None:
        """After a crash: advance `done` by what the recorded append left in the file at
        `name`. Nothing when that file is another one now (what landed went with the old)."""
        assert e.done is not None and e.append is not None
        rec, e.append = e.append, None
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=pfd
            )
        except FileNotFoundError:
            return
        try:
            st = os.fstat(fd)
            if st.st_ino != rec.ino or not stat.S_ISREG(st.st_mode):
                return
            tail = read_at(fd, rec.length + _APPEND_SLACK, rec.size)
        finally:
            os.close(fd)
        e.done += _landed(read_at(held_fd, rec.length, e.done), tail, rec.size)

    def merge(self, *, conflicts_only: bool = False) -> list[str]:
        """Carry what was written into the held files since the last look into the files now
        at their names: bytes appended go after the file's end; a held file changed otherwise
        is linked as NAME.rampiped-conflict (a WARNING names it). With `conflicts_only` (the
        apply failed and the RAM layer is mounted again, hiding the disk files at those names)
        every changed held file becomes a conflict file. Returns the conflict files made."""
        made: list[str] = []
        target_fd = self.place.open_target()
        if target_fd is None:
            return made
        try:
            with self._hold_dir() as hold_fd:
                if hold_fd is None:
                    return made
                for e in self.entries:
                    if e.conflict:
                        continue
                    try:
                        held_fd = os.open(
                            e.link, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=hold_fd
                        )
                    except FileNotFoundError:
                        continue
                    try:
                        made += self._merge_one(e, held_fd, hold_fd, target_fd, conflicts_only)
                    finally:
                        os.close(held_fd)
                self._save(hold_fd)
        finally:
            os.close(target_fd)
        return made

    def _merge_one(
        self, e: _Held, held_fd: int, hold_fd: int, target_fd: int, conflicts_only: bool
    ) -> list[str]:
        st = os.fstat(held_fd)
        if e.done is None and self._unchanged(e, st):
            return []
        parent, _, name = e.rel.rpartition("/")
        pfd = open_rel(target_fd, parent)
        if pfd is None:
            return self._conflict(e, hold_fd, target_fd)
        try:
            dst = lstat_at(pfd, name)
            plain = dst is not None and stat.S_ISREG(dst.st_mode)
            if conflicts_only or not plain:
                if e.done is None and e.base.ino == 0 and st.st_size == 0:
                    return []
                return self._conflict(e, hold_fd, target_fd)
            assert dst is not None
            if (dst.st_dev, dst.st_ino) == (st.st_dev, st.st_ino):
                # never replaced (a write-back cut short before it got there): what was
                # written into it is at its name already
                return []
            if e.done is None:
                if not self._appended(e, held_fd):
                    return self._conflict(e, hold_fd, target_fd)
                e.done = e.base.size
            self._append_since(e, held_fd, hold_fd, pfd, name)
            return []
        finally:
            os.close(pfd)

    def _conflict(self, e: _Held, hold_fd: int, target_fd: int) -> list[str]:
        parent, _, name = e.rel.rpartition("/")
        conflict = name + CONFLICT_SUFFIX
        pfd = open_rel(target_fd, parent)
        if pfd is None:
            log.error(
                "%s/%s was written on disk during the write-back but its directory is gone; "
                "the data stays in %s/%s",
                self.target,
                e.rel,
                self.place.shown,
                e.link,
            )
            return []
        try:
            tmp = conflict + ".tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=pfd)
            os.link(e.link, tmp, src_dir_fd=hold_fd, dst_dir_fd=pfd, follow_symlinks=False)
            os.rename(tmp, conflict, src_dir_fd=pfd, dst_dir_fd=pfd)
            _fsync_dir(pfd)
        finally:
            os.close(pfd)
        e.conflict = True
        shown = join(parent, conflict)
        log.warning(
            "%s/%s was rewritten on disk during the write-back (not only appended to): that "
            "version is kept as %s/%s, the RAM version is at the name",
            self.target,
            e.rel,
            self.target,
            shown,
        )
        return [shown]

    def finish(self) -> None:
        """Drop the hold directory (the held files that are not conflict files go with it)."""
        with self.place.hold_parent() as parent:
            if parent is None or lstat_at(parent[0], parent[1]) is None:
                return
            remove_at(parent[0], parent[1])
            _fsync_dir(parent[0])

    def keep(self) -> None:
        """At the end of its use, finished or not: a hold directory still there stays where the
        next start or unpin finds it (HoldPlace.rescue), and the copy of the mount is let go."""
        try:
            self.place.rescue()
        finally:
            self.place.close()
