"""Copy pins and the moments when the path shows the disk while RAM still holds changes not
written back: an unpin whose RAM changed after its verified sync (a process still writing),
and a pin rolled back after its bind. What processes write on disk in those moments stays, and
what reached RAM is written back (copymode.WindowWriteBack)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import Env, running
from tests.system.helpers import held_index, holding_open, wait_for
from tests.system.helpers import release as let_go
from tests.system.safety import append, release

pytestmark = pytest.mark.system

SYNCED = "unpin:copy-synced"
UNMOUNTED = "unpin:unmounted"
WRITTEN = "copy-window:written"


def assert_clean(env: Env, d: Path) -> None:
    assert env.mounted_at(d) is None
    assert env.status()["pins"] == []
    assert not (d / ".rampiped-held").exists()
    assert safety.no_leftover_mounts(env.runtime) == []
    assert not [n for n in os.listdir(d) if "rampiped" in n], os.listdir(d)


def seed(d: Path) -> None:
    d.mkdir()
    (d / "a.log").write_text("disk 1\n")
    (d / "c.log").write_text("c disk\n")
    (d / "gone").write_text("deleted in RAM\n")
    (d / "old-dir").mkdir()
    (d / "old-dir" / "x").write_text("x\n")


def change_in_ram(d: Path) -> None:
    append(d / "a.log", "ram 2\n")
    (d / "made-in-ram").write_text("ram\n")
    (d / "gone").unlink()
    shutil.rmtree(d / "old-dir")


def write_on_disk(d: Path) -> None:
    append(d / "a.log", "disk 3\n")  # a file RAM changed too: the append follows RAM's version
    append(d / "c.log", "c window\n")  # a file RAM did not change
    (d / "made-on-disk").write_text("window\n")  # a new name
    (d / "old-dir" / "new").write_text("window in a directory RAM deleted\n")


def assert_both_kept(d: Path) -> None:
    assert (d / "a.log").read_text() == "disk 1\nram 2\ndisk 3\n"
    assert (d / "c.log").read_text() == "c disk\nc window\n"
    assert (d / "made-on-disk").read_text() == "window\n"
    assert (d / "made-in-ram").read_text() == "ram\n"
    assert not (d / "gone").exists()  # deleted in RAM, untouched on disk: deleted
    assert (d / "old-dir" / "new").read_text() == "window in a directory RAM deleted\n"
    assert not (d / "old-dir" / "x").exists()


def staged(
    env: Env, marker: Path, args: list[str], steps: list[tuple[str, Callable[[], None]]]
) -> tuple[int, str, str]:
    """rampipectl `args` in the background; at each (stage, action) of `steps` in turn: wait
    for the daemon to pause there, act, let it go on. Returns its exit code and output."""
    ctl = safety.ctl_async(env, *args)
    try:
        for stage, action in steps:
            safety.wait_paused(marker, stage)
            action()
            release(marker)
        out, err = ctl.communicate(timeout=120)
        return ctl.returncode, out, err
    finally:
        release(marker)
        if ctl.poll() is None:
            ctl.kill()
            ctl.communicate()


def test_unpin_while_ram_still_changes_keeps_what_is_written_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAM changes after the verified sync (a process still writing at the unpin), so a
    write-back follows the unmount; what a process writes on disk during it stays: an append
    to a file RAM changed too, an append to one it did not, a new file, a file in a directory
    RAM deleted."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "copy"
        seed(d)
        with safety.paused_daemon(
            env, monkeypatch, f"{SYNCED},{UNMOUNTED},{WRITTEN}", marker
        ) as dm:
            env.ctl("pin", "--mode", "copy", str(d), check=True)
            append(d / "a.log", "ram 1b\n")

            def in_ram() -> None:
                assert env.mounted_at(d) is not None
                change_in_ram(d)

            def on_disk() -> None:
                assert env.mounted_at(d) is None
                write_on_disk(d)

            rc, out, err = staged(
                env,
                marker,
                ["unpin", str(d)],
                [
                    (SYNCED, in_ram),
                    (UNMOUNTED, on_disk),
                    # RAM's version is at the name now; a logger opening it anew appends to it
                    (WRITTEN, lambda: append(d / "c.log", "c after\n")),
                ],
            )
            assert rc == 0, (out, err, dm.log_text()[-3000:])
            assert (d / "a.log").read_text() == "disk 1\nram 1b\nram 2\ndisk 3\n"
            assert (d / "c.log").read_text() == "c disk\nc window\nc after\n", dm.log_text()
            assert (d / "made-on-disk").read_text() == "window\n"
            assert (d / "made-in-ram").read_text() == "ram\n"
            assert not (d / "gone").exists()
            assert (d / "old-dir" / "new").read_text() == "window in a directory RAM deleted\n"
            assert not (d / "old-dir" / "x").exists()
            assert_clean(env, d)
            assert "rampiped-conflict" not in dm.log_text()


def test_a_rewrite_on_disk_during_the_write_back_is_kept_as_a_conflict_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "copy"
        d.mkdir()
        (d / "conf").write_text("version 1\n")
        with safety.paused_daemon(env, monkeypatch, f"{SYNCED},{UNMOUNTED}", marker) as dm:
            env.ctl("pin", "--mode", "copy", str(d), check=True)
            rc, out, err = staged(
                env,
                marker,
                ["unpin", str(d)],
                [
                    (SYNCED, lambda: (d / "conf").write_text("version 2 (RAM)\n")),
                    # rewritten, not appended to
                    (UNMOUNTED, lambda: (d / "conf").write_text("v3 on disk\n")),
                ],
            )
            assert rc == 0, (out, err, dm.log_text()[-3000:])
            assert (d / "conf").read_text() == "version 2 (RAM)\n"
            assert (d / "conf.rampiped-conflict").read_text() == "v3 on disk\n"
            dm.wait_log(r"rewritten on disk during the write-back .*conf\.rampiped-conflict")


def test_a_crash_during_the_write_back_after_the_unmount_is_finished_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "copy"
        seed(d)
        with safety.paused_daemon(
            env, monkeypatch, f"{SYNCED},{UNMOUNTED},{WRITTEN}", marker
        ) as dm:
            env.ctl("pin", "--mode", "copy", str(d), check=True)
            append(d / "a.log", "ram 1b\n")
            safety.count("crash points")
            rc, _, _ = staged(
                env,
                marker,
                ["unpin", str(d)],
                [
                    (SYNCED, lambda: change_in_ram(d)),
                    (UNMOUNTED, lambda: write_on_disk(d)),
                    (WRITTEN, dm.kill),
                ],
            )
            assert rc != 0
        with running(env) as dm:
            dm.wait_log(r"finished an interrupted draining: wrote \d+ files")
            assert (d / "a.log").read_text() == "disk 1\nram 1b\nram 2\ndisk 3\n"
            assert (d / "c.log").read_text() == "c disk\nc window\n"
            assert (d / "made-on-disk").read_text() == "window\n"
            assert (d / "made-in-ram").read_text() == "ram\n"
            assert not (d / "gone").exists()
            assert (d / "old-dir" / "new").exists()
            assert_clean(env, d)


def test_a_power_cut_after_the_unmount_carries_what_the_held_files_got(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut once RAM's version has replaced a file that a process still holds open on
    disk and writes into: the replaced file is held in the journal (outside the directory, no
    name of rampiped's in it), and the next start carries what the process wrote to the name,
    as the unpin would have."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env, contextlib.ExitStack() as stack:
        d = env.data / "copy"
        seed(d)
        holder: list[subprocess.Popen[str]] = []
        with safety.paused_daemon(
            env, monkeypatch, f"{SYNCED},{UNMOUNTED},{WRITTEN}", marker
        ) as dm:
            env.ctl("pin", "--mode", "copy", str(d), check=True)
            append(d / "a.log", "ram 1b\n")

            def on_disk() -> None:
                write_on_disk(d)
                holder.append(
                    stack.enter_context(holding_open(d / "a.log", "held 3b\n", "held 4\n"))
                )

            def cut() -> None:
                assert not [n for n in os.listdir(d) if "rampiped" in n], os.listdir(d)
                assert [h for h in env.journal.glob("*/held") if held_index(h)]
                assert let_go(holder[0]) == 0  # into the replaced file, only held now
                safety.fault("power", env, dm)

            rc, _, _ = staged(
                env,
                marker,
                ["unpin", str(d)],
                [(SYNCED, lambda: change_in_ram(d)), (UNMOUNTED, on_disk), (WRITTEN, cut)],
            )
            assert rc != 0
        with running(env) as dm:
            dm.wait_log(r"RAM copy lost")
            assert (d / "a.log").read_text() == (
                "disk 1\nram 1b\nram 2\ndisk 3\nheld 3b\nheld 4\n"
            ), dm.log_text()[-3000:]
            assert (d / "made-on-disk").read_text() == "window\n"
            assert (d / "made-in-ram").read_text() == "ram\n"
            assert_clean(env, d)
        assert not list(env.journal.glob("*/held"))


def test_a_failed_write_back_after_the_unmount_brings_disk_writes_into_ram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rsync fails after the unmount: the copy covers the path again, and what was written on
    disk meanwhile is in it (else the copy would hide it and the next checkpoint delete it);
    the retried unpin writes it all."""
    marker = tmp_path / "paused"
    flag = safety.failing_rsync(tmp_path, monkeypatch)
    with safety.manual_env(tmp_path) as env:
        d = env.data / "copy"
        seed(d)
        with safety.paused_daemon(env, monkeypatch, f"{SYNCED},{UNMOUNTED}", marker) as dm:
            env.ctl("pin", "--mode", "copy", str(d), check=True)

            def in_ram() -> None:
                change_in_ram(d)
                # a directory: what rsync writes after the unmount (regular files, symlinks
                # and hard links are made by rampiped itself, in the hold directory in the
                # journal, and renamed into place)
                os.mkdir(d / "made-dir")
                os.symlink("a.log", d / "made-link")

            def disk_writes_then_rsync_fails() -> None:
                write_on_disk(d)
                flag.touch()

            safety.count("disk faults")
            rc, out, err = staged(
                env,
                marker,
                ["unpin", str(d)],
                [(SYNCED, in_ram), (UNMOUNTED, disk_writes_then_rsync_fails)],
            )
            assert rc == 1, (out, err)
            assert "exited with code 11" in err, err
            assert env.mounted_at(d) is not None  # the copy covers the path again
            # with what the disk got meanwhile
            assert (d / "made-on-disk").read_text() == "window\n"
            assert (d / "c.log").read_text() == "c disk\nc window\n"
            assert (d / "old-dir" / "new").exists()
            assert (d / "a.log").read_text() == "disk 1\nram 2\n"
            assert (d / "a.log.rampiped-conflict").read_text() == "disk 1\ndisk 3\n"
            dm.wait_log(r"brought back into RAM what was written on disk")
            flag.unlink()
            safety.wait_unpinned_releasing(dm, marker, d)
        assert (d / "made-on-disk").read_text() == "window\n"
        assert (d / "c.log").read_text() == "c disk\nc window\n"
        assert (d / "a.log").read_text() == "disk 1\nram 2\n"
        assert (d / "a.log.rampiped-conflict").read_text() == "disk 1\ndisk 3\n"
        assert (d / "made-in-ram").read_text() == "ram\n"
        assert not (d / "gone").exists()
        assert os.readlink(d / "made-link") == "a.log"
        assert (d / "made-dir").is_dir()


