"""The pin manager's own ground: where each pin's mounts and journal are, the table of pins
and its record in the runtime directory."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rampiped import durable, mounts, ramarea, writeback
from rampiped.osutil import write_json_atomic
from rampiped.pins.model import STATE_VERSION, TMPFS_HEADROOM, Pin, Stranded

if TYPE_CHECKING:
    from rampiped.pins.mode import Mode

log = logging.getLogger("rampiped")


class ManagerCore:
    """Paths, the table of pins (shared with the main loop under `lock`) and its record."""

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
        self.modes: dict[str, Mode] = {kind.name: kind for kind in self.make_modes()}

    def make_modes(self) -> list[Mode]:
        """One object of each kind of pin (PinManager's)."""
        return []

    def mode(self, pin: Pin) -> Mode:
        return self.modes[pin.mode]

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
        return self.mode(pin).ram_side(pin)

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

    def set_state(self, pin: Pin, state: str) -> None:
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

    def register(self, pin: Pin, meta: dict[str, Any]) -> None:
        """Record a pin about to be made: its recovery record on disk first (`pin.json`, which
        names the directory of a journal found after a power cut), then the runtime state."""
        os.makedirs(self.journal(pin.id), exist_ok=True)
        durable.write_json(os.path.join(self.journal(pin.id), "pin.json"), meta)
        with self.lock:
            self.pins[pin.path] = pin
        self.save_state()

    def tmpfs_size(self) -> int:
        return int(self.ram_limit * TMPFS_HEADROOM)

    def ram_clock(self, pin: Pin) -> float:
        """Now, as the pin's tmpfs stamps change times: a file changed after this call has a
        ctime at or after it (time.time() may run ahead of the kernel's coarse file clock)."""
        return self.ram_clock_ns(pin) / 1e9

    def ram_clock_ns(self, pin: Pin) -> int:
        """ram_clock in ns."""
        marker = os.path.join(self.ram(pin.id), ".rampiped-clock")
        try:
            with open(marker, "w") as f:
                f.write("")
            return os.stat(marker).st_ctime_ns
        except OSError:
            return time.time_ns() - 1_000_000_000
