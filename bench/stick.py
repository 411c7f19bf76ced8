"""A simulated USB stick: an ext4 image on a loop device whose writes the kernel throttles.

How: the image lives on a tmpfs (so the host's own disk never shapes the figures), `mount -o
loop` attaches it (the loop device is detached by the kernel when the filesystem is unmounted,
also when the benchmark dies and its mount namespace goes with it), and the root blkio cgroup's
throttle limits the loop device: `blkio.throttle.write_iops_device` and `write_bps_device` (and
the read pair) for its major:minor.

Why the throttle and not a FUSE pass-through that delays each request: it needs nothing but the
kernel (no FUSE library to install, no server process competing for the two cores), and its
averages are exact (200 IOPS, 8 MiB/s). Its limits: I/O is released in 100 ms slices, so latency
percentiles are not those of a real stick, and every request costs the same whether it is
sequential or random (a stick's sequential journal writes are cheaper), so fsync-heavy work is
slower here than on a real stick. The rules must sit in the ROOT cgroup: a non-root blkio cgroup
misses background writeback and the ext4 journal's commits on this kernel.

A throttle rule outlives the loop device it names (it stays on the device number and would slow
whoever attaches that loop device next): every rule is removed on the way out, and rules left on
loop devices that hold no file (from a benchmark that was killed) are removed at start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rampiped.durable import syncfs
from tests.system.helpers import mountinfo, unmount_tree

MiB = 1024 * 1024
LOOP_MAJOR = 7
THROTTLE_KEYS = ("write_iops", "write_bps", "read_iops", "read_bps")
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878  # _IOWR('X', 119/120, int)


class StickError(RuntimeError):
    """The simulated stick cannot be set up; the message says why and what to do."""


@dataclass(frozen=True)
class StickModel:
    """What the throttle allows. Writes: a cheap USB 2.0 stick as measured with a delaying
    pass-through (about 200 random 4k writes/s, 8 MB/s sequential). Reads: 30 MiB/s and 1000
    IOPS, a typical stick's read side (reads matter little here: copies into RAM at pin time)."""

    write_iops: int = 200
    write_bps: int = 8 * MiB
    read_iops: int = 1000
    read_bps: int = 30 * MiB

    def describe(self) -> str:
        return (
            f"writes {self.write_iops} IOPS and {self.write_bps / MiB:g} MiB/s, "
            f"reads {self.read_iops} IOPS and {self.read_bps / MiB:g} MiB/s"
        )


def blkio_root() -> Path:
    """The root of the cgroup v1 blkio hierarchy, or StickError."""
    for m in mountinfo():
        if m["fstype"] == "cgroup" and "blkio" in m["options"].split(","):
            path = Path(m["mountpoint"])
            if (path / "blkio.throttle.write_iops_device").exists():
                return path
    raise StickError(
        "no cgroup v1 blkio hierarchy with throttle files is mounted (see `mount | grep cgroup`):"
        " the simulated stick throttles its loop device through the root blkio cgroup, which"
        " cgroup v2 does not offer (io.max exists only below the root)"
    )


def _rule_file(root: Path, key: str) -> Path:
    return root / f"blkio.throttle.{key}_device"


def set_rules(dev: str, model: StickModel, root: Path | None = None) -> None:
    root = root or blkio_root()
    for key in THROTTLE_KEYS:
        _rule_file(root, key).write_text(f"{dev} {getattr(model, key)}\n")


def clear_rules(dev: str, root: Path | None = None) -> None:
    root = root or blkio_root()
    for key in THROTTLE_KEYS:
        with contextlib.suppress(OSError):  # no rule there: nothing to clear
            _rule_file(root, key).write_text(f"{dev} 0\n")


