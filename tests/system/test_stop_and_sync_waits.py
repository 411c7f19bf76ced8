"""What the daemon does with an operation or a retry already under way when it is asked for more
(issue 12, item 5):

- SIGTERM starts the final write-back of every pin at once, whatever retry a failed checkpoint
  scheduled (up to 5 minutes away; the unit's stop timeout is 90 s), and for a pin whose
  checkpoint is running as soon as that checkpoint ends;
- `rampipectl sync` during another operation on a pin waits for it (up to `--timeout`), then
  checkpoints; past its limit, or when the daemon begins to stop, it exits 1 and says why;
- `rampipectl unpin` during a checkpoint waits for it, then unpins (it used to answer "busy
  with another operation" whenever a periodic checkpoint happened to run).

The daemon is held inside an operation by its test pause points (RAMPIPED_TEST_PAUSE_AT,
rampiped/pause.py `pause_point`), checkpoints fail through an rsync that fails while a flag file
exists (safety.failing_rsync)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import Daemon, Env, running
from tests.system.helpers import wait_for

pytestmark = pytest.mark.system

FILES = ("a", "b", "c")
# Failed checkpoints double the pin's backoff: 5, 10, 20, 40, 80 s (pins.RETRY_MIN).
FAILURES = 5
# The final write-back must begin within this many seconds of SIGTERM (or of the end of the
# running checkpoint): far below the retry the failures left pending (80 s).
PROMPT = 20.0


def write_files(d: Path, version: int = 1) -> dict[str, int]:
    for name in FILES:
        safety.write_version(d / name, name, version)
    return dict.fromkeys(FILES, version)


def retry_in(env: Env, d: Path) -> float:
    """Seconds until the retry that the pin's last failure scheduled (0 when none is)."""
    facts = json.loads(env.ctl("explain", str(d), "--json", check=True).stdout)
    retry_at = facts["pin"]["retry_at"]
    return 0.0 if retry_at is None else float(retry_at) - float(facts["now"])


def fail_checkpoints(env: Env, d: Path, flag: Path) -> float:
    """Make FAILURES checkpoints of `d` fail (rsync exits 11); the retry left pending."""
    flag.touch()
    safety.count("disk faults")
    for _ in range(FAILURES):
        proc = env.ctl("sync", str(d))
        assert proc.returncode == 1 and "exited with code 11" in proc.stderr, proc.stderr
    flag.unlink()
    pending = retry_in(env, d)
    assert pending > 2 * PROMPT, pending
    return pending


def exit_status(dm: Daemon) -> int:
    """The exit status of a daemon that is stopping already (a second SIGTERM could reach it
    after its handlers are gone)."""
    dm.proc.wait(60)
    return dm.stop()


def line_index(dm: Daemon, pattern: str) -> int:
    rx = re.compile(pattern)
    for i, line in enumerate(dm.lines):
        if rx.search(line):
            return i
    raise AssertionError(f"no log line {pattern!r}:\n{dm.log_text()}")


def staged_disk(env: Env) -> Path:
    """The disk side of the one copy pin (its private staging bind)."""
    return next((env.runtime / "pins").glob("*/disk"))


@pytest.mark.parametrize("mode", ["overlay", "copy"])
def test_sigterm_writes_back_at_once_whatever_retry_is_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        with monkeypatch.context() as m:
            flag = safety.failing_rsync(tmp_path, m)
            with running(env) as dm:
                env.ctl("pin", str(d), "--mode", mode, check=True)
                expected = write_files(d)
                pending = fail_checkpoints(env, d, flag)
                sent = time.monotonic()
                dm.proc.send_signal(signal.SIGTERM)
                dm.wait_log(rf"unpinned {re.escape(str(d))}: stopping; wrote", timeout=PROMPT)
                took = time.monotonic() - sent
                assert took < PROMPT < pending, (took, pending)
                assert exit_status(dm) == 0, dm.log_text()
        stop = line_index(dm, r"stopping: writing 1 pins back")
        retry = r"\(its retry was due in [0-9hms.]+\)"
        began = line_index(dm, rf"stopping: writing {re.escape(str(d))} back now {retry}")
        done = line_index(dm, rf"unpinned {re.escape(str(d))}: stopping")
        assert stop < began < done, dm.log_text()
        assert env.mounted_at(d) is None
        assert safety.check_tree(d, expected) == []


