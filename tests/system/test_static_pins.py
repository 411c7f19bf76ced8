"""Static pins end to end: the real daemon pins the directories of `pins:` in copy mode before
it says it started, checkpoints them, writes them back at stop, refuses a directory larger
than its max_size, survives a power cut with the last checkpoint on disk, and never lets them
go by cooling or eviction. The loop ext4 stands for the disk; `pve` for /var/lib/pve-cluster.

The disk side of a pinned directory is seen through a second bind of the directory made
before the daemon starts (its own path shows the RAM copy once pinned)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rampiped import pins as pinsmod
from tests.system.changes import CHANGES, write
from tests.system.changes import populate as populate_changes
from tests.system.daemon_harness import Daemon, Env, Writer, make_env, running
from tests.system.helpers import (
    diff_manifests,
    drop_caches,
    manifest,
    mountinfo,
    sqlite_shared_lock,
    wait_for,
)
from tests.system.test_adaptive import power_cut
from tests.system.test_copymode import (
    DB_WRITER,
    LineWriter,
    comparable,
    db_state,
    lines_in,
    make_db,
    sql,
)

pytestmark = pytest.mark.system

MiB = 1024 * 1024
DB = "db/config.db"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as e:
        yield e


@contextlib.contextmanager
def disk_view(env: Env, path: Path) -> Iterator[Path]:
    """A bind of the directory on disk, made before the pin covers `path`."""
    view = env.tmp / ("disk-view-" + path.name)
    view.mkdir()
    subprocess.run(["mount", "--bind", str(path), str(view)], check=True)
    try:
        yield view
    finally:
        subprocess.run(["umount", str(view)], capture_output=True)


def static_pin(path: Path, **extra: Any) -> dict[str, Any]:
    return {"path": str(path), "mode": "copy", "before": ["pve-cluster.service"], **extra}


def bind_at(path: Path) -> dict[str, str] | None:
    """The topmost mount at `path`."""
    found = None
    for m in mountinfo():
        if m["mountpoint"] == str(path):
            found = m
    return found


def assert_pinned_copy(path: Path) -> None:
    top = bind_at(path)
    assert top is not None, f"nothing mounted at {path}"
    assert top["source"] == pinsmod.SOURCE_PREFIX + pinsmod.pin_id(str(path)), top
    assert top["fstype"] == "tmpfs" and top["root"] == "/data", top


def line_index(daemon: Daemon, pattern: str) -> int:
    rx = re.compile(pattern)
    for i, line in enumerate(daemon.lines):
        if rx.search(line):
            return i
    raise AssertionError(f"no log line {pattern!r}:\n{daemon.log_text()}")


def the_pin(env: Env, path: Path) -> dict[str, Any]:
    found = [p for p in env.status()["pins"] if p["path"] == str(path)]
    assert len(found) == 1, env.status()["pins"]
    return found[0]


# -- lifecycle ----------------------------------------------------------------------------------


def test_copy_pin_lifecycle_through_the_daemon(env: Env) -> None:
    pve = env.disk.mountpoint / "pve"
    pve.mkdir()
    outside = env.tmp / "outside"
    write(outside / "victim", "must survive")
    populate_changes(pve, outside)
    (pve / "db").mkdir()
    make_db(pve / DB, mode="wal")
    env.write_config(pins=[static_pin(pve, sync_interval="1h")])
    with disk_view(env, pve) as disk, running(env) as daemon:
        # pinned before the daemon says it started (before READY: pve-cluster starts after)
        pinned = line_index(daemon, rf"pinned {re.escape(str(pve))}: static pin \(copy\)$")
        assert pinned < line_index(daemon, r"rampiped \S+ started: .*; 1 pinned$")
        assert_pinned_copy(pve)
        st = the_pin(env, pve)
        assert (st["mode"], st["state"], st["static"], st["origin"]) == (
            "copy",
            "pinned",
            True,
            "static",
        )
        text = env.ctl("status", check=True).stdout
        assert re.search(rf"^{re.escape(str(pve))}\s+copy\s+pinned\s.*\(static\)$", text, re.M)

        for name, change in CHANGES.items():
            if name != "content":  # see test_same_size_rewrite_keeping_mtime_is_written
                change(pve)
        sql(pve / DB, "UPDATE tree SET version = version + 1, data = randomblob(10)")
        sql(pve / DB, "INSERT INTO log(v) VALUES('through the pin')")
        assert "through the pin" not in (disk / DB).read_bytes().decode("latin-1")
        assert env.ctl("sync", check=True).returncode == 0
        expected = comparable(manifest(pve, dir_times=True), [DB])
        assert diff_manifests(comparable(manifest(disk, dir_times=True), [DB]), expected) == []
        assert db_state(disk / DB) == db_state(pve / DB)

        (pve / "after-sync").write_text("only in RAM until the stop\n")
        (pve / "keep" / "sub" / "deep.txt").unlink()
        sql(pve / DB, "DELETE FROM tree WHERE inode < 100")
        # Directory times are left out from here on: reading a WAL database through SQLite (as
        # every checkpoint does) creates and removes its -wal/-shm, which touches its directory.
        expected = comparable(manifest(pve), [DB])
        expected_db = db_state(pve / DB)
        assert daemon.stop() == 0
        m = daemon.wait_log(rf"unpinned {re.escape(str(pve))}: stopping; wrote (\d+) files")
        assert int(m.group(1)) >= 2  # after-sync and the database, written back at the stop
        assert not [m for m in mountinfo() if m["mountpoint"] == str(pve)]
        drop_caches()
        assert diff_manifests(comparable(manifest(pve), [DB]), expected) == []
        assert db_state(pve / DB) == expected_db
        assert not list((pve / "db").glob("config.db-*")), "no database companion on disk"
    assert (outside / "victim").read_text() == "must survive"


def test_max_size_refuses_with_the_sizes_and_the_daemon_keeps_running(env: Env) -> None:
    pve = env.disk.mountpoint / "pve"
    pve.mkdir()
    (pve / "big").write_bytes(os.urandom(3 * MiB))
    small = env.disk.mountpoint / "small"
    small.mkdir()
    (small / "f").write_text("fits\n")
    env.write_config(pins=[static_pin(pve, max_size="1M"), static_pin(small, max_size="1M")])
    with running(env) as daemon:
        line = daemon.lines[line_index(daemon, rf"static pin {re.escape(str(pve))} not made")]
        assert line == (
            f"error: static pin {pve} not made, the directory stays on disk (trying again in"
            f" 5s): {pve} is 3.0 MiB, more than max_size 1.0 MiB: not pinned (raise max_size or"
            " clean the directory)"
        )
        assert line_index(daemon, "not made") < line_index(daemon, r"rampiped \S+ started")
        assert not [m for m in mountinfo() if m["mountpoint"] == str(pve)]
        assert not [m for m in mountinfo() if pinsmod.pin_id(str(pve)) in m["source"]]
        assert_pinned_copy(small)  # the other pin is made
        assert [p["path"] for p in env.status()["pins"]] == [str(small)]
        (pve / "still-on-disk").write_text("the directory works as before\n")
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0
    assert (pve / "still-on-disk").read_text() == "the directory works as before\n"


# -- SQLite under load --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_sqlite_under_load_with_checkpoints_every_second(env: Env, mode: str) -> None:
    pve = env.disk.mountpoint / "pve"
    pve.mkdir()
    make_db(pve / "config.db", mode=mode)
    env.write_config(pins=[static_pin(pve, sync_interval="1s")])
    stop = env.tmp / "stop-writer"
    copies: list[tuple[str, int]] = []
    with disk_view(env, pve) as disk, running(env) as daemon:
        assert_pinned_copy(pve)
        writer = subprocess.Popen(
            [sys.executable, "-c", DB_WRITER, str(pve / "config.db"), mode, str(stop)],
            stdout=subprocess.PIPE,
            text=True,
        )
        done = threading.Event()

        def backup_tool() -> None:
            """Copies the database on disk (companions too) as a backup tool would, any time,
            under SQLite's SHARED lock (checkpoints write pages in place under its EXCLUSIVE
            lock)."""
            i = 0
            while not done.is_set():
                i += 1
                scratch = env.tmp / f"copy{i % 4}"
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir()
                with sqlite_shared_lock(disk / "config.db"):
                    for name in [
                        "config.db",
                        "config.db-wal",
                        "config.db-shm",
                        "config.db-journal",
                    ]:
                        with contextlib.suppress(FileNotFoundError):
                            shutil.copyfile(disk / name, scratch / name)
                conn = sqlite3.connect(scratch / "config.db")
                try:
                    verdict = "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
                    rows = conn.execute("SELECT count(*) FROM log").fetchone()[0]
                except sqlite3.DatabaseError as exc:
                    verdict, rows = f"error: {exc}", -1
                finally:
                    conn.close()
                copies.append((verdict, rows))

        tool = threading.Thread(target=backup_tool)
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline().strip() == "started"
            tool.start()
            # ten periodic checkpoints while the writer commits as fast as it can
            wait_for(
                lambda: (
                    sum("checkpoint of" in ln and "periodic" in ln for ln in daemon.lines) >= 10
                ),
                60,
                "ten periodic checkpoints",
            )
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
        assert not [ln for ln in daemon.lines if "checkpoint of" in ln and "failed" in ln]
        checkpoints = sum("checkpoint of" in ln and "periodic" in ln for ln in daemon.lines)
        assert daemon.stop() == 0
    counts = [c[1] for c in copies]
    print(
        f"\nSQLite {mode}: {committed} transactions committed, {checkpoints} periodic checkpoints,"
        f" {len(copies)} copies of the disk side checked, {len(set(counts))} distinct row counts"
    )
    assert committed > 500, "the writer made real progress"
    assert len(copies) >= 20
    assert [c for c in copies if c[0] != "ok"] == []
    assert counts == sorted(counts), "a later copy never holds fewer commits"
    assert len(set(counts)) >= 5, "checkpoints kept landing while the writer ran"
    conn = sqlite3.connect(pve / "config.db")
    try:
        assert conn.execute("SELECT count(*) FROM log").fetchone()[0] == committed
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    assert sorted(p.name for p in pve.iterdir()) == ["config.db"]


# -- power cut ----------------------------------------------------------------------------------


def test_power_cut_leaves_the_last_checkpoint_and_the_next_start_says_so(env: Env) -> None:
    pve = env.disk.mountpoint / "pve"
    pve.mkdir()
    (pve / "db").mkdir()
    make_db(pve / DB, mode="wal")
    for i in range(20):
        (pve / f"file{i}").write_bytes(os.urandom(10_000 + i))
    env.write_config(pins=[static_pin(pve, sync_interval="1h")])
    with disk_view(env, pve) as disk:
        with running(env) as daemon:
            assert_pinned_copy(pve)
            for i in range(0, 20, 2):
                (pve / f"file{i}").write_bytes(os.urandom(20_000 + i))
            (pve / "file1").unlink()
            (pve / "new").write_text("at the checkpoint\n")
            sql(pve / DB, "INSERT INTO log(v) VALUES('checkpointed')")
            assert env.ctl("sync", check=True).returncode == 0
            expected = comparable(manifest(pve), [DB])
            expected_db = db_state(pve / DB)
            # after the checkpoint: only RAM holds these
            (pve / "new").write_text("after the checkpoint\n")
            (pve / "late").write_text("late\n")
            (pve / "file3").unlink()
            sql(pve / DB, "INSERT INTO log(v) VALUES('lost')")
            daemon.kill()
        power_cut(env, pve)
        assert not [m for m in mountinfo() if m["mountpoint"] == str(pve)]
        drop_caches()
        assert diff_manifests(comparable(manifest(disk), [DB]), expected) == []
        assert db_state(disk / DB) == expected_db
        with running(env) as daemon:
            line = daemon.wait_log(
                rf"{re.escape(str(pve))}: RAM copy lost \(power cut or reboot\); the disk holds"
                " the last checkpoint"
            )
            assert line
            assert line_index(daemon, "RAM copy lost") < line_index(daemon, r"rampiped \S+ started")
            assert_pinned_copy(pve)  # and pinned again, from the checkpoint
            assert (pve / "new").read_text() == "at the checkpoint\n"
            assert daemon.stop() == 0
    assert diff_manifests(comparable(manifest(pve), [DB]), expected) == []


# -- never let go ---------------------------------------------------------------------------------


def test_static_pin_is_never_unpinned_by_cooling_or_evicted(env: Env) -> None:
    pve = env.disk.mountpoint / "pve"
    pve.mkdir()
    (pve / "f").write_text("cold\n")
    hot = env.data / "hot"
    hot.mkdir()
    # RAM budget 8 MiB, high watermark 50%: 3 MiB in the static pin puts pins above it
    env.write_config(
        pins=[static_pin(pve, sync_interval="1s")],
        ram={"max": "8M", "high_watermark": "50%"},
    )
    with running(env) as daemon:
        assert_pinned_copy(pve)
        writer = Writer(hot, rate=300)
        try:
            daemon.wait_log(rf"pinned {re.escape(str(hot))}: .* \(overlay\)")
        finally:
            writer.stop()
        # Pressure while the adaptive pin is still warm (it cools below 5/s only after some
        # seconds): the engine evicts it, the colder static pin stays.
        (pve / "big").write_bytes(os.urandom(5 * MiB))
        daemon.wait_log(rf"unpinned {re.escape(str(hot))}: evicted: RAM used by pins .* above")
        # cool_for is 2 s: wait for five more periodic checkpoints of the cold static pin
        seen = sum(f"checkpoint of {pve} (periodic" in ln for ln in daemon.lines)
        wait_for(
            lambda: sum(f"checkpoint of {pve} (periodic" in ln for ln in daemon.lines) >= seen + 5,
            60,
            "five more checkpoints",
        )
        assert the_pin(env, pve)["rate"] < 5
        assert not [ln for ln in daemon.lines if f"unpinned {pve}" in ln]
        assert_pinned_copy(pve)
        assert daemon.stop() == 0
    assert (pve / "big").stat().st_size == 5 * MiB


# -- a writer racing the pin --------------------------------------------------------------------


def harness_lines(root: Path) -> list[int]:
    """The line numbers the daemon harness's Writer wrote into `root` ("line N" per line)."""
    found: list[int] = []
    for path in root.glob("f*.log"):
        found += [int(line.split()[1]) for line in path.read_text().splitlines()]
    return sorted(found)


