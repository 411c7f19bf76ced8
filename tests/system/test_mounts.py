"""rampiped.mounts against the real kernel: tmpfs, binds and their propagation, overlays, busy
unmounts, and reading the mount table."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rampiped import durable, mounts
from rampiped.mounts import MountBusy, MountError
from tests.system.helpers import LoopFs, unmount_tree

pytestmark = pytest.mark.system

FEATURES = "redirect_dir=on,index=off,metacopy=off,xino=off"
MiB = 1024 * 1024


def entry_at(path: Path | str) -> mounts.MountEntry:
    found = mounts.mount_at(str(path))
    assert found is not None, f"nothing mounted at {path}"
    return found


@contextlib.contextmanager
def cleanup(*paths: Path) -> Iterator[None]:
    try:
        yield
    finally:
        for p in paths:
            unmount_tree(p)


@contextlib.contextmanager
def child_in(directory: Path) -> Iterator[subprocess.Popen[str]]:
    """A process whose working directory is `directory`, ready when this yields."""
    code = "import os, sys; os.chdir(sys.argv[1]); print('ready', flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "child did not start within 30s"
        assert proc.stdout.readline() == "ready\n", f"child failed: exit {proc.wait()}"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_tmpfs_has_exact_size_mode_and_owner(tmp_path: Path) -> None:
    target = tmp_path / "ram"
    target.mkdir()
    with cleanup(target):
        mounts.mount_tmpfs(
            str(target), size=8 * MiB, mode=0o1750, uid=1234, gid=5678, source="rp-test-ram"
        )
        e = entry_at(target)
        assert (e.fstype, e.source) == ("tmpfs", "rp-test-ram")
        assert {"nosuid", "nodev"} <= set(e.options.split(","))
        assert {"size=8192k", "mode=1750", "uid=1234", "gid=5678"} <= set(
            e.super_options.split(",")
        )
        st = os.stat(target)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o1750, 1234, 5678)
        vfs = os.statvfs(target)
        assert vfs.f_blocks * vfs.f_frsize == 8 * MiB
        assert mounts.fs_type(str(target)) == "tmpfs"
        mounts.umount(str(target))
        assert not mounts.is_mountpoint(str(target))


def test_tmpfs_on_a_missing_directory_names_it(tmp_path: Path) -> None:
    target = tmp_path / "nope"
    with pytest.raises(MountError) as exc:
        mounts.mount_tmpfs(str(target), size=MiB, mode=0o700, uid=0, gid=0)
    assert str(exc.value) == f"cannot mount tmpfs on {target}: mount point {target} does not exist"
    assert exc.value.errno == errno.ENOENT


@pytest.fixture
def shared_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs that is a shared mount, as / is under systemd."""
    top = tmp_path / "shared"
    top.mkdir()
    with cleanup(top):
        mounts.mount_tmpfs(str(top), size=16 * MiB, mode=0o755, uid=0, gid=0, source="rp-shared")
        subprocess.run(["mount", "--make-shared", str(top)], check=True)
        assert entry_at(top).shared is not None
        yield top


@pytest.mark.parametrize("private", [True, False])
def test_bind_private_leaves_the_peer_group(
    shared_tmpfs: Path, tmp_path: Path, private: bool
) -> None:
    source = shared_tmpfs / "dir"
    (source / "sub").mkdir(parents=True)
    staging = tmp_path / "staging"
    staging.mkdir()
    with cleanup(staging):
        mounts.bind(str(source), str(staging), private=private)
        e = entry_at(staging)
        assert e.root == "/dir"
        in_peer_group = any(f.startswith("shared:") for f in e.optional_fields)
        assert in_peer_group == (not private)
        # What the pin does next: mount on the source path. A shared staging bind would
        # receive that mount too (and an overlay would then have itself as its lower layer).
        sub_mount = source / "sub"
        mounts.mount_tmpfs(str(sub_mount), size=MiB, mode=0o755, uid=0, gid=0, source="rp-on-top")
        # (cleanup: the fixtures unmount both trees)
        assert mounts.is_mountpoint(str(staging / "sub")) == (not private)