def test_a_pin_rolled_back_after_its_bind_writes_back_what_reached_ram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write reaches the disk between the copy and the bind (through a file opened before),
    so the pin is rolled back; what a process wrote into RAM in that moment is written back,
    and the disk write stays."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "copy"
        d.mkdir()
        (d / "a.log").write_text("disk 1\n")
        (d / "late.log").write_text("late 1\n")
        with safety.paused_daemon(env, monkeypatch, "pin:layers,pin:bound", marker) as dm:
            with safety.pin_with_late_writer(
                env, marker, ["--mode", "copy", str(d)], d / "late.log", "pin:bound"
            ) as (ctl, late):
                assert env.mounted_at(d) is not None
                late.write("late 2 (disk)\n")
                late.flush()
                append(d / "a.log", "ram 2\n")  # through the bind: into RAM
                (d / "made-in-ram").write_text("ram\n")
                release(marker)
                out, err = ctl.communicate(timeout=120)
            assert ctl.returncode != 0, (out, err)
            assert "written on disk during the pin" in err, err
            assert env.mounted_at(d) is None
            assert (d / "late.log").read_text() == "late 1\nlate 2 (disk)\n"
            assert (d / "a.log").read_text() == "disk 1\nram 2\n"
            assert (d / "made-in-ram").read_text() == "ram\n"
            dm.wait_log(r"rolled back; wrote back what reached RAM meanwhile")
            wait_for(lambda: env.status()["pins"] == [], 30, "the pin to be gone")
            assert_clean(env, d)


