"""The atomic writer on a filesystem where one journal commit takes every change before it
(durable.fsync_commits_all): the file's data written out instead of fsynced, and the
directory's fsync commits it with the rename. A power cut right after it returned (the device
image copied while ext4 commits only when asked: commit=600) leaves the new file whole."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from rampiped import durable, osutil
from tests.system.helpers import LoopFs, syncfs_path
from tests.system.test_copymode import make_loopfs_from

pytestmark = pytest.mark.system


@pytest.mark.parametrize("how", ["write_json", "write_at", "copy window"])
def test_an_ordered_atomic_write_is_on_disk_when_it_returns(
    loopfs: LoopFs, tmp_path: Path, how: str
) -> None:
    subprocess.run(["mount", "-o", "remount,commit=600", str(loopfs.mountpoint)], check=True)
    assert durable.fsync_commits_all(str(loopfs.mountpoint))
    d = loopfs.mountpoint / "journal"
    d.mkdir()
    (d / "mark.json").write_text('{"old": true}')
    syncfs_path(loopfs.mountpoint)
    doc = {"new": "x" * 10_000}  # more than an inode holds: a data block
    if how == "write_json":
        durable.write_json(str(d / "mark.json"), doc)
    elif how == "write_at":
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            durable.write_at(fd, "mark.json", osutil.json_bytes(doc), mode=0o600)
        finally:
            os.close(fd)
    else:
        from rampiped.copywb.atomic import write_atomic

        write_atomic(str(d / "mark.json"), osutil.json_bytes(doc))
    image = tmp_path / "cut.img"
    subprocess.run(["cp", "--sparse=always", str(loopfs.image), str(image)], check=True)
    with make_loopfs_from(image, tmp_path / "rebooted") as rebooted:
        found = osutil.read_json(str(rebooted / "journal" / "mark.json"))
        assert found == doc
        assert [p.name for p in (rebooted / "journal").iterdir()] == ["mark.json"]