def test_bind_readonly(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("x")
    target = tmp_path / "ro"
    target.mkdir()
    with cleanup(target):
        mounts.bind(str(source), str(target), readonly=True)
        assert "ro" in entry_at(target).options.split(",")
        with pytest.raises(OSError) as exc:
            (target / "f").write_text("y")
        assert exc.value.errno == errno.EROFS
        (source / "f").write_text("z")  # the source stays writable
        assert (target / "f").read_text() == "z"


def test_bind_of_a_file_on_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(MountError) as exc:
        mounts.bind(str(tmp_path / "file"), str(tmp_path / "dir"))
    assert str(exc.value) == (
        f"cannot bind {tmp_path / 'file'} on {tmp_path / 'dir'}: source is not a directory "
        "but target is a directory"
    )
    assert not mounts.is_mountpoint(str(tmp_path / "dir"))


@pytest.fixture
def layers(loopfs: LoopFs, runtime_tmpfs: Path) -> Iterator[dict[str, Path]]:
    """The layout of an overlay pin: the directory on disk, its private staging bind, and
    upper/work on a tmpfs."""
    data = loopfs.mountpoint / "data"
    data.mkdir()
    (data / "old.txt").write_text("on disk\n")
    paths = {
        "data": data,
        "lower": runtime_tmpfs / "lower",
        "upper": runtime_tmpfs / "upper",
        "work": runtime_tmpfs / "work",
    }
    for name in ("lower", "upper", "work"):
        paths[name].mkdir()
    with cleanup(data, paths["lower"]):
        yield paths


def test_overlay_mounts_and_unmounts(layers: dict[str, Path]) -> None:
    data, lower, upper, work = (str(layers[k]) for k in ("data", "lower", "upper", "work"))
    mounts.bind(data, lower, private=True)
    mounts.mount_overlay(
        data, lower=lower, upper=upper, work=work, features=FEATURES, source="rp-test-ov"
    )
    e = entry_at(data)
    assert (e.fstype, e.source) == ("overlay", "rp-test-ov")
    opts = set(e.super_options.split(","))
    assert {f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"} <= opts
    # The kernel lists only options that differ from its defaults.
    assert "redirect_dir=on" in opts
    for key in ("index", "metacopy", "xino"):
        assert {o for o in opts if o.startswith(key + "=")} <= {key + "=off"}
    assert mounts.fs_type(data) == "overlay"

    (layers["data"] / "new.txt").write_text("in RAM\n")
    assert (layers["upper"] / "new.txt").read_text() == "in RAM\n"
    assert not (layers["lower"] / "new.txt").exists()
    assert (layers["data"] / "old.txt").read_text() == "on disk\n"

    mounts.umount(data)
    assert mounts.fs_type(data) == "ext4"
    assert not mounts.is_mountpoint(data)
    assert not (layers["data"] / "new.txt").exists()
    mounts.umount(lower)
    assert not mounts.is_mountpoint(lower)
    # The workdir overlay left behind may be used again.
    assert set(os.listdir(work)) <= {"work", "index"}
    mounts.bind(data, lower, private=True)
    mounts.mount_overlay(
        data, lower=lower, upper=upper, work=work, features=FEATURES, source="rp-test-ov"
    )
    assert (layers["data"] / "new.txt").read_text() == "in RAM\n"


def overlay_error(layers: dict[str, Path], target: str | None = None, **override: str) -> str:
    args = {k: str(layers[k]) for k in ("lower", "upper", "work")}
    args.update(override)
    target = target or str(layers["data"])
    with pytest.raises(MountError) as exc:
        mounts.mount_overlay(target, features=FEATURES, source="rp-test-ov", **args)
    assert not mounts.is_mountpoint(target), "a failed overlay mount left a mount behind"
    return str(exc.value)


def test_overlay_errors_name_the_path(layers: dict[str, Path], loopfs: LoopFs) -> None:
    data = layers["data"]
    what = f"cannot mount overlay on {data}"
    missing = layers["lower"].parent / "missing"
    assert overlay_error(layers, lower=str(missing)) == f"{what}: lowerdir {missing} does not exist"
    a_file = layers["upper"].parent / "file"
    a_file.write_text("x")
    assert (
        overlay_error(layers, lower=str(a_file)) == f"{what}: lowerdir {a_file} is not a directory"
    )
    assert overlay_error(layers, target=str(missing)) == (
        f"cannot mount overlay on {missing}: mount point {missing} does not exist"
    )

    disk_work = loopfs.mountpoint / "work"
    disk_work.mkdir()
    assert overlay_error(layers, work=str(disk_work)) == (
        f"{what}: upperdir {layers['upper']} (tmpfs mounted at {layers['upper'].parent}) and "
        f"workdir {disk_work} (ext4 mounted at {loopfs.mountpoint}) are not on the same mount"
    )

    inner = layers["upper"] / "work"
    inner.mkdir()
    assert overlay_error(layers, work=str(inner)) == (
        f"{what}: upperdir {layers['upper']} and workdir {inner} overlap; the layers must be "
        "separate directories, none inside another"
    )
    inner.rmdir()

    (layers["work"] / "stray").write_text("x")
    assert overlay_error(layers) == (
        f"{what}: workdir {layers['work']} is not empty and not an overlay workdir (holds stray)"
    )
    (layers["work"] / "stray").unlink()

    comma = layers["upper"].parent / "up,per"
    comma.mkdir()
    assert overlay_error(layers, upper=str(comma)) == (
        f"{what}: upperdir {comma} contains ',', which the overlay option string uses as "
        "separators; use a path without them"
    )

    with pytest.raises(MountError) as exc:
        mounts.mount_overlay(
            str(data),
            lower=str(layers["lower"]),
            upper=str(layers["upper"]),
            work=str(layers["work"]),
            features="lowerdir=/etc,xino=off",
            source="rp-test-ov",
        )
    assert str(exc.value) == (
        f"{what}: features 'lowerdir=/etc,xino=off' must not set the layers (lowerdir)"
    )

    # Three layer paths of ~1400 bytes each: every one is valid, together they exceed a page.
    long = {}
    for role in ("lower", "upper", "work"):
        path = layers["upper"].parent / role
        while len(str(path)) < 1400:
            path = path / ("d" * 100)
        path.mkdir(parents=True)
        long[role] = str(path)
    message = overlay_error(layers, **long)
    assert message.startswith(f"{what}: the option string is ")
    assert message.endswith(f"more than mount(2) accepts ({os.sysconf('SC_PAGESIZE') - 1})")


def test_umount_busy_keeps_the_mount(tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    with cleanup(target):
        mounts.mount_tmpfs(str(target), size=MiB, mode=0o755, uid=0, gid=0, source="rp-busy")
        (target / "inside").mkdir()
        with child_in(target / "inside"):
            with pytest.raises(MountBusy) as exc:
                mounts.umount(str(target))
            assert str(exc.value) == f"cannot unmount {target}: busy (EBUSY)"
            assert exc.value.errno == errno.EBUSY
            assert entry_at(target).source == "rp-busy"
        mounts.umount(str(target))
        assert not mounts.is_mountpoint(str(target))


def test_umount_of_a_plain_directory(tmp_path: Path) -> None:
    with pytest.raises(MountError) as exc:
        mounts.umount(str(tmp_path))
    assert not isinstance(exc.value, MountBusy)
    assert str(exc.value) == f"cannot unmount {tmp_path}: not a mount point (EINVAL)"


def test_make_private_of_a_plain_directory(tmp_path: Path) -> None:
    with pytest.raises(MountError) as exc:
        mounts.make_private(str(tmp_path))
    assert str(exc.value) == f"cannot make {tmp_path} private: not a mount point (EINVAL)"


def test_mountinfo_unescapes_names(tmp_path: Path) -> None:
    odd = tmp_path / "with space\tand tab\nnewline\\backslash"
    odd.mkdir()
    with cleanup(odd):
        mounts.mount_tmpfs(str(odd), size=MiB, mode=0o755, uid=0, gid=0, source="rp odd source")
        with open("/proc/self/mountinfo", "rb") as f:
            raw = f.read()
        assert b"with\\040space\\011and\\040tab\\012newline\\134backslash" in raw
        e = entry_at(odd)
        assert e.mountpoint == str(odd)
        assert e.source == "rp odd source"
        assert mounts.is_mountpoint(str(odd))
        assert [m.mountpoint for m in mounts.mounts_below(str(tmp_path))] == [str(odd)]


def test_parse_mountinfo_fields() -> None:
    line = (
        b"36 35 98:0 /mnt1 /mnt\\0402 rw,noatime master:1 shared:7 - ext3 /dev/root "
        b"rw,errors=continue\n"
    )
    (e,) = mounts.parse_mountinfo(line)
    assert e == mounts.MountEntry(
        mount_id=36,
        parent_id=35,
        major_minor="98:0",
        root="/mnt1",
        mountpoint="/mnt 2",
        options="rw,noatime",
        optional_fields=("master:1", "shared:7"),
        fstype="ext3",
        source="/dev/root",
        super_options="rw,errors=continue",
    )
    assert (e.shared, e.master, e.dev) == (7, 1, os.makedev(98, 0))


def test_queries_of_the_mount_table(loopfs: LoopFs) -> None:
    base = loopfs.mountpoint
    for d in ("a/m1", "a/b/m2", "ab/m3", "a/plain", "stack"):
        (base / d).mkdir(parents=True)
    with cleanup(base / "a", base / "ab", base / "stack"):
        for d in ("a/m1", "a/b/m2", "ab/m3"):
            mounts.mount_tmpfs(str(base / d), size=MiB, mode=0o755, uid=0, gid=0, source="rp-q")
        assert mounts.is_mountpoint(str(base))
        assert mounts.is_mountpoint(str(base / "a/m1"))
        assert not mounts.is_mountpoint(str(base / "a"))
        assert not mounts.is_mountpoint(str(base / "a/plain"))
        below = sorted(m.mountpoint for m in mounts.mounts_below(str(base / "a")))
        assert below == [str(base / "a/b/m2"), str(base / "a/m1")]  # not ab/m3
        assert mounts.mounts_below(str(base / "a/m1")) == []  # strictly below

        assert mounts.mount_at(str(base / "a/plain")) is None
        for source in ("rp-lower", "rp-upper"):
            mounts.mount_tmpfs(
                str(base / "stack"), size=MiB, mode=0o755, uid=0, gid=0, source=source
            )
        assert entry_at(base / "stack").source == "rp-upper"

        assert mounts.fs_type(str(base / "a/plain")) == "ext4"
        assert mounts.fs_type(str(base / "a/m1")) == "tmpfs"
        (base / "a/m1/file").write_text("x")
        assert mounts.fs_type(str(base / "a/m1/file")) == "tmpfs"
        (base / "a/link").symlink_to(base / "a/m1")
        assert mounts.fs_type(str(base / "a/link")) == "tmpfs"
        assert mounts.mount_containing(str(base / "stack")).source == "rp-upper"


def test_du_counts_each_inode_once_and_stays_on_its_mount(loopfs: LoopFs) -> None:
    tree = loopfs.mountpoint / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "big").write_bytes(os.urandom(100_000))
    (tree / "sub/small").write_bytes(b"x" * 10)
    os.link(tree / "big", tree / "sub/hardlink")
    outside = loopfs.mountpoint / "outside"
    outside.write_bytes(os.urandom(300_000))
    (tree / "symlink").symlink_to(outside)
    (tree / "mnt").mkdir()
    with cleanup(tree / "mnt"):
        mounts.mount_tmpfs(str(tree / "mnt"), size=4 * MiB, mode=0o755, uid=0, gid=0)
        (tree / "mnt/hidden").write_bytes(os.urandom(1 * MiB))
        # The hard link counts once, the symlink's target and the mount point not at all.
        expected = sum(
            os.lstat(tree / p).st_blocks * 512 for p in (".", "sub", "big", "sub/small", "symlink")
        )
        assert expected >= 100_000
        assert mounts.du(str(tree)) == expected
        assert mounts.du(str(tree / "big")) == os.lstat(tree / "big").st_blocks * 512


def test_syncfs_writes_the_filesystem_out(loopfs: LoopFs) -> None:
    dev = os.path.basename(loopfs.device)

    def written_sectors() -> int:
        with open(f"/sys/block/{dev}/stat") as f:
            return int(f.read().split()[6])

    before = written_sectors()
    with open(loopfs.mountpoint / "data", "wb") as f:
        f.write(os.urandom(MiB))
    durable.syncfs(str(loopfs.mountpoint))
    assert written_sectors() - before >= MiB // 512
    with pytest.raises(FileNotFoundError):
        durable.syncfs(str(loopfs.mountpoint / "missing"))