# -- the same moment for an overlay pin ---------------------------------------------------------


def test_an_overlay_pin_refused_after_its_mount_writes_back_what_reached_ram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process opens a file on disk between the holder check and the mount, so the pin is
    refused after it; what another process wrote through the overlay meanwhile is written
    back, and the late writer's writes stay."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "over"
        d.mkdir()
        (d / "a.log").write_text("disk 1\n")
        (d / "late.log").write_text("late 1\n")
        with safety.paused_daemon(env, monkeypatch, "pin:layers,pin:overlay-mounted", marker) as dm:
            with safety.pin_with_late_writer(
                env, marker, [str(d)], d / "late.log", "pin:overlay-mounted"
            ) as (ctl, late):
                assert env.overlay_at(d)
                append(d / "a.log", "ram 2\n")
                (d / "made-in-ram").write_text("ram\n")
                release(marker)
                out, err = ctl.communicate(timeout=120)
                late.write("late 2\n")
                late.flush()
            assert ctl.returncode != 0, (out, err)
            assert "opened on disk during the pin" in err, err
            assert "what reached RAM meanwhile was written back" in err, dm.log_text()
            assert not env.overlay_at(d)
            assert (d / "a.log").read_text() == "disk 1\nram 2\n"
            assert (d / "made-in-ram").read_text() == "ram\n"
            assert (d / "late.log").read_text() == "late 1\nlate 2\n"
            wait_for(lambda: env.status()["pins"] == [], 30, "the pin to be gone")
            assert safety.no_leftover_mounts(env.runtime) == []
            assert "could not write back" not in dm.log_text()


