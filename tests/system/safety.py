"""Shared pieces of the safety tests (tests/system/test_safety_*.py, and the write-back window
tests that drive the daemon through its pause points): the tally that the run's last lines
report, files that tell whether they are whole, faults (kill -9, power cut, a failing rsync),
and the daemon paused at a stage.

The tally is filled by the tests as they check outcomes (before asserting, so that a failing
run reports its losses too) and printed by `pytest_terminal_summary` in conftest.py:

    safety: 14 crash points, 6 power cuts, 5 disk faults, 40 bad inputs, 32 stamp-blind changes:
    0 files lost, 0 torn
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import pytest

from tests.system.daemon_harness import VENV_BIN, Daemon, Env, make_env, running
from tests.system.helpers import mountinfo, wait_for

TALLY: dict[str, int] = {
    "crash points": 0,
    "power cuts": 0,
    "disk faults": 0,
    "bad inputs": 0,
    # changes that size and mtime do not show (cp -p, touch -d, mmap stores, ln -f look-alikes)
    "stamp-blind changes": 0,
    "files lost": 0,
    "torn": 0,
}


def count(key: str, n: int = 1) -> None:
    TALLY[key] += n


def summary_line() -> str | None:
    cases = ("crash points", "power cuts", "disk faults", "bad inputs", "stamp-blind changes")
    if not any(TALLY[k] for k in cases):
        return None
    return (
        f"safety: {TALLY['crash points']} crash points, {TALLY['power cuts']} power cuts, "
        f"{TALLY['disk faults']} disk faults, {TALLY['bad inputs']} bad inputs, "
        f"{TALLY['stamp-blind changes']} stamp-blind changes: "
        f"{TALLY['files lost']} files lost, {TALLY['torn']} torn"
    )


# --- files that know whether they are whole ------------------------------------------------

MAGIC = b"rampiped-safety"


def content(name: str, version: int, size: int = 20_000) -> bytes:
    """A header naming the file, its version and the hash of the body, then the body."""
    seed = f"{name}:{version}".encode()
    body = (hashlib.sha256(seed).hexdigest().encode() * (size // 64 + 1))[:size]
    digest = hashlib.sha256(body).hexdigest()
    return MAGIC + f" {name} {version} {len(body)} {digest}\n".encode() + body


def write_version(path: Path, name: str, version: int, size: int = 20_000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(content(name, version, size))


def read_version(path: Path) -> int | None:
    """The version a file holds, or None when it is torn (header and body disagree)."""
    data = path.read_bytes()
    head, _, body = data.partition(b"\n")
    parts = head.split(b" ")
    if len(parts) != 5 or parts[0] != MAGIC:
        return None
    _magic, _name, version, length, digest = parts
    if len(body) != int(length) or hashlib.sha256(body).hexdigest().encode() != digest:
        return None
    return int(version)


def check_tree(root: Path, expected: Mapping[str, int], minimum: bool = False) -> list[str]:
    """Compare the versioned files below `root` with `expected` (relative path -> version)
    and count what is lost or torn. With `minimum`, a newer version than expected is fine (a
    checkpoint may have caught later writes). Returns the problems."""
    problems = []
    lost = torn = 0
    for rel, want in sorted(expected.items()):
        path = root / rel
        if not path.is_file():
            lost += 1
            problems.append(f"{rel}: lost (expected version {want})")
            continue
        have = read_version(path)
        if have is None:
            torn += 1
            problems.append(f"{rel}: torn")
        elif have < want or (have != want and not minimum):
            lost += 1
            problems.append(f"{rel}: version {have}, expected {want}")
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        unexpected = path.is_file() and rel not in expected
        if unexpected and path.read_bytes().startswith(MAGIC):
            if read_version(path) is None:
                torn += 1
                problems.append(f"{rel}: torn (not expected at all)")
            elif not minimum:
                problems.append(f"{rel}: on disk but not expected (a deletion was lost)")
    count("files lost", lost)
    count("torn", torn)
    return problems


# --- faults --------------------------------------------------------------------------------


def pin_mounts(prefix: str = "rampiped-") -> list[dict[str, str]]:
    """Mounts made by rampiped for pins (their source names the pin), the pins' parent
    excluded."""
    return [m for m in mountinfo() if m["source"].startswith(prefix)]


def drop_ram(run_mount: Path, data_root: Path) -> None:
    """What a power cut does to rampiped's RAM side: every mount of a pin over a directory and
    the whole runtime tmpfs go, without any write-back; an empty tmpfs comes back (as /run
    after a boot)."""
    for m in reversed(mountinfo()):
        if m["source"].startswith("rampiped-") and m["mountpoint"].startswith(str(data_root)):
            subprocess.run(["umount", m["mountpoint"]], check=True)
    subprocess.run(["umount", "-R", str(run_mount)], check=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "rp-run", str(run_mount)], check=True
    )


def fault(kind: str, env: Env, d: Daemon) -> None:
    """kill -9 of the daemon; with `kind` "power", a power cut: its RAM side dropped too."""
    d.kill()
    if kind == "power":
        drop_ram(env.runtime.parent, env.data)
        count("power cuts")
    else:
        count("crash points")


@contextlib.contextmanager
def manual_env(tmp: Path) -> Iterator[Env]:
    """make_env with adaptive pinning off: pins come and go only on command."""
    with make_env(tmp) as env:
        env.write_config(adaptive={"enabled": False})
        yield env


def append(path: Path, data: str | bytes) -> None:
    """Open anew, write at the end, close: what a logger does."""
    with open(path, "ab") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def release(marker: Path) -> None:
    """Let the daemon paused at a pause point go on."""
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()


def wait_unpinned_releasing(dm: Daemon, marker: Path, path: Path, timeout: float = 90) -> None:
    """Wait for the daemon to log the unpin of `path`, letting it through every pause point
    meanwhile (a retried unpin passes the same ones again)."""
    done = re.compile(r"unpinned " + re.escape(str(path)))

    def unpinned() -> bool:
        release(marker)
        return bool(done.search(dm.log_text()))

    wait_for(unpinned, timeout, "the retried unpin")


def wait_paused(marker: Path, stage: str, timeout: float = 60) -> None:
    wait_for(
        lambda: marker.exists() and marker.read_text().strip() == stage,
        timeout,
        f"the daemon to pause at {stage}",
    )


def pause_env(stage: str, marker: Path) -> dict[str, str]:
    return {"RAMPIPED_TEST_PAUSE_AT": stage, "RAMPIPED_TEST_PAUSE_FILE": str(marker)}


def overlays_at(path: Path) -> int:
    return sum(1 for m in mountinfo() if m["mountpoint"] == str(path))


def no_leftover_mounts(runtime: Path) -> list[str]:
    """Mounts of pins left below the runtime dir (staging binds, RAM layers)."""
    pins_dir = str(runtime / "pins") + "/"
    return [m["mountpoint"] for m in mountinfo() if m["mountpoint"].startswith(pins_dir)]


@contextlib.contextmanager
def paused_daemon(
    env: Env, mp: pytest.MonkeyPatch, stage: str | None = None, marker: Path | None = None
) -> Iterator[Daemon]:
    """The real daemon; with `stage` and `marker`, its worker stops at that pause point (see
    rampiped.pause.pause_point) until the test removes the marker."""
    with mp.context() as m:
        if stage is not None and marker is not None:
            for k, v in pause_env(stage, marker).items():
                m.setenv(k, v)
        else:
            m.delenv("RAMPIPED_TEST_PAUSE_AT", raising=False)
        with running(env) as d:
            yield d


FAKE_RSYNC = """#!/bin/sh
# fails like rsync on an I/O error while {flag} exists, else is the real rsync
if [ -e '{flag}' ] && [ "$1" != "--version" ]; then
  echo 'rsync: [receiver] write failed on "x": Input/output error (5)' >&2
  echo 'rsync error: error in file IO (code 11) at receiver.c(381) [receiver=3.2.7]' >&2
  exit 11
