"""A write-back that does not fit on the disk (issue: files stranded in the journal).

An overlay pin's write-back goes through a journal on the same disk and then into the
directory. When the journal is on the directory's own mount the apply links its files into
place, so the changed data has to fit once; through another mount (here a bind mount of a
directory of the same disk) it is copied, and has to fit twice. Before, a checkpoint wrote its
generation whatever the room left; the apply at the stop then failed, and after a power cut the
start logged "could not reconcile", went on as a normal start with 0 pins, and the directory
lacked the files that only the journal held.

Now a checkpoint or write-back that would not fit is refused before anything is written, and a
recovery that cannot complete at start is kept as stranded: retried, reported in the status,
the STATUS line, the metrics and the start's own log line, and its directory is not pinned
again until it completes."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import Env, journal_on_another_mount, make_env, running
from tests.system.helpers import wait_for

pytestmark = pytest.mark.system

MiB = 1 << 20


def dd(path: Path, mib: int) -> None:
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync"],
        check=True,
        capture_output=True,
    )


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def fill_disk(env: Env, leave: int) -> Path:
    filler = env.disk.mountpoint / "filler"
    st = os.statvfs(env.disk.mountpoint)
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - leave)
    return filler


def generations(env: Env) -> list[str]:
    return sorted(str(p.relative_to(env.journal)) for p in env.journal.glob("*/gen-*"))


def test_a_checkpoint_that_fits_once_is_written_when_the_journal_is_linked_into_place(
    tmp_path: Path,
) -> None:
    # 128 MiB ext4: 60 MiB fit on the plain disk, not twice; the journal is on the
    # directory's mount, so the unpin links it into place and it needs to fit once
    with make_env(tmp_path, disk_mb=128) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        d.mkdir()
        with running(env) as dm:
            env.ctl("pin", str(d), check=True)
            dd(d / "f1.bin", 30)
            dd(d / "f2.bin", 30)
            env.ctl("sync", str(d), check=True)
            assert len(generations(env)) == 1
            view = files(d)
            env.ctl("unpin", str(d), check=True)
            assert dm.stop() == 0
        assert not env.overlay_at(d)
        assert files(d) == view
        assert generations(env) == []


def test_a_checkpoint_that_would_not_fit_twice_is_refused_before_writing(tmp_path: Path) -> None:
    # 128 MiB ext4: 60 MiB fit on the plain disk, not twice (journal, then the directory: the
    # journal is on another mount of the disk, so it is copied into place)
    with make_env(tmp_path, disk_mb=128) as env:
        env = journal_on_another_mount(env)
        env.write_config(adaptive={"enabled": False})
        d = env.data / "app"
        d.mkdir()
        (d / "small.conf").write_text("kept\n")
        with running(env) as dm:
            env.ctl("pin", str(d), check=True)
            dd(d / "f1.bin", 30)
            dd(d / "f2.bin", 30)
            proc = env.ctl("sync", str(d))
            safety.count("disk faults")
            assert proc.returncode == 1, proc.stdout
            assert "not enough space: it needs" in proc.stderr, proc.stderr
            assert "the changes stay in RAM" in proc.stderr, proc.stderr
            assert generations(env) == []  # nothing written, so nothing to strand
            dm.wait_log(r"checkpoint of \S+ failed .*not enough space")
            # the user makes room in the pinned directory; the next write-back fits
            view_before = files(d)
            (d / "f2.bin").unlink()
            view = files(d)
            assert view == {k: v for k, v in view_before.items() if k != "f2.bin"}
            env.ctl("sync", str(d), check=True)
            assert dm.stop() == 0
        # after the daemon: the disk holds the view
        assert not env.overlay_at(d)
        assert files(d) == view


def test_a_checkpoint_that_would_run_out_of_inodes_is_refused_before_writing(
    tmp_path: Path,
) -> None:
    # 4096 inodes: 2,500 files fit on the plain disk, not twice (journal, then the directory)
    with make_env(tmp_path, disk_mb=128, inodes=4096) as env:
        env.write_config(adaptive={"enabled": False})
        d = env.data / "tree"
        d.mkdir()
        with running(env) as dm:
            env.ctl("pin", str(d), check=True)
            for i in range(2_500):
                sub = d / f"d{i % 50:02d}"
                sub.mkdir(exist_ok=True)
                (sub / f"f{i}").write_text(f"{i}\n")
            proc = env.ctl("sync", str(d))
            safety.count("disk faults")
            assert proc.returncode == 1, proc.stdout
            assert "not enough inodes: it needs" in proc.stderr, proc.stderr
            assert generations(env) == []
            for i in range(1_500):  # the user removes most of them; the rest fits
                (d / f"d{i % 50:02d}" / f"f{i}").unlink()
            view = files(d)
            env.ctl("sync", str(d), check=True)
            assert dm.stop() == 0
        assert not env.overlay_at(d)
        assert files(d) == view


def test_a_recovery_that_does_not_fit_is_stranded_reported_and_retried(tmp_path: Path) -> None:
    with make_env(tmp_path, disk_mb=128) as env:
        env = journal_on_another_mount(env)  # copied into place: it must fit a second time
        textfile = env.tmp / "rampiped.prom"
        env.write_config(
            adaptive={"enabled": False}, metrics={"textfile": str(textfile), "interval": "1s"}
        )
        d = env.data / "app"
        d.mkdir()
        (d / "old.conf").write_text("before the pin\n")
        with running(env) as dm:
            env.ctl("pin", str(d), check=True)
            for i in range(3):
                dd(d / f"f{i}.bin", 8)
            env.ctl("sync", str(d), check=True)  # a generation in the journal
            view = files(d)
            dm.kill()
        safety.drop_ram(env.runtime.parent, env.data)  # the power goes
        safety.count("power cuts")
        filler = fill_disk(env, leave=4 * MiB)  # and the disk is nearly full at the next start
        safety.count("disk faults")
        with running(env) as dm:
            line = dm.wait_log(re.escape(str(d)) + r": NOT WRITTEN BACK: ").string
            assert "/gen-" in line, line
            started = dm.wait_log(r"rampiped \S+ started").string
            assert "1 WRITE-BACKS NOT COMPLETED" in started and str(d) in started, started
            # what the directory lacks is still in the journal, nothing was given up
            assert files(d) != view
            assert generations(env)
            st = env.status()
            assert [s["path"] for s in st["stranded"]] == [str(d)], st["stranded"]
            assert st["stranded"][0]["bytes"] >= 24 * MiB
            assert "/gen-" in st["stranded"][0]["where"]
            text = env.ctl("status", check=True).stdout
            assert f"NOT WRITTEN BACK: {d} lacks" in text, text
            wait_for(
                lambda: (
                    textfile.exists()
                    and re.search(
                        r'rampiped_stranded_bytes\{path="' + re.escape(str(d)) + r'"\} [1-9]',
                        textfile.read_text(),
                    )
                    is not None
                ),
                30,
                "the stranded bytes in the metrics",
            )
            # the directory is not pinned again on top of what it still lacks
            proc = env.ctl("pin", str(d))
            assert proc.returncode == 1 and "has not completed" in proc.stderr, proc.stderr
            # room again: `rampipectl sync` makes the retry due now
            filler.unlink()
            env.ctl("sync")
            wait_for(lambda: env.status()["stranded"] == [], 60, "the stranded write-back")
            dm.wait_log(re.escape(str(d)) + r": applied the checkpoint journal")
            assert generations(env) == []
            assert dm.stop() == 0
        assert files(d) == view
    print("\n" + json.dumps({"stranded line": line}))
