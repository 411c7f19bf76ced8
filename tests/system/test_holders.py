"""rampiped.holders against real processes: open files, working directories, mappings, other
mount namespaces, and namespaces that still show a pin."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from rampiped import holders, mounts
from rampiped.holders import Holder
from tests.system.helpers import LoopFs, mount_points, unmount_tree

pytestmark = pytest.mark.system

MiB = 1024 * 1024

HOLD_FD = "import sys; f = open(sys.argv[1], 'a'); print('ready', flush=True); sys.stdin.read()"
HOLD_CWD = "import os, sys; os.chdir(sys.argv[1]); print('ready', flush=True); sys.stdin.read()"
# Python's mmap module keeps a duplicate of the fd; map through libc so only the mapping holds.
HOLD_MMAP = (
    "import ctypes, os, sys; libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p;"
    " libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,"
    " ctypes.c_int, ctypes.c_long]; fd = os.open(sys.argv[1], os.O_RDONLY);"
    " assert libc.mmap(None, 4096, 1, 1, fd, 0) not in (None, ctypes.c_void_p(-1).value);"
    " os.close(fd); print('ready', flush=True); sys.stdin.read()"
)
IDLE = "import sys; print('ready', flush=True); sys.stdin.read()"
# A process in a mount namespace of its own, where it sees nothing that happens here later.
PRIVATE_NS = ["unshare", "-m", "--propagation", "private"]


@contextlib.contextmanager
def running(*argvs: Sequence[str]) -> Iterator[list[subprocess.Popen[str]]]:
    """Start processes that print "ready" once they hold what they should; kill them after."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for argv in argvs:
            procs.append(
                subprocess.Popen(
                    list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
                )
            )
        for proc in procs:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, f"{proc.args} did not get ready within 30s"
            line = proc.stdout.readline()
            assert line == "ready\n", f"{proc.args} failed (exit {proc.poll()})"
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def py(code: str, *args: Path | str) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def of(found: list[Holder], pid: int) -> list[str]:
    return [h.what for h in found if h.pid == pid]


@pytest.fixture
def tree(loopfs: LoopFs) -> Iterator[Path]:
    """base/a is the directory asked about; base/ab a sibling whose name starts the same."""
    base = loopfs.mountpoint
    for d in ("a/sub", "ab", "alias", "c"):
        (base / d).mkdir(parents=True)
    (base / "a/f").write_text("inside\n")
    (base / "a/sub/lib.so").write_bytes(b"\0" * 8192)
    (base / "ab/x").write_text("outside\n")
    (base / "c/g").write_text("plain\n")
    try:
        yield base
    finally:
        for d in ("a", "alias", "c"):
            unmount_tree(base / d)


def test_fd_cwd_and_mapping_are_found(tree: Path) -> None:
    a = tree / "a"
    with running(
        py(HOLD_FD, a / "f"),
        py(HOLD_CWD, a / "sub"),
        py(HOLD_MMAP, a / "sub/lib.so"),
        py(HOLD_FD, tree / "ab/x"),
        py(HOLD_CWD, tree),
    ) as (fd, cwd, mapping, sibling, parent):
        found = holders.find_holders(str(a))
        (what,) = of(found, fd.pid)
        assert what.startswith("fd ") and what.endswith(f" {a}/f")
        assert of(found, cwd.pid) == [f"cwd {a}/sub"]
        assert of(found, mapping.pid) == [f"mmap {a}/sub/lib.so"]
        assert of(found, sibling.pid) == []  # /x/ab is not inside /x/a
        assert of(found, parent.pid) == []
        assert {h.pid for h in found} == {fd.pid, cwd.pid, mapping.pid}
        assert {h.command for h in found} == {os.path.basename(sys.executable)[:15]}, found

        assert {h.pid for h in holders.find_holders(str(tree / "ab"))} == {sibling.pid}

        rest = holders.find_holders(str(a), exclude_pids=[fd.pid, cwd.pid])
        assert {h.pid for h in rest} == {mapping.pid}


def test_deleted_files_and_directories_still_count(tree: Path) -> None:
    gone = tree / "a/gone"
    gone.mkdir()
    with running(py(HOLD_FD, tree / "a/f"), py(HOLD_CWD, gone)) as (fd, cwd):
        (tree / "a/f").unlink()
        gone.rmdir()
        (what,) = of(holders.find_holders(str(tree / "a")), fd.pid)
        assert what.endswith(f" {tree}/a/f (deleted)")
        # The directory asked about may itself be gone.
        assert of(holders.find_holders(str(gone)), cwd.pid) == [f"cwd {gone} (deleted)"]


def test_a_writer_under_a_later_mount_is_found(tree: Path) -> None:
    """The writer that kept its fd from before a pin: its file is on the disk below the pin's
    mount, and it still holds the directory."""
    a = tree / "a"
    with running(py(HOLD_FD, a / "f")) as (proc,):
        mounts.mount_tmpfs(str(a), size=MiB, mode=0o755, uid=0, gid=0, source="rp-pin")
        assert not (a / "f").exists()
        (what,) = of(holders.find_holders(str(a)), proc.pid)
        assert what.endswith(f" {a}/f")


