"""Sleep and session ends, from systemd-logind over the system bus (D-Bus, through jeepney).

A laptop that suspends and never wakes loses what is only in RAM. While it runs, rampiped
holds a logind inhibitor lock of mode "delay" on "sleep": logind then announces a suspend with
PrepareForSleep(true) and waits (up to its InhibitDelayMaxSec, 5 s unless configured) until
the lock is released. rampiped checkpoints every pin, releases the lock, and takes a new one
on PrepareForSleep(false) after the resume. Optionally, the end of the last user session
(SessionRemoved of a session of class "user", and no such session left) checkpoints every pin
too. logind no longer knows a session's class once it is removed, so the ids of the user
sessions are kept here (listed at start, then SessionNew): the end of a "background" session
(a cron job, `runuser`) with no user logged in is not a logout.

The bus connection is one more file descriptor in the daemon's selector: messages are read
when it is readable and parsed with jeepney's I/O-free Parser; method calls are sent and their
replies dispatched by serial number, so nothing here ever blocks the loop (only the connect
and authentication at start, bounded by AUTH_TIMEOUT). Signals are accepted only from the
unique bus name that owns org.freedesktop.login1 (tracked through NameOwnerChanged): the bus
already delivers only those that match the sender rule, and the check is kept as a second
line. Without a system bus or logind, one INFO line says so and the daemon runs on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
from collections.abc import Callable

from jeepney import (
    DBusAddress,
    HeaderFields,
    MatchRule,
    Message,
    MessageType,
    Parser,
    Properties,
    message_bus,
    new_method_call,
)
from jeepney.auth import BEGIN, Authenticator
from jeepney.bus import find_system_bus
from jeepney.fds import FileDescriptor, fds_buf_size

log = logging.getLogger("rampiped")

AUTH_TIMEOUT = 1.0  # seconds for connect + authentication at start
SEND_TIMEOUT = 2.0
LOGIND = "org.freedesktop.login1"
MANAGER = DBusAddress("/org/freedesktop/login1", LOGIND, "org.freedesktop.login1.Manager")
SESSION_IFACE = "org.freedesktop.login1.Session"
WHY = "writes the directories pinned in RAM to disk before the system sleeps"
SIGNALS = ("PrepareForSleep", "SessionNew", "SessionRemoved")

Reply = Callable[[Message], None]


class SleepGuard:
    """Holds the delay lock; tells `on_sleep` when logind is about to suspend (the daemon
    checkpoints, then calls `sleep_ready`), and `on_session_end` when the last user session
    ended and `session_end_wanted()` says so."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        *,
        on_sleep: Callable[[], None],
        on_session_end: Callable[[], None],
        session_end_wanted: Callable[[], bool],
    ) -> None:
        self.selector = selector
        self.on_sleep = on_sleep
        self.on_session_end = on_session_end
        self.session_end_wanted = session_end_wanted
        self.sock: socket.socket | None = None
        self.parser = Parser()
        self.serial = 0
        self.replies: dict[int, Reply] = {}
        self.logind: str | None = None  # the unique name that owns org.freedesktop.login1
        self.lock_fd: int | None = None
        self.taking = False
        self.sleeping = False
        self.delay_max: float | None = None  # logind's InhibitDelayMaxUSec, in seconds
        self.user_sessions: set[str] = set()  # ids of logind's sessions of class "user"

    # -- connection ------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            address = find_system_bus()
        except (RuntimeError, ValueError) as exc:
            log.info("no system bus (%s): not holding a sleep inhibitor", exc)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(AUTH_TIMEOUT)
            sock.connect(address)
            # The SASL conversation starts with a null byte; the Authenticator's first line
            # carries it (jeepney 0.8, Debian 12's, has no inc_null_byte to leave it out).
            auth = Authenticator(enable_fds=True)
            for request in auth:
                sock.sendall(request)
                data = sock.recv(1024)
                if not data:
                    raise ConnectionError("the bus closed the connection")
                auth.feed(data)
            sock.sendall(BEGIN)
        except (OSError, ValueError) as exc:
            sock.close()
            log.info(
                "no system bus at %s (%s): not holding a sleep inhibitor",
                address.lstrip("\0"),
                exc,
            )
            return
        sock.settimeout(SEND_TIMEOUT)
        self.sock = sock
        self.selector.register(sock, selectors.EVENT_READ, lambda _mask: self._readable())
        self._call(message_bus.Hello(), lambda _m: None)
        rules = [
            MatchRule(
                type="signal",
                sender=LOGIND,
                interface=MANAGER.interface,
                path=MANAGER.object_path,
                member=member,
            )
            for member in SIGNALS
        ]
        owner = MatchRule(
            type="signal",
            sender="org.freedesktop.DBus",
            interface="org.freedesktop.DBus",
            member="NameOwnerChanged",
        )
        owner.add_arg_condition(0, LOGIND)
        for rule in [*rules, owner]:
            self._call(message_bus.AddMatch(rule), self._check_error("subscribe to logind"))
        self._call(message_bus.GetNameOwner(LOGIND), self._got_owner)

    def close(self) -> None:
        self.release("rampiped is stopping")
        self._disconnect()

    def _disconnect(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None

    def _call(self, msg: Message, reply: Reply) -> None:
        if self.sock is None:
            return
        self.serial += 1
        self.replies[self.serial] = reply
        try:
            self.sock.sendall(msg.serialise(serial=self.serial))
        except OSError as exc:
            self._lost(f"cannot send to the system bus: {exc}")

    def _readable(self) -> None:
        if self.sock is None:
            return
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                self.parser.bytes_desired(), fds_buf_size()
            )
        except (BlockingIOError, TimeoutError):
            return
        except OSError as exc:
            self._lost(f"reading the system bus failed: {exc}")
            return
        if not data:
            self._lost("the system bus closed the connection")
            return
        self.parser.add_data(data, fds=FileDescriptor.from_ancdata(ancdata))
        while (msg := self.parser.get_next_message()) is not None:
            self._dispatch(msg)

    def _lost(self, why: str) -> None:
        log.warning("%s; sleep and session events are no longer seen", why)
        self._disconnect()
        # the inhibitor lock is a pipe to logind, not tied to this connection: kept

    def _dispatch(self, msg: Message) -> None:
        fields = msg.header.fields
        kind = msg.header.message_type
        if kind in (MessageType.method_return, MessageType.error):
            reply = self.replies.pop(fields.get(HeaderFields.reply_serial, -1), None)
            if reply is not None:
                reply(msg)
            for value in msg.body:  # file descriptors nobody took
                if isinstance(value, FileDescriptor):
                    with contextlib.suppress(Exception):
                        value.close()
            return
        if kind != MessageType.signal:
            return
        member = fields.get(HeaderFields.member)
        sender = fields.get(HeaderFields.sender)
        if member == "NameOwnerChanged" and sender == "org.freedesktop.DBus":
            name, _old, new = msg.body
            if name == LOGIND:
                self._owner_changed(new or None)
            return
        if member not in SIGNALS:
            return
        if self.logind is None or sender != self.logind:
            log.warning(
                "ignoring %s from %s: not logind (%s)", member, sender, self.logind or "absent"
            )
            return
        if member == "PrepareForSleep":
            self._prepare_for_sleep(bool(msg.body[0]))
        elif member == "SessionNew":
            self._session_new(str(msg.body[0]), str(msg.body[1]))
        else:
            self._session_removed(str(msg.body[0]))

    @staticmethod
    def _error_text(msg: Message) -> str | None:
        if msg.header.message_type != MessageType.error:
            return None
        name = msg.header.fields.get(HeaderFields.error_name, "error")
        detail = msg.body[0] if msg.body and isinstance(msg.body[0], str) else ""
        return f"{name}: {detail}" if detail else str(name)

    def _check_error(self, what: str) -> Reply:
        def check(msg: Message) -> None:
            err = self._error_text(msg)
            if err:
                log.warning("cannot %s: %s", what, err)

        return check

    # -- logind ----------------------------------------------------------------------------------

    def _got_owner(self, msg: Message) -> None:
        if self._error_text(msg):
            log.info("logind is not running: not holding a sleep inhibitor")
            return
        self._owner_changed(str(msg.body[0]))

    def _owner_changed(self, owner: str | None) -> None:
        self.logind = owner
        if owner is None:
            log.info("logind left the system bus")
            return
        self._call(Properties(MANAGER).get("InhibitDelayMaxUSec"), self._got_delay_max)
        self.take()
        self.user_sessions.clear()  # (a new logind: what it knows now)
        self._list_sessions(lambda _found: None)

    def _got_delay_max(self, msg: Message) -> None:
        if self._error_text(msg) is None:
            _sig, usec = msg.body[0]
            self.delay_max = int(usec) / 1e6

    def take(self) -> None:
        """Take the delay lock (again), unless held or being taken."""
        if self.lock_fd is not None or self.taking or self.sock is None or self.logind is None:
            return
        self.taking = True
        msg = new_method_call(MANAGER, "Inhibit", "ssss", ("sleep", "rampiped", WHY, "delay"))
        self._call(msg, self._got_lock)

    def _got_lock(self, msg: Message) -> None:
        self.taking = False
        err = self._error_text(msg)
        if err:
            log.warning("logind refused a sleep inhibitor: %s", err)
            return
        fd = msg.body[0]
        assert isinstance(fd, FileDescriptor)
        self.lock_fd = fd.to_raw_fd()
        if self.sleeping:  # taken while a sleep was being prepared: nothing to hold it for
            self.release("asked during a sleep")
            return
        log.info(
            "holding a sleep inhibitor (delay): every pin is checkpointed before a suspend%s",
            f" (logind waits at most {self.delay_max:g} s)" if self.delay_max else "",
        )

    def release(self, why: str) -> None:
        if self.lock_fd is None:
            return
        os.close(self.lock_fd)
        self.lock_fd = None
        log.info("released the sleep inhibitor: %s", why)

    def _prepare_for_sleep(self, going: bool) -> None:
        if going:
            self.sleeping = True
            log.info("the system is about to sleep: checkpointing every pin")
            self.on_sleep()
        else:
            self.sleeping = False
            log.info("the system resumed from sleep")
            self.take()

    def sleep_ready(self, why: str) -> None:
        """The checkpoints before a sleep are done (or out of time): let logind go ahead."""
        if self.sleeping:
            self.release(why)

    # -- sessions --------------------------------------------------------------------------------

    def _session_new(self, session: str, path: str) -> None:
        self._track(session, path, lambda _user: None)

    def _session_removed(self, session: str) -> None:
        if session not in self.user_sessions:
            return  # a background session (cron, runuser, a service's PAM session) ended
        self.user_sessions.discard(session)
        if self.user_sessions or not self.session_end_wanted():
            return
        log.debug("user session %s ended", session)

        def listed(found: bool) -> None:
            if not found:  # (one that started unseen is tracked now, and waited for)
                self._last_session_ended()

        self._list_sessions(listed)

    def _track(self, session: str, path: str, done: Callable[[bool], None]) -> None:
        """Ask logind for a session's class; `done` is told whether it is "user". A user
        session is remembered as soon as the answer comes: logind sends its SessionRemoved
        after that answer, never before, so the removal always finds it."""

        def got(reply: Message) -> None:
            # an error: the session ended in between
            user = self._error_text(reply) is None and str(reply.body[0][1]) == "user"
            if user:
                self.user_sessions.add(session)
            done(user)

        self._call(Properties(DBusAddress(path, LOGIND, SESSION_IFACE)).get("Class"), got)

    def _list_sessions(self, done: Callable[[bool], None]) -> None:
        """Track every session logind has; `done` is told whether any is a user session."""
        self._call(
            new_method_call(MANAGER, "ListSessions"), lambda msg: self._got_sessions(msg, done)
        )

    def _got_sessions(self, msg: Message, done: Callable[[bool], None]) -> None:
        if self._error_text(msg):
            return
        listed = [(str(entry[0]), str(entry[4])) for entry in msg.body[0]]
        if not listed:
            done(False)
            return
        answers: list[bool] = []

        def one(user: bool) -> None:
            answers.append(user)
            if len(answers) == len(listed):
                done(any(answers))

        for session, path in listed:
            self._track(session, path, one)

    def _last_session_ended(self) -> None:
        log.info("the last user session ended: checkpointing every pin")
        self.on_session_end()
