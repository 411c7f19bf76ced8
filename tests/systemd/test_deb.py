"""The Debian package on a booted Debian 12: installed offline with apt, the service running;
upgraded to a newer package while a static pin's directory is held open and a manual pin holds
data, without anything being written back or unmounted; removed (everything written back) and
purged (configuration and journal directory gone, unless a journal still holds data).

The packages are built on this host with `make deb` (Debian's tools), once as the changelog
says and once with a higher version. Every apt-get in the guest runs in a network namespace of
its own with no interface but loopback, so it can only use what it is given: the guest has none
of the Python modules the package depends on; their .deb files, downloaded from Debian's
archive on this host (`apt-get download`, the closure of debian/control's Depends that the
guest lacks), are handed to the same `apt-get install` as the package, and pyfanotify's C
extension is in the package.

The tests are one story and run in file order on the same machine."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from tests.systemd.conftest import record
from tests.systemd.guest import Guest, journal, wait

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
CONF = "/etc/rampipe.conf"
STATIC = "/srv/static"  # a static copy pin, its file held open as pmxcfs holds config.db
MANUAL = "/srv/manual"  # a manual overlay pin
HOLDER = "rp-holder"
HOLDER_FILE = f"{STATIC}/config.db"
HOLDER_COUNT = "/var/lib/rampiped-test/holder-count"
DEBS = "/root/debs"
OFFLINE = "unshare --net --"  # a network namespace with only a loopback that is down

CONFIG = f"""\
# rampiped configuration of the package test: no adaptive pins, no timed checkpoints
adaptive:
  enabled: false
sync:
  interval: 0
pins:
  - path: {STATIC}
    mode: copy
"""

# Keeps HOLDER_FILE open for good and appends a numbered line to it five times a second; the
# number of lines written so far goes to HOLDER_COUNT (outside every pin) after each one, and a
# second holder goes on counting from there.
HOLDER_SOURCE = f"""\
import os, time
f = open({HOLDER_FILE!r}, "a")
try:
    n = int(open({HOLDER_COUNT!r}).read())
except FileNotFoundError:
    n = 0
while True:
    f.write("%08d\\n" % n)
    f.flush()
    n += 1
    with open({HOLDER_COUNT!r} + ".tmp", "w") as c:
        c.write("%d\\n" % n)
    os.replace({HOLDER_COUNT!r} + ".tmp", {HOLDER_COUNT!r})
    time.sleep(0.2)
"""

PACKAGES: dict[str, str] = {}  # "old" / "new" -> file name in DEBS
ARCHIVE: list[str] = []  # the dependencies' .deb files, in DEBS/archive


def package_depends() -> list[str]:
    """The packages debian/control's binary package depends on by name (no ${...})."""
    control = (REPO / "debian/control").read_text()
    stanza = control.split("\nPackage: rampiped\n", 1)[1]
    field = re.search(r"^Depends:(.*?)(?=^\S)", stanza, re.S | re.M)
    assert field is not None, "no Depends in debian/control"
    names = [part.strip().split()[0] for part in field.group(1).split(",") if part.strip()]
    return [n for n in names if not n.startswith("$")]


