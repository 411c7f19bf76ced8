"""An overlay pin is written back while it still serves the path, and after the unmount only
what changed since is written: a reader of the directory never sees it go back to the state it
had when it was pinned, never finds a file missing, and sees rampiped's own names (the hold and
scratch directories of the write-back) only in the moments after the unmount, not for the whole
write-back. A writer that keeps appending loses nothing. On the code before this, the reader
read the pin's old state for the whole write-back (seconds with this much data)."""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import Env, make_env, running
from tests.system.helpers import drop_caches, remount, tree, wait_for
from tests.system.test_safety_budget import ALL_OF_THE_MEMORY, grow, pin_adaptively

pytestmark = pytest.mark.system

BIG = 24  # files of 4 MiB rewritten through the pin: about 100 MiB to write back
# rampiped's own names: at the start (.rampiped-held) or not (.NAME.rampiped-new)
OWN = re.compile(r".*rampiped")


def version(path: Path) -> int:
    """The version a big file holds: its first 8 bytes."""
    with open(path, "rb") as f:
        return int(f.read(8))


def write_version(path: Path, n: int) -> None:
    path.write_bytes(b"%08d" % n + bytes([n % 251]) * ((4 << 20) - 8))


class Reader(threading.Thread):
    """Reads the directory in a loop: the state file's counter and each big file's version
    must never go back, no file it saw may go missing, and it notes rampiped's own names."""

    def __init__(self, env: Env, d: Path) -> None:
        super().__init__(daemon=True)
        self.env, self.d = env, d
        self.stop = threading.Event()
        self.back: list[str] = []
        self.missing: list[str] = []
        self.own_mounted: list[str] = []  # rampiped's names seen while the overlay covered it
        self.own_seen: list[str] = []  # those seen after the unmount
        self.reads = 0
        self.listing = threading.Event()  # whether it lists the directory too
        self.listing.set()

    def run(self) -> None:
        last: dict[str, int] = {}
        while not self.stop.is_set():
            mounted = self.env.mounted_at(self.d) is not None
            names = os.listdir(self.d) if self.listing.is_set() else []
            own = [n for n in names if OWN.match(n)]
            if own and mounted and self.env.mounted_at(self.d) is not None:
                self.own_mounted += own
            elif own:
                self.own_seen += own
            for name in ["state.json", *(f"big{i}" for i in range(BIG))]:
                try:
                    path = self.d / name
                    seen = int(path.read_text()) if name == "state.json" else version(path)
                except FileNotFoundError:
                    self.missing.append(name)
                    continue
                if seen < last.get(name, -1):
                    self.back.append(f"{name}: {seen} after {last[name]}")
                last[name] = max(seen, last.get(name, -1))
            self.reads += 1