def rules(root: Path | None = None) -> dict[str, dict[str, int]]:
    """Every throttle rule: {"7:3": {"write_iops": 200, ...}}."""
    root = root or blkio_root()
    out: dict[str, dict[str, int]] = {}
    for key in THROTTLE_KEYS:
        for line in _rule_file(root, key).read_text().splitlines():
            dev, _, value = line.partition(" ")
            if value:
                out.setdefault(dev, {})[key] = int(value)
    return out


def _loop_name(dev: str) -> str | None:
    major, _, minor = dev.partition(":")
    if major != str(LOOP_MAJOR):
        return None
    link = Path(f"/sys/dev/block/{dev}")
    return link.resolve().name if link.exists() else f"loop{minor}"


def sweep_stale_rules() -> list[str]:
    """Remove throttle rules on loop devices that hold no file (left by a killed run)."""
    root = blkio_root()
    cleared = []
    for dev in rules(root):
        name = _loop_name(dev)
        if name is None:
            continue
        if not Path(f"/sys/block/{name}/loop/backing_file").exists():
            clear_rules(dev, root)
            cleared.append(dev)
    return cleared


@dataclass
class Stick:
    """A mounted simulated stick. `mountpoint`, `device` and `image` have the names of the test
    harness's LoopFs, so the daemon harness can use a stick as its disk."""

    name: str
    mountpoint: Path
    device: str  # /dev/loopN
    dev: str  # major:minor
    image: Path
    model: StickModel
    throttled: bool = False

    def _stat(self) -> list[int]:
        text = Path(f"/sys/block/{Path(self.device).name}/stat").read_text()
        return [int(x) for x in text.split()]

    def bytes_written(self) -> int:
        """Bytes the block device itself was asked to write (ext4 journal and metadata included),
        from its own counters: sectors written, field 7 of /sys/block/<dev>/stat."""
        return self._stat()[6] * 512

    def bytes_read(self) -> int:
        return self._stat()[2] * 512

    def write_ios(self) -> int:
        return self._stat()[4]

    def sync(self) -> None:
        syncfs(str(self.mountpoint))

    def settle(self) -> None:
        """Write out everything the filesystem holds back, its journal's metadata included.
        After a sync, ext4 has its metadata in its journal only, and writes it to its place
        later: a step measured right after another would be charged with what that one left
        behind, and not with what it leaves itself. Freezing the filesystem writes all of it
        (jbd2 checkpoints the whole journal); it is thawed at once."""
        fd = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
            fcntl.ioctl(fd, FITHAW, 0)
        finally:
            os.close(fd)

    def throttle(self) -> None:
        set_rules(self.dev, self.model)
        self.throttled = True

    def unthrottle(self) -> None:
        clear_rules(self.dev)
        self.throttled = False


def _mounted_device(mountpoint: Path) -> str:
    found = ""
    for m in mountinfo():
        if m["mountpoint"] == str(mountpoint):
            found = m["source"]
    return found


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StickError(
            f"{what}: `{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}"
        )


@contextlib.contextmanager
def stick(
    name: str, mountpoint: Path, images: Path, size_mb: int = 512, model: StickModel | None = None
) -> Iterator[Stick]:
    """A fresh ext4 stick at `mountpoint`, its image in `images` (a tmpfs). Not throttled until
    `throttle()` is called, so that seeding it costs no time. Everything is undone on exit, also
    when the body raised: throttle rule, mounts below the mount point, loop device, image."""
    model = model or StickModel()
    image = images / f"{name}.img"
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_mb * MiB)
    dev = ""
    try:
        # lazy_*_init=0: ext4 would otherwise zero its inode tables and journal in the background
        # after the mount, writes that would show up in the device counters
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-E",
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                str(image),
            ],
            f"making the filesystem of stick {name}",
        )
        _run(["mount", "-o", "loop", str(image), str(mountpoint)], f"mounting stick {name}")
        device = _mounted_device(mountpoint)
        if not device.startswith("/dev/loop"):
            raise StickError(f"stick {name}: {mountpoint} is mounted from {device!r}, not a loop")
        dev = Path(f"/sys/block/{Path(device).name}/dev").read_text().strip()
        s = Stick(name, mountpoint, device, dev, image, model)
        yield s
    finally:
        if dev:
            clear_rules(dev)
        unmount_tree(mountpoint)
        if _mounted_device(mountpoint):
            print(f"warning: stick {name}: {mountpoint} could not be unmounted", file=sys.stderr)
        else:
            # mount -o loop set autoclear; detach explicitly if the kernel has not yet
            left = subprocess.run(
                ["losetup", "-j", str(image)], capture_output=True, text=True
            ).stdout.split(":")[0]
            if left:
                subprocess.run(["losetup", "-d", left], capture_output=True)
            with contextlib.suppress(OSError):
                image.unlink()


