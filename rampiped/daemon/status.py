"""What the daemon tells: the systemd STATUS line, `rampipectl status --json` (DESIGN.md
section 5 names its fields) and the raw facts behind `rampipectl explain`."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from rampiped import __version__, control, engine, metrics, ramarea
from rampiped.daemon.state import DaemonState


class Status(DaemonState):
    def status_line(self) -> str:
        if self.dry_run:
            return f"dry run: would have {len(self.dry_pins)} pins"
        n = len(self.pinmgr.pins)
        used = self._ram_used()
        at_risk = self.observer.risk_text(time.monotonic())
        stranded = list(self.pinmgr.stranded.values())
        warn = (
            f"NOT WRITTEN BACK: {engine.format_bytes(sum(s.bytes for s in stranded))} of"
            f" {', '.join(s.path for s in stranded)} (see the log); "
            if stranded
            else ""
        )
        blind = "; adaptive pinning off: fanotify not available" if self.fanotify_off else ""
        compressed = ramarea.status_text(
            [self.pinmgr.ram_usage(p) for p in self.pinmgr.pins.values()]
        )
        return f"{warn}{n} pinned, {engine.format_bytes(used)} in RAM{compressed}{at_risk}{blind}"

    def status(self, now: float) -> dict[str, Any]:
        pins_out: list[dict[str, Any]] = []
        wall = time.time()
        for pin in sorted(self.pinmgr.pins.values(), key=lambda p: p.path):
            last = pin.last_sync
            dirty = self.observer.dirty(pin, now, max_age=1.0)
            usage = self.pinmgr.ram_usage(pin)
            pins_out.append(
                {
                    "path": pin.path,
                    "mode": pin.mode,
                    "state": pin.state,
                    "static": pin.static,
                    "origin": pin.origin,
                    "rate": round(self.rates.rate(pin.path, now), 3),
                    "ram_bytes": usage.ram,
                    **ramarea.status_fields(usage),
                    "dirty_bytes": dirty.bytes,
                    "data_at_risk_s": round(metrics.at_risk(dirty, wall), 1),
                    "pinned_since": _iso(pin.pinned_wall),
                    "last_sync": None
                    if last is None
                    else {
                        "time": _iso(last.time),
                        "ok": last.ok,
                        "seconds": round(last.seconds, 3),
                        "files": last.files,
                        "bytes": last.bytes,
                        "whole_file_bytes": last.whole_bytes,
                        "error": last.error,
                    },
                    "written_bytes": pin.written_bytes,
                    "whole_file_bytes": pin.whole_file_bytes,
                    "holders": pin.holders,
                    "error": pin.error,
                }
            )
        snapshot = self.rates.snapshot(now)
        candidates = []
        for path, rate in self.engine.top(snapshot, 10):
            info = self.engine.explain(path, now)
            candidates.append(
                {
                    "path": path,
                    "rate": round(rate, 3),
                    "pinned": path in self.pinmgr.pins,
                    "blocked": info.get("blocked"),
                }
            )
        used = sum(p["ram_bytes"] for p in pins_out)
        return {
            "version": __version__,
            "protocol": control.PROTOCOL,
            "pid": os.getpid(),
            "dry_run": self.dry_run,
            "config": self.cfg.source,
            "uptime_s": round(now - self.started, 1),
            "stopping": self.stopping,
            "ram": {
                "max_bytes": self._ram_limit(self.cfg),
                "used_bytes": used,
                "stored_bytes": sum(p["stored_bytes"] for p in pins_out),
                "available_bytes": psutil.virtual_memory().available,
            },
            "monitor": {"lost_events": self.lost_events, **self.monitor.stats()},
            # on: pins are made and unpinned by write rate; off: `reason` says why
            "adaptive_pinning": {
                "on": self.adaptive_off() is None,
                "reason": self.adaptive_off(),
                "fanotify": self.fanotify_off is None,
            },
            "pins": pins_out,
            "candidates": candidates,
            # write-backs found unfinished at start that could not complete: what the
            # directory lacks is only in `where` (a journal generation, or a RAM copy)
            "stranded": [
                {
                    "path": s.path,
                    "mode": s.mode,
                    "where": s.where,
                    "bytes": s.bytes,
                    "error": s.error,
                    "since": _iso(s.since),
                    "attempts": s.attempts,
                    "next_retry_s": round(max(0.0, s.retry_at - now), 1),
                }
                for s in sorted(self.pinmgr.stranded.values(), key=lambda s: s.path)
            ],
        }

    def explain(self, path: str, now: float) -> dict[str, Any]:
        """The raw facts behind `path`'s state (rampipectl explain puts them in sentences).
        Times are this host's monotonic clock, like `now`."""
        a = self.cfg.adaptive
        vm = psutil.virtual_memory()
        max_bytes = self._ram_limit(self.cfg)
        pin = self.pinmgr.pins.get(path)
        pin_facts: dict[str, Any] | None = None
        if pin is not None:
            dirty = self.observer.dirty(pin, now, max_age=1.0)
            pin_facts = {
                "mode": pin.mode,
                "origin": pin.origin,
                "state": pin.state,
                "ram_bytes": self.pinmgr.ram_bytes(pin),
                "dirty_bytes": dirty.bytes,
                "data_at_risk_s": round(metrics.at_risk(dirty, time.time()), 1),
                "holders": pin.holders,
                "error": pin.error,
                "retry_at": pin.retry_at if pin.retry_at > now else None,
                "unpin_requested": pin.unpin_requested,
                "sync_interval": pin.sync_interval,
                "last_sync_at": pin.last_sync_mono,
            }
        return {
            "path": path,
            "now": now,
            "rate": self.rates.rate(path, now),
            **self.engine.explain(path, now),
            "candidate": self.attributor.candidate(path),
            "pending": self.pending.get(path),
            "last_refusal": self.last_refusal.get(path),
            "pin": pin_facts,
            # fanotify refused here: why (adaptive pinning is off, whatever `enabled` says)
            "fanotify_off": self.fanotify_off,
            "adaptive": {
                "enabled": a.enabled,
                "watch": [{"path": w.path, "depth": w.depth} for w in a.watch],
                "exclude": list(a.exclude),
                "pin_above": a.pin_above,
                "hot_for": a.hot_for,
                "unpin_below": a.unpin_below,
                "cool_for": a.cool_for,
                "max_pins": a.max_pins,
                "adaptive_pins": sum(1 for p in self.pinmgr.pins.values() if not p.static),
            },
            "sync_interval": self.cfg.sync.interval,
            "budget": {
                "used_bytes": self._ram_used(),
                "max_bytes": max_bytes,
                "high_watermark": self.cfg.ram.high_watermark,
                "available_bytes": vm.available,
                "min_free_bytes": self.cfg.ram.min_free,
                "pressure": self.engine.pressure,
            },
        }


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(wall))
