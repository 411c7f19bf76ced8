"""Where fanotify is refused, as a container's seccomp filter refuses it (LXC on Proxmox,
systemd-nspawn by default): the real daemon, run under such a filter (refuse_syscalls.py),
starts, says once why adaptive pinning is off, and static and manual pins work, their
checkpoints and write-backs too. Refused at fanotify_init (nspawn), only at fanotify_mark (a
user namespace without CAP_SYS_ADMIN over the filesystem is refused so), or at
open_by_handle_at, without which no event could be attributed to a directory.

The disk side of each pinned directory is seen through a second bind made before the daemon
starts; after the stop, the loop filesystem is mounted again so that what it holds is read
from the device."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.daemon_harness import Daemon, Env, Writer, make_env, running
from tests.system.helpers import remount, tree, wait_for

pytestmark = pytest.mark.system

LAUNCHER = Path(__file__).with_name("refuse_syscalls.py")
WARNING = re.compile(
    r"^warning: fanotify is not available here \((fanotify_\w+|open_by_handle_at): ([^;]+);"
    r" [^)]+\): adaptive"
    r" pinning is off; static and manual pins work, their checkpoints and write-backs too$"
)
STRERROR = {"EPERM": "Operation not permitted", "ENOSYS": "Function not implemented"}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as e:
        yield e


@contextlib.contextmanager
def disk_view(env: Env, path: Path) -> Iterator[Path]:
    """A bind of the directory on disk, made before a pin covers `path`."""
    view = env.tmp / ("disk-view-" + path.name)
    view.mkdir()
    subprocess.run(["mount", "--bind", str(path), str(view)], check=True)
    try:
        yield view
    finally:
        subprocess.run(["umount", str(view)], capture_output=True)


def refused(call: str, err: str) -> list[str]:
    return [sys.executable, str(LAUNCHER), "--errno", err, call, "--"]


def warnings(daemon: Daemon) -> list[re.Match[str]]:
    return [m for m in map(WARNING.match, list(daemon.lines)) if m]


def reload(daemon: Daemon) -> None:
    before = sum("reloaded " in line for line in daemon.lines)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: sum("reloaded " in line for line in daemon.lines) > before, 30, "the reload")


def test_the_launcher_refuses(tmp_path: Path) -> None:
    """The filter does what the tests below rely on, and nothing more."""
    probe = (
        "from pyfanotify import ext\n"
        "c = ext.create()\n"
        "try:\n"
        "    ext.init(c, ext.FAN_CLASS_NOTIF | ext.FAN_REPORT_DFID_NAME, 0)\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
        "else:\n"
        "    print('allowed')\n"
    )
    for argv, expected in (
        ([], "allowed"),
        (refused("fanotify_init", "EPERM"), "1"),
        (refused("fanotify_init", "ENOSYS"), "38"),
        (refused("fanotify_mark", "EPERM"), "allowed"),
    ):
        out = subprocess.run(
            [*argv, sys.executable, "-c", probe], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected, argv
    bad = subprocess.run(
        [sys.executable, str(LAUNCHER), "fanotify_nope", "--", "true"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "unknown system call fanotify_nope" in bad.stderr


@pytest.mark.parametrize(
    ("call", "err"),
    [
        ("fanotify_init", "EPERM"),
        ("fanotify_mark", "EPERM"),
        ("fanotify_init", "ENOSYS"),
        ("open_by_handle_at", "EPERM"),  # LXC's default policy: events could not be named
    ],
)
def test_static_and_manual_pins_work_without_fanotify(env: Env, call: str, err: str) -> None:
    static = env.data / "static"
    manual = env.data / "manual"  # copy mode: its checkpoints go straight to the directory
    layered = env.data / "layered"  # overlay mode: to a journal, until the write-back
    for d in (static, manual, layered):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "before.txt").write_text(f"{d.name}: on disk before the start\n")
    env.write_config(pins=[{"path": str(static), "mode": "copy"}])
    with (
        disk_view(env, static) as static_disk,
        disk_view(env, manual) as manual_disk,
        running(env, prefix=refused(call, err)) as daemon,
    ):
        found = warnings(daemon)
        assert len(found) == 1, daemon.log_text()
        assert found[0].groups() == (call, STRERROR[err])
        # said before the daemon says it started, and the start says what it watches
        started = daemon.wait_log(r"rampiped \S+ started: watching (.*); (\d+) pinned$")
        assert started.groups() == (
            "nothing (adaptive pinning off: fanotify is not available here)",
            "1",
        )
        assert "Traceback" not in daemon.log_text()

        st = env.status()
        adaptive = st["adaptive_pinning"]
        assert (adaptive["on"], adaptive["fanotify"]) == (False, False)
        assert adaptive["reason"].startswith(
            f"fanotify is not available here ({call}: {STRERROR[err]}; "
        )
        assert [(p["path"], p["origin"], p["state"]) for p in st["pins"]] == [
            (str(static), "static", "pinned")
        ]
        text = env.ctl("status", check=True).stdout
        assert f"adaptive pinning: off ({adaptive['reason']})" in text.splitlines()

        env.ctl("pin", str(manual), "--mode", "copy", check=True)
        env.ctl("pin", str(layered), check=True)
        assert {p["path"]: (p["origin"], p["mode"]) for p in env.status()["pins"]} == {
            str(static): ("static", "copy"),
            str(manual): ("manual", "copy"),
            str(layered): ("manual", "overlay"),
        }
        explained = env.ctl("explain", str(manual), check=True).stdout.splitlines()
        assert explained[1:3] == [
            f"adaptive pinning is off: {adaptive['reason']}; static and manual pins work",
            "stays pinned until rampipectl unpin",
        ], explained

        # written through the pins: only in RAM until the sync
        for d in (static, manual, layered):
            (d / "sub" / "before.txt").write_text(f"{d.name}: changed through the pin\n")
            (d / "new.txt").write_text(f"{d.name}: new, synced\n")
        assert (static_disk / "new.txt").exists() is False
        assert (manual_disk / "new.txt").exists() is False
        env.ctl("sync", check=True)
        for d, disk in ((static, static_disk), (manual, manual_disk)):
            assert tree(disk) == tree(d), d

        # reloads neither repeat the warning nor lose a pin
        for _ in range(2):
            reload(daemon)
        assert len(warnings(daemon)) == 1, daemon.log_text()
        assert env.status()["adaptive_pinning"] == adaptive
        assert sorted(p["path"] for p in env.status()["pins"]) == [
            str(layered),
            str(manual),
            str(static),
        ]

        # after the sync: written back at the stop
        for d in (static, manual, layered):
            (d / "after-sync.txt").write_text(f"{d.name}: written back at the stop\n")
            (d / "new.txt").unlink()
        expected = {d.name: tree(d) for d in (static, manual, layered)}
        assert daemon.stop() == 0, daemon.log_text()
        assert len(warnings(daemon)) == 1
    remount(env.disk)
    for d in (static, manual, layered):
        assert tree(d) == expected[d.name], d
        assert (d / "after-sync.txt").read_text() == f"{d.name}: written back at the stop\n"
        assert not (d / "new.txt").exists()


def test_an_adopted_adaptive_pin_is_not_unpinned_for_want_of_events(env: Env) -> None:
    """A pin made for its write rate while fanotify worked, adopted by a start where it is
    refused: no event can arrive, which says nothing about its writes. It must not cool (the
    writer goes on writing into it) and is written back at the stop."""
    hot = env.data / "hot"
    writer = Writer(hot, rate=300)
    try:
        with running(env) as daemon:
            wait_for(lambda: env.overlay_at(hot), 20, "the hot directory to be pinned")
            pins = env.status()["pins"]
            assert [(p["path"], p["origin"]) for p in pins] == [(str(hot), "adaptive")]
            daemon.kill()  # the pin stays mounted, for the next start to adopt
        with running(env, prefix=refused("fanotify_init", "EPERM")) as daemon:
            daemon.wait_log(rf"adopted {re.escape(str(hot))}")
            assert len(warnings(daemon)) == 1
            cool_for = 2.0  # adaptive.cool_for of the harness' configuration
            # several decisions beyond cool_for, each of which saw no event from the pin
            wait_for(lambda: env.status()["uptime_s"] > cool_for + 3, 30, "time beyond cool_for")
            assert [(p["path"], p["origin"]) for p in env.status()["pins"]] == [
                (str(hot), "adaptive")
            ]
            assert not [line for line in daemon.lines if line.startswith("unpinned ")]
            assert env.overlay_at(hot)
            explained = env.ctl("explain", str(hot), check=True).stdout.splitlines()
            assert explained[2] == (
                "its writes cannot be counted: stays pinned until rampipectl unpin or a stop"
            ), explained
            written = writer.stop()
            expected = tree(hot)
            assert daemon.stop() == 0, daemon.log_text()
            daemon.wait_log(rf"unpinned {re.escape(str(hot))}: stopping")
    finally:
        writer.kill()
    assert written > 0
    remount(env.disk)
    assert tree(hot) == expected