# --------------------------------------------------------------------------- the profile


def fio(directory: Path, *args: str) -> dict[str, Any]:
    """Run one fio job in `directory`; its JSON result for the job."""
    argv = [
        "fio",
        "--name=probe",
        f"--directory={directory}",
        "--ioengine=psync",
        "--output-format=json",
        *args,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StickError(f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}")
    # fio may print warnings before its JSON
    out: dict[str, Any] = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    return out


def _pct(lat: dict[str, Any], p: str) -> float:
    """Percentile `p` of a fio latency block, in ms."""
    return float(lat.get("percentile", {}).get(p, 0.0)) / 1e6


def profile(s: Stick, seconds: float = 5.0) -> dict[str, float]:
    """What the stick does, measured with fio (and the small-files workload), as a flat dict."""
    from bench.workloads import small_files  # the same code as workload (c)

    d = s.mountpoint / "profile"
    d.mkdir(exist_ok=True)
    runtime = f"--runtime={max(1, round(seconds))}"
    out: dict[str, float] = {}
    rnd = fio(d, "--rw=randwrite", "--bs=4k", "--direct=1", "--size=16m", "--time_based", runtime)
    out["stick_rand4k_direct_iops"] = round(rnd["write"]["iops"], 1)
    out["stick_rand4k_direct_p50_ms"] = round(_pct(rnd["write"]["clat_ns"], "50.000000"), 2)
    out["stick_rand4k_direct_p99_ms"] = round(_pct(rnd["write"]["clat_ns"], "99.000000"), 2)
    # --invalidate=0: by default fio drops the file's cache before each pass, which forces a
    # full writeback of it and measures that instead
    fs = fio(
        d,
        "--rw=randwrite",
        "--bs=4k",
        "--fsync=1",
        "--size=4m",
        "--invalidate=0",
        "--time_based",
        runtime,
    )
    out["stick_rand4k_fsync_per_s"] = round(fs["write"]["iops"], 1)
    out["stick_fsync_p50_ms"] = round(_pct(fs.get("sync", {}).get("lat_ns", {}), "50.000000"), 2)
    out["stick_fsync_p99_ms"] = round(_pct(fs.get("sync", {}).get("lat_ns", {}), "99.000000"), 2)
    size_mb = max(4, int(s.model.write_bps * seconds / MiB))
    seq = fio(d, "--rw=write", "--bs=1m", f"--size={size_mb}m", "--end_fsync=1", "--invalidate=0")
    # bytes over the whole job, the final fsync included (fio's bw counts until the last write)
    seq_s = seq["job_runtime"] / 1000.0 if seq.get("job_runtime") else 0.0
    seq_bps = seq["write"]["io_bytes"] / seq_s if seq_s else float(seq["write"]["bw_bytes"])
    out["stick_seq_write_MBps"] = round(seq_bps / 1e6, 2)
    out["stick_seq_write_bytes_per_s"] = round(seq_bps, 0)
    shutil.rmtree(d)
    s.sync()
    d.mkdir()
    small = small_files(d, seconds)
    out["stick_small_files_fsync_per_s"] = round(small["ops_per_s"], 1)
    shutil.rmtree(d)
    s.sync()
    return out
