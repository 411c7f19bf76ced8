"""Copy-mode data path on real filesystems: the disk is a loop ext4, RAM is a tmpfs with the
pin's source name, the disk side a private bind of the original directory, and applications
write through a bind of the RAM copy over the original path, as rampiped lays a pin out."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rampiped import commands, copymode
from rampiped.writeback import HUNG_EXIT, SCRATCH_NAME, CommandResult, run_command
from tests.system.helpers import (
    LoopFs,
    diff_manifests,
    manifest,
    sqlite_shared_lock,
    unmount_tree,
    wait_for,
)

pytestmark = pytest.mark.system

MiB = 1024 * 1024


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@dataclass
class Layout:
    id: str
    orig: Path  # the directory on disk, as applications know it
    ram: Path  # the pin's tmpfs
    data: Path  # ram/data: the copy
    disk: Path  # private bind of orig: where checkpoints land
    loop: LoopFs

    def bind_over(self) -> None:
        """The RAM copy over the original path: applications now write into RAM."""
        sh("mount", "--bind", str(self.data), str(self.orig))

    def unbind(self) -> None:
        sh("umount", str(self.orig))

    def copy_in(self, **kw: Any) -> copymode.CopyResult:
        return copymode.copy_in(
            str(self.disk), str(self.ram), pin_id=self.id, path=str(self.orig), **kw
        )

    def checkpoint(self, **kw: Any) -> copymode.CheckpointResult:
        return copymode.checkpoint(str(self.ram), str(self.disk), pin_id=self.id, **kw)

    def final_sync(self, **kw: Any) -> copymode.CheckpointResult:
        return copymode.final_sync(str(self.ram), str(self.disk), pin_id=self.id, **kw)


def mount_ram(path: Path, pin_id: str, size: str = "512m") -> None:
    path.mkdir(parents=True, exist_ok=True)
    sh("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "rampiped-" + pin_id, str(path))


@pytest.fixture
def layout(loopfs: LoopFs, runtime_tmpfs: Path) -> Iterator[Layout]:
    pin_id = secrets.token_hex(4)
    orig = loopfs.mountpoint / "pve-cluster"
    orig.mkdir()
    base = runtime_tmpfs / "pins" / pin_id
    ram, disk = base / "ram", base / "disk"
    disk.mkdir(parents=True)
    try:
        mount_ram(ram, pin_id)
        sh("mount", "--bind", str(orig), str(disk))
        sh("mount", "--make-private", str(disk))
        yield Layout(pin_id, orig, ram, ram / "data", disk, loopfs)
    finally:
        unmount_tree(orig)
        unmount_tree(runtime_tmpfs / "pins")


# -- trees ------------------------------------------------------------------------------------


def make_db(path: Path, mode: str = "delete", rows: int = 300, blob: int = 3000) -> None:
    """A database shaped like pmxcfs's config.db: a tree of small files in one table."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute(
        "CREATE TABLE tree(inode INTEGER PRIMARY KEY, parent INTEGER, version INTEGER, "
        "name TEXT, data BLOB)"
    )
    conn.execute("CREATE TABLE log(n INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("BEGIN")
    for i in range(rows):
        conn.execute(
            "INSERT INTO tree VALUES(?, 0, 0, ?, randomblob(?))", (i, f"file{i}.cfg", blob)
        )
    conn.execute("COMMIT")
    conn.close()


def populate(root: Path) -> None:
    """Every kind of thing rsync -aHAX keeps."""
    root.chmod(0o751)
    os.chown(root, 0, 33)
    (root / "plain.txt").write_text("hello\n")
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(3 * MiB))
    (root / "secret").write_text("s\n")
    (root / "secret").chmod(0o600)
    (root / "owned").write_text("o\n")
    os.chown(root / "owned", 1234, 2345)
    (root / "setgid-dir").mkdir()
    (root / "setgid-dir").chmod(0o2775)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "leaf").write_text("leaf\n")
    (root / "sub" / "emptydir").mkdir()
    (root / "odd name \u00e9 ?*[x]").write_text("odd\n")
    os.setxattr(root / "plain.txt", "user.color", b"blue")
    os.setxattr(root / "plain.txt", "trusted.origin", b"test")
    sh("setfacl", "-m", "u:1234:rw,g:2345:r", str(root / "secret"))
    sh("setfacl", "-d", "-m", "u:1234:rwx", str(root / "sub"))
    os.symlink("plain.txt", root / "link-rel")
    os.symlink("/nonexistent/target", root / "link-dangling")
    os.symlink("deeper", root / "sub" / "dirlink")
    os.link(root / "plain.txt", root / "sub" / "hardlink")
    os.mkfifo(root / "fifo")
    (root / "dbdir").mkdir()
    make_db(root / "dbdir" / "config.db")
    # a default ACL that the database's copy would inherit on disk, unlike the original
    sh("setfacl", "-d", "-m", "g:2345:rwx", str(root / "dbdir"))
    os.setxattr(root / "dbdir" / "config.db", "user.kind", b"db")


