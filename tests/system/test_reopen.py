"""Writers that keep their log open, end to end: a small server holds srv/app.log open and
appends numbered lines; the watch root's `reopen` command sends it SIGHUP. One that reopens is
pinned (its descriptor then on the overlay) and unpinned (its descriptor back on the disk) with
every line on disk afterwards; one that ignores the signal is rolled back, with nothing lost."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampiped import handover
from rampiped.writeback import run_command
from tests.system.daemon_harness import Env, make_env, running
from tests.system.helpers import mountinfo, wait_for

pytestmark = pytest.mark.system

SERVER = r"""
import os, signal, sys, time
path, mode = sys.argv[1], sys.argv[2]
flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
fd = os.open(path, flags, 0o640)
hup = stop = False
def on_hup(signum, frame):
    global hup
    hup = True
def on_term(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGHUP, on_hup if mode == "reopen" else signal.SIG_IGN)
signal.signal(signal.SIGTERM, on_term)
print(fd, flush=True)
n = 0
while not stop:
    if hup:
        hup = False
        new = os.open(path, flags, 0o640)
        os.dup2(new, fd)  # the same descriptor number, now on whatever the path shows
        os.close(new)
    os.write(fd, b"%08d\n" % n)
    n += 1
    time.sleep(0.002)
