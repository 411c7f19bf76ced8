"""Writes that reach the disk while an overlay pin is written back. Between the unmount and the
end of the write-back the path shows the disk; a process that opens a file anew there writes
into the disk file that the write-back replaces with the RAM version. Those writes must not be
lost: appends end up after the RAM version, entries created under whiteouts or in opaque
directories stay, and a rewrite is kept as NAME.rampiped-conflict.

Each test stops the daemon right after the unmount (RAMPIPED_TEST_PAUSE_AT=unpin:unmounted),
writes on disk as another process would, and lets the unpin go on."""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import Daemon, Env, Writer, make_env, running
from tests.system.helpers import held_index, wait_for

pytestmark = pytest.mark.system


@pytest.fixture(autouse=True)
def _late_write_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests need the window as it is when nothing was written back before the unmount
    (a pin with a renamed directory, a mapped file or a late disk writer): the disk shows the
    state of the pin until the write-back ends. test_early_write_back.py covers the rest."""
    monkeypatch.setenv("RAMPIPED_TEST_LATE_WRITEBACK", "1")


STAGE = "unpin:unmounted"


def daemon(
    env: Env, mp: pytest.MonkeyPatch, marker: Path | None
) -> contextlib.AbstractContextManager[Daemon]:
    return safety.paused_daemon(env, mp, STAGE, marker)


ctl_async = safety.ctl_async


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:  # open anew, write, close: a logger
        f.write(text)


@contextlib.contextmanager
def paused_unpin(env: Env, dm: Daemon, d: Path, marker: Path) -> Iterator[None]:
    """Unpin `d`; the body runs while the daemon waits right after the unmount."""
    ctl = ctl_async(env, "unpin", str(d))
    try:
        safety.wait_paused(marker, STAGE)
        assert not env.overlay_at(d), "the overlay is still mounted at the pause"
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        out, err = ctl.communicate(timeout=120)
    assert ctl.returncode == 0, (out, err, dm.log_text()[-3000:])


def assert_clean(env: Env, d: Path) -> None:
    assert not env.overlay_at(d)
    assert env.status()["pins"] == []
    assert not (d / ".rampiped-held").exists()
    assert not (d / ".rampiped-apply").exists()
    assert safety.no_leftover_mounts(env.runtime) == []
    leftovers = [n for n in os.listdir(d) if n.endswith(".rampiped-new")]
    assert leftovers == []


def test_a_file_first_written_just_before_the_unmount_keeps_its_appends_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file first written through the pin after the disk files were recorded, in the instant
    before the unmount (seen once under load): what is appended to it on disk during the
    write-back follows RAM's version, as for any other file, not a conflict file."""
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        d.mkdir()
        (d / "a.log").write_text("a disk\n")
        (d / "b.log").write_text("b disk\n")
        stages = "unpin:recorded,unpin:unmounted"
        with safety.paused_daemon(env, monkeypatch, stages, marker) as dm:
            env.ctl("pin", str(d), check=True)
            append(d / "a.log", "a ram\n")  # in RAM before the record
            ctl = ctl_async(env, "unpin", str(d))
            try:
                safety.wait_paused(marker, "unpin:recorded")
                assert env.overlay_at(d)
                append(d / "b.log", "b ram\n")  # copied up only now
                safety.release(marker)
                safety.wait_paused(marker, "unpin:unmounted")
                append(d / "b.log", "b window\n")
                append(d / "a.log", "a window\n")
            finally:
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()
                out, err = ctl.communicate(timeout=120)
            assert ctl.returncode == 0, (out, err, dm.log_text()[-3000:])
            assert (d / "b.log").read_text() == "b disk\nb ram\nb window\n"
            assert (d / "a.log").read_text() == "a disk\na ram\na window\n"
            assert not list(d.glob("*.rampiped-conflict"))
            assert_clean(env, d)


