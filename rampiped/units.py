"""Figures as a person reads them: durations in the configuration's own units, bytes in binary
units, thresholds as they were written. For log lines, `rampipectl` and the STATUS line."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """Compact duration in the configuration's own units: 500ms, 5s, 2.5s, 2m, 1h30m."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        ms = round(seconds * 1000)
        if ms < 1000:
            return f"{ms}ms" if ms else "0s"
    if seconds < 60 and round(seconds, 1) != round(seconds):
        return f"{round(seconds, 1):g}s"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs or not parts:
        parts.append(f"{secs}s")
    return "".join(parts)


def format_bytes(n: float) -> str:
    """Binary units with one decimal: 512 B, 95.0 MiB, 1.5 GiB."""
    if abs(n) < 1024:
        return f"{round(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024.0
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def format_threshold(x: float) -> str:
    """A configured threshold as the person wrote it: 50, 2.5."""
    return f"{x:g}"
