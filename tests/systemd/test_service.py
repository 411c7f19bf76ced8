"""rampiped as a systemd service on a booted Debian 12: install, start, pin, reload, crash,
power off, uninstall. The tests are one story and run in file order on the same machine; each
one re-establishes what it needs (a running writer, a pin) rather than trusting the previous.

The watch root is /srv/hot with candidates one level below it; /srv/hot/busy gets a steady
writer (each write in its own open/close, so that it never holds a file across the pin), and
/srv/hot/quiet never changes. Every write is fsynced and then counted in a ledger outside the
watched tree, so that after a power-off the disk can be compared with what was written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.systemd.conftest import SOURCE_IN_GUEST, record
from tests.systemd.guest import Guest, GuestError, wait

pytestmark = pytest.mark.systemd

CONF = "/etc/rampipe.conf"
BUSY = "/srv/hot/busy"
QUIET = "/srv/hot/quiet"
STATIC = "/srv/static"
LEDGER = "/var/lib/rampiped-test/ledger"
WRITER = "/usr/local/lib/rampiped-test/writer.py"
WRITER_UNIT = "rp-writer"
LINES_PER_FILE = 200
STATUS_FIELDS = {
    "path",
    "mode",
    "state",
    "rate",
    "ram_bytes",
    "dirty_bytes",
    "pinned_since",
    "last_sync",
}

BASE_CONFIG = """\
# rampiped configuration of the booted-systemd test
adaptive:
  watch:
    - path: /srv/hot
      depth: 1
  half_life: 2s
  pin_above: 50
  hot_for: 2s
  cool_for: 10s
"""
# The reload test adds a static pin: seen applied when /srv/static becomes a mount.
CHANGED_CONFIG = (
    BASE_CONFIG
    + """\
pins:
  - path: /srv/static
    mode: copy
"""
)
# A typo in a key: valid YAML, invalid configuration.
BAD_KEY = "pin_abvoe"
BROKEN_CONFIG = CHANGED_CONFIG.replace("  pin_above: 50\n", f"  pin_above: 50\n  {BAD_KEY}: 60\n")
BAD_LINE = BROKEN_CONFIG.splitlines().index(f"  {BAD_KEY}: 60") + 1

WRITER_SOURCE = f'''\
"""Appends numbered lines to files in a directory at a steady rate; each write opens, writes,
fsyncs and closes the file, then the ledger records how many lines were written in all."""
import os
import sys
import time

target, ledger, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
n = 0
try:
    with open(ledger) as f:
        n = int(f.read())
except FileNotFoundError:
    pass
while True:
    name = os.path.join(target, "f%05d.log" % (n // {LINES_PER_FILE}))
    with open(name, "a") as f:
        f.write("%08d %s\\n" % (n, "x" * 40))
        f.flush()
        os.fsync(f.fileno())
    n += 1
    with open(ledger + ".tmp", "w") as f:
        f.write("%d\\n" % n)
        f.flush()
        os.fsync(f.fileno())
    os.replace(ledger + ".tmp", ledger)
    time.sleep(1.0 / rate)
'''


# What `make install` puts where from the checkout, besides the venv, the commands and the unit.
DOCS = {
    "/usr/local/share/man/man8/rampiped.8": "man/rampiped.8",
    "/usr/local/share/man/man8/rampipectl.8": "man/rampipectl.8",
    "/usr/local/share/man/man5/rampipe.conf.5": "man/rampipe.conf.5",
    "/usr/local/share/bash-completion/completions/rampipectl": (
        "packaging/bash-completion/rampipectl"
    ),
}
# What the first `make install` printed, for the test that reads it.
INSTALL_OUTPUT: dict[str, str] = {}


def line(n: int) -> str:
    return f"{n:08d} {'x' * 40}"


# -- helpers -----------------------------------------------------------------------------------


def show(guest: Guest, prop: str, unit: str = "rampiped") -> str:
    return guest.run(f"systemctl show -p {prop} --value {unit}").stdout.strip()


def journal(guest: Guest, *args: str) -> str:
    argv = ["journalctl", "--no-pager", "-o", "cat", "-u", "rampiped", *args]
    return guest.run(shlex.join(argv), check=False).stdout


def cursor(guest: Guest) -> str:
    out = guest.run("journalctl --no-pager -n 0 --show-cursor").stdout
    return out.strip().rsplit("cursor: ", 1)[-1]


def pins(guest: Guest) -> dict[str, dict[str, Any]] | None:
    """The pins `rampipectl status --json` lists, by path; None when it fails."""
    proc = guest.run("rampipectl status --json", check=False)
    if proc.returncode != 0:
        return None
    data = json.loads(proc.stdout)
    items = data.get("pins", []) if isinstance(data, dict) else data
    if isinstance(items, dict):  # keyed by path
        items = [dict(v, path=k) for k, v in items.items()]
    return {p["path"]: p for p in items}


def mounts_under(guest: Guest, prefix: str) -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount at or below `prefix` inside the guest, in order."""
    out = guest.run("findmnt --list --json --output TARGET,FSTYPE").stdout
    return [
        (m["target"], m["fstype"])
        for m in json.loads(out)["filesystems"]
        if m["target"] == prefix or m["target"].startswith(prefix + "/")
    ]


