"""Checkpoints of a pinned directory that never holds still (issue 12, item 5), through the real
daemon, in copy and in overlay mode.

A file that vanishes, shrinks or turns into a directory while a checkpoint reads it must not
fail the checkpoint: it is taken at the next one. Under constant churn the oldest change not
yet on disk must stay under two checkpoint intervals.

A churner (a separate process) keeps about 50 names of a static pin with `sync_interval: 2s`
changing as fast as it can with a small pacing: files of random sizes created, rewritten,
patched in place and truncated (a shrink during rsync's read: "read errors mapping"), replaced
by directories and back ("send_files failed to open ...: Is a directory (21)"), renamed,
hard-linked and deleted ("file has vanished"). Every 20 ms it also replaces two marker files
(temporary name + rename) holding the time.time() of that moment: `clock`, which rsync reads
and writes before the churned names, and `zz/clock`, which it reads and writes after them.

For 15 s the test reads the pin's last checkpoint from `rampipectl status --json` (every
distinct record) and, in a thread, the markers on the disk side: in copy mode through a bind
of the directory made before the pin (where checkpoints write), in overlay mode in the newest
complete generation of the pin's journal. A pass that has written `zz/clock` no older than
`clock` has put on disk every change made before `clock`'s time (a change after rsync read a
file is newer than `clock`); while a pass is under way (`clock` newer than `zz/clock`) only the
last complete pass counts. So at a sample the oldest change not on disk is at most `now` minus
that time old (give or take the 20 ms of the markers, and the files rsync skipped because they
changed under it: those are taken at the next pass). That lag must stay under two intervals
(4 s), no checkpoint may fail, and at least 5 must have been made. Seen here: 1.8 to 2.0 s in
copy mode and 2.2 s in overlay mode at a 2 s interval; 0.9 to 1.1 s and 1.6 to 1.7 s at 1 s.

Then the churner stops, `rampipectl sync` runs, and after a clean stop the disk holds exactly
what the pinned path showed just before the stop (names, bytes, file or directory)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from rampiped import pins as pinsmod
from tests.system.daemon_harness import Daemon, Env, make_env, running
from tests.system.helpers import tree, wait_for
from tests.system.test_static_pins import assert_pinned_copy, disk_view, the_pin

pytestmark = [pytest.mark.system, pytest.mark.parametrize("mode", ["copy", "overlay"])]

INTERVAL = 2.0  # the pin's sync_interval, in seconds
CHURN_SECONDS = 15.0
NAMES = 50

# argv: root, seed, pause after each operation (s). Prints "ready" once the marker exists,
# churns until SIGTERM, then prints the count of each operation (and of refused ones) as JSON.
CHURNER = r"""
import json, os, random, shutil, signal, sys, time

root, seed, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rng = random.Random(seed)
names = [os.path.join(root, "n%02d" % i) for i in range(NAMES)]
markers = [os.path.join(root, "clock"), os.path.join(root, "zz", "clock")]
os.makedirs(os.path.dirname(markers[1]), exist_ok=True)
pool = os.urandom(512 * 1024)
stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)


def blob(most=200 * 1024):
    n = rng.randrange(0, most)
    off = rng.randrange(0, len(pool) - n)
    return pool[off:off + n]


def remove(p):
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    else:
        os.unlink(p)


def write(p):  # a new file, or a rewrite from scratch; a directory turns into a file
    if os.path.isdir(p):
        shutil.rmtree(p)
    with open(p, "wb") as f:
        f.write(blob())