class Appender(threading.Thread):
    """Appends a line to app.log every 20 ms, opening and closing it each time (a logger)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.lines = 0

    def run(self) -> None:
        while not self.stop.is_set():
            with open(self.path, "a") as f:
                f.write(f"line {self.lines}\n")
            self.lines += 1
            self.stop.wait(0.02)


def seed(d: Path) -> None:
    d.mkdir()
    (d / "state.json").write_text("0")
    for i in range(BIG):
        write_version(d / f"big{i}", 0)


def write_into_ram(d: Path) -> None:
    """All of the pinned directory to be written back: each big file, and the state file
    rewritten 199 times (temporary file, rename)."""
    for i in range(BIG):
        write_version(d / f"big{i}", 1)
    for n in range(1, 200):
        tmp = d / "state.json.new"
        tmp.write_text(str(n))
        tmp.rename(d / "state.json")


@contextlib.contextmanager
def reading(env: Env, d: Path) -> Iterator[tuple[Reader, Appender]]:
    """A Reader and an Appender on `d` while the body runs; then 20 more reads."""
    reader, appender = Reader(env, d), Appender(d / "app.log")
    reader.start()
    appender.start()
    try:
        yield reader, appender
        after = reader.reads  # the reader and the logger go on after the switch
        wait_for(lambda: reader.reads > after + 20, 30, "reads after the unpin")
    finally:
        reader.stop.set()
        appender.stop.set()
        reader.join(10)
        appender.join(10)


def check_written_back(env: Env, d: Path, reader: Reader, appender: Appender) -> None:
    """The reader saw no time travel; the disk, remounted, holds the last state."""
    assert reader.reads > 50, reader.reads
    assert reader.back == [], reader.back[:10]
    assert reader.missing == [], reader.missing[:10]
    assert reader.own_mounted == [], reader.own_mounted[:10]
    remount(env.disk)
    drop_caches()
    assert (d / "state.json").read_text() == "199"
    assert all(version(d / f"big{i}") == 1 for i in range(BIG))
    # every line once. Their order holds up to the rename that puts RAM's version at the
    # name: a line that lands in the replaced file after its tail was copied is carried
    # after the lines the logger writes to the new file meanwhile (README, Known limits)
    lines = (d / "app.log").read_text().splitlines()
    assert sorted(lines) == sorted(f"line {i}" for i in range(appender.lines))
    assert not [n for n in os.listdir(d) if OWN.match(n)]


@pytest.mark.parametrize("mode", ["overlay", "copy"])
def test_a_reader_never_sees_an_unpin_go_back_in_time(tmp_path: Path, mode: str) -> None:
    """A copy pin writes back while its copy covers the path too, and after its unmount what
    changed since: the reader and the logger see the same there."""
    with make_env(tmp_path, disk_mb=1024) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        seed(d)
        with running(env) as dm:
            env.ctl("pin", str(d), "--mode", mode, check=True)
            assert env.mounted_at(d) is not None
            write_into_ram(d)
            with reading(env, d) as (reader, appender):
                started = time.monotonic()
                done = env.ctl("unpin", str(d))
                took = time.monotonic() - started
                assert done.returncode == 0, (done.stdout, done.stderr, dm.log_text()[-3000:])
                assert env.mounted_at(d) is None
            log = dm.log_text()
        assert reader.own_seen == [], sorted(set(reader.own_seen))
        if mode == "overlay":
            found = re.search(r"written back before the unmount \(.*", log)
            assert found, log[-3000:]
            print(f"\nunpin {took:.2f} s; {found.group(0)}; reader: {reader.reads} reads")
        check_written_back(env, d, reader, appender)


@pytest.mark.parametrize("mode", ["overlay", "copy"])
def test_a_reader_never_sees_a_pin_a_checkpoint_or_a_stop_go_back_in_time(
    tmp_path: Path, mode: str
) -> None:
    """The reader runs from before the pin, through the writes (each file replaced by a
    rename, so that a plain disk would never show it half written), a checkpoint (`rampipectl
    sync`) and the stop, which writes every pin back the way an unpin does, to after the
    daemon's exit. The logger starts once the pin is made (a copy pin refuses a directory
    written while it is copied into RAM), and so does the reader's listing of the directory:
    an overlay pin refuses a directory held open on disk in the moment of its mount (a
    process could make entries through it below the pin). The reader's files, opened for
    reading only in that moment, are waited out in both modes."""
    with make_env(tmp_path, disk_mb=1024) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        seed(d)
        reader, appender = Reader(env, d), Appender(d / "app.log")
        reader.listing.clear()
        reader.start()
        try:
            with running(env) as dm:
                wait_for(lambda: reader.reads > 20, 30, "reads before the pin")
                env.ctl("pin", str(d), "--mode", mode, check=True)
                assert env.mounted_at(d) is not None
                reader.listing.set()
                appender.start()
                for i in range(BIG):
                    write_version(d / f"big{i}.new", 1)
                    os.rename(d / f"big{i}.new", d / f"big{i}")
                for n in range(1, 200):
                    (d / "state.json.new").write_text(str(n))
                    (d / "state.json.new").rename(d / "state.json")
                env.ctl("sync", str(d), check=True)
                assert dm.stop() == 0, dm.log_text()[-3000:]
                assert env.mounted_at(d) is None
                log = dm.log_text()
            after = reader.reads
            wait_for(lambda: reader.reads > after + 20, 30, "reads after the stop")
        finally:
            reader.stop.set()
            appender.stop.set()
            reader.join(10)
            if appender.ident is not None:  # started once the pin was made
                appender.join(10)
        assert reader.own_seen == [], sorted(set(reader.own_seen))
        assert re.search(r"checkpoint of " + re.escape(str(d)), log), log[-3000:]
        if mode == "overlay":
            assert re.search(re.escape(str(d)) + r": written back before the unmount", log), log
        check_written_back(env, d, reader, appender)


class DirReader(threading.Thread):
    """Reads the files of one directory in a loop: none may go back to an older version; it
    counts the reads that found one missing and the names of rampiped's it saw."""

    def __init__(self, d: Path, names: list[str]) -> None:
        super().__init__(daemon=True)
        self.d, self.names = d, names
        self.stop = threading.Event()
        self.back: list[str] = []
        self.missing = 0
        self.own: set[str] = set()
        self.reads = 0

    def run(self) -> None:
        last: dict[str, int] = {}
        while not self.stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                self.own.update(n for n in os.listdir(self.d.parent) if OWN.match(n))
            for name in self.names:
                try:
                    seen = version(self.d / name)
                except FileNotFoundError:
                    self.missing += 1
                    continue
                if seen < last.get(name, -1):
                    self.back.append(f"{name}: {seen} after {last[name]}")
                last[name] = max(seen, last.get(name, -1))
            self.reads += 1