def test_appends_in_the_window_follow_the_ram_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        (d / "sub").mkdir(parents=True)
        (d / "a.log").write_text("disk 1\n")
        (d / "sub" / "b.log").write_text("b disk\n" * 1000)
        (d / "we*ird[1].log").write_text("w disk\n")
        (d / "untouched.log").write_text("u disk\n")
        big = "x" * (3 << 20)  # compared by its edges, not whole
        (d / "big.log").write_text(big)
        with daemon(env, monkeypatch, marker) as dm:
            env.ctl("pin", str(d), check=True)
            assert env.overlay_at(d)
            append(d / "a.log", "ram 2\n")
            append(d / "sub" / "b.log", "b ram\n")
            append(d / "we*ird[1].log", "w ram\n")
            append(d / "big.log", "big ram\n")
            (d / "new.log").write_text("new ram\n")
            with paused_unpin(env, dm, d, marker):
                append(d / "a.log", "disk 3\n")
                append(d / "sub" / "b.log", "b window\n")
                append(d / "we*ird[1].log", "w window\n")
                append(d / "untouched.log", "u window\n")
                append(d / "big.log", "big window\n")
                append(d / "new.log", "new window\n")  # created on disk at the RAM file's name
            assert (d / "a.log").read_text() == "disk 1\nram 2\ndisk 3\n"
            assert (d / "sub" / "b.log").read_text() == "b disk\n" * 1000 + "b ram\nb window\n"
            assert (d / "we*ird[1].log").read_text() == "w disk\nw ram\nw window\n"
            assert (d / "untouched.log").read_text() == "u disk\nu window\n"
            assert (d / "big.log").read_text() == big + "big ram\nbig window\n"
            assert (d / "new.log").read_text() == "new ram\nnew window\n"
            assert not list(d.rglob("*.rampiped-conflict"))
            assert_clean(env, d)
            assert "did not verify" not in dm.log_text()


def test_entries_created_under_whiteouts_and_opaque_dirs_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        (d / "o" / "deep").mkdir(parents=True)
        (d / "o" / "old.txt").write_text("old\n")
        (d / "o" / "deep" / "old2.txt").write_text("old2\n")
        (d / "gone.txt").write_text("gone\n")
        (d / "gonedir" / "x").mkdir(parents=True)
        (d / "gonedir" / "x" / "f").write_text("f\n")
        with daemon(env, monkeypatch, marker) as dm:
            env.ctl("pin", str(d), check=True)
            shutil.rmtree(d / "o")
            (d / "o").mkdir()  # opaque in the layer
            (d / "o" / "new.txt").write_text("new\n")
            (d / "gone.txt").unlink()  # a whiteout
            shutil.rmtree(d / "gonedir")
            with paused_unpin(env, dm, d, marker):
                (d / "o" / "window.txt").write_text("window\n")
                (d / "o" / "deep" / "window2.txt").write_text("window2\n")
                (d / "gone.txt").write_text("recreated\n")
                (d / "gonedir" / "x" / "g").write_text("g\n")
            assert (d / "o" / "new.txt").read_text() == "new\n"
            assert (d / "o" / "window.txt").read_text() == "window\n"
            assert (d / "o" / "deep" / "window2.txt").read_text() == "window2\n"
            assert not (d / "o" / "old.txt").exists()
            assert not (d / "o" / "deep" / "old2.txt").exists()
            assert (d / "gone.txt").read_text() == "recreated\n"
            assert (d / "gonedir" / "x" / "g").read_text() == "g\n"
            assert not (d / "gonedir" / "x" / "f").exists()
            assert_clean(env, d)


def test_a_rewrite_in_the_window_is_kept_as_a_conflict_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        d.mkdir()
        (d / "r.txt").write_text("original content\n")
        with daemon(env, monkeypatch, marker) as dm:
            env.ctl("pin", str(d), check=True)
            (d / "r.txt").write_text("ram version\n")
            with paused_unpin(env, dm, d, marker):
                (d / "r.txt").write_text("window rewrite, longer than the original\n")
            assert (d / "r.txt").read_text() == "ram version\n"
            conflict = d / "r.txt.rampiped-conflict"
            assert conflict.read_text() == "window rewrite, longer than the original\n"
            dm.wait_log(r"r\.txt was rewritten on disk during the write-back")
            assert_clean(env, d)


