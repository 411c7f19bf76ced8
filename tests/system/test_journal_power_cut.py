"""An overlay pin's checkpoint journal on a filesystem where one journal commit takes every
change made before it (ext4 here): a generation's files are written out (fsops.settle_at) and
committed with its rename, not synced with syncfs first, and a carried generation's moves are
not synced before its rename (fsops.ordered_at): ext4 commits them in order. A power cut (the device
image copied while ext4 commits only when asked: commit=600) after a checkpoint returned, or
between its steps, leaves the journal's newest complete generation whole: the layer as the
last checkpoint that returned read it, or the one after it once its generation was durable;
a log that only grew may be a longer prefix (its tail is appended to the last generation's
copy)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rampiped import durable, writeback
from rampiped.writeback import carry
from rampiped.writeback import journal as journal_module
from tests.system.helpers import LoopFs
from tests.system.test_copymode import make_loopfs_from

pytestmark = pytest.mark.system


def lines(n: int, start: int = 0) -> bytes:
    return b"".join(
        b"%08d a line of a log, as a logger writes it\n" % i for i in range(start, start + n)
    )


def tree_of(d: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def after(fn: Callable[..., Any], then: Callable[[], None]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kw: Any) -> Any:
        result = fn(*args, **kw)
        then()
        return result

    return wrapped


def test_a_power_cut_leaves_the_newest_generation_whole(
    loopfs: LoopFs, runtime_tmpfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subprocess.run(["mount", "-o", "remount,commit=600", str(loopfs.mountpoint)], check=True)
    assert durable.fsync_commits_all(str(loopfs.mountpoint))  # what this cuts
    upper = runtime_tmpfs / "upper"
    (upper / "kept").mkdir(parents=True)
    for i in range(10):
        (upper / f"f{i}").write_bytes(os.urandom(5_000 + i))
    for i in range(20):  # a directory that does not change: carried, not linked again
        (upper / "kept" / f"k{i}").write_bytes(os.urandom(300))
    for i in range(3):
        (upper / f"log{i}").write_bytes(lines(200, 1_000 * i))
    (upper / "link").symlink_to("a-target-too-long-for-the-inode-itself/" * 3)
    journal = loopfs.mountpoint / "journal"
    images: list[tuple[str, Path]] = []

    def cut(label: str) -> None:
        image = tmp_path / f"{len(images)}-{label}.img"
        subprocess.run(["cp", "--sparse=always", str(loopfs.image), str(image)], check=True)
        images.append((label, image))

    # the RAM side's clock before the layer is read, as a pin passes it: the next checkpoint
    # carries what did not change since
    first = writeback.checkpoint(str(upper), str(journal), taken_ns=time.time_ns())
    one = tree_of(upper)
    cut("first-returned")

    (upper / "f0").write_bytes(os.urandom(7_000))
    (upper / "f1").unlink()
    (upper / "new").write_bytes(os.urandom(9_000))
    for i in range(3):
        with open(upper / f"log{i}", "ab") as f:
            f.write(lines(50, 500_000 + 1_000 * i))
    (upper / "link2").symlink_to("another-target-too-long-for-the-inode/" * 3)
    two = tree_of(upper)
    monkeypatch.setattr(
        journal_module, "settle_at", after(journal_module.settle_at, lambda: cut("written"))
    )
    monkeypatch.setattr(carry, "ordered_at", after(carry.ordered_at, lambda: cut("carried")))
    second = writeback.checkpoint(
        str(upper), str(journal), ledger=first.ledger, taken_ns=time.time_ns()
    )
    cut("second-returned")
    monkeypatch.undo()  # reading a journal may carry out a plan: not cut again
    assert second.appended == 3, second
    assert [label for label, _ in images] == [
        "first-returned", "written", "carried", "second-returned",
    ]  # fmt: skip

    for label, image in images:
        with make_loopfs_from(image, tmp_path / f"rebooted-{label}") as rebooted:
            gen = writeback.latest_generation(str(rebooted / "journal"))
            assert gen is not None, label
            found = tree_of(Path(gen))
        image.unlink()
        if label in ("first-returned", "written"):  # gen-1, its logs perhaps longer
            assert found.keys() == one.keys(), label
            for rel, content in one.items():
                if rel.startswith("log"):
                    now = found[rel]
                    assert isinstance(now, bytes) and isinstance(content, bytes)
                    assert now.startswith(content), (label, rel)
                    assert two[rel].startswith(now), (label, rel)  # type: ignore[union-attr]
                else:
                    assert found[rel] == content, (label, rel)
        else:
            assert found == two, label