def comparable(m: dict[str, Any], databases: Sequence[str]) -> dict[str, Any]:
    """A manifest where databases count by what they hold, not by their bytes (a backup is the
    same database in other bytes), and without their companion files."""
    out = {}
    for rel, entry in m.items():
        if any(rel == db + s for db in databases for s in copymode.DB_COMPANIONS):
            continue
        if rel in databases:
            entry = {k: v for k, v in entry.items() if k not in ("sha256", "size")}
        out[rel] = entry
    return out


def sql(path: Path, *statements: str) -> None:
    """Run and commit statements the way an application does, and close the database (an open
    connection would keep the bind over the original path busy)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


def db_state(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return (
            conn.execute(
                "SELECT inode, version, name, hex(data) FROM tree ORDER BY inode"
            ).fetchall()
            + conn.execute("SELECT n, hex(v) FROM log ORDER BY n").fetchall()
        )
    finally:
        conn.close()


def assert_same(disk: Path, data: Path, databases: Sequence[str] = ()) -> None:
    a = comparable(manifest(disk, dir_times=True), databases)
    b = comparable(manifest(data, dir_times=True), databases)
    assert diff_manifests(a, b) == []
    for db in databases:
        assert db_state(disk / db) == db_state(data / db)
    for side in (disk, data):  # the root itself is not in a manifest
        assert oct(side.stat().st_mode) == oct(0o40751)
        assert (side.stat().st_uid, side.stat().st_gid) == (0, 33)


# -- lifecycle --------------------------------------------------------------------------------


def test_copy_pin_lifecycle_keeps_everything(layout: Layout) -> None:
    populate(layout.orig)
    before = manifest(layout.orig, dir_times=True)
    result = layout.copy_in()
    assert result.attempts == 1
    assert result.files == sum(1 for e in before.values() if e["type"] == "file")
    assert result.bytes == copymode.dir_size(str(layout.orig))
    assert diff_manifests(manifest(layout.data, dir_times=True), before) == []
    assert (layout.ram / copymode.SENTINEL).exists()

    layout.bind_over()
    o = layout.orig
    assert o.stat().st_dev == layout.data.stat().st_dev  # applications now see RAM
    (o / "plain.txt").write_text("changed through the bound path\n")
    (o / "secret").chmod(0o640)
    os.chown(o / "empty", 4321, 4321)
    os.setxattr(o / "big.bin", "user.new", b"x")
    sh("setfacl", "-m", "u:999:r", str(o / "owned"))
    (o / "sub" / "deeper").rename(o / "sub" / "renamed")
    (o / "link-rel").unlink()
    os.symlink("big.bin", o / "link-rel")
    os.link(o / "big.bin", o / "big.hard")
    (o / "fifo").unlink()
    os.mkfifo(o / "fifo2")
    (o / "new-in-ram").write_text("new\n")
    (o / "sub" / "inherits-acl").write_text("acl\n")  # sub has a default ACL
    sql(o / "dbdir" / "config.db", "UPDATE tree SET version = version + 1, data = randomblob(10)")

    res = layout.checkpoint()
    assert res.unstable == []
    assert res.databases == ["dbdir/config.db"]
    assert res.deleted >= 2  # the renamed directory's old name and the fifo
    assert res.files >= 5
    assert_same(layout.disk, layout.data, ["dbdir/config.db"])

    shutil.rmtree(o / "sub")
    (o / "big.bin").unlink()
    (o / "owned").write_bytes(b"")
    (o / "dbdir" / "second.db").write_bytes(b"")
    make_db(o / "dbdir" / "second.db", mode="wal", rows=5)
    layout.unbind()
    res = layout.final_sync()
    assert res.databases == ["dbdir/config.db", "dbdir/second.db"]
    assert_same(layout.disk, layout.data, ["dbdir/config.db", "dbdir/second.db"])
    assert not (layout.disk / "sub").exists()
    assert not list(layout.disk.glob("dbdir/*-*")), "no database companion on disk"


# -- racing writers ---------------------------------------------------------------------------

LINE_WRITER = r"""
import os, sys
root, stop = sys.argv[1], sys.argv[2]
names = [os.path.join(root, f"log{i}.txt") for i in range(4)]
n = 0
while not os.path.exists(stop):
    with open(names[n % 4], "a") as f:  # opened by path: after the bind it writes into RAM
        f.write(f"{n}\n")
    n += 1
    if n == 50:
        print("started", flush=True)
