"""Writing an overlay upper layer back to disk, against the real kernel.

Every change is made THROUGH a mounted overlay (the disk directory is the lower layer, reached
through a private bind, as a pin does it); the merged view's manifest is the oracle. After the
overlay is unmounted and its upper layer applied, the disk must show exactly that manifest,
also after the kernel dropped its caches."""

from __future__ import annotations

import mmap
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rampiped import mounts, writeback
from rampiped.ledger import Ledger
from rampiped.ledger import scan as ledger_scan
from rampiped.tree import walk as tree_walk
from rampiped.writeback import (
    JOURNAL_STASH,
    STASH_NAME,
    CommandResult,
    SyncError,
    apply_journal,
    apply_upper,
    carry,
    checkpoint,
    discard_journal,
    latest_generation,
    moves,
    run_command,
    verify_applied,
)
from tests.system import changes
from tests.system.changes import CHANGES, UID, populate, sh, write
from tests.system.helpers import (
    LoopFs,
    diff_manifests,
    drop_caches,
    drop_lone_link_groups,
    make_loopfs,
    manifest,
    unmount_tree,
    wait_for,
)

pytestmark = pytest.mark.system


def has_plan(stash: Path) -> bool:
    """Whether the stash of an apply holds its plan (in its attribute or its file)."""
    return moves._PLAN_XATTR in os.listxattr(stash) or (stash / "plan.json").exists()


def overlay_options(lower: str, upper: str, work: str) -> str:
    """The -o argument of the `mount -t overlay` calls here: the daemon's own option string
    (mounts.overlay_options with writeback.OVERLAY_FEATURES), for paths that also pass through
    mount(8)'s command line unescaped (ValueError otherwise)."""
    for role, path in (("lowerdir", lower), ("upperdir", upper), ("workdir", work)):
        if not os.path.isabs(path):
            raise ValueError(f"overlay {role} must be an absolute path: {path!r}")
        bad = sorted({c for c in path if c in ",:\\" or c.isspace() or ord(c) < 32})
        if bad:
            raise ValueError(f"overlay {role} {path!r} contains {bad}")
    return mounts.overlay_options(
        lower=lower, upper=upper, work=work, features=writeback.OVERLAY_FEATURES
    )


def oracle(root: Path) -> dict[str, Any]:
    return drop_lone_link_groups(manifest(root))


@dataclass
class Pin:
    """A disk directory covered by an overlay the way rampiped pins one: lowerdir = a private
    bind of the directory, upper and work on a tmpfs, the overlay mounted over the directory."""

    disk: Path
    staging: Path
    ram: Path

    @property
    def upper(self) -> Path:
        return self.ram / "upper"

    @property
    def work(self) -> Path:
        return self.ram / "work"

    def mount(self, ram_size: str = "256m") -> None:
        self.staging.mkdir(exist_ok=True)
        self.ram.mkdir(exist_ok=True)
        sh("mount", "--bind", self.disk, self.staging)
        sh("mount", "--make-private", self.staging)
        sh("mount", "-t", "tmpfs", "-o", f"size={ram_size},mode=0700", "rp-test-ram", self.ram)
        self.upper.mkdir()
        self.work.mkdir()
        st = os.stat(self.disk)  # the merged root shows the upper root's owner and mode
        os.chown(self.upper, st.st_uid, st.st_gid)
        os.chmod(self.upper, stat.S_IMODE(st.st_mode))
        opts = overlay_options(str(self.staging), str(self.upper), str(self.work))
        sh("mount", "-t", "overlay", "rp-test", "-o", opts, self.disk)

    def unmount_overlay(self) -> None:
        sh("umount", self.disk)
        sh("umount", self.staging)

    def power_cut(self) -> None:
        """The overlay and the RAM are gone, nothing was applied."""
        self.unmount_overlay()
        sh("umount", self.ram)

    def cleanup(self) -> None:
        unmount_tree(self.disk)
        unmount_tree(self.staging)
        unmount_tree(self.ram)


