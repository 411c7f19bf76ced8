"""Session ends on a booted Debian 12: with `sync.on_session_end: true`, the end of the last user
session (a logout) checkpoints every pin; the end of a background session (cron, `runuser`, a
service's PAM session) does not, nor does any session end with the option off.

Sessions are real logind sessions made by PAM (pam_systemd, from libpam-systemd): a user
session is `su -l` on a pseudo-terminal (`script` provides it), which logind classes "user" as
it would a console or ssh login; `runuser -l` without a terminal makes a session of class
"background". Each session's command waits on a FIFO of its own; writing to the FIFO ends it,
as a logout would. The pin is a copy pin with periodic checkpoints off (`sync.interval: 0`), so
a file written after the pin reaches the disk only if a checkpoint writes it; the disk is read
from the host, below the guest's bind mount.

A session that ends without effect shows nothing; that the daemon has seen its end is known
from a later event that logind sends after it: either the end of a later session that does
have an effect, or logind leaving the bus (a restart of systemd-logind), which the daemon logs.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.systemd.conftest import installed, record
from tests.systemd.guest import Guest, journal, pinned
from tests.systemd.guest import wait as guest_wait

pytestmark = pytest.mark.systemd

CONF = "/etc/rampipe.conf"
PIN = "/srv/session-pin"
USER = "rp-session"
FIFOS = "/run/rampiped-test-sessions"
LAST_ENDED = "the last user session ended: checkpointing every pin"
CHECKPOINTED = re.compile(
    rf"checkpoint of {re.escape(PIN)} \(the last user session ended\): \d+ files"
)


def config(on_session_end: bool) -> str:
    return f"""\
# rampiped configuration of the session-end test
sync:
  interval: 0
  on_session_end: {"true" if on_session_end else "false"}
adaptive:
  enabled: false
pins:
  - path: {PIN}
    mode: copy
"""


def daemon_log(guest: Guest) -> list[str]:
    return journal(guest, "-u", "rampiped").splitlines()


def mark(guest: Guest) -> int:
    """Where the daemon's log is now. (Not a journal cursor: journalctl 252 finds nothing
    after a cursor with a unit match once a per-user journal file exists.)"""
    return len(daemon_log(guest))


def logged_since(guest: Guest, since: int) -> list[str]:
    return daemon_log(guest)[since:]


def wait(guest: Guest, cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """guest.wait, showing logind's sessions too on a timeout."""

    def listed() -> str:
        out = guest.run("loginctl list-sessions --no-pager", check=False).stdout
        return f"sessions:\n{out}\n"

    return guest_wait(guest, cond, timeout, what, interval=0.2, state=listed)


def wait_logged(guest: Guest, since: int, pattern: str, what: str, timeout: float = 30) -> None:
    wait(
        guest,
        lambda: any(re.search(pattern, text) for text in logged_since(guest, since)),
        timeout,
        what,
    )


def sessions(guest: Guest) -> dict[str, str]:
    """logind's sessions: id -> class."""
    out = guest.run("loginctl list-sessions --no-pager --no-legend", check=False).stdout
    found = {}
    for line in out.splitlines():
        words = line.split()
        if not words:
            continue
        klass = guest.run(
            f"loginctl show-session {shlex.quote(words[0])} --property=Class --value", check=False
        ).stdout.strip()
        if klass:  # (empty: it ended in between)
            found[words[0]] = klass
    return found


class Session:
    """One logind session of USER, opened through PAM; it lasts until `end()`."""

    count = 0

    def __init__(self, guest: Guest, terminal: bool) -> None:
        Session.count += 1
        self.guest = guest
        self.fifo = f"{FIFOS}/{Session.count}"
        self.klass = "user" if terminal else "background"
        before = set(sessions(guest))
        guest.run(f"mkdir -p {FIFOS} && mkfifo -m 0644 {self.fifo}")
        command = f"read -r _ < {self.fifo}"
        if terminal:
            # A login on a terminal, as at a console or over ssh.
            login = shlex.join(["su", "-l", USER, "-c", command])
            argv = ["setsid", "-f", "script", "--quiet", "--command", login, "/dev/null"]
        else:
            argv = ["setsid", "-f", "runuser", "-l", USER, "-c", command]
        guest.run(shlex.join(argv) + " </dev/null >/dev/null 2>&1")

        def opened() -> str | None:
            new = {sid: klass for sid, klass in sessions(guest).items() if sid not in before}
            return next(iter(new), None) if list(new.values()) == [self.klass] else None

        self.id: str = wait(guest, opened, 30, f"a new {self.klass} session in logind")

    def end(self) -> None:
        """End it (its command returns: su or runuser closes the PAM session) and wait until
        logind has removed it."""
        self.guest.run(f"timeout 10 sh -c 'echo end > {self.fifo}'")
        wait(self.guest, lambda: self.id not in sessions(self.guest), 30, f"session {self.id} gone")
        self.guest.run(f"rm -f {self.fifo}")


