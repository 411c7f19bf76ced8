"""No temporary or internal name of rampiped is left in a user's directory after a crash
(issue 12, item 4), through the real daemon, in copy and in overlay mode.

rsync writes each file as a temporary `.NAME.XXXXXX` and renames it into place; a kill -9 in
between leaves that temporary behind. Every rsync that writes into a pinned directory on disk
therefore keeps its temporaries in a scratch directory at the directory's top (`--temp-dir=
<dir>/.rampiped-tmp`), and the start-up reconciliation removes a leftover scratch directory and
rampiped's own temporary names (`.NAME.rampiped-tmp-XXXXXXXX`, `NAME.rampiped-tmp`,
`.NAME.rampiped-new`).

1. test_kill_during_the_final_write_back: a fake rsync first on PATH lets the final write-back
   of a stop run until a temporary file of the transfer shows in the directory on disk, then
   kills that rsync (deepest process first) and the daemon with SIGKILL. The next start must
   finish the write-back, and after its clean stop the directory must hold exactly what the
   pinned path showed before the first stop, and nothing else.
2. test_start_removes_leftover_names: leftover names put by hand on the disk side of a pin
   after a kill -9 or a power cut are gone once the daemon has started again; a user's files
   with similar names stay.

The disk side of a pin is seen through a bind of the directory made before the pin (the path
itself shows the RAM side while pinned)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import Daemon, Env, journal_on_another_mount, make_env, running
from tests.system.helpers import tree, wait_for
from tests.system.test_silent_loss import remount
from tests.system.test_static_pins import assert_pinned_copy, disk_view

MODES = ["copy", "overlay"]

pytestmark = [pytest.mark.system, pytest.mark.parametrize("mode", MODES)]

MiB = 1024 * 1024
BIG = 48 * MiB

# rsync's temporary name for NAME: `.NAME.XXXXXX`
RSYNC_TEMP = re.compile(r"\..+\.[A-Za-z0-9]{6}")
# rampiped's own names: the scratch directory, the temporaries, the write-back's stash and hold
RAMPIPED_NAME = re.compile(
    r"\.rampiped-tmp|.*\.rampiped-tmp.*|.*\.rampiped-new|\.rampiped-apply|\.rampiped-held"
)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    # room on the disk for the journal of an overlay pin next to the data it is applied to;
    # the journal on another mount of that disk, so that the write-back copies its files with
    # rsync (linked into place, as from the journal on the directory's own mount, no rsync
    # writes a file: test_written_once.py and the crash matrix's apply:linked-one cover that)
    with make_env(tmp_path, disk_mb=768) as e:
        yield journal_on_another_mount(e)


# -- what a tree holds --------------------------------------------------------------------------


def short(value: bytes | str | None) -> str:
    if value is None:
        return "missing"
    if isinstance(value, str) or len(value) <= 40:
        return repr(value)
    return f"{value[:16]!r}... ({len(value)} bytes)"


def differences(
    expected: dict[str, bytes | str], found: dict[str, bytes | str], when: str
) -> list[str]:
    out = []
    for rel in sorted(expected.keys() | found.keys()):
        want, have = expected.get(rel), found.get(rel)
        if want != have:
            out.append(f"{when}: {rel}: expected {short(want)}, found {short(have)}")
    return out


def strays(found: dict[str, bytes | str], expected: dict[str, bytes | str], when: str) -> list[str]:
    """Entries of `found` not in `expected` named like rsync's or rampiped's temporaries, or
    inside a directory of rampiped's (its scratch directory)."""
    out = []
    for rel in sorted(found.keys() - expected.keys()):
        name = os.path.basename(rel)
        if any(RAMPIPED_NAME.fullmatch(part) for part in rel.split("/")):
            out.append(f"{when}: rampiped's name left behind: {rel} ({short(found[rel])})")
        elif RSYNC_TEMP.fullmatch(name):
            out.append(f"{when}: rsync's temporary left behind: {rel} ({short(found[rel])})")
    return out


def disk_problems(path: Path, expected: dict[str, bytes | str], when: str) -> list[str]:
    found = tree(path)
    return strays(found, expected, when) + differences(expected, found, when)


# -- the pin ------------------------------------------------------------------------------------


def configure(env: Env, path: Path, mode: str) -> None:
    env.write_config(
        adaptive={"enabled": False},
        ram={"max": "512M", "min_free": "64M"},
        pins=[{"path": str(path), "mode": mode}],
    )


