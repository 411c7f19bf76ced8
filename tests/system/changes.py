"""The lower tree of the write-back tests and every kind of change DESIGN.md §4 names, made
through a mounted overlay (or any pinned directory): shared by the sync and daemon tests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

UID = 1234


def sh(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def write(path: Path, text: str, mode: int | None = None, owner: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mode is not None:
        os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


# --- the lower tree and the changes made through the overlay ---------------------------------


def populate(root: Path, outside: Path) -> None:
    write(root / "keep/file", "kept\n", 0o640, UID)
    os.setxattr(root / "keep/file", "user.colour", b"blue")
    write(root / "keep/sub/deep.txt", "deep\n")
    os.symlink("/etc/hostname", root / "keep/link_abs")
    os.mkfifo(root / "keep/fifo", 0o620)
    write(root / "keep/hard1", "pair\n", 0o600)
    os.link(root / "keep/hard1", root / "keep/hard2")
    sh("setfacl", "-m", f"u:{UID}:rw", root / "keep/file")
    (root / "acl").mkdir()
    sh("setfacl", "-d", "-m", f"u:{UID}:rwx", root / "acl")
    write(root / "acl/file", "acl\n")
    sh("setfacl", "-m", f"u:{UID}:r", root / "acl/file")
    write(root / "del/nested/a/b/file1", "1")
    write(root / "del/nested/a/b/file2", "2")
    write(root / "del/nested/a/keepme", "k")
    write(root / "del/nested/gone/x/y", "y")
    write(root / "opq/x", "old x")
    write(root / "opq/y", "old y")
    write(root / "opq/sub/z", "old z")
    write(root / "d2f/inner/file", "in a dir that becomes a file")
    write(root / "f2d", "a file that becomes a dir")
    os.symlink("keep/file", root / "l2f")
    write(root / "f2l", "a file that becomes a symlink")
    write(root / "hl/base", "base", 0o644, UID)
    write(root / "hl/pair1", "pair on disk", 0o644)
    os.link(root / "hl/pair1", root / "hl/pair2")
    for name in ("m_chmod", "m_chown", "m_utime", "m_xattr", "m_acl"):
        write(root / "meta" / name, name, 0o644)
    os.setxattr(root / "meta/m_xattr", "user.k", b"v1")
    (root / "meta/dir_chmod").mkdir()
    write(root / "meta/dir_chmod/f", "f")
    write(root / "ren/old_name", "renamed file", 0o600, UID)
    write(root / "rdir/tree/a", "a")
    write(root / "rdir/tree/sub/b", "b")
    os.setxattr(root / "rdir/tree", "user.dir", b"x")
    write(root / "rr/t1/a", "a")
    write(root / "rr/t1/sub/b", "b")
    write(root / "rsub/moved/a", "a")
    write(root / "rsub/moved/sub/b", "b")
    write(root / "rdel/tree/a", "a")
    write(root / "rdel/tree/b", "b")
    write(root / "rdel/tree/sub/c", "c")
    (root / "fifos").mkdir()
    os.mkfifo(root / "fifos/old_fifo")
    write(root / "swap/a/fa", "A")
    write(root / "swap/b/fb", "B")
    write(root / "nest/outer/inner/f", "inner")
    write(root / "nest/outer/g", "outer")
    write(root / "over/src/f", "src")
    (root / "over/dst").mkdir()
    write(root / "back/a/f", "back")
    write(root / "content/append", "line1\n")
    write(root / "content/overwrite", "same size A")
    os.symlink(outside, root / "trap")


def ch_nested_delete(m: Path) -> None:
    os.unlink(m / "del/nested/a/b/file1")
    sh("rm", "-rf", m / "del/nested/gone")


def ch_opaque(m: Path) -> None:
    sh("rm", "-rf", m / "opq")
    (m / "opq").mkdir()
    write(m / "opq/x", "new x")


def ch_dir_to_file(m: Path) -> None:
    sh("rm", "-rf", m / "d2f")
    write(m / "d2f", "now a file")


def ch_file_to_dir(m: Path) -> None:
    os.unlink(m / "f2d")
    (m / "f2d").mkdir()
    write(m / "f2d/inner", "inside")


def ch_symlink_to_file(m: Path) -> None:
    os.unlink(m / "l2f")
    write(m / "l2f", "was a symlink")


def ch_file_to_symlink(m: Path) -> None:
    os.unlink(m / "f2l")
    os.symlink("keep/sub", m / "f2l")


def ch_hard_links(m: Path) -> None:
    os.link(m / "hl/base", m / "hl/base_link")  # to a disk file
    write(m / "hl/new1", "new")
    os.link(m / "hl/new1", m / "hl/new2")
    os.chmod(m / "hl/pair1", 0o600)  # one name of a disk pair: copy-up separates them


def ch_metadata(m: Path) -> None:
    os.chmod(m / "meta/m_chmod", 0o600)
    os.chown(m / "meta/m_chown", UID, UID)
    os.utime(m / "meta/m_utime", ns=(1_000_000_000_123_456_789, 1_000_000_000_123_456_789))
    os.setxattr(m / "meta/m_xattr", "user.k", b"v2")
    sh("setfacl", "-m", f"u:{UID}:r", m / "meta/m_acl")
    os.chmod(m / "meta/dir_chmod", 0o700)
    os.chown(m / "meta/dir_chmod", UID, UID)


def ch_file_rename(m: Path) -> None:
    os.rename(m / "ren/old_name", m / "ren/new_name")


def ch_dir_rename(m: Path) -> None:
    os.rename(m / "rdir/tree", m / "rdir/tree_renamed")  # EXDEV without redirect_dir
    write(m / "rdir/tree_renamed/added", "added")


def ch_rename_renamed(m: Path) -> None:
    os.rename(m / "rr/t1", m / "rr/t2")
    os.rename(m / "rr/t2", m / "rr_t3")


def ch_rename_into_new_subdir(m: Path) -> None:
    (m / "rsub/newsub/deeper").mkdir(parents=True)
    os.rename(m / "rsub/moved", m / "rsub/newsub/deeper/moved")


def ch_fifo(m: Path) -> None:
    os.mkfifo(m / "fifos/new_fifo", 0o640)
    os.unlink(m / "fifos/old_fifo")


def ch_new_deep_tree(m: Path) -> None:
    for depth in range(6):
        d = m / "new" / "/".join(f"l{i}" for i in range(depth + 1))
        write(d / f"file{depth}", f"depth {depth}\n" * 100, 0o600, UID)
    os.symlink("l0/l1", m / "new/shortcut")
    sh("setfacl", "-m", f"u:{UID}:rx", m / "new/l0")


def ch_delete_in_renamed(m: Path) -> None:
    os.rename(m / "rdel/tree", m / "rdel/tree2")
    os.unlink(m / "rdel/tree2/a")
    sh("rm", "-rf", m / "rdel/tree2/sub")


def ch_swap(m: Path) -> None:
    os.rename(m / "swap/a", m / "swap/tmp")
    os.rename(m / "swap/b", m / "swap/a")
    os.rename(m / "swap/tmp", m / "swap/b")


def ch_nested_renames(m: Path) -> None:
    os.rename(m / "nest/outer", m / "nest/outer2")
    os.rename(m / "nest/outer2/inner", m / "nest/inner_moved")


def ch_rename_over_empty_dir(m: Path) -> None:
    os.rename(m / "over/src", m / "over/dst")


def ch_rename_back(m: Path) -> None:
    os.rename(m / "back/a", m / "back/a2")
    os.rename(m / "back/a2", m / "back/a")
    write(m / "back/a/new", "new")


def ch_content(m: Path) -> None:
    with open(m / "content/append", "a") as f:
        f.write("line2\n")
    st = os.stat(m / "content/overwrite")
    write(m / "content/overwrite", "same size B")  # same size, then the same mtime again
    os.utime(m / "content/overwrite", ns=(st.st_atime_ns, st.st_mtime_ns))


def ch_planted_symlink(m: Path) -> None:
    os.unlink(m / "trap")
    (m / "trap").mkdir()
    write(m / "trap/victim", "inside the tree now")


def ch_acl_inherit(m: Path) -> None:
    write(m / "acl/newfile", "inherits the default ACL")
    sh("setfacl", "-m", f"u:{UID}:rw", m / "acl/file")


CHANGES: dict[str, Callable[[Path], None]] = {
    name[3:]: fn for name, fn in globals().items() if name.startswith("ch_") and callable(fn)
}