def test_writer_racing_the_pin_at_start_loses_nothing(env: Env) -> None:
    """A writer that never stops while the daemon starts: the pin is refused (it holds a file,
    or the copy never sees the directory hold still) and the directory stays on disk; once the
    writer stops, the retry pins it; a second writer writes into RAM; everything is on disk
    after the stop."""
    pve = env.disk.mountpoint / "pve"
    pve.mkdir()
    (pve / "filler").write_bytes(os.urandom(20 * MiB))  # a copy pass takes a while
    env.write_config(pins=[static_pin(pve)])
    writer = LineWriter(pve, env.tmp / "stop-1")
    try:
        daemon = Daemon(env)
        try:
            daemon.wait_ready()
            assert bind_at(pve) is None
            daemon.wait_log(rf"error: static pin {re.escape(str(pve))} not made")
            first = writer.finish()
            # retried (5 s after the refusal) and made once the writer has stopped
            wait_for(lambda: bind_at(pve) is not None, 60, "the pin")
            assert_pinned_copy(pve)
            daemon.wait_log(rf"pinned {re.escape(str(pve))}: static pin \(copy\)$")
            second_writer = LineWriter(pve, env.tmp / "stop-2")  # now writes into RAM
            try:
                second = second_writer.finish()
            finally:
                second_writer.kill()
            assert daemon.stop() == 0
        finally:
            daemon.kill()
    finally:
        writer.kill()
    assert not [m for m in mountinfo() if m["mountpoint"] == str(pve)]
    assert lines_in(pve) == sorted([*range(first), *range(second)])


