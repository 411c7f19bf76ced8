"""A listening socket served from the daemon's selector loop: one request, one answer a connection.

The control socket and the metrics endpoint are both served this way. The loop owns the state
they answer about, so serving them from it needs no locks; in exchange nothing here may block:
every socket is non-blocking, a client that stalls holds up nobody, and `expire` deals with
those that take too long. A `Listener` accepts clients (beyond `max_clients` at once, a new one
is closed straight away), collects what each sends until the request is complete (it holds one
of `terminators`) or is larger than `max_request` bytes, hands it to the subclass, writes the
answer as the socket takes it, and closes the connection. The subclass says what a request
means, and what a request too large and a client too slow get.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import selectors
import socket
import time


class Client:
    """One connection: what it sent so far and what is still to be written to it."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.since = now  # monotonic: when it connected
        self.inbuf = b""
        self.outbuf = b""
        self.answered = False  # its request is complete or refused; the answer may be pending
        self.closed = False


class Listener(abc.ABC):
    """Serves a listening socket from `selector`. Subclasses set the limits below."""

    recv_size: int  # bytes read at once
    max_request: int  # bytes a client may send without completing its request
    max_clients: int  # connections served at once
    timeout: float  # seconds after which a client is handed to `_timed_out`
    terminators: tuple[bytes, ...]  # any of these in what a client sent completes its request

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector) -> None:
        """`sock` is bound and listening; from here on the loop serves it."""
        self.sock = sock
        self.selector = selector
        self.clients: dict[int, Client] = {}
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self._accept)

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._close(client)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.sock)
        self.sock.close()

    def expire(self, now: float) -> None:
        """Hand clients connected for longer than `timeout` to `_timed_out`."""
        for client in list(self.clients.values()):
            if now - client.since > self.timeout:
                self._timed_out(client)

    # -- what a subclass says ----------------------------------------------------------------

    @abc.abstractmethod
    def _request(self, client: Client) -> None:
        """`client.inbuf` holds a complete request (and maybe more): answer it, now with
        `_reply` or later (the client stays connected until then or until `expire`)."""

    @abc.abstractmethod
    def _too_large(self, client: Client) -> None:
        """`client.inbuf` is past `max_request` bytes with no end in sight: answer that."""

    @abc.abstractmethod
    def _timed_out(self, client: Client) -> None:
        """`client` has been connected for longer than `timeout`."""

    def _accepted(self, client: Client) -> None:
        """A new connection, registered and waiting for its request: a subclass may check
        the peer here and answer with a refusal."""
        return

    def _accept_failed(self, exc: OSError) -> None:
        """accept() failed for a reason other than an empty queue (EMFILE and the like)."""
        raise exc

    # -- the loop's side ---------------------------------------------------------------------

    def _reply(self, client: Client, data: bytes) -> None:
        """Answer `client` with `data`, then close it; nothing if it is gone already."""
        if client.closed:
            return
        client.answered = True
        client.outbuf += data
        self._flush(client)

    def _close(self, client: Client) -> None:
        if client.closed:
            return
        client.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client.sock)
        self.clients.pop(client.sock.fileno(), None)
        client.sock.close()

    def _accept(self, _mask: int) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            if len(self.clients) >= self.max_clients:
                sock.close()
                continue
            sock.setblocking(False)
            client = Client(sock, time.monotonic())
            self.clients[sock.fileno()] = client
            self.selector.register(sock, selectors.EVENT_READ, functools.partial(self._io, client))
            self._accepted(client)

    def _io(self, client: Client, mask: int) -> None:
        if mask & selectors.EVENT_READ and not client.closed:
            self._read(client)
        if mask & selectors.EVENT_WRITE and not client.closed:
            self._flush(client)

    def _read(self, client: Client) -> None:
        try:
            data = client.sock.recv(self.recv_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        if not data:
            if not client.answered:
                self._close(client)
            else:
                # the client half-closed while its reply is pending: stop reading, answer later
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(client.sock)
            return
        if client.answered:
            return  # one request per connection; ignore anything after it
        client.inbuf += data
        if not any(end in client.inbuf for end in self.terminators):
            if len(client.inbuf) > self.max_request:
                self._too_large(client)
            return
        client.answered = True
        self._request(client)

    def _flush(self, client: Client) -> None:
        while client.outbuf:
            try:
                n = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                callback = functools.partial(self._io, client)
                try:
                    self.selector.modify(client.sock, selectors.EVENT_WRITE, callback)
                except (KeyError, ValueError):  # unregistered after a half-close
                    self.selector.register(client.sock, selectors.EVENT_WRITE, callback)
                return
            except OSError:
                self._close(client)
                return
            client.outbuf = client.outbuf[n:]
        self._close(client)
