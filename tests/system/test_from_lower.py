"""An overlay checkpoint takes a file that the disk below the overlay holds the first part of
(copied up by an append, or renamed by a rotation) as that disk file, linked into the
journal, with the rest appended (writeback/fromlower.py): the generation is still what the
layer held, the merged view never changes, and the disk file's old bytes are not written
again. Anything not proven so (another content, another mode, two names, a redirected
directory) is copied as before."""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampiped import mounts, writeback
from rampiped.ledger import Ledger
from rampiped.ledger import scan as ledger_scan
from rampiped.writeback import fromlower
from rampiped.writeback import journal as journal_module
from tests.system import safety
from tests.system.daemon_harness import journal_on_another_mount, make_env, running
from tests.system.helpers import LoopFs, bytes_written, drop_caches, syncfs_path
from tests.system.test_appends import append, contents, lines, rotate, seed_rotated
from tests.system.test_copymode import make_loopfs_from
from tests.system.test_journal_power_cut import after
from tests.system.test_sync_overlay import Pin, pin
from tests.system.test_write_window import paused_unpin

pytestmark = pytest.mark.system

__all__ = ["pin"]  # the fixture, used by name

KiB = 1 << 10


@contextlib.contextmanager
def below(loopfs: LoopFs, p: Pin) -> Iterator[writeback.Below]:
    """The journal and the directory below the overlay through a private copy of their mount,
    the way a pin reaches them (PinManager.journal_links)."""
    clone = mounts.clone_mount(str(loopfs.mountpoint))
    try:
        route = writeback.LinkRoute(
            clone, "journal/gen-0", os.path.relpath(p.disk, loopfs.mountpoint)
        )
        found = writeback.reached(route, str(loopfs.mountpoint / "journal"), str(p.staging))
        assert found is not None
        yield found
    finally:
        os.close(clone)


def view(d: Path) -> dict[str, bytes]:
    drop_caches()
    return contents(d)


def checkpoint(
    loopfs: LoopFs, p: Pin, ledger: Ledger | None = None
) -> tuple[writeback.CheckpointResult, int, Path]:
    """A checkpoint of the pin's layer with the disk below reachable; its bytes on the device."""
    journal = loopfs.mountpoint / "journal"
    journal.mkdir(exist_ok=True)
    syncfs_path(loopfs.mountpoint)
    before = bytes_written(loopfs)
    with below(loopfs, p) as b:
        res = writeback.checkpoint(str(p.upper), str(journal), ledger=ledger, below=b)
    syncfs_path(loopfs.mountpoint)
    return res, bytes_written(loopfs) - before, journal / f"gen-{res.generation}"


def test_appended_and_rotated_disk_files_are_taken_from_below(loopfs: LoopFs, pin: Pin) -> None:
    seed_rotated(pin.disk)
    inodes = {p.name: p.stat().st_ino for p in pin.disk.iterdir()}
    pin.mount()
    append(pin.disk / "app.log", lines(100, 50_000))  # copied up whole, then the tail
    rotate(pin.disk)  # app.log.k -> app.log.k+1 (copied up whole too), a new app.log
    append(pin.disk / "app.log", lines(10, 60_000))
    shown = view(pin.disk)
    first, written, gen = checkpoint(loopfs, pin)
    assert contents(gen) == contents(pin.upper) == shown
    # the disk's own files, each under its new name, the one appended to now a prefix more
    for k, was in ((1, "app.log"), (2, "app.log.1"), (3, "app.log.2"), (4, "app.log.3")):
        assert (gen / f"app.log.{k}").stat().st_ino == inodes[was], k
    assert (pin.staging / "app.log").read_bytes() == shown["app.log.1"]
    assert view(pin.disk) == shown  # the view is what it was
    # the tail, the new app.log and metadata; the four files again would be about 1.6 MiB
    assert written < 192 * KiB, written
    assert first.ledger is not None
    assert first.ledger.below == {f"app.log.{k}": "app.log" if k == 1 else f"app.log.{k - 1}"
                                  for k in (1, 2, 3, 4)}  # fmt: skip

    # the next tail of a file taken from below goes to that file: the same inode again
    append(pin.disk / "app.log.1", lines(50, 70_000))
    shown = view(pin.disk)
    second, written, gen2 = checkpoint(loopfs, pin, first.ledger)
    assert contents(gen2) == shown
    assert (gen2 / "app.log.1").stat().st_ino == inodes["app.log"]
    assert second.appended == 1
    assert written < 96 * KiB, written
    assert second.ledger is not None
    assert second.ledger.changed(ledger_scan(str(pin.upper))) == []
    assert view(pin.disk) == shown

    # a power cut now: the next start's apply gives the disk the view
    pin.power_cut()
    writeback.apply_journal(str(loopfs.mountpoint / "journal"), str(pin.disk))
    assert view(pin.disk) == shown