def test_paced_writer_across_the_pin_loses_nothing(env: Env) -> None:
    """A writer at 20 lines/s, each line an open, append and close by path, keeps writing
    while the daemon starts, pins (possibly after refusals and retries) and runs: every line
    written before the bind is on disk and copied, every line after it lands in RAM."""
    pve = env.disk.mountpoint / "pve"
    pve.mkdir()
    (pve / "old").write_text("before the start\n")
    env.write_config(pins=[static_pin(pve)])
    writer = Writer(pve, rate=20)
    try:
        with running(env) as daemon:
            wait_for(lambda: bind_at(pve) is not None, 90, "the pin")
            assert_pinned_copy(pve)
            pinned_at = len(harness_lines(pve))
            wait_for(lambda: len(harness_lines(pve)) > pinned_at + 20, 30, "writes into RAM")
            written = writer.stop()
            assert daemon.stop() == 0
            tries = [ln for ln in daemon.lines if f"{pve} not made" in ln or f"pinned {pve}" in ln]
    finally:
        writer.kill()
    assert not [m for m in mountinfo() if m["mountpoint"] == str(pve)]
    assert harness_lines(pve) == list(range(written))
    assert (pve / "old").read_text() == "before the start\n"
    print(f"\npaced writer, {written} lines; the pin: " + " | ".join(tries))


