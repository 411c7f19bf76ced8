"""Configuration (4): a static tmpfs copy of a directory, bind-mounted over it and rsynced back
to disk at a fixed interval, the way log2ram and the pmxcfs-in-RAM scripts do it:

    mount tmpfs; rsync disk -> RAM; bind the RAM copy over the directory;
    every interval: rsync -aX --inplace --no-whole-file --delete-after RAM/ disk/
    at the end: the same rsync, then unmount.

The disk side is reached through a private bind of the original directory made before the RAM
copy covers it (log2ram's `hdd.log`). The rsync options are log2ram's: --inplace with
--no-whole-file rewrites only the blocks that differ, so an appended log costs its new bytes
only (at the price of files that are torn if the power fails during a sync).
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

RSYNC = ("rsync", "-aX", "--inplace", "--no-whole-file", "--delete-after", "--stats")


def _sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _transferred(stats: str) -> int:
    for line in stats.splitlines():
        if line.startswith("Total transferred file size:"):
            return int(line.split(":")[1].split()[0].replace(",", ""))
    return 0


class TmpfsCopy:
    """The RAM copy of `directory`, with `ram` and `disk` as its tmpfs and disk-side bind (two
    empty directories outside `directory`). `interval` 0: no periodic sync."""

    def __init__(self, directory: Path, ram: Path, disk: Path, interval: float) -> None:
        self.directory = directory
        self.ram = ram
        self.disk = disk
        self.interval = interval
        self.syncs = 0
        self.bytes = 0  # file bytes rsync reported as transferred
        self.seconds = 0.0
        self.error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._mounted: list[Path] = []

    def start(self) -> None:
        self.ram.mkdir(parents=True, exist_ok=True)
        self.disk.mkdir(parents=True, exist_ok=True)
        _sh("mount", "-t", "tmpfs", "-o", "mode=0755,size=1g", "rp-bench-copy", str(self.ram))
        self._mounted.append(self.ram)
        _sh("mount", "--bind", str(self.directory), str(self.disk))
        self._mounted.append(self.disk)
        _sh("mount", "--make-private", str(self.disk))
        _sh("rsync", "-aX", str(self.disk) + "/", str(self.ram) + "/")
        _sh("mount", "--bind", str(self.ram), str(self.directory))
        self._mounted.append(self.directory)
        if self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name="tmpfscopy", daemon=True)
            self._thread.start()

    def sync(self) -> None:
        with self._lock:
            t0 = time.perf_counter()
            out = _sh(*RSYNC, str(self.ram) + "/", str(self.disk) + "/")
            self.seconds += time.perf_counter() - t0
            self.bytes += _transferred(out)
            self.syncs += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except RuntimeError as exc:
                self.error = str(exc)

    def stop(self, final_sync: bool = True) -> None:
        """Stop the timer, write back once more (unless told not to) and unmount."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if final_sync and self.directory in self._mounted:
                self.sync()
        finally:
            for path in reversed(self._mounted):
                subprocess.run(["umount", str(path)], capture_output=True)
            self._mounted.clear()
