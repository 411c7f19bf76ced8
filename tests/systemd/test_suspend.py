"""Sleep on a booted Debian 12: rampiped holds a logind "delay" lock on sleep, and a suspend
that logind announces leads to a checkpoint of every pin before the lock is released; after the
resume the lock is taken again. A PrepareForSleep emitted by anyone but logind changes nothing.

A container cannot suspend the machine, and logind refuses to try while /sys/power/state is
not writable (nspawn mounts /sys read-only). Inside the guest's own mount namespace a writable
file is bound over /sys/power/state: logind then runs the real suspend sequence (announcement,
waiting for delay locks, sleep.target, systemd-sleep writing "mem"), and the "mem" lands in that
file. The host's /sys is never touched: the bind is checked before the suspend is asked for,
and the guest's /sys stays read-only below it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests.systemd.conftest import installed, record
from tests.systemd.guest import Guest, journal, wait

pytestmark = pytest.mark.systemd

CONF = "/etc/rampipe.conf"
PIN = "/srv/sleep-pin"
FAKE_STATE = "/run/rampiped-test-power-state"
CONFIG = f"""\
# rampiped configuration of the suspend test
sync:
  interval: 0
adaptive:
  enabled: false
pins:
  - path: {PIN}
    mode: overlay
"""


def cursor(guest: Guest) -> str:
    out = guest.run("journalctl --no-pager -n 0 --show-cursor").stdout
    return out.strip().rsplit("cursor: ", 1)[-1]


def main_pid(guest: Guest) -> str:
    return guest.run("systemctl show -p MainPID --value rampiped").stdout.strip()


def inhibitors(guest: Guest) -> list[dict[str, str]]:
    """`systemd-inhibit --list` as rows (WHO UID USER PID COMM WHAT WHY MODE)."""
    out = guest.run("systemd-inhibit --list --no-pager --no-legend", check=False).stdout
    rows = []
    for line in out.splitlines():
        # WHY may contain spaces: the fixed columns are split from both ends
        parts = line.split()
        if len(parts) < 8:
            continue
        who, _uid, _user, pid, comm, what = parts[:6]
        rows.append(
            {"who": who, "pid": pid, "comm": comm, "what": what, "mode": parts[-1], "line": line}
        )
    return rows


def rampiped_lock(guest: Guest) -> dict[str, str] | None:
    pid = main_pid(guest)
    for row in inhibitors(guest):
        if row["who"] == "rampiped" and row["pid"] == pid:
            return row
    return None


@pytest.fixture(scope="module")
def service(guest: Guest) -> Iterator[Guest]:
    with installed(guest, PIN, CONF, CONFIG, "suspend test") as installed_guest:
        yield installed_guest


def test_the_delay_lock_shows_in_systemd_inhibit(service: Guest) -> None:
    row = wait(service, lambda: rampiped_lock(service), 30, "rampiped's inhibitor lock")
    assert row["what"] == "sleep", row["line"]
    assert row["mode"] == "delay", row["line"]
    assert "before the system sleeps" in row["line"]


def test_a_suspend_checkpoints_before_the_lock_is_released(service: Guest) -> None:
    wait(service, lambda: rampiped_lock(service), 30, "rampiped's inhibitor lock")
    service.write(f"{PIN}/written-before-sleep", "only in RAM until the checkpoint\n")
    since = cursor(service)
    # Anyone may emit a signal with logind's path and interface; only logind's count.
    service.run(
        "busctl emit /org/freedesktop/login1 org.freedesktop.login1.Manager PrepareForSleep b true"
    )
    service.run(
        f"printf 'freeze mem\\n' > {FAKE_STATE} && mount --bind {FAKE_STATE} /sys/power/state"
    )
    try:
        bound = service.run("findmnt --noheadings --output SOURCE /sys/power/state").stdout
        assert FAKE_STATE.rsplit("/", 1)[-1] in bound, bound
        started = time.monotonic()
        service.run("systemctl suspend", timeout=60)
        wait(
            service,
            lambda: (
                "the system resumed from sleep"
                in journal(service, "-u", "rampiped", f"--after-cursor={since}")
            ),
            60,
            "the resume",
        )
        record("suspend round trip", time.monotonic() - started)
        # the sleep really ran, after the lock was released: systemd-sleep wrote the state
        assert service.read(FAKE_STATE).strip() == "mem"
    finally:
        service.run("umount /sys/power/state", check=False)
    logged = journal(service, "-u", "rampiped", f"--after-cursor={since}").splitlines()

    def index(pattern: str) -> int:
        found = [i for i, text in enumerate(logged) if re.search(pattern, text)]
        assert found, f"no {pattern!r} in:\n" + "\n".join(logged)
        return found[0]

    # one announcement: the forged one never reached the daemon
    assert sum("about to sleep" in text for text in logged) == 1, logged
    about = index(r"the system is about to sleep")
    checkpoint = index(rf"checkpoint of {re.escape(PIN)} \(before sleep\): \d+ files")
    released = index(r"released the sleep inhibitor: checkpointed 1 pins")
    resumed = index(r"the system resumed from sleep")
    holding = [i for i, t in enumerate(logged) if "holding a sleep inhibitor" in t]
    assert about < checkpoint < released < resumed < holding[-1], logged
    # systemd-sleep ran only after the release (logind waited for the delay lock)
    everything = journal(service, "-o", "short-monotonic", f"--after-cursor={since}")
    sleep_at = everything.find("Entering sleep state")
    release_at = everything.find("released the sleep inhibitor")
    assert 0 <= release_at < sleep_at, everything[-3000:]
    # what the checkpoint wrote is on disk, in the pin's journal
    found = service.run(
        "ls /var/lib/rampiped/*/gen-*/written-before-sleep 2>/dev/null", check=False
    ).stdout
    assert found.strip(), "the checkpoint before sleep is not in the journal"
    # and the lock is held again
    row = wait(service, lambda: rampiped_lock(service), 30, "the lock after the resume")
    assert row["mode"] == "delay"
