"""The two sides of a copy pin, checked before anything is written: the RAM copy (this pin's
tmpfs, holding the sentinel) and the disk (the pin's private bind of the original directory)."""

from __future__ import annotations

import json
import os
import stat

from rampiped import mounts, ramarea
from rampiped.copywb.results import UnsafeSource, UnsafeTarget

DATA = "data"
SENTINEL = ".rampiped-pin"
SOURCE_PREFIX = "rampiped-"


def require_pin_tmpfs(ram: str, pin_id: str, what: str) -> mounts.MountEntry:
    entry = mounts.mount_at(ram)
    if entry is None:
        raise UnsafeSource(
            f"{what}: {ram} is not a mount point (the RAM copy of pin {pin_id} is not mounted)"
        )
    expected = SOURCE_PREFIX + pin_id
    if entry.fstype not in ramarea.FSTYPES or entry.source != expected:
        raise UnsafeSource(
            f"{what}: {ram} is mounted from {entry.source!r} ({entry.fstype}), "
            f"not the tmpfs {expected!r} of pin {pin_id}"
        )
    if os.stat(ram).st_dev != entry.dev:
        raise UnsafeSource(f"{what}: {ram} does not resolve into the mount {expected!r}")
    return entry


def verify_source(ram: str, pin_id: str) -> None:
    """Raise UnsafeSource unless `ram` is this pin's tmpfs, holding the sentinel that copy_in
    writes last, and a `data` directory. Called before anything may delete on disk."""
    what = f"refusing to sync from {ram}"
    require_pin_tmpfs(ram, pin_id, what)
    sentinel = os.path.join(ram, SENTINEL)
    try:
        with open(sentinel, "rb") as f:
            content = json.loads(f.read())
    except FileNotFoundError:
        raise UnsafeSource(f"{what}: no {SENTINEL} (the copy into RAM never completed)") from None
    except (OSError, ValueError) as exc:
        raise UnsafeSource(f"{what}: cannot read {sentinel}: {exc}") from None
    if not isinstance(content, dict) or content.get("id") != pin_id:
        raise UnsafeSource(f"{what}: {sentinel} names {content!r}, not pin {pin_id}")
    data = os.path.join(ram, DATA)
    try:
        is_dir = stat.S_ISDIR(os.lstat(data).st_mode)
    except FileNotFoundError:
        is_dir = False
    if not is_dir:
        raise UnsafeSource(f"{what}: {data} is not a directory")


def verify_target(ram: str, disk: str) -> None:
    """The disk side must be a mount (the pin's private bind): an unmounted `disk` is an empty
    directory in the runtime dir, and a checkpoint written there would look fine and be lost."""
    if mounts.mount_at(disk) is None:
        raise UnsafeTarget(
            f"refusing to write to {disk}: not a mount point (the disk side of the pin is gone)"
        )
    if os.stat(disk).st_dev == os.stat(ram).st_dev:
        raise UnsafeTarget(f"refusing to write to {disk}: it is on the RAM filesystem")
