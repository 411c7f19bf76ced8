"""Copy pins: the write-back that runs after the unmount (RAM changed after the verified sync),
or after a rolled-back bind, for every kind of change RAM can hold: hard links, symlinks, deep
new trees, a directory replaced by a file and back, renames, SQLite databases, mode and owner
changes, awkward names, empty and large files. Meanwhile processes write on disk (the path
shows it again); nothing a plain disk would have kept may be lost, and every change RAM holds
must reach the disk (or NAME.rampiped-conflict when both sides rewrote a file).

Each case runs twice: the unpin straight through, and the daemon killed after the write-back
wrote its files and started again (the write-back is then finished at start)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import Daemon, Env, running
from tests.system.helpers import wait_for
from tests.system.safety import append, release

pytestmark = pytest.mark.system

SYNCED = "unpin:copy-synced"
UNMOUNTED = "unpin:unmounted"
WRITTEN = "copy-window:written"
CONFLICT = ".rampiped-conflict"
# What a write-back may leave behind only by mistake: the hold directory, temporary files, the
# listing, a file an apply writes next to its name.
LEFTOVER_MARKS = (".rampiped-held", ".rampiped-tmp-", ".rampiped-window", ".rampiped-new")

Step = Callable[[Path], None]


def nothing(d: Path) -> None:
    pass


# -- what a tree holds ----------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    target: str


DIR = "<dir>"
DB = "<database>"  # a SQLite database: its rows are checked apart


def _digest(raw: bytes) -> str:
    if len(raw) <= 4096:
        return raw.decode(errors="backslashreplace")
    return f"<{len(raw)} bytes sha256 {hashlib.sha256(raw).hexdigest()[:16]}>"


def tree(d: Path) -> dict[str, object]:
    """Every entry below `d`: a file's text (a digest when large), DIR, Link(target); files
    named *.sqlite are DB."""
    out: dict[str, object] = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(d))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = Link(os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = DIR
            elif name.endswith(".sqlite"):
                out[rel] = DB
            else:
                out[rel] = _digest(p.read_bytes())
    return out


def meta(d: Path) -> dict[str, tuple[str, int, int, int]]:
    """(kind, permission bits, uid, gid) of every entry below `d`, "." included."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in [".", *dirs, *files] if root == str(d) else [*dirs, *files]:
            p = Path(root) / name if name != "." else d
            rel = "." if name == "." else str(p.relative_to(d))
            st = p.lstat()
            kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return out


