"""Verifying that the directory on disk shows every entry of a layer."""

from __future__ import annotations

import os
import stat

from rampiped import osutil
from rampiped.fsops import at_rel, changed_since, join, lstat_at, open_dir_at, opened_dir
from rampiped.writeback.layer import Layer, UpperDir, scan_layer
from rampiped.writeback.names import HOLD_NAME, STASH_NAME


def _interesting_xattrs(path: str | None, name: str, dir_fd: int | None) -> dict[str, bytes]:
    """xattrs that write-back must carry (ACLs and user/trusted ones); overlay ones separately."""
    # os.listxattr/getxattr take a path or an fd, not dir_fd: read via /proc/self/fd.
    full = f"/proc/self/fd/{dir_fd}/{name}" if dir_fd is not None else (path or name)
    out: dict[str, bytes] = {}
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError:
        return out
    for n in names:
        if n.startswith("security."):
            continue  # labels follow the disk's policy, not the layer
        try:
            out[n] = os.getxattr(full, n, follow_symlinks=False)
        except OSError:
            pass
    return out


def verify_applied(upper: str, target: str, *, newer_than: int | None = None) -> list[str]:
    """Differences between a layer and the disk after applying it ([] when none): every entry
    the layer holds is on disk with the same type, mode, owner, size, mtime, symlink target,
    xattrs and hard links; names under whiteouts are absent; directories without lower content
    hold nothing else; no trusted.overlay.* attribute reached the disk.

    With `newer_than` (ns), what was written on disk from then on (the directory showed the
    disk while the layer was applied) is not a difference: a regular file whose mtime differs
    from the layer's and is that late (appended to after the apply wrote it), and entries under
    whiteouts or in opaque directories whose ctime is that late (created meanwhile)."""
    layer = scan_layer(upper)
    diffs: list[str] = []
    with opened_dir(target) as target_fd:
        ust = os.lstat(upper)
        tst = os.fstat(target_fd)
        diffs += _compare("/", ust, tst)
        stack: list[tuple[UpperDir, int]] = [(layer.dirs[""], os.dup(target_fd))]
        try:
            while stack:
                d, fd = stack.pop()
                try:
                    diffs += _verify_dir(layer, d, fd, stack, newer_than)
                finally:
                    os.close(fd)
        finally:
            for _, fd in stack:
                os.close(fd)
        for group in layer.link_groups:
            inodes = set()
            for rel in group:
                st = at_rel(target_fd, rel, lstat_at)
                if st is not None:
                    inodes.add((st.st_dev, st.st_ino))
            if len(inodes) > 1:
                diffs.append(f"{group}: hard links in the layer are separate files on disk")
    return diffs


def _verify_dir(
    layer: Layer,
    d: UpperDir,
    fd: int,
    stack: list[tuple[UpperDir, int]],
    newer_than: int | None = None,
) -> list[str]:
    diffs: list[str] = []
    upper_dir = os.path.join(layer.root, d.rel) if d.rel else layer.root

    def written_since(name: str) -> bool:
        return newer_than is not None and changed_since(fd, name, newer_than)

    if d.lower is None:
        for name in os.listdir(fd):
            reserved = d.rel == "" and name in (STASH_NAME, HOLD_NAME)
            if name not in d.children and not reserved and not written_since(name):
                diffs.append(f"{join(d.rel, name)}: on disk but not in the layer")
    for name, kind in d.children.items():
        rel = join(d.rel, name)
        st = lstat_at(fd, name)
        if kind == "whiteout":
            if st is not None and not written_since(name):
                diffs.append(f"{rel}: deleted in the layer, still on disk ({osutil.file_kind(st)})")
            continue
        if st is None:
            diffs.append(f"{rel}: missing on disk")
            continue
        ust = os.lstat(os.path.join(upper_dir, name))
        appended = (
            newer_than is not None
            and st.st_mtime_ns != ust.st_mtime_ns
            and st.st_mtime_ns >= newer_than
        )
        diffs += _compare(rel, ust, st, written_after=appended)
        if osutil.file_kind(st) != kind:
            continue
        if kind == "symlink":
            want = os.readlink(os.path.join(upper_dir, name))
            have = os.readlink(name, dir_fd=fd)
            if want != have:
                diffs.append(f"{rel}: symlink target {have!r} on disk, {want!r} in the layer")
        want_x = {
            k: v
            for k, v in _interesting_xattrs(os.path.join(upper_dir, name), name, None).items()
            if not k.startswith("trusted.overlay.")
        }
        have_x = _interesting_xattrs(None, name, fd)
        leaked = sorted(k for k in have_x if k.startswith("trusted.overlay."))
        if leaked:
            diffs.append(f"{rel}: overlay attributes reached the disk: {leaked}")
        have_x = {k: v for k, v in have_x.items() if not k.startswith("trusted.overlay.")}
        if want_x != have_x:
            keys = sorted(k for k in set(want_x) | set(have_x) if want_x.get(k) != have_x.get(k))
            diffs.append(f"{rel}: xattrs differ: {keys}")
        if kind == "dir":
            stack.append((layer.dirs[rel], open_dir_at(fd, name)))
    return diffs


def _compare(
    rel: str, want: os.stat_result, have: os.stat_result, *, written_after: bool = False
) -> list[str]:
    kind_w, kind_h = osutil.file_kind(want), osutil.file_kind(have)
    if kind_w != kind_h:
        return [f"{rel}: {kind_h} on disk, {kind_w} in the layer"]
    out = []
    for label, a, b in (
        ("mode", stat.S_IMODE(want.st_mode), stat.S_IMODE(have.st_mode)),
        ("uid", want.st_uid, have.st_uid),
        ("gid", want.st_gid, have.st_gid),
    ):
        if a != b:
            shown = (oct(a), oct(b)) if label == "mode" else (a, b)
            out.append(f"{rel}: {label} {shown[1]} on disk, {shown[0]} in the layer")
    if written_after and kind_w == "file":
        return out  # written on disk after the apply: its size and mtime are the writer's
    if kind_w == "file" and want.st_size != have.st_size:
        out.append(f"{rel}: size {have.st_size} on disk, {want.st_size} in the layer")
    # A directory's mtime moves whenever an entry is added or removed, also by a process that
    # writes into the directory on disk while the write-back runs (the overlay is unmounted by
    # then): it carries no data, and failing the write-back over it would keep the pin in RAM,
    # growing, for nothing. _set_times still gives directories the layer's times.
    if want.st_mtime_ns != have.st_mtime_ns and kind_w != "dir":
        out.append(f"{rel}: mtime {have.st_mtime_ns} on disk, {want.st_mtime_ns} in the layer")
    return out