def test_an_overlay_pin_refused_while_ram_is_held_stays_until_it_can_be_written_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but a process also holds a file in RAM, so the write-back cannot be done at
    once: the pin stays mounted (nothing is dropped) and the unpin is retried until it can.
    The late writer keeps writing to the disk file below RAM's copy of it; the unpin puts
    what it added after RAM's version."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "over"
        d.mkdir()
        (d / "a.log").write_text("disk 1\n")
        (d / "late.log").write_text("late 1\n")
        with safety.paused_daemon(env, monkeypatch, "pin:layers,pin:overlay-mounted", marker) as dm:
            with (
                safety.pin_with_late_writer(
                    env, marker, [str(d)], d / "late.log", "pin:overlay-mounted"
                ) as (ctl, late),
                open(d / "a.log", "a") as held,  # a writer holding it in RAM
            ):
                held.write("ram 2\n")
                held.flush()
                append(d / "late.log", "late ram\n")  # RAM's copy of the late writer's file
                release(marker)
                out, err = ctl.communicate(timeout=120)
                assert ctl.returncode != 0, (out, err)
                assert "stays pinned until its unpin" in err, err
                assert env.overlay_at(d)  # nothing dropped
                assert [p["path"] for p in env.status()["pins"]] == [str(d)]
                late.write("late 2 (disk)\n")  # below the overlay
                late.flush()
                held.write("ram 3\n")
                held.close()
                late.close()
                dm.wait_log(r"unpinned " + re.escape(str(d)), timeout=90)
            assert (d / "a.log").read_text() == "disk 1\nram 2\nram 3\n"
            assert (d / "late.log").read_text() == "late 1\nlate ram\nlate 2 (disk)\n"
            wait_for(lambda: env.status()["pins"] == [], 30, "the pin to be gone")
            assert safety.no_leftover_mounts(env.runtime) == []


LATE_STAGES = "pin:layers,pin:overlay-mounted,pin:late-holders"


def pin_with_a_late_write(
    env: Env, marker: Path, d: Path, before: Callable[[], None] = lambda: None
) -> tuple[int, str, str]:
    """`rampipectl pin d` while a process opens `d/late.log` on disk between the holder check
    and the mount; at the mount `before` runs, then that process appends `late 2` once the
    pin has seen it holding the file, and closes it. rampipectl's exit status and output."""
    with safety.pin_with_late_writer(
        env, marker, [str(d)], d / "late.log", "pin:overlay-mounted"
    ) as (ctl, late):
        before()
        release(marker)
        safety.wait_paused(marker, "pin:late-holders")  # it was seen holding the file
        late.write("late 2\n")
        late.close()
        release(marker)
        out, err = ctl.communicate(timeout=120)
    return ctl.returncode, out, err