def reconfigure(guest: Guest, on_session_end: bool) -> None:
    since = mark(guest)
    guest.write(CONF, config(on_session_end))
    guest.run("systemctl reload rampiped")
    wait_logged(guest, since, rf"reloaded {re.escape(CONF)}", "the reload")


def restart_logind(guest: Guest) -> None:
    """A barrier: every signal logind sent before it left the bus has reached the daemon once
    the daemon logs that logind left (the bus delivers them in order)."""
    since = mark(guest)
    guest.run("systemctl restart systemd-logind")
    wait_logged(guest, since, r"logind left the system bus", "the daemon to see logind leave")


@pytest.fixture(scope="module")
def service(guest: Guest) -> Iterator[Guest]:
    # A system user: journald gives a regular user's service manager a journal file of its
    # own, and with one, journalctl 252 finds nothing after a cursor with a unit match (as
    # the other tests in this guest use).
    guest.run(f"id {USER} >/dev/null 2>&1 || useradd --system --create-home --shell /bin/sh {USER}")
    with installed(guest, PIN, CONF, config(True), "session-end test") as installed_guest:
        # Nothing else may end a session in these tests.
        assert sessions(guest) == {}
        yield installed_guest


def test_the_last_user_logout_checkpoints_every_pin(service: Guest) -> None:
    name = "written-before-logout"
    service.write(f"{PIN}/{name}", "only in RAM until the checkpoint\n")
    on_disk = service.host_path(f"{PIN}/{name}")
    assert not on_disk.exists()  # no checkpoint ran (periodic ones are off)
    since = mark(service)
    first, second = Session(service, terminal=True), Session(service, terminal=True)
    first.end()
    assert not on_disk.exists()  # a user session is left
    started = time.monotonic()
    second.end()
    wait(service, on_disk.exists, 30, f"{on_disk} written by the checkpoint")
    record("logout to checkpoint on disk", time.monotonic() - started)
    assert on_disk.read_text() == "only in RAM until the checkpoint\n"
    logged = logged_since(service, since)
    # One trigger: the first logout left a user session; the second left none. (Both ends
    # came from logind in order, so the first was handled before the second.)
    ended = [i for i, text in enumerate(logged) if LAST_ENDED in text]
    assert len(ended) == 1, logged
    wait_logged(service, since, CHECKPOINTED.pattern, "the checkpoint's log line")
    logged = logged_since(service, since)
    checkpoints = [i for i, text in enumerate(logged) if CHECKPOINTED.search(text)]
    assert len(checkpoints) == 1 and ended[0] < checkpoints[0], logged


def test_a_background_session_end_is_no_logout(service: Guest) -> None:
    """A cron job or `runuser` opens a session of class "background": its end, with no user
    session left, must not pass for the last logout."""
    name = "written-before-background-end"
    service.write(f"{PIN}/{name}", "background\n")
    since = mark(service)
    Session(service, terminal=False).end()
    # Then a real logout: its checkpoint comes after the background session's end was seen.
    Session(service, terminal=True).end()
    wait_logged(service, since, CHECKPOINTED.pattern, "the checkpoint after the logout")
    logged = logged_since(service, since)
    assert sum(LAST_ENDED in text for text in logged) == 1, logged
    assert service.host_path(f"{PIN}/{name}").read_text() == "background\n"


def test_without_the_option_a_logout_checkpoints_nothing(service: Guest) -> None:
    reconfigure(service, on_session_end=False)
    try:
        name = "written-before-unwatched-logout"
        service.write(f"{PIN}/{name}", "stays in RAM\n")
        since = mark(service)
        Session(service, terminal=True).end()
        restart_logind(service)
        logged = logged_since(service, since)
        assert not any(LAST_ENDED in text for text in logged), logged
        assert not any(CHECKPOINTED.search(text) for text in logged), logged
        assert not service.host_path(f"{PIN}/{name}").exists()
        assert pinned(service, PIN)
    finally:
        reconfigure(service, on_session_end=True)