print(n, flush=True)
"""


class LineWriter:
    def __init__(self, root: Path, stop: Path) -> None:
        self.stop = stop
        stop.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LINE_WRITER, str(root), str(stop)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "started"

    def finish(self) -> int:
        self.stop.touch()
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0
        return int(out.strip())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def lines_in(root: Path) -> list[int]:
    found: list[int] = []
    for i in range(4):
        path = root / f"log{i}.txt"
        if path.exists():
            found += [int(x) for x in path.read_text().split()]
    return sorted(found)


def test_writer_racing_the_copy_loses_nothing(layout: Layout, tmp_path: Path) -> None:
    populate(layout.orig)
    (layout.orig / "filler").write_bytes(os.urandom(20 * MiB))  # a pass takes a while
    writer = LineWriter(layout.orig, tmp_path / "stop")
    first_pass: list[int] = []
    calls = 0
    written = 0

    def racing(argv: list[str]) -> CommandResult:
        nonlocal calls, written
        result = run_command(argv)
        calls += 1
        if calls == 1:
            # The writer is still going: what it writes now is after this pass read the files.
            grown = sum((layout.orig / f"log{i}.txt").stat().st_size for i in range(4))
            wait_for(
                lambda: (
                    sum((layout.orig / f"log{i}.txt").stat().st_size for i in range(4))
                    > grown + 100
                ),
                10,
                "the writer to write after the first pass",
            )
            written = writer.finish()
            first_pass.extend(lines_in(layout.data))
        return result

    try:
        result = layout.copy_in(runner=racing)
    finally:
        writer.kill()
    assert len(first_pass) < written, "the first pass alone would have lost lines"
    assert result.attempts == 2
    assert lines_in(layout.data) == list(range(written))

    layout.bind_over()
    assert copymode.changed_since(str(layout.disk), result.snapshot) == []
    writer = LineWriter(layout.orig, tmp_path / "stop")  # keeps appending, now into RAM
    try:
        layout.checkpoint()
        more = writer.finish()
    finally:
        writer.kill()
    layout.unbind()
    layout.final_sync()
    # The second writer started over at 0: every line of both runs is on disk.
    assert lines_in(layout.disk) == sorted([*range(written), *range(more)])
    assert_same(layout.disk, layout.data, ["dbdir/config.db"])


def test_writer_that_never_stops_is_refused(layout: Layout, tmp_path: Path) -> None:
    (layout.orig / "filler").write_bytes(os.urandom(8 * MiB))
    writer = LineWriter(layout.orig, tmp_path / "stop")
    try:
        with pytest.raises(copymode.CopyRace) as caught:
            layout.copy_in()
        written = writer.finish()
    finally:
        writer.kill()
    assert "kept changing while it was copied into RAM (3 passes)" in str(caught.value)
    assert "log0.txt" in caught.value.paths
    assert not (layout.ram / copymode.SENTINEL).exists()
    with pytest.raises(copymode.UnsafeSource, match="never completed"):
        layout.checkpoint()
    assert lines_in(layout.orig) == list(range(written))


def test_write_between_copy_and_bind_is_seen(layout: Layout) -> None:
    (layout.orig / "a").write_text("1\n")
    result = layout.copy_in()
    with open(layout.orig / "a", "a") as f:  # lands on disk, the copy does not have it
        f.write("2\n")
    (layout.orig / "b").write_text("new\n")
    layout.bind_over()
    assert copymode.changed_since(str(layout.disk), result.snapshot) == [".", "a", "b"]


def staging(argv: list[str]) -> bool:
    """Whether an rsync run is a checkpoint's staging of the files it writes whole
    (copywb/staged.py), which comes before its full pass."""
    return any(a.startswith("--compare-dest=") for a in argv)


def test_files_that_change_during_a_checkpoint_are_copied_again(layout: Layout) -> None:
    for name in ("hot", "warm", "gone", "calm"):
        (layout.orig / name).write_text(f"{name} 0\n")
    layout.copy_in()
    d = layout.data
    calls: list[list[str]] = []

    # Rewrites, not appends: a file that only grew during a pass is a prefix on disk and is
    # appended at the next checkpoint (test_appends.py); a rewrite may be torn, so it is
    # copied again.
    def busy_application(argv: list[str]) -> CommandResult:
        if staging(argv):  # the files to write whole, copied aside first: not a pass here
            return run_command(argv)
        result = run_command(argv)
        calls.append(argv)
        (d / "hot").write_text(f"hot {len(calls)}\n")  # changes during every pass
        if len(calls) == 1:  # changes during the first pass only
            (d / "warm").write_text("warm 1\n")
            (d / "gone").unlink()
            (d / "newdir").mkdir()
            (d / "newdir" / "born").write_text("born\n")
        return result

    res = layout.checkpoint(runner=busy_application, stable_attempts=3)
    assert len(calls) == 4  # the full pass and three passes over the changed files
    assert res.unstable == ["hot"]
    disk = layout.disk
    assert (disk / "warm").read_text() == "warm 1\n"
    assert not (disk / "gone").exists()
    assert (disk / "newdir" / "born").read_text() == "born\n"
    # the last whole copy seen: the version before the rewrite that followed the last pass
    assert (disk / "hot").read_text() == "hot 3\n"
    assert (d / "hot").read_text() == "hot 4\n"


KINDS = ("dir", "link", "fifo", "gone")


def retype(d: Path, when: str) -> None:
    """f-KIND-WHEN below `d`, a regular file, replaced by a directory holding a file, a
    symlink, a fifo, or nothing."""
    for kind in KINDS:
        p = d / f"f-{kind}-{when}"
        p.unlink()
        if kind == "dir":
            p.mkdir()
            (p / "inside").write_text("inside\n")
        elif kind == "link":
            os.symlink("nowhere", p)
        elif kind == "fifo":
            os.mkfifo(p)


def busy(scratch: Path) -> bool:
    """rsync writes a file into the scratch directory."""
    try:
        return any(scratch.iterdir())
    except FileNotFoundError:
        return False


def test_changed_files_that_change_kind_or_go_during_the_forced_pass_are_churn(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files that changed during the full pass are listed for the forced one (-I). A process
    replaces each by a directory, a symlink or a fifo, or deletes it, before rsync lists it
    ("before") or while rsync still sends a larger file listed first ("during"). The checkpoint
    neither fails nor hangs: it writes each entry as it is now (what a new directory holds is
    taken at the next checkpoint).

    Unlike the overlay checkpoint's re-copy (writeback.journal.retyped_left_out), rsync never
    says "could not make way" here: with --temp-dir it deletes the disk's entry of another type
    first, and a regular file there always goes (a directory too: --force). A fifo that rsync
    listed as a regular file blocks its sender in open(2): the watchdog kills that pass as hung
    and it runs again."""
    monkeypatch.setattr(commands, "HANG_AFTER", 1.0)
    monkeypatch.setattr(commands, "_WATCH_EVERY", 0.2)
    names = [f"f-{kind}-{when}" for when in ("before", "during") for kind in KINDS]
    (layout.orig / "a-big").write_bytes(os.urandom(8 * MiB))
    for name in names:
        (layout.orig / name).write_text(f"{name} 0\n")
    layout.copy_in()
    d = layout.data
    forced: list[CommandResult] = []

    def runner(argv: list[str]) -> CommandResult:
        if staging(argv):
            return run_command(argv)
        if "-I" not in argv:  # the full pass: every file changes during it
            result = run_command(argv)
            for name in ["a-big", *names]:
                # rewritten in place, not appended (a file that only grew is a prefix on
                # disk, left for the next checkpoint: test_appends.py)
                with open(d / name, "r+b") as f:
                    f.write(b"X")
            return result
        if forced:  # the passes after the first forced one
            forced.append(run_command(argv))
            return forced[-1]
        retype(d, "before")
        # slowed down: rsync still sends a-big when the files listed after it change
        slow = [argv[0], "--bwlimit=2m", *argv[1:]]
        done: list[CommandResult] = []
        worker = threading.Thread(target=lambda: done.append(run_command(slow)), daemon=True)
        worker.start()
        try:
            wait_for(lambda: busy(layout.disk / SCRATCH_NAME), 30, "rsync writing a-big")
            retype(d, "during")
        finally:
            worker.join(60)
        assert done, "the forced pass hangs"
        forced.append(done[0])
        return done[0]

    res = layout.checkpoint(runner=runner, stable_attempts=3)
    first = forced[0]
    assert first.returncode == HUNG_EXIT, first  # the fifo listed as a regular file
    assert "f-dir-during" in first.stderr, first.stderr  # "Is a directory (21)"
    assert not [r for r in forced if "could not make way" in r.stderr], forced
    assert res.unstable == []
    for name in names:
        kind = name.split("-")[1]
        p = layout.disk / name
        assert {
            "dir": p.is_dir() and not p.is_symlink(),
            "link": p.is_symlink(),
            "fifo": p.is_fifo(),
            "gone": not os.path.lexists(p),
        }[kind], name
    # what the new directories hold (the pass copies only the listed entries): the next one
    layout.checkpoint()
    assert diff_manifests(manifest(layout.disk), manifest(d)) == []