def ensure_writer(guest: Guest) -> None:
    if guest.run(f"systemctl is-active --quiet {WRITER_UNIT}", check=False).returncode == 0:
        return
    guest.run(f"systemctl reset-failed {WRITER_UNIT} 2>/dev/null || true")
    # A transient service: stopped at shutdown before rampiped, like any ordinary service.
    guest.run(
        f"systemd-run --quiet --unit={WRITER_UNIT} --property=WorkingDirectory=/ "
        f"/usr/bin/python3 {WRITER} {BUSY} {LEDGER} 100"
    )


def ledger(guest: Guest) -> int:
    text = guest.run(f"cat {LEDGER} 2>/dev/null || echo 0").stdout
    return int(text)


def is_pinned(guest: Guest, path: str) -> bool:
    listed = pins(guest) or {}
    return listed.get(path, {}).get("state") == "pinned" and any(
        target == path for target, _ in mounts_under(guest, path)
    )


def wait_pinned(guest: Guest, path: str, timeout: float = 90) -> None:
    wait(guest, lambda: is_pinned(guest, path), timeout, f"{path} pinned")


def overlay_leftovers(root: Path) -> list[str]:
    """Whiteouts (character devices 0:0) and trusted.overlay.* attributes: an upper layer
    copied to disk as it is instead of being applied."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if stat.S_ISCHR(os.lstat(full).st_mode):
                found.append(f"device {full}")
            try:
                attrs = os.listxattr(full, follow_symlinks=False)
            except OSError:
                attrs = []
            found += [f"{a} on {full}" for a in attrs if a.startswith("trusted.overlay.")]
    return found


# -- the service -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(guest: Guest) -> Guest:
    """rampiped installed with `make install` from the checkout, over a configuration that
    the test wrote first (which install must keep)."""
    for path in (BUSY, QUIET, STATIC, os.path.dirname(LEDGER)):
        guest.run(f"mkdir -p {path}")
    guest.write(f"{QUIET}/untouched", "quiet\n")
    guest.write(f"{STATIC}/before-pin", "on disk before the pin\n")
    guest.write(WRITER, WRITER_SOURCE)
    guest.write(CONF, BASE_CONFIG)
    started = time.monotonic()
    proc = guest.run(f"cd {SOURCE_IN_GUEST} && make install", check=False, timeout=1200)
    record("make install in the guest", time.monotonic() - started)
    INSTALL_OUTPUT["make install"] = output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise GuestError(f"`make install` in the guest exited with {proc.returncode}:\n{output}")
    return guest


def test_make_install_puts_everything_in_place(service: Guest) -> None:
    out = INSTALL_OUTPUT["make install"]
    assert f"keeping the existing {CONF}" in out
    assert service.read(CONF) == BASE_CONFIG
    for cmd in ("rampiped", "rampipectl"):
        target = service.run(f"readlink /usr/local/bin/{cmd}").stdout.strip()
        assert target == f"/opt/rampiped/bin/{cmd}"
    # not an editable install: the package lives in the venv, and the C extension was built
    where = service.run(
        "/opt/rampiped/bin/python -c 'import rampiped, pyfanotify.ext; print(rampiped.__file__)'"
    ).stdout.strip()
    assert where.startswith("/opt/rampiped/lib/")
    assert service.run("rampipectl --version").stdout.strip().endswith("0.1.0")
    installed_unit = service.read("/etc/systemd/system/rampiped.service")
    assert installed_unit == service.read(f"{SOURCE_IN_GUEST}/packaging/systemd/rampiped.service")
    for installed, source in DOCS.items():
        assert service.read(installed) == service.read(f"{SOURCE_IN_GUEST}/{source}"), installed


def test_unit_verifies_on_the_installed_system(service: Guest) -> None:
    proc = service.run(
        "systemd-analyze verify /etc/systemd/system/rampiped.service 2>&1", check=False
    )
    assert (proc.returncode, proc.stdout) == (0, "")


def test_enable_now_makes_it_active(service: Guest) -> None:
    service.run("systemctl enable --now rampiped")
    assert show(service, "ActiveState") == "active"
    assert show(service, "UnitFileState") == "enabled"
    assert show(service, "Type") == "notify"
    assert show(service, "NotifyAccess") == "main"
    assert show(service, "KillMode") == "mixed"
    # the daemon's mounts are everybody's: it runs in the mount namespace of PID 1
    pid = show(service, "MainPID")
    ns = service.run(f"readlink /proc/{pid}/ns/mnt /proc/1/ns/mnt").stdout.split()
    assert ns[0] == ns[1]


def test_status_shows_the_status_line(service: Guest) -> None:
    text = wait(service, lambda: show(service, "StatusText"), 30, "a STATUS= line")
    assert text.isascii()
    status = service.run("systemctl status --no-pager --lines=0 rampiped").stdout
    assert re.search(r'^\s*Status: "[^"]+"', status, re.MULTILINE), status


def test_install_again_keeps_the_config_and_restarts(service: Guest) -> None:
    before = show(service, "MainPID")
    started = time.monotonic()
    proc = service.run(f"cd {SOURCE_IN_GUEST} && make install", timeout=1200)
    record("make install again", time.monotonic() - started)
    assert f"keeping the existing {CONF}" in proc.stdout
    assert service.read(CONF) == BASE_CONFIG
    assert show(service, "ActiveState") == "active"
    assert show(service, "MainPID") not in (before, "0")


def test_hot_directory_is_pinned(service: Guest) -> None:
    ensure_writer(service)
    started = time.monotonic()
    wait_pinned(service, BUSY)
    record("writer start to pinned", time.monotonic() - started)
    assert dict(mounts_under(service, BUSY)) == {BUSY: "overlay"}
    assert mounts_under(service, QUIET) == []
    pin = (pins(service) or {})[BUSY]
    assert set(pin) >= STATUS_FIELDS, f"status --json lacks {STATUS_FIELDS - set(pin)}"
    assert pin["rate"] > 50


def test_journal_names_the_pin(service: Guest) -> None:
    wait_pinned(service, BUSY)
    assert re.search(rf"\bpinned {re.escape(BUSY)}\b", journal(service)), journal(
        service, "-n", "30"
    )


def test_reload_applies_a_changed_config(service: Guest) -> None:
    pid = show(service, "MainPID")
    service.write(CONF, CHANGED_CONFIG)
    service.run("systemctl reload rampiped")
    assert show(service, "MainPID") == pid  # reloaded, not restarted
    wait_pinned(service, STATIC, timeout=60)
    assert (pins(service) or {})[STATIC]["mode"] == "copy"
    assert service.read(f"{STATIC}/before-pin") == "on disk before the pin\n"


def test_reload_with_a_broken_config_fails_and_keeps_the_old_one(service: Guest) -> None:
    wait_pinned(service, STATIC, timeout=60)
    pid = show(service, "MainPID")
    mounts = mounts_under(service, "/srv")
    since = cursor(service)
    service.write(CONF, BROKEN_CONFIG)
    try:
        proc = service.run("systemctl reload rampiped", check=False)
        assert proc.returncode != 0, "systemctl reload succeeded with an invalid configuration"
        assert show(service, "ActiveState") == "active"
        assert show(service, "MainPID") == pid
        assert mounts_under(service, "/srv") == mounts
        assert set(pins(service) or {}) >= {STATIC}
        logged = journal(service, f"--after-cursor={since}")
        assert CONF in logged, logged
        assert re.search(rf"(line |:){BAD_LINE}\b", logged), logged
        assert BAD_KEY in logged, logged
    finally:
        service.write(CONF, CHANGED_CONFIG)
    service.run("systemctl reload rampiped")


def test_kill_9_restarts_and_adopts_the_pins(service: Guest) -> None:
    ensure_writer(service)
    wait_pinned(service, BUSY)
    wait_pinned(service, STATIC, timeout=60)
    mounts = mounts_under(service, "/srv")
    pid = show(service, "MainPID")
    restarts = int(show(service, "NRestarts"))
    service.run(f"kill -KILL {pid}")
    wait(
        service,
        lambda: (
            show(service, "ActiveState") == "active" and show(service, "MainPID") not in (pid, "0")
        ),
        60,
        "systemd to restart rampiped",
    )
    assert int(show(service, "NRestarts")) == restarts + 1
    # the same mounts, none stacked twice, and both pins known to the new process
    assert mounts_under(service, "/srv") == mounts
    wait(service, lambda: is_pinned(service, BUSY) and is_pinned(service, STATIC), 60, "adoption")
    assert mounts_under(service, "/srv") == mounts


def test_poweroff_while_pinned_loses_nothing(service: Guest, timings: dict[str, str]) -> None:
    ensure_writer(service)
    wait_pinned(service, BUSY)
    wait_pinned(service, STATIC, timeout=60)
    service.write(f"{STATIC}/written-while-pinned", "static pin data\n")
    written = ledger(service)
    assert written > 0
    since = cursor(service)
    started = time.monotonic()
    assert service.poweroff() == 0
    record("poweroff with two pins", time.monotonic() - started)

    # What the disk holds, read from the host with the container gone.
    total = int(service.host_path(LEDGER).read_text())
    assert total >= written
    files = sorted(service.host_path(BUSY).glob("f*.log"))
    lines = "".join(f.read_text() for f in files).splitlines()
    # The writer may have been stopped after a write and before counting it.
    assert total <= len(lines) <= total + 1, (total, len(lines))
    bad = [i for i, text in enumerate(lines) if text != line(i)]
    assert bad == [], f"{len(bad)} lines differ, first at {bad[:5]}"
    assert service.host_path(f"{STATIC}/written-while-pinned").read_text() == "static pin data\n"
    assert overlay_leftovers(service.host_path("/srv")) == []

    started = time.monotonic()
    assert service.boot() == "running"
    record("boot again", time.monotonic() - started)
    stopped = journal(service, "-b", "-1", f"--after-cursor={since}")
    assert "Failed with result" not in stopped, stopped
    assert show(service, "ActiveState") == "active"
    # Nothing stale: only the static pin is mounted again, once, by the new daemon.
    wait_pinned(service, STATIC, timeout=60)
    assert [target for target, _ in mounts_under(service, "/srv")] == [STATIC]
    assert set(pins(service) or {}) == {STATIC}
    inside = service.run(f"cat {BUSY}/f*.log").stdout.splitlines()
    assert inside == lines


ORDERED_UNIT = "rp-ordered.service"
ORDERED_RECORD = "/var/lib/rampiped-test/ordered"
ORDERED_UNIT_TEXT = f"""\
[Unit]
Description=A service that must find /srv/static pinned when it starts and when it stops
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo start $(findmnt -n -o SOURCE {STATIC}) >> {ORDERED_RECORD}'
ExecStop=/bin/sh -c 'echo stop $(findmnt -n -o SOURCE {STATIC}) >> {ORDERED_RECORD}; sync'
[Install]
WantedBy=multi-user.target
"""


def test_before_units_start_after_the_pin_and_stop_before_its_write_back(service: Guest) -> None:
    """A static pin's `before:` unit (through the generator) starts with the pin in place and
    stops while it still is, at a real shutdown."""
    service.write(f"/etc/systemd/system/{ORDERED_UNIT}", ORDERED_UNIT_TEXT)
    service.write(
        CONF,
        CHANGED_CONFIG.replace(
            "    mode: copy\n", f"    mode: copy\n    before: [{ORDERED_UNIT}]\n"
        ),
    )
    try:
        service.run("systemctl daemon-reload")  # runs rampiped-generator
        assert "rampiped.service" in show(service, "After", ORDERED_UNIT).split()
        service.run(f"systemctl enable {ORDERED_UNIT}")
        service.run(f"rm -f {ORDERED_RECORD}")
        assert service.poweroff() == 0
        assert service.boot() in ("running", "degraded")
        wait(
            service,
            lambda: service.run(f"cat {ORDERED_RECORD} 2>/dev/null || true").stdout.strip(),
            60,
            "the ordered unit's start record",
        )
        assert service.poweroff() == 0
        records = service.host_path(ORDERED_RECORD).read_text().splitlines()
        assert service.boot() in ("running", "degraded")
        pinned_source = "rampiped-" in (records[0] if records else "")
        assert len(records) == 2 and records[0].startswith("start ") and pinned_source, records
        assert records[1].startswith("stop rampiped-"), records  # still pinned when it stopped
    finally:
        service.run(f"systemctl disable {ORDERED_UNIT}", check=False)
        service.write(CONF, CHANGED_CONFIG)
        service.run("systemctl daemon-reload", check=False)
        service.run("systemctl reload rampiped", check=False)


def test_uninstall_writes_back_and_keeps_the_config(service: Guest) -> None:
    wait_pinned(service, STATIC, timeout=60)
    service.write(f"{STATIC}/before-uninstall", "still in RAM\n")
    proc = service.run(f"cd {SOURCE_IN_GUEST} && make uninstall", timeout=300)
    assert f"kept your configuration {CONF}" in proc.stdout
    assert service.read(CONF) == CHANGED_CONFIG
    assert mounts_under(service, "/srv") == []
    assert service.host_path(f"{STATIC}/before-uninstall").read_text() == "still in RAM\n"
    assert show(service, "LoadState") == "not-found"
    leftovers = service.run(
        "ls -d /opt/rampiped /usr/local/bin/rampiped /usr/local/bin/rampipectl "
        f"/etc/systemd/system/rampiped.service {' '.join(DOCS)} 2>/dev/null || true"
    ).stdout
    assert leftovers == ""


def test_install_without_a_config_uses_the_example(service: Guest) -> None:
    conf = "/etc/rampipe-fresh.conf"
    example = f"{SOURCE_IN_GUEST}/rampipe.conf.example"
    proc = service.run(f"cd {SOURCE_IN_GUEST} && make install CONF={conf}", timeout=1200)
    try:
        assert f"installed {conf}" in proc.stdout
        if service.run(f"test -f {example}", check=False).returncode == 0:
            assert service.read(conf) == service.read(example)
        assert show(service, "ActiveState") == "active"
        assert f"--config {conf}" in show(service, "ExecStart")
    finally:
        service.run(f"cd {SOURCE_IN_GUEST} && make uninstall CONF={conf}", timeout=300)
