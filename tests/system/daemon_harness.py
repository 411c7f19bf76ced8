"""Runs the real daemon as a child process on a loop filesystem, reads its log, and talks to it
with the real rampipectl. Writers are separate processes, outside the daemon's process tree."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.system.helpers import LoopFs, make_loopfs, mountinfo, unmount_tree, wait_for

VENV_BIN = Path(sys.executable).parent


@dataclass
class Env:
    """A disk (loop ext4) with a watch root `data`, a journal dir, and a runtime tmpfs."""

    tmp: Path
    disk: LoopFs
    data: Path
    journal: Path
    runtime: Path
    config_path: Path
    config: dict[str, Any] = field(default_factory=dict)

    def write_config(self, **overrides: Any) -> None:
        cfg = {
            "runtime_dir": str(self.runtime),
            "journal_dir": str(self.journal),
            "ram": {"max": "256M", "min_free": "64M"},
            "sync": {"interval": 0},
            "adaptive": {
                "watch": [{"path": str(self.data), "depth": 1}],
                "half_life": "1s",
                "pin_above": 50,
                "hot_for": "1s",
                "unpin_below": 5,
                "cool_for": "2s",
                "max_pins": 4,
            },
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}  # type: ignore[dict-item]
            else:
                cfg[key] = value
        self.config = cfg
        self.config_path.write_text(yaml.safe_dump(cfg))

    def overlay_at(self, path: Path) -> bool:
        return any(m["mountpoint"] == str(path) and m["fstype"] == "overlay" for m in mountinfo())

    def mounted_at(self, path: Path) -> dict[str, str] | None:
        found = None
        for m in mountinfo():
            if m["mountpoint"] == str(path):
                found = m
        return found

    def ctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(VENV_BIN / "rampipectl"), "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"rampipectl {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
            )
        return proc

    def pin_while_written(self, path: Path, timeout: float = 30.0) -> None:
        """`rampipectl pin` of a directory a Writer keeps writing to: a refusal because the
        writer had a file open at that very moment is right (its write would bypass RAM), so
        try again until the pin is made."""
        last: list[str] = []

        def made() -> bool:
            proc = self.ctl("pin", str(path))
            last[:] = [proc.stderr]
            if (
                proc.returncode != 0
                and "in use by" not in proc.stderr
                and "opened on disk during the pin" not in proc.stderr
            ):
                raise AssertionError(f"rampipectl pin {path}: {proc.stderr}")
            return proc.returncode == 0

        try:
            wait_for(made, timeout, f"the pin of {path}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last refusal: {last}") from None

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.ctl("status", "--json", check=True).stdout)
        return out


class Daemon:
    def __init__(self, env: Env, *extra: str, prefix: Sequence[str] = ()) -> None:
        """`prefix`: a command that runs the daemon (a launcher that restricts it)."""
        self.env = env
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                *prefix,
                str(VENV_BIN / "rampiped"),
                "--config",
                str(env.config_path),
                "--log-level",
                "debug",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={
                k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")
            },
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        rx = re.compile(pattern)

        def find() -> re.Match[str] | None:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode} before logging"
                    f" {pattern!r}:\n{self.log_text()}"
                )
            return None

        try:
            found: re.Match[str] = wait_for(find, timeout, f"log line {pattern!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon log ---\n{self.log_text()}") from None
        return found

    def wait_ready(self) -> None:
        self.wait_log(r"rampiped \S+ started")
        if "--dry-run" not in self.proc.args:  # type: ignore[operator]
            wait_for(
                lambda: os.path.exists(self.env.runtime / "control.sock"), 10, "the control socket"
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)


@contextlib.contextmanager
def make_env(tmp: Path, disk_mb: int = 256, inodes: int | None = None) -> Iterator[Env]:
    with make_loopfs(tmp / "disk", size_mb=disk_mb, inodes=inodes) as disk:
        runtime = tmp / "run"
        runtime.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "rp-run", str(runtime)], check=True
        )
        data = disk.mountpoint / "data"
        data.mkdir()
        journal = disk.mountpoint / "journal"
        env = Env(tmp, disk, data, journal, runtime / "rampiped", tmp / "rampipe.conf")
        env.write_config()
        try:
            yield env
        finally:
            unmount_tree(tmp)


def journal_on_another_mount(env: Env) -> Env:
    """`env` with its journal on the same disk reached through a bind mount of a directory of
    it: one filesystem, two mounts. link(2) does not cross mounts, so an overlay write-back
    then copies the journal into place instead of linking it, and the changed data must fit
    twice. make_env's clean-up unmounts the bind."""
    src = env.disk.mountpoint / "journal-src"
    src.mkdir()
    bind = env.tmp / "journal-bind"
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(bind)], check=True)
    moved = dataclasses.replace(env, journal=bind / "journal")
    moved.write_config()
    return moved


@contextlib.contextmanager
def running(env: Env, *extra: str, prefix: Sequence[str] = ()) -> Iterator[Daemon]:
    d = Daemon(env, *extra, prefix=prefix)
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


WRITER = r"""
import os, sys, time
root, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
os.makedirs(root, exist_ok=True)
n = 0
start = time.monotonic()
stop_file = os.path.join(os.path.dirname(root.rstrip('/')), '.stop-' + os.path.basename(root))
print('ready', flush=True)
while time.monotonic() - start < seconds and not os.path.exists(stop_file):
    name = os.path.join(root, 'f%03d.log' % (n % 50))
    with open(name, 'a') as f:
        f.write('line %d\n' % n)
    n += 1
    due = start + n / rate
    delay = due - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(n, flush=True)
"""


class Writer:
    """A separate process appending lines at `rate` operations/s (each is open+write+close:
    about three events)."""

    def __init__(self, root: Path, rate: float, seconds: float = 600) -> None:
        self.root = root
        self.stop_file = root.parent / (".stop-" + root.name)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(rate), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> int:
        self.stop_file.touch()
        try:
            assert self.proc.stdout is not None
            out = self.proc.stdout.read()
            self.proc.wait(30)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.stop_file.unlink()
        return int(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# The way loggers write: open(O_APPEND), a line, fsync, close; `rate` times a second into one
# file until the stop file exists. Each file is held only while a line goes in.
FSYNC_LOGGER = r"""
import os, sys, time
path, rate, stop = sys.argv[1], float(sys.argv[2]), sys.argv[3]
os.makedirs(os.path.dirname(path), exist_ok=True)
print('ready', flush=True)
n, start = 0, time.monotonic()
while not os.path.exists(stop):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b'line %06d\n' % n)
        os.fsync(fd)
    finally:
        os.close(fd)
    n += 1
    delay = start + n / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(n, flush=True)
"""


class FsyncLogger(Writer):
    """A separate process running FSYNC_LOGGER into `path` (`stop` returns the lines written)."""

    def __init__(self, path: Path, rate: float = 200) -> None:  # no super(): another script
        self.root = path.parent
        self.stop_file = path.parent.parent / (".stop-" + path.parent.name)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FSYNC_LOGGER, str(path), str(rate), str(self.stop_file)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    @staticmethod
    def expected(lines: int) -> bytes:
        return b"".join(b"line %06d\n" % n for n in range(lines))