def test_same_size_rewrite_within_the_same_second_is_written(layout: Layout) -> None:
    """rsync's default quick check compares whole seconds: this rewrite would be skipped."""
    (layout.orig / "status").write_text("state A\n")
    os.utime(layout.orig / "status", ns=(0, 1_700_000_000_100_000_000))
    layout.copy_in()
    layout.checkpoint()
    (layout.data / "status").write_text("state B\n")
    os.utime(layout.data / "status", ns=(0, 1_700_000_000_600_000_000))
    layout.checkpoint()
    assert (layout.disk / "status").read_text() == "state B\n"
    assert (layout.disk / "status").stat().st_mtime_ns == 1_700_000_000_600_000_000


# -- SQLite -----------------------------------------------------------------------------------

DB_WRITER = r"""
import os, sqlite3, sys
path, mode, stop = sys.argv[1:4]
conn = sqlite3.connect(path, isolation_level=None, timeout=60)
conn.execute(f"PRAGMA journal_mode={mode}")
if mode == "wal":
    conn.execute("PRAGMA synchronous=NORMAL")
print("started", flush=True)
n = 0
while not os.path.exists(stop):
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO log(v) VALUES(randomblob(100))")
    conn.execute("UPDATE tree SET version = version + 1, data = randomblob(3000) "
                 "WHERE inode = ?", (n % 300,))
    conn.execute("COMMIT")
    n += 1
conn.close()
print(n, flush=True)
"""


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_sqlite_checkpoints_under_load_are_always_valid(
    layout: Layout, tmp_path: Path, mode: str
) -> None:
    make_db(layout.orig / "config.db", mode=mode)
    layout.copy_in()
    layout.bind_over()
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", DB_WRITER, str(layout.orig / "config.db"), mode, str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    copies: list[tuple[float, str, int]] = []
    done = threading.Event()

    def backup_tool() -> None:
        """Copies the directory on disk as a backup tool would (companions too), any time,
        under SQLite's SHARED lock on the database, as SQLite's own readers and `.backup` take
        it: a checkpoint writes the changed pages in place, under SQLite's EXCLUSIVE lock."""
        i = 0
        while not done.is_set():
            i += 1
            scratch = tmp_path / f"copy{i % 4}"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            with sqlite_shared_lock(layout.disk / "config.db"):
                for name in ["config.db", *("config.db" + s for s in copymode.DB_COMPANIONS)]:
                    with contextlib.suppress(FileNotFoundError):
                        shutil.copyfile(layout.disk / name, scratch / name)
            conn = sqlite3.connect(scratch / "config.db")
            try:
                verdict = "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
                rows = conn.execute("SELECT count(*) FROM log").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                verdict, rows = f"error: {exc}", -1
            finally:
                conn.close()
            copies.append((time.monotonic(), verdict, rows))

    results: list[copymode.CheckpointResult] = []
    tool = threading.Thread(target=backup_tool)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "started"
        tool.start()
        end = time.monotonic() + 10
        while time.monotonic() < end:
            tick = time.monotonic()
            results.append(layout.checkpoint())
            done.wait(max(0.0, tick + 1 - time.monotonic()))  # one checkpoint a second
        stop.touch()
        out, _ = writer.communicate(timeout=60)
        committed = int(out.strip())
    finally:
        done.set()
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        if tool.is_alive():
            tool.join()
    layout.unbind()
    layout.final_sync()

    assert committed > 1000, "the writer made real progress"
    assert len(copies) >= 50
    bad = [c for c in copies if c[1] != "ok"]
    assert bad == []
    assert len(results) >= 8 and all(r.databases == ["config.db"] for r in results)
    counts = [c[2] for c in copies]
    assert counts == sorted(counts), "a later copy never holds fewer commits"
    assert len(set(counts)) >= 5, "checkpoints kept landing while the writer ran"
    conn = sqlite3.connect(layout.disk / "config.db")
    try:
        assert conn.execute("SELECT count(*) FROM log").fetchone()[0] == committed
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    assert sorted(p.name for p in layout.disk.iterdir()) == ["config.db"]


