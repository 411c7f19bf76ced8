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

from rampiped.pins.dirs import copy_root_attributes, largest_file, open_dir_nofollow
from rampiped.pins.manager import PinManager
from rampiped.pins.mode import Mode
from rampiped.pins.model import (
    BUSY_GRACE,
    COPY_WINDOW,
    FINAL_MARK,
    RETRY_MIN,
    SOURCE_PREFIX,
    TMPFS_HEADROOM,
    Dirty,
    Pin,
    PinRefused,
    Stranded,
    SyncRecord,
    UnpinBusy,
    pin_id,
)

__all__ = [
    "BUSY_GRACE",
    "COPY_WINDOW",
    "FINAL_MARK",
    "RETRY_MIN",
    "SOURCE_PREFIX",
    "TMPFS_HEADROOM",
    "Dirty",
    "Mode",
    "Pin",
    "PinManager",
    "PinRefused",
    "Stranded",
    "SyncRecord",
    "UnpinBusy",
    "copy_root_attributes",
    "largest_file",
    "open_dir_nofollow",
    "pin_id",
]