def test_same_size_rewrite_keeping_mtime_is_written(env: Env) -> None:
    pve = env.disk.mountpoint / "pve"
    (pve / "content").mkdir(parents=True)
    (pve / "content" / "overwrite").write_text("same size A")
    env.write_config(pins=[static_pin(pve)])
    with disk_view(env, pve) as disk, running(env) as daemon:
        assert_pinned_copy(pve)
        CHANGES["content"](pve)  # same size, then the old mtime put back
        assert env.ctl("sync", check=True).returncode == 0
        at_checkpoint = (disk / "content" / "overwrite").read_text()
        assert daemon.stop() == 0
    assert (pve / "content" / "overwrite").read_text() == "same size B"
    assert at_checkpoint == "same size B"


def test_checkpoints_write_only_what_changed(env: Env) -> None:
    pve = env.disk.mountpoint / "pve"
    pve.mkdir()
    for i in range(50):
        (pve / f"file{i}").write_bytes(bytes([i]) * 20000)
    env.write_config(pins=[static_pin(pve)])
    with running(env) as daemon:
        assert_pinned_copy(pve)
        for _ in range(2):  # nothing changed since the copy: nothing to write
            assert env.ctl("sync", check=True).returncode == 0
            assert env.status()["pins"][0]["last_sync"]["files"] == 0
        (pve / "file7").write_bytes(b"changed")
        assert env.ctl("sync", check=True).returncode == 0
        assert env.status()["pins"][0]["last_sync"]["files"] == 1
        assert daemon.stop() == 0
    assert (pve / "file7").read_bytes() == b"changed"
