"""rampipectl top: the rows and the screen built from a status reply (the terminal handling is
tested under a pseudo-terminal in tests/system/test_observability.py)."""

from __future__ import annotations

import io
from typing import Any

from rampiped import top

STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "pid": 4242,
    "uptime_s": 3725.0,
    "dry_run": False,
    "stopping": False,
    "ram": {"used_bytes": 43201331, "max_bytes": 268435456, "available_bytes": 1288490188},
    "monitor": {"events": 123456, "lost_events": 0},
    "pins": [
        {
            "path": "/var/log/nginx",
            "mode": "overlay",
            "state": "pinned",
            "rate": 812.34,
            "ram_bytes": 43201331,
            "dirty_bytes": 1363148,
            "data_at_risk_s": 42.4,
            "error": None,
        },
        {
            "path": "/var/lib/pve-cluster",
            "mode": "copy",
            "state": "pinned",
            "rate": 3.0,
            "ram_bytes": 0,
            "dirty_bytes": 0,
            "data_at_risk_s": 0.0,
            "error": None,
        },
    ],
    "candidates": [
        {"path": "/var/log/nginx", "rate": 812.34, "pinned": True, "blocked": None},
        {
            "path": "/var/log/apt",
            "rate": 90.0,
            "pinned": False,
            "blocked": "cannot pin /var/log/apt: in use by pid 9 (apt): fd 3 /var/log/apt/term.log",
        },
        {"path": "/var/log/cups", "rate": 1.5, "pinned": False, "blocked": None},
    ],
}


def test_rows_hottest_first_pins_and_candidates_once() -> None:
    rows = top.rows(STATUS)
    assert [(r.path, r.state, r.mode) for r in rows] == [
        ("/var/log/nginx", "pinned", "overlay"),
        ("/var/log/apt", "blocked", ""),
        ("/var/lib/pve-cluster", "pinned", "copy"),
        ("/var/log/cups", "watched", ""),
    ]
    assert rows[0].at_risk_s == 42.4
    assert rows[1].ram_bytes is None
    assert rows[1].note.startswith("cannot pin /var/log/apt: in use by pid 9")


def test_frame() -> None:
    lines = top.frame(STATUS, 120, 40)
    assert lines[0] == "rampiped 0.1.0  pid 4242  up 1h2m5s"
    assert lines[1] == "2 pinned, 41.2 MiB of 256.0 MiB in RAM, 1.3 MiB at risk (oldest 42s)"
    assert lines[2] == "monitor: 123456 events, 0 overflows; MemAvailable 1.2 GiB"
    assert lines[4].split() == [
        "DIRECTORY", "STATE", "MODE", "RATE/s", "RAM", "AT", "RISK", "OLDEST", "NOTE"
    ]  # fmt: skip
    assert lines[5].split()[:8] == [
        "/var/log/nginx", "pinned", "overlay", "812.3", "41.2", "MiB", "1.3", "MiB"
    ]  # fmt: skip
    assert lines[5].split()[8] == "42s"
    assert lines[6].split()[:6] == ["/var/log/apt", "blocked", "-", "90.0", "-", "-"]
    assert all(len(line) <= 120 for line in lines)


def test_frame_fits_a_small_terminal() -> None:
    lines = top.frame(STATUS, 50, 7)
    assert len(lines) == 6
    assert all(len(line) <= 50 for line in lines)


def test_long_paths_keep_their_end() -> None:
    status = dict(STATUS, pins=[dict(STATUS["pins"][0], path="/srv/" + "x" * 100 + "/logs")])
    row = [line for line in top.frame(status, 100, 40) if "logs" in line]
    assert row and row[0].startswith("...") and "x/logs " in row[0]


def test_nothing_to_show() -> None:
    status = dict(STATUS, pins=[], candidates=[])
    lines = top.frame(status, 100, 40)
    assert lines[1] == "0 pinned, 41.2 MiB of 256.0 MiB in RAM, nothing at risk"
    assert lines[-1] == "(no directory is being written to)"


def test_not_a_terminal_prints_one_snapshot() -> None:
    out = io.StringIO()
    calls = []

    def fetch() -> dict[str, Any]:
        calls.append(1)
        return STATUS

    assert top.run(fetch, out=out) == 0
    assert len(calls) == 1
    text = out.getvalue()
    assert "\x1b" not in text
    assert text.splitlines()[0] == "rampiped 0.1.0  pid 4242  up 1h2m5s"
    assert "/var/log/apt" in text
