"""Holders everywhere: a service with a mount namespace of its own that still shows a pinned
directory, or holds a file or its working directory in it, is found before an unpin. After a
host unmount such a process would keep writing into RAM that is about to be freed, so the
unpin is refused (never a lazy detach), and the report names the pid, the command and the
systemd unit. Once the holder is gone, the unpin goes through and nothing is lost.

The unit: the holder runs in a cgroup named like a service (cgroup v2), as systemd would put
it; rampiped reads the unit from /proc/PID/cgroup."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import running
from tests.system.helpers import wait_for

pytestmark = pytest.mark.system

UNIT = "rp-safety-holder.service"


def _cgroup_v2() -> Path | None:
    for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (root / "cgroup.procs").exists() and (root / "cgroup.controllers").exists():
            return root
    return None


@contextlib.contextmanager
def service(tmp_path: Path, argv: list[str], cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A holder process in a cgroup named UNIT, killed and its cgroup removed afterwards."""
    root = _cgroup_v2()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy to name a unit with")
    group = root / UNIT
    group.mkdir(exist_ok=True)
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL)
    try:
        (group / "cgroup.procs").write_text(str(proc.pid))
        yield proc
    finally:
        proc.kill()
        proc.wait()
        wait_for(lambda: not (group / "cgroup.procs").read_text().strip(), 10, "empty cgroup")
        group.rmdir()


def holder_binary(tmp_path: Path) -> Path:
    """`sleep` under a name of its own, so that its command shows in the report."""
    path = tmp_path / "rp-holder"
    sleep = shutil.which("sleep")
    assert sleep is not None
    shutil.copy(sleep, path)
    return path


def namespace_shows(pid: int, path: Path) -> bool:
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return any(line.split()[4] == str(path) for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["sees the pin", "works inside it"])
def test_holder_in_another_mount_namespace_blocks_the_unpin(tmp_path: Path, how: str) -> None:
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        binary = holder_binary(tmp_path)
        with running(env) as dm:
            env.ctl("pin", str(d), check=True)
            safety.write_version(d / "f", "f", 1)
            # a service started after the pin, with a namespace of its own (private: our
            # unmount would not reach its copy of the overlay)
            argv = ["unshare", "-m", "--propagation", "private", str(binary), "600"]
            cwd = d if how == "works inside it" else Path("/")
            with service(tmp_path, argv, cwd) as proc:
                wait_for(lambda: namespace_shows(proc.pid, d), 10, "the holder's namespace")
                pid = next(
                    int(c)
                    for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                    or [str(proc.pid)]
                )
                safety.count("bad inputs")
                out = env.ctl("unpin", str(d))
                assert out.returncode == 1
                message = out.stderr
                assert f"pid {pid} (rp-holder, {UNIT})" in message, message
                assert re.search(r"mount namespace|cwd", message), message
                # no lazy detach: the pin is still mounted here, its data in place
                assert env.overlay_at(d)
                assert safety.check_tree(d, {"f": 1}) == []
                dm.wait_log(r"cannot unpin .*rp-holder")
            dm.wait_log(r"unpinned " + re.escape(str(d)), timeout=60)
        assert not env.overlay_at(d)
        assert safety.check_tree(d, {"f": 1}) == []
        assert os.listdir(env.runtime / "pins") == []