fi
exec {real} "$@"
"""


def failing_rsync(tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    """Put an rsync first on PATH (through `mp`) that fails with exit code 11 (an I/O error)
    while the returned flag file exists, and is the real rsync otherwise."""
    bindir = tmp / "bin"
    bindir.mkdir()
    flag = tmp / "rsync-fails"
    fake = bindir / "rsync"
    fake.write_text(FAKE_RSYNC.format(flag=flag, real=shutil.which("rsync")))
    fake.chmod(0o755)
    mp.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return flag


def ctl_async(env: Env, *args: str) -> subprocess.Popen[str]:
    """rampipectl in the background (it waits for a paused daemon)."""
    return subprocess.Popen(
        [str(VENV_BIN / "rampipectl"), "--config", str(env.config_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def pin_with_late_writer(
    env: Env, marker: Path, args: Sequence[str], late_path: Path, mounted: str, how: str = "a"
) -> Iterator[tuple[subprocess.Popen[str], IO[str]]]:
    """`rampipectl pin ARGS` in the background against a daemon paused at pin:layers and then
    at `mounted`: at pin:layers (after the holder check) a process opens `late_path` on disk
    for appending (or as `how` says: "r", a reader); the body runs at `mounted` with
    rampipectl and that open file. Afterwards the daemon goes on, the file is closed, and
    rampipectl is killed if it still runs."""
    ctl = ctl_async(env, "pin", *args)
    late = None
    try:
        wait_paused(marker, "pin:layers")
        late = open(late_path, how)  # noqa: SIM115 (closed below, after the body)
        release(marker)
        wait_paused(marker, mounted)
        yield ctl, late
    finally:
        release(marker)
        if late is not None:
            late.close()
        if ctl.poll() is None:
            ctl.kill()
            ctl.communicate()
