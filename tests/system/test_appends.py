"""A copy pin's checkpoint writes a file that only grew by appending its tail to the disk copy
(appends.py), and copies whole every file that changed any other way, whatever its
stamps say. A power cut at any step of an append leaves the disk file a prefix of the RAM file
at least as long as the last checkpoint's: never a torn middle, never garbage."""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rampiped import appends, durable, mounts, renames, writeback
from rampiped.commands import CommandResult, run_command
from rampiped.copymode import CheckpointResult
from rampiped.copywb.renamed import rename_on_disk
from rampiped.ledger import Ledger
from rampiped.ledger import scan as ledger_scan
from rampiped.writeback.stamps import CLOCK_SLACK_NS
from tests.system.helpers import LoopFs, bytes_written, make_loopfs, syncfs_path, wait_for
from tests.system.test_copymode import Layout, layout, make_loopfs_from
from tests.system.test_sqlitepages import Cut, cut_at

pytestmark = pytest.mark.system

__all__ = ["layout"]  # the fixture, used by name

KiB = 1 << 10
OLD_NS = 1_600_000_000 * 10**9


def lines(n: int, start: int = 0) -> bytes:
    return b"".join(b"%08d a log line of some length, as syslog writes them\n" % i for i in
                    range(start, start + n))  # fmt: skip


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def rewrite_old_part_and_grow(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"X")
    append(path, lines(10, 900_000))


def store_through_a_mapping_and_grow(path: Path) -> None:
    st = path.stat()
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[5] = ord("M")
        m.flush()
    append(path, lines(10, 900_000))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def truncate_and_regrow(path: Path) -> None:
    old = path.read_bytes()
    path.write_bytes(b"new start\n" + old[10:] + lines(10, 900_000))


def cp_p_longer_other_prefix(path: Path) -> None:
    other = path.with_name("other")
    other.write_bytes(b"Y" + path.read_bytes()[1:] + lines(10, 900_000))
    os.utime(other, ns=(OLD_NS, OLD_NS))
    subprocess.run(["cp", "-p", str(other), str(path)], check=True)
    other.unlink()


def chmod_and_grow(path: Path) -> None:
    append(path, lines(10, 900_000))
    path.chmod(0o600)


CHANGES: dict[str, Callable[[Path], None]] = {
    "rewrite of the old part": rewrite_old_part_and_grow,
    "store through a shared mapping, old mtime": store_through_a_mapping_and_grow,
    "truncate and regrow": truncate_and_regrow,
    "cp -p of a longer file": cp_p_longer_other_prefix,
    "another mode": chmod_and_grow,
}


@contextlib.contextmanager
def pinned_log(layout: Layout) -> Iterator[tuple[Path, Path]]:
    """app.log (about 1 MiB) copied into RAM and checkpointed once; (RAM file, disk file)."""
    (layout.orig / "app.log").write_bytes(lines(20_000))
    layout.copy_in()
    layout.bind_over()
    try:
        yield layout.orig / "app.log", layout.disk / "app.log"
    finally:
        layout.unbind()


def measured(
    layout: Layout, ledger: Ledger | None, count: Callable[[LoopFs], int]
) -> tuple[CheckpointResult, int]:
    """A checkpoint, and how much `count` (of the disk's filesystem) grew while it ran."""
    syncfs_path(layout.loop.mountpoint)
    before = count(layout.loop)
    res = layout.checkpoint(ledger=ledger)
    return res, count(layout.loop) - before


def test_a_file_that_only_grew_gets_its_tail_appended(layout: Layout) -> None:
    with pinned_log(layout) as (ram, disk):
        ledger = layout.checkpoint().ledger
        ino = disk.stat().st_ino
        for round_ in range(3):
            append(ram, lines(100, 20_000 + 100 * round_))  # about 5 KiB
            res, written = measured(layout, ledger, bytes_written)
            ledger = res.ledger
            assert res.appended == 1 and res.files == 1, res
            assert res.bytes == 100 * len(lines(1)), res
            assert disk.stat().st_ino == ino  # the same file, not a new copy
            assert disk.read_bytes() == ram.read_bytes()
            assert disk.stat().st_mtime_ns == ram.stat().st_mtime_ns
            assert written < 256 * KiB, written  # not the file (about 1 MiB) again


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_file_that_changed_otherwise_is_copied_whole(layout: Layout, change: str) -> None:
    with pinned_log(layout) as (ram, disk):
        ledger = layout.checkpoint().ledger
        CHANGES[change](ram)
        res = layout.checkpoint(ledger=ledger)
        assert res.appended == 0, res
        assert disk.read_bytes() == ram.read_bytes()
        assert disk.stat().st_mode == ram.stat().st_mode
        layout.final_sync(ledger=res.ledger)
    assert disk.read_bytes() == (layout.data / "app.log").read_bytes()


