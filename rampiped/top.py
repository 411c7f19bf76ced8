"""`rampipectl top`: the hottest directories, live, like iotop for directories.

Every `interval` seconds it asks the daemon for its status and redraws the screen with plain
ANSI sequences (alternate screen, cursor home, clear to end of line): no curses, so nothing to
get wrong with terminfo on a minimal system, and the output under a pseudo-terminal is plain
enough to test. `q` or Ctrl-C ends it. When stdout is not a terminal it prints one snapshot
and exits, for scripts and logs.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from rampiped.engine import format_bytes, format_duration
from rampiped.errors import RampipeError

__all__ = ["Row", "frame", "rows", "run"]

_ALT_SCREEN_ON, _ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"
_CURSOR_OFF, _CURSOR_ON = "\x1b[?25l", "\x1b[?25h"
_HOME, _CLEAR_EOL, _CLEAR_EOS = "\x1b[H", "\x1b[K", "\x1b[J"


@dataclass(frozen=True)
class Row:
    path: str
    state: str  # pinned, pinning, draining, blocked, watched
    mode: str  # overlay, copy, or "" for a directory that is not pinned
    rate: float
    ram_bytes: int | None
    dirty_bytes: int | None
    at_risk_s: float | None
    note: str


def rows(status: Mapping[str, Any]) -> list[Row]:
    """Pins and the hottest candidates, hottest first."""
    out: dict[str, Row] = {}
    for p in status.get("pins", []):
        note = p.get("error") or ""
        out[p["path"]] = Row(
            path=p["path"],
            state=p["state"],
            mode=p["mode"],
            rate=float(p.get("rate") or 0.0),
            ram_bytes=p.get("ram_bytes"),
            dirty_bytes=p.get("dirty_bytes"),
            at_risk_s=p.get("data_at_risk_s"),
            note=str(note),
        )
    for c in status.get("candidates", []):
        if c["path"] in out:
            continue
        blocked = c.get("blocked")
        out[c["path"]] = Row(
            path=c["path"],
            state="blocked" if blocked else "watched",
            mode="",
            rate=float(c.get("rate") or 0.0),
            ram_bytes=None,
            dirty_bytes=None,
            at_risk_s=None,
            note=str(blocked or ""),
        )
    return sorted(out.values(), key=lambda r: (-r.rate, r.path))


def _fit(text: str, width: int) -> str:
    """`text` in at most `width` columns; long paths keep their end (the part that differs)."""
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    return "..." + text[-(width - 3) :]


def frame(status: Mapping[str, Any], width: int, height: int) -> list[str]:
    """The lines of one screen (at most `height`, each at most `width` columns)."""
    pins = status.get("pins", [])
    ram = status.get("ram", {})
    mon = status.get("monitor", {})
    dirty = sum(int(p.get("dirty_bytes") or 0) for p in pins)
    oldest = max((float(p.get("data_at_risk_s") or 0.0) for p in pins), default=0.0)
    risk = (
        f"{format_bytes(dirty)} at risk (oldest {format_duration(round(oldest))})"
        if dirty or oldest
        else "nothing at risk"
    )
    flags = ("  DRY RUN" if status.get("dry_run") else "") + (
        "  STOPPING" if status.get("stopping") else ""
    )
    lines = [
        f"rampiped {status.get('version', '?')}  pid {status.get('pid', '?')}  up"
        f" {format_duration(round(float(status.get('uptime_s') or 0)))}{flags}",
        f"{len(pins)} pinned, {format_bytes(int(ram.get('used_bytes') or 0))} of"
        f" {format_bytes(int(ram.get('max_bytes') or 0))} in RAM, {risk}",
        f"monitor: {mon.get('events', 0)} events, {mon.get('lost_events', 0)} overflows"
        f"; MemAvailable {format_bytes(int(ram.get('available_bytes') or 0))}",
        "",
    ]
    # the columns after the path (STATE MODE RATE RAM AT-RISK OLDEST, each with its space,
    # and two before NOTE); a note gets at least 12 columns when the terminal allows
    fixed = 10 + 9 + 11 + 11 + 11 + 9 + 2
    table = rows(status)
    longest = max((len(r.path) for r in table), default=0)
    path_w = max(20, min(longest, width - fixed - 12))
    lines.append(
        f"{'DIRECTORY':<{path_w}} {'STATE':<9} {'MODE':<8} {'RATE/s':>10} {'RAM':>10}"
        f" {'AT RISK':>10} {'OLDEST':>8}  NOTE"
    )
    if not table:
        lines.append("(no directory is being written to)")
    for r in table:
        ram_text = format_bytes(r.ram_bytes) if r.ram_bytes is not None else "-"
        dirty_text = format_bytes(r.dirty_bytes) if r.dirty_bytes is not None else "-"
        age = format_duration(round(r.at_risk_s)) if r.at_risk_s else "-"
        lines.append(
            f"{_fit(r.path, path_w):<{path_w}} {r.state:<9} {r.mode or '-':<8} {r.rate:>10.1f}"
            f" {ram_text:>10} {dirty_text:>10} {age:>8}  {r.note}"
        )
    body = lines[: max(1, height - 1)]
    return [line[:width] for line in body]


def _size() -> tuple[int, int]:
    size = shutil.get_terminal_size((100, 24))
    return max(40, size.columns), max(5, size.lines)


def snapshot(fetch: Callable[[], Mapping[str, Any]], out: TextIO) -> int:
    width, _ = _size() if out.isatty() else (200, 0)
    for line in frame(fetch(), width, 10_000):
        out.write(line.rstrip() + "\n")
    out.flush()
    return 0


def run(
    fetch: Callable[[], Mapping[str, Any]],
    *,
    interval: float = 1.0,
    out: TextIO | None = None,
    keys: TextIO | None = None,
) -> int:
    """Redraw every `interval` seconds until `q` or Ctrl-C. A daemon that stops answering is
    shown as such, and top keeps trying."""
    out = out or sys.stdout
    keys = keys or sys.stdin
    if not out.isatty():
        return snapshot(fetch, out)
    key_fd: int | None = None
    saved: list[Any] | None = None
    with contextlib.suppress(OSError, ValueError, termios.error):
        if keys.isatty():
            key_fd = keys.fileno()
            saved = termios.tcgetattr(key_fd)
            tty.setcbreak(key_fd)  # keys arrive one by one; Ctrl-C still raises
    out.write(_ALT_SCREEN_ON + _CURSOR_OFF)
    try:
        while True:
            width, height = _size()
            try:
                lines = frame(fetch(), width, height)
            except (RampipeError, OSError) as exc:
                lines = [f"rampipectl top: {exc}", "", "trying again every second; q quits"]
            out.write(_HOME + "".join(line + _CLEAR_EOL + "\r\n" for line in lines) + _CLEAR_EOS)
            out.flush()
            if _wait_for_quit(key_fd, interval):
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        out.write(_CURSOR_ON + _ALT_SCREEN_OFF)
        out.flush()
        if key_fd is not None and saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(key_fd, termios.TCSADRAIN, saved)


def _wait_for_quit(key_fd: int | None, interval: float) -> bool:
    """Wait `interval` seconds; True as soon as `q` is pressed."""
    deadline = time.monotonic() + interval
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if key_fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([key_fd], [], [], left)
        if ready:
            data = os.read(key_fd, 64)
            if not data or b"q" in data.lower():
                return True
