"""The pin manager: the state machine of each pinned directory (DESIGN.md §4).

    unpinned --pin--> pinning --> pinned --checkpoint--> pinned
                         |           |
                         |           +--unpin/evict/stop--> draining --> unpinned
                         +--failure--> unpinned (rolled back, nothing lost)

Runtime layout, per pin (id = a short hash of the path, stable across restarts):

    <runtime_dir>/state.json          what is pinned, written atomically at every transition
    <runtime_dir>/pins/<id>/ram       a tmpfs: overlay `upper` + `work`, or the copy in `data`
    <runtime_dir>/pins/<id>/disk      a private bind of the directory on disk: the overlay's
                                      lower layer, or where copy-mode checkpoints are written
    <journal_dir>/<id>/pin.json       on disk, written before anything is mounted: which
                                      directory the id belongs to, so a journal can be applied
                                      after a power cut, when the runtime dir is gone
    <journal_dir>/<id>/gen-N          overlay pins: the last complete checkpoint of the upper

Operations here are slow (copies, rsync) and run in the daemon's worker thread; the table of
pins is shared with the main loop under `lock`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rampiped import (
    copymode,
    fsops,
    handover,
    holders,
    mounts,
    ramarea,
    tmpfiles,
    tree,
    volatile,
    writeback,
)
from rampiped import ledger as ledger_mod
from rampiped.backoff import RETRY
from rampiped.engine import format_bytes, format_duration
from rampiped.osutil import write_json_atomic

log = logging.getLogger("rampiped")

STATE_VERSION = 1
# Each pin's tmpfs may grow to ram.max times this. The budget itself is the engine's: above
# the high watermark it evicts the coldest adaptive pin (checked every tick). The extra half
# is room for the writes that arrive between crossing the watermark and the unmount of the
# evicted pin, so that a writer sees no ENOSPC meanwhile (RAM is still bounded by min_free).
TMPFS_HEADROOM = 1.5
# An unpin that finds the directory in use tries again for this long before it reports the
# holders: writers that open, write and close hold a file only for moments.
BUSY_GRACE = 2.0
# In a journal: the last generation is an unpin's final one (the RAM layer is no longer needed).
FINAL_MARK = "final.json"
# copy mode: the disk as it was before the unmount of an unpin (copymode.Window), so that a
# write-back after it, and its recovery after a crash, leave alone what processes write there
COPY_WINDOW = "copy-window.json"
BUSY_POLL = 0.05
# A pin that finds a file of the directory open looks again this often, for this long, before
# it is refused (and retried with backoff): most writers hold a file only while they write.
HOLD_WAIT, HOLD_POLL = 1.0, 0.005
# An unmount that finds a file open is tried again at once, this often, for this long, before
# the holders are looked for: most holds of busy writers end within a millisecond.
UMOUNT_SPIN, UMOUNT_SPIN_POLL = 0.2, 0.002
# After a write-back, processes that opened a replaced disk file during it and still hold it
# get this long to let go (their last bytes are carried over) before a warning names them.
WINDOW_GRACE = 2.0
# Failed checkpoints and stranded write-backs are retried with backoff.RETRY: first after this.
RETRY_MIN = RETRY.first
SOURCE_PREFIX = "rampiped-"  # every mount rampiped makes carries "rampiped-<id>" as its source
_COPIED_XATTR_PREFIXES = ("user.", "system.posix_acl_", "security.")


def _held_files(path: str, late: list[handover.HeldFile]) -> tuple[list[str], bool]:
    """The files below `path` that `late` hold open, relative to it, and whether that is all
    they hold (not a working directory, a mapping or a file elsewhere)."""
    prefix = path.rstrip("/") + "/"
    rels, only_files = [], True
    for held in late:
        kind, _, rest = held.what.partition(" ")
        target = rest.partition(" ")[2]
        if kind == "fd" and target.startswith(prefix):
            rels.append(target[len(prefix) :])
        else:
            only_files = False
    return rels, only_files


class PinRefused(Exception):
    """The directory cannot be pinned now; nothing was changed."""


class _StillDraining(PinRefused):
    """A rolled-back pin whose writers have not yet let go of its RAM layer: it stays in the
    table (draining) until they do."""


class UnpinBusy(Exception):
    """The pin is in use and stays pinned; `holders` says by whom."""

    def __init__(self, message: str, found: list[holders.Holder]) -> None:
        super().__init__(message)
        self.holders = found


def pin_id(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:12]


@dataclass
class SyncRecord:
    time: float  # wall clock, for people
    ok: bool
    seconds: float
    files: int = 0
    bytes: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Dirty:
    """The changes on a pin's RAM side that are not on disk yet."""

    bytes: int  # size of the changed regular files
    entries: int  # changed entries of any kind
    oldest: float | None  # wall-clock change time of the oldest one; None when nothing changed
    complete: bool = True  # False: the walk stopped at its limit (the figures are a floor)


@dataclass
class Pin:
    path: str
    id: str
    mode: str  # overlay | copy | volatile
    origin: str  # adaptive | static | manual
    state: str  # pinning | pinned | draining
    pinned_at: float  # monotonic
    pinned_wall: float
    sync_interval: float | None = None
    last_sync: SyncRecord | None = None
    last_sync_mono: float | None = None
    last_ok_wall: float | None = None  # start of the last good checkpoint, or of the copy-in
    busy: bool = False  # an operation runs on it in the worker
    retry_at: float = 0.0  # monotonic: no unpin attempt before
    backoff: float = 0.0
    unpin_requested: bool = False
    error: str | None = None
    holders: list[str] = field(default_factory=list)
    keep: tuple[str, ...] = ()  # volatile: subdirectories bound from the disk
    size: int | None = None  # volatile: the tmpfs size
    reopen: str | None = None  # the command that makes writers reopen their files
    # overlay with reopen: the overlay was detached from the path with writers still on it
    # (handover.py); the unpin finishes when they let go. The mount id tells their files.
    handover_mount: int | None = None
    # copy mode: unmounted by an unpin whose write-back failed, RAM not shown again (see
    # PinManager._import_window): the retry writes back from here
    window: copymode.Window | None = None
    # the mount the directory was on before the pin (None: not known, for an adopted pin)
    under_mount: int | None = None
    # overlay pin refused after its mount but kept (a process held a file in RAM): the disk
    # files that processes opened below it in that moment, as they were then. Their writes
    # from then on go to the disk file, below RAM's copy: the unpin carries them like those of
    # its own window (writeback.HeldFiles) instead of replacing them with RAM's version.
    late_bases: dict[str, writeback.Stamp] = field(default_factory=dict)
    # what the disk (copy) or the journal's last generation (overlay) holds of each file, by
    # content (ledger.py); None: not known (adopted, or a write-back failed), and the next
    # write-back compares content instead
    ledger: ledger_mod.Ledger | None = field(default=None, repr=False)
    # adopted at start after a crash: an overlay's lower may hold what that crash left of a
    # write-back's temporary files, removed once the unpin frees the directory (never while
    # the overlay is mounted: its lower must not change under it)
    adopted: bool = False

    @property
    def static(self) -> bool:
        return self.origin != "adaptive"


@dataclass
class Stranded:
    """A write-back found unfinished at start that could not complete (a full disk, an I/O
    error): what it holds is on disk only in the journal, or in RAM only. It is kept, retried,
    and reported (status, STATUS line, metrics) until it completes; its directory is not
    pinned again meanwhile (a new pin would take over the same journal)."""

    id: str
    path: str
    mode: str
    where: str  # the journal generation or RAM copy that holds what the directory lacks
    bytes: int
    error: str
    since: float  # wall clock
    record: dict[str, Any] = field(repr=False)
    attempts: int = 1
    retry_at: float = 0.0  # monotonic
    backoff: float = 0.0