@pytest.fixture
def pin(loopfs: LoopFs, tmp_path: Path) -> Iterator[Pin]:
    disk = loopfs.mountpoint / "data"
    disk.mkdir()
    p = Pin(disk, tmp_path / "staging", tmp_path / "ram")
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the pinned tree that planted symlinks point at."""
    d = tmp_path / "outside"
    d.mkdir()
    write(d / "victim", "must survive")
    return d


def apply_and_check(pin: Pin, before: dict[str, Any], outside: Path) -> writeback.ApplyResult:
    result = apply_upper(str(pin.upper), str(pin.disk))
    assert diff_manifests(before, oracle(pin.disk)) == []
    drop_caches()
    assert diff_manifests(before, oracle(pin.disk)) == []
    assert (outside / "victim").read_text() == "must survive"
    assert sorted(os.listdir(outside)) == ["victim"]
    return result


@pytest.mark.parametrize("change", ["all", *CHANGES])
def test_apply_reproduces_the_merged_view(pin: Pin, outside: Path, change: str) -> None:
    populate(pin.disk, outside)
    original = oracle(pin.disk)
    pin.mount()
    for name, fn in CHANGES.items():
        if change in ("all", name):
            fn(pin.disk)
    before = oracle(pin.disk)
    assert diff_manifests(original, before) != []  # the change is visible in the merged view
    upper_before = manifest(pin.upper)
    pin.unmount_overlay()
    result = apply_and_check(pin, before, outside)
    assert manifest(pin.upper) == upper_before  # apply never writes into the layer
    assert result.seconds > 0
    if change == "all":
        assert result.deleted > 0 and result.files > 10 and result.bytes > 0


def test_redirects_as_the_kernel_writes_them(pin: Pin, outside: Path) -> None:
    """The redirect values apply_upper relies on, as this kernel records them."""
    populate(pin.disk, outside)
    pin.mount()
    changes.ch_dir_rename(pin.disk)
    changes.ch_rename_renamed(pin.disk)
    changes.ch_rename_into_new_subdir(pin.disk)
    changes.ch_nested_renames(pin.disk)
    pin.unmount_overlay()

    def redirect(rel: str) -> bytes:
        return os.getxattr(pin.upper / rel, "trusted.overlay.redirect")

    assert redirect("rdir/tree_renamed") == b"tree"  # same directory: relative
    assert redirect("rr_t3") == b"/rr/t1"  # the lower path, not the intermediate name
    assert redirect("rsub/newsub/deeper/moved") == b"/rsub/moved"
    assert redirect("nest/outer2") == b"outer"
    assert redirect("nest/inner_moved") == b"/nest/outer/inner"
    assert os.getxattr(pin.upper / "rsub/newsub", "trusted.overlay.opaque") == b"y"
    wh = os.lstat(pin.upper / "rdir/tree")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0


def test_applying_twice_changes_nothing_more(pin: Pin, outside: Path) -> None:
    populate(pin.disk, outside)
    pin.mount()
    changes.ch_metadata(pin.disk)
    changes.ch_nested_delete(pin.disk)
    changes.ch_opaque(pin.disk)
    before = oracle(pin.disk)
    pin.unmount_overlay()
    apply_and_check(pin, before, outside)
    # No directory was renamed: a second apply of the same layer is a plain repeat.
    apply_and_check(pin, before, outside)


# --- resuming and failing -----------------------------------------------------------------


class PowerCut(BaseException):
    """Stands for the process dying: no handler of ordinary exceptions runs."""


def cut_at_rsync(argv: list[str]) -> CommandResult:
    """A runner under which the process dies when the apply starts rsync."""
    if argv[1:] == ["--version"]:
        return run_command(argv)
    raise PowerCut


def test_interrupted_apply_resumes_without_moving_twice(pin: Pin, outside: Path) -> None:
    populate(pin.disk, outside)
    pin.mount()
    changes.ch_swap(pin.disk)
    changes.ch_nested_renames(pin.disk)
    changes.ch_dir_rename(pin.disk)
    before = oracle(pin.disk)
    pin.unmount_overlay()

    with pytest.raises(PowerCut):
        apply_upper(str(pin.upper), str(pin.disk), runner=cut_at_rsync)
    assert has_plan(pin.disk / STASH_NAME)
    # The swap already happened on disk: a fresh start would swap again.
    assert (pin.disk / "swap/a/fb").exists()
    apply_and_check(pin, before, outside)
    assert not (pin.disk / STASH_NAME).exists()


def test_a_leftover_of_another_layer_is_refused(pin: Pin, outside: Path, tmp_path: Path) -> None:
    populate(pin.disk, outside)
    pin.mount()
    changes.ch_swap(pin.disk)
    (pin.disk / "made").mkdir()  # something rsync writes: the cut comes when it starts
    pin.unmount_overlay()

    with pytest.raises(PowerCut):
        apply_upper(str(pin.upper), str(pin.disk), runner=cut_at_rsync)
    half = manifest(pin.disk)
    other = tmp_path / "other-layer"
    write(other / "swap/new", "x")
    with pytest.raises(SyncError, match="interrupted write-back of another layer"):
        apply_upper(str(other), str(pin.disk))
    assert manifest(pin.disk) == half


def fake_rsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    script = bindir / "rsync"
    script.write_text(f"#!/bin/sh\necho 'rsync: write failed: fake failure' >&2\nexit {code}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")


def test_rsync_failure_is_reported_and_renames_are_undone(
    pin: Pin, outside: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(pin.disk, outside)
    original = oracle(pin.disk)
    pin.mount()
    changes.ch_swap(pin.disk)
    changes.ch_dir_rename(pin.disk)
    changes.ch_rename_into_new_subdir(pin.disk)
    before = oracle(pin.disk)
    pin.unmount_overlay()
    fake_rsync(tmp_path, monkeypatch, 12)
    with pytest.raises(SyncError) as info:
        apply_upper(str(pin.upper), str(pin.disk))
    message = str(info.value)
    assert "`rsync -aHAX --no-inc-recursive --numeric-ids --ignore-times" in message
    assert f"{pin.upper}/ {pin.disk}/`" in message
    assert "exited with code 12 (error in the rsync protocol data stream" in message
    assert "fake failure" in message
    assert "moved back" in message
    assert info.value.returncode == 12
    # The renamed directories are where the layer expects them again: the same layer can be
    # mounted over the directory, and shows the same merged view. Only the parents made for a
    # move into a new directory stay (empty, and hidden under the layer's opaque directory).
    assert diff_manifests(original, oracle(pin.disk)) == [
        "+ rsub/newsub: {'mode': 448, 'uid': 0, 'gid': 0, 'xattrs': {}, 'type': 'dir'}",
        "+ rsub/newsub/deeper: {'mode': 448, 'uid': 0, 'gid': 0, 'xattrs': {}, 'type': 'dir'}",
    ]
    assert not (pin.disk / STASH_NAME).exists()
    pin.staging.mkdir(exist_ok=True)
    sh("mount", "--bind", pin.disk, pin.staging)
    opts = overlay_options(str(pin.staging), str(pin.upper), str(pin.work))
    sh("mount", "-t", "overlay", "rp-test", "-o", opts, pin.disk)
    assert diff_manifests(before, oracle(pin.disk)) == []
    pin.unmount_overlay()
    monkeypatch.undo()
    apply_and_check(pin, before, outside)


def test_rsync_missing_is_named(pin: Pin, monkeypatch: pytest.MonkeyPatch) -> None:
    write(pin.disk / "f", "x")
    layer = pin.disk.parent / "layer"
    write(layer / "g", "y")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SyncError, match="rsync is not installed"):
        apply_upper(str(layer), str(pin.disk))
    assert sorted(os.listdir(pin.disk)) == ["f"]


def test_disk_full_is_named_and_the_layer_untouched(tmp_path: Path, outside: Path) -> None:
    with make_loopfs(tmp_path / "small", size_mb=8) as fs:
        disk = fs.mountpoint / "data"
        disk.mkdir()
        write(disk / "big", "original\n")
        write(disk / "other", "other\n")
        p = Pin(disk, tmp_path / "staging", tmp_path / "ram")
        try:
            p.mount()
            with open(disk / "big", "wb") as f:
                f.write(os.urandom(16 * 1024 * 1024))
            write(disk / "small-new", "fits")
            p.unmount_overlay()
            upper_before = manifest(p.upper)
            with pytest.raises(SyncError) as info:
                apply_upper(str(p.upper), str(disk))
            message = str(info.value)
            assert "the disk is full (No space left on device)" in message
            assert "`rsync -aHAX" in message
            assert manifest(p.upper) == upper_before
            assert (disk / "big").read_text() == "original\n"  # never replaced by a partial
            # rsync removed its temporary file; what fitted may have been written
            assert set(os.listdir(disk)) - {"small-new"} == {"big", "other"}
        finally:
            p.cleanup()


# --- refusals ------------------------------------------------------------------------------


def test_empty_layer_changes_nothing(pin: Pin, outside: Path) -> None:
    populate(pin.disk, outside)
    before = manifest(pin.disk, dir_times=True)
    pin.mount()
    pin.unmount_overlay()
    assert os.listdir(pin.upper) == []
    result = apply_upper(str(pin.upper), str(pin.disk))
    assert (result.files, result.bytes, result.deleted) == (0, 0, 0)
    assert diff_manifests(before, manifest(pin.disk, dir_times=True)) == []


def _by_layer(path: Path) -> None:
    (path / "sub").chmod(0o700)


def _new_xattr(path: Path) -> None:
    os.setxattr(path / "sub", "user.note", b"set in RAM")


APPLY_CASES: dict[str, tuple[Callable[[Path], None], bool]] = {
    # what is changed through the overlay, and whether rsync has work then
    "file-deleted": (lambda p: (p / "sub" / "a").unlink(), False),
    "directory-deleted": (lambda p: shutil.rmtree(p / "gone"), False),
    "directory-mode": (_by_layer, True),
    "directory-xattr": (_new_xattr, True),
    "directory-made": (lambda p: (p / "new").mkdir(), True),
    "fifo-made": (lambda p: os.mkfifo(p / "pipe"), True),
    "file-written": (lambda p: (p / "sub" / "a").write_text("changed\n"), True),
    # an xattr of the top directory on disk that the view's does not have (the layer's top
    # directory is the view's), and a deletion
    "top-xattr": (lambda p: (p / "sub" / "a").unlink(), True),
}


@pytest.mark.parametrize("case", APPLY_CASES)
def test_rsync_is_started_only_when_it_has_work(pin: Pin, case: str) -> None:
    """Changes that leave rsync nothing to write (deletions, whose directories the disk
    holds as the layer does) are applied without starting it; any other change starts it.
    Either way the disk shows the view."""
    (pin.disk / "sub").mkdir()
    (pin.disk / "sub" / "a").write_text("a\n")
    (pin.disk / "gone").mkdir()
    (pin.disk / "gone" / "x").write_text("x\n")
    if case == "top-xattr":
        os.setxattr(pin.disk, "user.top", b"disk")
    pin.mount()
    change, has_work = APPLY_CASES[case]
    change(pin.disk)
    view = manifest(pin.disk, dir_times=True)
    pin.unmount_overlay()
    started: list[list[str]] = []

    def runner(argv: list[str]) -> CommandResult:
        if argv[0] == "rsync" and "--version" not in argv:
            started.append(argv)
        return run_command(argv)

    apply_upper(str(pin.upper), str(pin.disk), runner=runner)
    assert (len(started) == 1) == has_work, started
    drop_caches()
    assert diff_manifests(view, manifest(pin.disk, dir_times=True)) == []


def test_missing_or_odd_layer_is_refused(pin: Pin, outside: Path, tmp_path: Path) -> None:
    populate(pin.disk, outside)
    before = manifest(pin.disk)
    with pytest.raises(SyncError, match="does not exist"):
        apply_upper(str(tmp_path / "nowhere"), str(pin.disk))
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(SyncError, match="not a directory"):
        apply_upper(str(tmp_path / "link"), str(pin.disk))
    write(tmp_path / "afile", "x")
    with pytest.raises(SyncError, match="not a directory"):
        apply_upper(str(tmp_path / "afile"), str(pin.disk))
    with pytest.raises(SyncError, match="overlap"):
        apply_upper(str(pin.disk / "keep"), str(pin.disk))
    assert manifest(pin.disk) == before


def whiteout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def test_device_node_in_layer_is_refused_before_anything(
    pin: Pin, outside: Path, tmp_path: Path
) -> None:
    populate(pin.disk, outside)
    before = manifest(pin.disk)
    layer = tmp_path / "layer"
    whiteout(layer / "keep/file")  # would delete, if anything were applied
    write(layer / "newfile", "x")
    os.mknod(layer / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(SyncError, match=r"nothing was changed.*device node \(chardev 1:3\)"):
        apply_upper(str(layer), str(pin.disk))
    assert manifest(pin.disk) == before


def test_metacopy_layer_is_refused(pin: Pin, outside: Path, tmp_path: Path) -> None:
    populate(pin.disk, outside)
    before = manifest(pin.disk)
    layer = tmp_path / "layer"
    write(layer / "keep/file", "")
    os.setxattr(layer / "keep/file", "trusted.overlay.metacopy", b"")
    with pytest.raises(SyncError, match="metacopy"):
        apply_upper(str(layer), str(pin.disk))
    assert manifest(pin.disk) == before


def test_layer_of_another_directory_is_refused(pin: Pin, outside: Path, tmp_path: Path) -> None:
    populate(pin.disk, outside)
    before = manifest(pin.disk)
    layer = tmp_path / "layer"
    (layer / "moved").mkdir(parents=True)
    os.setxattr(layer / "moved", "trusted.overlay.redirect", b"/no/such/dir")
    whiteout(layer / "keep/file")
    with pytest.raises(SyncError, match="came from 'no/such/dir'"):
        apply_upper(str(layer), str(pin.disk))
    assert manifest(pin.disk) == before


def test_planted_symlinks_are_never_followed(pin: Pin, outside: Path, tmp_path: Path) -> None:
    """A crafted layer (a tampered journal, say) against symlinks planted on disk: deletions
    and copies stay inside the tree."""
    write(outside / "sub/victim", "must survive")
    os.symlink(outside, pin.disk / "trap_dir")
    os.symlink(outside, pin.disk / "trap_opaque")
    os.symlink(outside, pin.disk / "trap_whiteout")
    os.symlink(outside, pin.disk / "trap_redirect_parent")
    layer = tmp_path / "layer"
    whiteout(layer / "trap_dir/victim")
    write(layer / "trap_dir/planted", "x")
    (layer / "trap_opaque").mkdir()
    os.setxattr(layer / "trap_opaque", "trusted.overlay.opaque", b"y")
    whiteout(layer / "trap_whiteout")
    (layer / "trap_redirect_parent/sub").mkdir(parents=True)
    write(layer / "trap_redirect_parent/sub/planted", "x")
    apply_upper(str(layer), str(pin.disk))
    assert sorted(os.listdir(outside)) == ["sub", "victim"]
    assert (outside / "victim").read_text() == "must survive"
    assert (outside / "sub/victim").read_text() == "must survive"
    assert sorted(os.listdir(outside / "sub")) == ["victim"]
    assert (pin.disk / "trap_dir").is_dir() and not (pin.disk / "trap_dir").is_symlink()
    assert os.listdir(pin.disk / "trap_dir") == ["planted"]
    assert os.listdir(pin.disk / "trap_opaque") == []
    assert not os.path.lexists(pin.disk / "trap_whiteout")


def test_redirect_through_a_planted_symlink_is_refused(
    pin: Pin, outside: Path, tmp_path: Path
) -> None:
    os.symlink(outside, pin.disk / "trap")
    layer = tmp_path / "layer"
    (layer / "stolen").mkdir(parents=True)
    os.setxattr(layer / "stolen", "trusted.overlay.redirect", b"/trap/sub")
    (outside / "sub").mkdir()
    with pytest.raises(SyncError, match="not a directory on disk"):
        apply_upper(str(layer), str(pin.disk))
    assert (outside / "sub").is_dir()


def test_verify_reports_differences(pin: Pin, outside: Path) -> None:
    populate(pin.disk, outside)
    pin.mount()
    changes.ch_metadata(pin.disk)
    changes.ch_nested_delete(pin.disk)
    changes.ch_file_to_symlink(pin.disk)
    pin.unmount_overlay()
    problems = verify_applied(str(pin.upper), str(pin.disk))
    text = "\n".join(problems)
    assert "meta/m_chmod: mode 0o644 on disk, 0o600 in the layer" in text
    assert f"meta/m_chown: uid 0 on disk, {UID} in the layer" in text
    assert "del/nested/a/b/file1: deleted in the layer, still on disk (file)" in text
    assert "del/nested/gone: deleted in the layer, still on disk (dir)" in text
    assert "f2l: file on disk, symlink in the layer" in text
    assert "meta/m_xattr: xattrs differ: ['user.k']" in text
    apply_upper(str(pin.upper), str(pin.disk))
    assert verify_applied(str(pin.upper), str(pin.disk)) == []


# --- the checkpoint journal ------------------------------------------------------------------


def test_journal_survives_a_power_cut(pin: Pin, outside: Path, loopfs: LoopFs) -> None:
    journal = loopfs.mountpoint / "journal" / "data"
    populate(pin.disk, outside)
    pin.mount()
    write(pin.disk / "new/unchanged", "written once\n" * 1000)
    write(pin.disk / "new/changing", "first\n")
    changes.ch_dir_rename(pin.disk)
    changes.ch_nested_delete(pin.disk)
    changes.ch_metadata(pin.disk)
    first = checkpoint(str(pin.upper), str(journal))
    assert first.generation == 1
    assert first.files > 0 and first.bytes >= len("written once\n" * 1000)
    gen1 = Path(latest_generation(str(journal)) or "")
    assert gen1 == journal / "gen-1"
    ino_unchanged = os.lstat(gen1 / "new/unchanged").st_ino
    ino_changing = os.lstat(gen1 / "new/changing").st_ino

    write(pin.disk / "new/changing", "second, longer\n")
    changes.ch_swap(pin.disk)
    changes.ch_opaque(pin.disk)
    changes.ch_file_to_dir(pin.disk)
    second = checkpoint(str(pin.upper), str(journal), ledger=first.ledger)
    assert second.generation == 2
    assert sorted(os.listdir(journal)) == ["gen-2"]
    gen2 = journal / "gen-2"
    assert os.lstat(gen2 / "new/unchanged").st_ino == ino_unchanged  # hard-linked, not copied
    assert os.lstat(gen2 / "new/changing").st_ino != ino_changing
    assert second.files < first.files + 4
    # A faithful copy of the layer: whiteouts and overlay attributes kept.
    wh = os.lstat(gen2 / "del/nested/gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(gen2 / "rdir/tree_renamed", "trusted.overlay.redirect") == b"tree"
    assert os.getxattr(gen2 / "opq", "trusted.overlay.opaque") == b"y"
    at_checkpoint = oracle(pin.disk)

    write(pin.disk / "after/lost", "written after the last checkpoint")
    os.unlink(pin.disk / "keep/file")
    pin.power_cut()
    # A checkpoint cut short: a partial generation that must be ignored.
    partial = journal / "gen-3.tmp"
    whiteout(partial / "keep/sub")
    write(partial / "junk", "half written")

    result = apply_journal(str(journal), str(pin.disk))
    assert result is not None and result.files > 0
    assert diff_manifests(at_checkpoint, oracle(pin.disk)) == []
    drop_caches()
    assert diff_manifests(at_checkpoint, oracle(pin.disk)) == []
    assert os.listdir(journal) == []
    assert apply_journal(str(journal), str(pin.disk)) is None


def test_next_checkpoint_removes_a_partial_generation(pin: Pin, loopfs: LoopFs) -> None:
    journal = loopfs.mountpoint / "journal"
    write(pin.disk / "f", "x")
    pin.mount()
    write(pin.disk / "g", "y")
    checkpoint(str(pin.upper), str(journal))
    write(journal / "gen-2.tmp/junk", "half")
    write(journal / "gen-7.tmp/junk", "half")
    assert latest_generation(str(journal)) == str(journal / "gen-1")
    result = checkpoint(str(pin.upper), str(journal))
    assert result.generation == 2
    assert sorted(os.listdir(journal)) == ["gen-2"]
    assert (journal / "gen-2/g").read_text() == "y"
    pin.unmount_overlay()
    discard_journal(str(journal))
    assert os.listdir(journal) == []
    assert latest_generation(str(journal)) is None


def test_journal_inside_the_pinned_tree_is_refused(pin: Pin, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not be inside the pinned directory"):
        apply_journal(str(pin.disk / "journal"), str(pin.disk))
    with pytest.raises(ValueError, match="must not be inside the pinned directory"):
        apply_journal(str(pin.disk), str(pin.disk))
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ValueError, match="must not be inside the layer"):
        checkpoint(str(layer), str(layer / "journal"))


@pytest.mark.parametrize("linked", [False, True])
def test_interrupted_journal_apply_resumes(
    pin: Pin, outside: Path, loopfs: LoopFs, linked: bool
) -> None:
    """A cut during the apply at start-up: the generation stays, and applying it again
    finishes the job without moving renamed directories twice. With a route that reaches the
    journal and the directory through one private copy of their mount (`linked`, as an unpin
    and a start-up have), renamed directories wait in the journal (JOURNAL_STASH), never
    under a name in the directory."""
    journal = loopfs.mountpoint / "journal"
    populate(pin.disk, outside)
    pin.mount()
    changes.ch_swap(pin.disk)
    changes.ch_rename_renamed(pin.disk)
    changes.ch_delete_in_renamed(pin.disk)
    (pin.disk / "made").mkdir()  # something rsync writes: the cut comes when it starts
    checkpoint(str(pin.upper), str(journal))
    at_checkpoint = oracle(pin.disk)
    pin.power_cut()
    root = mounts.clone_mount(str(loopfs.mountpoint))
    try:

        def route(gen: str) -> writeback.LinkRoute:
            return writeback.LinkRoute(root, f"journal/{os.path.basename(gen)}", "data")

        link = route if linked else None
        with pytest.raises(PowerCut):
            apply_journal(str(journal), str(pin.disk), runner=cut_at_rsync, link=link)
        assert latest_generation(str(journal)) is not None
        stash = journal / JOURNAL_STASH if linked else pin.disk / STASH_NAME
        assert has_plan(stash)
        assert (pin.disk / STASH_NAME).exists() == (not linked)
        assert (pin.disk / "swap/a/fb").exists()  # swapped already: not to be swapped again
        result = apply_journal(str(journal), str(pin.disk), link=link)
    finally:
        os.close(root)
    assert result is not None
    assert diff_manifests(at_checkpoint, oracle(pin.disk)) == []
    assert not (journal / JOURNAL_STASH).exists()
    assert not (pin.disk / STASH_NAME).exists()


def test_checkpoint_failure_keeps_the_last_generation(
    pin: Pin, loopfs: LoopFs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = loopfs.mountpoint / "journal"
    pin.mount()
    write(pin.disk / "a", "a")
    checkpoint(str(pin.upper), str(journal))
    write(pin.disk / "b", "b")
    fake_rsync(tmp_path, monkeypatch, 11)
    with pytest.raises(SyncError, match=r"exited with code 11 \(error in file I/O"):
        checkpoint(str(pin.upper), str(journal))
    assert latest_generation(str(journal)) == str(journal / "gen-1")
    pin.unmount_overlay()


# --- small pieces ------------------------------------------------------------------------------


def test_overlay_options() -> None:
    assert overlay_options("/l", "/u", "/w") == (
        "lowerdir=/l,upperdir=/u,workdir=/w,redirect_dir=on,index=off,metacopy=off,xino=off"
    )
    for bad in ("/a,b", "/a:b", "relative", "/a b"):
        with pytest.raises(ValueError):
            overlay_options(bad, "/u", "/w")


def test_describe_exit() -> None:
    assert writeback.describe_exit(23).startswith("exited with code 23 (partial transfer")
    assert writeback.describe_exit(24) == (
        "exited with code 24 (partial transfer due to vanished source files)"
    )
    assert writeback.describe_exit(-9) == "was killed by SIGKILL"
    err = SyncError.from_command(
        "write-back", ["rsync", "a b"], CommandResult(11, "", "x\nNo space left on device (28)\n")
    )
    assert "`rsync 'a b'` exited with code 11" in str(err)
    assert "the disk is full" in str(err)


def test_run_command_reports_a_missing_program() -> None:
    result = run_command(["/nonexistent/rsync", "--version"])
    assert result.returncode == 127
    assert "command not found" in result.stderr


# --- written below the overlay before its unmount ---------------------------------------------


@pytest.mark.parametrize("change", ["all", *CHANGES])
def test_written_below_the_overlay_at_the_origins(pin: Pin, outside: Path, change: str) -> None:
    """What an unpin writes before its unmount (OverlayMode.write_early): the layer with its
    renamed directories at their origins, applied into the directory below the overlay while
    the overlay is mounted. The view does not change, also after the kernel dropped its
    caches and looks every name up again (a redirect to an origin that was written into);
    after the unmount the apply of the layer itself (the moves) gives the disk the view."""
    populate(pin.disk, outside)
    pin.mount()
    for name, fn in CHANGES.items():
        if change in ("all", name):
            fn(pin.disk)
    before = oracle(pin.disk)
    dest = pin.ram / "at-origins"
    view = writeback.at_origins(str(pin.upper), str(dest))
    assert view is not None  # each of these can go to its origins first
    if change in ("all", "dir_rename", "swap", "nested_renames"):
        assert view.path != str(pin.upper)
    writeback.apply_layer(view.path, str(pin.staging), run_command, keep_plan=False)
    assert diff_manifests(before, oracle(pin.disk)) == []
    drop_caches()
    assert diff_manifests(before, oracle(pin.disk)) == []
    if view.path != str(pin.upper):
        shutil.rmtree(view.path)
    pin.unmount_overlay()
    apply_and_check(pin, before, outside)


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_new_entry_at_a_renamed_directorys_old_name(pin: Pin, outside: Path, kind: str) -> None:
    """A directory renamed, then a new directory or file made under its old name: both would
    go to one place below the overlay, so that layer is not written there first (None, and
    nothing made); its apply after the unmount writes it all."""
    (pin.disk / "old").mkdir()
    write(pin.disk / "old/kept", "from disk")
    pin.mount()
    (pin.disk / "old").rename(pin.disk / "new")
    write(pin.disk / "new/added", "in RAM")
    if kind == "dir":
        (pin.disk / "old").mkdir()
        write(pin.disk / "old/x", "a new directory at the old name")
    else:
        write(pin.disk / "old", "a new file at the old name")
    before = oracle(pin.disk)
    dest = pin.ram / "at-origins"
    assert writeback.at_origins(str(pin.upper), str(dest)) is None
    assert not dest.exists()
    pin.unmount_overlay()
    apply_and_check(pin, before, outside)


# --- directories carried whole from one generation into the next (writeback/carry.py) ---------


def ram_clock(pin: Pin) -> int:
    """The RAM side's clock now (as PinManager.ram_clock_ns reads it)."""
    probe = pin.ram / ".clock"
    probe.write_text("")
    return os.stat(probe).st_ctime_ns


