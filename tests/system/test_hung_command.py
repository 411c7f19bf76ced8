"""The watchdog of the commands rampiped runs (writeback.communicate_watched): rsync -H deadlocks
now and then when its source changes under it, all its processes waiting in poll() for each
other, and the worker thread with them. A command is killed only when every process of it
waits in poll/select and none reads or writes a byte; a slow one (sleeping, or waiting for the
disk) is left alone."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from rampiped import commands, writeback
from tests.system.helpers import wait_for

pytestmark = pytest.mark.system

# a parent and its child, each waiting in select() on a pipe that nobody writes
DEADLOCK = r"""
import os, select
r, w = os.pipe()
if os.fork() == 0:
    select.select([r], [], [])
else:
    print("waiting", flush=True)
    select.select([r], [], [])
"""


def test_a_command_whose_processes_all_wait_on_each_other_is_killed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(commands, "HANG_AFTER", 1.0)
    monkeypatch.setattr(commands, "_WATCH_EVERY", 0.2)
    t = time.monotonic()
    res = writeback.run_command([sys.executable, "-c", DEADLOCK])
    took = time.monotonic() - t
    assert res.returncode == writeback.HUNG_EXIT, res
    assert "hung, killed" in res.stderr, res.stderr
    assert "waiting" in res.stdout
    assert took < 30, took  # a deadline, not a timing claim: without the watchdog, forever


# a child opening a fifo that no process opens for writing (rsync's sender opening a file it
# listed as a regular file, replaced by a fifo since), its parent waiting in select() for it
FIFO_OPEN = r"""
import os, select, sys
fifo = os.path.join(sys.argv[1], "fifo")
os.mkfifo(fifo)
r, w = os.pipe()
if os.fork() == 0:
    open(fifo, "rb")
else:
    print("waiting", flush=True)
    select.select([r], [], [])
"""


def test_a_command_stuck_opening_a_fifo_is_killed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(commands, "HANG_AFTER", 1.0)
    monkeypatch.setattr(commands, "_WATCH_EVERY", 0.2)
    t = time.monotonic()
    res = writeback.run_command([sys.executable, "-c", FIFO_OPEN, str(tmp_path)])
    took = time.monotonic() - t
    assert res.returncode == writeback.HUNG_EXIT, res
    assert "hung, killed" in res.stderr, res.stderr
    assert took < 30, took  # a deadline, not a timing claim: without the watchdog, forever


def test_a_slow_command_is_not_taken_for_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "HANG_AFTER", 0.5)
    monkeypatch.setattr(commands, "_WATCH_EVERY", 0.2)
    res = writeback.run_command([sys.executable, "-c", "import time; time.sleep(2); print('done')"])
    assert res.returncode == 0, res
    assert res.stdout.strip() == "done"


def test_a_hung_pass_is_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    results = iter(
        [
            writeback.CommandResult(writeback.HUNG_EXIT, "", "hung, killed"),
            writeback.CommandResult(2, "", "Invalid packet at end of run (17) [sender]"),
            writeback.CommandResult(0, "ok", ""),
        ]
    )
    calls: list[list[str]] = []

    def runner(argv: list[str]) -> writeback.CommandResult:
        calls.append(argv)
        return next(results)

    assert writeback.run_pass(runner, ["rsync", "x"]).returncode == 0
    assert len(calls) == 3
    assert (
        writeback.run_pass(lambda argv: writeback.CommandResult(11, "", ""), ["rsync"]).returncode
        == 11
    )


# a parent and its child, both alive until killed; the child's pid printed
TWO_SLEEPERS = r"""
import os, time
pid = os.fork()
if pid == 0:
    time.sleep(300)
else:
    print(pid, flush=True)
    time.sleep(300)
"""


def test_a_command_is_stopped_when_its_caller_says_why(tmp_path: Path) -> None:
    """A guarded runner (an eviction's write-back before its unmount, RAM running short): the
    command is killed with its children once `stop` gives a reason, and the next one is not
    started."""
    asked = []

    def stop() -> str | None:
        asked.append(time.monotonic())
        return "no room" if len(asked) > 3 else None

    run = commands.guarded(commands.run_command, stop)
    t = time.monotonic()
    res = run([sys.executable, "-c", TWO_SLEEPERS])
    took = time.monotonic() - t
    assert res.returncode == commands.STOPPED_EXIT, res
    assert "rampiped: stopped: no room" in res.stderr, res.stderr
    assert took < 5, took
    child = int(res.stdout.split()[0])

    def dead() -> bool:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        return state in ("Z", "X")

    wait_for(dead, 5, "the command's child to be killed")
    marker = tmp_path / "made"
    res = run(["touch", str(marker)])
    assert res.returncode == commands.STOPPED_EXIT and "not started: no room" in res.stderr
    assert not marker.exists()
