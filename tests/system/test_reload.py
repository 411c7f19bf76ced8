"""Reload: validate, diff, apply; a bad file changes nothing; a pile of SIGHUPs is one more."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.daemon_harness import Env, Writer, make_env, running
from tests.system.helpers import wait_for

pytestmark = pytest.mark.system


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as e:
        yield e


def test_thresholds_apply_at_once(env: Env) -> None:
    hot = env.data / "hot"
    hot.mkdir()
    env.write_config(adaptive={"pin_above": 100000})
    with running(env) as daemon:
        writer = Writer(hot, rate=300)
        try:
            wait_for(lambda: env.status()["candidates"], 10, "the directory to show as candidate")
            assert not env.overlay_at(hot)
            env.write_config(adaptive={"pin_above": 50})
            done = env.ctl("reload")
            assert done.returncode == 0, done.stderr
            daemon.wait_log(r"reloaded ")
            wait_for(lambda: env.overlay_at(hot), 20, "the pin under the new threshold")
        finally:
            writer.stop()


def test_invalid_config_changes_nothing_and_says_where(env: Env) -> None:
    static = env.disk.mountpoint / "static"
    static.mkdir()
    env.write_config(pins=[{"path": str(static), "mode": "copy"}])
    with running(env) as daemon:
        assert env.mounted_at(static) is not None
        pid_before = env.status()["pid"]
        text = env.config_path.read_text().replace("half_life: 1s", "half_life: fast")
        assert "half_life: fast" in text
        env.config_path.write_text(text)
        bad = env.ctl("reload")
        assert bad.returncode == 78
        assert re.search(
            rf"{re.escape(str(env.config_path))}:\d+: adaptive\.half_life:", bad.stderr
        ), bad.stderr
        daemon.wait_log(rf"{re.escape(str(env.config_path))}:\d+: adaptive\.half_life: ")
        daemon.wait_log(r"reload refused")
        st = env.status()
        assert st["pid"] == pid_before
        assert [p["path"] for p in st["pins"]] == [str(static)]
        assert env.mounted_at(static) is not None


def test_static_pins_added_and_removed_by_reload(env: Env) -> None:
    a, b = env.disk.mountpoint / "a", env.disk.mountpoint / "b"
    a.mkdir()
    b.mkdir()
    (a / "file").write_text("in a\n")
    env.write_config(pins=[{"path": str(a), "mode": "copy"}])
    with running(env) as daemon:
        assert env.mounted_at(a) is not None and env.mounted_at(b) is None
        (a / "file").write_text("changed in RAM\n")
        env.write_config(pins=[{"path": str(b), "mode": "overlay"}])
        assert env.ctl("reload").returncode == 0
        daemon.wait_log(rf"unpinned {a}: no longer in the configuration")
        wait_for(lambda: env.overlay_at(b), 20, "the new static pin")
        assert env.mounted_at(a) is None
        assert (a / "file").read_text() == "changed in RAM\n"


def test_watch_roots_added_and_removed(env: Env) -> None:
    other = env.disk.mountpoint / "other"
    (other / "hot").mkdir(parents=True)
    with running(env) as daemon:
        env.write_config(adaptive={"watch": [{"path": str(other), "depth": 1}]})
        assert env.ctl("reload").returncode == 0
        writer = Writer(other / "hot", rate=300)
        try:
            wait_for(lambda: env.overlay_at(other / "hot"), 20, "a pin under the new root")
        finally:
            writer.stop()
        daemon.wait_log(rf"unpinned {other / 'hot'}: ", timeout=30)
        old_hot = env.data / "hot"
        writer = Writer(old_hot, rate=300)
        try:
            with pytest.raises(AssertionError):
                wait_for(lambda: env.overlay_at(old_hot), 4, "no pin under the removed root")
        finally:
            writer.stop()


def test_a_pile_of_sighups_is_at_most_one_more_reload(env: Env) -> None:
    with running(env) as daemon:
        for _ in range(20):
            daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log(r"reloaded ")
        assert env.ctl("status").returncode == 0  # the loop answered after the signals
        count = sum(1 for line in daemon.lines if re.search(r"reloaded ", line))
        assert 1 <= count <= 2, daemon.log_text()
