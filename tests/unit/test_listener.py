"""The listener behind the control socket and the metrics endpoint: requests in pieces, size
limits, answers larger than a socket buffer, half-closed clients, the client limit, timeouts
and closing; then what each of its two users adds on top. Sockets on loopback and in a temporary
directory, served by a selector loop this test turns by hand."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rampiped import control, metrics
from rampiped.listener import Client, Listener


def step(sel: selectors.BaseSelector) -> None:
    """One turn of the daemon's loop."""
    for key, mask in sel.select(0.05):
        key.data(mask)


def pump(sel: selectors.BaseSelector, until: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not until():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        step(sel)


class Peer:
    """A client that never blocks the loop this test turns."""

    def __init__(self, sel: selectors.BaseSelector, address: str | tuple[str, int]) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sel = sel
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.connect(address)  # completes in the backlog, before the loop accepts
        self.sock.setblocking(False)
        self.data = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                step(self.sel)  # the server reads, or answers and closes
                continue
            except (BrokenPipeError, ConnectionResetError):
                return  # answered and closed before it took everything
            view = view[n:]

    def poll(self) -> bool:
        """Take what arrived; True at the end of the stream."""
        while not self.eof:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            except ConnectionResetError:
                chunk = b""
            self.data += chunk
            self.eof = not chunk
        return self.eof

    def answer(self) -> bytes:
        pump(self.sel, self.poll, "the answer and the end of the connection")
        return self.data

    def close(self) -> None:
        self.sock.close()


class Echo(Listener):
    """A line in, "echo <line>" out; or, deferred, held until the test answers."""

    recv_size = 16  # a request of more than a few bytes arrives in several reads
    max_request = 32
    max_clients = 2
    timeout = 5.0
    terminators = (b"\n", b";;")

    def __init__(self, path: str, sel: selectors.BaseSelector) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(16)
        super().__init__(sock, sel)
        self.defer = False
        self.requests: list[bytes] = []
        self.pending: list[Client] = []
        self.accepted = 0
        self.timed_out: list[Client] = []

    def _request(self, client: Client) -> None:
        self.requests.append(client.inbuf)
        if self.defer:
            self.pending.append(client)
        else:
            self._reply(client, b"echo " + client.inbuf)

    def _too_large(self, client: Client) -> None:
        self._reply(client, b"too large\n")

    def _timed_out(self, client: Client) -> None:
        self.timed_out.append(client)
        self._close(client)

    def _accepted(self, client: Client) -> None:
        self.accepted += 1


@pytest.fixture
def sel() -> Iterator[selectors.BaseSelector]:
    with selectors.DefaultSelector() as s:
        yield s


@pytest.fixture
def echo(tmp_path: Path, sel: selectors.BaseSelector) -> Iterator[Echo]:
    server = Echo(str(tmp_path / "echo.sock"), sel)
    yield server
    server.close()


def connect(echo: Echo, sel: selectors.BaseSelector) -> Peer:
    before = echo.accepted
    peer = Peer(sel, str(echo.sock.getsockname()))
    pump(sel, lambda: echo.accepted > before, "the connection to be accepted")
    return peer


def test_a_request_in_pieces_is_answered_once_and_the_connection_closed(
    echo: Echo, sel: selectors.BaseSelector
) -> None:
    peer = connect(echo, sel)
    for piece in (b"hello, ", b"this is one req", b"uest\n"):
        peer.send(piece)
        step(sel)
    assert peer.answer() == b"echo hello, this is one request\n"
    assert echo.requests == [b"hello, this is one request\n"]
    assert echo.clients == {}


def test_any_terminator_completes_a_request(echo: Echo, sel: selectors.BaseSelector) -> None:
    peer = connect(echo, sel)
    peer.send(b"GET ;;")
    assert peer.answer() == b"echo GET ;;"


def test_max_request_bytes_without_an_end_wait_and_one_more_is_too_large(
    echo: Echo, sel: selectors.BaseSelector
) -> None:
    peer = connect(echo, sel)
    peer.send(b"x" * 32)
    pump(sel, lambda: len(next(iter(echo.clients.values())).inbuf) == 32, "32 bytes read")
    assert not peer.poll() and peer.data == b""
    peer.send(b"x")
    assert peer.answer() == b"too large\n"
    assert echo.requests == []


def held_request(echo: Echo, sel: selectors.BaseSelector, request: bytes) -> tuple[Peer, Client]:
    """A client whose request the server holds without answering."""
    echo.defer = True
    peer = connect(echo, sel)
    peer.send(request)
    pump(sel, lambda: bool(echo.pending), "the request")
    return peer, echo.pending[-1]


def answer_larger_than_the_socket_takes(echo: Echo, peer: Peer, client: Client) -> None:
    big = os.urandom(4 << 20)
    echo._reply(client, big)  # far more than the kernel buffers: the rest waits for EVENT_WRITE
    assert client.outbuf and not client.closed
    assert echo.selector.get_key(client.sock).events == selectors.EVENT_WRITE
    assert peer.answer() == big
    assert echo.clients == {}


def test_an_answer_larger_than_the_socket_buffer_is_written_as_the_client_reads(
    echo: Echo, sel: selectors.BaseSelector
) -> None:
    peer, client = held_request(echo, sel, b"big\n")
    answer_larger_than_the_socket_takes(echo, peer, client)


def test_bytes_after_a_request_are_ignored_and_a_half_closed_client_gets_its_answer(
    echo: Echo, sel: selectors.BaseSelector
) -> None:
    peer, client = held_request(echo, sel, b"first\n")
    peer.send(b"second\n")
    peer.sock.shutdown(socket.SHUT_WR)
    pump(sel, lambda: client.sock not in sel.get_map(), "reading to stop after the half-close")
    assert echo.requests == [b"first\n"]
    assert not client.closed and client.answered
    answer_larger_than_the_socket_takes(echo, peer, client)


def test_connections_beyond_the_limit_are_closed_at_once(
    echo: Echo, sel: selectors.BaseSelector
) -> None:
    first, second = connect(echo, sel), connect(echo, sel)
    third = Peer(sel, str(echo.sock.getsockname()))
    assert third.answer() == b""  # closed without a word
    assert echo.accepted == 2 and len(echo.clients) == 2
    first.send(b"one\n")
    assert first.answer() == b"echo one\n"
    fourth = connect(echo, sel)  # a place is free again
    fourth.send(b"four\n")
    assert fourth.answer() == b"echo four\n"
    second.close()


def test_expire_hands_over_only_clients_older_than_the_timeout(
    echo: Echo, sel: selectors.BaseSelector
) -> None:
    old = connect(echo, sel)
    old_client = next(iter(echo.clients.values()))
    connect(echo, sel)
    young_client = next(c for c in echo.clients.values() if c is not old_client)
    young_client.since = old_client.since + 1.0
    echo.expire(old_client.since + 5.0)  # not more than the timeout: nobody
    assert echo.timed_out == []
    echo.expire(old_client.since + 5.5)
    assert echo.timed_out == [old_client]
    assert old.answer() == b""
    assert list(echo.clients.values()) == [young_client]


def test_close_ends_every_connection_and_stops_listening(
    echo: Echo, sel: selectors.BaseSelector
) -> None:
    peers = [connect(echo, sel), connect(echo, sel)]
    echo.close()
    assert len(sel.get_map()) == 0
    assert echo.sock.fileno() == -1
    for peer in peers:
        assert peer.poll() and peer.data == b""


class _AcceptFails:
    """A listening socket whose accept() fails as it does when the daemon has no fd left."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    def close(self) -> None:
        self.real.close()


def test_an_accept_failure_is_raised_unless_the_subclass_takes_it(
    echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    echo.sock = _AcceptFails(echo.sock)  # type: ignore[assignment]
    with pytest.raises(OSError) as exc:
        echo._accept(selectors.EVENT_READ)
    assert exc.value.errno == errno.EMFILE
    # the metrics endpoint is optional: it logs and tries again at the next wake-up
    with selectors.DefaultSelector() as sel:
        http = metrics.HttpServer("127.0.0.1", 0, sel, lambda: b"")
        try:
            http.sock = _AcceptFails(http.sock)  # type: ignore[assignment]
            with caplog.at_level(logging.DEBUG, logger="rampiped"):
                http._accept(selectors.EVENT_READ)
            assert "metrics endpoint: accept failed: [Errno 24]" in caplog.text
        finally:
            http.close()


# --- the control socket -----------------------------------------------------------------------

root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="the control socket answers root only; run the tests as root"
)


Held = list[tuple[str, control.Reply]]  # commands received, with the way to answer each
Ctl = tuple[control.ControlServer, Held]


@pytest.fixture
def ctl(tmp_path: Path, sel: selectors.BaseSelector) -> Iterator[Ctl]:
    """A control server whose commands wait until the test answers them."""
    held: Held = []
    server = control.ControlServer(
        str(tmp_path / "control.sock"), lambda cmd, _args, reply: held.append((cmd, reply)), sel
    )
    yield server, held
    server.close()


def reply_of(data: bytes) -> dict[str, Any]:
    out = json.loads(data.split(b"\n", 1)[0])
    assert isinstance(out, dict)
    return out


@root_only
def test_control_times_out_a_slow_request_but_not_a_command_at_work(
    ctl: Ctl, sel: selectors.BaseSelector
) -> None:
    server, held = ctl
    slow = Peer(sel, server.path)
    slow.send(b'{"v": 1, "cmd": "sta')
    working = Peer(sel, server.path)
    working.send(b'{"v": 1, "cmd": "sync"}\n')
    working.sock.shutdown(socket.SHUT_WR)  # as rampipectl may: the answer still reaches it
    pump(sel, lambda: bool(held), "the sync command")
    since = max(c.since for c in server.clients.values())
    server.expire(since + control.IDLE_TIMEOUT + 1)
    assert reply_of(slow.answer())["error"] == "request timed out"
    assert not working.poll()
    held[0][1](control.ok("synced"))
    assert reply_of(working.answer()) == {"v": 1, "ok": True, "result": "synced"}


@root_only
def test_control_refuses_an_oversized_request_and_unlinks_its_socket_at_close(
    ctl: Ctl, sel: selectors.BaseSelector
) -> None:
    server, held = ctl
    for payload in (b"{" * (control.MAX_REQUEST + 1), b"x" * (control.MAX_REQUEST + 1) + b"\n"):
        peer = Peer(sel, server.path)
        peer.send(payload)
        assert reply_of(peer.answer()) == {
            "v": 1,
            "ok": False,
            "error": "request larger than 65536 bytes",
            "code": 1,
        }
    assert held == []
    server.close()
    assert not os.path.exists(server.path)


# --- the metrics endpoint ---------------------------------------------------------------------


@pytest.fixture
def http(sel: selectors.BaseSelector) -> Iterator[metrics.HttpServer]:
    server = metrics.HttpServer("127.0.0.1", 0, sel, lambda: b"rampiped_pins 0\n")
    yield server
    server.close()


def http_peer(http: metrics.HttpServer, sel: selectors.BaseSelector) -> Peer:
    host, port = http.address
    return Peer(sel, (host, port))


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200 OK", b"rampiped_pins 0\n"),
        (b"GET / HTTP/1.0\n\n", b"200 OK", b"rampiped: metrics at /metrics\n"),
        (b"hello\n\n", b"400 Bad Request", b"not an HTTP request\n"),
        (
            b"GET /metrics HTTP/1.1\r\nX: " + b"a" * metrics.HTTP_MAX_REQUEST,
            b"431 Request Header Fields Too Large",
            b"request too large\n",
        ),
    ],
)
def test_endpoint_answers_and_closes(
    http: metrics.HttpServer,
    sel: selectors.BaseSelector,
    request_bytes: bytes,
    status: bytes,
    body: bytes,
) -> None:
    peer = http_peer(http, sel)
    peer.send(request_bytes)
    head, _, got = peer.answer().partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 " + status
    assert f"Content-Length: {len(body)}".encode() in head
    assert got == body
    assert http.clients == {}


def test_endpoint_drops_a_client_too_slow_to_send_its_request(
    http: metrics.HttpServer, sel: selectors.BaseSelector
) -> None:
    peer = http_peer(http, sel)
    peer.send(b"GET /metr")
    pump(sel, lambda: bool(http.clients), "the connection")
    (client,) = http.clients.values()
    pump(sel, lambda: client.inbuf == b"GET /metr", "the first bytes")
    http.expire(client.since + metrics.HTTP_TIMEOUT)
    assert http.clients
    http.expire(client.since + metrics.HTTP_TIMEOUT + 0.1)
    assert peer.answer() == b""  # dropped without an answer
    with contextlib.suppress(OSError):
        peer.close()