STALE_WAL = r"""
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.execute("DELETE FROM tree WHERE inode >= 10")
conn.execute("INSERT INTO log(v) VALUES(randomblob(10))")
os.kill(os.getpid(), signal.SIGKILL)  # killed: the WAL keeps commits the database lacks
"""

HOT_JOURNAL = r"""
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size=2")  # spill changed pages into the file before commit
conn.execute("BEGIN")
conn.execute("UPDATE tree SET data = randomblob(3000), version = 99")
conn.execute("INSERT INTO tree(parent, version, name, data) SELECT 1, 99, name, data FROM tree")
os.kill(os.getpid(), signal.SIGKILL)  # killed mid-transaction: torn file + hot journal
"""


def crash_into(db: Path, script: str) -> None:
    proc = subprocess.run([sys.executable, "-c", script, str(db)], capture_output=True)
    assert proc.returncode == -9, proc.stderr


def open_copy(files: dict[str, Path], scratch: Path) -> tuple[str, int]:
    """(integrity verdict, rows in tree) of a database assembled from `files`."""
    scratch.mkdir()
    for name, src in files.items():
        shutil.copyfile(src, scratch / name)
    conn = sqlite3.connect(scratch / "config.db")
    try:
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        rows = conn.execute("SELECT count(*) FROM tree").fetchone()[0]
        return verdict, rows
    except sqlite3.DatabaseError as exc:
        return f"error: {exc}", -1
    finally:
        conn.close()