def many_dirs(root: Path, n: int = 10) -> None:
    for i in range(n):
        for j in range(5):
            write(root / f"d{i}" / f"f{j}", f"{i} {j}\n")
        (root / f"d{i}" / "deep").mkdir()
        write(root / f"d{i}" / "deep" / "x", f"deep {i}\n")


def checkpoint_twice(
    pin: Pin, journal: Path, change: Callable[[Path], None]
) -> tuple[dict[str, int], writeback.CheckpointResult]:
    """Every directory of the layer in RAM, a first checkpoint (which records the clock), then
    `change` through the overlay and a second checkpoint with the first's ledger. Returns the
    inodes of the first generation's entries, read before the second."""
    pin.mount()
    many_dirs(pin.disk)
    for i in range(10):  # no regular file: what is in them is told by the directory alone
        (pin.disk / f"d{i}" / "links").mkdir()
        os.symlink(f"target {i}", pin.disk / f"d{i}" / "links" / "link")
    last = max(st.st_ctime_ns for _rel, st in tree_walk(str(pin.upper)))
    wait_for(lambda: ram_clock(pin) > last, 5, "the next tick of the RAM side's clock")
    first = checkpoint(str(pin.upper), str(journal), taken_ns=ram_clock(pin))
    assert first.ledger is not None and first.ledger.taken_ns
    gen1 = journal / "gen-1"
    inodes = {rel: st.st_ino for rel, st in tree_walk(str(gen1))}
    change(pin.disk)
    second = checkpoint(str(pin.upper), str(journal), ledger=first.ledger, taken_ns=ram_clock(pin))
    assert second.generation == 2
    return inodes, second


