"""max_age on a booted Debian 12: `make install` with a volatile pin that has max_age, and
systemd's own systemd-tmpfiles-clean.service (what its timer starts daily) removes the pin's
old files, keeps a new one and one that a process holds open, and leaves no tmpfiles.d file
behind. Files are made old by letting max_age (2s) pass: every timestamp counts, ctime too."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.systemd.conftest import installed
from tests.systemd.guest import Guest, journal, wait

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
    with installed(
        guest,
        PIN,
        CONF,
        CONFIG,
        "max_age test",
        before_uninstall="systemctl stop rp-holder.service",
    ) as installed_guest:
        yield installed_guest


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