@pytest.mark.parametrize(("mode", "script", "old_rows", "companion"), [
    ("wal", STALE_WAL, 10, "-wal"),
    ("delete", HOT_JOURNAL, 300, "-journal"),
])  # fmt: skip
def test_stale_companions_on_disk_do_not_reach_the_checkpoint(
    layout: Layout, tmp_path: Path, mode: str, script: str, old_rows: int, companion: str
) -> None:
    db = layout.orig / "config.db"
    make_db(db, mode=mode)
    crash_into(db, script)  # the application died before the pin
    stale = tmp_path / ("stale" + companion)
    shutil.copyfile(str(db) + companion, stale)
    pre_pin = tmp_path / "pre-pin"
    pre_pin.mkdir()
    for p in layout.orig.iterdir():
        shutil.copyfile(p, pre_pin / p.name)

    layout.copy_in()
    layout.bind_over()
    conn = sqlite3.connect(db, isolation_level=None)  # the application starts again, in RAM
    assert conn.execute("SELECT count(*) FROM tree").fetchone()[0] == old_rows
    conn.execute("INSERT INTO tree(parent, version, name, data) "
                 "SELECT 2, 1, name, randomblob(500) FROM tree")  # fmt: skip
    conn.execute("INSERT INTO tree(parent, version, name, data) VALUES(3, 1, 'x', 'y')")
    conn.close()
    new_rows = 2 * old_rows + 1
    assert os.path.exists(str(layout.disk / "config.db") + companion)

    res = layout.checkpoint()
    assert res.databases == ["config.db"]
    assert sorted(p.name for p in layout.disk.iterdir()) == ["config.db"]
    on_disk = {"config.db": layout.disk / "config.db"}
    assert open_copy(on_disk, tmp_path / "after") == ("ok", new_rows)
    assert db_state(layout.disk / "config.db") == db_state(db)

    # Why the order matters: the same checkpoint next to the stale companion is rolled back or
    # corrupt, silently, as SQLite trusts what it finds next to the database.
    spoiled = open_copy({**on_disk, "config.db" + companion: stale}, tmp_path / "spoiled")
    assert spoiled != ("ok", new_rows)

    # A power cut after settling and before the rename leaves the old database whole: settling
    # keeps what the companion held.
    settled = tmp_path / "settled"
    shutil.copytree(pre_pin, settled)
    removed = copymode.settle_database(str(settled / "config.db"))
    assert str(settled / ("config.db" + companion)) in removed
    assert sorted(p.name for p in settled.iterdir()) == ["config.db"]
    assert open_copy({"config.db": settled / "config.db"}, tmp_path / "old") == ("ok", old_rows)


