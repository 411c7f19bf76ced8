"""The harness itself: a loop filesystem appears, is ext4, and is gone afterwards."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.system.helpers import fstype_at, make_loopfs, manifest, mount_points

pytestmark = pytest.mark.system


def test_loopfs_is_mounted_and_removed(tmp_path: Path) -> None:
    with make_loopfs(tmp_path / "d", size_mb=32) as fs:
        assert fstype_at(fs.mountpoint) == "ext4"
        (fs.mountpoint / "x").write_text("hello")
        assert manifest(fs.mountpoint)["x"]["size"] == 5
        device = fs.device
    assert str(tmp_path / "d") not in mount_points()
    listed = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert device + ":" not in listed