def depends_of(name: str) -> list[list[str]]:
    """`name`'s Depends and Pre-Depends on this host's archive, as groups of alternatives (a
    virtual package, `<python3:any>`, stands for the real one of the same name)."""
    out = subprocess.run(
        [
            "apt-cache",
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            name,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    groups: list[list[str]] = []
    alternative = False  # the line before was "|Depends": this one joins its group
    for line in out.splitlines()[1:]:
        m = re.match(r"\s+(\|?)(?:Pre)?Depends: <?([^>\s]+)>?", line)
        if m is None:
            continue
        dep = m.group(2).split(":")[0]
        if alternative:
            groups[-1].append(dep)
        else:
            groups.append([dep])
        alternative = m.group(1) == "|"
    return groups


def archive_debs(guest: Guest, out: Path) -> list[str]:
    """Download, from Debian's archive on this host, the .deb of every package that the
    package's dependencies need and the guest does not have; their file names. A dependency
    with alternatives is met by one the guest has, or else by the first real package."""
    have = set(guest.run("dpkg-query -W -f='${Package}\\n'").stdout.split())
    need: set[str] = set()
    todo = [n for n in package_depends() if n not in have]
    while todo:
        name = todo.pop()
        if name in need:
            continue
        need.add(name)
        for group in depends_of(name):
            if any(alt in have or alt in need for alt in group):
                continue
            todo.append(group[0])
    need_list = sorted(need)
    out.mkdir(parents=True, exist_ok=True)
    if need_list:
        proc = subprocess.run(
            ["apt-get", "download", *need_list],
            cwd=out,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"apt-get download {' '.join(need_list)}: {proc.stderr}"
    return sorted(p.name for p in out.glob("*.deb"))


def changelog_version() -> str:
    return subprocess.run(
        ["dpkg-parsechangelog", "-S", "Version", "-l", str(REPO / "debian/changelog")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def build(version: str | None, out: Path) -> str:
    """`make deb` (DEB_VERSION=version when given) into `out`; the .deb's file name."""
    argv = ["make", "-C", str(REPO), "deb", f"DEB_BUILD={out}/build", f"DEB_DIST={out}"]
    if version:
        argv.append(f"DEB_VERSION={version}")
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    record(f"make deb {version or '(changelog)'}", time.monotonic() - started)
    if proc.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout[-4000:]}"
            f"\n{proc.stderr[-4000:]}"
        )
    # its last line names the package it made
    lines = proc.stdout.splitlines()
    debs = [
        Path(n).name for n in lines if re.fullmatch(rf"{re.escape(str(out))}/rampiped_\S+\.deb", n)
    ]
    assert len(debs) == 1, proc.stdout[-2000:]
    return debs[0]


@pytest.fixture(scope="module")
def pkg(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    out = tmp_path_factory.mktemp("debs")
    old = changelog_version()
    PACKAGES["old"] = build(None, out)
    PACKAGES["new"] = build(f"{old}+upgrade1", out)
    assert PACKAGES["old"].startswith(f"rampiped_{old}_")
    ARCHIVE[:] = archive_debs(guest, out / "archive")
    guest.run(f"mkdir -p {DEBS}/archive")
    for name in PACKAGES.values():
        guest.host_path(f"{DEBS}/{name}").write_bytes((out / name).read_bytes())
    for name in ARCHIVE:
        guest.host_path(f"{DEBS}/archive/{name}").write_bytes((out / "archive" / name).read_bytes())
    return guest


def apt(guest: Guest, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """apt-get in the guest, non-interactive, with no network."""
    command = f"{OFFLINE} env DEBIAN_FRONTEND=noninteractive apt-get -y " + shlex.join(args)
    return guest.run(command, check=check, timeout=600)


def version(guest: Guest) -> str:
    """dpkg's status and version of the package; "" once it is purged."""
    proc = guest.run("dpkg-query -W -f='${Status} ${Version}' rampiped", check=False)
    out = proc.stdout.strip()
    return "" if out.startswith("unknown ok not-installed") else out


def main_pid(guest: Guest) -> int:
    return int(guest.run("systemctl show -p MainPID --value rampiped").stdout.strip())


def cursor(guest: Guest) -> str:
    out = guest.run("journalctl --no-pager -n 0 --show-cursor").stdout
    return out.strip().rsplit("cursor: ", 1)[-1]


def mounts_below(guest: Guest, *prefixes: str) -> list[str]:
    targets = guest.run("findmnt -rn -o TARGET").stdout.split()
    return [t for t in targets if any(t == p or t.startswith(p + "/") for p in prefixes)]


def mount_id(guest: Guest, path: str) -> str:
    """The id of the topmost mount at `path` (/proc/self/mountinfo's first field)."""
    found = ""
    for row in guest.run("cat /proc/self/mountinfo").stdout.splitlines():
        fields = row.split()
        if fields[4] == path:
            found = fields[0]
    assert found, f"nothing is mounted at {path}"
    return found


def holder_mount_id(guest: Guest, unit: str = HOLDER) -> str:
    """The mount through which the holder has HOLDER_FILE open."""
    pid = guest.run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
    script = (
        f"for fd in /proc/{pid}/fd/*; do "
        f'[ "$(readlink "$fd")" = {HOLDER_FILE} ] && '
        f"sed -n 's/^mnt_id:[[:space:]]*//p' /proc/{pid}/fdinfo/${{fd##*/}}; done"
    )
    out = guest.run(script, check=False).stdout.split()
    assert len(out) == 1, f"the holder (pid {pid}) has {HOLDER_FILE} open {len(out)} times"
    return out[0]


def holder_count(guest: Guest) -> int:
    return int(guest.read(HOLDER_COUNT))


def lines_in(text: str) -> list[str]:
    return text.splitlines()


# -- install ------------------------------------------------------------------------------------


def test_install_offline_starts_the_service(pkg: Guest) -> None:
    # Nothing from PyPI: there is no pip to fetch it with, and apt has no network. The Python
    # modules the package needs are not there either: they come with it, from Debian's archive.
    assert pkg.run("python3 -c 'import pip'", check=False).returncode != 0
    for module in ("yaml", "psutil", "jeepney", "sdnotify", "prometheus_client"):
        assert pkg.run(f"python3 -c 'import {module}'", check=False).returncode != 0, module
    assert ARCHIVE, "no dependency to install from the archive: the guest has them all"
    # and no compiler: the guest's gcc (make install needs it) cannot run during the install
    gcc = pkg.run("readlink -f /usr/bin/gcc").stdout.strip()
    pkg.run(f"chmod a-x {shlex.quote(gcc)}")
    try:
        assert pkg.run("gcc --version", check=False).returncode != 0
        started = time.monotonic()
        apt(pkg, "install", f"{DEBS}/{PACKAGES['old']}", *(f"{DEBS}/archive/{n}" for n in ARCHIVE))
    finally:
        pkg.run(f"chmod a+x {shlex.quote(gcc)}")
    record("apt install of the package", time.monotonic() - started)
    assert version(pkg) == f"install ok installed {PACKAGES['old'].split('_')[1]}"
    assert pkg.run("systemctl is-enabled rampiped").stdout.strip() == "enabled"
    wait(
        pkg,
        lambda: pkg.run("systemctl is-active rampiped", check=False).stdout.strip() == "active",
        60,
        "rampiped.service to be active",
    )
    status = json.loads(pkg.run("rampipectl status --json").stdout)
    assert status["pins"] == []


def test_offline_really_is_offline(pkg: Guest) -> None:
    """The namespace apt ran in reaches nothing: a TCP connection to a Debian mirror fails."""
    probe = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('deb.debian.org', 80), timeout=5)\n"
        "except OSError as e:\n"
        "    print('unreachable', type(e).__name__)\n"
    )
    out = pkg.run(f"{OFFLINE} python3 -c {shlex.quote(probe)}").stdout
    assert out.startswith("unreachable"), out


def test_files_are_where_debian_puts_them(pkg: Guest) -> None:
    files = set(pkg.run("dpkg -L rampiped").stdout.split())
    for path in (
        "/lib/systemd/system/rampiped.service",
        "/lib/systemd/system-generators/rampiped-generator",
        "/usr/bin/rampiped",
        "/usr/bin/rampipectl",
        CONF,
        "/usr/share/man/man8/rampiped.8.gz",
        "/usr/share/man/man8/rampipectl.8.gz",
        "/usr/share/man/man5/rampipe.conf.5.gz",
        "/usr/share/bash-completion/completions/rampipectl",
    ):
        assert path in files, f"{path} is not in the package"
    # the fanotify binding, built into the package (the guest never compiled anything for it)
    assert any(re.search(r"/pyfanotify/ext\..*\.so$", f) for f in files)
    conffiles = pkg.run("dpkg-query -W -f='${Conffiles}' rampiped").stdout.split()
    assert CONF in conffiles
    unit = pkg.read("/lib/systemd/system/rampiped.service")
    assert "ExecStart=/usr/bin/rampiped --config /etc/rampipe.conf" in unit
    assert "/usr/local" not in unit
    pkg.run("systemd-analyze verify rampiped.service")
    # the daemon runs from Debian's Python modules, not from a venv
    exe = pkg.run(f"readlink /proc/{main_pid(pkg)}/exe").stdout.strip()
    assert exe.startswith("/usr/bin/python3")


# -- upgrade ------------------------------------------------------------------------------------


def test_upgrade_while_pinned_with_a_holder_keeps_the_pins(pkg: Guest) -> None:
    pkg.run(f"mkdir -p {STATIC} {MANUAL} /var/lib/rampiped-test /usr/local/lib/rampiped-test")
    pkg.write(f"{STATIC}/before-pin", "on disk before the pin\n")
    pkg.write(f"{MANUAL}/before-pin", "manual, on disk\n")
    pkg.write(CONF, CONFIG)
    pkg.run("systemctl reload rampiped")
    wait(pkg, lambda: mounts_below(pkg, STATIC), 60, f"the static pin of {STATIC}")
    pkg.run(f"rampipectl pin {MANUAL}")
    pkg.write(f"{MANUAL}/in-ram", "written while pinned\n")
    pkg.write("/usr/local/lib/rampiped-test/holder.py", HOLDER_SOURCE)
    pkg.run(f"systemd-run --unit={HOLDER} /usr/bin/python3 /usr/local/lib/rampiped-test/holder.py")
    wait(pkg, lambda: pkg.run(f"test -s {HOLDER_COUNT}", check=False).returncode == 0, 30, "holder")
    static_mount = mount_id(pkg, STATIC)
    assert holder_mount_id(pkg) == static_mount  # the holder writes into the RAM copy
    old_pid = main_pid(pkg)
    since = cursor(pkg)

    started = time.monotonic()
    proc = apt(pkg, "install", f"{DEBS}/{PACKAGES['new']}")
    record("apt install of the newer package (upgrade)", time.monotonic() - started)
    out = proc.stdout + proc.stderr
    assert "restarting the service to run the new version" in out, out
    assert version(pkg) == f"install ok installed {PACKAGES['new'].split('_')[1]}"

    new_pid = main_pid(pkg)
    assert new_pid not in (0, old_pid)
    log = journal(pkg, "-u", "rampiped", f"--after-cursor={since}")
    assert re.search(rf"handed over 2 pins, left mounted: {MANUAL}, {STATIC}", log), log
    assert f"adopted {STATIC} (copy, static)" in log, log
    assert f"adopted {MANUAL} (overlay, manual)" in log, log
    assert not re.search(r"writing \S+ back|unpinned", log), log
    # still pinned, the very same mounts, the holder still writing through the RAM copy
    assert mount_id(pkg, STATIC) == static_mount
    assert holder_mount_id(pkg) == static_mount
    assert pkg.run(f"systemctl is-active {HOLDER}").stdout.strip() == "active"
    status = json.loads(pkg.run("rampipectl status --json").stdout)
    assert {p["path"]: p["state"] for p in status["pins"]} == {
        MANUAL: "pinned",
        STATIC: "pinned",
    }
    n = holder_count(pkg)
    wait(pkg, lambda: holder_count(pkg) >= n + 5, 30, "the holder to keep writing")
    assert pkg.read(f"{MANUAL}/in-ram") == "written while pinned\n"


def test_stop_after_the_upgrade_writes_everything_back(pkg: Guest) -> None:
    pkg.run(f"systemctl stop {HOLDER}")
    written = holder_count(pkg)
    pkg.run("systemctl stop rampiped", timeout=300)
    assert mounts_below(pkg, STATIC, MANUAL, "/run/rampiped") == []
    # what the disk holds (the guest's view has no mount left; read below it all the same)
    on_disk = lines_in(pkg.host_path(HOLDER_FILE).read_text())
    assert on_disk == [f"{i:08d}" for i in range(written)]
    assert pkg.host_path(f"{MANUAL}/in-ram").read_text() == "written while pinned\n"
    assert pkg.host_path(f"{STATIC}/before-pin").read_text() == "on disk before the pin\n"


# -- remove and purge ---------------------------------------------------------------------------


def test_remove_is_refused_while_a_pin_cannot_be_written_back(pkg: Guest) -> None:
    """A static pin whose file is held open cannot be unmounted at the stop: its data would be
    only in RAM once the package is gone, so the removal fails and the service runs again."""
    pkg.run("systemctl start rampiped")
    wait(pkg, lambda: mounts_below(pkg, STATIC), 60, f"the static pin of {STATIC}")
    before = holder_count(pkg)
    pkg.run(
        f"systemd-run --unit={HOLDER}-2 /usr/bin/python3 /usr/local/lib/rampiped-test/holder.py"
    )
    wait(pkg, lambda: holder_count(pkg) > before, 30, "the second holder to write")
    assert holder_mount_id(pkg, f"{HOLDER}-2") == mount_id(pkg, STATIC)
    proc = apt(pkg, "remove", "rampiped", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Not removing rampiped" in out, out
    assert version(pkg).startswith("install ok installed")
    assert pkg.run("test -x /usr/bin/rampipectl", check=False).returncode == 0
    assert mounts_below(pkg, STATIC), "the held pin was unmounted"
    # dpkg's abort-remove started the service again, which adopted the pin
    wait(
        pkg,
        lambda: pkg.run("systemctl is-active rampiped", check=False).stdout.strip() == "active",
        60,
        "rampiped.service to be active again",
    )
    pkg.run(f"systemctl stop {HOLDER}-2")
    written = holder_count(pkg)
    # the disk gets every line once nobody holds the file (the stop of the next test)
    pkg.run("rampipectl sync")
    assert lines_in(pkg.host_path(HOLDER_FILE).read_text()) == [f"{i:08d}" for i in range(written)]


def test_remove_writes_back_and_leaves_no_mount(pkg: Guest) -> None:
    pkg.run("systemctl start rampiped")
    wait(pkg, lambda: mounts_below(pkg, STATIC), 60, f"the static pin of {STATIC}")
    pkg.run(f"rampipectl pin {MANUAL}")
    pkg.write(f"{MANUAL}/before-remove", "written before apt remove\n")
    pkg.write(f"{STATIC}/before-remove", "static, before apt remove\n")
    apt(pkg, "remove", "rampiped")
    assert version(pkg).startswith("deinstall ok config-files")
    assert mounts_below(pkg, STATIC, MANUAL, "/run/rampiped") == []
    assert pkg.host_path(f"{MANUAL}/before-remove").read_text() == "written before apt remove\n"
    assert pkg.host_path(f"{STATIC}/before-remove").read_text() == "static, before apt remove\n"
    assert pkg.run("test -e /usr/bin/rampipectl", check=False).returncode != 0
    assert pkg.read(CONF) == CONFIG  # remove keeps the configuration


def test_purge_removes_the_configuration_and_the_journal_dir(pkg: Guest) -> None:
    assert pkg.run("test -d /var/lib/rampiped").returncode == 0
    apt(pkg, "purge", "rampiped")
    assert version(pkg) == ""
    for path in (CONF, "/var/lib/rampiped"):
        assert pkg.run(f"test -e {path}", check=False).returncode != 0, f"{path} remains"


def test_purge_keeps_a_journal_that_holds_data(pkg: Guest) -> None:
    apt(pkg, "install", f"{DEBS}/{PACKAGES['new']}")
    wait(
        pkg,
        lambda: pkg.run("systemctl is-active rampiped", check=False).stdout.strip() == "active",
        60,
        "rampiped.service to be active",
    )
    apt(pkg, "remove", "rampiped")
    # what a power cut during a write-back leaves: a pin's journal with its pin.json
    journal_dir = "/var/lib/rampiped/0123456789abcdef"
    pkg.write(f"{journal_dir}/pin.json", json.dumps({"path": MANUAL}) + "\n")
    pkg.write(f"{journal_dir}/gen-1/data", "not yet written back\n")
    proc = apt(pkg, "purge", "rampiped")
    out = proc.stdout + proc.stderr
    assert "keeping /var/lib/rampiped: journals there still hold data" in out, out
    assert journal_dir in out
    assert version(pkg) == ""
    assert pkg.read(f"{journal_dir}/gen-1/data") == "not yet written back\n"
    assert pkg.run(f"test -e {CONF}", check=False).returncode != 0