def test_holders_of_an_overlay_pin(tree: Path, runtime_tmpfs: Path) -> None:
    """Files on an overlay report the device of the layer they come from (xino=off), not the
    overlay's: holders are found through the mount, and they are what makes the unmount busy."""
    a = tree / "a"
    lower, upper, work = (runtime_tmpfs / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    mounts.bind(str(a), str(lower))
    try:
        mounts.mount_overlay(
            str(a),
            lower=str(lower),
            upper=str(upper),
            work=str(work),
            features="redirect_dir=on,index=off,metacopy=off,xino=off",
            source="rp-test-ov",
        )
        with running(py(HOLD_FD, a / "f"), py(HOLD_MMAP, a / "sub/lib.so")) as (writer, reader):
            assert (upper / "f").exists() and not (upper / "sub/lib.so").exists()
            assert os.stat(a / "f").st_dev != os.stat(a).st_dev
            found = holders.find_holders(str(a))
            assert {h.pid for h in found} == {writer.pid, reader.pid}
            assert of(found, reader.pid) == [f"mmap {a}/sub/lib.so"]
            with pytest.raises(mounts.MountBusy):
                mounts.umount(str(a))
        assert holders.find_holders(str(a)) == []
        mounts.umount(str(a))
    finally:
        unmount_tree(a)
        unmount_tree(lower)


def test_held_through_a_bind_elsewhere(tree: Path) -> None:
    """A file of base/a opened through a bind of it at base/alias is held inside base/a; a file
    of base/c opened before base/a was bound over base/c is not."""
    a, alias, c = tree / "a", tree / "alias", tree / "c"
    mounts.bind(str(a), str(alias))
    with running(py(HOLD_FD, alias / "f"), py(HOLD_FD, c / "g")) as (via_alias, plain):
        mounts.bind(str(a), str(c))  # now base/c/g names a file of base/a's tree
        found = holders.find_holders(str(a))
        (what,) = of(found, via_alias.pid)
        assert what.endswith(f" {alias}/f")
        assert of(found, plain.pid) == []  # its file is the old base/c/g, on no path of base/a


def test_other_mount_namespaces(tree: Path) -> None:
    a, alias = tree / "a", tree / "alias"
    # The second process opens base/a/f through a bind that exists only in its namespace: the
    # path it holds means nothing here, the mount it came through does.
    bind_then = [
        "sh",
        "-c",
        'mount --bind "$1" "$2" && shift 2 && exec "$@"',
        "sh",
        str(a),
        str(alias),
    ]
    with running(
        PRIVATE_NS + py(HOLD_FD, a / "f"),
        PRIVATE_NS + bind_then + py(HOLD_FD, alias / "f"),
        PRIVATE_NS + py(HOLD_CWD, a / "sub"),
        PRIVATE_NS + py(HOLD_FD, tree / "ab/x"),
    ) as (same_path, own_alias, cwd, sibling):
        assert str(alias) not in mount_points()
        own_ns = os.readlink("/proc/self/ns/mnt")
        ns = os.readlink(f"/proc/{same_path.pid}/ns/mnt")
        assert ns != own_ns
        found = holders.find_holders(str(a))
        (what,) = of(found, same_path.pid)
        assert what.startswith("fd ") and what.endswith(f" {a}/f (in mount namespace {ns})")
        (what,) = of(found, own_alias.pid)
        ns = os.readlink(f"/proc/{own_alias.pid}/ns/mnt")
        assert what.endswith(f" {alias}/f (in mount namespace {ns})")
        ns = os.readlink(f"/proc/{cwd.pid}/ns/mnt")
        assert of(found, cwd.pid) == [f"cwd {a}/sub (in mount namespace {ns})"]
        assert of(found, sibling.pid) == []


PIN_SOURCE = "rp-test-pin-7"


def mount_pin(path: Path) -> None:
    mounts.mount_tmpfs(str(path), size=MiB, mode=0o755, uid=0, gid=0, source=PIN_SOURCE)


def shows_pin(pid: int) -> bool:
    return any(e.source == PIN_SOURCE for e in mounts.mountinfo(pid))


def test_a_namespace_that_still_shows_the_pin(tree: Path) -> None:
    pin = tree / "c"
    mount_pin(pin)
    with running(PRIVATE_NS + py(IDLE), py(IDLE)) as (other, same):
        ns_note = f"mount namespace still shows the pin at {pin}"
        found = holders.find_holders(str(tree / "a"), mount_source=PIN_SOURCE)
        assert of(found, other.pid) == [ns_note]
        assert of(found, same.pid) == []  # it sees our mount, which goes with the unmount
        assert holders.find_holders(str(tree / "a"), mount_source="rp-other") == []
        assert holders.find_holders(str(tree / "a")) == []

        mounts.umount(str(pin))  # its copy is private: it stays, with the RAM behind it
        assert shows_pin(other.pid)
        found = holders.find_holders(str(tree / "a"), mount_source=PIN_SOURCE)
        assert of(found, other.pid) == [ns_note]


def test_a_namespace_that_follows_the_unmount_is_not_a_holder(tree: Path) -> None:
    """As under systemd: the pin is mounted below a shared mount, and a service's namespace
    made after it holds a slave copy, which our unmount removes too (or finds busy)."""
    subprocess.run(["mount", "--make-shared", str(tree)], check=True)
    pin = tree / "c"
    mount_pin(pin)
    (pin / "sub").mkdir()
    slave = ["unshare", "-m", "--propagation", "slave"]
    # systemd makes a service's namespace a slave, then shared again: a namespace made from
    # that one follows through the intermediate peer group.
    reshared = ["sh", "-c", 'mount --make-rshared / && exec "$@"', "sh"]
    # A copy with a mount inside it is left behind by the unmount's propagation; one with a
    # mount right on top of it is not (the covering mount takes its place).
    mount_then = ["sh", "-c", 'mount -t tmpfs rp-other "$1" && shift && exec "$@"', "sh"]
    with running(
        slave + py(IDLE),
        PRIVATE_NS + py(IDLE),
        slave + reshared + py(IDLE),
        slave + mount_then + [str(pin / "sub")] + py(IDLE),
        slave + mount_then + [str(pin)] + py(IDLE),
    ) as (follower, private, relay, stays, covered):
        nested_argv = ["nsenter", "-t", str(relay.pid), "-m", *slave, *py(IDLE)]
        with running(nested_argv) as (nested,):
            relay_ns = os.readlink(f"/proc/{relay.pid}/ns/mnt")
            assert os.readlink(f"/proc/{nested.pid}/ns/mnt") != relay_ns
            found = holders.find_holders(str(tree / "a"), mount_source=PIN_SOURCE)
            assert {h.pid for h in found} == {private.pid, stays.pid}

            mounts.umount(str(pin))
            for pid in (follower.pid, relay.pid, nested.pid, covered.pid):
                assert not shows_pin(pid)
            assert shows_pin(private.pid)
            assert shows_pin(stays.pid)
            found = holders.find_holders(str(tree / "a"), mount_source=PIN_SOURCE)
            assert {h.pid for h in found} == {private.pid, stays.pid}


def test_processes_that_vanish_during_the_scan(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process listed in /proc may be gone a moment later, at any step of the scan."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    real_pids = holders._pids
    monkeypatch.setattr(holders, "_pids", lambda: [gone.pid, *real_pids()])
    with running(py(HOLD_FD, tree / "a/f"), py(HOLD_FD, tree / "a/f")) as (victim, keeper):
        # The victim dies between the listing of its fds and reading them.
        real_listdir = os.listdir

        def listdir(path: str) -> list[str]:
            names = real_listdir(path)
            if path == f"/proc/{victim.pid}/fd":
                victim.kill()
                victim.wait()
            return names

        monkeypatch.setattr(os, "listdir", listdir)
        found = holders.find_holders(str(tree / "a"))
        monkeypatch.undo()
        assert victim.poll() is not None, "the scan did not reach the victim"
        assert {h.pid for h in found} == {keeper.pid}

    # And for real: processes coming and going all the time.
    churn = subprocess.Popen(["sh", "-c", "while :; do /bin/true; done"])
    try:
        deadline = time.monotonic() + 1.0
        scans = 0
        while time.monotonic() < deadline:
            holders.find_holders(str(tree / "a"), mount_source=PIN_SOURCE)
            scans += 1
        assert scans > 1
    finally:
        churn.kill()
        churn.wait()


def test_scan_reports_counts(tree: Path) -> None:
    scan = holders.scan_holders(str(tree / "a"))
    assert scan.processes > 1
    assert scan.seconds > 0
    assert os.getpid() not in {h.pid for h in scan.holders}


def test_unit_of_this_process() -> None:
    with open("/proc/self/cgroup") as f:
        cgroup = f.read()
    unit = holders.unit_of(os.getpid())
    if unit is None:
        assert not any(s in cgroup for s in (".service\n", ".scope\n"))
    else:
        assert unit in cgroup


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("0::/system.slice/nginx.service\n", "nginx.service"),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
        ("0::/system.slice/php-fpm.service/pool-www\n", "php-fpm.service"),
        (
            "0::/machine.slice/systemd-nspawn@web.service/payload/system.slice/nginx.service\n",
            "nginx.service",
        ),
        ("0::/\n", None),
        ("0::/user.slice/user-1000.slice\n", None),
        ("1:name=systemd:/system.slice/cron.service\n2:cpu:/\n", "cron.service"),
        ("1:name=systemd:/system.slice/a.service\n0::/system.slice/b.service\n", "b.service"),
    ],
)
def test_unit_from_cgroup(text: str, unit: str | None) -> None:
    assert holders.unit_from_cgroup(text) == unit


def test_holder_reads_as_a_sentence() -> None:
    h = Holder(1234, "nginx", "nginx.service", "fd 3 /var/log/nginx/access.log")
    assert str(h) == "pid 1234 (nginx, nginx.service): fd 3 /var/log/nginx/access.log"
    assert str(Holder(7, "sh", None, "cwd /x")) == "pid 7 (sh): cwd /x"
