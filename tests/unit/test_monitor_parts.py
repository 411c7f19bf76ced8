"""The monitor's pure parts: the bounded handle -> path cache (rampiped/monitor_handles.py) and
the hot loop that counts records per directory (rampiped/monitor_records.py), fed records
built here in the kernel's layout."""

from __future__ import annotations

import collections
import struct

import pytest
from pyfanotify import ext

from rampiped.monitor_handles import HandleCache
from rampiped.monitor_records import (
    FAN_CLOSE_WRITE,
    FAN_CREATE,
    FAN_MODIFY,
    FAN_Q_OVERFLOW,
    RecordFormatError,
    check_format,
    count_records,
)

# --------------------------------------------------------------------------- the handle cache


def test_a_cached_path_is_trusted_for_the_ttl() -> None:
    c = HandleCache(max_entries=4, ttl=5.0)
    c.put(b"a", "/srv/a", 100.0)
    assert c.get(b"a", 100.0) == "/srv/a"
    assert c.get(b"a", 104.9) == "/srv/a"
    assert c.get(b"a", 105.0) is None  # resolved again: it may have been renamed
    assert len(c) == 0
    assert c.get(b"never", 100.0) is None


def test_the_cache_holds_at_most_max_entries_least_recently_used_first_out() -> None:
    c = HandleCache(max_entries=3, ttl=60.0)
    for i, key in enumerate((b"a", b"b", b"c")):
        c.put(key, f"/{key.decode()}", float(i))
    assert c.get(b"a", 3.0) == "/a"  # used: b is now the oldest
    c.put(b"d", "/d", 4.0)
    assert len(c) == 3
    assert c.get(b"b", 5.0) is None
    assert [c.get(k, 5.0) for k in (b"a", b"c", b"d")] == ["/a", "/c", "/d"]


def test_many_directories_keep_the_cache_at_its_limit() -> None:
    c = HandleCache(max_entries=100, ttl=5.0)
    for i in range(100_000):
        key = i.to_bytes(8, "little")
        if c.get(key, i / 1000) is None:
            c.put(key, f"/srv/d{i}", i / 1000)
        assert len(c) <= 100
    c.put(b"again", "/srv/again", 200.0)  # a new path for a renamed directory replaces it
    c.put(b"again", "/srv/renamed", 200.0)
    assert c.get(b"again", 200.0) == "/srv/renamed"
    c.clear()
    assert len(c) == 0


def test_a_cache_holds_at_least_one_entry() -> None:
    with pytest.raises(ValueError, match="at least one entry"):
        HandleCache(max_entries=0)


# --------------------------------------------------------------------------- records

FSID = b"\x01" * 8
VERSION: int = ext.FANOTIFY_METADATA_VERSION


def record(directory: int, mask: int, pid: int = 1000, name: bytes = b"f") -> bytes:
    """One record as the kernel lays it out with FAN_REPORT_DFID_NAME: metadata, the info
    header, fsid, struct file_handle (8 bytes of handle) and the entry's name."""
    handle = struct.pack("=Ii", 8, 1) + directory.to_bytes(8, "little")
    body = FSID + handle + name + b"\0"
    body += b"\0" * (-(4 + len(body)) % 8)
    info = struct.pack("=BxH", 2, 4 + len(body)) + body
    return struct.pack("=IBxHQii", 24 + len(info), VERSION, 24, mask, -1, pid) + info


def key(directory: int) -> bytes:
    return FSID + struct.pack("=Ii", 8, 1) + directory.to_bytes(8, "little")


OVERFLOW = struct.pack("=IBxHQii", 24, VERSION, 24, FAN_Q_OVERFLOW, -1, 0)
NEW_FILE = FAN_CREATE | FAN_MODIFY | FAN_CLOSE_WRITE  # merged: three events


def count(
    data: bytes, agg: collections.defaultdict[bytes, int], max_keys: int = 100, ignored: int = 0
) -> tuple[int, int, int, int]:
    check_format(data)
    got = count_records(data, agg, {}, lambda pid: pid == ignored, max_keys)
    return got.records, got.counted, got.ignored, got.lost


def test_records_count_their_kinds_per_directory() -> None:
    agg: collections.defaultdict[bytes, int] = collections.defaultdict(int)
    data = record(1, NEW_FILE) + record(1, FAN_MODIFY) + record(2, FAN_CREATE, pid=7)
    assert count(data + OVERFLOW, agg, ignored=7) == (4, 4, 1, 1)
    assert agg == {key(1): 4}


def test_directories_beyond_the_limit_are_lost_not_kept() -> None:
    agg: collections.defaultdict[bytes, int] = collections.defaultdict(int)
    # the limit is looked at before each read: this one fills it past the limit
    assert count(b"".join(record(d, FAN_CREATE) for d in range(3)), agg, max_keys=2) == (
        3,
        3,
        0,
        0,
    )
    # full: a known directory still counts, new ones are left out and make one lost event
    data = record(0, NEW_FILE) + record(3, NEW_FILE) + record(4, FAN_CREATE)
    assert count(data, agg, max_keys=2) == (3, 3, 0, 1)
    assert agg == {key(0): 4, key(1): 1, key(2): 1}
    agg.clear()  # a drain takes the count: new directories count again
    assert count(record(3, FAN_CREATE), agg, max_keys=2) == (1, 1, 0, 0)


def test_an_unknown_layout_is_refused() -> None:
    bad = struct.pack("=IBxHQii", 24, VERSION + 1, 24, FAN_CREATE, -1, 1)
    with pytest.raises(RecordFormatError, match="record format"):
        check_format(bad)
    odd_info = bytearray(record(1, FAN_CREATE))
    odd_info[24] = 9
    with pytest.raises(RecordFormatError, match="info record type 9"):
        check_format(bytes(odd_info))
