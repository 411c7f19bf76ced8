"""max_age on a booted Debian 12: `make install` with a volatile pin that has max_age, and
systemd's own systemd-tmpfiles-clean.service (what its timer starts daily) removes the pin's
old files, keeps a new one and one that a process holds open, and leaves no tmpfiles.d file
behind. Files are made old by letting max_age (2s) pass: every timestamp counts, ctime too."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.systemd.conftest import SOURCE_IN_GUEST, record
from tests.systemd.guest import Guest, GuestError, journal, pinned, wait

pytestmark = pytest.mark.systemd

CONF = "/etc/rampipe.conf"
PIN = "/srv/volatile-aged"
CONFIG = f"""\
# rampiped configuration of the max_age test
adaptive:
  enabled: false
pins:
  - path: {PIN}
    mode: volatile
    size: 16M
    max_age: 2s
"""


@pytest.fixture(scope="module")
def service(guest: Guest) -> Iterator[Guest]:
    guest.run(f"mkdir -p {PIN}")
    guest.write(f"{PIN}/on-disk", "on disk before the pin\n")
    guest.write(CONF, CONFIG)
    started = time.monotonic()
    proc = guest.run(f"cd {SOURCE_IN_GUEST} && make install", check=False, timeout=1200)
    record("make install for the max_age test", time.monotonic() - started)
    if proc.returncode != 0:
        raise GuestError(
            f"`make install` exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    try:
        wait(guest, lambda: pinned(guest, PIN), 60, f"{PIN} pinned")
        yield guest
    finally:
        guest.run("systemctl stop rp-holder.service", check=False)
        guest.run(f"cd {SOURCE_IN_GUEST} && make uninstall", check=False, timeout=300)


def test_systemd_tmpfiles_clean_removes_old_files_of_the_pin(service: Guest) -> None:
    dropin = service.run("systemctl cat systemd-tmpfiles-clean.service").stdout
    assert "ExecStartPre=-/opt/rampiped/bin/rampiped-tmpfiles write" in dropin
    assert "ExecStopPost=-/opt/rampiped/bin/rampiped-tmpfiles remove" in dropin
    service.run(f"echo unused > {PIN}/old && mkdir {PIN}/old-dir && echo x > {PIN}/old-dir/f")
    service.run(f"echo held > {PIN}/held")
    service.run(f"systemd-run --unit=rp-holder sh -c 'exec 3<{PIN}/held; exec sleep infinity'")
    wait(
        service,
        lambda: (
            service.run(
                "test -e /proc/$(systemctl show -P MainPID rp-holder)/fd/3", check=False
            ).returncode
            == 0
        ),
        30,
        "the holder to open its file",
    )
    made = float(service.run(f"stat -c %Z {PIN}/old {PIN}/held | sort -n | tail -1").stdout)
    wait(
        service,
        lambda: float(service.run("date +%s.%N").stdout) > made + 3.5,
        15,
        "max_age to pass in the guest",
    )
    service.run(f"echo new > {PIN}/new")
    service.run("systemctl start systemd-tmpfiles-clean.service")
    left = sorted(service.run(f"ls -A {PIN}").stdout.split())
    assert left == ["held", "new"]
    assert service.read(f"{PIN}/held") == "held\n"
    assert service.run(f"findmnt -n -o FSTYPE {PIN}").stdout.strip() == "tmpfs"
    assert service.run("test -e /run/tmpfiles.d/rampiped.conf", check=False).returncode == 1
    log = journal(service, "-u", "systemd-tmpfiles-clean.service")
    assert f"rampiped-tmpfiles: {PIN}: files unused for 2s go; 1 in use" in log
