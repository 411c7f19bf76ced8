"""Real logrotate runs in a pinned log directory (create, copytruncate, compress), both modes:
after the stop the disk holds what the directory showed; a rotation with `create` is written
back as renames (the checkpoint after it writes far less than the rotated files; in an overlay
pin from the second rotation on, once the rotated files are in its layer)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.system.daemon_harness import make_env, running
from tests.system.helpers import bytes_written, drop_caches, remount, tree

pytestmark = pytest.mark.system

KiB = 1 << 10


def log_lines(path: Path, n: int, start: int) -> None:
    with open(path, "a") as f:
        for i in range(start, start + n):
            f.write(f"Dec  7 01:00:00 host app[42]: request {i} served in 12 ms, all well\n")


def logrotate(conf: Path, state: Path) -> None:
    subprocess.run(["logrotate", "-f", "-s", str(state), str(conf)], check=True)


@pytest.mark.parametrize("mode", ["overlay", "copy"])
@pytest.mark.parametrize("how", ["create", "copytruncate", "compress"])
def test_logrotate_in_a_pinned_directory(tmp_path: Path, mode: str, how: str) -> None:
    with make_env(tmp_path, disk_mb=256) as env:
        d = env.data / "logs"
        d.mkdir()
        log = d / "app.log"
        for k in (1, 2, 3):
            log_lines(d / f"app.log.{k}", 6_000, 100_000 * k)  # about 400 KiB each
        log_lines(log, 6_000, 0)
        conf = tmp_path / "logrotate.conf"
        options = {"create": "create 0640 root root", "copytruncate": "copytruncate"}
        conf.write_text(
            f"{log} {{\n  rotate 4\n  missingok\n"
            f"  {options.get(how, 'create')}\n  {'compress' if how == 'compress' else ''}\n}}\n"
        )
        state = tmp_path / "logrotate.state"
        with running(env) as dm:
            env.ctl("pin", str(d), "--mode", mode, check=True)
            log_lines(log, 500, 10_000)
            env.ctl("sync", str(d), check=True)  # what the disk holds is known from here
            logrotate(conf, state)
            log_lines(log, 200, 20_000)
            # an overlay pin's first rotation copies the rotated files up from the disk into
            # the layer, and its journal takes them whole; from then on they are in the layer
            env.ctl("sync", str(d), check=True)
            logrotate(conf, state)
            log_lines(log, 200, 25_000)
            os.sync()
            before = bytes_written(env.disk)
            env.ctl("sync", str(d), check=True)
            os.sync()
            after_rotation = bytes_written(env.disk) - before
            pin = next(p for p in env.status()["pins"] if p["path"] == str(d))
            spared = pin["whole_file_bytes"] - pin["written_bytes"]
            text = env.ctl("status", check=True).stdout
            logrotate(conf, state)
            log_lines(log, 200, 30_000)
            view = tree(d)
            assert dm.stop() == 0, dm.log_text()[-3000:]
        assert not env.overlay_at(d)
        remount(env.disk)
        drop_caches()
        assert tree(d) == view
        if how == "create":
            # the rotated files (about 1.6 MiB) are renamed, not written again; the status
            # says so
            assert after_rotation < 400 * KiB, after_rotation
            assert spared > 1000 * KiB, pin
            assert "spared)" in text, text
        assert pin["last_sync"]["whole_file_bytes"] >= pin["last_sync"]["bytes"], pin