print(n, flush=True)
"""


class Server:
    def __init__(self, log: Path, mode: str) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(log), mode], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.fd = int(self.proc.stdout.readline())

    def mount_id(self) -> int:
        with open(f"/proc/{self.proc.pid}/fdinfo/{self.fd}") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
        raise AssertionError("no mnt_id")

    def lines(self) -> int:
        return sum(1 for _ in open(self.log, "rb"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self.proc.wait(10)
        return int(out.split()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as e:
        yield e


def configure(env: Env, server: Server) -> None:
    env.write_config(
        adaptive={
            "watch": [
                {"path": str(env.data), "depth": 1, "reopen": f"kill -HUP {server.proc.pid}"}
            ],
            "pin_above": 1_000_000,  # pins only by hand here
        }
    )


def mount_id_at(path: Path) -> int | None:
    found = None
    for m in mountinfo():
        if m["mountpoint"] == str(path):
            found = int(m["id"])
    return found


def disk_mount_id(env: Env) -> int:
    found = mount_id_at(env.disk.mountpoint)
    assert found is not None
    return found


def assert_every_line(log: Path, written: int) -> None:
    lines = log.read_bytes().splitlines()
    numbers = [int(x) for x in lines]
    assert len(numbers) == written, (len(numbers), written)
    assert sorted(numbers) == list(range(written)), "lines lost or doubled"


def test_a_writer_that_reopens_is_pinned_and_unpinned_with_every_line(env: Env) -> None:
    srv = env.data / "srv"
    server = Server(srv / "app.log", "reopen")
    try:
        configure(env, server)
        with running(env) as daemon:
            assert server.mount_id() == disk_mount_id(env)
            proc = env.ctl("pin", str(srv))
            assert proc.returncode == 0, proc.stderr + daemon.log_text()
            assert env.overlay_at(srv)
            overlay = mount_id_at(srv)
            # the server now writes through the overlay, into RAM
            wait_for(lambda: server.mount_id() == overlay, 10, "the server's fd on the overlay")
            daemon.wait_log(rf"{srv}: ran 'kill -HUP {server.proc.pid}'")
            seen = server.lines()
            wait_for(lambda: server.lines() > seen + 200, 10, "lines written while pinned")
            proc = env.ctl("unpin", str(srv))
            assert proc.returncode == 0, proc.stderr + daemon.log_text()
            assert not env.overlay_at(srv)
            daemon.wait_log(rf"{srv}: wrote its RAM layer back and detached it")
            daemon.wait_log(rf"unpinned {srv}: asked by rampipectl")
            # the server followed the directory back to the disk
            assert server.mount_id() == disk_mount_id(env)
            seen = server.lines()
            wait_for(lambda: server.lines() > seen + 200, 10, "lines written after the unpin")
            written = server.stop()
            assert daemon.stop() == 0
        assert_every_line(srv / "app.log", written)
        assert sorted(os.listdir(srv)) == ["app.log"]
    finally:
        server.kill()


def test_a_writer_that_ignores_the_signal_is_rolled_back_with_nothing_lost(env: Env) -> None:
    srv = env.data / "srv"
    server = Server(srv / "app.log", "ignore")
    try:
        configure(env, server)
        with running(env) as daemon:
            proc = env.ctl("pin", str(srv))
            assert proc.returncode != 0
            expected = (
                f"rolled back the pin of {srv}: pid {server.proc.pid} (python3): fd"
                f" {server.fd} {srv}/app.log keeps writing to the disk copy after"
                f" 'kill -HUP {server.proc.pid}'"
            )
            assert expected in proc.stderr, proc.stderr
            daemon.wait_log(re.escape(expected))
            assert not env.overlay_at(srv)
            assert mount_id_at(srv) is None
            assert server.mount_id() == disk_mount_id(env)
            assert [m for m in mountinfo() if m["source"].startswith("rampiped-")] == []
            seen = server.lines()
            wait_for(lambda: server.lines() > seen + 100, 10, "lines written after the rollback")
            written = server.stop()
            assert daemon.stop() == 0
        assert_every_line(srv / "app.log", written)
    finally:
        server.kill()


def test_without_a_reopen_command_a_held_directory_is_refused(env: Env) -> None:
    srv = env.data / "srv"
    server = Server(srv / "app.log", "reopen")
    try:
        env.write_config(adaptive={"pin_above": 1_000_000})
        with running(env):
            proc = env.ctl("pin", str(srv))
            assert proc.returncode != 0
            assert f"cannot pin {srv}: in use by pid {server.proc.pid}" in proc.stderr
            assert not env.overlay_at(srv)
            written = server.stop()
        assert_every_line(srv / "app.log", written)
    finally:
        server.kill()


def test_a_failing_reopen_command_is_reported_with_its_own_exit_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rampiped")
    failing = "sh -c 'echo no such unit >&2; exit 1'"
    assert handover.run_reopen(failing, "/srv", run_command) is False
    assert handover.run_reopen("/nonexistent/reload", "/srv", run_command) is False
    assert handover.run_reopen("true", "/srv", run_command) is True
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2, lines
    assert lines[0] == (
        "/srv: the reopen command timeout --kill-after=5 30 sh -c 'echo no such unit >&2; "
        "exit 1' exited with code 1: no such unit"
    )
    # timeout's own message follows; its quotes depend on the locale
    assert lines[1].startswith(
        "/srv: the reopen command timeout --kill-after=5 30 /nonexistent/reload could not be "
        "run (exit code 127: command not found): timeout: failed to run command"
    )


def test_a_directory_its_writers_let_go_of_is_written_back_before_the_unmount(env: Env) -> None:
    """A pin with a reopen command whose writers hold nothing at the unpin (they open, append
    and close) is written back while the overlay still serves the path, like any other pin,
    and the command still runs after the unmount."""
    srv = env.data / "srv"
    srv.mkdir()
    (srv / "app.log").write_text("on disk\n")
    env.write_config(
        adaptive={
            "watch": [{"path": str(env.data), "depth": 1, "reopen": "true"}],
            "pin_above": 1_000_000,  # pins only by hand here
        }
    )
    with running(env) as daemon:
        proc = env.ctl("pin", str(srv))
        assert proc.returncode == 0, proc.stderr + daemon.log_text()
        with open(srv / "app.log", "a") as f:
            f.write("in RAM\n")
        proc = env.ctl("unpin", str(srv))
        assert proc.returncode == 0, proc.stderr + daemon.log_text()
        daemon.wait_log(rf"{srv}: written back before the unmount \(1 files")
        daemon.wait_log(rf"{srv}: ran 'true'")
        assert daemon.stop() == 0
    assert (srv / "app.log").read_text() == "on disk\nin RAM\n"
    assert sorted(os.listdir(srv)) == ["app.log"]