def test_a_crash_after_the_unmount_still_carries_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        d.mkdir()
        (d / "a.log").write_text("disk 1\n")
        with safety.paused_daemon(env, monkeypatch, "unpin:journaled", marker) as dm:
            env.ctl("pin", str(d), check=True)
            append(d / "a.log", "ram 2\n")
            ctl = ctl_async(env, "unpin", str(d))
            safety.wait_paused(marker, "unpin:journaled")
            append(d / "a.log", "disk 3\n")
            # held in the journal, on the same filesystem, outside the directory
            assert [h for h in env.journal.glob("*/held") if held_index(h)]
            assert not (d / ".rampiped-held").exists()
            dm.kill()
            ctl.wait(30)
        marker.unlink()
        with daemon(env, monkeypatch, None) as dm:
            dm.wait_log(r"carried the writes made during an interrupted write-back")
            assert (d / "a.log").read_text() == "disk 1\nram 2\ndisk 3\n"
            assert_clean(env, d)


def test_a_crash_right_after_a_carried_append_does_not_repeat_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 after the window's lines were appended to the written-back file but before the
    hold index recorded that: the next start finds them there and does not append them again,
    also when a process appended to the file by name in between."""
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        d.mkdir()
        (d / "a.log").write_text("disk 1\n")
        with safety.paused_daemon(env, monkeypatch, f"{STAGE},held:appended", marker) as dm:
            env.ctl("pin", str(d), check=True)
            append(d / "a.log", "ram 2\n")
            # a hard link in the layer: rsync writes the file, and the window's lines are
            # carried after the apply, by the merge that the crash cuts short
            os.link(d / "a.log", d / "a.link")
            ctl = ctl_async(env, "unpin", str(d))
            safety.wait_paused(marker, STAGE)
            append(d / "a.log", "disk 3\n")
            append(d / "a.log", "disk 4\n")
            marker.unlink()
            safety.wait_paused(marker, "held:appended")
            assert (d / "a.log").read_text() == "disk 1\nram 2\ndisk 3\ndisk 4\n"
            dm.kill()
            ctl.wait(30)
        marker.unlink()
        append(d / "a.log", "after the crash\n")
        with daemon(env, monkeypatch, None) as dm:
            dm.wait_log(r"carried the writes made during an interrupted write-back")
            assert (d / "a.log").read_text() == "disk 1\nram 2\ndisk 3\ndisk 4\nafter the crash\n"
            assert (d / "a.link").samefile(d / "a.log")
            assert_clean(env, d)


def _longest_increasing(numbers: list[int]) -> int:
    tails: list[int] = []
    for n in numbers:
        i = bisect.bisect_left(tails, n)
        tails[i : i + 1] = [n]
    return len(tails)


def lines_in_order(d: Path, total: int) -> None:
    """Every line the Writer wrote (n = 0..total-1, line n into file n % 50) is there exactly
    once. Order: a line written in the moment a file is renamed into place may land after one
    written just after it (the carry-over appends it), so at most a few lines per file may be
    out of place, never lost or doubled."""
    seen = 0
    for i in range(50):
        path = d / f"f{i:03d}.log"
        numbers = [int(m) for m in re.findall(r"line (\d+)", path.read_text())] if total > i else []
        expected = list(range(i, total, 50))
        assert sorted(numbers) == expected, f"{path.name}: {numbers[:20]}..."
        misplaced = len(numbers) - _longest_increasing(numbers)  # lines that must move
        assert misplaced <= 6, f"{path.name}: {misplaced} lines out of order: {numbers}"
        seen += len(numbers)
    assert seen == total


def test_a_steady_writer_during_a_paused_unpin_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "hot"
        d.mkdir()
        with daemon(env, monkeypatch, marker) as dm:
            w = Writer(d, rate=200)
            try:
                wait_for(lambda: (d / "f049.log").exists(), 30, "the writer's files")
                env.pin_while_written(d)
                size = (d / "f000.log").stat().st_size
                wait_for(lambda: (d / "f000.log").stat().st_size > size, 30, "writes into RAM")
                with paused_unpin(env, dm, d, marker):
                    size = (d / "f000.log").stat().st_size
                    wait_for(
                        lambda: (d / "f000.log").stat().st_size > size + 20,
                        30,
                        "several writes on disk during the write-back",
                    )
                wait_for(lambda: (d / "f000.log").stat().st_size > size + 60, 30, "more writes")
            finally:
                n = w.stop()
            lines_in_order(d, n)
            assert not list(d.glob("*.rampiped-conflict"))
            assert_clean(env, d)


def test_a_steady_writer_during_unpins_loses_nothing(tmp_path: Path) -> None:
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "hot"
        d.mkdir()
        with running(env):
            w = Writer(d, rate=300)
            try:
                wait_for(lambda: (d / "f049.log").exists(), 30, "the writer's files")
                for _ in range(3):
                    env.pin_while_written(d)
                    size = (d / "f000.log").stat().st_size
                    wait_for(
                        lambda size=size: (d / "f000.log").stat().st_size > size,  # type: ignore[misc]
                        30,
                        "writes into RAM",
                    )
                    env.ctl("unpin", str(d), check=True)
                    assert not env.overlay_at(d)
            finally:
                n = w.stop()
            lines_in_order(d, n)
            assert_clean(env, d)


def test_a_writer_that_holds_a_replaced_file_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that opened a file during the write-back and keeps it open writes to the
    replaced file: what it writes within the grace is carried over; one that holds it longer is
    named in a warning."""
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        d.mkdir()
        (d / "a.log").write_text("a disk\n")
        (d / "b.log").write_text("b disk\n")
        with daemon(env, monkeypatch, marker) as dm:
            env.ctl("pin", str(d), check=True)
            append(d / "a.log", "a ram\n")
            append(d / "b.log", "b ram\n")
            ctl = ctl_async(env, "unpin", str(d))
            safety.wait_paused(marker, STAGE)
            fa = open(d / "a.log", "a")  # noqa: SIM115
            fb = open(d / "b.log", "a")  # noqa: SIM115
            try:
                fa.write("a window 1\n")
                fa.flush()
                marker.unlink()
                wait_for(
                    lambda: (d / "a.log").read_text().endswith("a window 1\n"),
                    60,
                    "the window's first line after the RAM version",
                )
                fa.write("a window 2\n")
                fa.flush()
                fa.close()
                fb.write("b window\n")
                fb.flush()
                out, err = ctl.communicate(timeout=120)
                assert ctl.returncode == 0, (out, err)
            finally:
                fa.close()
                fb.close()
            assert (d / "a.log").read_text() == "a disk\na ram\na window 1\na window 2\n"
            assert (d / "b.log").read_text() == "b disk\nb ram\nb window\n"
            dm.wait_log(r"still open after the write-back replaced them: pid \d+ .*fd \d+")
            assert_clean(env, d)


def test_a_copy_pin_leaves_disk_writes_of_its_unpin_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy pin is written back and verified while still mounted; when RAM did not change up
    to the unmount, nothing is written afterwards, so what a process writes on disk in that
    moment (a new file, an append) stays."""
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "copy"
        d.mkdir()
        (d / "a.log").write_text("disk 1\n")
        with daemon(env, monkeypatch, marker) as dm:
            env.ctl("pin", "--mode", "copy", str(d), check=True)
            assert env.mounted_at(d) is not None
            append(d / "a.log", "ram 2\n")
            (d / "made-in-ram").write_text("ram\n")
            with paused_unpin(env, dm, d, marker):
                assert env.mounted_at(d) is None
                append(d / "a.log", "disk 3\n")
                (d / "made-on-disk").write_text("window\n")
            assert (d / "a.log").read_text() == "disk 1\nram 2\ndisk 3\n"
            assert (d / "made-on-disk").read_text() == "window\n"
            assert (d / "made-in-ram").read_text() == "ram\n"
            assert env.status()["pins"] == []
