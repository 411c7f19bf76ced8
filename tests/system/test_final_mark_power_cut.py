"""A power cut during an overlay unpin, right after its final mark and before the apply:
the mark has no journal commit of its own where ext4 commits in order (the apply's commits
take it), and its data is not even written out, so the device keeps it, or keeps it empty, or
not at all. Either way the next start applies the journal and
the directory shows what the pin showed, the renamed directory at its new name. The device
image is copied at that moment while ext4 commits only when asked (commit=600): what the page
cache held and no commit took is lost, as in a power cut."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from rampiped.writeback import CONFLICT_SUFFIX
from tests.system import safety
from tests.system.daemon_harness import running
from tests.system.helpers import drop_caches, held_index, tree

pytestmark = pytest.mark.system


@pytest.mark.parametrize(
    ("changed_after_early", "committed"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["moves-only", "changed", "moves-only-empty-mark", "changed-empty-mark"],
)
def test_a_power_cut_right_after_the_final_mark_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changed_after_early: bool, committed: bool
) -> None:
    """`changed_after_early`: a file changed after the write-back before the unmount (the
    overlay still mounted), so the final generation is a new one (else the one written early,
    with only the moves left). `committed`: a journal commit takes the mark's name before the
    cut (an fsync of its directory, as the apply's first commit would): the mark is not
    written out, so the device holds it empty."""
    marker = tmp_path / "paused"
    saved = tmp_path / "cut.img"
    with safety.manual_env(tmp_path) as env:
        disk = env.disk
        d = env.data / "app"
        (d / "old").mkdir(parents=True)
        for i in range(8):
            (d / "old" / f"f{i}").write_text(f"on disk {i}\n" * 50)
        (d / "keep.log").write_text("line\n" * 100)
        os.sync()
        subprocess.run(["mount", "-o", "remount,commit=600", str(disk.mountpoint)], check=True)
        stages = "unpin:recorded,unpin:journaled"
        with safety.paused_daemon(env, monkeypatch, stages, marker) as dm:
            env.ctl("pin", "--mode", "overlay", str(d), check=True)
            (d / "old").rename(d / "new")
            (d / "new" / "f0").write_text("changed in RAM\n")
            safety.append(d / "keep.log", "appended in RAM\n")
            (d / "fresh").write_bytes(written_early := os.urandom(5000))
            ctl = safety.ctl_async(env, "unpin", str(d))
            try:
                safety.wait_paused(marker, "unpin:recorded")
                if changed_after_early:
                    # a file made in RAM (one taken from the disk below, such as keep.log,
                    # would be appended to in place, whatever the apply does)
                    (d / "fresh").write_bytes(os.urandom(5000))
                view = tree(d)
                safety.release(marker)
                safety.wait_paused(marker, "unpin:journaled")
                if committed:
                    (mark,) = env.journal.glob("*/final.json")
                    fd = os.open(mark.parent, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                if committed and changed_after_early:
                    # a logger appends to the disk file the apply replaces and fsyncs: the
                    # file is held (its index in the hold directory's attribute), and after
                    # the cut its version is kept. A conflict copy: RAM rewrote the file in
                    # the last moment, and the disk file was not read before the unmount
                    # (writeback.touched_entries, read=False after an early write-back)
                    line = b"appended on disk after the unmount\n"
                    with open(d / "fresh", "ab") as f:
                        f.write(line)
                        f.flush()
                        os.fsync(f.fileno())
                    view["fresh" + CONFLICT_SUFFIX] = written_early + line
                subprocess.run(["cp", "--sparse=always", str(disk.image), str(saved)], check=True)
                safety.fault("power", env, dm)
            finally:
                safety.release(marker)
                ctl.kill()
                ctl.communicate()
        # the disk as the cut left it: the image, where the disk's mount was
        subprocess.run(["umount", "-R", str(disk.mountpoint)], check=True)
        device = subprocess.run(
            ["losetup", "--find", "--show", str(saved)], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            subprocess.run(["mount", device, str(disk.mountpoint)], check=True)
            try:
                # what this test is about: no commit took the final mark before the cut, or
                # one took its name but not its data
                marks = list(env.journal.glob("*/final.json"))
                if committed:
                    assert [m.stat().st_size for m in marks] == [0]
                else:
                    assert marks == []
                if committed and not changed_after_early:
                    # nothing held after the unmount: its hold's index not written out either
                    # (its first save is an attribute of the hold directory, if anything)
                    holds = list(env.journal.glob("*/held"))
                    assert len(holds) == 1 and not (holds[0] / "held.json").exists(), holds
                    index = held_index(holds[0])
                    assert index is None or json.loads(index)["entries"] == [], index
                with running(env) as dm2:
                    dm2.wait_log(r"applied the checkpoint journal left by a power cut")
                    assert env.status()["pins"] == []
                    assert dm2.stop() == 0, dm2.log_text()[-3000:]
                drop_caches()
                assert tree(d) == view
                assert not (d / "old").exists()
            finally:
                subprocess.run(["umount", "-R", str(disk.mountpoint)], check=True)
        finally:
            subprocess.run(["losetup", "-d", device], capture_output=True)
        subprocess.run(["mount", disk.device, str(disk.mountpoint)], check=True)