def test_a_file_that_grows_on_during_the_checkpoint_is_taken_next_time(layout: Layout) -> None:
    """Each change once: a file that grew on while its tail was appended is a prefix on disk;
    it is not copied again in that checkpoint, and the next one appends the rest."""
    with pinned_log(layout) as (ram, disk):
        ledger = layout.checkpoint().ledger
        append(ram, lines(100, 20_000))
        assert ledger is not None
        grown = appends.candidates(ledger_scan(str(layout.data)), ledger, [])
        assert grown == {"app.log": len(lines(20_000))}
        done = appends.append_grown(str(layout.data), str(layout.disk), grown, ledger)
        append(ram, lines(100, 20_100))  # after the tail was written
        assert appends.still_prefix(str(layout.data), done[0])
        assert ram.read_bytes().startswith(disk.read_bytes())


def test_a_power_cut_during_an_append_leaves_a_prefix(layout: Layout, tmp_path: Path) -> None:
    """After each step, the device as it is (what ext4 did not write out is not in the image;
    commit=600: metadata reaches it only where rampiped syncs), mounted as after a reboot."""
    subprocess.run(["mount", "-o", "remount,commit=600", str(layout.loop.mountpoint)], check=True)
    with pinned_log(layout) as (ram, disk):
        ledger = layout.checkpoint().ledger
        assert ledger is not None
        old = disk.read_bytes()
        append(ram, lines(6_000, 20_000))  # about 330 KiB
        new = ram.read_bytes()
        grown = {"app.log": len(old)}
        steps: list[str] = []
        appends.append_grown(str(layout.data), str(layout.disk), grown, ledger, step=steps.append)
        assert steps == ["tail:written", "tail:synced", "times:set"]
        for n, name in enumerate(steps, 1):
            with open(disk, "r+b") as f:  # back to the last checkpoint, on the device
                f.truncate(len(old))
                os.fsync(f.fileno())
            syncfs_path(layout.loop.mountpoint)
            with pytest.raises(Cut):
                appends.append_grown(
                    str(layout.data), str(layout.disk), grown, ledger, step=cut_at(n, [])
                )
            image = tmp_path / "after-cut.img"
            subprocess.run(
                ["cp", "--sparse=always", str(layout.loop.image), str(image)], check=True
            )
            with make_loopfs_from(image, tmp_path / f"rebooted-{n}") as rebooted:
                found = (rebooted / "pve-cluster" / "app.log").read_bytes()
            image.unlink()
            assert len(found) >= len(old) and new.startswith(found), (name, len(found))
            if name != "tail:written":
                assert found == new, name


# -- an overlay pin's journal ------------------------------------------------------------------


def test_a_journal_generation_takes_a_grown_file_by_its_tail(
    loopfs: LoopFs, runtime_tmpfs: Path
) -> None:
    """The generation before gets the tail and is linked into the new one; a file changed any
    other way is copied whole; each generation holds what the layer held."""
    upper = runtime_tmpfs / "upper"
    upper.mkdir()
    journal = loopfs.mountpoint / "journal"
    log, other = upper / "app.log", upper / "other.log"
    log.write_bytes(lines(20_000))
    other.write_bytes(lines(20_000))
    first = writeback.checkpoint(str(upper), str(journal))
    gen1 = journal / f"gen-{first.generation}"
    ino = (gen1 / "app.log").stat().st_ino
    append(log, lines(100, 20_000))
    rewrite_old_part_and_grow(other)
    syncfs_path(loopfs.mountpoint)
    before = bytes_written(loopfs)
    second = writeback.checkpoint(str(upper), str(journal), ledger=first.ledger)
    written = bytes_written(loopfs) - before
    gen2 = journal / f"gen-{second.generation}"
    assert second.appended == 1, second
    assert (gen2 / "app.log").stat().st_ino == ino
    assert (gen2 / "app.log").read_bytes() == log.read_bytes()
    assert (gen2 / "other.log").read_bytes() == other.read_bytes()
    assert not gen1.exists()
    # the tail, other.log whole (about 1 MiB) and metadata; app.log again would double it
    assert written < 1.6 * other.stat().st_size, written
    assert second.ledger is not None and second.ledger.changed(ledger_scan(str(upper))) == []