def test_a_checkpoint_keeps_what_did_not_change_in_place(
    pin: Pin, outside: Path, loopfs: LoopFs
) -> None:
    """The new generation is the last one with what changed replaced in place: a directory
    nothing changed in since the last generation was read stays where it is (the same inode,
    nothing linked again), and so does every file of a directory that changed. What changed
    is new: a changed file, one changed through a shared mapping (no ctime), a directory whose
    mode changed. The generation is the layer all the same: its root has the layer root's
    times, and applied it gives the disk the view."""
    journal = loopfs.mountpoint / "journal"

    def change(m: Path) -> None:
        write(m / "d3" / "f1", "changed\n")
        with open(m / "d5" / "f2", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            assert mm[0:1] == b"5"  # read first: tmpfs maps the page writable at once
            mm[0:1] = b"M"  # so the store sets no ctime on the upper file
        os.chmod(m / "d7" / "deep", 0o700)

    inodes, second = checkpoint_twice(pin, journal, change)
    gen2 = journal / "gen-2"
    assert sorted(os.listdir(journal)) == ["gen-2"]
    now = {rel: st.st_ino for rel, st in tree_walk(str(gen2))}
    assert now.keys() == inodes.keys()
    assert {rel for rel in now if now[rel] != inodes[rel]} == {"d3/f1", "d5/f2", "d7/deep"}
    assert second.files <= 3
    st_up, st_gen = os.lstat(pin.upper), os.lstat(gen2)
    assert st_gen.st_mtime_ns == st_up.st_mtime_ns
    at_checkpoint = oracle(pin.disk)
    assert (pin.disk / "d5" / "f2").read_bytes()[:1] == b"M"
    pin.power_cut()
    assert apply_journal(str(journal), str(pin.disk)) is not None
    drop_caches()
    assert diff_manifests(at_checkpoint, oracle(pin.disk)) == []


@pytest.mark.parametrize("stage", ["checkpoint:carrying", "checkpoint:carried-one"])
def test_a_carry_cut_short_is_finished_by_the_next_reader(
    pin: Pin, loopfs: LoopFs, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """The process dies after the new generation's part was renamed to gen-2.carry (nothing
    replaced yet) or after one entry of gen-1 was replaced: the journal's next reader finishes
    the plan, and the generation applied is the layer at the checkpoint, whole."""
    journal = loopfs.mountpoint / "journal"

    def cut(point: str) -> None:
        if point == stage:
            raise PowerCut

    def change(m: Path) -> None:
        monkeypatch.setattr(carry, "pause_point", cut)
        write(m / "d2" / "f0", "changed\n")

    with pytest.raises(PowerCut):
        checkpoint_twice(pin, journal, change)
    assert (journal / "gen-2.carry").is_dir() and (journal / "gen-1").is_dir()
    monkeypatch.setattr(carry, "pause_point", lambda _point: None)
    at_checkpoint = oracle(pin.disk)
    pin.power_cut()
    assert latest_generation(str(journal)) == str(journal / "gen-2")
    assert not (journal / "gen-2.carry.json").exists()
    assert apply_journal(str(journal), str(pin.disk)) is not None
    assert diff_manifests(at_checkpoint, oracle(pin.disk)) == []


def test_directories_swapped_since_are_not_carried_by_their_old_paths(
    pin: Pin, loopfs: LoopFs
) -> None:
    """Two directories swapped through the overlay since the last generation: the swap sets
    the ctime of the two moved, not of what is below them, so `d1/links` (a symlink, no file
    whose content would tell) looks untouched while it is now the former `d2/links`. It is
    another directory (another inode) than the one the last generation holds at that path,
    and is not carried from there."""
    journal = loopfs.mountpoint / "journal"

    def swap(m: Path) -> None:
        os.rename(m / "d1", m / "swapping")
        os.rename(m / "d2", m / "d1")
        os.rename(m / "swapping", m / "d2")

    checkpoint_twice(pin, journal, swap)
    gen2 = journal / "gen-2"
    assert (gen2 / "d1/deep/x").read_text() == "deep 2\n"
    assert os.readlink(gen2 / "d1/links/link") == "target 2"
    assert os.readlink(gen2 / "d2/links/link") == "target 1"
    at_checkpoint = oracle(pin.disk)
    pin.power_cut()
    assert apply_journal(str(journal), str(pin.disk)) is not None
    assert diff_manifests(at_checkpoint, oracle(pin.disk)) == []


@pytest.mark.parametrize("cut_after", range(7))
def test_a_plan_cut_after_any_step_is_finished_once(
    pin: Pin, loopfs: LoopFs, monkeypatch: pytest.MonkeyPatch, cut_after: int
) -> None:
    """Every kind of replacement (a file changed in a directory kept in place, a new and a
    removed file, a directory replaced, one removed, one made): the process dies after any of
    them, then the next reader finishes the plan, each step once, and the generation is the
    layer at the checkpoint."""
    journal = loopfs.mountpoint / "journal"
    real = carry._replace
    done = 0

    def counting(*args: Any) -> None:
        nonlocal done
        real(*args)
        done += 1
        if done == cut_after + 1:
            raise PowerCut

    def change(m: Path) -> None:
        monkeypatch.setattr(carry, "_replace", counting)
        write(m / "d3" / "f1", "changed\n")
        write(m / "new-file", "new\n")
        os.unlink(m / "d2" / "f0")
        os.chmod(m / "d7" / "deep", 0o700)
        shutil.rmtree(m / "d9")
        write(m / "fresh" / "f", "in a new directory\n")
        os.unlink(m / "d4" / "links" / "link")
        os.symlink("elsewhere", m / "d4" / "links" / "link")

    with pytest.raises(PowerCut):
        checkpoint_twice(pin, journal, change)
    monkeypatch.setattr(carry, "_replace", real)
    at_checkpoint = oracle(pin.disk)
    pin.power_cut()
    assert latest_generation(str(journal)) == str(journal / "gen-2")
    assert sorted(os.listdir(journal)) == ["gen-2"]
    assert apply_journal(str(journal), str(pin.disk)) is not None
    assert diff_manifests(at_checkpoint, oracle(pin.disk)) == []


def test_a_kept_directory_is_never_reached_through_a_symlink(tmp_path: Path) -> None:
    """A directory is kept from the last generation only where that generation holds it as a
    real directory: reached through a symlink there (a layer whose directory was swapped for a
    symlink while the last checkpoint copied it), it is not kept, and nothing outside the
    journal is looked at as if it were the generation."""
    upper, previous, outside = tmp_path / "upper", tmp_path / "gen-1", tmp_path / "outside"
    (upper / "x" / "t").mkdir(parents=True)
    write(upper / "x" / "t" / "f", "in RAM\n")
    (outside / "t").mkdir(parents=True)
    previous.mkdir()
    os.symlink(outside, previous / "x")
    found = ledger_scan(str(upper))
    ledger = Ledger.of(found)
    ledger.taken_ns = time.time_ns() + 10**9  # nothing below changed since, by the clock
    ledger.dirs = {"x": 0, "x/t": os.lstat(upper / "x" / "t").st_ino}  # x is another one
    kept, _dirs = carry.survey(str(upper), ledger, found, str(previous))
    assert kept == []
    os.unlink(previous / "x")
    (previous / "x" / "t").mkdir(parents=True)
    assert carry.survey(str(upper), ledger, found, str(previous))[0] == ["x/t"]
