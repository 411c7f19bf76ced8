"""The moves of renamed directories on a filesystem where one journal commit takes every change
before it, in order (durable.fsync_commits_all): its steps are not synced one by one, and the
apply's closing commit makes them durable together. A power cut (the device image copied
while ext4 commits only when asked: commit=600) after each step of the plan, after the apply
returned, and after a journal commit in the middle, loses nothing: an apply of the same layer
on the rebooted disk resumes from the plan it finds, and the disk then shows the view."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from rampiped import durable, writeback
from rampiped.writeback import moves
from tests.system import changes
from tests.system.changes import populate
from tests.system.helpers import LoopFs, diff_manifests, drop_caches, syncfs_path
from tests.system.test_copymode import make_loopfs_from
from tests.system.test_journal_power_cut import after
from tests.system.test_sync_overlay import Pin, oracle, pin

pytestmark = pytest.mark.system

__all__ = ["pin"]  # the fixture, used by name


@pytest.mark.parametrize("plan_in", ["xattr", "file"])
@pytest.mark.parametrize("committed", [False, True])
def test_a_power_cut_during_the_moves_is_resumed(
    loopfs: LoopFs,
    pin: Pin,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    committed: bool,
    plan_in: str,
) -> None:
    """`committed`: a journal commit (another file's fsync) just before each cut, which takes
    every step made so far. `plan_in`: where the plan is kept, the stash's attribute, or its
    file (a plan too large for the attribute)."""
    if plan_in == "file":
        monkeypatch.setattr(moves.attrdoc, "MOST", 0)
    subprocess.run(["mount", "-o", "remount,commit=600", str(loopfs.mountpoint)], check=True)
    assert durable.fsync_commits_all(str(loopfs.mountpoint))
    outside = tmp_path / "outside"
    outside.mkdir()
    populate(pin.disk, outside)
    syncfs_path(loopfs.mountpoint)
    pin.mount()
    changes.ch_dir_rename(pin.disk)
    changes.ch_rename_renamed(pin.disk)
    view = oracle(pin.disk)
    pin.unmount_overlay()
    images: list[tuple[str, Path]] = []
    other = loopfs.mountpoint / "other"
    other.mkdir()

    def cut(label: str) -> None:
        if label == "planned":
            stash = pin.disk / writeback.STASH_NAME
            assert (plan_in == "xattr") == (moves._PLAN_XATTR in os.listxattr(stash)), label
            assert (plan_in == "file") == (stash / "plan.json").exists(), label
        if committed:
            durable.commit(str(other))
        image = tmp_path / f"{len(images)}-{label}.img"
        subprocess.run(["cp", "--sparse=always", str(loopfs.image), str(image)], check=True)
        images.append((label, image))

    steps = iter(["planned", "stashed", "placed", "done"])
    monkeypatch.setattr(moves, "_write_plan", after(moves._write_plan, lambda: cut(next(steps))))
    # past "stash", a phase is an empty file of its own (no write-out between the renames)
    monkeypatch.setattr(moves, "_set_phase", after(moves._set_phase, lambda: cut(next(steps))))
    writeback.apply_upper(str(pin.upper), str(pin.disk))
    cut("returned")
    monkeypatch.undo()
    assert [label for label, _ in images][:3] == ["planned", "stashed", "placed"], images
    assert diff_manifests(view, oracle(pin.disk)) == []

    for label, image in images:
        with make_loopfs_from(image, tmp_path / f"rebooted-{label}") as rebooted:
            data = rebooted / "data"
            if label in ("planned", "stashed", "placed"):
                writeback.apply_upper(str(pin.upper), str(data))  # resumes from the plan
                assert not (data / writeback.STASH_NAME).exists(), label
            drop_caches()
            found = {k: v for k, v in oracle(data).items() if writeback.STASH_NAME not in k}
            assert diff_manifests(view, found) == [], label
        image.unlink()
