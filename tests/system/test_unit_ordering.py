"""Static pins' `before:` units are ordered after rampiped.service, as systemd itself sees it:
`systemd-analyze verify --generators=true` runs rampiped-generator the way PID 1 does (three
output directories), loads its drop-ins together with packaging/systemd/rampiped.service and
builds a start transaction. An ordering cannot be printed offline, so it is proven by a probe:
a drop-in that orders rampiped.service after the unit makes a cycle exactly when the
generator's drop-in orders the unit after rampiped.service."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing"),
]

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "systemd" / "rampiped.service"
GENERATOR = Path(sys.executable).parent / "rampiped-generator"
# Shaped like Proxmox's own: no default dependencies, so nothing but the drop-in orders it
# after rampiped (ordinary services are after basic.target, and so after rampiped, already).
FAKE_PVE_CLUSTER = """\
[Unit]
Description=stand-in for the Proxmox cluster filesystem
DefaultDependencies=no
Before=shutdown.target
Conflicts=shutdown.target

[Service]
ExecStart={bin}/pmxcfs

[Install]
WantedBy=multi-user.target
"""
JOURNAL_FLUSH = "systemd-journal-flush.service"


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.units = tmp / "units"
        self.gens = tmp / "generators"
        self.bin = tmp / "bin"
        self.conf = tmp / "rampipe.conf"
        for d in (self.units, self.gens, self.bin):
            d.mkdir()
        # verify wants the Exec*= programs to exist: stand-ins at paths of the test's own
        for name in ("rampiped", "rampipectl", "pmxcfs"):
            (self.bin / name).write_text("#!/bin/sh\n")
            (self.bin / name).chmod(0o755)
        text = UNIT.read_text()
        assert "/usr/local/bin/" in text
        (self.units / UNIT.name).write_text(text.replace("/usr/local/bin", str(self.bin)))
        (self.units / "pve-cluster.service").write_text(FAKE_PVE_CLUSTER.format(bin=self.bin))
        # what `make install` puts into /usr/lib/systemd/system-generators when CONF is not
        # /etc/rampipe.conf: the generator with the configuration's path
        wrapper = self.gens / "rampiped-generator"
        wrapper.write_text(f"#!/bin/sh\nRAMPIPED_CONFIG='{self.conf}' exec '{GENERATOR}' \"$@\"\n")
        wrapper.chmod(0o755)

    def probe(self, unit: str) -> None:
        """Order rampiped.service after `unit`: a cycle if `unit` is ordered after it too."""
        d = self.units / "rampiped.service.d"
        d.mkdir(exist_ok=True)
        (d / "probe.conf").write_text(f"[Unit]\nAfter={unit}\n")

    def verify(self, *units: str) -> tuple[int, str]:
        env = dict(
            os.environ,
            SYSTEMD_LOG_COLOR="0",
            # the test's units first; the trailing colon keeps the built-in search path, which
            # holds the generators' output directories and the machine's own units
            SYSTEMD_UNIT_PATH=f"{self.units}:",
            SYSTEMD_GENERATOR_PATH=str(self.gens),
        )
        # the generator must find the configuration through the wrapper alone
        env.pop("RAMPIPED_CONFIG", None)
        proc = subprocess.run(
            ["systemd-analyze", "verify", "--generators=true", *units],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        return proc.returncode, proc.stdout + proc.stderr


def pins_config(*before: str) -> str:
    units = ", ".join(before)
    return (
        "adaptive: {watch: []}\n"
        "pins:\n"
        "  - path: /var/lib/pve-cluster\n"
        "    mode: copy\n"
        "    sync_interval: 1m\n"
        f"    before: [{units}]\n"
    )


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_generated_dropins_are_valid_and_make_no_cycle(setup: Setup) -> None:
    setup.conf.write_text(pins_config("pve-cluster.service"))
    assert setup.verify(UNIT.name, "pve-cluster.service") == (0, "")


@pytest.mark.parametrize("unit", ["pve-cluster.service", JOURNAL_FLUSH])
def test_before_unit_is_ordered_after_rampiped(setup: Setup, unit: str) -> None:
    if unit == JOURNAL_FLUSH and not Path("/usr/lib/systemd/system", unit).exists():
        pytest.skip(f"{unit} is not installed on this machine")
    setup.conf.write_text(pins_config("pve-cluster.service", JOURNAL_FLUSH))
    # With the machine's real units: the /var/log recipe of the README makes no cycle either.
    assert setup.verify(UNIT.name, unit) == (0, "")
    setup.probe(unit)
    code, out = setup.verify(UNIT.name, unit)
    assert code != 0, out
    # (systemd reports the cycle from either end, in an order of its choosing)
    assert "Found ordering cycle" in out
    assert "Found dependency on" in out
    assert "rampiped.service/start" in out and f"{unit}/start" in out

    # The cycle comes from the generator's drop-in: without the pin's before: there is none.
    setup.conf.write_text(pins_config("corosync.service"))
    assert setup.verify(UNIT.name, unit) == (0, "")


def test_invalid_config_orders_nothing_and_fails_nothing(setup: Setup) -> None:
    setup.conf.write_text(pins_config("pve-cluster.service") + "bogus: 1\n")
    setup.probe("pve-cluster.service")
    code, out = setup.verify(UNIT.name, "pve-cluster.service")
    # The generator said why (on stderr, which systemd passes on) and ordered nothing.
    assert code == 0, out
    assert f"rampiped-generator: {setup.conf}:7: bogus: unknown key" in out
    assert "no unit is ordered after rampiped.service" in out
    assert "cycle" not in out