class PinManager:
    def __init__(
        self,
        runtime_dir: str,
        journal_dir: str,
        *,
        ram_limit: int,
        runner: writeback.Runner = writeback.run_command,
        exclude_pids: Callable[[], set[int]] = set,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.journal_dir = journal_dir
        self.ram_limit = ram_limit  # size of each pin's tmpfs: the whole budget
        self.runner = runner
        self.exclude_pids = exclude_pids
        self.ram_backend = ramarea.TMPFS  # ram.backend of the pins made from now on
        self.pins: dict[str, Pin] = {}
        self.stranded: dict[str, Stranded] = {}
        self.lock = threading.RLock()

    # -- paths -------------------------------------------------------------------------------

    def base(self, pid: str) -> str:
        return os.path.join(self.runtime_dir, "pins", pid)

    def ram(self, pid: str) -> str:
        return os.path.join(self.base(pid), "ram")

    def disk(self, pid: str) -> str:
        return os.path.join(self.base(pid), "disk")

    def upper(self, pid: str) -> str:
        return os.path.join(self.ram(pid), "upper")

    def data(self, pid: str) -> str:
        return os.path.join(self.ram(pid), "data")

    def journal(self, pid: str) -> str:
        return os.path.join(self.journal_dir, pid)

    def ram_side(self, pin: Pin) -> str:
        """Where writes to the pin land in RAM (what the monitor watches)."""
        if pin.mode == "volatile":
            return pin.path
        return self.upper(pin.id) if pin.mode == "overlay" else self.data(pin.id)

    # -- state -------------------------------------------------------------------------------

    def save_state(self) -> None:
        with self.lock:
            doc = {
                "version": STATE_VERSION,
                "pins": {
                    p.path: {
                        "id": p.id,
                        "mode": p.mode,
                        "origin": p.origin,
                        "state": p.state,
                        "pinned_wall": p.pinned_wall,
                        "sync_interval": p.sync_interval,
                        "last_sync": asdict(p.last_sync) if p.last_sync else None,
                        "keep": list(p.keep),
                        "size": p.size,
                        "reopen": p.reopen,
                        "handover_mount": p.handover_mount,
                    }
                    for p in self.pins.values()
                },
            }
        write_json_atomic(os.path.join(self.runtime_dir, "state.json"), doc)

    def load_state(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.runtime_dir, "state.json")) as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable %s/state.json: %s", self.runtime_dir, exc)
            return {}
        pins = doc.get("pins") if isinstance(doc, dict) else None
        return pins if isinstance(pins, dict) else {}

    def _set_state(self, pin: Pin, state: str) -> None:
        with self.lock:
            pin.state = state
        self.save_state()

    def prepare_runtime(self) -> None:
        """Give the pins' mounts a parent in a peer group of its own. Services started later
        copy it into their mount namespaces as slaves: our unmounts of RAM layers and staging
        binds then reach those copies too (with a private parent they would stay there and
        keep the RAM of an unpinned directory alive), while nothing mounted elsewhere on the
        host propagates in."""
        pins_dir = os.path.join(self.runtime_dir, "pins")
        os.makedirs(pins_dir, mode=0o700, exist_ok=True)
        if not mounts.is_mountpoint(pins_dir):
            mounts.mount_tmpfs(
                pins_dir, size=1024 * 1024, mode=0o700, uid=0, gid=0, source="rampiped"
            )
            mounts.make_private(pins_dir)
        mounts.make_shared(pins_dir)

    def release_runtime(self) -> None:
        """At a clean stop with nothing pinned: unmount the pins' parent, leaving no mount."""
        pins_dir = os.path.join(self.runtime_dir, "pins")
        with self.lock:
            if self.pins:
                return
        if mounts.is_mountpoint(pins_dir) and not mounts.mounts_below(pins_dir):
            try:
                mounts.umount(pins_dir)
            except mounts.MountError as exc:
                log.warning("could not unmount %s: %s", pins_dir, exc)

    # -- pinning -----------------------------------------------------------------------------

    def _register(self, pin: Pin, meta: dict[str, Any]) -> None:
        """Record a pin about to be made: its recovery record on disk first (`pin.json`, which
        names the directory of a journal found after a power cut), then the runtime state."""
        os.makedirs(self.journal(pin.id), exist_ok=True)
        write_json_atomic(os.path.join(self.journal(pin.id), "pin.json"), meta)
        with self.lock:
            self.pins[pin.path] = pin
        self.save_state()

    def check_pinnable(
        self, path: str, *, writers_ok: bool = False, late_ok: bool = False
    ) -> list[int]:
        """The preconditions, checked again right before acting (the engine decided earlier).
        With `writers_ok` (a reopen command moves them), holders that only hold files open for
        writing are let through. With `late_ok` (an overlay pin), so are such holders that
        are still there after HOLD_WAIT: a writer that opens, writes and closes back to back
        (fsync on a slow disk) always holds a file, but lets go of each at once after the mount,
        which `pin` waits for. Returns the pids let through that way."""
        stranded = self.stranded.get(path)
        if stranded is not None:
            raise PinRefused(
                f"cannot pin {path}: its earlier write-back has not completed"
                f" ({format_bytes(stranded.bytes)} in {stranded.where}: {stranded.error})"
            )
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise PinRefused(f"cannot pin {path}: {exc.strerror}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise PinRefused(f"cannot pin {path}: not a directory")
        for reserved in (writeback.STASH_NAME, writeback.HOLD_NAME, writeback.SCRATCH_NAME):
            if os.path.lexists(os.path.join(path, reserved)):
                raise PinRefused(
                    f"cannot pin {path}: it holds an entry named {reserved}, which rampiped's"
                    " write-back uses (a leftover of another tool, or a file of yours: rename it)"
                )
        if mounts.is_mountpoint(path):
            raise PinRefused(f"cannot pin {path}: it is a mount point")
        below = mounts.mounts_below(path)
        if below:
            raise PinRefused(f"cannot pin {path}: {below[0].mountpoint} is mounted inside it")
        deadline = time.monotonic() + HOLD_WAIT
        while True:
            # a writer that opens, writes and closes holds its file for moments: waited out
            found = holders.find_holders(path, exclude_pids=self.exclude_pids())
            if not found or (writers_ok and handover.only_writers(found)):
                return []
            if time.monotonic() >= deadline:
                if late_ok and handover.only_writers(found):
                    return sorted({h.pid for h in found})
                raise PinRefused(f"cannot pin {path}: in use by " + _holder_list(found))
            time.sleep(HOLD_POLL)

    def pin(
        self,
        path: str,
        *,
        mode: str,
        origin: str,
        sync_interval: float | None = None,
        max_size: int | None = None,
        size: int | None = None,
        keep: tuple[str, ...] = (),
        reopen: str | None = None,
    ) -> Pin:
        """Pin `path` (worker thread). Raises PinRefused with everything rolled back."""
        if mode not in ("overlay", "copy", "volatile"):
            raise PinRefused(f"cannot pin {path}: mode {mode!r} is not supported")
        with self.lock:
            if path in self.pins:
                raise PinRefused(f"{path} is already pinned")
        reopen = reopen if mode == "overlay" else None
        held_at_check = self.check_pinnable(
            path, writers_ok=reopen is not None, late_ok=mode == "overlay" and reopen is None
        )
        if mode == "volatile":
            return self._pin_volatile(path, origin, size or self.tmpfs_size(), keep)
        if max_size is not None:
            try:
                copymode.check_fits(path, max_size)
            except copymode.TooLarge as exc:
                raise PinRefused(str(exc)) from exc
        self._check_budget(path, mode)
        pid = pin_id(path)
        if writeback.latest_generation(self.journal(pid)) is not None:
            # a checkpoint that a failed start-up could not apply: a new pin would discard it
            raise PinRefused(
                f"cannot pin {path}: {self.journal(pid)} holds a checkpoint not yet written to"
                " the directory (see the start-up log); restart rampiped to apply it"
            )
        now = time.monotonic()
        pin = Pin(
            path=path,
            id=pid,
            mode=mode,
            origin=origin,
            state="pinning",
            pinned_at=now,
            pinned_wall=time.time(),
            sync_interval=sync_interval,
            reopen=reopen,
        )
        if mode == "copy":
            pin.last_ok_wall = pin.pinned_wall  # until the copy-in ends (_copy_and_bind)
        self._register(pin, {"path": path, "mode": mode, "id": pid})
        undo: list[Callable[[], None]] = []
        dir_fd = -1
        written_back = ""  # refused after the mount, and what reached RAM was written back
        try:
            # Everything below reaches the directory through this descriptor, opened without
            # following any symlink: a user who swaps the directory (or a parent) for a symlink
            # cannot make the mounts land anywhere else.
            dir_fd = open_dir_nofollow(path)
            pin.under_mount = mounts.mount_id_of_fd(dir_fd)
            self._mount_layers(pin, undo, dir_fd)
            writeback.pause_point("pin:layers")
            if mode == "overlay":
                self._mount_overlay(pin, undo, dir_fd)
                writeback.pause_point("pin:overlay-mounted")
            else:
                self._copy_and_bind(pin, undo, dir_fd)
            self._check_in_place(pin)
            if reopen is not None:
                self._reopen_after_pin(pin, undo)
            late = [] if reopen is not None else self._disk_holders(pin)
            if late and mode == "overlay" and self._late_writes_shown(pin, late):
                late = []  # held for moments, and all they wrote is what the overlay shows
            if late:
                # held from before the check to after the mount: in use, as for the check
                how = (
                    "in use by "
                    if any(h.pid in held_at_check for h in late)
                    else "opened on disk during the pin by "
                )
                refusal = f"cannot pin {path}: {how}" + _holder_list(late)
                if mode != "overlay":
                    raise PinRefused(refusal)
                pin.late_bases = self._late_bases(pin, late)
                if not self._write_back_refused(pin):
                    # a process holds a file in RAM: dropping the mounts would lose what it
                    # wrote. The pin stays (mounted) and its unpin is retried with backoff.
                    undo.clear()
                    pin.unpin_requested = True
                    raise _StillDraining(
                        refusal + "; what reached RAM meanwhile stays pinned until its unpin,"
                        " retried in the background, can write it back"
                    )
                written_back = refusal
            else:
                writeback.pause_point("pin:mounted")
        except BaseException as exc:
            for step in reversed(undo):
                try:
                    step()
                except Exception as undo_exc:  # keep undoing; report what is left
                    log.error("rolling back the pin of %s: %s", path, undo_exc)
            if not isinstance(exc, _StillDraining):
                with self.lock:
                    self.pins.pop(path, None)
            self.save_state()
            if not os.path.ismount(self.ram(pid)):
                shutil.rmtree(self.base(pid), ignore_errors=True)
                if not writeback.latest_generation(self.journal(pid)):
                    shutil.rmtree(self.journal(pid), ignore_errors=True)
            if isinstance(exc, PinRefused):
                raise
            if isinstance(
                exc, (OSError, mounts.MountError, writeback.SyncError, copymode.CopyError)
            ):
                raise PinRefused(f"cannot pin {path}: {exc}") from exc
            raise
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        if written_back:
            raise PinRefused(written_back + " (what reached RAM meanwhile was written back)")
        self._set_state(pin, "pinned")
        return pin

    def _write_back_refused(self, pin: Pin) -> bool:
        """An overlay pin refused after its mount: what processes wrote through it meanwhile is
        in RAM only. Write it back the way an unpin does (held files, journal, verify) instead of
        dropping it with the mounts. False when that cannot be done now (the caller then rolls
        back as before)."""
        self._set_state(pin, "pinned")
        try:
            self.unpin(pin)
        except (UnpinBusy, OSError, writeback.SyncError) as exc:
            log.warning(
                "%s: could not write back the refused pin (%s); rolling it back", pin.path, exc
            )
            return False
        return True

    def tmpfs_size(self) -> int:
        return int(self.ram_limit * TMPFS_HEADROOM)

    def _check_budget(self, path: str, mode: str) -> None:
        """Refuse what cannot fit in the RAM budget left: a copy pin's whole tree, or an overlay
        pin's largest file (any change to a file, even a chmod, copies it up whole; a file
        larger than the room left would fail with ENOSPC at that moment)."""
        with self.lock:
            others = list(self.pins.values())
        room = self.ram_limit - sum(self.ram_bytes(p) for p in others)
        if mode == "copy":
            need, what = copymode.dir_size(path), "its content"
        else:
            need, what = largest_file(path), "its largest file"
        if need > room:
            raise PinRefused(
                f"cannot pin {path}: {what} ({format_bytes(need)}) does not fit in the RAM "
                f"budget left ({format_bytes(max(0, room))} of ram.max "
                f"{format_bytes(self.ram_limit)})"
            )

    def _check_in_place(self, pin: Pin) -> None:
        """After mounting through the descriptor: the mount must be at the pin's path. If the
        directory (or a parent) was renamed meanwhile, it is somewhere else: roll back."""
        top = mounts.mount_at(pin.path)
        if top is None or top.source != SOURCE_PREFIX + pin.id:
            raise PinRefused(
                f"cannot pin {pin.path}: the directory was moved or replaced during the pin"
            )

    def _unmount_path(self, pin: Pin) -> None:
        """Unmount the pin's mount at its path, and only that: never a mount that a renamed
        parent or a planted symlink now shows there."""
        top = mounts.mount_at(pin.path)
        ours = top is not None and top.source == SOURCE_PREFIX + pin.id
        if os.path.realpath(pin.path) != pin.path or not ours:
            raise mounts.MountError(
                errno.EINVAL,
                f"cannot unmount {pin.path}: the pin's mount is no longer at that path (a"
                " parent directory was renamed or replaced by a symlink); its data stays in"
                f" {self.ram_side(pin)}",
                pin.path,
            )
        mounts.umount(pin.path)

    def _unmount_placed(self, pin: Pin) -> None:
        """Rollback: unmount the pin's mount over the directory, wherever it landed."""
        pins_dir = os.path.join(self.runtime_dir, "pins") + "/"
        for entry in reversed(mounts.mountinfo()):
            placed = not entry.mountpoint.startswith(pins_dir)
            if entry.source == SOURCE_PREFIX + pin.id and placed:
                mounts.umount(entry.mountpoint)

    def _mount_layers(self, pin: Pin, undo: list[Callable[[], None]], dir_fd: int) -> None:
        ram, disk = self.ram(pin.id), self.disk(pin.id)
        os.makedirs(ram, mode=0o700, exist_ok=True)
        os.makedirs(disk, mode=0o700, exist_ok=True)
        ramarea.mount(
            ram, backend=self.ram_backend, size=self.tmpfs_size(), source=SOURCE_PREFIX + pin.id
        )
        undo.append(lambda: ramarea.unmount(ram))
        self._bind_staging(dir_fd, disk)
        undo.append(lambda: mounts.umount(disk))

    @staticmethod
    def _bind_staging(dir_fd: int, disk: str) -> None:
        """Bind the directory behind `dir_fd` on `disk`: private before anything else is mounted
        (a shared bind would receive the overlay too), and nosymfollow, so that every write-back
        through it stays inside the directory even when its users plant symlinks meanwhile."""
        mounts.bind(f"/proc/self/fd/{dir_fd}", disk, private=True, nosymfollow=True)
        st, want = os.stat(disk), os.fstat(dir_fd)
        if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
            mounts.umount(disk)
            raise PinRefused(f"the staging bind {disk} does not show the directory pinned")

    def _mount_overlay(self, pin: Pin, undo: list[Callable[[], None]], dir_fd: int) -> None:
        upper, work = self.upper(pin.id), os.path.join(self.ram(pin.id), "work")
        os.mkdir(upper)
        os.mkdir(work)
        # the merged root shows the upper root's; read through the staging bind, not the path
        copy_root_attributes(self.disk(pin.id), upper)
        mounts.mount_overlay(
            f"/proc/self/fd/{dir_fd}",
            lower=self.disk(pin.id),
            upper=upper,
            work=work,
            features=writeback.OVERLAY_FEATURES,
            source=SOURCE_PREFIX + pin.id,
        )
        undo.append(lambda: self._rollback_overlay(pin))

    def _rollback_overlay(self, pin: Pin) -> None:
        """Undo a pin's overlay; what was written through it in the moment it was mounted is
        written back first (the overlay served the directory, however briefly)."""
        self._unmount_placed(pin)
        upper = self.upper(pin.id)
        if os.listdir(upper):
            writeback.apply_upper(upper, self.disk(pin.id), runner=self.runner)

    def _copy_and_bind(self, pin: Pin, undo: list[Callable[[], None]], dir_fd: int) -> None:
        ram, disk = self.ram(pin.id), self.disk(pin.id)
        copied = copymode.copy_in(disk, ram, pin_id=pin.id, runner=self.runner, path=pin.path)
        # nothing but rampiped sees the copy before the bind: the disk holds what it holds
        pin.ledger = ledger_mod.Ledger.of(ledger_mod.scan(self.data(pin.id)))
        # RAM and disk are equal from here: the copy's own change times must not make the
        # first checkpoint write every file again
        pin.last_ok_wall = self.ram_clock(pin)
        mounts.bind(self.data(pin.id), f"/proc/self/fd/{dir_fd}", private=False)
        undo.append(lambda: self._unmount_placed(pin))
        writeback.pause_point("pin:bound")
        # a write that reached the disk between the end of the copy and the bind would be
        # overwritten by the first checkpoint: roll back and let the pin be tried again
        raced = copymode.changed_since(disk, copied.snapshot)
        if raced:
            refusal = (
                f"cannot pin {pin.path}: written on disk during the pin ("
                + ", ".join(raced[:5])
                + ")"
            )
            window = copymode.Window(
                copied.snapshot,
                pin.last_ok_wall,
                time.time_ns() - writeback.CLOCK_SLACK_NS,
                forced=frozenset(pin.ledger.changed(ledger_mod.scan(self.data(pin.id)))),
            )
            self._write_back_rolled_copy(pin, undo, window, refusal)
            raise PinRefused(refusal)

    def _write_back_rolled_copy(
        self, pin: Pin, undo: list[Callable[[], None]], window: copymode.Window, refusal: str
    ) -> None:
        """A copy pin rolled back after its bind: processes may have written into RAM in that
        moment. Unmount, then write that back the way an unpin does after its unmount (what
        reached the disk meanwhile stays). When that fails, the RAM copy is kept and the pin
        stays (draining) until a retry writes it back."""
        window.save(os.path.join(self.journal(pin.id), COPY_WINDOW))  # for a crash from here
        self._unmount_placed(pin)  # raises (and the rollback goes on) when still in use
        try:
            res, held = self._write_window(pin.id, window)
        except (OSError, writeback.SyncError, copymode.CopyError) as exc:
            undo.clear()  # keep the RAM copy: it holds what is not on disk
            pin.window = window
            pin.unpin_requested = True  # retried with backoff (PinManager._retry_window)
            self._set_state(pin, "draining")
            raise _StillDraining(
                f"{refusal}; writing back what reached RAM meanwhile failed ({exc}): kept in"
                f" {self.ram_side(pin)} and retried"
            ) from exc
        self._settle_window(pin, held)
        if res.files or res.deleted:
            log.warning(
                "%s: rolled back; wrote back what reached RAM meanwhile: %d files, %d deleted",
                pin.path,
                res.files,
                res.deleted,
            )

    def _disk_holders(self, pin: Pin) -> list[handover.HeldFile]:
        """Processes holding files of the directory on disk after the mount (they opened it in
        the moment between the check and the mount): their writes would bypass RAM. Told by
        the mount each file was reached through (st_dev cannot tell: a file on an overlay
        reports the device of its layer); one that opened a file through the pin's mount in
        that moment writes into RAM and is no reason to refuse."""
        found = holders.find_holders(pin.path, exclude_pids=self.exclude_pids())
        top = mounts.mount_at(pin.path)
        if top is None or top.source != SOURCE_PREFIX + pin.id:
            return handover.describe(found)
        return handover.not_on(found, top.mount_id)

    def _late_writes_shown(self, pin: Pin, late: list[handover.HeldFile]) -> bool:
        """Processes that opened files on disk in the moment between the check and the mount
        (`late`): whether they all let go within HOLD_WAIT (a logger that opens, appends and
        closes does at once) and everything they could have written there is what the overlay
        shows. It is, for a file not copied up (the overlay reads the disk file), and for one
        whose disk content is a prefix of its copy in RAM (copied up after their last write,
        or appended to since): the write-back then carries every byte of it."""
        writeback.pause_point("pin:late-holders")
        deadline = time.monotonic() + HOLD_WAIT
        while self._disk_holders(pin):
            if time.monotonic() >= deadline:
                return False
            time.sleep(HOLD_POLL)
        held, only_files = _held_files(pin.path, late)
        if not only_files:
            return False  # a working directory or a mapping: writes may still come
        upper, disk = self.upper(pin.id), self.disk(pin.id)
        return all(
            not os.path.lexists(os.path.join(upper, rel))
            or writeback.is_prefix(disk, rel, os.path.join(upper, rel))
            for rel in held
        )

    def _late_bases(self, pin: Pin, late: list[handover.HeldFile]) -> dict[str, writeback.Stamp]:
        out: dict[str, writeback.Stamp] = {}
        for rel in _held_files(pin.path, late)[0]:
            copy = os.path.join(self.upper(pin.id), rel)
            try:
                # copied into RAM already: what the disk file holds beyond the bytes both share
                # was written below RAM's copy, and is kept by the write-back
                found = (
                    writeback.shared_stamp(self.disk(pin.id), rel, copy)
                    if os.path.lexists(copy)
                    else writeback.stamp_of(self.disk(pin.id), rel)
                )
            except OSError:
                continue
            if found is not None:
                out[rel] = found
        return out

    def _beside_ram(self, pin: Pin, found: list[holders.Holder]) -> list[holders.Holder]:
        """Of the holders found at an unpin, leave out the files held on the disk below the
        pin (opened through the mount the directory is on, in this namespace): they do not
        keep the unmount from working, and nothing they write is in RAM."""
        if pin.under_mount is None or not found:
            return found
        described = handover.describe(found)
        return [h for h, d in zip(found, described, strict=True) if d.mount_id != pin.under_mount]

    # -- checkpoints -------------------------------------------------------------------------

    def ram_clock(self, pin: Pin) -> float:
        """Now, as the pin's tmpfs stamps change times: a file changed after this call has a
        ctime at or after it (time.time() may run ahead of the kernel's coarse file clock)."""
        marker = os.path.join(self.ram(pin.id), ".rampiped-clock")
        try:
            with open(marker, "w") as f:
                f.write("")
            return os.stat(marker).st_ctime_ns / 1e9
        except OSError:
            return time.time() - 1.0

    def checkpoint(self, pin: Pin) -> SyncRecord:
        """Make the RAM side durable without unmounting (worker thread)."""
        start = time.monotonic()
        wall = time.time()
        if pin.mode == "volatile":
            return SyncRecord(wall, True, 0.0)  # nothing is ever written back
        if pin.window is not None:
            # RAM is not mounted; the disk is what processes use now: the unpin's retry
            # writes RAM's changes, a checkpoint (with --delete) would remove theirs
            return SyncRecord(
                wall, False, 0.0, error="the unpin's write-back is pending (see the log)"
            )
        clock = self.ram_clock(pin)  # what changes from here on, the next checkpoint writes
        try:
            if pin.mode == "overlay":
                need = self._check_room(pin, "checkpoint")  # deferred, loudly, if it won't fit
                res = writeback.checkpoint(
                    self.upper(pin.id),
                    self.journal(pin.id),
                    runner=self.runner,
                    ledger=pin.ledger,
                    found=need.found,  # read just now: once per checkpoint
                )
                known = res.ledger
                record = SyncRecord(wall, True, time.monotonic() - start, res.files, res.bytes)
            else:
                cres = copymode.checkpoint(
                    self.ram(pin.id),
                    self.disk(pin.id),
                    pin_id=pin.id,
                    runner=self.runner,
                    ledger=pin.ledger,
                )
                known = cres.ledger
                if cres.unstable:
                    log.warning(
                        "checkpoint of %s: files that never held still, written as last seen: %s",
                        pin.path,
                        ", ".join(cres.unstable[:10]),
                    )
                record = SyncRecord(wall, True, time.monotonic() - start, cres.files, cres.bytes)
        except writeback.NoSpace as exc:
            record = SyncRecord(wall, False, time.monotonic() - start, error=str(exc))
            known = pin.ledger  # refused before writing anything
        except (OSError, writeback.SyncError, copymode.CopyError) as exc:
            record = SyncRecord(wall, False, time.monotonic() - start, error=str(exc))
            known = None  # partly written: the next write-back compares content
        with self.lock:
            pin.ledger = known
            pin.last_sync = record
            if record.ok:
                pin.last_sync_mono = start
                pin.last_ok_wall = clock
                pin.backoff = 0.0
            else:
                # the engine leaves a pin alone until retry_at: no rsync every tick against a
                # full or read-only disk
                pin.backoff = RETRY.next(pin.backoff)
                pin.retry_at = time.monotonic() + pin.backoff
                record.error = f"{record.error} (retrying in {format_duration(pin.backoff)})"
        self.save_state()
        return record

    def _check_room(self, pin: Pin, what: str) -> writeback.SpaceNeed:
        """An overlay pin's journal generation and the apply that follows must both fit (on
        one filesystem, twice the changed data): a generation that cannot be applied strands
        its data in the journal. Raises writeback.NoSpace before anything is written."""
        return writeback.check_space(
            self.upper(pin.id),
            self.journal(pin.id),
            self.disk(pin.id),
            pin.ledger,
            f"{what} of {pin.path}",
            pin.path,
        )

    # -- unpinning ---------------------------------------------------------------------------

    def unpin(self, pin: Pin) -> SyncRecord:
        """Write everything back, unmount and free the RAM (worker thread). Raises UnpinBusy
        (still pinned, nothing lost) when someone uses the directory, and SyncError/OSError when
        the write-back failed (still pinned: the overlay or bind is mounted again)."""
        if pin.mode == "volatile":
            return self._unpin_volatile(pin)
        if pin.handover_mount is not None:
            return self._finish_handover(pin, time.monotonic(), time.time())
        if pin.window is not None:
            return self._retry_window(pin, pin.window)
        start = time.monotonic()
        wall = time.time()
        source = SOURCE_PREFIX + pin.id
        bulk_files = bulk_bytes = 0  # copy mode: what the bulk copy wrote counts as written back
        bulk_wall = 0.0
        verified: copymode.Snapshot | None = None  # copy mode: RAM as the disk was verified to hold
        if pin.mode == "copy":
            # the whole write-back while still mounted: the disk side is a private bind, well
            # defined, and no one can write to the disk copy through the path meanwhile
            bulk_wall = self.ram_clock(pin)
            before_sync = copymode.snapshot(self.data(pin.id))
            try:
                pin.ledger, known = None, pin.ledger  # until the disk is known again
                bulk = copymode.final_sync(
                    self.ram(pin.id),
                    self.disk(pin.id),
                    pin_id=pin.id,
                    runner=self.runner,
                    ledger=known,
                )
                verified = before_sync
            except copymode.NotVerified as unverified:
                # still being written: a plain checkpoint now, the verified sync after the unmount
                bulk = copymode.checkpoint(
                    self.ram(pin.id),
                    self.disk(pin.id),
                    pin_id=pin.id,
                    runner=self.runner,
                    ledger=unverified.ledger,
                )
            pin.ledger = bulk.ledger
            bulk_files, bulk_bytes = bulk.files, bulk.bytes
            writeback.pause_point("unpin:copy-synced")
        snapshot: dict[str, writeback.Stamp] = {}
        threshold = 0
        window: copymode.Window | None = None

        def before_copy_unmount() -> None:
            # the disk as it is while no one but us can write it (the copy covers the path);
            # kept on disk too, for a write-back that a crash cuts short
            nonlocal window
            window = copymode.Window.take(
                self.ram(pin.id),
                self.disk(pin.id),
                bulk_wall,
                time.time_ns() - writeback.CLOCK_SLACK_NS,
                pin.ledger,
            )
            window.save(os.path.join(self.journal(pin.id), COPY_WINDOW))

        def before_unmount() -> None:
            # the disk files the write-back will replace, as they are while nothing can write
            # them (the overlay still covers the path): see writeback.HeldFiles
            nonlocal snapshot, threshold
            threshold = time.time_ns() - writeback.CLOCK_SLACK_NS
            try:
                snapshot = writeback.touched_entries(self.upper(pin.id), self.disk(pin.id))
                for rel, base in pin.late_bases.items():
                    # written on disk below the overlay since the pin (see late_bases): what
                    # was added since then follows RAM's version
                    found = snapshot.get(rel)
                    if found is not None and found.source == rel and found.ino == base.ino:
                        snapshot[rel] = base
            except (OSError, writeback.SyncError) as exc:
                log.warning(
                    "%s: could not record the disk files the write-back replaces (%s); writes"
                    " to them during the write-back are kept as conflict files",
                    pin.path,
                    exc,
                )
                snapshot = {}
            writeback.pause_point("unpin:recorded")  # the overlay still mounted, its users free

        if pin.mode == "overlay":
            self._check_room(pin, "write-back")  # refused while RAM still serves the path
        try:
            self._unmount_when_free(
                pin,
                source,
                before=before_unmount if pin.mode == "overlay" else before_copy_unmount,
            )
        except UnpinBusy as busy:
            top = mounts.mount_at(pin.path)
            if not (
                pin.mode == "overlay"
                and pin.reopen
                and busy.holders
                and top is not None
                and top.source == source
                and handover.only_writers(busy.holders)
            ):
                raise
            # writers that keep their files open: hand them over to the disk
            return self._handover(pin, top.mount_id, start, wall)
        writeback.pause_point("unpin:unmounted")
        held: writeback.HeldFiles | None = None
        try:
            if pin.mode == "overlay":
                held = writeback.HeldFiles.hold(
                    self.upper(pin.id), self.disk(pin.id), snapshot, threshold
                )
                # through the journal: an apply cut short by a power loss is then replayed
                # from disk at the next start (the RAM layer is gone by then)
                writeback.checkpoint(
                    self.upper(pin.id), self.journal(pin.id), runner=self.runner, ledger=pin.ledger
                )
                pin.ledger = None  # the apply removes the journal it describes
                # from here on the journal, not the RAM layer, is what gets applied: applying
                # the layer a second time after this apply moved renamed directories would
                # find their origins gone
                write_json_atomic(os.path.join(self.journal(pin.id), FINAL_MARK), {"final": True})
                writeback.pause_point("unpin:journaled")
                res = writeback.apply_journal(
                    self.journal(pin.id), self.disk(pin.id), runner=self.runner, window=held
                )
                if res is None:
                    raise writeback.SyncError(
                        f"the journal of {pin.path} vanished before its apply"
                    )
                files, nbytes = res.files, res.bytes
            elif (
                verified is not None
                and window is not None
                and not window.forced
                and copymode.snapshot(self.data(pin.id)) == verified
            ):
                # RAM did not change from before the verified sync to the unmount: the disk
                # holds it all, and nothing is written after the unmount, so a file a process
                # writes on disk in this moment (the path shows the disk now) is left alone
                files, nbytes = bulk_files, bulk_bytes
            else:
                # RAM changed after the verified sync (a process still wrote at the unpin):
                # write those changes, leaving alone what is written on disk meanwhile
                assert window is not None
                cres, held = self._write_window(pin.id, window)
                files, nbytes = bulk_files + cres.files, bulk_bytes + cres.bytes
        except BaseException:
            if held is not None:
                # the RAM layer is mounted again and hides the disk files at those names
                with contextlib.suppress(OSError, writeback.SyncError):
                    held.merge(conflicts_only=True)
                    held.finish()
            if window is not None and not self._import_window(pin, window):
                raise
            self._remount(pin)
            raise
        if held is not None:
            self._settle_window(pin, held)
        writeback.pause_point("unpin:applied")
        self._release(pin)  # removes the journal directory, COPY_WINDOW with it, last
        if pin.adopted and pin.mode == "overlay":
            for line in self._scrub(pin.id, pin.path, pin.mode):
                log.info("%s", line)
        if pin.reopen:
            # writers that opened a file since: they follow the directory back to disk
            handover.run_reopen(pin.reopen, pin.path, self.runner)
        return SyncRecord(wall, True, time.monotonic() - start, files, nbytes)

    def _write_window(
        self, pid: str, window: copymode.Window
    ) -> tuple[copymode.CheckpointResult, writeback.HeldFiles]:
        """A copy pin's write-back after its unmount (copymode.WindowWriteBack); the caller
        settles the held files. When it fails, they are first kept as conflict files (the
        copy may cover the path again and hide their names)."""
        plan = copymode.WindowWriteBack.prepare(self.ram(pid), self.disk(pid), window, pin_id=pid)
        try:
            return plan.write(self.runner), plan.held
        except BaseException:
            with contextlib.suppress(OSError, writeback.SyncError):
                plan.held.merge(conflicts_only=True)
                plan.held.finish()
            raise

    def _retry_window(self, pin: Pin, window: copymode.Window) -> SyncRecord:
        """Unpin a copy pin left unmounted by a write-back that failed after its unmount."""
        start, wall = time.monotonic(), time.time()
        self._set_state(pin, "draining")
        try:
            cres, held = self._write_window(pin.id, window)
        except BaseException:
            if self._import_window(pin, window):
                pin.window = None
                self._remount(pin)
            raise
        self._settle_window(pin, held)
        pin.window = None
        self._release(pin)
        return SyncRecord(wall, True, time.monotonic() - start, cres.files, cres.bytes)

    def _import_window(self, pin: Pin, window: copymode.Window) -> bool:
        """A copy pin's write-back failed after the unmount and the copy is to cover the path
        again: bring into RAM what was written on disk meanwhile, or the copy would hide it and
        the next checkpoint delete it. False (the path then keeps showing the disk, and the
        RAM copy stays where it is) when that failed."""
        try:
            copymode.import_window(self.ram(pin.id), self.disk(pin.id), window)
        except (OSError, copymode.CopyError) as exc:
            log.critical(
                "%s: the write-back failed, and what was written on disk meanwhile could not be"
                " brought into RAM (%s): the RAM copy is not mounted again, so that it cannot"
                " hide or delete those files; its changes are safe in %s and are written when"
                " the unpin is retried",
                pin.path,
                exc,
                self.ram_side(pin),
            )
            pin.window = window
            pin.unpin_requested = True  # retried with backoff (PinManager._retry_window)
            return False
        return True

    def _settle_window(self, pin: Pin, held: writeback.HeldFiles) -> None:
        """Carry into the written-back files what processes wrote into the replaced disk files
        during the write-back; wait up to WINDOW_GRACE for those that still hold one."""
        deadline = time.monotonic() + WINDOW_GRACE
        try:
            while True:
                holding = _holding(held.inodes())
                # after a scan that found nobody, nobody can write them any more (they have
                # no name left but ours): this merge is the last one
                held.merge()
                if not holding:
                    break
                if time.monotonic() >= deadline:
                    log.warning(
                        "%s: still open after the write-back replaced them: %s; what these"
                        " processes write from now on goes to files that no longer have a"
                        " name, as on a plain disk when a file is replaced by a rename",
                        pin.path,
                        ", ".join(holding[:10]),
                    )
                    break
                time.sleep(BUSY_POLL)
            held.finish()
        except (OSError, writeback.SyncError) as exc:
            log.error(
                "%s: carrying the writes made during the write-back failed (%s); the files"
                " they went to stay in %s/%s",
                pin.path,
                exc,
                pin.path,
                writeback.HOLD_NAME,
            )

    def _finish_window(self, pid: str, path: str) -> None:
        """At start-up, after the apply: what an unpin cut short left in the hold directory."""
        held = writeback.HeldFiles.load(self.disk(pid))
        if held is None:
            return
        held.merge()
        held.finish()
        log.info("%s: carried the writes made during an interrupted write-back", path)

    def _unmount_when_free(
        self, pin: Pin, source: str, *, before: Callable[[], None] | None = None
    ) -> None:
        """Unmount the pin's mount over its directory once nothing holds it: holders in this or
        any other mount namespace (after our unmount, a namespace that still shows the pin
        would keep writing into RAM about to be freed). Writers that hold a file only while
        they write are waited for up to BUSY_GRACE; after that UnpinBusy names the holders.
        Never a lazy detach."""
        deadline = time.monotonic() + BUSY_GRACE
        while True:
            found = self._beside_ram(
                pin,
                holders.find_holders(
                    pin.path, exclude_pids=self.exclude_pids(), mount_source=source
                ),
            )
            if not found:
                if before is not None:
                    before()
                self._set_state(pin, "draining")
                try:
                    self._unmount_soon(pin)
                    return
                except mounts.MountBusy as exc:
                    self._set_state(pin, "pinned")
                    if time.monotonic() < deadline:
                        time.sleep(BUSY_POLL)
                        continue
                    found = self._beside_ram(
                        pin,
                        holders.find_holders(
                            pin.path, exclude_pids=self.exclude_pids(), mount_source=source
                        ),
                    )
                    raise UnpinBusy(
                        f"{pin.path} is busy: "
                        + (_holder_list(found) if found else "no holder found"),
                        found,
                    ) from exc
                except BaseException:
                    self._set_state(pin, "pinned")
                    raise
            if time.monotonic() >= deadline:
                raise UnpinBusy(f"{pin.path} is in use by " + _holder_list(found), found)
            time.sleep(BUSY_POLL)

    def _unmount_soon(self, pin: Pin) -> None:
        """Unmount the pin's mount, trying again for up to UMOUNT_SPIN: a writer that opens,
        writes and closes holds the mount busy only for moments, and a full holders scan
        between tries would let it write much more into RAM (an eviction is a race with it)."""
        deadline = time.monotonic() + UMOUNT_SPIN
        while True:
            try:
                self._unmount_path(pin)
                return
            except mounts.MountBusy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(UMOUNT_SPIN_POLL)

    def _remount(self, pin: Pin) -> None:
        """After a failed write-back: show the RAM side again, so nothing written is hidden."""
        dir_fd = -1
        try:
            # through a descriptor of the very directory on disk (the staging bind shows it),
            # never the path as it is now: it may have been swapped for a symlink meanwhile
            dir_fd = open_dir_nofollow(pin.path)
            st, want = os.fstat(dir_fd), os.stat(self.disk(pin.id))
            if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
                raise PinRefused(f"{pin.path} is no longer the directory that was pinned")
            target = f"/proc/self/fd/{dir_fd}"
            if pin.mode == "overlay":
                work = os.path.join(self.ram(pin.id), "work")
                mounts.mount_overlay(
                    target,
                    lower=self.disk(pin.id),
                    upper=self.upper(pin.id),
                    work=work,
                    features=writeback.OVERLAY_FEATURES,
                    source=SOURCE_PREFIX + pin.id,
                )
            else:
                mounts.bind(self.data(pin.id), target, private=False)
        except Exception as exc:
            log.critical(
                "%s: write-back failed and the RAM copy could not be mounted again"
                " (%s); the data is safe in %s",
                pin.path,
                exc,
                self.ram_side(pin),
            )
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        self._set_state(pin, "pinned")

    def _release(self, pin: Pin) -> None:
        mounts.umount(self.disk(pin.id))
        ramarea.unmount(self.ram(pin.id))
        shutil.rmtree(self.base(pin.id), ignore_errors=True)
        writeback.discard_journal(self.journal(pin.id))
        shutil.rmtree(self.journal(pin.id), ignore_errors=True)
        with self.lock:
            self.pins.pop(pin.path, None)
        self.save_state()

    # -- start-up reconciliation ---------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """Adopt pins that survived a daemon crash, finish or undo half-done steps, and apply
        journals left by a power cut. Returns one line per thing done, for the log."""
        done: list[str] = []
        recorded = self.load_state()
        known: dict[str, dict[str, Any]] = {}
        for recorded_path, rec in recorded.items():
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                known[rec["id"]] = dict(rec, path=recorded_path)
        for meta in self._journal_metas():
            known.setdefault(meta["id"], meta)
        for entry in mounts.mountinfo():
            if entry.source.startswith(SOURCE_PREFIX) and entry.mountpoint.startswith(
                os.path.join(self.runtime_dir, "pins") + "/"
            ):
                pid = entry.source[len(SOURCE_PREFIX) :]
                if pid not in known:
                    done.append(f"found mounts of unknown pin {pid} (no record): left alone")
        done += ramarea.reclaim()
        for pid, rec in known.items():
            path, mode = rec.get("path"), rec.get("mode")
            if not isinstance(path, str) or not isinstance(mode, str):
                continue
            if mode not in ("overlay", "copy", "volatile"):
                continue
            try:
                if mode == "volatile":
                    line = self._reconcile_volatile(pid, path, rec)
                elif handover.read_marker(self.journal(pid)) is not None:
                    line = self._reconcile_handover(pid, path, rec)
                else:
                    line = self._reconcile_one(pid, path, mode, rec)
            except Exception as exc:
                line = self._strand(pid, path, mode, rec, exc)
            if line:
                done.append(line)
            if mode != "volatile":
                done += self._scrub(pid, path, mode)
        self.save_state()
        return done

    def _strand(self, pid: str, path: str, mode: str, rec: dict[str, Any], exc: Exception) -> str:
        """A recovery that failed: record what it leaves stranded, for the status and retries."""
        gen = writeback.latest_generation(self.journal(pid))
        where = gen or (self.ram(pid) if os.path.ismount(self.ram(pid)) else None)
        if where is None:
            line = f"{path}: could not reconcile: {exc}"
            log.error("%s", line)
            return line
        size = copymode.dir_size(where)
        with self.lock:
            self.stranded[path] = Stranded(
                pid,
                path,
                mode,
                where,
                size,
                str(exc),
                time.time(),
                rec,
                retry_at=time.monotonic() + RETRY_MIN,
                backoff=RETRY_MIN,
            )
        line = (
            f"{path}: NOT WRITTEN BACK: {format_bytes(size)} that the directory lacks are only in"
            f" {where}; retrying every {format_duration(RETRY_MIN)} and longer ({exc})"
        )
        log.error("%s", line)
        return line

    def retry_stranded(self, path: str) -> str:
        """Try a stranded write-back again (worker thread). Returns the line to log when it
        completed; raises when it failed again (the record then says when to retry)."""
        st = self.stranded[path]
        try:
            line = self._reconcile_one(st.id, st.path, st.mode, st.record)
        except Exception as exc:
            with self.lock:
                st.attempts += 1
                st.error = str(exc)
                st.backoff = RETRY.next(st.backoff)
                st.retry_at = time.monotonic() + st.backoff
            # measured outside the lock: the main loop takes it too, and must not wait for a
            # walk of the generation
            gen = writeback.latest_generation(self.journal(st.id))
            if gen is not None:
                size = copymode.dir_size(gen)
                with self.lock:
                    st.where, st.bytes = gen, size
            raise
        with self.lock:
            self.stranded.pop(path, None)
        scrubbed = self._scrub(st.id, st.path, st.mode)
        return "; ".join([line or f"{path}: written back", *scrubbed])

    def _scrub(self, pid: str, path: str, mode: str) -> list[str]:
        """Remove the temporary files that a crash during a write-back left in the directory
        on disk (and, for an adopted copy pin, in its RAM copy, which checkpoints copy)."""
        pin = self.pins.get(path)
        try:
            if pin is not None and pin.id == pid:
                if mode != "copy":
                    return []  # nothing of rampiped's writes below a mounted overlay
                gone = writeback.scrub_leftovers(self.disk(pid)) + writeback.scrub_leftovers(
                    self.data(pid)
                )
            else:
                top = mounts.mount_at(path)
                if top is not None and top.source.startswith(SOURCE_PREFIX):
                    return []  # a pin mount left alone (reported above)
                try:
                    fd = open_dir_nofollow(path)
                except (PinRefused, FileNotFoundError):
                    return []
                try:
                    gone = writeback.scrub_leftovers(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            line = f"{path}: could not remove the temporary files a crash left: {exc}"
            log.warning("%s", line)
            return [line]
        if not gone:
            return []
        shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if gone[5:] else "")
        return [f"{path}: removed {len(gone)} temporary files a crash left behind ({shown})"]

    def _journal_metas(self) -> Iterator[dict[str, Any]]:
        try:
            names = sorted(os.listdir(self.journal_dir))
        except FileNotFoundError:
            return
        for name in names:
            try:
                with open(os.path.join(self.journal_dir, name, "pin.json")) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("id") == name:
                yield meta

    def _ensure_staging(self, pid: str, path: str, mounted: bool) -> bool:
        """The staging bind of `path`, for a write-back found half done at start; True."""
        if not mounted:
            self._staging_for(pid, path)
        return True

    def _recover_apply(
        self, pid: str, path: str, apply: Callable[..., writeback.ApplyResult | None]
    ) -> writeback.ApplyResult | None:
        """Finish an overlay write-back found half done at start: `apply` (apply_upper or
        apply_journal, its source bound) into the staging bind, carrying over what was held
        from the write-back's window."""
        res = apply(
            self.disk(pid), runner=self.runner, window=writeback.HeldFiles.load(self.disk(pid))
        )
        self._finish_window(pid, path)
        return res

    def _reconcile_one(self, pid: str, path: str, mode: str, rec: dict[str, Any]) -> str:
        top = mounts.mount_at(path)
        covered = top is not None and top.source == SOURCE_PREFIX + pid
        ram_mounted = os.path.ismount(self.ram(pid))
        disk_mounted = os.path.ismount(self.disk(pid))
        state = rec.get("state")
        if covered and ram_mounted and disk_mounted:
            now = time.monotonic()
            pin = Pin(
                path=path,
                id=pid,
                mode=mode,
                origin=str(rec.get("origin", "adaptive")),
                state="pinned",
                pinned_at=now,
                pinned_wall=float(rec.get("pinned_wall") or time.time()),
                sync_interval=rec.get("sync_interval"),
                adopted=True,
            )
            last = rec.get("last_sync")
            if isinstance(last, dict):
                with contextlib.suppress(TypeError):
                    pin.last_sync = SyncRecord(**last)
            with self.lock:
                self.pins[path] = pin
            return f"adopted {path} ({mode}, {pin.origin}), pinned before a restart"
        if covered:
            return f"{path}: covered by a pin mount without its RAM layers: left alone"
        if ram_mounted:
            # the overlay or bind is gone but the RAM layer is there: an unpin was cut short,
            # or a pin never got as far as its mount
            final = os.path.exists(os.path.join(self.journal(pid), FINAL_MARK))
            if mode == "overlay" and final:
                disk_mounted = self._ensure_staging(pid, path, disk_mounted)
                res_f = self._recover_apply(
                    pid, path, functools.partial(writeback.apply_journal, self.journal(pid))
                )
                what = (
                    "the write-back had finished"
                    if res_f is None
                    else f"wrote {res_f.files} files, {format_bytes(res_f.bytes)}"
                )
            elif mode == "overlay":
                if os.path.isdir(self.upper(pid)):
                    # through the staging bind (nosymfollow), never the path users control
                    disk_mounted = self._ensure_staging(pid, path, disk_mounted)
                    res = self._recover_apply(
                        pid, path, functools.partial(writeback.apply_upper, self.upper(pid))
                    )
                    assert res is not None  # apply_upper always returns a result
                    what = f"wrote {res.files} files, {format_bytes(res.bytes)}"
                else:
                    what = "the overlay was never mounted: nothing to write"
            elif state == "draining":
                disk_mounted = self._ensure_staging(pid, path, disk_mounted)
                window = copymode.Window.load(os.path.join(self.journal(pid), COPY_WINDOW))
                if window is not None:
                    # the path showed the disk since the unmount: what was written there
                    # meanwhile stays (see copymode.WindowWriteBack)
                    cres, held = self._write_window(pid, window)
                    held.merge()
                    held.finish()
                else:
                    # no ledger after a crash: every file compared by content
                    cres = copymode.final_sync(
                        self.ram(pid), self.disk(pid), pin_id=pid, runner=self.runner
                    )
                what = f"wrote {cres.files} files, {format_bytes(cres.bytes)}"
            else:
                what = "the copy never served the directory: discarded"
            if disk_mounted:
                mounts.umount(self.disk(pid))
            ramarea.unmount(self.ram(pid))
            shutil.rmtree(self.base(pid), ignore_errors=True)
            writeback.discard_journal(self.journal(pid))
            shutil.rmtree(self.journal(pid), ignore_errors=True)
            return f"{path}: finished an interrupted {state or 'pin'}: {what}"
        if mode == "overlay":
            self._ensure_staging(pid, path, disk_mounted)
            try:
                res_j = self._recover_apply(
                    pid, path, functools.partial(writeback.apply_journal, self.journal(pid))
                )
            finally:
                mounts.umount(self.disk(pid))
                shutil.rmtree(self.base(pid), ignore_errors=True)
        else:
            if disk_mounted:
                mounts.umount(self.disk(pid))
            shutil.rmtree(self.base(pid), ignore_errors=True)
            res_j = None
        if mode == "overlay":
            shutil.rmtree(self.journal(pid), ignore_errors=True)
            if res_j is not None:
                return (
                    f"{path}: applied the checkpoint journal left by a power cut or crash:"
                    f" {res_j.files} files, {format_bytes(res_j.bytes)}"
                )
            return ""
        shutil.rmtree(self.journal(pid), ignore_errors=True)
        return f"{path}: RAM copy lost (power cut or reboot); the disk holds the last checkpoint"

    def _staging_for(self, pid: str, path: str) -> None:
        """A staging bind of `path` for a write-back at start-up (after a power cut the runtime
        dir is empty): reached without symlinks and mounted nosymfollow, as at pin time."""
        disk = self.disk(pid)
        os.makedirs(disk, mode=0o700, exist_ok=True)
        dir_fd = open_dir_nofollow(path)
        try:
            self._bind_staging(dir_fd, disk)
        finally:
            os.close(dir_fd)

    # -- volatile pins -------------------------------------------------------------------------

    def _pin_volatile(self, path: str, origin: str, size: int, keep: tuple[str, ...]) -> Pin:
        """A tmpfs with the directory's owner and mode over it; nothing is copied in and nothing
        is written back (the disk content is hidden while it is mounted). `keep` subdirectories
        are bound from the disk through the private staging bind, so that they persist."""
        pid = pin_id(path)
        pin = Pin(
            path=path,
            id=pid,
            mode="volatile",
            origin=origin,
            state="pinning",
            pinned_at=time.monotonic(),
            pinned_wall=time.time(),
            sync_interval=0.0,  # no checkpoints
            keep=tuple(keep),
            size=size,
        )
        self._register(pin, {"path": path, "mode": "volatile", "id": pid, "keep": list(keep)})
        undo: list[Callable[[], None]] = []
        dir_fd = -1
        try:
            dir_fd = open_dir_nofollow(path)
            disk = self.disk(pid)
            os.makedirs(disk, mode=0o700, exist_ok=True)
            self._bind_staging(dir_fd, disk)
            undo.append(lambda: mounts.umount(disk))
            ramarea.mount_over(
                dir_fd,
                path,
                backend=self.ram_backend,
                size=size,
                source=SOURCE_PREFIX + pid,
                link_dir=self.base(pid),
            )
            undo.append(lambda: self._unmount_volatile(pin))
            self._check_in_place(pin)
            top = mounts.mount_at(path)
            assert top is not None
            chosen, skipped = volatile.normal_keeps(keep)
            if skipped:
                log.info("%s: keep %s is inside another kept directory", path, ", ".join(skipped))
            for name in chosen:
                volatile.bind_keep(
                    name,
                    disk,
                    path,
                    top.mount_id,
                    created=lambda rel: log.info(
                        "%s: made %s on disk (a keep directory that did not exist)", path, rel
                    ),
                )
        except BaseException as exc:
            for step in reversed(undo):
                try:
                    step()
                except Exception as undo_exc:
                    log.error("rolling back the pin of %s: %s", path, undo_exc)
            with self.lock:
                self.pins.pop(path, None)
            self.save_state()
            if not os.path.ismount(self.disk(pid)):
                shutil.rmtree(self.base(pid), ignore_errors=True)
                shutil.rmtree(self.journal(pid), ignore_errors=True)
            if isinstance(exc, PinRefused):
                raise
            if isinstance(exc, (OSError, volatile.KeepError)):
                raise PinRefused(f"cannot pin {path}: {exc}") from exc
            raise
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        self._set_state(pin, "pinned")
        return pin

    def _unmount_volatile(self, pin: Pin) -> None:
        """Unmount the keep binds (whatever is mounted inside the pin's tmpfs), then the tmpfs.
        Raises MountBusy with the keep binds put back when something is still in use."""
        top = mounts.mount_at(pin.path)
        if top is None or top.source != SOURCE_PREFIX + pin.id:
            return
        # max_age: a systemd-tmpfiles --clean that was told about this pin must find it still
        # mounted, or it would clean the directory on disk below (tmpfiles.py)
        with tmpfiles.unmount_guard(top.mountpoint, self.runtime_dir) as why_not:
            if why_not is not None:
                raise mounts.MountBusy(errno.EBUSY, f"{pin.path}: {why_not}", pin.path)
            inside = [e for e in mounts.mountinfo() if e.parent_id == top.mount_id]
            unmounted: list[str] = []
            try:
                for entry in reversed(inside):
                    if os.path.realpath(entry.mountpoint) != entry.mountpoint:
                        continue  # a planted symlink on the way: leave it (the tmpfs stays busy)
                    mounts.umount(entry.mountpoint)
                    unmounted.append(entry.mountpoint)
                self._unmount_path(pin)
                ramarea.release(ramarea.device_of_mount(top), pin.path)
            except mounts.MountError:
                if unmounted:
                    self._rebind_keeps(pin)
                raise

    def _rebind_keeps(self, pin: Pin) -> None:
        top = mounts.mount_at(pin.path)
        if top is None:
            return
        for name in volatile.normal_keeps(pin.keep)[0]:
            if mounts.is_mountpoint(os.path.join(pin.path, name)):
                continue
            try:
                volatile.bind_keep(
                    name, self.disk(pin.id), pin.path, top.mount_id, created=lambda rel: None
                )
            except (OSError, volatile.KeepError) as exc:
                log.error("%s: could not bind keep %s again: %s", pin.path, name, exc)

    def _unpin_volatile(self, pin: Pin) -> SyncRecord:
        """Unmount (nothing is written back: that is what volatile means)."""
        start, wall = time.monotonic(), time.time()
        found = holders.find_holders(
            pin.path, exclude_pids=self.exclude_pids(), mount_source=SOURCE_PREFIX + pin.id
        )
        if found:
            raise UnpinBusy(f"{pin.path} is in use by " + _holder_list(found), found)
        self._set_state(pin, "draining")
        try:
            self._unmount_volatile(pin)
        except mounts.MountBusy as exc:
            self._set_state(pin, "pinned")
            found = holders.find_holders(
                pin.path, exclude_pids=self.exclude_pids(), mount_source=SOURCE_PREFIX + pin.id
            )
            raise UnpinBusy(
                f"{pin.path} is busy: " + (_holder_list(found) if found else str(exc)),
                found,
            ) from exc
        except BaseException:
            self._set_state(pin, "pinned")
            raise
        self._release_staging(pin)
        return SyncRecord(wall, True, time.monotonic() - start)

    def _release_staging(self, pin: Pin) -> None:
        if os.path.ismount(self.disk(pin.id)):
            mounts.umount(self.disk(pin.id))
        shutil.rmtree(self.base(pin.id), ignore_errors=True)
        shutil.rmtree(self.journal(pin.id), ignore_errors=True)
        with self.lock:
            self.pins.pop(pin.path, None)
        self.save_state()

    def _reconcile_volatile(self, pid: str, path: str, rec: dict[str, Any]) -> str:
        top = mounts.mount_at(path)
        covered = top is not None and top.source == SOURCE_PREFIX + pid
        disk_mounted = os.path.ismount(self.disk(pid))
        keep = tuple(k for k in rec.get("keep") or () if isinstance(k, str))
        size = rec.get("size")
        pin = Pin(
            path=path,
            id=pid,
            mode="volatile",
            origin=str(rec.get("origin", "static")),
            state="pinned",
            pinned_at=time.monotonic(),
            pinned_wall=float(rec.get("pinned_wall") or time.time()),
            sync_interval=0.0,
            keep=keep,
            size=size if isinstance(size, int) else None,
        )
        if covered and disk_mounted and rec.get("state") == "pinned":
            with self.lock:
                self.pins[path] = pin
            return f"adopted {path} (volatile, {pin.origin}), pinned before a restart"
        if covered:
            self._unmount_volatile(pin)
        if disk_mounted:
            mounts.umount(self.disk(pid))
        shutil.rmtree(self.base(pid), ignore_errors=True)
        shutil.rmtree(self.journal(pid), ignore_errors=True)
        if not (covered or disk_mounted):
            return ""
        return f"{path}: removed a volatile pin left half made (nothing to write back)"

    # -- writers that keep their files open (handover.py) ---------------------------------------

    def _reopen_after_pin(self, pin: Pin, undo: list[Callable[[], None]]) -> None:
        """The overlay is mounted: run the reopen command, then make sure that every process
        holding a file of the directory holds it through the overlay. One that still holds the
        disk file below would write past RAM: roll back (through `undo`, which writes back
        what landed in RAM) and run the command again so that the others return to disk."""
        assert pin.reopen is not None
        top = mounts.mount_at(pin.path)
        assert top is not None
        overlay_id = top.mount_id
        handover.run_reopen(pin.reopen, pin.path, self.runner)

        def on_disk() -> list[handover.HeldFile]:
            found = holders.find_holders(pin.path, exclude_pids=self.exclude_pids())
            return handover.not_on(found, overlay_id)

        left = handover.wait_until_empty(on_disk)
        if not left:
            return
        message = (
            f"rolled back the pin of {pin.path}: {handover.listing(left)} keeps writing to the"
            f" disk copy after {pin.reopen!r}"
        )
        log.warning("%s", message)
        reopen = pin.reopen
        if handover.fds_on_mount(overlay_id, self.exclude_pids()):
            # others did follow the command into RAM: bring them back the way an unpin does
            undo.clear()
            try:
                self._handover(pin, overlay_id, time.monotonic(), time.time())
            except UnpinBusy as exc:
                raise _StillDraining(f"{message}; {exc}") from exc
            raise PinRefused(message)

        def reopen_again() -> None:
            handover.run_reopen(reopen, pin.path, self.runner)

        undo.insert(0, reopen_again)
        raise PinRefused(message)

    def _handover(self, pin: Pin, overlay_id: int, start: float, wall: float) -> SyncRecord:
        """Unpin an overlay whose files writers keep open (handover.py): apply, detach, ask
        them to reopen, and merge what they wrote in between once they let go."""
        assert pin.reopen is not None
        self._set_state(pin, "draining")
        journal, disk = self.journal(pin.id), self.disk(pin.id)
        try:
            writeback.checkpoint(self.upper(pin.id), journal, runner=self.runner)
            gen = writeback.latest_generation(journal)
            files = handover.generation_files(gen) if gen else {}
            writeback.apply_journal(journal, disk, runner=self.runner)
            applied = handover.after_apply(files, disk)
            handover.write_marker(journal, {"mount_id": overlay_id, "applied": applied})
            self._check_in_place(pin)
            handover.detach(pin.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(journal, handover.MARKER))
            self._set_state(pin, "pinned")
            raise
        with self.lock:
            pin.handover_mount = overlay_id
            pin.unpin_requested = True  # retried until the writers let go
        self.save_state()
        log.info(
            "%s: wrote its RAM layer back and detached it; asking its writers to reopen",
            pin.path,
        )
        handover.run_reopen(pin.reopen, pin.path, self.runner)
        return self._finish_handover(pin, start, wall)

    def _finish_handover(self, pin: Pin, start: float, wall: float) -> SyncRecord:
        assert pin.handover_mount is not None
        mount_id = pin.handover_mount
        left = handover.wait_until_empty(
            lambda: handover.fds_on_mount(mount_id, self.exclude_pids())
        )
        if left:
            raise UnpinBusy(
                f"{pin.path} is back on disk, but {handover.listing(left)} still writes to its"
                f" RAM copy after {pin.reopen!r}; what it writes is merged when it lets go",
                [],
            )
        marker = handover.read_marker(self.journal(pin.id)) or {}
        applied = marker.get("applied")
        res = handover.merge_window(
            self.upper(pin.id), self.disk(pin.id), applied if isinstance(applied, dict) else {}
        )
        if res.conflicts:
            log.warning(
                "%s: files rewritten both in RAM and on disk while the writers moved; the RAM"
                " versions are kept next to them: %s",
                pin.path,
                ", ".join(res.conflicts[:10]),
            )
        self._release(pin)
        return SyncRecord(wall, True, time.monotonic() - start, res.files, res.bytes)

    def _reconcile_handover(self, pid: str, path: str, rec: dict[str, Any]) -> str:
        """A handover was under way: the disk holds the applied journal and maybe what writers
        appended since. Never apply the journal or the layer again over it."""
        marker = handover.read_marker(self.journal(pid)) or {}
        mount_id = marker.get("mount_id")
        applied = marker.get("applied")
        ram_mounted = os.path.ismount(self.ram(pid))
        if ram_mounted and isinstance(mount_id, int):
            if handover.fds_on_mount(mount_id, self.exclude_pids()):
                pin = Pin(
                    path=path,
                    id=pid,
                    mode="overlay",
                    origin=str(rec.get("origin", "adaptive")),
                    state="draining",
                    pinned_at=time.monotonic(),
                    pinned_wall=float(rec.get("pinned_wall") or time.time()),
                    reopen=rec.get("reopen") if isinstance(rec.get("reopen"), str) else None,
                    handover_mount=mount_id,
                    unpin_requested=True,
                )
                with self.lock:
                    self.pins[path] = pin
                return f"{path}: its writers still hold the detached RAM layer; waiting for them"
            if not os.path.ismount(self.disk(pid)):
                self._staging_for(pid, path)
            res = handover.merge_window(
                self.upper(pid), self.disk(pid), applied if isinstance(applied, dict) else {}
            )
            what = f"merged {res.files} files written while its writers moved"
        else:
            what = "the disk already held the checkpoint"
        if os.path.ismount(self.disk(pid)):
            mounts.umount(self.disk(pid))
        if ram_mounted:
            ramarea.unmount(self.ram(pid))
        shutil.rmtree(self.base(pid), ignore_errors=True)
        writeback.discard_journal(self.journal(pid))
        shutil.rmtree(self.journal(pid), ignore_errors=True)
        return f"{path}: finished an interrupted hand-over to disk: {what}"

    # -- measurements ----------------------------------------------------------------------------

    def ram_bytes(self, pin: Pin) -> int:
        """What the RAM budget counts for the pin (ramarea.Usage.counted)."""
        return self.ram_usage(pin).counted(self.ram_limit)

    def ram_usage(self, pin: Pin) -> ramarea.Usage:
        return ramarea.usage(pin.path if pin.mode == "volatile" else self.ram(pin.id))

    def dirty_bytes(self, pin: Pin, limit: int = 200_000) -> int:
        """Bytes in RAM changed since the last good checkpoint (not yet on disk)."""
        return self.dirty(pin, limit).bytes

    def dirty(self, pin: Pin, limit: int = 200_000) -> Dirty:
        """What on the RAM side changed since the last good checkpoint: the size of the regular
        files among it, and the change time of the oldest such entry (file, directory, symlink
        or whiteout), which is how long the oldest change has been at risk."""
        if pin.mode == "volatile":
            return Dirty(0, 0, None)  # nothing is written back: nothing is at risk
        since = pin.last_ok_wall or 0.0
        if pin.mode == "copy":
            # copy_in writes its sentinel last: everything older came from the disk
            sentinel = os.path.join(self.ram(pin.id), copymode.SENTINEL)
            with contextlib.suppress(OSError):
                since = max(since, os.lstat(sentinel).st_ctime)
        total = entries = 0
        oldest: float | None = None
        # The overlay's upper root gets its times when the pin is made; what changes below it
        # shows as entries (a deletion as a whiteout). A copy's root changes on a deletion.
        root = self.ram_side(pin)
        if pin.mode == "copy":
            with contextlib.suppress(OSError):
                root_ctime = os.lstat(root).st_ctime
                if root_ctime >= since:
                    oldest = root_ctime
        for seen, (_rel, st) in enumerate(tree.walk(root, tolerate=(OSError,)), start=1):
            if seen > limit:
                return Dirty(total, entries, oldest, complete=False)
            if st.st_ctime >= since:
                entries += 1
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
                if oldest is None or st.st_ctime < oldest:
                    oldest = st.st_ctime
        if oldest is not None and pin.last_sync is not None and not pin.last_sync.ok:
            # Checkpoints fail: a file changed again and again since the last good one shows
            # only its latest change time, while its first change not on disk is older. The
            # honest bound is the last good checkpoint (or the pin).
            oldest = min(oldest, pin.last_ok_wall or pin.pinned_wall)
        return Dirty(total, entries, oldest, complete=True)


def _holding(inodes: set[tuple[int, int]]) -> list[str]:
    """Processes (other than this one) with one of `inodes` open: "pid N (comm) fd M"."""
    if not inodes:
        return []
    out = []
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # exited, or not ours to look at
        for fd in fds:
            try:
                # a replaced file was unlinked at its name: only such fds are looked at (no
                # stat of every socket, pipe or network file on the machine)
                if not os.readlink(f"/proc/{pid}/fd/{fd}").endswith(" (deleted)"):
                    continue
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inodes:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                out.append(f"pid {pid} ({comm}) fd {fd}")
    return out


def _holder_list(found: Sequence[object]) -> str:
    shown = "; ".join(str(h) for h in found[:5])
    return shown + (f" and {len(found) - 5} more" if len(found) > 5 else "")


def copy_root_attributes(src: str, dst: str) -> None:
    """Give `dst` the owner, mode, ACLs and xattrs of `src` (the overlay's merged root shows the
    upper root's attributes, not the disk directory's)."""
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        if name.startswith(_COPIED_XATTR_PREFIXES):
            with contextlib.suppress(OSError):
                os.setxattr(
                    dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False
                )
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def open_dir_nofollow(path: str) -> int:
    """An O_PATH descriptor of the directory `path`, reached from / one component at a time
    without following any symlink. Raises PinRefused when a component is a symlink or not a
    directory: the directories rampiped manages may be writable by other users, who could
    otherwise point root's mounts and writes anywhere."""
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise PinRefused(f"cannot pin {path!r}: not a normalised absolute path")
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return fsops.walk_dirs(
            root,
            [part for part in path.split("/") if part],
            os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
        )
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise PinRefused(
                f"cannot pin {path}: /{exc.filename} is a symlink or not a directory"
            ) from exc
        raise
    finally:
        os.close(root)


def largest_file(path: str) -> int:
    """Size of the largest regular file below `path` (symlinks not followed)."""
    return max(
        (st.st_size for _rel, st in tree.walk(path) if stat.S_ISREG(st.st_mode)),
        default=0,
    )
