"""Crash matrix: kill -9 of the daemon, or a power cut (RAM dropped without write-back), at
each stage of a pin, a checkpoint, an unpin and a reload; then a fresh start must adopt what
is mounted or finish or undo the half-done step: no stacked overlays, no stale staging mounts,
no file lost (beyond the last complete checkpoint after a power cut) or torn.

The daemon is stopped at a precise point by its test-only pause hook (RAMPIPED_TEST_PAUSE_AT,
rampiped/pause.py `pause_point`): the worker writes a marker file and blocks there."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import Env, make_env
from tests.system.helpers import wait_for

pytestmark = pytest.mark.system

# Versions of the files in the pinned directory: on disk before the pin (0), after the first
# round of writes in RAM (1, checkpointed), after the second round (2, not checkpointed yet).
E0 = {**{f"a/f{i}": 0 for i in range(5)}, "old.txt": 0, "d1/x": 0}
E1 = {**{f"a/f{i}": 1 for i in range(5)}, "d2/x": 0, "d2/y": 1, "n1": 1}
E2 = {**E1, **{f"a/f{i}": 2 for i in range(3)}, "n2": 2}


def seed(d: Path) -> None:
    for rel, v in E0.items():
        safety.write_version(d / rel, rel, v)


def round1(d: Path) -> None:
    for i in range(5):
        safety.write_version(d / f"a/f{i}", f"a/f{i}", 1)
    (d / "old.txt").unlink()
    (d / "d1").rename(d / "d2")  # a directory from disk: a redirect in an overlay
    safety.write_version(d / "d2/y", "d2/y", 1)  # written at its origin before an unmount
    safety.write_version(d / "n1", "n1", 1)


def round2(d: Path) -> None:
    for i in range(3):
        safety.write_version(d / f"a/f{i}", f"a/f{i}", 2)
    safety.write_version(d / "n2", "n2", 2)


daemon = safety.paused_daemon
ctl_async = safety.ctl_async


fault = safety.fault


def check_clean_after_start(env: Env, path: Path) -> None:
    assert safety.overlays_at(path) <= 1, "stacked mounts at the pinned directory"
    pinned = {p["path"] for p in env.status()["pins"]}
    leftovers = safety.no_leftover_mounts(env.runtime)
    if not pinned:
        assert leftovers == [], f"stale staging mounts: {leftovers}"
        assert safety.overlays_at(path) == 0
    else:
        assert len(leftovers) == 2 * len(pinned), leftovers  # a RAM layer and a staging bind


def finish(env: Env, path: Path, expected: dict[str, int]) -> None:
    """Unpin if still pinned, then the disk must hold exactly `expected`."""
    if any(p["path"] == str(path) for p in env.status()["pins"]):
        env.ctl("unpin", str(path), check=True)
    assert safety.pin_mounts() == [] or all(
        not m["mountpoint"].startswith(str(env.data)) for m in safety.pin_mounts()
    )
    assert safety.no_leftover_mounts(env.runtime) == []
    problems = safety.check_tree(path, expected)
    assert problems == []


PIN_STAGES = ["pin:layers", "pin:mounted"]
LATER_STAGES = [
    "checkpoint:copied",
    "checkpoint:renamed",
    "unpin:written-early",
    "unpin:unmounted",
    "unpin:journaled",
    "apply:linked-one",
    "unpin:applied",
]
COPY_STAGES = [
    "copy-checkpoint:staged",
    "copy-checkpoint:moved",
    "copy-checkpoint:copied",
    "unpin:unmounted",
]

# After a power cut: the versions the next start must show (the last complete checkpoint).
POWER_EXPECTED = {
    ("overlay", "pin:mounted"): E0,
    ("overlay", "checkpoint:copied"): E1,
    ("overlay", "checkpoint:renamed"): E2,
    # an unpin checkpoints round 2 and writes it into the directory below the overlay (round
    # 1's renamed directory at its origin) before its unmount
    ("overlay", "unpin:written-early"): E2,
    ("overlay", "unpin:unmounted"): E2,
    ("overlay", "unpin:journaled"): E2,
    ("overlay", "apply:linked-one"): E2,  # the final generation, linked in part
    ("overlay", "unpin:applied"): E2,
    # the files a checkpoint writes whole: staged and synced, not yet renamed into place
    ("copy", "copy-checkpoint:staged"): E1,
    ("copy", "copy-checkpoint:moved"): E2,
    ("copy", "copy-checkpoint:copied"): E2,
}


@pytest.mark.parametrize("mode", ["overlay", "copy"])
@pytest.mark.parametrize("stage", PIN_STAGES)
def test_kill_while_pinning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, stage: str
) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        seed(d)
        with daemon(env, monkeypatch, stage, marker) as dm:
            pin = ctl_async(env, "pin", str(d), "--mode", mode)
            safety.wait_paused(marker, stage)
            if stage == "pin:mounted":
                round1(d)  # through the fresh mount, into RAM
            fault("kill", env, dm)
            pin.wait(30)
        with daemon(env, monkeypatch) as dm:
            check_clean_after_start(env, d)
            if stage == "pin:layers":
                dm.wait_log(r"nothing to write|never served the directory")
                assert env.status()["pins"] == []
            else:
                dm.wait_log(r"adopted " + str(d))
            finish(env, d, E1 if stage == "pin:mounted" else E0)


def _pinned_checkpointed(env: Env, mp: pytest.MonkeyPatch, d: Path, mode: str) -> None:
    """Pin, write round 1, checkpoint it, then crash (the pin stays mounted for adoption)."""
    with daemon(env, mp) as dm:
        env.ctl("pin", str(d), "--mode", mode, check=True)
        round1(d)
        env.ctl("sync", str(d), check=True)
        fault("kill", env, dm)


@pytest.mark.parametrize(
    ("mode", "stage"),
    [("overlay", s) for s in ["pinned", *LATER_STAGES]] + [("copy", s) for s in COPY_STAGES],
)
def test_kill_at_each_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, stage: str
) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        seed(d)
        _pinned_checkpointed(env, monkeypatch, d, mode)
        pause = None if stage == "pinned" else stage
        with daemon(env, monkeypatch, pause, marker) as dm:
            dm.wait_log(r"adopted " + str(d))
            check_clean_after_start(env, d)
            round2(d)
            if stage != "pinned":
                cmd = "unpin" if stage.startswith(("unpin", "apply")) else "sync"
                ctl = ctl_async(env, cmd, str(d))
                safety.wait_paused(marker, stage)
                fault("kill", env, dm)
                ctl.wait(30)
        with daemon(env, monkeypatch):
            check_clean_after_start(env, d)
            finish(env, d, E2)


@pytest.mark.parametrize(("mode", "stage"), sorted(POWER_EXPECTED))
def test_power_cut_at_each_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, stage: str
) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        seed(d)
        if stage.startswith("pin:"):
            with daemon(env, monkeypatch, stage, marker) as dm:
                pin = ctl_async(env, "pin", str(d), "--mode", mode)
                safety.wait_paused(marker, stage)
                round1(d)
                fault("power", env, dm)
                pin.wait(30)
        else:
            _pinned_checkpointed(env, monkeypatch, d, mode)
            with daemon(env, monkeypatch, stage, marker) as dm:
                dm.wait_log(r"adopted " + str(d))
                round2(d)
                cmd = "unpin" if stage.startswith(("unpin", "apply")) else "sync"
                ctl = ctl_async(env, cmd, str(d))
                safety.wait_paused(marker, stage)
                fault("power", env, dm)
                ctl.wait(30)
        with daemon(env, monkeypatch):
            assert env.status()["pins"] == []
            check_clean_after_start(env, d)
            finish(env, d, POWER_EXPECTED[(mode, stage)])


@pytest.mark.parametrize("stage", ["checkpoint:carrying", "checkpoint:carried-one"])
@pytest.mark.parametrize("kind", ["kill", "power"])
def test_a_fault_while_a_checkpoint_carries_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, stage: str
) -> None:
    """The second checkpoint of a pin made by this daemon (its ledger and clock known) moves
    the directory round 2 left alone (d2) from the last generation into its own
    (writeback/carry.py). A kill or a power cut before or after that move: the next start
    adopts the pin, or finishes the generation and applies it; nothing is lost either way."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        seed(d)
        with daemon(env, monkeypatch, stage, marker) as dm:
            env.ctl("pin", str(d), "--mode", "overlay", check=True)
            round1(d)
            env.ctl("sync", str(d), check=True)  # no ledger before: nothing carried
            round2(d)
            ctl = ctl_async(env, "sync", str(d))
            safety.wait_paused(marker, stage)
            fault(kind, env, dm)
            ctl.wait(30)
        with daemon(env, monkeypatch) as dm:
            check_clean_after_start(env, d)
            finish(env, d, E2)


def test_kill_during_a_reload_that_unpins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload drops a static pin; the daemon dies while writing it back; the next start (with
    the new configuration) finishes the write-back and does not pin it again."""
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        d = env.data / "svc"
        seed(d)
        env.write_config(adaptive={"enabled": False}, pins=[{"path": str(d), "mode": "overlay"}])
        with daemon(env, monkeypatch, "unpin:unmounted", marker) as dm:
            wait_for(lambda: env.overlay_at(d), 30, "the static pin")
            round1(d)
            env.write_config(adaptive={"enabled": False}, pins=[])
            reload = ctl_async(env, "reload")
            assert reload.wait(60) == 0, reload.stderr.read() if reload.stderr else ""
            safety.wait_paused(marker, "unpin:unmounted")
            fault("kill", env, dm)
        with daemon(env, monkeypatch) as dm:
            dm.wait_log(r"finished an interrupted draining")
            assert env.status()["pins"] == []
            check_clean_after_start(env, d)
            finish(env, d, E1)