def leftovers(d: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(d):
        found += [
            os.path.join(root, n) for n in dirs + files if any(m in n for m in LEFTOVER_MARKS)
        ]
    return found


def ino(p: Path) -> int:
    return p.lstat().st_ino


# -- the cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    seed: Step  # on disk, before the pin
    ram: Step  # through the bind, after the verified sync: RAM's changes
    expected: dict[str, object]  # the whole tree on disk after the unpin
    window: Step = nothing  # on disk, right after the unmount, before the write-back
    written: Step = nothing  # on disk, after the write-back wrote its files
    check: Step = nothing  # further assertions on the disk afterwards
    # entries whose mode and owner the window may change (else they must be RAM's)
    meta_skip: frozenset[str] = field(default_factory=frozenset)


# hard links


def seed_link_group(d: Path) -> None:
    (d / "pair1").write_text("pair\n")
    os.link(d / "pair1", d / "pair2")
    (d / "other").write_text("other\n")


def ram_link_group(d: Path) -> None:
    append(d / "pair1", "ram\n")  # pair2 is the same file
    (d / "new1").write_text("new\n")
    os.link(d / "new1", d / "new2")
    (d / "sub").mkdir()
    os.link(d / "new1", d / "sub" / "new3")


def check_link_group(d: Path) -> None:
    assert ino(d / "pair1") == ino(d / "pair2")
    assert ino(d / "new1") == ino(d / "new2") == ino(d / "sub" / "new3")


LINK_GROUP = Case(
    seed=seed_link_group,
    ram=ram_link_group,
    window=lambda d: append(d / "pair2", "window\n"),
    expected={
        "pair1": "pair\nram\nwindow\n",
        "pair2": "pair\nram\nwindow\n",
        "other": "other\n",
        "new1": "new\n",
        "new2": "new\n",
        "sub": DIR,
        "sub/new3": "new\n",
    },
    check=check_link_group,
)


def seed_solo(d: Path) -> None:
    (d / "solo").write_text("solo\n")
    (d / "untouched").write_text("u\n")


def ram_new_link(d: Path) -> None:
    os.link(d / "solo", d / "solo-link")


NEW_LINK = Case(
    seed=seed_solo,
    ram=ram_new_link,
    window=lambda d: append(d / "solo", "window\n"),
    expected={"solo": "solo\nwindow\n", "solo-link": "solo\nwindow\n", "untouched": "u\n"},
    check=lambda d: (
        None if ino(d / "solo") == ino(d / "solo-link") else pytest.fail("solo-link not a link")
    ),
)


def seed_groups(d: Path) -> None:
    (d / "g1").write_text("group\n")
    os.link(d / "g1", d / "g2")
    os.link(d / "g1", d / "g3")
    (d / "k1").write_text("keep\n")
    os.link(d / "k1", d / "k2")


def ram_groups(d: Path) -> None:
    for name in ("g1", "g2", "g3"):  # a whole group deleted
        (d / name).unlink()
    (d / "k2").unlink()  # one name of a group deleted, the other changed
    append(d / "k1", "ram\n")


LINK_GROUP_DELETED = Case(
    seed=seed_groups,
    ram=ram_groups,
    expected={"k1": "keep\nram\n"},
)


# symlinks


def seed_symlinks(d: Path) -> None:
    (d / "ta").write_text("a\n")
    (d / "tb").write_text("b\n")
    os.symlink("ta", d / "lnk")
    os.symlink("tb", d / "lnk-del")
    os.symlink("ta", d / "lnk-to-file")
    (d / "file-to-lnk").write_text("f\n")
    (d / "dir-to-lnk").mkdir()
    (d / "dir-to-lnk" / "inner").write_text("inner\n")


def retarget(link: Path, target: str) -> None:
    tmp = link.with_name(link.name + ".tmp")
    os.symlink(target, tmp)
    os.rename(tmp, link)


def ram_symlinks(d: Path) -> None:
    retarget(d / "lnk", "tb")  # same length
    os.symlink("nowhere/at/all", d / "lnk-dangling")
    (d / "sub").mkdir()
    (d / "sub" / "s").write_text("s\n")
    os.symlink("sub", d / "lnk-dir")
    (d / "lnk-del").unlink()
    (d / "lnk-to-file").unlink()
    (d / "lnk-to-file").write_text("now a file\n")
    (d / "file-to-lnk").unlink()
    os.symlink("tb", d / "file-to-lnk")
    shutil.rmtree(d / "dir-to-lnk")
    os.symlink("sub", d / "dir-to-lnk")


def window_symlinks(d: Path) -> None:
    append(d / "file-to-lnk", "window\n")  # a file RAM replaced by a symlink
    (d / "lnk-dangling").write_text("disk\n")  # a file at the name of RAM's new symlink


SYMLINKS = Case(
    seed=seed_symlinks,
    ram=ram_symlinks,
    # both kept: what RAM made, and what was written on disk meanwhile
    window=window_symlinks,
    expected={
        "ta": "a\n",
        "tb": "b\n",
        "lnk": Link("tb"),
        "lnk-dangling": Link("nowhere/at/all"),
        "sub": DIR,
        "sub/s": "s\n",
        "lnk-dir": Link("sub"),
        "lnk-to-file": "now a file\n",
        "file-to-lnk": Link("tb"),
        "file-to-lnk" + CONFLICT: "f\nwindow\n",
        "lnk-dangling" + CONFLICT: "disk\n",
        "dir-to-lnk": Link("sub"),
    },
    meta_skip=frozenset({"file-to-lnk", "lnk-dangling"}),
)


# a new deep tree


DEEP = "deep/a/b/c/d/e/f/g/h/i/j"


def ram_deep(d: Path) -> None:
    (d / DEEP).mkdir(parents=True)
    part = d
    for level in DEEP.split("/"):
        part = part / level
        (part / "file").write_text(f"{level}\n")
    (d / "deep" / "a" / "mode700").mkdir(mode=0o700)
    (d / "empty-dir" / "inner").mkdir(parents=True)


def deep_expected() -> dict[str, object]:
    out: dict[str, object] = {"keep": "k\n", "empty-dir": DIR, "empty-dir/inner": DIR}
    rel = ""
    for level in DEEP.split("/"):
        rel = f"{rel}/{level}" if rel else level
        out[rel] = DIR
        out[f"{rel}/file"] = f"{level}\n"
    out["deep/a/mode700"] = DIR
    out["deep/a/from-disk"] = "disk\n"
    return out


def window_deep(d: Path) -> None:
    # a process makes part of the same tree on disk before the write-back gets there
    (d / "deep" / "a").mkdir(parents=True)
    (d / "deep" / "a" / "from-disk").write_text("disk\n")


NEW_TREE = Case(
    seed=lambda d: (d / "keep").write_text("k\n") and None,
    ram=ram_deep,
    window=window_deep,
    expected=deep_expected(),
)


# a directory replaced by a file, and back


def seed_dirs(d: Path) -> None:
    for name in ("d1", "d2", "d3"):
        (d / name / "sub").mkdir(parents=True)
        (d / name / "x").write_text("x\n")
        (d / name / "sub" / "y").write_text("y\n")


def ram_dirs_to_files(d: Path) -> None:
    for name in ("d1", "d2", "d3"):
        shutil.rmtree(d / name)
        (d / name).write_text(f"{name} is a file now\n")


def window_dirs(d: Path) -> None:
    (d / "d2" / "new").write_text("made on disk\n")  # a new file in a directory RAM replaced
    append(d / "d3" / "x", "window\n")  # a file RAM deleted with its directory, written


DIR_TO_FILE = Case(
    seed=seed_dirs,
    ram=ram_dirs_to_files,
    window=window_dirs,
    expected={
        "d1": "d1 is a file now\n",
        "d2": "d2 is a file now\n",
        "d3": "d3 is a file now\n",
        "d2" + CONFLICT: DIR,
        "d2" + CONFLICT + "/new": "made on disk\n",
        "d3" + CONFLICT: DIR,
        "d3" + CONFLICT + "/x": "x\nwindow\n",
    },
)


def seed_files(d: Path) -> None:
    (d / "f1").write_text("f1\n")
    (d / "f2").write_text("f2\n")


def ram_files_to_dirs(d: Path) -> None:
    for name in ("f1", "f2"):
        (d / name).unlink()
        (d / name / "deeper").mkdir(parents=True)
        (d / name / "inner").write_text(f"in {name}\n")
        (d / name / "deeper" / "z").write_text("z\n")


FILE_TO_DIR = Case(
    seed=seed_files,
    ram=ram_files_to_dirs,
    window=lambda d: append(d / "f2", "window\n"),  # a file RAM replaced by a directory
    # the directory RAM made is on disk now: a process creates a file in it
    written=lambda d: (d / "f1" / "late").write_text("late\n") and None,
    expected={
        "f1": DIR,
        "f1/inner": "in f1\n",
        "f1/deeper": DIR,
        "f1/deeper/z": "z\n",
        "f1/late": "late\n",
        "f2": DIR,
        "f2/inner": "in f2\n",
        "f2/deeper": DIR,
        "f2/deeper/z": "z\n",
        "f2" + CONFLICT: "f2\nwindow\n",
    },
)


# renames


def seed_rename(d: Path) -> None:
    (d / "old.log").write_text("1\n")
    (d / "old2.log").write_text("2\n")
    (d / "dirA").mkdir()
    (d / "dirA" / "inside").write_text("inside\n")


def ram_rename(d: Path) -> None:
    os.rename(d / "old.log", d / "new.log")
    append(d / "new.log", "ram\n")
    os.rename(d / "old2.log", d / "new2.log")
    os.rename(d / "dirA", d / "dirB")


def window_rename(d: Path) -> None:
    append(d / "old.log", "window\n")  # still its old name on disk
    (d / "dirA" / "made-on-disk").write_text("disk\n")


RENAME = Case(
    seed=seed_rename,
    ram=ram_rename,
    window=window_rename,
    # the old name is gone on disk now: a logger that opens it anew creates it
    written=lambda d: append(d / "old2.log", "after\n"),
    expected={
        "new.log": "1\nram\n",
        "old.log": "1\nwindow\n",
        "new2.log": "2\n",
        "old2.log": "after\n",
        "dirB": DIR,
        "dirB/inside": "inside\n",
        "dirA": DIR,
        "dirA/made-on-disk": "disk\n",
    },
)


# SQLite


WAL_WRITER = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.execute("BEGIN")
for i in range(int(sys.argv[2]), int(sys.argv[3])):
    conn.execute("INSERT INTO t VALUES (?, ?)", (i, "ram %d" % i))
conn.execute("COMMIT")
os._exit(0)  # killed, as it were: its -wal and -shm stay next to the database
"""


def make_db(path: Path, rows: range, wal: bool) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"disk {i}") for i in rows])
    finally:
        conn.close()


def rows(path: Path) -> list[tuple[int, str]]:
    """The rows of a database file on its own (immutable: no companion is read or made)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return [(int(a), str(b)) for a, b in conn.execute("SELECT id, v FROM t ORDER BY id")]
    finally:
        conn.close()


def seed_dbs(d: Path) -> None:
    make_db(d / "wal.sqlite", range(1, 4), wal=True)
    make_db(d / "plain.sqlite", range(1, 4), wal=False)


def ram_dbs(d: Path) -> None:
    subprocess.run(
        [sys.executable, "-c", WAL_WRITER, str(d / "wal.sqlite"), "4", "500"], check=True
    )
    assert (d / "wal.sqlite-wal").stat().st_size > 0  # RAM's rows are in the WAL only
    conn = sqlite3.connect(d / "plain.sqlite", isolation_level=None)
    try:
        conn.execute("DELETE FROM t WHERE id = 2")
        conn.execute("INSERT INTO t VALUES (10, 'ram 10')")
    finally:
        conn.close()


def read_on_disk(d: Path) -> None:
    # a reader of the database on disk meanwhile (it makes and removes -wal and -shm there)
    conn = sqlite3.connect(d / "wal.sqlite")
    try:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (3,)
    finally:
        conn.close()


def check_dbs(d: Path) -> None:
    assert rows(d / "wal.sqlite") == [(i, f"disk {i}") for i in range(1, 4)] + [
        (i, f"ram {i}") for i in range(4, 500)
    ]
    assert rows(d / "plain.sqlite") == [(1, "disk 1"), (3, "disk 3"), (10, "ram 10")]


SQLITE = Case(
    seed=seed_dbs,
    ram=ram_dbs,
    window=read_on_disk,
    expected={"wal.sqlite": DB, "plain.sqlite": DB},
    check=check_dbs,
)


def write_db_on_disk(d: Path) -> None:
    conn = sqlite3.connect(d / "wal.sqlite", isolation_level=None)
    try:
        conn.execute("INSERT INTO t VALUES (1000, 'disk window')")
    finally:
        conn.close()  # the last connection: the WAL is checkpointed into the file


def check_db_conflict(d: Path) -> None:
    assert rows(d / "wal.sqlite") == [(i, f"disk {i}") for i in range(1, 4)] + [
        (i, f"ram {i}") for i in range(4, 500)
    ]
    assert rows(d / ("wal.sqlite" + CONFLICT)) == [(i, f"disk {i}") for i in range(1, 4)] + [
        (1000, "disk window")
    ]


SQLITE_BOTH = Case(
    seed=lambda d: make_db(d / "wal.sqlite", range(1, 4), wal=True),
    ram=lambda d: (
        subprocess.run(
            [sys.executable, "-c", WAL_WRITER, str(d / "wal.sqlite"), "4", "500"], check=True
        )
        and None
    ),
    window=write_db_on_disk,
    expected={"wal.sqlite": DB, "wal.sqlite" + CONFLICT: "<checked apart>"},
    check=check_db_conflict,
    meta_skip=frozenset({"wal.sqlite" + CONFLICT}),
)


# mode and owner only


def seed_meta(d: Path) -> None:
    (d / "m").write_text("m\n")
    (d / "m").chmod(0o644)
    (d / "sub").mkdir(mode=0o755)
    (d / "sub" / "s").write_text("s\n")
    os.symlink("m", d / "lnk")


def ram_meta(d: Path) -> None:
    (d / "m").chmod(0o600)
    os.chown(d / "m", 1234, 5678)
    (d / "sub").chmod(0o700)
    os.chown(d / "sub" / "s", 42, 43)
    os.chown(d / "lnk", 7, 8, follow_symlinks=False)
    d.chmod(0o750)  # the pinned directory itself


MODE_OWNER = Case(
    seed=seed_meta,
    ram=ram_meta,
    window=lambda d: append(d / "m", "window\n"),
    expected={"m": "m\nwindow\n", "sub": DIR, "sub/s": "s\n", "lnk": Link("m")},
)


# awkward names


NAMES = ["with space", "new\nline", "star*", "q?mark", "[bracket", "-dash", "--delete", "a\\b"]


def seed_names(d: Path) -> None:
    for i, name in enumerate(NAMES):
        (d / name).write_text(f"{i}\n")
    (d / "gone *?[").write_text("deleted in RAM\n")
    (d / "-dir [x]").mkdir()


def ram_names(d: Path) -> None:
    for i, name in enumerate(NAMES):
        append(d / name, f"ram {i}\n")
        (d / ("new " + name)).write_text(f"new {i}\n")
    (d / "gone *?[").unlink()
    (d / "-dir [x]" / "--in\n*").write_text("in\n")
    (d / "--").mkdir()
    (d / "--" / "-").write_text("-\n")


def window_names(d: Path) -> None:
    append(d / "new\nline", "window\n")
    append(d / "[bracket", "window\n")
    (d / "-made on disk*").write_text("disk\n")


def names_expected() -> dict[str, object]:
    out: dict[str, object] = {}
    for i, name in enumerate(NAMES):
        out[name] = f"{i}\nram {i}\n"
        out["new " + name] = f"new {i}\n"
    out["new\nline"] = "1\nram 1\nwindow\n"
    out["[bracket"] = "4\nram 4\nwindow\n"
    out["-made on disk*"] = "disk\n"
    out["-dir [x]"] = DIR
    out["-dir [x]/--in\n*"] = "in\n"
    out["--"] = DIR
    out["--/-"] = "-\n"
    return out


NAMES_CASE = Case(seed=seed_names, ram=ram_names, window=window_names, expected=names_expected())


# empty files


def seed_empty(d: Path) -> None:
    (d / "trunc").write_text("old\n")
    (d / "trunc-quiet").write_text("old\n")
    (d / "was-empty").write_text("")


def ram_empty(d: Path) -> None:
    (d / "empty").write_text("")
    (d / "trunc").write_text("")
    (d / "trunc-quiet").write_text("")
    append(d / "was-empty", "ram\n")
    (d / "both").write_text("")


def window_empty(d: Path) -> None:
    append(d / "trunc", "window\n")  # RAM emptied it first: as on a plain disk, only this
    append(d / "was-empty", "window\n")
    (d / "both").write_text("disk\n")  # RAM made it empty, a process made it on disk


EMPTY = Case(
    seed=seed_empty,
    ram=ram_empty,
    window=window_empty,
    expected={
        "empty": "",
        "trunc": "window\n",
        "trunc-quiet": "",
        "was-empty": "ram\nwindow\n",
        "both": "disk\n",
    },
)


# a large file


BIG_SEED = os.urandom(1 << 20)
BIG_RAM = os.urandom(1 << 20)
BIG_WINDOW = os.urandom(5 << 20)


LARGE = Case(
    seed=lambda d: (d / "big").write_bytes(BIG_SEED) and None,
    ram=lambda d: append(d / "big", BIG_RAM),
    window=lambda d: append(d / "big", BIG_WINDOW),
    written=lambda d: append(d / "big", b"tail\n"),
    expected={"big": _digest(BIG_SEED + BIG_RAM + BIG_WINDOW + b"tail\n")},
)


CASES = {
    "hard-link-group": LINK_GROUP,
    "new-hard-link": NEW_LINK,
    "link-group-deleted": LINK_GROUP_DELETED,
    "symlinks": SYMLINKS,
    "new-deep-tree": NEW_TREE,
    "dir-to-file": DIR_TO_FILE,
    "file-to-dir": FILE_TO_DIR,
    "rename": RENAME,
    "sqlite-wal": SQLITE,
    "sqlite-both-sides": SQLITE_BOTH,
    "mode-owner": MODE_OWNER,
    "names": NAMES_CASE,
    "empty": EMPTY,
    "large": LARGE,
}


# -- running a case -------------------------------------------------------------------------


Meta = dict[str, tuple[str, int, int, int]]


def assert_outcome(
    env: Env,
    d: Path,
    case: Case,
    ram_meta: Meta,
    dm: Daemon,
    expected: dict[str, object] | None = None,
) -> None:
    try:
        _assert_outcome(env, d, case, ram_meta, case.expected if expected is None else expected)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- daemon log ---\n{dm.log_text()[-4000:]}") from None


def _assert_outcome(
    env: Env, d: Path, case: Case, ram_meta: Meta, expected: dict[str, object]
) -> None:
    got = tree(d)
    expected = dict(expected)
    for rel, value in expected.items():
        if value == "<checked apart>":
            expected[rel] = got.get(rel)
    missing = {k: v for k, v in expected.items() if got.get(k) != v}
    extra = {k: v for k, v in got.items() if k not in expected}
    assert not missing and not extra, f"differ: {missing=} (expected), on disk {extra=}; " + str(
        {k: got.get(k) for k in missing}
    )
    case.check(d)
    disk_meta = meta(d)
    wrong = {
        rel: (want, disk_meta.get(rel))
        for rel, want in ram_meta.items()
        if rel not in case.meta_skip
        and rel in disk_meta
        and disk_meta[rel][0] == want[0]
        and disk_meta[rel] != want
    }
    assert not wrong, f"mode or owner not RAM's (RAM, disk): {wrong}"
    assert leftovers(d) == []
    assert env.mounted_at(d) is None
    assert env.status()["pins"] == []
    assert safety.no_leftover_mounts(env.runtime) == []


@pytest.mark.parametrize("crash", [False, True], ids=["unpin", "crash-restart"])
@pytest.mark.parametrize("name", list(CASES))
def test_write_back_after_the_unmount(
    name: str, crash: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "copy"
        d.mkdir()
        case.seed(d)
        with safety.paused_daemon(
            env, monkeypatch, f"{SYNCED},{UNMOUNTED},{WRITTEN}", marker
        ) as dm:
            env.ctl("pin", "--mode", "copy", str(d), check=True)
            ctl = safety.ctl_async(env, "unpin", str(d))
            try:
                safety.wait_paused(marker, SYNCED)
                assert env.mounted_at(d) is not None
                case.ram(d)
                ram_meta = meta(d)
                release(marker)
                safety.wait_paused(marker, UNMOUNTED)
                assert env.mounted_at(d) is None
                case.window(d)
                release(marker)
                safety.wait_paused(marker, WRITTEN)
                case.written(d)
                if crash:
                    safety.count("crash points")
                    dm.kill()
                    ctl.kill()
                    ctl.communicate()
                else:
                    release(marker)
                    out, err = ctl.communicate(timeout=120)
                    assert ctl.returncode == 0, (out, err, dm.log_text()[-3000:])
                    assert_outcome(env, d, case, ram_meta, dm)
            finally:
                release(marker)
                if ctl.poll() is None:
                    ctl.kill()
                    ctl.communicate()
            log_text = dm.log_text()
        if crash:
            with running(env) as dm2:
                dm2.wait_log(r"finished an interrupted draining")
                log_text += dm2.log_text()
                assert_outcome(env, d, case, ram_meta, dm2)
        assert "carrying the writes made during the write-back failed" not in log_text


def test_a_database_written_after_the_unmount_is_never_seen_under_another_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Databases changed during the write-back before the unmount are written whole after it,
    through SQLite's backup API: the new file is made in the hold directory (in the journal)
    and renamed into place, so a reader of the directory never meets its temporary name.
    Fails when the file is made next to its name."""
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "copy"
        d.mkdir()
        seed_dbs(d)
        names = sorted(os.listdir(d))
        with safety.paused_daemon(
            env, monkeypatch, f"{SYNCED},{UNMOUNTED},database:staged", marker
        ) as dm:
            env.ctl("pin", "--mode", "copy", str(d), check=True)
            ctl = safety.ctl_async(env, "unpin", str(d))
            try:
                safety.wait_paused(marker, SYNCED)
                ram_dbs(d)
                release(marker)
                safety.wait_paused(marker, UNMOUNTED)
                release(marker)
                seen = []
                for _ in range(2):  # wal.sqlite and plain.sqlite, in either order
                    safety.wait_paused(marker, "database:staged")
                    seen.append(sorted(os.listdir(d)))
                    release(marker)
                out, err = ctl.communicate(timeout=120)
                assert ctl.returncode == 0, (out, err, dm.log_text()[-3000:])
            finally:
                release(marker)
                if ctl.poll() is None:
                    ctl.kill()
                    ctl.communicate()
        assert seen == [names, names], seen
        check_dbs(d)
        assert leftovers(d) == []


# -- a pin rolled back after its bind ---------------------------------------------------------


COMPANIONS = ("-wal", "-shm", "-journal")


@pytest.mark.parametrize("name", [n for n in CASES if n != "sqlite-both-sides"])
def test_write_back_after_a_rolled_back_bind(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write reaches the disk between the copy and the bind, so the pin is rolled back;
    what reached RAM in that moment (the case's changes) is written back, and the disk holds
    exactly RAM's tree then, with the late write."""
    case = CASES[name]
    marker = tmp_path / "paused"
    with safety.manual_env(tmp_path) as env:
        d = env.data / "copy"
        d.mkdir()
        case.seed(d)
        (d / "late.log").write_text("late 1\n")
        with safety.paused_daemon(env, monkeypatch, "pin:layers,pin:bound", marker) as dm:
            with safety.pin_with_late_writer(
                env, marker, ["--mode", "copy", str(d)], d / "late.log", "pin:bound"
            ) as (ctl, late):
                assert env.mounted_at(d) is not None
                case.ram(d)
                in_ram = tree(d)
                ram_meta = meta(d)
                late.write("late 2\n")
                late.flush()
                release(marker)
                out, err = ctl.communicate(timeout=120)
            assert ctl.returncode != 0, (out, err)
            assert "written on disk during the pin" in err, err
            wait_for(lambda: env.status()["pins"] == [], 30, "the pin to be gone")
            expected = {k: v for k, v in in_ram.items() if not k.endswith(COMPANIONS)}
            expected["late.log"] = "late 1\nlate 2\n"
            assert_outcome(env, d, case, ram_meta, dm, expected)


# -- a write-back that fails after the unmount ------------------------------------------------


def seed_mixed(d: Path) -> None:
    seed_link_group(d)
    seed_dirs(d)
    seed_rename(d)


def ram_mixed(d: Path) -> None:
    ram_link_group(d)
    ram_dirs_to_files(d)
    ram_rename(d)


def window_mixed(d: Path) -> None:
    append(d / "pair2", "window\n")
    window_dirs(d)
    window_rename(d)


MIXED_AFTER_RETRY = {
    # RAM's versions, and what was written on disk meanwhile next to them
    "pair1": "pair\nram\n",
    "pair2": "pair\nram\n",
    "pair1" + CONFLICT: "pair\nwindow\n",  # the one file both names were: one conflict file
    "other": "other\n",
    "new1": "new\n",
    "new2": "new\n",
    "sub": DIR,
    "sub/new3": "new\n",
    "d1": "d1 is a file now\n",
    "d2": "d2 is a file now\n",
    "d3": "d3 is a file now\n",
    "d2" + CONFLICT: DIR,
    "d2" + CONFLICT + "/new": "made on disk\n",
    "d3" + CONFLICT: DIR,
    "d3" + CONFLICT + "/x": "x\nwindow\n",
    "new.log": "1\nram\n",
    "old.log": "1\nwindow\n",
    "new2.log": "2\n",
    "dirB": DIR,
    "dirB/inside": "inside\n",
    "dirA": DIR,
    "dirA/made-on-disk": "disk\n",
}


def test_a_failed_write_back_brings_every_kind_of_disk_write_into_ram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rsync fails after the unmount: the copy covers the path again holding what was written
    on disk meanwhile (a hard-linked file appended to, files in directories RAM replaced by
    files, a file RAM renamed away), and the retried unpin writes it all."""
    marker = tmp_path / "paused"
    flag = safety.failing_rsync(tmp_path, monkeypatch)
    with safety.manual_env(tmp_path) as env:
        d = env.data / "copy"
        d.mkdir()
        seed_mixed(d)
        with safety.paused_daemon(env, monkeypatch, f"{SYNCED},{UNMOUNTED}", marker) as dm:
            env.ctl("pin", "--mode", "copy", str(d), check=True)
            ctl = safety.ctl_async(env, "unpin", str(d))
            try:
                safety.wait_paused(marker, SYNCED)
                ram_mixed(d)
                ram_meta = meta(d)
                release(marker)
                safety.wait_paused(marker, UNMOUNTED)
                window_mixed(d)
                flag.touch()
                safety.count("disk faults")
                release(marker)
                out, err = ctl.communicate(timeout=120)
                assert ctl.returncode == 1, (out, err)
                assert "exited with code 11" in err, err
            finally:
                release(marker)
                if ctl.poll() is None:
                    ctl.kill()
                    ctl.communicate()
            assert env.mounted_at(d) is not None  # the copy covers the path again, with it all
            in_ram = tree(d)
            assert in_ram == MIXED_AFTER_RETRY, {
                k: (in_ram.get(k), MIXED_AFTER_RETRY.get(k))
                for k in in_ram.keys() | MIXED_AFTER_RETRY.keys()
                if in_ram.get(k) != MIXED_AFTER_RETRY.get(k)
            }
            assert ino(d / "pair1") == ino(d / "pair2")
            flag.unlink()
            safety.wait_unpinned_releasing(dm, marker, d)
            case = Case(seed=seed_mixed, ram=ram_mixed, expected=MIXED_AFTER_RETRY)
            assert_outcome(env, d, case, ram_meta, dm)
            assert ino(d / "pair1") == ino(d / "pair2")
