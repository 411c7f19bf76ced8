"""Adaptive pinning end to end: the real daemon, fanotify, overlay mounts and the write-back,
on a loop ext4 in the test run's private mount namespace."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.changes import CHANGES, populate, write
from tests.system.daemon_harness import Env, Writer, make_env, running
from tests.system.helpers import (
    diff_manifests,
    drop_caches,
    drop_lone_link_groups,
    holding_open,
    manifest,
    mount_points,
    release,
    wait_for,
)

pytestmark = pytest.mark.system


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as e:
        yield e


def seed(root: Path, files: int = 20) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"old{i}.log").write_text(f"old line {i}\n" * (i + 1))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "deep.txt").write_text("deep\n")


def test_hot_directory_is_pinned_cold_is_not_and_write_back_is_exact(env: Env) -> None:
    hot, cold = env.data / "hot", env.data / "cold"
    seed(hot)
    seed(cold)
    with running(env) as daemon:
        writer = Writer(hot, rate=300)
        light = Writer(cold, rate=1)
        try:
            wait_for(lambda: env.overlay_at(hot), 20, "the hot directory to be pinned")
            m = daemon.wait_log(r"pinned (\S+): ([\d.]+) events/s > 50/s for 1s \(overlay\)")
            assert m.group(1) == str(hot)
            assert not env.overlay_at(cold)
            st = env.status()
            pinned = {p["path"]: p for p in st["pins"]}
            assert pinned[str(hot)]["mode"] == "overlay"
            assert pinned[str(hot)]["state"] == "pinned"
            assert pinned[str(hot)]["rate"] > 50
            for key in ("ram_bytes", "dirty_bytes", "pinned_since", "last_sync", "rate"):
                assert key in pinned[str(hot)]
            # writes keep counting after the pin (seen on the RAM side)
            wait_for(lambda: env.status()["pins"][0]["dirty_bytes"] > 0, 10, "dirty bytes")
            (hot / "sub" / "deep.txt").unlink()
            (hot / "newdir").mkdir()
            (hot / "newdir" / "x").write_text("x")
        finally:
            writer.stop()
            light.stop()
        before = manifest(hot)
        assert env.overlay_at(hot), "unpinned before the load stopped"
        m = daemon.wait_log(
            r"unpinned (\S+): ([\d.]+) events/s < 5/s for 2s; wrote (\d+) files", timeout=30
        )
        assert m.group(1) == str(hot)
        assert not env.overlay_at(hot)
        assert not env.overlay_at(cold)
    after = manifest(hot)
    assert diff_manifests(before, after) == []
    drop_caches()
    assert diff_manifests(before, manifest(hot)) == []
    assert not [m for m in mount_points() if m.startswith(str(env.runtime) + "/pins/")]


def test_dry_run_mounts_nothing_and_logs_its_decisions(env: Env) -> None:
    hot = env.data / "hot"
    seed(hot)
    mounts_before = mount_points()
    with running(env, "--dry-run") as daemon:
        writer = Writer(hot, rate=300)
        try:
            daemon.wait_log(rf"would pin {hot}: [\d.]+ events/s > 50/s for 1s")
        finally:
            writer.stop()
        daemon.wait_log(rf"would unpin {hot}: ", timeout=30)
        assert mount_points() == mounts_before
        assert daemon.stop() == 0


def test_candidate_sizes_are_measured_and_decide_the_budget(env: Env) -> None:
    """The worker measures a hot candidate's size; until then its estimate is the most one pin
    may take (ram.max / max_pins: 128 MiB here), above the high watermark (102.4 MiB). Only the
    measurement lets the small candidate in, and the large one is refused for its own size."""
    small, big = env.data / "small", env.data / "big"
    seed(small)
    seed(big)
    with open(big / "blob", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 110 << 20)
    env.write_config(ram={"high_watermark": 0.4}, adaptive={"max_pins": 2})

    def blocked() -> str:
        cands = {c["path"]: c for c in env.status()["candidates"]}
        return str(cands.get(str(big), {}).get("blocked") or "")

    with running(env) as daemon:
        writers = [Writer(small, rate=300), Writer(big, rate=300)]
        try:
            wait_for(lambda: env.overlay_at(small), 20, "the small candidate to be pinned")
            wait_for(lambda: "+ estimate 110." in blocked(), 20, "the big one's measured size")
            assert "> high watermark 102.4 MiB" in blocked()
            assert not env.overlay_at(big)
        finally:
            for w in writers:
                w.stop()
        assert daemon.stop() == 0


def test_holder_blocks_pin_until_it_exits(env: Env) -> None:
    hot = env.data / "hot"
    seed(hot)
    with holding_open(hot / "held.log") as holder:
        with running(env) as daemon:
            writer = Writer(hot, rate=300)
            try:
                daemon.wait_log(rf"not pinned: cannot pin {hot}: in use by pid {holder.pid}")
                assert not env.overlay_at(hot)

                def blocked() -> str:
                    # between a refusal and the retry that follows it (while that retry runs,
                    # the candidate is being pinned and nothing blocks it yet)
                    cands = {c["path"]: c for c in env.status()["candidates"]}
                    return str(cands.get(str(hot), {}).get("blocked") or "")

                wait_for(lambda: str(holder.pid) in blocked(), 30, "the holder named as the block")
                release(holder)
                wait_for(lambda: env.overlay_at(hot), 30, "the pin once the holder is gone")
            finally:
                writer.stop()
            assert daemon.stop() == 0
        assert not env.overlay_at(hot)


def test_holder_at_unpin_keeps_the_pin_until_it_exits(env: Env) -> None:
    hot = env.data / "hot"
    seed(hot)
    with running(env) as daemon:
        writer = Writer(hot, rate=300)
        try:
            wait_for(lambda: env.overlay_at(hot), 20, "the pin")
        finally:
            writer.stop()
        with holding_open(hot / "held.log", first="held\n", last="bye\n") as holder:
            daemon.wait_log(rf"cannot unpin {hot} yet: .*pid {holder.pid}", timeout=30)
            assert env.overlay_at(hot)
            assert release(holder) == 0
        daemon.wait_log(rf"unpinned {hot}: ", timeout=60)
    assert (hot / "held.log").read_text() == "held\nbye\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_while_pinned_writes_everything_back(env: Env, sig: int) -> None:
    hot = env.data / "hot"
    seed(hot)
    with running(env) as daemon:
        assert env.ctl("pin", str(hot)).returncode == 0
        assert env.overlay_at(hot)
        (hot / "new.txt").write_text("written in RAM\n")
        (hot / "old3.log").unlink()
        before = manifest(hot)
        assert daemon.stop(sig) == 0
        daemon.wait_log(r"unpinned .*: stopping; wrote")
    assert not env.overlay_at(hot)
    assert diff_manifests(before, manifest(hot)) == []


def test_power_cut_after_checkpoint_applies_the_journal_at_next_start(env: Env) -> None:
    hot = env.data / "hot"
    seed(hot)
    with running(env) as daemon:
        assert env.ctl("pin", str(hot)).returncode == 0
        (hot / "kept.txt").write_text("checkpointed\n")
        (hot / "old1.log").unlink()
        os.rename(hot / "sub", hot / "sub-renamed")
        assert env.ctl("sync").returncode == 0
        at_checkpoint = manifest(hot)
        (hot / "lost.txt").write_text("after the checkpoint: inside the power-loss window\n")
        daemon.kill()
    power_cut(env, hot)
    assert not env.overlay_at(hot)
    with running(env) as daemon:
        daemon.wait_log(r"applied the checkpoint journal")
    drop_caches()
    assert diff_manifests(at_checkpoint, manifest(hot)) == []


def power_cut(env: Env, *pinned: Path) -> None:
    """RAM is gone and nothing was written back: the pins' mounts and the runtime tmpfs."""
    for path in pinned:
        subprocess.run(["umount", str(path)], check=True)
    below = [m for m in mount_points() if m.startswith(str(env.runtime) + "/")]
    for m in sorted(below, key=len, reverse=True):
        subprocess.run(["umount", m], check=True)
    subprocess.run(["umount", str(env.runtime.parent)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "rp-run", str(env.runtime.parent)], check=True)


