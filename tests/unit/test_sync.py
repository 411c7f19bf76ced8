"""The hold index of a write-back window, and how much of a carried append landed, told by
content after a crash (sync._landed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rampiped.fsops import common_prefix
from rampiped.writeback import HOLD_NAME, HeldFiles
from rampiped.writeback.held import _Append, _landed

LINE = b"2024-05-01T10:00:01 carried line\n"


def test_common_prefix() -> None:
    assert common_prefix(b"", b"abc") == 0
    assert common_prefix(b"abc", b"abd") == 2
    assert common_prefix(b"abc", b"abcdef") == 3
    big = bytes(range(256)) * 40  # 10240 bytes
    assert common_prefix(big, big[:9000] + b"!" + big[9001:]) == 9000
    assert common_prefix(big, big) == 10240


def test_nothing_landed() -> None:
    assert _landed(LINE, b"", 100) == 0


def test_all_landed() -> None:
    assert _landed(LINE, LINE, 100) == len(LINE)


def test_all_landed_then_others_appended() -> None:
    assert _landed(LINE, LINE + b"another writer\n", 100) == len(LINE)


def test_others_appended_first_then_ours() -> None:
    assert _landed(LINE, b"another writer\n" + LINE + b"more\n", 100) == len(LINE)


def test_only_others_that_start_like_ours() -> None:
    # same timestamp, different line: not ours, even across a page boundary of the file
    other = b"2024-05-01T10:00:01 other writer\n"
    assert _landed(LINE, other, 100) == 0
    assert _landed(LINE, other, 4090) == 0


def test_empty_write() -> None:
    assert _landed(b"", b"whatever", 0) == 0


def test_a_write_cut_at_a_page_boundary() -> None:
    planned = bytes(range(256)) * 64  # 16 KiB from offset 1000: boundaries at 3096, 7192, ...
    tail = planned[:7192] + b"appended by name after the crash\n"
    assert _landed(planned, tail, 1000) == 7192
    assert _landed(planned, planned[:7192], 1000) == 7192


def test_a_cut_match_counts_only_up_to_a_boundary() -> None:
    planned = bytes(range(256)) * 64
    # matches 5000 bytes: the last boundary inside is at 3096 from the start
    assert _landed(planned, planned[:5000] + b"x", 1000) == 3096
    # a match that ends right past a boundary, just a few bytes beyond it: too short to count
    assert _landed(planned, planned[:300] + b"x", 4000) == 0
    assert _landed(planned, planned[:700] + b"x", 3500) == 596


STAMP = {
    "source": "a.log",
    "ino": 12,
    "size": 7,
    "mtime_ns": 1,
    "ctime_ns": 2,
    "digest": "d",
}


def test_an_index_without_append_records_loads(tmp_path: Path) -> None:
    (tmp_path / HOLD_NAME).mkdir()
    old = {
        "version": 1,
        "threshold": 5,
        "entries": [{"rel": "a.log", "link": "0", "base": STAMP, "done": 9, "conflict": False}],
    }
    (tmp_path / HOLD_NAME / "held.json").write_text(json.dumps(old))
    held = HeldFiles.load(str(tmp_path))
    assert held is not None
    assert [(e.rel, e.done, e.append) for e in held.entries] == [("a.log", 9, None)]


def test_an_append_record_survives_a_save_and_load(tmp_path: Path) -> None:
    (tmp_path / HOLD_NAME).mkdir()
    (tmp_path / HOLD_NAME / "held.json").write_text(
        json.dumps(
            {
                "version": 1,
                "threshold": 5,
                "entries": [
                    {"rel": "a.log", "link": "0", "base": STAMP, "done": 9},
                    {"rel": "b.log", "link": "1", "base": STAMP},
                ],
            }
        )
    )
    held = HeldFiles.load(str(tmp_path))
    assert held is not None
    held.entries[0].append = _Append(ino=33, size=100, length=14)
    fd = os.open(tmp_path / HOLD_NAME, os.O_RDONLY | os.O_DIRECTORY)
    try:
        held._save(fd)
    finally:
        os.close(fd)
    again = HeldFiles.load(str(tmp_path))
    assert again is not None
    assert [(e.done, e.append) for e in again.entries] == [
        (9, _Append(33, 100, 14)),
        (None, None),
    ]
