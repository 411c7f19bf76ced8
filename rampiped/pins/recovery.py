"""Start-up: adopt the pins that survived a crash of the daemon, finish the steps it cut
short, apply what a power cut left in the journal; and write-backs left stranded."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

from rampiped import copymode, mounts, ramarea, writeback
from rampiped.backoff import RETRY
from rampiped.engine import format_bytes, format_duration
from rampiped.pins.dirs import open_dir_nofollow
from rampiped.pins.mode import Mode
from rampiped.pins.model import RETRY_MIN, SOURCE_PREFIX, Pin, PinRefused, Stranded, SyncRecord
from rampiped.pins.windows import Windows

log = logging.getLogger("rampiped")


class Recovery(Windows):
    def reconcile(self) -> list[str]:
        """Adopt pins that survived a daemon crash, finish or undo half-done steps, and apply
        journals left by a power cut. Returns one line per thing done, for the log."""
        done: list[str] = []
        recorded = self.load_state()
        known: dict[str, dict[str, Any]] = {}
        for recorded_path, rec in recorded.items():
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                known[rec["id"]] = dict(rec, path=recorded_path)
        for meta in self._journal_metas():
            known.setdefault(meta["id"], meta)
        for entry in mounts.mountinfo():
            if entry.source.startswith(SOURCE_PREFIX) and entry.mountpoint.startswith(
                os.path.join(self.runtime_dir, "pins") + "/"
            ):
                pid = entry.source[len(SOURCE_PREFIX) :]
                if pid not in known:
                    done.append(f"found mounts of unknown pin {pid} (no record): left alone")
        done += ramarea.reclaim()
        for pid, rec in known.items():
            path, mode = rec.get("path"), rec.get("mode")
            if not isinstance(path, str) or not isinstance(mode, str):
                continue
            kind = self.modes.get(mode)
            if kind is None:
                continue
            try:
                line = kind.reconcile(pid, path, rec)
            except Exception as exc:
                line = self._strand(pid, path, mode, rec, exc)
            if line:
                done.append(line)
            if kind.writes_back:
                done += self.scrub(pid, path, kind)
        self.save_state()
        return done

    def _strand(self, pid: str, path: str, mode: str, rec: dict[str, Any], exc: Exception) -> str:
        """A recovery that failed: record what it leaves stranded, for the status and retries."""
        gen = writeback.latest_generation(self.journal(pid))
        where = gen or (self.ram(pid) if os.path.ismount(self.ram(pid)) else None)
        if where is None:
            line = f"{path}: could not reconcile: {exc}"
            log.error("%s", line)
            return line
        size = copymode.dir_size(where)
        with self.lock:
            self.stranded[path] = Stranded(
                pid,
                path,
                mode,
                where,
                size,
                str(exc),
                time.time(),
                rec,
                retry_at=time.monotonic() + RETRY_MIN,
                backoff=RETRY_MIN,
            )
        line = (
            f"{path}: NOT WRITTEN BACK: {format_bytes(size)} that the directory lacks are only in"
            f" {where}; retrying every {format_duration(RETRY_MIN)} and longer ({exc})"
        )
        log.error("%s", line)
        return line

    def retry_stranded(self, path: str) -> str:
        """Try a stranded write-back again (worker thread). Returns the line to log when it
        completed; raises when it failed again (the record then says when to retry)."""
        st = self.stranded[path]
        try:
            line = self.reconcile_one(st.id, st.path, self.modes[st.mode], st.record)
        except Exception as exc:
            with self.lock:
                st.attempts += 1
                st.error = str(exc)
                st.backoff = RETRY.next(st.backoff)
                st.retry_at = time.monotonic() + st.backoff
            # measured outside the lock: the main loop takes it too, and must not wait for a
            # walk of the generation
            gen = writeback.latest_generation(self.journal(st.id))
            if gen is not None:
                size = copymode.dir_size(gen)
                with self.lock:
                    st.where, st.bytes = gen, size
            raise
        with self.lock:
            self.stranded.pop(path, None)
        scrubbed = self.scrub(st.id, st.path, self.modes[st.mode])
        return "; ".join([line or f"{path}: written back", *scrubbed])

    def scrub(self, pid: str, path: str, kind: Mode) -> list[str]:
        """Remove the temporary files that a crash during a write-back left in the directory
        on disk (and, for an adopted copy pin, in its RAM copy, which checkpoints copy)."""
        pin = self.pins.get(path)
        try:
            if pin is not None and pin.id == pid:
                # nothing of rampiped's writes below a mounted overlay (its lower must not change)
                gone = kind.scrub_mounted(pid)
            else:
                top = mounts.mount_at(path)
                if top is not None and top.source.startswith(SOURCE_PREFIX):
                    return []  # a pin mount left alone (reported above)
                try:
                    fd = open_dir_nofollow(path)
                except (PinRefused, FileNotFoundError):
                    return []
                try:
                    gone = writeback.scrub_leftovers(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            line = f"{path}: could not remove the temporary files a crash left: {exc}"
            log.warning("%s", line)
            return [line]
        if not gone:
            return []
        shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if gone[5:] else "")
        return [f"{path}: removed {len(gone)} temporary files a crash left behind ({shown})"]

    def _journal_metas(self) -> Iterator[dict[str, Any]]:
        try:
            names = sorted(os.listdir(self.journal_dir))
        except FileNotFoundError:
            return
        for name in names:
            try:
                with open(os.path.join(self.journal_dir, name, "pin.json")) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("id") == name:
                yield meta

    def ensure_staging(self, pid: str, path: str, mounted: bool) -> None:
        """The staging bind of `path`, for a write-back found half done at start."""
        if not mounted:
            self.staging_for(pid, path)

    def reconcile_one(self, pid: str, path: str, kind: Mode, rec: dict[str, Any]) -> str:
        """Adopt a pin whose mounts survived a crash of the daemon, finish a step cut short
        (kind.finish_interrupted), or write back what a power cut left (kind.after_power_cut)."""
        mode = kind.name
        top = mounts.mount_at(path)
        covered = top is not None and top.source == SOURCE_PREFIX + pid
        ram_mounted = os.path.ismount(self.ram(pid))
        disk_mounted = os.path.ismount(self.disk(pid))
        state = rec.get("state")
        if covered and ram_mounted and disk_mounted:
            pin = Pin.recorded(
                path,
                pid,
                mode,
                rec,
                state="pinned",
                sync_interval=rec.get("sync_interval"),
                adopted=True,
            )
            last = rec.get("last_sync")
            if isinstance(last, dict):
                with contextlib.suppress(TypeError):
                    pin.last_sync = SyncRecord(**last)
            with self.lock:
                self.pins[path] = pin
            return f"adopted {path} ({mode}, {pin.origin}), pinned before a restart"
        if covered:
            return f"{path}: covered by a pin mount without its RAM layers: left alone"
        if not ram_mounted:
            return kind.after_power_cut(pid, path, disk_mounted)
        # the overlay or bind is gone but the RAM layer is there: an unpin was cut short, or
        # a pin never got as far as its mount
        what = kind.finish_interrupted(pid, path, state, disk_mounted)
        if os.path.ismount(self.disk(pid)):
            mounts.umount(self.disk(pid))
        ramarea.unmount(self.ram(pid))
        shutil.rmtree(self.base(pid), ignore_errors=True)
        writeback.discard_journal(self.journal(pid))
        self.drop_journal(pid, path)
        return f"{path}: finished an interrupted {state or 'pin'}: {what}"