# -- renames ---------------------------------------------------------------------------------


def rotate(d: Path) -> None:
    """logrotate's way without copytruncate: each rotated file one up, the oldest gone, the
    live log renamed to .1 and a new, empty one made."""
    (d / "app.log.4").unlink(missing_ok=True)
    for k in (3, 2, 1):
        if (d / f"app.log.{k}").exists():
            os.rename(d / f"app.log.{k}", d / f"app.log.{k + 1}")
    os.rename(d / "app.log", d / "app.log.1")
    (d / "app.log").write_bytes(b"")


def seed_rotated(d: Path) -> None:
    for k in (1, 2, 3):
        (d / f"app.log.{k}").write_bytes(lines(8_000, 100_000 * k))
    (d / "app.log").write_bytes(lines(8_000))


def contents(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_a_rotation_in_a_copy_pin_is_renamed_on_disk(layout: Layout) -> None:
    seed_rotated(layout.orig)
    layout.copy_in()
    layout.bind_over()
    try:
        ledger = layout.checkpoint().ledger
        rotate(layout.orig)
        append(layout.orig / "app.log", lines(10, 500_000))
        syncfs_path(layout.loop.mountpoint)
        before = bytes_written(layout.loop)
        res = layout.checkpoint(ledger=ledger)
        written = bytes_written(layout.loop) - before
        assert res.renamed == 4, res  # app.log -> .1 -> .2 -> .3 -> .4
        assert contents(layout.disk) == contents(layout.orig)
        # about 1.7 MiB of rotated files: renamed, not written again
        assert written < 256 * KiB, written
        layout.final_sync(ledger=res.ledger)
    finally:
        layout.unbind()
    assert contents(layout.orig) == contents(layout.data)


def main_pass(argv: list[str]) -> bool:
    """Whether `argv` is a copy checkpoint's main rsync pass (of the whole tree, or listed)."""
    return "--delete" in argv or ("--delete-missing-args" in argv and "-I" not in argv)


@pytest.mark.parametrize(
    ("rotator", "also_rewritten"), [("ours", False), ("ours", True), ("logrotate", False)]
)
def test_a_rotation_while_a_checkpoint_runs_is_renamed_on_disk(
    layout: Layout, tmp_path: Path, rotator: str, also_rewritten: bool
) -> None:
    """logrotate comes while the checkpoint's main pass runs: the pass looks at the names as
    they were, and the rotated files show up as changed meanwhile. Those whose old name on disk
    holds what RAM now holds at the new one are renamed there too, not copied again; one also
    rewritten after the rename is copied. Either way the disk ends as RAM, and the next
    checkpoint writes nothing of them."""
    seed_rotated(layout.orig)
    layout.copy_in()
    layout.bind_over()
    try:
        # a checkpoint knows as equal only entries that did not change in the 100 ms before it
        # began (CLOCK_SLACK_NS): these logs are older than that at a user's rotation
        newest = max(p.stat().st_ctime_ns for p in layout.data.iterdir())
        wait_for(lambda: time.time_ns() > newest + 2 * CLOCK_SLACK_NS, 5, "the clock")
        ledger = layout.checkpoint().ledger
        append(layout.orig / "app.log", lines(10, 500_000))  # its tail appended first

        conf = tmp_path / "logrotate.conf"  # what logrotate itself does: rename, create
        conf.write_text(f"{layout.orig / 'app.log'} {{\n  rotate 4\n  create 0644 root root\n}}\n")

        def runner(argv: list[str]) -> CommandResult:
            if main_pass(argv):
                if rotator == "logrotate":
                    subprocess.run(
                        ["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)], check=True
                    )
                else:
                    rotate(layout.orig)
                if also_rewritten:
                    (layout.orig / "app.log.3").write_bytes(lines(8_000, 900_000))
            return run_command(argv)

        syncfs_path(layout.loop.mountpoint)
        before = bytes_written(layout.loop)
        res = layout.checkpoint(ledger=ledger, runner=runner)
        written = bytes_written(layout.loop) - before
        # app.log -> .1 -> .2 -> .3 -> .4; .3 rewritten after its rename: copied
        assert res.renamed == (3 if also_rewritten else 4), res
        assert contents(layout.disk) == contents(layout.orig)
        if not also_rewritten:  # about 1.8 MiB of rotated files: renamed, not written again
            assert written < 256 * KiB, written
        again = layout.checkpoint(ledger=res.ledger)
        assert again.bytes == 0 and again.files == 0, again
        layout.final_sync(ledger=again.ledger)
    finally:
        layout.unbind()
    assert contents(layout.orig) == contents(layout.data)


@pytest.mark.parametrize("batched", [False, True])
def test_a_power_cut_while_renaming_leaves_each_name_old_or_new(
    layout: Layout, tmp_path: Path, batched: bool
) -> None:
    """Each rename synced on its own: a cut after the links, each rename and the last. Batched
    (a filesystem that commits in order, no fsync per rename): the journal may commit after
    any rename (its timer), so the device is taken right after a commit there."""
    subprocess.run(["mount", "-o", "remount,commit=600", str(layout.loop.mountpoint)], check=True)
    seed_rotated(layout.orig)
    layout.copy_in()
    layout.bind_over()
    try:
        ledger = layout.checkpoint().ledger
        assert ledger is not None
        old = contents(layout.disk)
        rotate(layout.orig)
        new = contents(layout.orig)
        pairs = renames.renamed(ledger_scan(str(layout.data)), ledger, frozenset(), grown=True)
        assert pairs == {f"app.log.{k + 1}": f"app.log.{k}" if k else "app.log" for k in range(4)}
        # unbatched: after the links, each rename and the last (6 steps); batched: each rename
        for n in range(1, len(pairs) + (1 if batched else 3)):
            syncfs_path(layout.loop.mountpoint)
            step = (
                commit_and_cut_at(n, [], layout.loop, "copy-checkpoint:renamed-one")
                if batched
                else cut_at(n, [])
            )
            with pytest.raises(Cut):
                rename_on_disk(str(layout.disk), pairs, ledger, step=step, batched=batched)
            found = after_a_power_cut(layout, tmp_path, n, batched)
            for name in set(old) | set(new):
                assert found.get(name) in (old.get(name), new.get(name)), (n, name)
            if batched:  # committed: the renames made so far are there
                assert sum(found.get(name) == new[name] != old.get(name) for name in new) >= 1
            for name in os.listdir(layout.disk):  # back to the last checkpoint
                if name != ".rampiped-tmp":
                    (layout.disk / name).unlink()
            for name, data in old.items():
                (layout.disk / name).write_bytes(data)
    finally:
        layout.unbind()


def test_a_rotation_in_an_overlay_pin_links_the_last_generation(
    loopfs: LoopFs, runtime_tmpfs: Path
) -> None:
    upper = runtime_tmpfs / "upper"
    upper.mkdir()
    journal = loopfs.mountpoint / "journal"
    seed_rotated(upper)
    first = writeback.checkpoint(str(upper), str(journal))
    gen1 = journal / f"gen-{first.generation}"
    inodes = {p.name: p.stat().st_ino for p in gen1.iterdir()}
    rotate(upper)
    syncfs_path(loopfs.mountpoint)
    before = bytes_written(loopfs)
    second = writeback.checkpoint(str(upper), str(journal), ledger=first.ledger)
    written = bytes_written(loopfs) - before
    gen2 = journal / f"gen-{second.generation}"
    assert contents(gen2) == contents(upper)
    for k in range(4):
        was = f"app.log.{k}" if k else "app.log"
        assert (gen2 / f"app.log.{k + 1}").stat().st_ino == inodes[was]
    assert written < 256 * KiB, written


def test_a_log_appended_during_the_checkpoint_is_copied_once(layout: Layout) -> None:
    """Each change once: logs that a writer appends to all through a checkpoint (one whose tail
    is appended, one new and copied) are on disk as prefixes afterwards, not copied again and
    again (nor reported as never holding still); the next checkpoint appends the rest."""
    (layout.orig / "busy.log").write_bytes(lines(20_000))
    layout.copy_in()
    layout.bind_over()
    busy = layout.orig / "busy.log"
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            append(busy, lines(5, 200_000 + n))
            append(layout.orig / "new.log", lines(5, 400_000 + n))
            n += 5
            time.sleep(0.0005)

    try:
        ledger = layout.checkpoint().ledger
        append(busy, lines(200, 100_000))  # grown: appended, then grown on during the pass
        (layout.orig / "new.log").write_bytes(lines(20_000, 300_000))
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            res = layout.checkpoint(ledger=ledger)
        finally:
            stop.set()
            thread.join()
        assert res.unstable == [], res
        for name in ("busy.log", "new.log"):
            disk = (layout.disk / name).read_bytes()
            assert (layout.orig / name).read_bytes().startswith(disk), name
        assert res.bytes < 2 * len(lines(20_000)), res  # new.log once, busy.log's tail
        again = layout.checkpoint(ledger=res.ledger)
        assert again.appended == 2 and again.files == 2, again
        assert contents(layout.disk) == contents(layout.orig)
        layout.final_sync(ledger=again.ledger)
    finally:
        layout.unbind()
    assert contents(layout.orig) == contents(layout.data)


def test_a_log_that_grows_while_the_journal_copies_it_is_appended_next_time(
    loopfs: LoopFs, runtime_tmpfs: Path
) -> None:
    """Each change once, in an overlay pin's journal: a file that grew while its generation
    was written is known as a prefix there, and the next generation takes only its tail."""
    upper = runtime_tmpfs / "upper"
    upper.mkdir()
    journal = loopfs.mountpoint / "journal"
    log = upper / "app.log"
    log.write_bytes(lines(20_000))

    def busy(argv: list[str]) -> CommandResult:
        result = run_command(argv)
        append(log, lines(50, 50_000))  # right after rsync read it
        return result

    first = writeback.checkpoint(str(upper), str(journal), runner=busy)  # copied whole
    assert first.ledger is not None and "app.log" in first.ledger.digests
    second = writeback.checkpoint(str(upper), str(journal), ledger=first.ledger)
    assert second.appended == 1 and second.files == 1, second
    assert second.bytes == 50 * len(lines(1)), second
    gen = journal / f"gen-{second.generation}"
    assert (gen / "app.log").read_bytes() == log.read_bytes()


# -- few commits -------------------------------------------------------------------------------


def journal_commits(fs: LoopFs) -> int:
    """Transactions the filesystem's journal (jbd2) has committed since it was mounted."""
    name = Path(os.path.realpath(fs.device)).name
    (info,) = Path("/proc/fs/jbd2").glob(f"{name}-*/info")
    return int(info.read_text().split()[0])


def test_only_a_filesystem_with_a_journal_commits_in_order(
    loopfs: LoopFs, runtime_tmpfs: Path, tmp_path: Path
) -> None:
    assert durable.commits_in_order(str(loopfs.mountpoint))
    assert not durable.commits_in_order(str(runtime_tmpfs))
    # the same filesystem reached through a private copy of its mount, which no line of the
    # mount table names (the write-back's moves and held files are reached so)
    clone = mounts.clone_mount(str(loopfs.mountpoint))
    try:
        assert durable.commits_in_order(f"/proc/self/fd/{clone}")
        assert durable.fsync_commits_all(f"/proc/self/fd/{clone}")
    finally:
        os.close(clone)
    with make_loopfs(tmp_path / "nojournal", size_mb=32, features="^has_journal") as fs:
        assert mounts.fs_type(str(fs.mountpoint)) == "ext4"
        assert not durable.commits_in_order(str(fs.mountpoint))
        assert not durable.fsync_commits_all(str(fs.mountpoint))


def test_an_fsync_commits_everything_only_without_fast_commits(
    loopfs: LoopFs, runtime_tmpfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy checkpoint's `commit` (a touch and an fsync) stands for a syncfs only where one
    journal commit takes every change made before it: not with fast commits (an fsync commits
    that inode only), nor with data=journal, nor before Linux 6.0 (a long symlink's block was
    written like file data)."""
    assert durable.fsync_commits_all(str(loopfs.mountpoint))
    assert not durable.fsync_commits_all(str(runtime_tmpfs))
    assert durable.kernel_version("6.1.0-18-amd64") == (6, 1)
    assert durable.kernel_version("5.10.0-28-amd64") == (5, 10)
    assert durable.kernel_version("unknown") == (0, 0)
    with monkeypatch.context() as m:
        m.setattr(durable, "kernel_version", lambda: (5, 10))
        assert not durable.fsync_commits_all(str(loopfs.mountpoint))
    with make_loopfs(tmp_path / "fast", size_mb=32, features="fast_commit") as fs:
        assert durable.commits_in_order(str(fs.mountpoint))
        assert not durable.fsync_commits_all(str(fs.mountpoint))
    with make_loopfs(tmp_path / "journalled", size_mb=32) as fs:
        subprocess.run(
            ["mount", "-o", "remount,data=journal", str(fs.mountpoint)], capture_output=True
        )
        options = Path(f"/proc/fs/ext4/{Path(fs.device).name}/options").read_text().split()
        if "data=journal" not in options:  # remounting to data=journal is refused: mount anew
            subprocess.run(["umount", str(fs.mountpoint)], check=True)
            subprocess.run(
                ["mount", "-o", "data=journal", fs.device, str(fs.mountpoint)], check=True
            )
        assert durable.commits_in_order(str(fs.mountpoint))
        assert not durable.fsync_commits_all(str(fs.mountpoint))


def test_write_out_writes_regular_files_and_leaves_the_rest(loopfs: LoopFs) -> None:
    """What a checkpoint writes out before its commit may sit beside a fifo or an overlay
    whiteout (a character device 0:0, which cannot be opened), or be gone: those are left
    out, and the regular file's pages reach the device."""
    d = loopfs.mountpoint / "out"
    d.mkdir()
    syncfs_path(loopfs.mountpoint)
    (d / "data").write_bytes(os.urandom(1 << 20))
    os.mkfifo(d / "fifo")
    os.mknod(d / "whiteout", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    before = bytes_written(loopfs)
    durable.write_out([str(d / n) for n in ("fifo", "whiteout", "gone", "data")])
    assert bytes_written(loopfs) - before >= 1 << 20


def grow_and_rotate(d: Path, logs: int, round_: int) -> None:
    for i in range(logs):
        append(d / f"log{i}", lines(20, 1_000 * round_))
    rotate(d)


def test_a_checkpoint_commits_a_few_times_however_many_files_grew_or_moved(
    layout: Layout,
) -> None:
    """Forty tails and four renames: one journal commit each would be 44; the checkpoint
    makes them durable with the sync after its stage, and its closing sync."""
    seed_rotated(layout.orig)
    for i in range(40):
        (layout.orig / f"log{i}").write_bytes(lines(100, 10_000 * i))
    layout.copy_in()
    layout.bind_over()
    try:
        ledger = layout.checkpoint().ledger
        for round_ in range(2):
            grow_and_rotate(layout.orig, 40, round_)
            res, commits = measured(layout, ledger, journal_commits)
            ledger = res.ledger
            assert res.appended == 40 and res.renamed == 4, res
            assert contents(layout.disk) == contents(layout.orig)
            for i in range(40):  # the times are set after the tails are durable
                name = f"log{i}"
                assert (layout.disk / name).stat().st_mtime_ns == (
                    layout.orig / name
                ).stat().st_mtime_ns
            assert commits <= 6, commits
        layout.final_sync(ledger=ledger)
    finally:
        layout.unbind()


def test_a_power_cut_during_batched_appends_leaves_prefixes(layout: Layout, tmp_path: Path) -> None:
    """No fsync per tail: a power cut at any moment, with the journal's last commit before
    it or right at it (ext4 commits on its own timer too), leaves each file a prefix of RAM
    at least as long as the last checkpoint's; once the caller's syncfs is done, the tails."""
    subprocess.run(["mount", "-o", "remount,commit=600", str(layout.loop.mountpoint)], check=True)
    names = ["a.log", "b.log", "c.log"]
    for n, name in enumerate(names):
        (layout.orig / name).write_bytes(lines(5_000, 100_000 * n))
    layout.copy_in()
    layout.bind_over()
    try:
        ledger = layout.checkpoint().ledger
        assert ledger is not None
        old = {name: (layout.disk / name).read_bytes() for name in names}
        for name in names:
            append(layout.orig / name, lines(3_000, 900_000))  # about 170 KiB each
        new = {name: (layout.orig / name).read_bytes() for name in names}
        grown = {name: len(old[name]) for name in names}
        mtime = {name: (layout.disk / name).stat().st_mtime_ns for name in names}

        def back_to_last_checkpoint() -> None:
            for name in names:  # on the device
                with open(layout.disk / name, "r+b") as f:
                    f.truncate(len(old[name]))
                os.utime(layout.disk / name, ns=(mtime[name], mtime[name]))
            syncfs_path(layout.loop.mountpoint)

        for n in range(1, len(names) + 1):
            for committed in (False, True):
                back_to_last_checkpoint()
                seen: list[str] = []
                cut = commit_and_cut_at(n, seen, layout.loop) if committed else cut_at(n, seen)
                with pytest.raises(Cut):
                    appends.append_grown(
                        str(layout.data), str(layout.disk), grown, ledger, cut, batched=True
                    )
                assert seen == ["tail:written"] * n
                found = after_a_power_cut(layout, tmp_path, n, committed)
                for k, name in enumerate(names):
                    assert new[name].startswith(found[name]), (n, committed, name)
                    assert len(found[name]) >= len(old[name]), (n, committed, name)
                    if committed and k < n:
                        assert found[name] == new[name], (n, name)
        # the whole sequence, cut after the syncfs and the first time set
        back_to_last_checkpoint()
        done = appends.append_grown(str(layout.data), str(layout.disk), grown, ledger, batched=True)
        assert all(not a.timed for a in done)
        syncfs_path(layout.loop.mountpoint)
        with pytest.raises(Cut):
            appends.set_times(str(layout.disk), done, cut_at(1, []))
        found = after_a_power_cut(layout, tmp_path, 0, True)
        assert found == new
    finally:
        layout.unbind()


def commit_and_cut_at(
    n: int, seen: list[str], fs: LoopFs, only: str | None = None
) -> Callable[[str], None]:
    """A step that, at the `n`th step (of those named `only`), syncs the filesystem (the
    journal's timer commits right then) and cuts the power (raises Cut)."""

    def step(name: str) -> None:
        if only is not None and name != only:
            return
        seen.append(name)
        if len(seen) == n:
            syncfs_path(fs.mountpoint)
            raise Cut

    return step


def after_a_power_cut(layout: Layout, tmp_path: Path, n: int, committed: bool) -> dict[str, bytes]:
    """The files of the pinned directory on the device as it is now, mounted as after a
    reboot (ext4 replays its journal)."""
    image = tmp_path / "after-cut.img"
    subprocess.run(["cp", "--sparse=always", str(layout.loop.image), str(image)], check=True)
    try:
        with make_loopfs_from(image, tmp_path / f"rebooted-{n}-{committed}") as rebooted:
            return contents(rebooted / "pve-cluster")
    finally:
        image.unlink()


def test_a_journal_generation_commits_a_few_times_however_many_files_grew(
    loopfs: LoopFs, runtime_tmpfs: Path
) -> None:
    """Forty tails into the last generation: synced with the generation (one syncfs), not
    one fsync each; the times set once they are durable."""
    upper = runtime_tmpfs / "upper"
    upper.mkdir()
    journal = loopfs.mountpoint / "journal"
    for i in range(40):
        (upper / f"log{i}").write_bytes(lines(100, 10_000 * i))
    first = writeback.checkpoint(str(upper), str(journal))
    for i in range(40):
        append(upper / f"log{i}", lines(20, 900_000))
    syncfs_path(loopfs.mountpoint)
    before = journal_commits(loopfs)
    second = writeback.checkpoint(str(upper), str(journal), ledger=first.ledger)
    commits = journal_commits(loopfs) - before
    assert second.appended == 40, second
    gen = journal / f"gen-{second.generation}"
    for i in range(40):
        ram, there = upper / f"log{i}", gen / f"log{i}"
        assert there.read_bytes() == ram.read_bytes()
        assert there.stat().st_mtime_ns == ram.stat().st_mtime_ns
    assert commits <= 6, commits
