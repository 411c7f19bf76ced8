"""Fixtures of the system tier: a fresh ext4 on a loop device per test, mounted inside the
private mount namespace the test run lives in, and removed afterwards even when the test fails."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.helpers import LoopFs, make_loopfs


@pytest.fixture
def loopfs(tmp_path: Path) -> Iterator[LoopFs]:
    with make_loopfs(tmp_path / "disk", size_mb=256) as fs:
        yield fs


@pytest.fixture
def runtime_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs for the daemon's runtime dir, as /run is on a real system."""
    path = tmp_path / "run"
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "rp-run", str(path)], check=True
    )
    try:
        yield path
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-R", str(path)], check=True, capture_output=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line with the counts of the safety tests (tests/system/safety.py), when any ran."""
    from tests.system.safety import summary_line

    line = summary_line()
    if line is not None:
        terminalreporter.write_line(line)