def _rewrite_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[3] ^= 0x20
    path.write_bytes(bytes(data))


def _chmod(path: Path) -> None:
    append(path, lines(5, 80_000))
    path.chmod(0o600)


def _hard_link_below(path: Path) -> None:
    append(path, lines(5, 80_000))


def _made_anew(path: Path) -> None:
    """The same bytes and more in a file made through the overlay: not the disk's file (no
    origin), so not read from the disk at all."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data + lines(5, 80_000))


@pytest.mark.parametrize(
    "change", ["same-size rewrite", "another mode", "two names below", "made anew"]
)
def test_a_disk_file_that_is_not_a_prefix_is_not_taken(
    loopfs: LoopFs, pin: Pin, change: str
) -> None:
    (pin.disk / "state").write_bytes(lines(2_000))
    if change == "two names below":
        os.link(pin.disk / "state", pin.disk / "state.bak")
    old = (pin.disk / "state").read_bytes()
    pin.mount()
    how = {"same-size rewrite": _rewrite_same_size, "another mode": _chmod,
           "two names below": _hard_link_below, "made anew": _made_anew}  # fmt: skip
    how[change](pin.disk / "state")
    shown = view(pin.disk)
    res, _written, gen = checkpoint(loopfs, pin)
    assert contents(gen) == contents(pin.upper)
    assert (gen / "state").read_bytes() == shown["state"]
    assert (gen / "state").stat().st_ino != (pin.staging / "state").stat().st_ino
    assert (pin.staging / "state").read_bytes() == old  # the disk file untouched
    assert res.ledger is not None and res.ledger.below == {}
    assert view(pin.disk) == shown


def test_nothing_is_taken_while_a_directory_is_redirected(loopfs: LoopFs, pin: Pin) -> None:
    """A renamed directory reads the disk's one by its old name: no disk file is taken then."""
    (pin.disk / "d").mkdir()
    (pin.disk / "d" / "x").write_bytes(lines(100))
    (pin.disk / "app.log").write_bytes(lines(1_000))
    pin.mount()
    os.rename(pin.disk / "d", pin.disk / "e")
    append(pin.disk / "app.log", lines(10, 5_000))
    shown = view(pin.disk)
    res, _written, gen = checkpoint(loopfs, pin)
    assert (gen / "app.log").read_bytes() == shown["app.log"]
    assert (gen / "app.log").stat().st_ino != (pin.staging / "app.log").stat().st_ino
    assert res.ledger is not None and res.ledger.below == {}
    assert view(pin.disk) == shown


# -- power cuts (the device image copied while ext4 commits only when asked: commit=600) ------


