"""The fanotify records the monitor reads: which kinds it asks for, their layout, and the hot
loop that adds a read's records to counters keyed by directory handle.

Nothing here makes a system call; `count_records` takes the bytes of one read.
"""

from __future__ import annotations

import collections
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyfanotify import ext

FAN_MODIFY: int = ext.FAN_MODIFY
FAN_ATTRIB: int = ext.FAN_ATTRIB
FAN_CLOSE_WRITE: int = ext.FAN_CLOSE_WRITE
FAN_CREATE: int = ext.FAN_CREATE
FAN_DELETE: int = ext.FAN_DELETE
FAN_MOVED_FROM: int = ext.FAN_MOVED_FROM
FAN_MOVED_TO: int = ext.FAN_MOVED_TO
FAN_ONDIR: int = ext.FAN_ONDIR
FAN_Q_OVERFLOW: int = ext.FAN_Q_OVERFLOW

WRITE_EVENTS = (
    FAN_MODIFY
    | FAN_CLOSE_WRITE
    | FAN_CREATE
    | FAN_DELETE
    | FAN_MOVED_FROM
    | FAN_MOVED_TO
    | FAN_ATTRIB
)
MARK_MASK = WRITE_EVENTS | FAN_ONDIR  # ONDIR: directories created, removed and renamed count too
# Without FAN_MODIFY: the kernel builds and merges an event for every write(2) on a marked
# filesystem, whether or not the reader asks for it often; measured on tmpfs, 4k writes with
# fsync ran at 0.40 of their unwatched speed with FAN_MODIFY in the mask and at 1.00 without.
# The RAM side of a pin is watched so: closes after writing, creations, deletions, renames and
# attribute changes still show how busy it is, at no cost to the writes that were moved to RAM.
QUIET_MARK_MASK = MARK_MASK & ~FAN_MODIFY

INIT_FLAGS: int = (
    ext.FAN_CLASS_NOTIF | ext.FAN_REPORT_DFID_NAME | ext.FAN_CLOEXEC | ext.FAN_NONBLOCK
)
INIT_O_FLAGS: int = os.O_RDONLY | os.O_LARGEFILE | ext.O_CLOEXEC
_METADATA_VERSION: int = ext.FANOTIFY_METADATA_VERSION

# struct fanotify_event_metadata (24 bytes: event_len u32, vers u8, reserved u8,
# metadata_len u16, mask u64, fd s32, pid s32) followed by the first info record's header
# (info_type u8, pad u8, len u16), fsid (2 x s32) and struct file_handle's handle_bytes u32.
# One unpack per record gives what the hot loop needs: length, kinds, pid, handle size.
_META_LEN = 24
_RECORD = struct.Struct("=I4xQ4xi4x8xI")  # event_len, mask, pid, handle_bytes
_META = struct.Struct("=IBxHQii")  # event_len, vers, metadata_len, mask, fd, pid
_INFO_HEADER = struct.Struct("=BxH")  # info_type, len
# Where the directory key starts in a record: fsid, then the file_handle (handle_bytes,
# handle_type, f_handle). The key is those bytes as they are; key[:8] is the fsid and key[8:]
# a ready struct file_handle for open_by_handle_at.
_KEY_START = _META_LEN + 4
_KEY_FIXED = 16  # fsid 8 + handle_bytes 4 + handle_type 4
# FAN_EVENT_INFO_TYPE_FID, _DFID_NAME, _DFID: the same fsid + file_handle layout.
_INFO_TYPES = (1, 2, 3)

# mask -> events it stands for; overflow records are never entered, so a miss checks for them.
_WEIGHTS: dict[int, int] = {}


class RecordFormatError(ValueError):
    """The kernel's records are not laid out as this module reads them."""


@dataclass
class ReadCounts:
    """What one `count_records` call found: `records` as read (after the kernel's merging),
    `counted` and `ignored` events, `lost` (the kernel's overflow records, plus one when
    records of directories beyond `max_keys` had to be left out)."""

    records: int = 0
    counted: int = 0
    ignored: int = 0
    lost: int = 0


def count_records(
    data: bytes,
    agg: collections.defaultdict[bytes, int],
    verdicts: dict[int, bool],
    is_ignored: Callable[[int], bool],
    max_keys: int,
) -> ReadCounts:
    """Add the records in `data` to `agg` (directory key -> events). `verdicts` caches
    `is_ignored(pid)`. When `agg` holds `max_keys` directories before the read, events of a
    directory not in it are left out and the read counts one lost event: the writes they stand
    for were not seen, which the caller treats as load, as it does the kernel's own overflow.
    `agg` thus stays below `max_keys` plus the records of one read.

    The hot loop: one unpack, one slice and a few dict operations per record."""
    unpack = _RECORD.unpack_from
    weights = _WEIGHTS
    full = len(agg) >= max_keys
    n = len(data)
    off = 0
    records = counted = ignored = lost = left_out = 0
    while off < n:
        try:
            event_len, mask, pid, hb = unpack(data, off)
        except struct.error:  # a short record at the end: only an overflow record is
            event_len, _vers, _ml, mask, _fd, pid = _META.unpack_from(data, off)
            hb = 0
        records += 1
        w = weights.get(mask)
        if w is None:
            if mask & FAN_Q_OVERFLOW:
                lost += 1
                off += event_len
                continue
            w = _WEIGHTS[mask] = (mask & WRITE_EVENTS).bit_count()
        v = verdicts.get(pid)
        if v is None:
            v = verdicts[pid] = is_ignored(pid)
        if v:
            ignored += w
        elif event_len > _META_LEN:
            start = off + _KEY_START
            key = data[start : start + _KEY_FIXED + hb]
            if full and key not in agg:
                left_out += w
            else:
                agg[key] += w
                counted += w
        off += event_len
    return ReadCounts(records, counted, ignored, lost + (left_out > 0))


def check_format(data: bytes) -> None:
    """`count_records` assumes the record layout of the first record; check it once a read
    (every record of a group has the same layout)."""
    event_len, vers, meta_len, _mask, _fd, _pid = _META.unpack_from(data, 0)
    if vers != _METADATA_VERSION or meta_len != _META_LEN:
        raise RecordFormatError(
            f"fanotify record format {vers} (metadata {meta_len} bytes) is not the"
            f" expected {_METADATA_VERSION} ({_META_LEN} bytes)"
        )
    if event_len > meta_len:
        info_type, _len = _INFO_HEADER.unpack_from(data, meta_len)
        if info_type not in _INFO_TYPES:
            raise RecordFormatError(f"unexpected fanotify info record type {info_type}")
