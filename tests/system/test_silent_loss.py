"""Changes that a write-back keyed on size and mtime misses (DESIGN.md §4, "Whether a file
changed is never decided by size and mtime alone"), through the real daemon, in copy and in
overlay mode.

Each test pins a directory on the loop ext4, changes a file so that its size and mtime stay
what they were at the last checkpoint (cp -p, touch -d back-dating, a same-second rewrite,
a hard link to a look-alike, stores through a shared mapping), and stops the daemon cleanly.
The oracle is what the pinned path showed just before the stop: the disk must hold exactly
those bytes (and hard links) afterwards, read once through the path and once more after the
loop filesystem was unmounted and mounted again (nothing left in the page cache).

In copy mode the disk side is also looked at right after a checkpoint, through a bind of the
directory made before the pin; an overlay checkpoint goes to the journal, so there only the
end counts."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.system import helpers, safety
from tests.system.daemon_harness import Daemon, Env, make_env, running
from tests.system.helpers import wait_for
from tests.system.test_static_pins import assert_pinned_copy, disk_view

MODES = ["copy", "overlay"]

pytestmark = [pytest.mark.system, pytest.mark.parametrize("mode", MODES)]

# How the pin ends: a stop right after the change, or a checkpoint of the change and then the
# stop (the checkpoint's own result is checked in copy mode).
ENDINGS = ["stop", "sync-stop"]

OLD = b"setting = old\n"
NEW = b"setting = NEW\n"
PAGE = 4096


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as e:
        e.write_config(adaptive={"enabled": False})
        yield e


# -- what a tree holds --------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """The regular files below a directory (relative path -> bytes) and its hard-link groups
    (names sharing an inode, two or more)."""

    files: dict[str, bytes]
    links: list[list[str]]


def view(root: Path) -> View:
    files: dict[str, bytes] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                continue
            rel = os.path.relpath(full, root)
            with open(full, "rb") as f:
                files[rel] = f.read()
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return View(files, sorted(sorted(g) for g in inodes.values() if len(g) > 1))


def short(data: bytes | None) -> str:
    if data is None:
        return "missing"
    if len(data) <= 40:
        return repr(data)
    return f"{data[:16]!r}... ({len(data)} bytes)"


def differences(expected: View, found: View, when: str) -> list[str]:
    out = []
    for rel in sorted(expected.files.keys() | found.files.keys()):
        want, have = expected.files.get(rel), found.files.get(rel)
        if want != have:
            out.append(f"{when}: {rel}: pinned view had {short(want)}, disk has {short(have)}")
    if expected.links != found.links:
        out.append(f"{when}: hard links: pinned view had {expected.links}, disk has {found.links}")
    return out


def lost(expected: View, found: View) -> int:
    return sum(found.files.get(rel) != data for rel, data in expected.files.items())


# -- the pin, its checkpoints and its end -------------------------------------------------------


@contextlib.contextmanager
def disk_side(env: Env, path: Path, mode: str) -> Iterator[Path | None]:
    """Copy mode: a bind of the directory on disk, made before the pin (where checkpoints
    land). Overlay mode: None (checkpoints go to the journal)."""
    if mode != "copy":
        yield None
        return
    with disk_view(env, path) as disk:
        yield disk


@contextlib.contextmanager
def pinned(env: Env, path: Path, mode: str) -> Iterator[Daemon]:
    """The daemon with `path` as its one static pin in `mode`, pinned."""
    env.write_config(adaptive={"enabled": False}, pins=[{"path": str(path), "mode": mode}])
    with running(env) as daemon:

        def made() -> bool:
            pins = [p for p in env.status()["pins"] if p["path"] == str(path)]
            return bool(pins) and pins[0]["state"] == "pinned"

        wait_for(made, 30, f"the {mode} pin of {path}")
        if mode == "copy":
            assert_pinned_copy(path)
        else:
            assert env.overlay_at(path), f"no overlay at {path}"
        yield daemon


def checkpoint(env: Env, path: Path, disk: Path | None, problems: list[str]) -> None:
    """`rampipectl sync`; in copy mode the disk side must then hold what the pin shows."""
    assert env.ctl("sync", check=True).returncode == 0
    if disk is not None:
        problems += differences(view(path), view(disk), "at the checkpoint")


def stop(daemon: Daemon, path: Path) -> View:
    """The pinned view just before a clean stop (SIGTERM), then the stop."""
    expected = view(path)
    code = daemon.stop()
    assert code == 0, f"the daemon exited {code}:\n{daemon.log_text()}"
    daemon.wait_log(rf"unpinned {re.escape(str(path))}: stopping; wrote")
    return expected


def remount(env: Env) -> None:
    """The loop filesystem unmounted and mounted again: what it holds is read from the device."""
    helpers.remount(env.disk)


def check_disk(env: Env, path: Path, expected: View, problems: list[str]) -> None:
    """After the stop (every bind of the loop filesystem gone): the disk holds `expected`,
    through the path and after a remount. Asserts with every problem seen in the test."""
    assert env.mounted_at(path) is None, f"{path} is still mounted after the stop"
    problems += differences(expected, view(path), "after the stop")
    remount(env)
    found = view(path)
    safety.count("stamp-blind changes")
    safety.count("files lost", lost(expected, found))
    problems += differences(expected, found, "after the stop and a remount")
    assert not problems, "\n".join(problems)


def set_times(path: Path, date: str) -> None:
    subprocess.run(["touch", "-d", date, str(path)], check=True)


# -- 1. cp -p: new content, same size, the old mtime --------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("made", ["before-pin", "in-ram"])
def test_cp_p_rewrite_keeping_size_and_mtime(env: Env, mode: str, made: str, ending: str) -> None:
    d = env.disk.mountpoint / "svc"
    d.mkdir()

    def make_files() -> None:
        (d / "a.conf").write_bytes(OLD)
        (d / "b.conf").write_bytes(NEW)
        subprocess.run(["touch", "-d", "2024-01-01", "a.conf", "b.conf"], cwd=d, check=True)

    if made == "before-pin":
        make_files()
    problems: list[str] = []
    with disk_side(env, d, mode) as disk, pinned(env, d, mode) as daemon:
        if made == "in-ram":
            make_files()
        checkpoint(env, d, disk, problems)
        subprocess.run(["cp", "-p", "b.conf", "a.conf"], cwd=d, check=True)
        assert (d / "a.conf").read_bytes() == NEW
        if ending == "sync-stop":
            checkpoint(env, d, disk, problems)
        expected = stop(daemon, d)
    assert expected.files["a.conf"] == NEW
    check_disk(env, d, expected, problems)


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("tool", ["tar", "rsync"])
def test_replaced_by_tar_or_rsync_keeping_size_and_mtime(
    env: Env, mode: str, tool: str, ending: str
) -> None:
    """tar -xp and rsync -a put a new file at the name (an unlink and a create, or a rename
    over it) with the old size and mtime. In an overlay the new file lacks the copied-up one's
    trusted.overlay.origin, so rsync's --link-dest copied the last generation's stale file
    instead of linking it."""
    d = env.disk.mountpoint / "svc"
    d.mkdir()
    src = env.tmp / "src"
    src.mkdir()
    (d / "a.conf").write_bytes(OLD)
    (src / "a.conf").write_bytes(NEW)
    subprocess.run(
        ["touch", "-d", "2024-01-01", str(d / "a.conf"), str(src / "a.conf")], check=True
    )
    subprocess.run(["tar", "-C", str(src), "-cf", str(env.tmp / "a.tar"), "a.conf"], check=True)
    problems: list[str] = []
    with disk_side(env, d, mode) as disk, pinned(env, d, mode) as daemon:
        (d / "a.conf").write_bytes(OLD)  # in RAM (an overlay copies it up), same stamps
        subprocess.run(["touch", "-d", "2024-01-01", "a.conf"], cwd=d, check=True)
        checkpoint(env, d, disk, problems)
        if tool == "tar":
            subprocess.run(["tar", "-C", str(d), "-xpf", str(env.tmp / "a.tar")], check=True)
        else:
            subprocess.run(["rsync", "-a", "-c", str(src / "a.conf"), str(d)], check=True)
        assert (d / "a.conf").read_bytes() == NEW
        if ending == "sync-stop":
            checkpoint(env, d, disk, problems)
        expected = stop(daemon, d)
    assert expected.files["a.conf"] == NEW
    check_disk(env, d, expected, problems)


# -- 2. touch -d back to the former mtime -------------------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS)
def test_rewrite_then_touch_back_to_the_former_mtime(env: Env, mode: str, ending: str) -> None:
    d = env.disk.mountpoint / "svc"
    d.mkdir()
    problems: list[str] = []
    with disk_side(env, d, mode) as disk, pinned(env, d, mode) as daemon:
        f = d / "state"
        f.write_bytes(b"version 1\n")
        set_times(f, "2024-01-01 12:00:00.123456789")
        checkpoint(env, d, disk, problems)
        former = f.stat().st_mtime_ns
        f.write_bytes(b"version 2\n")
        set_times(f, f"@{former // 10**9}.{former % 10**9:09d}")
        assert f.stat().st_mtime_ns == former
        if ending == "sync-stop":
            checkpoint(env, d, disk, problems)
        expected = stop(daemon, d)
    assert expected.files["state"] == b"version 2\n"
    check_disk(env, d, expected, problems)


# -- 3. a same-size rewrite within the same timestamp -------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS)
def test_same_size_rewrite_with_the_same_mtime(env: Env, mode: str, ending: str) -> None:
    d = env.disk.mountpoint / "svc"
    d.mkdir()
    problems: list[str] = []
    with disk_side(env, d, mode) as disk, pinned(env, d, mode) as daemon:
        f = d / "counter"
        f.write_bytes(b"AAAAAAAA\n")
        checkpoint(env, d, disk, problems)
        st = f.stat()
        f.write_bytes(b"BBBBBBBB\n")  # as on a filesystem whose clock ticks coarsely
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        if ending == "sync-stop":
            checkpoint(env, d, disk, problems)
        expected = stop(daemon, d)
    assert expected.files["counter"] == b"BBBBBBBB\n"
    check_disk(env, d, expected, problems)


# -- 4. a file replaced by a hard link to a look-alike ------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS)
def test_replaced_by_a_hard_link_of_the_same_size_and_mtime(
    env: Env, mode: str, ending: str
) -> None:
    d = env.disk.mountpoint / "svc"
    d.mkdir()
    problems: list[str] = []
    with disk_side(env, d, mode) as disk, pinned(env, d, mode) as daemon:
        (d / "a.conf").write_bytes(OLD)
        (d / "b.conf").write_bytes(NEW)
        subprocess.run(["touch", "-d", "2024-01-01", "a.conf", "b.conf"], cwd=d, check=True)
        checkpoint(env, d, disk, problems)
        subprocess.run(["ln", "-f", "b.conf", "a.conf"], cwd=d, check=True)
        if ending == "sync-stop":
            checkpoint(env, d, disk, problems)
        expected = stop(daemon, d)
    assert expected.files["a.conf"] == NEW
    assert expected.links == [["a.conf", "b.conf"]]
    check_disk(env, d, expected, problems)


# -- 5, 6. stores through a shared mapping ------------------------------------------------------

# A separate process that maps a file MAP_SHARED and then obeys one command a line on stdin:
# `read` (the first 8 bytes: a read fault), `write TEXT` (8 bytes at offset 0, then msync when
# started with "msync"), `exit` (munmap, then exit). It answers every command with one line.
MAPPER = r"""
import mmap, os, sys
path, flush = sys.argv[1], sys.argv[2] == "msync"
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)
print("mapped", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.rstrip("\n").partition(" ")
    if cmd == "read":
        print(m[:8].decode(), flush=True)
    elif cmd == "write":
        m[0:8] = arg.encode()
        if flush:
            m.flush()
        print("written", flush=True)
    elif cmd == "exit":
        m.close()
        print("unmapped", flush=True)
        break
"""


class Mapper:
    def __init__(self, path: Path, msync: bool) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MAPPER, str(path), "msync" if msync else "plain"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._reply() == "mapped"

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def exit(self) -> None:
        assert self.ask("exit") == "unmapped"
        assert self.proc.wait(10) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def mapping(path: Path, msync: bool) -> Iterator[Mapper]:
    m = Mapper(path, msync)
    try:
        yield m
    finally:
        m.kill()


MSYNC = [pytest.param(True, id="msync"), pytest.param(False, id="no-msync")]


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("msync", MSYNC)
def test_store_through_a_mapping_after_a_checkpoint(
    env: Env, mode: str, msync: bool, ending: str
) -> None:
    """Mapped and first written before a checkpoint; written again (no new write fault, so no
    new mtime on tmpfs) after it, then the process exits."""
    d = env.disk.mountpoint / "svc"
    d.mkdir()
    problems: list[str] = []
    with disk_side(env, d, mode) as disk, pinned(env, d, mode) as daemon:
        f = d / "mapped.bin"
        f.write_bytes(b"." * PAGE)
        with mapping(f, msync) as mapper:
            assert mapper.ask("write AAAAAAAA") == "written"
            checkpoint(env, d, disk, problems)
            assert mapper.ask("write BBBBBBBB") == "written"
            mapper.exit()
        assert f.read_bytes()[:8] == b"BBBBBBBB"
        if ending == "sync-stop":
            checkpoint(env, d, disk, problems)
        expected = stop(daemon, d)
    assert expected.files["mapped.bin"] == b"BBBBBBBB" + b"." * (PAGE - 8)
    check_disk(env, d, expected, problems)


@pytest.mark.parametrize("msync", MSYNC)
def test_mapping_made_and_gone_between_two_checkpoints(env: Env, mode: str, msync: bool) -> None:
    """Mapped after a checkpoint, the page read first (a read fault maps it writable on
    tmpfs: the store then changes neither mtime nor ctime), written, unmapped and the process
    gone before the next checkpoint."""
    d = env.disk.mountpoint / "svc"
    d.mkdir()
    problems: list[str] = []
    with disk_side(env, d, mode) as disk, pinned(env, d, mode) as daemon:
        f = d / "mapped.bin"
        f.write_bytes(b"." * PAGE)
        checkpoint(env, d, disk, problems)
        with mapping(f, msync) as mapper:
            assert mapper.ask("read") == "." * 8
            assert mapper.ask("write BBBBBBBB") == "written"
            mapper.exit()
        assert f.read_bytes()[:8] == b"BBBBBBBB"
        checkpoint(env, d, disk, problems)
        expected = stop(daemon, d)
    assert expected.files["mapped.bin"] == b"BBBBBBBB" + b"." * (PAGE - 8)
    check_disk(env, d, expected, problems)