def truncate(p):  # shrinks under a reader
    os.truncate(p, rng.randrange(0, os.stat(p).st_size // 2 + 1))


def patch(p):  # in place, somewhere in the file or past its end
    with open(p, "r+b") as f:
        f.seek(rng.randrange(0, os.fstat(f.fileno()).st_size + 1))
        f.write(blob(64 * 1024))


def make_dir(p):  # a file turns into a directory with files in it
    if os.path.lexists(p):
        remove(p)
    os.mkdir(p)
    for i in range(rng.randrange(1, 4)):
        with open(os.path.join(p, "f%d" % i), "wb") as f:
            f.write(blob())


def rename(p):
    os.rename(p, rng.choice(names))


def link(p):
    q = rng.choice(names)
    if q != p and os.path.lexists(q):
        remove(q)
    os.link(p, q)


def delete(p):
    remove(p)


OPS = [write] * 3 + [truncate] * 2 + [patch] * 2 + [make_dir, rename] * 2 + [link, delete]
counts = {op.__name__: 0 for op in OPS}
counts["refused"] = 0


def tick():
    now = time.time()
    for marker in markers:
        with open(marker + ".tmp", "w") as f:
            f.write(repr(now))
        os.rename(marker + ".tmp", marker)
    return now + 0.02


next_clock = tick()
print("ready", flush=True)
while not stop:
    if time.time() >= next_clock:
        next_clock = tick()
    op = rng.choice(OPS)
    try:
        op(rng.choice(names))
        counts[op.__name__] += 1
    except OSError:  # the name is missing or of the wrong kind for this operation
        counts["refused"] += 1
    time.sleep(pause)
next_clock = tick()
print(json.dumps(counts), flush=True)
""".replace("NAMES", str(NAMES))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as e:
        yield e


class Churner:
    def __init__(self, root: Path, seed: int, pause: float = 0.001) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHURNER, str(root), str(seed), str(pause)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.started = time.time()

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, f"the churner exited {self.proc.returncode}"
        counts: dict[str, int] = json.loads(out.strip().splitlines()[-1])
        return counts

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def churning(root: Path, seed: int) -> Iterator[Churner]:
    c = Churner(root, seed)
    try:
        yield c
    finally:
        c.kill()


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, children first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        below = parents.get(todo.pop(), [])
        out += below
        todo += below
    return out


def children(daemon: Daemon) -> list[str]:
    """The command lines of the processes below the daemon (a checkpoint's rsync)."""
    out = []
    for pid in descendants(daemon.proc.pid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            out.append(f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace")[:300])
    return out


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


@contextlib.contextmanager
def children_killed(daemon: Daemon) -> Iterator[None]:
    """When the test fails with the daemon still running, its children (an rsync that hangs)
    are killed before it is: left behind, they would keep the loop filesystem busy. The
    daemon is stopped (SIGSTOP) first, so that it starts no new one meanwhile."""
    try:
        yield
    finally:
        if daemon.proc.poll() is None:
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            wait_for(lambda: stopped(daemon.proc.pid), 10, "the daemon to stop (SIGSTOP)")
            for pid in descendants(daemon.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# -- what is on disk ----------------------------------------------------------------------------


def newest_generation(journal: Path) -> Path | None:
    """The newest complete generation of an overlay pin's journal (gen-N, not gen-N.tmp)."""
    gens = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(journal):
            m = re.fullmatch(r"gen-([0-9]+)", name)
            if m:
                gens.append(int(m.group(1)))
    return journal / f"gen-{max(gens)}" if gens else None


def markers_on_disk(
    env: Env, path: Path, mode: str, disk: Path | None
) -> tuple[float, float] | None:
    """The times `clock` and `zz/clock` hold on the disk side; None while not both are there."""
    for _ in range(20):  # a generation may be removed while it is read: look again
        if mode == "copy":
            assert disk is not None
            where: Path | None = disk
        else:
            where = newest_generation(env.journal / pinsmod.pin_id(str(path)))
        if where is None:
            return None
        try:
            first, last = (where / "clock").read_text(), (where / "zz" / "clock").read_text()
        except FileNotFoundError:
            if mode == "copy":
                return None
            continue
        return float(first), float(last)  # replaced by a rename on both sides: never torn
    raise AssertionError(f"no generation of the journal of {path} held still long enough")


class LagSampler(threading.Thread):
    """Reads the markers on the disk side every 20 ms: the age of the oldest change not on
    disk at each sample (see the module's docstring; before a pass has put both markers on
    disk, the time since the churn began)."""

    def __init__(self, env: Env, path: Path, mode: str, disk: Path | None, since: float) -> None:
        super().__init__(daemon=True)
        self.args = (env, path, mode, disk)
        self.complete = since  # everything changed before this is on disk
        self.lags: list[float] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while not self.done.is_set():
                found = markers_on_disk(*self.args)
                now = time.time()
                if found is not None and found[1] >= found[0]:
                    self.complete = max(self.complete, found[0])
                self.lags.append(now - self.complete)
                self.done.wait(0.02)  # the pace of the measurement, not a synchronisation
        except BaseException as exc:
            self.error = exc


# -- what a tree holds --------------------------------------------------------------------------


def describe(entry: bytes | str | None) -> str:
    if entry is None:
        return "missing"
    if isinstance(entry, str):
        return entry
    return f"a file of {len(entry)} bytes"


def differences(expected: dict[str, bytes | str], found: dict[str, bytes | str]) -> list[str]:
    return [
        f"{rel}: pinned view had {describe(expected.get(rel))}, disk has"
        f" {describe(found.get(rel))}"
        + (" (other bytes)" if isinstance(found.get(rel), bytes) and rel in expected else "")
        for rel in sorted(expected.keys() | found.keys())
        if expected.get(rel) != found.get(rel)
    ]


# -- the test -----------------------------------------------------------------------------------


def populate(d: Path) -> None:
    """Half of the churner's names exist before the pin: files, and directories with files
    (in overlay mode the lower layer has something to rename, link, shrink and delete)."""
    for i in range(0, NAMES, 2):
        p = d / f"n{i:02d}"
        if i % 10 == 0:
            p.mkdir()
            (p / "f0").write_bytes(os.urandom(i * 1000))
        else:
            p.write_bytes(os.urandom(i * 4000))


def test_checkpoints_under_constant_churn(env: Env, mode: str) -> None:
    d = env.disk.mountpoint / "churn"
    d.mkdir()
    populate(d)
    env.write_config(
        adaptive={"enabled": False},
        pins=[{"path": str(d), "mode": mode, "sync_interval": f"{INTERVAL:g}s"}],
    )
    seed = int.from_bytes(os.urandom(4), "little")
    view = disk_view(env, d) if mode == "copy" else contextlib.nullcontext(None)
    with view as disk, running(env) as daemon, children_killed(daemon):
        wait_for(lambda: the_pin(env, d)["state"] == "pinned", 30, f"the {mode} pin of {d}")
        if mode == "copy":
            assert_pinned_copy(d)
        else:
            assert env.overlay_at(d), f"no overlay at {d}"
        log_from = len(daemon.lines)

        records: dict[tuple[Any, ...], dict[str, Any]] = {}
        risk = 0.0
        with churning(d, seed) as churner:
            sampler = LagSampler(env, d, mode, disk, churner.started)
            sampler.start()
            try:
                deadline = churner.started + CHURN_SECONDS
                while time.time() < deadline:
                    pin = the_pin(env, d)
                    risk = max(risk, pin["data_at_risk_s"])
                    last = pin["last_sync"]
                    if last is not None:
                        records[tuple(sorted(last.items()))] = last
            finally:
                sampler.done.set()
                sampler.join(10)
            counts = churner.stop()
        assert sampler.error is None, f"reading the marker on disk: {sampler.error!r}"
        log = daemon.lines[log_from:]

        # the records of checkpoints made before the churn began do not count
        seen = [r for r in records.values() if _wall(r["time"]) >= int(churner.started)]
        failed = [r for r in seen if not r["ok"]]
        failed_lines = [ln for ln in log if re.search(r"checkpoint of .* failed", ln)]
        failures = max(len(failed), len(failed_lines))  # the log has them all
        ok_lines = [ln for ln in log if re.search(r"checkpoint of .* \(periodic", ln)]
        lag = max(sampler.lags)
        median = statistics.median(r["seconds"] for r in seen) if seen else float("nan")
        ops = sum(v for k, v in counts.items() if k != "refused")
        print(
            f"\nchurn ({mode}): {len(seen)} checkpoints, {failures} failed, oldest change"
            f" not on disk at most {lag:.1f} s (interval {INTERVAL:g} s); median checkpoint"
            f" {median:.2f} s; log: {len(ok_lines)} periodic ok, {len(failed_lines)} failed;"
            f" daemon's data_at_risk_s at most {risk:.1f}; churner: {ops} operations"
            f" ({ops / CHURN_SECONDS:.0f}/s, {counts['refused']} refused) {counts}, seed {seed},"
            f" {len(sampler.lags)} lag samples"
        )
        errors = failed_lines or [str(r["error"]) for r in failed]
        assert not failures, f"{failures} failed checkpoints:\n" + "\n".join(
            e[:2500] for e in errors[:5]
        )
        assert lag < 2 * INTERVAL, (
            f"the oldest change not on disk was {lag:.2f} s old (interval {INTERVAL:g} s);"
            f" the daemon's children now: {children(daemon)}; its last checkpoints:\n"
            + "\n".join(ln for ln in log if "checkpoint of" in ln)
        )
        assert len(seen) >= 5, f"only {len(seen)} checkpoints in {CHURN_SECONDS:g} s: {seen}"

        env.ctl("sync", check=True)
        expected = tree(d)
        code = daemon.stop()
        assert code == 0, f"the daemon exited {code}:\n{daemon.log_text()}"
    assert env.mounted_at(d) is None, f"{d} is still mounted after the stop"
    assert "clock" in expected and "zz/clock" in expected
    problems = differences(expected, tree(d))
    assert not problems, f"{len(problems)} differences after the stop:\n" + "\n".join(problems[:40])


def _wall(iso: str) -> int:
    """The wall-clock second of a status time (2024-05-01T12:00:00+0200)."""
    return int(datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z").timestamp())
