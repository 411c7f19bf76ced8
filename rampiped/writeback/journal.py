"""The checkpoint journal: generations of the upper layer on disk, and their apply."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rampiped import appends, durable
from rampiped.appends import open_rel_path
from rampiped.commands import (
    RSYNC_COPY,
    CommandResult,
    Runner,
    SyncError,
    exclude_pattern,
    rsync_has_fsync,
    run_command,
    run_pass,
    source_churn_only,
)
from rampiped.fsops import (
    DIR_FLAGS,
    _fsync_dir,
    lstat_at,
    opened_dir,
    remove_at,
    settle_at,
)
from rampiped.ledger import Ledger, scan_stamps, settled, with_links
from rampiped.ledger import Scan as LedgerScan
from rampiped.ledger import scan as ledger_scan
from rampiped.pause import pause_point
from rampiped.renames import renamed
from rampiped.writeback import carry, fromlower
from rampiped.writeback.apply import ApplyResult, apply_layer, at_or_below
from rampiped.writeback.held import HeldFiles
from rampiped.writeback.links import LinkRoute
from rampiped.writeback.moves import Stash, clear_finished_stash, remove_stash
from rampiped.writeback.names import JOURNAL_STASH, SCRATCH_NAME, STASH_NAME

_GEN_RE = re.compile(r"gen-([0-9]+)")


_GEN_TMP_RE = re.compile(r"gen-([0-9]+)\.tmp")


@dataclass(frozen=True)
class CheckpointResult:
    generation: int
    files: int  # regular files copied (unchanged ones are hard links to the last generation)
    bytes: int
    seconds: float
    # what the new generation holds of each file of the layer, by content (see ledger.py)
    ledger: Ledger | None = field(default=None, repr=False, compare=False)
    appended: int = 0  # of `files`, those that only grew: the last copy got their tail
    whole_bytes: int = 0  # what copying each changed file whole would have written


def _generations(journal_fd: int) -> tuple[dict[int, str], list[str]]:
    for name in carry.pending(journal_fd):  # complete once their plan is carried out
        carry.finish(journal_fd, name)
    complete: dict[int, str] = {}
    partial: list[str] = []
    for name in os.listdir(journal_fd):
        if m := _GEN_RE.fullmatch(name):
            st = lstat_at(journal_fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                complete[int(m.group(1))] = name
        elif _GEN_TMP_RE.fullmatch(name):
            partial.append(name)
    return complete, partial


def rsync_stat(text: str, label: str) -> int:
    """A figure of rsync --stats output (`label`: the text before its colon); 0 when absent."""
    m = re.search(re.escape(label) + r":\s*([0-9][0-9,.']*)", text)
    return int(re.sub(r"[^0-9]", "", m.group(1))) if m else 0


def checkpoint(
    upper: str,
    journal: str,
    *,
    runner: Runner = run_command,
    ledger: Ledger | None = None,
    found: LedgerScan | None = None,
    changed_since: int | None = None,
    keep_older: bool = False,
    taken_ns: int = 0,
    below: fromlower.Below | None = None,
) -> CheckpointResult:
    """Copy the upper layer of a mounted overlay (whiteouts, trusted.overlay.* attributes and
    all: a faithful copy of the layer) into a new generation of `journal`, on disk outside the
    pinned tree. The generation is written as gen-N.tmp, flushed, renamed to gen-N and the
    older ones removed: a power cut at any point leaves the last complete generation.

    `ledger`: what the last generation holds of each file, by content (the result's `ledger`
    of the checkpoint that wrote it). With it, files whose content is still what the last
    generation holds are hard links to it; every other file is copied, whatever its size and
    mtime say (rsync's --link-dest alone links a same-size rewrite that kept its mtime, and a
    file changed through a shared mapping, to the stale copy). Without it (not known, e.g. a
    pin adopted after a restart) every file is copied. `found`: the layer read just before
    (SpaceNeed.found), instead of reading it again here.

    `changed_since` (ns, wall clock), instead of a ledger: the files changed since the last
    generation are those whose ctime is that late or later, and no file is read (the result
    has no ledger). Sound only when the last generation was taken after that moment and no
    process had a file of the layer mapped then: a store through a mapping made before it
    changes no stamp, while every other change (a write, a truncate, a new mapping's first
    store, cp -p or touch -d on new content) sets the ctime.

    `taken_ns`: the RAM side's clock now, before anything is read (kept in the result's
    ledger): the next checkpoint with that ledger makes its generation of this one, with
    only what changed since replaced, rather than linking every file again (carry.py).

    `below`: where the directory below the mounted overlay and this journal are, on one mount:
    a file of the layer that the disk file below it holds the first part of (copied up by an
    append, or renamed) is that disk file, linked into the generation, with the rest appended
    (fromlower.py). Only while the overlay is mounted, and with no process writing the disk
    below it.

    `keep_older`: the older generations stay until the journal is discarded. An unpin that
    linked a generation's files into the directory (links.py) keeps it, so that no unlink in
    the journal moves the ctime of a file the directory shows while the write-back tells what
    processes wrote there from then on by ctime (HeldFiles.threshold)."""
    start = time.monotonic()
    upper = os.path.abspath(upper)
    journal = os.path.abspath(journal)
    if at_or_below(os.path.realpath(journal), os.path.realpath(upper)):
        raise ValueError(f"journal {journal} must not be inside the layer {upper}")
    try:
        ust = os.lstat(upper)
    except FileNotFoundError as e:
        raise SyncError(f"layer {upper} does not exist: no checkpoint taken") from e
    if not stat.S_ISDIR(ust.st_mode):
        raise SyncError(f"layer {upper} is not a directory: no checkpoint taken")
    if not os.path.isdir(journal):
        parent = os.path.dirname(journal)
        os.makedirs(journal, mode=0o700, exist_ok=True)
        with opened_dir(parent) as pfd:
            _fsync_dir(pfd)
    # read before the copy: a file that changes after this is copied again next time, since
    # its content then differs from what the new ledger records
    if changed_since is not None:
        found = scan_stamps(upper)
    elif found is None:
        found = ledger_scan(upper)
    with opened_dir(journal) as jfd:
        complete, partial = _generations(jfd)
        for name in partial:  # a checkpoint cut short: never used, removed now
            remove_at(jfd, name)
        latest = max(complete, default=0)
        gen = latest + 1
        tmp_name = f"gen-{gen}.tmp"
        argv = [*RSYNC_COPY, "--stats", f"--exclude=/{SCRATCH_NAME}"]
        linked = bool(latest) and (ledger is not None or changed_since is not None)
        # files that only grew: the last generation's copy gets their tail (appends.py) and
        # is linked into this one, rather than copied whole
        # and files renamed in the layer with their content as it was: the last generation's
        # copy is linked in under the new name (renames.py)
        known = ledger is not None and linked and changed_since is None
        moved = renamed(found, ledger, frozenset(), grown=False) if known and ledger else {}
        grown = appends.candidates(found, ledger, moved) if known and ledger else {}
        argv += [f"--exclude={exclude_pattern(rel)}" for rel in sorted(grown) + sorted(moved)]
        picked: dict[str, fromlower.Source] = {}
        if below is not None and changed_since is None:
            # files the journal holds no copy of: copied up (or renamed) since it last looked
            new = set(found) if ledger is None else set(found) - set(ledger.digests)
            picked = fromlower.pick(upper, found, new - set(grown) - set(moved), below)
            argv += [f"--exclude={exclude_pattern(rel)}" for rel in sorted(picked)]
        carried, dir_inodes = (
            carry.survey(
                upper,
                ledger if known and not keep_older else None,
                found,
                f"{journal}/{complete[latest]}" if latest else None,
            )
            if taken_ns
            else ([], {})
        )
        argv += [f"--exclude={exclude_pattern(rel)}" for rel in carried]
        # files that are the disk's own below the overlay and did not change: linked from
        # the last generation by name (rsync's --link-dest would copy them, their overlay
        # attributes being the layer's only)
        kept = (
            fromlower.unchanged(ledger, found, carried, set(grown) | set(moved))
            if known and ledger
            else {}
        )
        argv += [f"--exclude={exclude_pattern(rel)}" for rel in sorted(kept)]
        if linked:
            argv.append(f"--link-dest={journal}/{complete[latest]}")
        argv += [upper + "/", f"{journal}/{tmp_name}/"]
        rsync_has_fsync(runner)  # says "rsync is not installed" when it is not
        result = run_pass(runner, argv)
        # 23/24 for source churn only: a file vanished, shrank or became a directory while
        # the live layer was copied; the next checkpoint sees the new state (the ledger leaves
        # those files out), and this one is as good as any copy of a layer being written.
        # (and a file that became something else while rsync wrote it: rsync's "could not make
        # way for new regular file", as in the re-copy below; one still a file is a failure)
        if result.returncode != 0 and not source_churn_only(retyped_left_out(result, upper)):
            raise SyncError.from_command(f"checkpoint of {upper} into {journal}", argv, result)
        files = rsync_stat(result.stdout, "Number of regular files transferred")
        nbytes = rsync_stat(result.stdout, "Total transferred file size")
        appended: list[appends.Appended] = []
        if kept:
            left = _link_into(f"{journal}/{complete[latest]}", f"{journal}/{tmp_name}", kept)
            if left:  # not there as the ledger says: copied whole
                more = _copy_listed(runner, upper, f"{journal}/{tmp_name}", journal, left, found)
                files, nbytes = files + more[0], nbytes + more[1]
        taken: list[appends.Appended] = []  # files of the disk below, linked in (fromlower.py)
        if picked:
            assert below is not None
            taken, left = fromlower.take(upper, f"{journal}/{tmp_name}", tmp_name, below, picked)
            files += len(taken)
            nbytes += sum(a.new_size - a.old_size for a in taken)
            if left:  # not there as read, or not only grown after all: copied whole
                more = _copy_listed(runner, upper, f"{journal}/{tmp_name}", journal, left, found)
                files, nbytes = files + more[0], nbytes + more[1]
        if moved:
            left = _link_into(f"{journal}/{complete[latest]}", f"{journal}/{tmp_name}", moved)
            if left:  # not there as the ledger says: copied whole
                more = _copy_listed(runner, upper, f"{journal}/{tmp_name}", journal, left, found)
                files, nbytes = files + more[0], nbytes + more[1]
        if grown:
            assert ledger is not None
            previous = f"{journal}/{complete[latest]}"
            # on a journal that commits in order, the tails are made durable with the rest of
            # the generation below, not by an fsync each
            shared = {rel: ledger.below[rel] for rel in grown if rel in ledger.below}
            if shared and below is not None:  # the disk file and the last generation's name
                names = dict.fromkeys(fromlower.still_shared(below, complete[latest], shared), 2)
            else:
                names = None
            appended = appends.append_grown(
                upper,
                previous,
                grown,
                ledger,
                batched=durable.commits_in_order(journal),
                names=names,
            )
            _link_into(previous, f"{journal}/{tmp_name}", {a.rel: a.rel for a in appended})
            files += len(appended)
            nbytes += sum(a.new_size - a.old_size for a in appended)
            whole = sorted(set(grown) - {a.rel for a in appended})
            if whole:  # not only grown after all: copied whole
                more = _copy_listed(runner, upper, f"{journal}/{tmp_name}", journal, whole, found)
                files, nbytes = files + more[0], nbytes + more[1]
        if linked:
            if changed_since is not None:
                changed = [rel for rel, seen in found.items() if seen.ctime_ns >= changed_since]
            else:
                assert ledger is not None
                done = {a.rel for a in [*appended, *taken]} | set(moved) | set(kept)
                changed = [rel for rel in ledger.changed(found) if rel not in done]
            stale = _linked_stale(changed, f"{journal}/{complete[latest]}", f"{journal}/{tmp_name}")
            if stale:
                more = _copy_listed(runner, upper, f"{journal}/{tmp_name}", journal, stale, found)
                files, nbytes = files + more[0], nbytes + more[1]
        pause_point("checkpoint:copied")
        # the generation and the appended tails (in the last one, linked into this one) on
        # disk before the rename below shows them (which commits them, or the carry's plan)
        settle_at(
            jfd,
            tmp_name,
            f"{journal}/{tmp_name}",
            written=[os.path.join(journal, complete[latest], a.rel) for a in appended],
        )
        if appended:
            appends.set_times(f"{journal}/{complete[latest]}", appended)
        if taken:
            appends.set_times(f"{journal}/{tmp_name}", taken)
        if carried:
            carry.commit(jfd, tmp_name, f"gen-{gen}", complete.pop(latest), carried)
        else:
            os.rename(tmp_name, f"gen-{gen}", src_dir_fd=jfd, dst_dir_fd=jfd)
            _fsync_dir(jfd)
        pause_point("checkpoint:renamed")
        if not keep_older:
            # not synced: gen-{gen} is durable already, and an older generation that a power
            # cut brings back is never read (the latest is) and goes with the next checkpoint.
            # One journal commit fewer per checkpoint.
            for name in complete.values():
                remove_at(jfd, name)
    held = None if changed_since is not None else settled(found, upper)
    if held is not None:
        held.taken_ns, held.dirs = taken_ns, dir_inodes
        for a in [*appended, *taken]:
            if a.rel in held.digests or appends.still_prefix(upper, a):
                held.record(a.rel, a.digest, a.new_size, found[a.rel].ino)  # the generation now
        # a file that grew while it was copied is in the generation as a prefix of what the
        # layer holds now: known so, the next checkpoint appends the rest instead of copying
        # it whole again
        for rel in found.keys() - held.digests.keys():
            prefix = appends.disk_prefix(upper, f"{journal}/gen-{gen}", rel)
            if prefix is not None:
                held.record(rel, prefix[0], prefix[1], found[rel].ino)
        if below is not None:
            held.below = fromlower.still_below(
                below, f"gen-{gen}", held, ledger, moved, picked, taken
            )
    return CheckpointResult(
        gen,
        files,
        nbytes,
        time.monotonic() - start,
        ledger=held,
        appended=len(appended),
        whole_bytes=appends.whole_bytes(nbytes, appended, moved, found),
    )


def _link_into(previous: str, new: str, pairs: dict[str, str]) -> list[str]:
    """Link each file of the generation `previous` into the one being written, `new`, under
    its new name (pairs: new name -> name in `previous`; the directories are there, rsync
    made every directory of the layer). Returns the new names whose file was not there as a
    regular file: those are to be copied."""
    left = []
    for rel, old in sorted(pairs.items()):
        sparent, _, sname = old.rpartition("/")
        dparent, _, dname = rel.rpartition("/")
        src, dst = open_rel_path(previous, sparent), open_rel_path(new, dparent)
        try:
            st = None if src is None else lstat_at(src, sname)
            if dst is None or st is None or not stat.S_ISREG(st.st_mode):
                left.append(rel)
                continue
            os.link(sname, dname, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
        finally:
            for fd in (src, dst):
                if fd is not None:
                    os.close(fd)
    return left


def _linked_stale(changed: list[str], previous: str, new: str) -> list[str]:
    """Of the files whose content changed, those whose new copy rsync took from the previous
    generation's rather than from the layer: its quick check found size and mtime equal there
    (what a same-size rewrite keeping its mtime, or a shared mapping, shows), and it linked
    that copy or, when the attributes differ (a file that tar or rsync -a made anew where a
    copied-up one was, without its trusted.overlay.origin), copied it locally. Either way the
    new generation holds the stale content; a file rsync sent has other size or mtime."""
    out = []
    for rel in changed:
        try:
            a = os.lstat(os.path.join(previous, rel))
            b = os.lstat(os.path.join(new, rel))
        except (FileNotFoundError, NotADirectoryError):
            continue  # not in the previous generation: sent from the layer
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (a.st_size, a.st_mtime_ns) == (
            b.st_size,
            b.st_mtime_ns,
        ):
            out.append(rel)
    return out


def _copy_listed(
    runner: Runner, src: str, dst: str, list_dir: str, rels: list[str], found: LedgerScan
) -> tuple[int, int]:
    """Copy exactly the files `rels` (with the other names of their hard-link groups) from
    `src` to `dst`, even when size and mtime look equal (-I): a new file renamed over each
    name, which breaks a hard link to an older copy. A file gone meanwhile is skipped (24).
    The list is written into `list_dir`, outside both trees. Returns (files, bytes) copied."""
    listed = sorted(with_links(found, rels))
    listing = os.path.join(list_dir, ".rampiped-copy-list")
    with open(listing, "wb") as f:
        f.write(b"\0".join(os.fsencode(p) for p in listed) + b"\0")
    argv = [
        *RSYNC_COPY, "--stats", "--no-r", "-I", "--from0", f"--files-from={listing}",
        src + "/", dst + "/",
    ]  # fmt: skip
    try:
        result = run_pass(runner, argv)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listing)
    if result.returncode != 0 and not source_churn_only(retyped_left_out(result, src)):
        raise SyncError.from_command(
            f"checkpoint of {src} into {dst} (changed files)", argv, result
        )
    return (
        rsync_stat(result.stdout, "Number of regular files transferred"),
        rsync_stat(result.stdout, "Total transferred file size"),
    )


# rsync replacing a destination entry by one of another type: "could not make way for new
# device file: NAME" (also symlink, directory, special file)
_MAKE_WAY = re.compile(r"could not make way for new [a-z ]+: (.+)")


def retyped_left_out(result: CommandResult, src: str) -> CommandResult:
    """`result` without rsync's complaints about files that are no longer regular files in
    `src`: each was listed as a changed regular file and became something else (deleted
    through the overlay: a whiteout) during the pass, which is source churn like a vanished
    file; the next checkpoint takes its new state (the ledger leaves it out)."""
    kept = []
    for line in result.stderr.splitlines():
        m = _MAKE_WAY.fullmatch(line.strip())
        if m is not None:
            try:
                if not stat.S_ISREG(os.lstat(os.path.join(src, m.group(1))).st_mode):
                    continue
            except FileNotFoundError:
                continue
        kept.append(line)
    return CommandResult(result.returncode, result.stdout, "\n".join(kept))


def latest_generation(journal: str) -> str | None:
    """Path of the newest complete generation in `journal`, or None."""
    try:
        with opened_dir(journal) as jfd:
            complete, _ = _generations(jfd)
    except FileNotFoundError:
        return None
    if not complete:
        return None
    return os.path.join(os.path.abspath(journal), complete[max(complete)])


def apply_journal(
    journal: str,
    target: str,
    *,
    runner: Runner = run_command,
    keep_newer_than: int | None = None,
    window: HeldFiles | None = None,
    unchanged: frozenset[str] = frozenset(),
    link: Callable[[str], LinkRoute | None] | None = None,
) -> ApplyResult | None:
    """Apply the newest complete generation of `journal` to `target` (as apply_upper does),
    verify it, then remove the generations. None when there is no complete generation.
    `keep_newer_than` and `window` as in apply_upper, `unchanged` as in apply_layer; `link`
    gives, for the generation, apply_layer's `link`.

    Meant for the start after a crash: the disk directory was the lower layer and nothing
    writes into a mounted lower, so it is unchanged since the pin, and applying the newest
    generation gives exactly the merged view at that checkpoint. If this apply is cut short,
    running it again resumes it (the generation stays until the apply is verified)."""
    if at_or_below(os.path.realpath(journal), os.path.realpath(target)):
        raise ValueError(f"journal {journal} must not be inside the pinned directory {target}")
    gen = latest_generation(journal)
    if gen is None:
        discard_journal(journal)
        if os.path.isdir(target):
            # A crash after the generations were removed but before the finished apply's
            # stash was: that leftover goes. An unfinished one (an apply straight from a RAM
            # layer that was cut short) is reported, never guessed at.
            with _stashes(journal, target) as stashes:
                for stash in stashes:
                    clear_finished_stash(stash, target)
        return None
    result = apply_layer(
        gen,
        target,
        runner,
        keep_plan=True,
        keep_newer_than=keep_newer_than,
        window=window,
        unchanged=unchanged,
        link=None if link is None else link(gen),
    )
    root = os.lstat(gen)
    discard_journal(journal)
    with _stashes(journal, target) as stashes:
        for stash in stashes:
            if stash.lstat() is not None:
                remove_stash(stash)
                if stash.name == STASH_NAME:  # it changed the directory's mtime
                    os.utime(stash.parent_fd, ns=(root.st_atime_ns, root.st_mtime_ns))
    return result


@contextlib.contextmanager
def _stashes(journal: str, target: str) -> Iterator[list[Stash]]:
    """The places an apply's stash can be (apply.stash_place): inside the target, and in the
    journal (when it exists)."""
    with contextlib.ExitStack() as stack:
        tfd = stack.enter_context(opened_dir(os.path.abspath(target)))
        found = [Stash.inside(tfd, target)]
        if os.path.isdir(journal):
            jfd = stack.enter_context(opened_dir(os.path.abspath(journal)))
            found.append(Stash(jfd, JOURNAL_STASH, os.path.join(journal, JOURNAL_STASH)))
        yield found


def discard_journal(journal: str) -> None:
    """Remove every generation (complete or partial) of `journal`; the directory stays."""
    try:
        jfd = os.open(journal, DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        complete, partial = _generations(jfd)
        for name in sorted(partial) + [complete[k] for k in sorted(complete)]:
            remove_at(jfd, name)
        _fsync_dir(jfd)
    finally:
        os.close(jfd)