def test_databases_with_odd_names_are_excluded_exactly(layout: Layout) -> None:
    odd = layout.orig / "odd dir"
    odd.mkdir()
    make_db(odd / "we*i[r]d\\.db", mode="wal", rows=3)
    make_db(odd / "x?.db", rows=3)
    (odd / "we*i[r]d\\.dbx").write_text("plain\n")  # close to a database name, but plain
    (odd / "xa.db").write_text("not the ? database\n")
    (odd / ".x?.db.rampiped-tmp-0badf00d").write_bytes(b"left by a power cut")
    layout.copy_in()
    assert not (layout.data / "odd dir" / ".x?.db.rampiped-tmp-0badf00d").exists()
    conn = sqlite3.connect(layout.data / "odd dir" / "we*i[r]d\\.db", isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("INSERT INTO log(v) VALUES('in the wal only')")
    res = layout.checkpoint()
    conn.close()
    assert res.databases == ["odd dir/we*i[r]d\\.db", "odd dir/x?.db"]
    names = sorted(p.name for p in (layout.disk / "odd dir").iterdir())
    assert names == ["we*i[r]d\\.db", "we*i[r]d\\.dbx", "x?.db", "xa.db"]
    conn = sqlite3.connect(layout.disk / "odd dir" / "we*i[r]d\\.db")
    try:
        assert conn.execute("SELECT v FROM log").fetchall() == [("in the wal only",)]
    finally:
        conn.close()


# -- refusing unsafe sources ------------------------------------------------------------------


def test_verify_source_refuses_anything_but_the_filled_ram_copy(
    layout: Layout, runtime_tmpfs: Path
) -> None:
    populate(layout.orig)
    on_disk = manifest(layout.orig)

    def refused(ram: Path, match: str, pin_id: str = layout.id) -> None:
        with pytest.raises(copymode.UnsafeSource, match=re.escape(match)):
            copymode.verify_source(str(ram), pin_id)
        with pytest.raises(copymode.UnsafeSource, match=re.escape(match)):
            copymode.checkpoint(str(ram), str(layout.disk), pin_id=pin_id)

    # A fresh, empty RAM: no sentinel, nothing may be deleted on disk from it.
    layout.data.mkdir()
    refused(layout.ram, "never completed")
    # Not mounted: a directory on the runtime tmpfs with a (forged) sentinel and data.
    plain = runtime_tmpfs / "pins" / layout.id / "plain"
    (plain / "data").mkdir(parents=True)
    (plain / copymode.SENTINEL).write_text(f'{{"id": "{layout.id}", "path": "/x"}}')
    refused(plain, "not a mount point")
    # A tmpfs, but not this pin's.
    other = runtime_tmpfs / "pins" / layout.id / "other"
    mount_ram(other, "someone-else")
    shutil.copytree(plain, other, dirs_exist_ok=True)
    refused(other, "not the tmpfs 'rampiped-")
    # Not a tmpfs at all: a directory of the disk mounted where RAM should be.
    disky = runtime_tmpfs / "pins" / layout.id / "disky"
    disky.mkdir()
    (layout.loop.mountpoint / "elsewhere" / "data").mkdir(parents=True)
    shutil.copyfile(plain / copymode.SENTINEL, layout.loop.mountpoint / "elsewhere" / "s")
    os.rename(layout.loop.mountpoint / "elsewhere" / "s",
              layout.loop.mountpoint / "elsewhere" / copymode.SENTINEL)  # fmt: skip
    sh("mount", "--bind", str(layout.loop.mountpoint / "elsewhere"), str(disky))
    refused(disky, "(ext4), not the tmpfs")
    # The right tmpfs with another pin's sentinel, or without data.
    layout.copy_in()
    refused(layout.ram, "not the tmpfs 'rampiped-0000'", pin_id="0000")
    (layout.ram / copymode.SENTINEL).write_text('{"id": "0000"}')
    refused(layout.ram, "names {'id': '0000'}, not pin")
    layout.copy_in()
    shutil.rmtree(layout.data)
    refused(layout.ram, "not a directory")
    assert diff_manifests(manifest(layout.orig), on_disk) == []

    # And the disk side must be the pin's bind: an unmounted one is a plain runtime directory.
    layout.copy_in()
    sh("umount", str(layout.disk))
    with pytest.raises(copymode.UnsafeTarget, match="not a mount point"):
        layout.checkpoint()
    assert list(layout.disk.iterdir()) == []


def test_too_large_is_refused_with_the_sizes(tmp_path: Path) -> None:
    d = tmp_path / "big"
    d.mkdir()
    for i in range(3):
        (d / f"f{i}").write_bytes(b"\0" * MiB)
    os.link(d / "f0", d / "f0-again")  # one inode: counted once
    os.symlink("abc", d / "link")  # 3 bytes
    (d / "sparse").touch()
    os.truncate(d / "sparse", 0)
    assert copymode.dir_size(str(d)) == 3 * MiB + 3
    copymode.check_fits(str(d), None)
    copymode.check_fits(str(d), 3 * MiB + 3)
    with pytest.raises(copymode.TooLarge) as caught:
        copymode.check_fits(str(d), 2 * MiB)
    assert str(caught.value) == (
        f"{d} is 3.0 MiB, more than max_size 2.0 MiB: not pinned "
        "(raise max_size or clean the directory)"
    )
    with pytest.raises(copymode.TooLarge) as caught:
        copymode.check_fits(str(d), 3 * MiB)
    assert str(caught.value) == (
        f"{d} is 3.0 MiB (3145731 bytes), more than max_size 3.0 MiB (3145728 bytes): "
        "not pinned (raise max_size or clean the directory)"
    )


# -- power cut --------------------------------------------------------------------------------


def test_power_cut_leaves_the_last_checkpoint_whole(layout: Layout, tmp_path: Path) -> None:
    # Commit metadata only when asked: what is not synced explicitly is lost in the "cut".
    sh("mount", "-o", "remount,commit=600", str(layout.loop.mountpoint))
    populate(layout.orig)
    layout.copy_in()
    layout.bind_over()
    o = layout.orig
    for i in range(50):
        (o / f"written-{i}").write_bytes(os.urandom(20_000 + i))
    (o / "plain.txt").write_text("version at the checkpoint\n")
    (o / "secret").unlink()
    sql(o / "dbdir" / "config.db", "INSERT INTO log(v) VALUES('checkpointed')")
    layout.checkpoint()
    expected = comparable(manifest(layout.data), ["dbdir/config.db"])
    expected_db = db_state(layout.data / "dbdir" / "config.db")

    # after the checkpoint: more writes that only RAM holds
    (o / "plain.txt").write_text("after the checkpoint\n")
    (o / "late").write_text("late\n")
    (o / "written-3").unlink()
    sql(o / "dbdir" / "config.db", "INSERT INTO log(v) VALUES('lost')")

    # The cut: the device as it is now (what ext4 did not write out is not in the image),
    # and RAM is gone.
    image = tmp_path / "after-cut.img"
    sh("cp", "--sparse=always", str(layout.loop.image), str(image))
    layout.unbind()
    sh("umount", str(layout.ram))

    with make_loopfs_from(image, tmp_path / "rebooted") as rebooted:
        found = rebooted / "pve-cluster"
        assert diff_manifests(comparable(manifest(found), ["dbdir/config.db"]), expected) == []
        assert db_state(found / "dbdir" / "config.db") == expected_db


@contextlib.contextmanager
def make_loopfs_from(image: Path, mountpoint: Path) -> Iterator[Path]:
    """Mount an existing image (ext4 replays its journal, as at boot after a power cut)."""
    mountpoint.mkdir()
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        sh("mount", device, str(mountpoint))
        try:
            yield mountpoint
        finally:
            unmount_tree(mountpoint)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


# -- figures ----------------------------------------------------------------------------------


def timed(fn: Callable[[], object], times: int) -> float:
    """Median seconds of `times` runs."""
    spent = []
    for _ in range(times):
        t = time.monotonic()
        fn()
        spent.append(time.monotonic() - t)
    return sorted(spent)[len(spent) // 2]


def test_checkpoint_figures(layout: Layout) -> None:
    """Checkpoint times for a pmxcfs-like database and a 50 MB tree (printed; -s shows them).
    The bounds are loose: they catch a checkpoint that went quadratic, not a slow disk."""
    make_db(layout.orig / "config.db", mode="wal")
    size = (layout.orig / "config.db").stat().st_size
    layout.copy_in()
    db = layout.data / "config.db"

    def touch_db() -> None:
        sql(db, "UPDATE tree SET version = version + 1 WHERE inode = 7")

    def db_checkpoint() -> None:
        touch_db()
        layout.checkpoint()

    t_db = timed(db_checkpoint, 7)

    tree = layout.data / "tree"
    for d in range(10):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(50):
            (tree / f"d{d}" / f"f{f}").write_bytes(os.urandom(100_000))
    t0 = time.monotonic()
    layout.checkpoint()
    t_full = time.monotonic() - t0
    t_same = timed(layout.checkpoint, 3)

    def ten_changed() -> None:
        for f in range(10):
            (tree / "d3" / f"f{f}").write_bytes(os.urandom(100_000))
        layout.checkpoint()

    t_ten = timed(ten_changed, 3)
    print(
        f"\ncheckpoint figures: database {size / MiB:.2f} MiB, 300 rows: {t_db * 1000:.0f} ms; "
        f"50 MB tree (500 files): first {t_full:.2f} s, unchanged {t_same * 1000:.0f} ms, "
        f"10 files changed {t_ten * 1000:.0f} ms"
    )
    assert 0.9 * MiB < size < 1.5 * MiB
    assert t_db < 2 and t_full < 60 and t_same < 5 and t_ten < 10