def wait_pinned(env: Env, path: Path, mode: str) -> None:
    def made() -> bool:
        pins = [p for p in env.status()["pins"] if p["path"] == str(path)]
        return bool(pins) and pins[0]["state"] == "pinned"

    wait_for(made, 60, f"the {mode} pin of {path}")
    if mode == "copy":
        assert_pinned_copy(path)
    else:
        assert env.overlay_at(path), f"no overlay at {path}"


def clean_stop(daemon: Daemon, path: Path) -> None:
    code = daemon.stop()
    assert code == 0, f"the daemon exited {code}:\n{daemon.log_text()}"
    daemon.wait_log(rf"unpinned {re.escape(str(path))}: stopping; wrote")


def recovery_lines(daemon: Daemon) -> list[str]:
    rx = re.compile(
        r"adopted|finished an interrupted|applied the checkpoint journal|RAM copy lost"
        r"|temporary files|could not|left alone|stranded"
    )
    return [line for line in daemon.lines if rx.search(line)]


# -- 1. kill -9 of the daemon and its rsync during the final write-back ---------------------------

# The real rsync, unless FLAG exists and the destination (the last argument) is outside the
# journal: then the real rsync runs in the background until a temporary file of its transfer
# shows in the destination tree (a file in DEST/.rampiped-tmp/ or a new `.*.??????` name, of
# more than 1 MiB: a big file's, still being written at the kill), and then that rsync's
# processes (deepest first: the receiver owns the temporary file and removes it when it exits
# on an error), the rsync itself and the daemon that ran this script are killed with SIGKILL.
# What was seen and done goes to REPORT.
KILLING_RSYNC = r"""#!/bin/sh
real='{real}'
flag='{flag}'
report='{report}'
journal='{journal}'
if [ ! -e "$flag" ] || [ "$1" = "--version" ]; then
  exec "$real" "$@"
fi
for dest do :; done
dest=${{dest%/}}
case "$dest/" in
  "$journal"/*) exec "$real" "$@" ;;
esac
before="$report.before.$$"
find "$dest" -name '.*.??????' 2>/dev/null | sort > "$before"
# slowed down, so that the temporary file it is writing is still there when it is killed
"$real" --bwlimit=8m "$@" &
child=$!
alive() {{ [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }}
descendants() {{
  local c
  for c in $(pgrep -P "$1"); do descendants "$c"; echo "$c"; done
}}
deadline=$(( $(date +%s) + 30 ))
seen=
while [ -z "$seen" ] && alive "$child" && [ "$(date +%s)" -lt "$deadline" ]; do
  seen=$(find "$dest/.rampiped-tmp" -type f -size +1M 2>/dev/null | head -n 1)
  if [ -z "$seen" ]; then
    seen=$(find "$dest" -type f -name '.*.??????' -size +1M 2>/dev/null |
      grep -vxF -f "$before" | head -n 1)
  fi
  [ -n "$seen" ] || sleep 0.01
done
rm -f "$before"
if [ -z "$seen" ]; then
  echo "no temporary file seen in $dest: rsync left to finish" >> "$report"
  wait "$child"
  exit $?
fi
kids=$(descendants "$child")
for k in $kids; do kill -9 "$k" 2>/dev/null; done
pkill -9 -P "$child"
kill -9 "$child"
echo "caught: ${{seen#"$dest"/}} (in $dest)" >> "$report"
echo "killed rsync: $child $kids" | tr '\n' ' ' >> "$report"
echo >> "$report"
cmd=$(tr '\0' ' ' < "/proc/$PPID/cmdline")
case "$cmd" in
  *bin/rampiped\ *--config*)
    kill -9 "$PPID"
    echo "killed the daemon: $PPID" >> "$report" ;;
  *)
    echo "not killed: the parent $PPID is not the daemon: $cmd" >> "$report" ;;
esac
wait "$child"
exit 137
"""


