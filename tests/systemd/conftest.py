"""Fixtures of the systemd tier: one Debian 12 container booted with systemd for the whole
session, with this checkout's files at /root/rampiped-src. It is killed and its copy removed at
the end, also when a test failed; a copy left by a killed session is removed at the next start.

The timings (cold debootstrap or cache hit, copy, boot, and what the tests add) are printed at
the end of the run; the guest's console and journal of the last session are kept in
/var/cache/rampiped-test/last-run/."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.guest import (
    CACHE_ROOT,
    Guest,
    GuestError,
    cached_tree,
    clean_stale_runs,
    copy_checkout,
    copy_tree,
    pinned,
    session_run,
    wait,
)

REPO = Path(__file__).resolve().parents[2]
SOURCE_IN_GUEST = "/root/rampiped-src"
LAST_RUN = CACHE_ROOT / "last-run"

TIMINGS: dict[str, str] = {}


def record(what: str, seconds: float) -> None:
    TIMINGS[what] = f"{seconds:.1f}s"


@contextlib.contextmanager
def installed(
    guest: Guest, pin: str, conf: str, config: str, what: str, *, before_uninstall: str = ""
) -> Iterator[Guest]:
    """`make install` in the guest with `config` at `conf` and a file on disk in `pin`, until
    `pin` is pinned; `make uninstall` at the end (after the shell command `before_uninstall`).
    `what` names the install in the timings."""
    guest.run(f"mkdir -p {pin}")
    guest.write(f"{pin}/on-disk", "on disk before the pin\n")
    guest.write(conf, config)
    started = time.monotonic()
    proc = guest.run(f"cd {SOURCE_IN_GUEST} && make install", check=False, timeout=1200)
    record(f"make install for the {what}", time.monotonic() - started)
    if proc.returncode != 0:
        raise GuestError(
            f"`make install` exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    try:
        wait(guest, lambda: pinned(guest, pin), 60, f"{pin} pinned")
        yield guest
    finally:
        if before_uninstall:
            guest.run(before_uninstall, check=False)
        guest.run(f"cd {SOURCE_IN_GUEST} && make uninstall", check=False, timeout=300)


@pytest.fixture(scope="session")
def timings() -> dict[str, str]:
    return TIMINGS


@pytest.fixture(scope="session")
def guest() -> Iterator[Guest]:
    with _booted(allow_fanotify=True) as machine:
        yield machine


@pytest.fixture(scope="session")
def guest_without_fanotify() -> Iterator[Guest]:
    """A guest booted with nspawn's system call filter as it is: fanotify is refused there,
    as in a container on a Proxmox host."""
    with _booted(allow_fanotify=False) as machine:
        yield machine


@contextlib.contextmanager
def _booted(*, allow_fanotify: bool) -> Iterator[Guest]:
    removed = clean_stale_runs()
    if removed:
        TIMINGS["stale copies removed"] = ", ".join(removed)
    started = time.monotonic()
    tree, built = cached_tree()
    if built is None:
        TIMINGS["debootstrap"] = f"cache hit ({tree})"
    else:
        record("debootstrap (cold)", built)
    with session_run() as run:
        name = f"rampiped-test-{os.getpid()}"
        (run / "name").write_text(name + "\n")
        t = time.monotonic()
        copy_tree(tree, run / "root")
        record("copy of the cached tree", time.monotonic() - t)
        copy_checkout(REPO, run / "root" / SOURCE_IN_GUEST.lstrip("/"))
        machine = Guest(run / "root", name, run, allow_fanotify=allow_fanotify)
        try:
            t = time.monotonic()
            state = machine.boot()
            record("boot", time.monotonic() - t)
            if state != "running":
                failed = machine.run("systemctl --failed --no-legend", check=False).stdout
                raise GuestError(f"{name} booted {state}; failed units:\n{failed}")
            record("guest ready (from session start)", time.monotonic() - started)
            yield machine
        finally:
            _keep_logs(machine)
            machine.kill()


def _keep_logs(machine: Guest) -> None:
    """The last session's console and journal, for reading after a failure."""
    LAST_RUN.mkdir(parents=True, exist_ok=True)
    if machine.running():
        proc = machine.run("journalctl --no-pager -o short-monotonic", check=False, timeout=60)
        (LAST_RUN / "journal.txt").write_text(proc.stdout + proc.stderr)
    if machine.console.exists():
        shutil.copy(machine.console, LAST_RUN / "console.log")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("systemd tier")
    for what, value in TIMINGS.items():
        terminalreporter.write_line(f"{what}: {value}")
    terminalreporter.write_line(f"console and journal of this session: {LAST_RUN}")