def test_an_overlay_pin_waits_out_a_late_writer_that_lets_go_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process opens a file on disk between the holder check and the mount, appends to it
    there and closes it a moment later (the way loggers write): the pin is made, the overlay
    shows what it appended, and the disk keeps it after the unpin."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "over"
        d.mkdir()
        (d / "late.log").write_text("late 1\n")
        with safety.paused_daemon(env, monkeypatch, LATE_STAGES, marker) as dm:
            code, out, err = pin_with_a_late_write(env, marker, d)
            assert code == 0, (out, err)
            assert env.overlay_at(d)
            assert (d / "late.log").read_text() == "late 1\nlate 2\n"
            append(d / "late.log", "ram 3\n")
            env.ctl("unpin", str(d), check=True)
            assert not env.overlay_at(d)
            assert (d / "late.log").read_text() == "late 1\nlate 2\nram 3\n"
            assert "cannot pin" not in dm.log_text()


def test_a_late_writer_behind_ram_copy_of_its_file_refuses_the_pin_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the file was copied into RAM (written through the overlay) before the
    late writer's last write reached the disk below: the overlay does not show that write, so
    the pin is refused, and both writes are kept after its write-back (before this, the disk
    file was replaced by RAM's copy, and the late write was lost)."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "over"
        d.mkdir()
        (d / "late.log").write_text("late 1\n")
        with safety.paused_daemon(env, monkeypatch, LATE_STAGES, marker) as dm:
            # through the overlay first: copied up
            code, out, err = pin_with_a_late_write(
                env, marker, d, lambda: append(d / "late.log", "ram 2\n")
            )
            assert code != 0, (out, err)
            assert "opened on disk during the pin" in err, err
            assert not env.overlay_at(d)
            wait_for(lambda: env.status()["pins"] == [], 30, "the pin to be gone")
            # what the disk file holds beyond the bytes RAM's copy shares with it is appended
            assert sorted(os.listdir(d)) == ["late.log"]
            assert (d / "late.log").read_text() == "late 1\nram 2\nlate 2\n"
            assert safety.no_leftover_mounts(env.runtime) == []
            assert "could not write back" not in dm.log_text()


def test_a_reader_that_opened_a_file_during_a_copy_pin_is_waited_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process opens a file on disk for reading in the moment between the check and the
    bind (a reader of the directory): it cannot write through it, so the pin waits until it
    lets go instead of refusing (it was refused: "opened on disk during the pin"), and
    RAM's copy is what the directory shows then."""
    marker = tmp_path / "paused"
    stages = "pin:layers,pin:late-readers"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "copy"
        seed(d)
        with safety.paused_daemon(env, monkeypatch, stages, marker) as dm:
            with safety.pin_with_late_writer(
                env, marker, ["--mode", "copy", str(d)], d / "a.log", "pin:late-readers", "r"
            ) as (ctl, reader):
                assert reader.read() == "disk 1\n"
                reader.close()
                release(marker)
                out, err = ctl.communicate(timeout=60)
                assert ctl.returncode == 0, (out, err, dm.log_text()[-3000:])
            assert env.mounted_at(d) is not None
            append(d / "a.log", "ram 2\n")
            assert env.ctl("unpin", str(d)).returncode == 0, dm.log_text()[-3000:]
        assert (d / "a.log").read_text() == "disk 1\nram 2\n"


def test_a_reader_that_keeps_a_file_opened_during_a_copy_pin_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same reader keeps its file open: it would go on reading the disk, not RAM's copy,
    so the pin is refused once the wait ends, and nothing is left mounted."""
    marker = tmp_path / "paused"
    stages = "pin:layers,pin:late-readers"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "copy"
        seed(d)
        args = ["--mode", "copy", str(d)]
        with (
            safety.paused_daemon(env, monkeypatch, stages, marker),
            safety.pin_with_late_writer(
                env, marker, args, d / "a.log", "pin:late-readers", "r"
            ) as (ctl, _reader),
        ):
            release(marker)
            out, err = ctl.communicate(timeout=60)
        assert ctl.returncode == 1, (out, err)
        assert "opened on disk during the pin" in err, err
        assert env.mounted_at(d) is None
        assert (d / "a.log").read_text() == "disk 1\n"