def tree_of(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_power_cut_while_disk_files_are_taken_leaves_prefixes(
    loopfs: LoopFs, pin: Pin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cuts after the disk files were linked into the generation, after their tails, after
    the generation was written out, and after the checkpoint returned: the directory below
    holds each file as before the pin or longer, a prefix of what RAM holds; the journal's
    newest complete generation is the layer as the last checkpoint that returned read it (a
    log that only grew may be longer), and its apply gives the disk that state. (A file of the
    disk taken for the name it was renamed to in RAM grows under its old name below the
    overlay: "a file that only grew may be longer" there too, until the apply.)"""
    subprocess.run(["mount", "-o", "remount,commit=600", str(loopfs.mountpoint)], check=True)
    seed_rotated(pin.disk)
    (pin.disk / "syslog").write_bytes(lines(3_000, 700_000))
    before = tree_of(pin.disk)
    syncfs_path(loopfs.mountpoint)
    pin.mount()
    journal = loopfs.mountpoint / "journal"
    journal.mkdir()
    images: list[tuple[str, Path]] = []

    def cut(label: str) -> None:
        image = tmp_path / f"{len(images)}-{label}.img"
        subprocess.run(["cp", "--sparse=always", str(loopfs.image), str(image)], check=True)
        images.append((label, image))

    append(pin.disk / "syslog", lines(100, 800_000))
    with below(loopfs, pin) as b:
        first = writeback.checkpoint(str(pin.upper), str(journal), below=b)
    one, one_view = tree_of(pin.upper), tree_of(pin.disk)
    cut("first-returned")
    append(pin.disk / "syslog", lines(100, 900_000))
    append(pin.disk / "app.log", lines(100, 50_000))
    rotate(pin.disk)
    two, two_view = tree_of(pin.upper), tree_of(pin.disk)
    monkeypatch.setattr(fromlower, "link", after(fromlower.link, lambda: cut("linked")))
    monkeypatch.setattr(fromlower, "take", after(fromlower.take, lambda: cut("tails")))
    monkeypatch.setattr(
        journal_module, "settle_at", after(journal_module.settle_at, lambda: cut("written"))
    )
    with below(loopfs, pin) as b:
        second = writeback.checkpoint(str(pin.upper), str(journal), ledger=first.ledger, below=b)
    cut("second-returned")
    monkeypatch.undo()
    assert second.ledger is not None and len(second.ledger.below) == 5, second.ledger.below
    assert [label for label, _ in images] == [
        "first-returned", "linked", "tails", "written", "second-returned",
    ]  # fmt: skip

    for label, image in images:
        state, view_state = (one, one_view) if label != "second-returned" else (two, two_view)
        with make_loopfs_from(image, tmp_path / f"rebooted-{label}") as rebooted:
            data = rebooted / "data"
            # below the overlay, each file as before the pin, or longer: a prefix of what RAM
            # holds (under its name, or the name it was renamed to)
            for rel, content in tree_of(data).items():
                if content != before.get(rel):
                    assert content.startswith(before[rel]), (label, rel)
                    assert any(v.startswith(content) for v in two_view.values()), (label, rel)
            gen = writeback.latest_generation(str(rebooted / "journal"))
            assert gen is not None, label
            assert_state(tree_of(Path(gen)), state, two, label)
            writeback.apply_journal(str(rebooted / "journal"), str(data))
            assert_state(tree_of(data), view_state, two_view, label)
        image.unlink()


def assert_state(
    found: dict[str, bytes], state: dict[str, bytes], later: dict[str, bytes], label: str
) -> None:
    """`found` is `state`, but for files that only grew: a prefix of `later` at least as long."""
    assert found.keys() == state.keys(), label
    for rel, content in state.items():
        if found[rel] != content:
            assert found[rel].startswith(content), (label, rel)
            assert later[rel].startswith(found[rel]), (label, rel)


def test_a_power_cut_after_an_apply_returned_leaves_it_whole(
    loopfs: LoopFs, pin: Pin, tmp_path: Path
) -> None:
    """The apply commits once (durable.fsync_commits_all), not by syncfs: what it linked from
    the journal and what rsync copied are on disk after a cut right after it returned."""
    subprocess.run(["mount", "-o", "remount,commit=600", str(loopfs.mountpoint)], check=True)
    seed_rotated(pin.disk)
    syncfs_path(loopfs.mountpoint)
    pin.mount()
    append(pin.disk / "app.log", lines(100, 50_000))
    rotate(pin.disk)
    (pin.disk / "new").write_bytes(os.urandom(70_000))
    (pin.disk / "app.log.3").unlink()
    shown = tree_of(pin.disk)
    journal = loopfs.mountpoint / "journal"
    journal.mkdir()
    with below(loopfs, pin) as b:
        writeback.checkpoint(str(pin.upper), str(journal), below=b)
    (pin.disk / "after").write_bytes(os.urandom(30_000))  # written by rsync, not linked
    shown = tree_of(pin.disk)
    pin.unmount_overlay()
    clone = mounts.clone_mount(str(loopfs.mountpoint))
    try:
        target = os.path.relpath(pin.disk, loopfs.mountpoint)
        res = writeback.apply_journal(
            str(journal),
            str(pin.disk),
            link=lambda gen: writeback.LinkRoute(
                clone, os.path.relpath(gen, loopfs.mountpoint), target
            ),
        )
    finally:
        os.close(clone)
    assert res is not None and res.linked > 0, res
    res2 = writeback.apply_upper(str(pin.upper), str(pin.disk))  # "after", by rsync
    assert res2.files > 0
    image = tmp_path / "cut.img"
    subprocess.run(["cp", "--sparse=always", str(loopfs.image), str(image)], check=True)
    with make_loopfs_from(image, tmp_path / "rebooted") as rebooted:
        assert tree_of(rebooted / "data") == shown


# -- the daemon ----------------------------------------------------------------------------------


@pytest.mark.parametrize("journal", ["on the directory's mount", "on another mount"])
def test_a_pins_checkpoint_takes_its_logs_from_the_disk(tmp_path: Path, journal: str) -> None:
    """The daemon's overlay pin: the first checkpoint after a log on disk got a line writes
    the line, not the log; with the journal on another mount (no link possible) the log is
    copied whole, as before."""
    with make_env(tmp_path) as base:
        env = base if journal == "on the directory's mount" else journal_on_another_mount(base)
        d = env.data / "logs"
        d.mkdir()
        (d / "app.log").write_bytes(lines(20_000))  # about 1.1 MiB
        ino = (d / "app.log").stat().st_ino
        env.write_config(adaptive={"enabled": False}, pins=[{"path": str(d), "mode": "overlay"}])
        with running(env) as dm:
            dm.wait_log("pinned " + re.escape(str(d)), timeout=30)
            append(d / "app.log", lines(10, 20_000))
            syncfs_path(env.disk.mountpoint)
            before = bytes_written(env.disk)
            env.ctl("sync", str(d), check=True)
            syncfs_path(env.disk.mountpoint)
            written = bytes_written(env.disk) - before
            line = dm.wait_log(
                r"checkpoint of " + re.escape(str(d)) + r".*: 1 files, ([^ ]+ [^ ]+)"
            )
            gens = list(env.journal.glob("*/gen-*/app.log"))
            assert len(gens) == 1, gens
            shown = (d / "app.log").read_bytes()
            assert gens[0].read_bytes() == shown
            if journal == "on the directory's mount":
                assert gens[0].stat().st_ino == ino
                tail = len(lines(10, 20_000))
                assert line.group(1) == f"{tail} B", line.group(0)  # the ten lines
                assert written < 256 * KiB, written
            else:
                assert gens[0].stat().st_ino != ino
                assert written > len(shown), written
            assert dm.stop() == 0
        drop_caches()
        assert (d / "app.log").read_bytes() == shown


def test_a_log_taken_from_the_disk_keeps_what_is_appended_after_the_unmount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal's copy of a log is the disk file itself; the unpin writes back after its
    unmount (as with a renamed directory or a mapped file), and a logger appends on disk
    right then: the log ends with RAM's lines, then the logger's, and no conflict copy."""
    monkeypatch.setenv("RAMPIPED_TEST_LATE_WRITEBACK", "1")
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        d = env.data / "logs"
        d.mkdir()
        (d / "app.log").write_bytes(lines(20_000))
        env.write_config(adaptive={"enabled": False}, pins=[{"path": str(d), "mode": "overlay"}])
        with safety.paused_daemon(env, monkeypatch, "unpin:unmounted", marker) as dm:
            dm.wait_log("pinned " + re.escape(str(d)), timeout=30)
            append(d / "app.log", lines(10, 20_000))
            env.ctl("sync", str(d), check=True)
            gen = next(env.journal.glob("*/gen-*/app.log"))
            assert gen.stat().st_nlink == 2  # the disk's file, taken
            append(d / "app.log", lines(10, 30_000))
            ram = (d / "app.log").read_bytes()
            with paused_unpin(env, dm, d, marker):
                append(d / "app.log", b"written on disk in the window\n")
            log = dm.log_text()
            assert dm.stop() == 0, log[-3000:]
        drop_caches()
        assert (d / "app.log").read_bytes() == ram + b"written on disk in the window\n"
        assert sorted(os.listdir(d)) == ["app.log"]
        assert "conflict" not in log, log[-3000:]


@pytest.mark.parametrize(
    "change",
    [
        "cp -p of another prefix",
        "store through a shared mapping",
        "tar over it",
        "rsync -a over it",
    ],
)
def test_a_taken_file_changed_by_a_real_program_is_copied(
    loopfs: LoopFs, pin: Pin, tmp_path: Path, change: str
) -> None:
    """A log taken from the disk (its disk file now the journal's copy), then changed by a
    real program in a way its stamps may not show: the next checkpoint holds what the view
    shows, and so does the disk after a power cut and the journal's apply."""
    (pin.disk / "app.log").write_bytes(lines(2_000))
    pin.mount()
    log = pin.disk / "app.log"
    append(log, lines(10, 50_000))
    first, _written, _gen = checkpoint(loopfs, pin)
    assert first.ledger is not None and first.ledger.below == {"app.log": "app.log"}
    st = log.stat()
    other = tmp_path / "other"
    other.write_bytes(b"X" + log.read_bytes()[1:] + lines(5, 60_000))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    if change == "cp -p of another prefix":
        subprocess.run(["cp", "-p", str(other), str(log)], check=True)
    elif change == "store through a shared mapping":
        with open(log, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[0] = ord("M")
            m.flush()
        os.utime(log, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "tar over it":
        src = tmp_path / "src"
        src.mkdir()
        os.replace(other, src / "app.log")
        subprocess.run(
            ["tar", "-C", str(src), "-cf", str(tmp_path / "t.tar"), "app.log"], check=True
        )
        subprocess.run(["tar", "-C", str(pin.disk), "-xf", str(tmp_path / "t.tar")], check=True)
    else:
        src = tmp_path / "src"
        src.mkdir()
        os.replace(other, src / "app.log")
        subprocess.run(["rsync", "-a", f"{src}/", f"{pin.disk}/"], check=True)
    shown = view(pin.disk)
    _second, _written, gen2 = checkpoint(loopfs, pin, first.ledger)
    assert contents(gen2) == shown
    pin.power_cut()
    writeback.apply_journal(str(loopfs.mountpoint / "journal"), str(pin.disk))
    assert view(pin.disk) == shown