def test_sigterm_during_a_checkpoint_writes_back_when_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        with monkeypatch.context() as m:
            flag = safety.failing_rsync(tmp_path, m)
            # the failing checkpoints stop before the pause point (rsync fails first)
            with safety.paused_daemon(env, m, "checkpoint:renamed", marker) as dm:
                env.ctl("pin", str(d), check=True)
                expected = write_files(d)
                pending = fail_checkpoints(env, d, flag)
                ctl = safety.ctl_async(env, "sync", str(d))
                try:
                    safety.wait_paused(marker, "checkpoint:renamed")
                    dm.proc.send_signal(signal.SIGTERM)
                    dm.wait_log(r"stopping: writing 1 pins back")
                    assert ctl.poll() is None  # its checkpoint has not ended
                    released = time.monotonic()
                    # the unpin passes the same pause point (through its journal): let it by
                    safety.wait_unpinned_releasing(dm, marker, d, timeout=PROMPT)
                    took = time.monotonic() - released
                    assert took < PROMPT < pending, (took, pending)
                    out, err = ctl.communicate(timeout=30)
                    assert ctl.returncode == 0, err
                    assert out.startswith("synced 1 pins"), out
                finally:
                    safety.release(marker)
                    if ctl.poll() is None:
                        ctl.kill()
                        ctl.communicate()
                assert exit_status(dm) == 0, dm.log_text()
        checkpoint_end = line_index(dm, r"test pause point checkpoint:renamed released")
        began = line_index(dm, rf"stopping: writing {re.escape(str(d))} back")
        done = line_index(dm, rf"unpinned {re.escape(str(d))}: stopping")
        assert checkpoint_end < began < done, dm.log_text()
        assert env.mounted_at(d) is None
        assert safety.check_tree(d, expected) == []


def wait_queued(dm: Daemon, d: Path, ctl: subprocess.Popen[str], what: str = "sync") -> None:
    """Wait until the daemon says `ctl`'s sync (or `what`) of `d` waits for the running
    checkpoint; fail at once if `ctl` was answered instead."""
    rx = re.compile(rf"{what} of {re.escape(str(d))} waits for the running checkpoint")

    def queued() -> bool:
        if ctl.poll() is not None:
            _out, err = ctl.communicate()
            raise AssertionError(f"rampipectl {what} did not wait: exit {ctl.returncode}: {err}")
        return any(rx.search(line) for line in list(dm.lines))

    wait_for(queued, 30, f"the {what} to wait for the running checkpoint")


def wait_checkpoints(dm: Daemon, n: int) -> int:
    """Wait for `n` logged checkpoints asked for by rampipectl; how many there are then."""
    rx = re.compile(r"checkpoint of \S+ \(asked by rampipectl\)")

    def count() -> int:
        return sum(1 for line in list(dm.lines) if rx.search(line))

    wait_for(lambda: count() >= n, 30, f"{n} checkpoints in the log")
    return count()


