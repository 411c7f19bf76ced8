"""rampiped installed with `make install` in a container whose seccomp filter refuses fanotify:
a Debian 12 guest booted by systemd-nspawn with its own filter as it is (no
--system-call-filter=fanotify_init ...), as on a Proxmox host's LXC container. The service
starts and stays active, the journal says once why adaptive pinning is off, and a static pin
and a manual pin are made, checkpointed and written back at the stop.

What the guest's disk holds is read from the host (`host_path`: below the guest's mounts)."""

from __future__ import annotations

import json
import platform
import re
import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system.refuse_syscalls import ARCHES
from tests.systemd.conftest import SOURCE_IN_GUEST, record
from tests.systemd.guest import Guest, GuestError, pinned, wait

pytestmark = pytest.mark.systemd

CONF = "/etc/rampipe.conf"
STATIC = "/srv/static"
MANUAL = "/srv/manual"
CONFIG = f"""\
# rampiped in a container without fanotify: static and manual pins only
adaptive:
  watch:
    - path: /srv/hot
      depth: 1
pins:
  - path: {STATIC}
    mode: copy
"""
WARNING = re.compile(
    r"^fanotify is not available here \(fanotify_init: Operation not permitted; a container's"
    r" seccomp filter or a user namespace refuses it\): adaptive pinning is off; static and"
    r" manual pins work, their checkpoints and write-backs too$",
    re.M,
)


def journal(guest: Guest) -> str:
    argv = ["journalctl", "--no-pager", "-o", "cat", "-u", "rampiped"]
    return guest.run(shlex.join(argv), check=False).stdout


def status(guest: Guest) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(guest.run("rampipectl status --json").stdout)
    return out


def show(guest: Guest, prop: str) -> str:
    return guest.run(f"systemctl show -p {prop} --value rampiped").stdout.strip()


def on_disk(guest: Guest, path: str) -> str | None:
    host = guest.host_path(path)
    return host.read_text() if host.exists() else None


@pytest.fixture(scope="module")
def service(guest_without_fanotify: Guest) -> Iterator[Guest]:
    guest = guest_without_fanotify
    # the premise: this container refuses fanotify_init (nspawn's filter, as it is). Asked of
    # a service, which inherits the filter from the guest's init (commands that enter the
    # guest from the host do not).
    nr = ARCHES[platform.machine()][1]["fanotify_init"]
    probe = guest.run(
        "systemd-run --quiet --wait --pipe python3 -c 'import ctypes;"
        " libc = ctypes.CDLL(None, use_errno=True);"
        f" print(libc.syscall({nr}, 0, 0), ctypes.get_errno())'"
    ).stdout.split()
    assert probe == ["-1", "1"], f"fanotify_init is not refused with EPERM here: {probe}"
    for path in (STATIC, MANUAL, "/srv/hot"):
        guest.run(f"mkdir -p {path}")
    guest.write(f"{STATIC}/before", "static: on disk before the start\n")
    guest.write(f"{MANUAL}/before", "manual: on disk before the pin\n")
    guest.write(CONF, CONFIG)
    started = time.monotonic()
    proc = guest.run(f"cd {SOURCE_IN_GUEST} && make install", check=False, timeout=1200)
    record("make install in the guest without fanotify", time.monotonic() - started)
    if proc.returncode != 0:
        raise GuestError(
            f"`make install` exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    try:
        yield guest
    finally:
        guest.run(f"cd {SOURCE_IN_GUEST} && make uninstall", check=False, timeout=300)


def test_the_service_runs_with_static_and_manual_pins(service: Guest) -> None:
    guest = service
    assert show(guest, "ActiveState") == "active"
    assert show(guest, "SubState") == "running"
    wait(guest, lambda: pinned(guest, STATIC), 60, f"{STATIC} pinned")
    log = journal(guest)
    assert len(WARNING.findall(log)) == 1, log
    assert "Traceback" not in log
    assert "adaptive pinning off: fanotify not available" in show(guest, "StatusText")
    adaptive = status(guest)["adaptive_pinning"]
    assert adaptive == {
        "on": False,
        "reason": "fanotify is not available here (fanotify_init: Operation not permitted;"
        " a container's seccomp filter or a user namespace refuses it)",
        "fanotify": False,
    }
    assert f"adaptive pinning: off ({adaptive['reason']})" in guest.run("rampipectl status").stdout

    guest.run(f"rampipectl pin --mode copy {MANUAL}")
    assert {p["path"]: p["origin"] for p in status(guest)["pins"]} == {
        STATIC: "static",
        MANUAL: "manual",
    }
    explained = guest.run(f"rampipectl explain {MANUAL}").stdout
    assert f"adaptive pinning is off: {adaptive['reason']}; static and manual pins work" in (
        explained
    )

    # through the pins: in RAM, on disk after the sync
    for path in (STATIC, MANUAL):
        guest.write(f"{path}/synced", f"{path}: written through the pin\n")
        assert on_disk(guest, f"{path}/synced") is None
    guest.run("rampipectl sync")
    for path in (STATIC, MANUAL):
        assert on_disk(guest, f"{path}/synced") == f"{path}: written through the pin\n"

    # a reload does not repeat the warning
    guest.run("systemctl reload rampiped")
    assert show(guest, "ActiveState") == "active"
    assert len(WARNING.findall(journal(guest))) == 1

    # written back at the stop
    for path in (STATIC, MANUAL):
        guest.write(f"{path}/at-stop", f"{path}: written back at the stop\n")
    guest.run("systemctl stop rampiped", timeout=180)
    assert show(guest, "Result") == "success"
    for path in (STATIC, MANUAL):
        assert on_disk(guest, f"{path}/at-stop") == f"{path}: written back at the stop\n"
        assert on_disk(guest, f"{path}/synced") == f"{path}: written through the pin\n"
    mounts = guest.run("findmnt --list --noheadings --output TARGET").stdout.split()
    assert STATIC not in mounts and MANUAL not in mounts
