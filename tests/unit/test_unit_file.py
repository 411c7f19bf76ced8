"""The systemd unit: the options the daemon's contract relies on are there, nothing gives the
service a mount namespace of its own, and systemd itself accepts the file."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "rampiped.service"

# Options that make systemd set up a mount namespace for the service (directly, or by implying
# one of the others). Under any of them rampiped's mounts would be invisible to every other
# process, which would keep writing to the disk copy.
NAMESPACE_OPTIONS = {
    "BindPaths",
    "BindReadOnlyPaths",
    "DynamicUser",
    "ExecPaths",
    "ExtensionDirectories",
    "ExtensionImages",
    "InaccessiblePaths",
    "MountAPIVFS",
    "MountFlags",
    "MountImages",
    "NoExecPaths",
    "ProcSubset",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "RootDirectory",
    "RootImage",
    "TemporaryFileSystem",
}
# Whole families: PrivateTmp, PrivateDevices, PrivateMounts, PrivateUsers, PrivateNetwork...;
# ProtectSystem, ProtectHome, ProtectKernelTunables/Modules/Logs, ProtectControlGroups,
# ProtectProc, ProtectClock, ProtectHostname.
NAMESPACE_PREFIXES = ("Private", "Protect")


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; repeated keys stay repeated, as
    systemd accumulates them. Comments and line continuations as in systemd.syntax(7)."""
    out: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{UNIT}: not an assignment: {raw!r}")
        out.append((section, key.strip(), value.strip()))
    return out


def values(entries: list[tuple[str, str, str]], section: str, key: str) -> list[str]:
    """Every value given to `key` in `section`, split on white space (as After=, Before= and
    RestartPreventExitStatus= are)."""
    return [w for s, k, v in entries if s == section and k == key for w in v.split()]


def single(entries: list[tuple[str, str, str]], section: str, key: str) -> str:
    found = [v for s, k, v in entries if s == section and k == key]
    assert len(found) == 1, f"[{section}] {key}= given {len(found)} times, expected once"
    return found[0]


@pytest.fixture(scope="module")
def entries() -> list[tuple[str, str, str]]:
    return parse_unit(UNIT.read_text())


def test_parser_handles_comments_continuations_and_repeats() -> None:
    text = "# c\n[Unit]\n; c\nAfter=a.target \\\n  b.target\nAfter=c.target\n[Service]\nX = 1\n"
    assert parse_unit(text) == [
        ("Unit", "After", "a.target b.target"),
        ("Unit", "After", "c.target"),
        ("Service", "X", "1"),
    ]


def test_every_assignment_is_explained_by_a_comment() -> None:
    """Each assignment sits under a comment; a few related ones may share it (Conflicts= and
    Before= of shutdown.target), but a blank line or a section header breaks the run."""
    lines = UNIT.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line or line.startswith(("#", "[")):
            continue
        j = i - 1
        while j >= 0 and lines[j] and not lines[j].startswith(("#", "[")):
            j -= 1
        assert j >= 0 and lines[j].startswith("#"), f"{UNIT}:{i + 1}: {line!r} has no comment"


def test_service_contract(entries: list[tuple[str, str, str]]) -> None:
    assert single(entries, "Service", "Type") == "notify"
    assert single(entries, "Service", "NotifyAccess") == "main"
    assert single(entries, "Service", "KillMode") == "mixed"
    assert single(entries, "Service", "Restart") == "on-failure"
    assert "78" in values(entries, "Service", "RestartPreventExitStatus")
    assert single(entries, "Service", "WatchdogSec") not in ("", "0", "infinity")
    assert single(entries, "Service", "TimeoutStopSec") not in ("", "0", "infinity")


def test_exec_lines(entries: list[tuple[str, str, str]]) -> None:
    start = shlex.split(single(entries, "Service", "ExecStart"))
    assert Path(start[0]).name == "rampiped"
    assert start[1:] == ["--config", "/etc/rampipe.conf"]
    # Reload must be synchronous and able to fail: through rampipectl, never `kill -HUP`.
    reload = shlex.split(single(entries, "Service", "ExecReload"))
    assert Path(reload[0]).name == "rampipectl"
    assert reload[-1] == "reload"
    assert "--config" in reload and reload[reload.index("--config") + 1] == "/etc/rampipe.conf"


def test_ordering(entries: list[tuple[str, str, str]]) -> None:
    assert single(entries, "Unit", "DefaultDependencies") == "no"
    assert "local-fs.target" in values(entries, "Unit", "After")
    before = values(entries, "Unit", "Before")
    # before ordinary services (they are After=basic.target) and stopped at shutdown
    assert "basic.target" in before
    assert "shutdown.target" in before
    assert "shutdown.target" in values(entries, "Unit", "Conflicts")
    assert values(entries, "Install", "WantedBy")


def test_nothing_creates_a_mount_namespace(entries: list[tuple[str, str, str]]) -> None:
    offending = [
        f"{k}={v}"
        for s, k, v in entries
        if s == "Service" and (k in NAMESPACE_OPTIONS or k.startswith(NAMESPACE_PREFIXES))
    ]
    assert offending == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify(tmp_path: Path, entries: list[tuple[str, str, str]]) -> None:
    """systemd's own check, in a scratch root: it also requires the Exec*= programs to exist
    there, so stand-ins take their place. Any output (even "ignoring" warnings) fails."""
    root = tmp_path / "root"
    unitdir = root / "etc" / "systemd" / "system"
    unitdir.mkdir(parents=True)
    shutil.copy(UNIT, unitdir / UNIT.name)
    for key in ("ExecStart", "ExecReload"):
        program = root / shlex.split(single(entries, "Service", key))[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0")
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", UNIT.name],
        capture_output=True,
        text=True,
        env=env,
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