def killing_rsync(env: Env, mp: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Put KILLING_RSYNC first on PATH (through `mp`); its flag file and its report."""
    bindir = env.tmp / "bin"
    bindir.mkdir()
    flag, report = env.tmp / "rsync-kills", env.tmp / "rsync-report"
    real = shutil.which("rsync")
    assert real is not None, "rsync is not installed"
    fake = bindir / "rsync"
    fake.write_text(KILLING_RSYNC.format(real=real, flag=flag, report=report, journal=env.journal))
    fake.chmod(0o755)
    mp.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return flag, report


def gone(pid: int) -> bool:
    """The process `pid` no longer runs (it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[:2] == ["State:", "Z"] for line in f)
    except FileNotFoundError:
        return True


def seed(d: Path) -> None:
    """A small repository-like tree on disk, before the pin."""
    for rel, text in {
        "README": "hello\n",
        "src/main.c": "int main(void) { return 0; }\n",
        "src/lib/util.c": "int util(void) { return 1; }\n",
        "docs/old.txt": "to be removed\n",
        ".git/HEAD": "ref: refs/heads/main\n",
        ".git/config": "[core]\n\tbare = false\n",
    }.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)


def write_through_the_pin(d: Path) -> None:
    """Big files (in subdirectories too, as git's objects) and small changes, in RAM."""
    for rel in (
        ".git/objects/28/12d6c6e0a4b5f3c2d1e0f9a8b7c6d5e4f3a2b1",
        ".git/objects/pack/pack-5e0f1d2c3b4a59687766554433221100ffeeddcc.pack",
        "assets/video.bin",
    ):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(d / rel, "wb") as f:
            for _ in range(BIG // MiB):
                f.write(os.urandom(MiB))
        os.chmod(d / rel, 0o444)
    (d / ".git/objects/28/aa01").write_bytes(b"small object\n")
    (d / ".git/HEAD").write_text("ref: refs/heads/work\n")
    (d / "README").write_text("hello, changed in RAM\n")
    (d / "src/new.c").write_text("int new(void) { return 2; }\n")
    (d / "docs/old.txt").unlink()


def test_kill_during_the_final_write_back(
    env: Env, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = env.disk.mountpoint / "repo"
    seed(d)
    configure(env, d, mode)
    # killed in the write-back after the unmount, which the next start finishes from the
    # journal (an overlay pin written back before its unmount stays pinned when killed then:
    # test_early_write_back.py)
    monkeypatch.setenv("RAMPIPED_TEST_LATE_WRITEBACK", "1")
    flag, report = killing_rsync(env, monkeypatch)
    problems: list[str] = []
    with disk_view(env, d) as disk:
        with running(env) as daemon:
            wait_pinned(env, d, mode)
            write_through_the_pin(d)
            expected = tree(d)
            flag.touch()
            code = daemon.stop()
        flag.unlink()
        said = report.read_text() if report.exists() else "(no report: the fake rsync never ran)"
        print(f"\n[{mode}] the killing rsync: {said.strip()}")
        assert "killed the daemon" in said and code == -9, (
            f"the daemon was not killed during its final write-back (exit {code}): {said}\n"
            + daemon.log_text()
        )
        killed = [int(p) for p in re.findall(r"\d+", said.split("killed rsync:")[1].split("\n")[0])]
        wait_for(lambda: all(gone(p) for p in killed), 10, f"the killed rsync {killed} to be gone")
        safety.count("crash points")
        assert "caught: " in said
        caught = said.split("caught: ")[1].split(" (in ")[0]
        # where that rsync wrote, below the pin's staging bind of the directory: the directory
        # itself, or the stage in its scratch directory (a copy pin's checkpoint writes whole
        # files there first: copywb/staged.py)
        below = said.split(" (in ")[1].split(")")[0].split("/disk", 1)[1].strip("/")
        caught = f"{below}/{caught}" if below else caught
        at_kill = tree(disk)
        assert caught in at_kill, f"the temporary {caught} was gone at the kill: {said}"
        print(
            f"[{mode}] on disk at the kill: {caught} "
            f"({short(at_kill.get(caught))}); rampiped's or rsync's names there: "
            f"{strays(at_kill, expected, 'at the kill')}"
        )

        with running(env) as again:
            wait_pinned(env, d, mode)
            lines = recovery_lines(again)
            print(f"[{mode}] the start after the kill:\n  " + "\n  ".join(lines))
            after_start = tree(disk)
            problems += strays(after_start, expected, "after the start")
            if mode == "overlay":
                # the recovery applied the journal of the final write-back before the new pin
                problems += differences(expected, after_start, "after the start")
            clean_stop(again, d)
    assert env.mounted_at(d) is None, f"{d} is still mounted after the stop"
    problems += disk_problems(d, expected, "after the stop")
    remount(env)
    found = tree(d)
    safety.count("files lost", sum(found.get(rel) != v for rel, v in expected.items()))
    problems += strays(found, expected, "after a remount") + differences(
        expected, found, "after a remount"
    )
    assert not problems, "\n".join(problems)


# -- 2. leftover names put by hand are removed at the start ---------------------------------------

# What a crash leaves: rampiped's scratch directory (at the top only) and its temporary names
LEFTOVERS = {
    ".rampiped-tmp/.video.bin.Ab12Cd": b"half a file\n",
    ".rampiped-tmp/.HEAD.Zz99yY": b"ref: refs\n",
    ".foo.rampiped-tmp-0123abcd": b"a database copy\n",
    "sub/.foo.rampiped-tmp-89abcdef": b"a database copy\n",
    "bar.rampiped-tmp": b"a handed-over file\n",
    "sub/deeper/bar.rampiped-tmp": b"a handed-over file\n",
    ".baz.rampiped-new": b"a held file's new version\n",
    "sub/deeper/.baz.rampiped-new": b"a held file's new version\n",
}
# A user's files with names like those: they stay
LOOKALIKES = {
    "notes.rampiped-tmpfile": b"mine\n",
    ".foo.rampiped-tmp-XYZ": b"mine\n",
    "sub/.foo.rampiped-tmp-0123ABCD": b"mine\n",
    "sub/.foo.rampiped-tmp-0123abc": b"mine\n",
    "rampiped-tmp": b"mine\n",
    "sub/x.rampiped-tmp.bak": b"mine\n",
    ".baz.rampiped-newer": b"mine\n",
    "sub/baz.rampiped-new": b"mine\n",
    "sub/.rampiped-tmp/keep.txt": b"mine: the scratch directory is at the top only\n",
}


def put(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def lookalikes_lost(root: Path, side: str, when: str) -> list[str]:
    """The user's LOOKALIKES that `root` no longer holds as they were."""
    found = tree(root)
    return [
        f"{when}, {side}: a user's {rel}: {short(found.get(rel))}"
        for rel, data in LOOKALIKES.items()
        if found.get(rel) != data
    ]


@pytest.mark.parametrize("crash", ["kill", "power-cut"])
def test_start_removes_leftover_names(env: Env, mode: str, crash: str) -> None:
    d = env.disk.mountpoint / "svc"
    put(d, {"a.conf": b"a = 1\n", "sub/deeper/b.conf": b"b = 2\n", **LOOKALIKES})
    configure(env, d, mode)
    problems: list[str] = []
    with disk_view(env, d) as disk:
        with running(env) as daemon:
            wait_pinned(env, d, mode)
            (d / "sub/c.conf").write_bytes(b"c = 3, in RAM\n")
            assert env.ctl("sync", check=True).returncode == 0
            for side, root in (("disk", disk), ("pinned path", d)):
                problems += lookalikes_lost(root, side, "after the pin and a checkpoint")
            daemon.kill()
        safety.count("crash points")
        if crash == "power-cut":
            safety.drop_ram(env.runtime.parent, env.disk.mountpoint)
            safety.count("power cuts")
        put(disk, LEFTOVERS)
        with running(env) as again:
            wait_pinned(env, d, mode)
            lines = recovery_lines(again)
            print(f"\n[{mode}, {crash}] the start:\n  " + "\n  ".join(lines))
            # An overlay adopted after a kill is mounted over the directory again, and its
            # lower must not change under it: the leftovers go once the stop frees the
            # directory (checked after the stop below). Every other start removes them.
            adopted_overlay = mode == "overlay" and crash == "kill"
            for side, root in (("disk", disk), ("pinned path", d)):
                found = tree(root)
                for rel in [*LEFTOVERS, ".rampiped-tmp"]:
                    if rel in found and not adopted_overlay:
                        problems.append(f"after the start, {side}: {rel} is still there")
                problems += lookalikes_lost(root, side, "after the start")
            expected = tree(d)
            clean_stop(again, d)
    assert env.mounted_at(d) is None, f"{d} is still mounted after the stop"
    for rel in [*LEFTOVERS, ".rampiped-tmp"]:
        expected.pop(rel, None)
    remount(env)
    found = tree(d)
    problems += strays(found, expected, "after the stop and a remount")
    problems += differences(expected, found, "after the stop and a remount")
    lost = lookalikes_lost(d, "disk", "after the stop and a remount")
    safety.count("files lost", len(lost))
    problems += lost
    assert not problems, "\n".join(problems)