def answered(env: Env, marker: Path, *args: str) -> subprocess.Popen[str]:
    """rampipectl ARGS against a daemon that pauses at every checkpoint: let it through until
    rampipectl has its answer."""
    proc = safety.ctl_async(env, *args)

    def done() -> bool:
        safety.release(marker)
        return proc.poll() is not None

    try:
        wait_for(done, 60, f"the answer to rampipectl {' '.join(args)}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    return proc


Answer = tuple[int, str, str]  # rampipectl's exit status, stdout, stderr


def asked_during_a_checkpoint(
    env: Env, dm: Daemon, marker: Path, d: Path, expected: dict[str, int], *args: str
) -> tuple[Answer, Answer]:
    """`rampipectl sync d` held inside its checkpoint (paused at copy-checkpoint:copied); a
    file `late` written then, which only a later checkpoint or write-back has; `rampipectl
    ARGS` asked meanwhile, which must wait for the checkpoint (the daemon logs so); then every
    pause let through until both are answered."""
    first = safety.ctl_async(env, "sync", str(d))
    second: subprocess.Popen[str] | None = None
    try:
        safety.wait_paused(marker, "copy-checkpoint:copied")
        safety.write_version(d / "late", "late", 1)
        expected["late"] = 1
        second = safety.ctl_async(env, *args)
        wait_queued(dm, d, second, args[0])
        waiting = second

        def both_answered() -> bool:
            safety.release(marker)  # the second operation's own checkpoint passes it too
            return first.poll() is not None and waiting.poll() is not None

        wait_for(both_answered, 60, f"the sync and rampipectl {args[0]} to be answered")
        out1, err1 = first.communicate()
        out2, err2 = second.communicate()
    finally:
        safety.release(marker)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    return (first.returncode, out1, err1), (second.returncode, out2, err2)


def test_sync_during_a_checkpoint_waits_and_then_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        with safety.paused_daemon(env, monkeypatch, "copy-checkpoint:copied", marker) as dm:
            env.ctl("pin", str(d), "--mode", "copy", check=True)
            expected = write_files(d)
            # every pin: the one busy pin waits
            (code1, _out1, err1), (code2, out2, err2) = asked_during_a_checkpoint(
                env, dm, marker, d, expected, "sync"
            )
            assert code1 == 0, err1
            assert code2 == 0, err2
            assert out2.startswith("synced 1 pins"), out2
            assert "busy" not in err2
            # the second checkpoint happened: the disk side holds the late file
            assert safety.check_tree(staged_disk(env), expected) == []
            assert wait_checkpoints(dm, 2) == 2
            assert answered(env, marker, "unpin", str(d)).returncode == 0
        assert safety.check_tree(d, expected) == []


def test_unpin_during_a_checkpoint_waits_and_then_unpins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        with safety.paused_daemon(env, monkeypatch, "copy-checkpoint:copied", marker) as dm:
            env.ctl("pin", str(d), "--mode", "copy", check=True)
            expected = write_files(d)
            (code1, _out1, err1), (code2, out, err) = asked_during_a_checkpoint(
                env, dm, marker, d, expected, "unpin", str(d)
            )
            assert code1 == 0, err1
            assert code2 == 0, err
            assert out.startswith(f"unpinned {d}"), out
            assert env.mounted_at(d) is None
            assert env.status()["pins"] == []
        assert safety.check_tree(d, expected) == []


def test_sync_past_its_timeout_exits_1_and_says_what_it_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        with safety.paused_daemon(env, monkeypatch, "copy-checkpoint:copied", marker) as dm:
            env.ctl("pin", str(d), "--mode", "copy", check=True)
            expected = write_files(d)
            first = safety.ctl_async(env, "sync", str(d))
            try:
                safety.wait_paused(marker, "copy-checkpoint:copied")
                start = time.monotonic()
                proc = env.ctl("sync", str(d), "--timeout", "1s")
                took = time.monotonic() - start
                assert proc.returncode == 1, proc.stderr
                assert (
                    f"{d}: waited 1s for the running checkpoint to end; no checkpoint made"
                    in proc.stderr
                ), proc.stderr
                assert 1.0 <= took < 10.0, took
                assert first.poll() is None  # the checkpoint it waited for is still running
                safety.release(marker)
                _out, err = first.communicate(timeout=60)
            finally:
                safety.release(marker)
                if first.poll() is None:
                    first.kill()
                    first.communicate()
            assert first.returncode == 0, err
            assert safety.check_tree(staged_disk(env), expected) == []
            # with no operation running, even --timeout 0 checkpoints
            assert answered(env, marker, "sync", str(d), "--timeout", "0").returncode == 0
            # two checkpoints in all, in the worker's order: the timed-out sync made none
            assert wait_checkpoints(dm, 2) == 2


def test_a_waiting_sync_is_answered_when_the_daemon_begins_to_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        d.mkdir()
        with safety.paused_daemon(env, monkeypatch, "copy-checkpoint:copied", marker) as dm:
            env.ctl("pin", str(d), "--mode", "copy", check=True)
            expected = write_files(d)
            first = safety.ctl_async(env, "sync", str(d))
            second: subprocess.Popen[str] | None = None
            try:
                safety.wait_paused(marker, "copy-checkpoint:copied")
                second = safety.ctl_async(env, "sync", str(d))
                wait_queued(dm, d, second)
                dm.proc.send_signal(signal.SIGTERM)
                _out2, err2 = second.communicate(timeout=30)  # answered while still paused
                assert second.returncode == 1, err2
                assert (
                    f"{d}: rampiped began to stop while this sync waited for the running"
                    " checkpoint: no checkpoint made; the stop writes every pin back to disk"
                    in err2
                ), err2
                assert marker.exists()  # the checkpoint it waited for had not ended
                safety.wait_unpinned_releasing(dm, marker, d)
                _out1, err1 = first.communicate(timeout=30)
            finally:
                safety.release(marker)
                for proc in (first, second):
                    if proc is not None and proc.poll() is None:
                        proc.kill()
                        proc.communicate()
            assert first.returncode == 0, err1
            assert exit_status(dm) == 0, dm.log_text()
        assert safety.check_tree(d, expected) == []
