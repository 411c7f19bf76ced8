"""`rampipectl explain DIR`: the daemon's raw facts about a directory, as sentences.

Pure: takes the reply of the daemon's `explain` command (Daemon.explain: the engine's timers in
the daemon's monotonic clock with that clock's `now`, the pin, the last refusal, the thresholds
and the RAM budget) and returns lines a person reads, such as

    rate 812.3/s is above pin_above 50/s since 3.2s (hot_for 5s): pins in 1.8s
    blocked: in use by pid 123 (rsyslogd, rsyslog.service): fd 5 /var/log/syslog; retry in 40s
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rampiped.engine import format_bytes, format_duration

__all__ = ["sentences"]


def _num(x: float) -> str:
    return f"{x:g}"


def _rate(x: float) -> str:
    return f"{x:.1f}/s"


def _dur(seconds: float) -> str:
    return format_duration(max(0.0, seconds))


def _strip_path(reason: str, path: str) -> str:
    """ "cannot pin /x: in use by ..." and "/x is in use by ..." -> "in use by ..." (the
    sentence names /x already)."""
    for prefix in (f"cannot pin {path}: ", f"{path} is "):
        if reason.startswith(prefix):
            return reason[len(prefix) :]
    return reason


def sentences(f: Mapping[str, Any]) -> list[str]:
    path = str(f["path"])
    now = float(f["now"])
    rate = float(f.get("rate") or 0.0)
    a: Mapping[str, Any] = f.get("adaptive") or {}
    pin: Mapping[str, Any] | None = f.get("pin")
    out: list[str] = []

    # -- what it is now
    if pin is not None:
        state = pin["state"]
        what = {"pinning": "being pinned", "draining": "being written back and unpinned"}.get(
            state, "pinned"
        )
        out.append(f"{path} is {what} ({pin['mode']} mode, {_origin(pin['origin'])}).")
    elif f.get("pending") == "pin":
        out.append(f"{path} is not pinned yet: its pin is under way.")
    else:
        out.append(f"{path} is not pinned.")

    # -- is its rate even counted
    candidate = f.get("candidate")
    blocked = f.get("blocked")
    blind = f.get("fanotify_off")
    if blind:
        # no write is seen at all: no rate, no threshold applies
        out.append(
            f"adaptive pinning is off: fanotify is not available here ({blind}); static and"
            " manual pins work"
        )
        if pin is not None:
            out.extend(_blind_pin(pin))
            out.extend(_pin_facts(f, pin, path, now))
        elif f.get("last_refusal") or f.get("retry_at"):
            out.extend(_blocked(f, path, now))
        out.append(_budget(f, a))
        return out
    if candidate is None and pin is None:
        excluded = isinstance(blocked, str) and "exclude" in blocked
        if not excluded:
            roots = ", ".join(f"{w['path']} (depth {w['depth']})" for w in a.get("watch", []))
            out.append(
                "its writes are not counted: it is not a candidate directory"
                f" (watch roots: {roots or 'none'})"
            )
    elif candidate is not None and candidate != path:
        out.append(f"its writes count towards {candidate}, the candidate directory above it")

    # -- the rate against the thresholds
    if pin is not None:
        out.extend(_pinned_rate(f, pin, rate, now, a))
    elif candidate == path:
        out.extend(_unpinned_rate(f, rate, now, a))

    # -- why not
    if pin is None:
        out.extend(_blocked(f, path, now))

    # -- the pin itself
    if pin is not None:
        out.extend(_pin_facts(f, pin, path, now))

    out.append(_budget(f, a))
    return out


def _blind_pin(pin: Mapping[str, Any]) -> list[str]:
    if pin["origin"] == "manual":
        return ["stays pinned until rampipectl unpin"]
    if pin["origin"] == "adaptive":
        # pinned while fanotify worked (an earlier start): no event is no sign of cooling
        return ["its writes cannot be counted: stays pinned until rampipectl unpin or a stop"]
    return ["stays pinned while rampiped runs"]


def _origin(origin: str) -> str:
    return {
        "adaptive": "pinned for its write rate",
        "static": "a static pin of the configuration",
        "manual": "pinned by hand with rampipectl pin",
    }.get(origin, origin)


def _unpinned_rate(
    f: Mapping[str, Any], rate: float, now: float, a: Mapping[str, Any]
) -> list[str]:
    if not a.get("enabled", True):
        return [f"rate {_rate(rate)}; adaptive pinning is off (adaptive.enabled: false)"]
    above = float(a["pin_above"])
    hot_for = float(a["hot_for"])
    head = f"rate {_rate(rate)} is"
    hot_since = f.get("hot_since")
    if rate <= above:
        return [f"{head} below pin_above {_num(above)}/s: not hot enough to pin"]
    if hot_since is None:
        return [
            f"{head} above pin_above {_num(above)}/s: counted as hot from the next decision"
            f" (hot_for {_dur(hot_for)})"
        ]
    held = now - float(hot_since)
    eligible_at = float(f.get("eligible_at") or float(hot_since) + hot_for)
    text = f"{head} above pin_above {_num(above)}/s since {_dur(held)} (hot_for {_dur(hot_for)}): "
    free = not f.get("blocked") and not f.get("last_refusal")
    if now < eligible_at:
        verb = "pins in" if free else "eligible in"
        return [text + f"{verb} {_dur(eligible_at - now)}"]
    if free:
        return [text + "pins at the next decision"]
    return [text + "hot long enough to pin"]


def _blocked(f: Mapping[str, Any], path: str, now: float) -> list[str]:
    refusal = f.get("last_refusal")
    retry_at = f.get("retry_at")
    refusals = int(f.get("refusals") or 0)
    blocked = f.get("blocked")
    if refusal:
        reason = _strip_path(str(refusal), path)
        times = f" (refused {refusals} times)" if refusals > 1 else ""
        if retry_at is not None and float(retry_at) > now:
            return [f"blocked: {reason}; retry in {_dur(float(retry_at) - now)}{times}"]
        if not blocked or str(refusal) in str(blocked):
            return [f"last attempt refused: {reason}; tried again when it is next due{times}"]
    if blocked:
        return [f"blocked: {blocked}"]
    return []


def _pinned_rate(
    f: Mapping[str, Any], pin: Mapping[str, Any], rate: float, now: float, a: Mapping[str, Any]
) -> list[str]:
    if pin["origin"] != "adaptive":
        if pin["origin"] == "manual":
            return [f"rate {_rate(rate)}; stays pinned until rampipectl unpin"]
        return [f"rate {_rate(rate)}; stays pinned while rampiped runs"]
    below = float(a["unpin_below"])
    cool_for = float(a["cool_for"])
    head = f"rate {_rate(rate)} is"
    cool_since = f.get("cool_since")
    if cool_since is None:
        return [f"{head} not below unpin_below {_num(below)}/s: stays pinned"]
    held = now - float(cool_since)
    unpin_at = float(f.get("unpin_at") or float(cool_since) + cool_for)
    text = (
        f"{head} below unpin_below {_num(below)}/s since {_dur(held)} (cool_for {_dur(cool_for)}): "
    )
    if now < unpin_at:
        return [text + f"unpins in {_dur(unpin_at - now)}"]
    return [text + "unpins at the next decision"]


def _pin_facts(f: Mapping[str, Any], pin: Mapping[str, Any], path: str, now: float) -> list[str]:
    out = []
    dirty = int(pin.get("dirty_bytes") or 0)
    age = float(pin.get("data_at_risk_s") or 0.0)
    ram = format_bytes(int(pin.get("ram_bytes") or 0))
    if dirty or age:
        out.append(
            f"in RAM: {ram}; not yet on disk: {format_bytes(dirty)}, the oldest change"
            f" {_dur(age)} ago"
        )
    else:
        out.append(f"in RAM: {ram}; everything is on disk")
    interval = pin.get("sync_interval")
    if interval is None:
        interval = f.get("sync_interval")
    last = pin.get("last_sync_at")
    parts = []
    if last is not None:
        parts.append(f"last checkpoint {_dur(now - float(last))} ago")
    else:
        parts.append("no checkpoint yet")
    if interval:
        parts.append(f"one every {_dur(float(interval))}")
    else:
        parts.append("no periodic checkpoints (written back at unpin, stop and rampipectl sync)")
    out.append("; ".join(parts))
    error = pin.get("error")
    retry_at = pin.get("retry_at")
    if error:
        retry = f"; retry in {_dur(float(retry_at) - now)}" if retry_at is not None else ""
        out.append(f"unpin blocked: {_strip_path(str(error), path)}{retry}")
    return out


def _budget(f: Mapping[str, Any], a: Mapping[str, Any]) -> str:
    b: Mapping[str, Any] = f.get("budget") or {}
    used = int(b.get("used_bytes") or 0)
    max_bytes = int(b.get("max_bytes") or 0)
    high = float(b.get("high_watermark") or 0.0)
    text = (
        f"RAM budget: pins use {format_bytes(used)} of {format_bytes(max_bytes)}"
        f" (high watermark {_num(high * 100)}% = {format_bytes(high * max_bytes)});"
        f" MemAvailable {format_bytes(int(b.get('available_bytes') or 0))}"
        f" (min_free {format_bytes(int(b.get('min_free_bytes') or 0))});"
        f" adaptive pins: {a.get('adaptive_pins', 0)} of max_pins {a.get('max_pins', 0)}"
    )
    if b.get("pressure"):
        text += f"; short of RAM: {b['pressure']}"
    return text