@pytest.mark.parametrize("ending", ["unpin", "checkpoint_then_power_cut", "sigterm"])
def test_every_kind_of_change_reaches_the_disk(env: Env, tmp_path: Path, ending: str) -> None:
    hot = env.data / "hot"
    hot.mkdir()
    outside = tmp_path / "outside"
    write(outside / "victim", "must survive")
    populate(hot, outside)
    with running(env) as daemon:
        assert env.ctl("pin", str(hot)).returncode == 0
        assert env.overlay_at(hot)
        for change in CHANGES.values():
            change(hot)
        expected = drop_lone_link_groups(manifest(hot))
        if ending == "unpin":
            done = env.ctl("unpin", str(hot))
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"unpinned {hot}: wrote ")
        elif ending == "sigterm":
            assert daemon.stop() == 0
        else:
            assert env.ctl("sync").returncode == 0
            daemon.kill()
            power_cut(env, hot)
    if ending == "checkpoint_then_power_cut":
        assert not env.overlay_at(hot)
        with running(env) as daemon:
            daemon.wait_log(rf"{hot}: applied the checkpoint journal")
    assert not env.overlay_at(hot)
    drop_caches()
    assert diff_manifests(expected, drop_lone_link_groups(manifest(hot))) == []
    assert (outside / "victim").read_text() == "must survive"


def test_periodic_checkpoints_fill_the_journal(env: Env) -> None:
    hot = env.data / "hot"
    seed(hot)
    env.write_config(sync={"interval": "1s"})
    with running(env) as daemon:
        assert env.ctl("pin", str(hot)).returncode == 0
        (hot / "fresh.txt").write_text("to be checkpointed\n")
        journals = env.journal

        def checkpointed() -> Path | None:
            for gen in journals.glob("*/gen-*"):
                if not gen.name.endswith(".tmp") and (gen / "fresh.txt").exists():
                    return gen
            return None

        gen = wait_for(checkpointed, 15, "a journal generation holding the new file")
        assert (gen / "fresh.txt").read_text() == "to be checkpointed\n"
        daemon.wait_log(rf"checkpoint of {hot} \(periodic")
        last = env.status()["pins"][0]["last_sync"]
        assert last["ok"] is True
        assert daemon.stop() == 0
    assert not list(journals.glob("*/gen-*")), "the journal outlived the unpin"


def test_status_and_exit_codes(env: Env) -> None:
    assert env.ctl("status").returncode == 3  # not running
    with running(env):
        st = env.status()
        assert st["pins"] == [] and "candidates" in st and "ram" in st
        bad = env.ctl("unpin", str(env.data / "nothing"))
        assert bad.returncode == 1 and "is not pinned" in bad.stderr
        assert env.ctl("pin", "/proc").returncode == 1