def test_a_renamed_directory_goes_to_its_origin_before_the_unmount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory from disk renamed through the pin and changed there: the unpin writes what
    the layer holds of it into its origin on disk while the overlay still serves the path,
    and the view stays RAM's meanwhile, also once the kernel dropped its caches and follows
    the redirect to that origin anew. After the unmount only the move is left: nothing is
    written then, a reader of the renamed directory never reads an older version, and the
    stash the move goes through is in the journal, not in the directory. On the
    code before this, such a pin was not written back before its unmount at all (the pause
    point is never reached), and the directory was missing for its whole write-back."""
    marker = tmp_path / "paused"
    stage = "unpin:written-early"
    with make_env(tmp_path, disk_mb=512) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        (d / "old").mkdir(parents=True)
        for i in range(8):
            write_version(d / f"old/big{i}", 0)
        (d / "old/gone").write_text("deleted in RAM\n")
        (d / "other").mkdir()
        (d / "other/kept").write_text("on disk\n")
        with safety.paused_daemon(env, monkeypatch, stage, marker) as dm:
            env.ctl("pin", str(d), check=True)
            (d / "old").rename(d / "new")
            for i in range(4):
                write_version(d / f"new/big{i}", 1)
            (d / "new/gone").unlink()
            (d / "new/added").write_text("in RAM\n")
            (d / "other").rename(d / "new/other")  # a second one, into the first
            (d / "new/other/kept").write_text("changed in RAM\n")
            expected = tree(d)
            unpin = safety.ctl_async(env, "unpin", str(d))
            safety.wait_paused(marker, stage)
            assert env.overlay_at(d)
            drop_caches()
            assert tree(d) == expected  # written into the origins, hidden below the overlay
            reader = DirReader(d / "new", [f"big{i}" for i in range(8)])
            reader.start()
            try:
                wait_for(lambda: reader.reads > 5, 30, "reads before the unmount")
                safety.release(marker)
                out, err = unpin.communicate(timeout=120)
                assert unpin.returncode == 0, (out, err, dm.log_text()[-3000:])
                after = reader.reads
                wait_for(lambda: reader.reads > after + 5, 30, "reads after the unmount")
            finally:
                reader.stop.set()
                reader.join(10)
            log = dm.log_text()
        assert not env.overlay_at(d)
        found = re.search(r"written back before the unmount \(.*; after it, (\d+) files", log)
        assert found, log[-3000:]
        assert found.group(1) == "0", found.group(0)  # the moves only
        assert reader.back == [], reader.back[:10]
        assert reader.own == set()  # the move's stash is in the journal
        print(f"\nreader: {reader.reads} reads, {reader.missing} found a file missing")
        remount(env.disk)
        drop_caches()
        assert tree(d) == expected


def change_in_ram(d: Path) -> None:
    """Every kind of change, made through the pin after the daemon wrote the directory back
    once: an append, a same-size rewrite that keeps its old mtime, a deletion and a rename of
    files written back already, a new directory, a directory removed, a symlink."""
    with open(d / "log/app.log", "a") as f:
        f.write("after the early write-back\n")
    st = os.stat(d / "same.txt")
    (d / "same.txt").write_text("SAME SIZE B\n")
    os.utime(d / "same.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    (d / "early.txt").unlink()
    (d / "moved-from.txt").rename(d / "moved-to.txt")
    (d / "fresh" / "deep").mkdir(parents=True)
    (d / "fresh" / "deep" / "f.txt").write_text("fresh\n")
    for child in (d / "doomed").iterdir():
        child.unlink()
    (d / "doomed").rmdir()
    (d / "link").symlink_to("moved-to.txt")


@pytest.mark.parametrize("stage", ["unpin:written-early", "unpin:recorded"])
def test_changes_after_the_early_write_back_reach_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """Changes made after the first write-back before the unmount: at unpin:written-early
    the overlay serves the path for another pass; at unpin:recorded the last pass is over and
    they are written after the unmount. Either way the disk ends up as the view was."""
    marker = tmp_path / "paused"
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        (d / "log").mkdir(parents=True)
        (d / "log/app.log").write_text("on disk\n")
        (d / "same.txt").write_text("SAME SIZE A\n")
        (d / "doomed").mkdir()
        (d / "doomed/x").write_text("x\n")
        with safety.paused_daemon(env, monkeypatch, stage, marker) as dm:
            env.ctl("pin", str(d), check=True)
            with open(d / "log/app.log", "a") as f:
                f.write("in RAM\n")
            (d / "early.txt").write_text("written back early, then deleted\n")
            (d / "moved-from.txt").write_text("renamed after the early write-back\n")
            unpin = safety.ctl_async(env, "unpin", str(d))
            safety.wait_paused(marker, stage)
            assert env.overlay_at(d)
            change_in_ram(d)
            expected = tree(d)
            safety.release(marker)
            out, err = unpin.communicate(timeout=120)
            assert unpin.returncode == 0, (out, err, dm.log_text()[-3000:])
            log = dm.log_text()
        assert not env.overlay_at(d)
        remount(env.disk)
        drop_caches()
        assert tree(d) == expected
        after = re.search(r"written back before the unmount .*; after it, (\d+) files", log)
        assert after, log[-3000:]
        if stage == "unpin:recorded":
            assert int(after.group(1)) > 0  # written after the unmount


OLD_NS = 1_600_000_000 * 10**9  # an mtime long past, put back by cp -p, tar and rsync -a


def same_size_old_mtime(path: Path, text: str) -> None:
    path.write_text(text)
    os.utime(path, ns=(OLD_NS, OLD_NS))


def run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def commit(repo: Path, message: str, *args: str) -> None:
    run("git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", *args, message)


@pytest.mark.parametrize("stage", ["unpin:written-early", "unpin:recorded"])
def test_real_programs_after_the_early_write_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """What comes after the first write-back before the unmount is told by ctime: real
    programs that keep size and mtime (cp -p, tar, rsync -a -c, a store through a shared
    mapping made then, with its mtime put back), git and sqlite3 write there, also into a
    directory mv renamed (written at its origin first), and all of it reaches the disk, at
    another pass before the unmount or after it."""
    marker = tmp_path / "paused"
    outside = tmp_path / "outside"
    outside.mkdir()
    with make_env(tmp_path) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        d.mkdir()
        for name in ("cp.txt", "tar.txt", "rsync.txt"):
            (d / name).write_text("on disk\n")
            same_size_old_mtime(outside / name, f"{name} version B\n")
        run("tar", "-C", outside, "-cf", outside / "b.tar", "tar.txt")
        (d / "mapped.bin").write_bytes(b"a" * 8192)
        repo = d / "repo"
        run("git", "init", "-q", repo)
        (repo / "file").write_text("one\n")
        run("git", "-C", repo, "add", "file")
        commit(repo, "1", "-qm")
        run("sqlite3", d / "db.sqlite", "create table t(x); insert into t values (1);")
        (d / "olddir").mkdir()
        (d / "olddir" / "kept.txt").write_text("from disk\n")
        with safety.paused_daemon(env, monkeypatch, stage, marker) as dm:
            env.ctl("pin", str(d), check=True)
            # a directory renamed by mv: the first write-back goes to its origin (origins.py)
            run("mv", d / "olddir", d / "newdir")
            # into RAM before the unpin, so that its first write-back holds these versions
            for name in ("cp.txt", "tar.txt", "rsync.txt"):
                same_size_old_mtime(d / name, f"{name} version A\n")
            (d / "mapped.bin").write_bytes(b"b" * 8192)
            os.utime(d / "mapped.bin", ns=(OLD_NS, OLD_NS))
            run("sqlite3", d / "db.sqlite", "insert into t values (2);")
            unpin = safety.ctl_async(env, "unpin", str(d))
            safety.wait_paused(marker, stage)
            run("cp", "-p", outside / "cp.txt", d / "cp.txt")
            run("cp", "-p", outside / "cp.txt", d / "newdir" / "cp.txt")
            run("tar", "-C", d, "-xpf", outside / "b.tar")
            run("tar", "-C", d / "newdir", "-xpf", outside / "b.tar")
            run("rsync", "-a", "-c", outside / "rsync.txt", d / "rsync.txt")
            with open(d / "mapped.bin", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
                m[100:105] = b"STORE"
                m.flush()
            os.utime(d / "mapped.bin", ns=(OLD_NS, OLD_NS))
            (repo / "file").write_text("two\n")
            commit(repo, "2", "-qam")
            run("sqlite3", d / "db.sqlite", "insert into t values (3);")
            expected = tree(d)
            safety.release(marker)
            out, err = unpin.communicate(timeout=120)
            assert unpin.returncode == 0, (out, err, dm.log_text()[-3000:])
        assert not env.overlay_at(d)
        remount(env.disk)
        drop_caches()
        assert tree(d) == expected
        assert (d / "cp.txt").read_text() == "cp.txt version B\n"
        assert (d / "newdir" / "cp.txt").read_text() == "cp.txt version B\n"
        assert not (d / "olddir").exists()
        assert (d / "mapped.bin").read_bytes()[100:105] == b"STORE"
        run("git", "-C", repo, "fsck", "--strict")
        log = subprocess.run(
            ["git", "-C", str(repo), "log", "--format=%s"], check=True, capture_output=True
        )
        assert log.stdout.split() == [b"2", b"1"]
        check = subprocess.run(
            ["sqlite3", str(d / "db.sqlite"), "pragma integrity_check; select x from t;"],
            check=True,
            capture_output=True,
            text=True,
        )
        assert check.stdout.split() == ["ok", "1", "2", "3"]


@pytest.mark.parametrize("stage", ["unpin:written-early", "apply:linked-one"])
@pytest.mark.parametrize("fault", ["kill", "power"])
def test_a_crash_while_writing_back_before_the_unmount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, stage: str
) -> None:
    """kill -9 of the daemon, or a power cut, when the unpin has written the directory back
    once (unpin:written-early), or has linked one file of the journal into place of several
    (apply:linked-one), and the overlay still serves it: after a kill the next start adopts the
    pin (the view is RAM's, what was written below it stays hidden) and its unpin completes;
    after a power cut the next start applies the checkpoint that write-back took. Either way
    the directory ends up as the view was, with none of rampiped's names in it."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "app"
        (d / "sub").mkdir(parents=True)
        (d / "sub/old.txt").write_text("on disk\n")
        (d / "gone.txt").write_text("deleted in RAM\n")
        for i in range(4):
            write_version(d / f"big{i}", 0)
        with safety.paused_daemon(env, monkeypatch, stage, marker) as dm:
            env.ctl("pin", str(d), check=True)
            for i in range(4):
                write_version(d / f"big{i}", 1)
            (d / "gone.txt").unlink()
            (d / "sub/new.txt").write_text("new in RAM\n")
            (d / "fresh").mkdir()
            (d / "fresh/f.txt").write_text("fresh\n")
            expected = tree(d)
            unpin = safety.ctl_async(env, "unpin", str(d))
            safety.wait_paused(marker, stage)
            safety.fault(fault, env, dm)
            unpin.wait(30)
        with running(env) as again:
            if fault == "kill":
                again.wait_log(r"adopted " + re.escape(str(d)))
                assert env.overlay_at(d)
                assert tree(d) == expected  # the view: RAM, the write-back below it hidden
                assert env.ctl("unpin", str(d)).returncode == 0, again.log_text()[-3000:]
            else:
                assert env.status()["pins"] == []
            assert again.stop() == 0
        assert not env.overlay_at(d)
        remount(env.disk)
        drop_caches()
        assert tree(d) == expected


# -- evictions ----------------------------------------------------------------------------------


def test_an_eviction_writes_back_before_the_unmount(tmp_path: Path) -> None:
    """RAM is short (MemAvailable under min_free): the coldest adaptive pin is evicted, and
    written back while it still serves the path, as an unpin is. The reader never sees it go
    back in time or lose a file."""
    with make_env(tmp_path, disk_mb=1024) as env:
        env.write_config(ram={"max": "256M", "min_free": "64M"}, adaptive={"cool_for": "1h"})
        d = env.data / "app"
        seed(d)
        with running(env) as dm:
            pin_adaptively(env, d)
            write_into_ram(d)
            with reading(env, d) as (reader, appender):
                env.write_config(
                    ram={"max": "256M", "min_free": ALL_OF_THE_MEMORY}, adaptive={"cool_for": "1h"}
                )
                env.ctl("reload", check=True)
                dm.wait_log(r"unpinned " + re.escape(str(d)) + r": evicted", timeout=60)
            log = dm.log_text()
            assert dm.stop() == 0, log[-3000:]
        check_written_back(env, d, reader, appender)
        assert re.search(re.escape(str(d)) + r": written back before the unmount", log), log[-3000:]
        assert "the write-back before the unmount stops" not in log


def test_an_eviction_whose_ram_runs_short_meanwhile_unmounts_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evicted pin's writers fill its RAM area while it is written back before the
    unmount: once they took a quarter of the room it had when the eviction began, the command
    that runs is stopped (or the next one not started) and the unmount comes first, as before:
    no write fails, and everything reaches the disk."""
    marker = tmp_path / "paused"
    with make_env(tmp_path, disk_mb=512) as env:
        # a 48 MiB area; the early write-back stops once it holds 40 MiB
        env.write_config(
            ram={"max": "32M", "high_watermark": "90%", "min_free": "64M"},
            adaptive={"cool_for": "1h"},
            sync={"interval": 0},
        )
        d = env.data / "grow"
        d.mkdir()
        stages = "evict:begin,checkpoint:copied"
        with safety.paused_daemon(env, monkeypatch, stages, marker) as dm:
            pin_adaptively(env, d)
            first = grow(d, 64 << 20, 26 << 20, 1 << 20)
            # past the watermark (28.8 MiB) at once, then quiet: evicted, and written back
            # before the unmount; its first checkpoint pauses. (The eviction may be decided
            # while these writes still run, the growth foretelling the watermark: it waits
            # at its beginning until they end, so that its writers are quiet when it watches
            # them, as this test means them to be.)
            push = grow(d / "push", 256 << 20, 4 << 20, 1 << 20)
            safety.wait_paused(marker, "evict:begin")
            safety.release(marker)
            safety.wait_paused(marker, "checkpoint:copied")
            more = grow(d / "more", 64 << 20, 14 << 20, 1 << 20)  # 44 MiB: 4 MiB of room
            safety.release(marker)
            safety.wait_unpinned_releasing(dm, marker, d)
            log = dm.log_text()
            assert dm.stop() == 0, log[-3000:]
        stopped = r": evicted, and its RAM area has .* free .*: the write-back before the unmount"
        assert re.search(re.escape(str(d)) + stopped + " stops", log), log[-3000:]
        assert [*first["failures"], *push["failures"], *more["failures"]] == []
        assert not env.overlay_at(d)
        remount(env.disk)
        drop_caches()
        expected = {name: 1 for name in first["written"]}
        expected.update({f"push/{name}": 1 for name in push["written"]})
        expected.update({f"more/{name}": 1 for name in more["written"]})
        assert safety.check_tree(d, expected) == []
