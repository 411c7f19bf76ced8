"""The control socket: one JSON object per line each way, protocol version in every message.

Request:  {"v": 1, "cmd": "status", "args": {...}}
Response: {"v": 1, "ok": true, "result": ...} or {"v": 1, "ok": false, "error": "...", "code": N}

The server lives in the daemon's main loop (non-blocking, no threads). A command that takes time
(sync, pin, unpin) is answered when its work is done; the loop keeps serving others meanwhile.
`sync` ({"path": DIR or absent for all, "wait": seconds}) waits up to "wait" (SYNC_WAIT when
absent) for an operation already running on a pin, then checkpoints it.
`handover` checkpoints every pin and is answered ({"pins": [...], "checkpoint_failed": [...]})
when no job runs any more; the daemon then exits leaving every pin mounted for the next one.
Only root may connect: the socket is mode 0600 and the peer's uid is checked (SO_PEERCRED).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import selectors
import socket
import struct
from collections.abc import Callable
from typing import Any

from rampiped.errors import EXIT_FAILURE, NotRunning, RampipeError
from rampiped.listener import Client, Listener

PROTOCOL = 1
MAX_REQUEST = 64 * 1024  # a request is a small JSON object; more is garbage or an attack
IDLE_TIMEOUT = 10.0  # seconds a client may take to send its request line
# seconds `rampipectl sync` waits for an operation running on a pin before its checkpoint,
# unless told otherwise (`--timeout`): long enough for the write-back of a big pin
SYNC_WAIT = 600.0
ANSWER_WAIT = 600.0  # seconds a client waits for the answer to a command (for sync: on top)
MAX_CLIENTS = 64

log = logging.getLogger("rampiped")

Reply = Callable[[dict[str, Any]], None]
Handler = Callable[[str, dict[str, Any], Reply], None]


def ok(result: Any = None) -> dict[str, Any]:
    return {"v": PROTOCOL, "ok": True, "result": result}


def error(message: str, code: int = EXIT_FAILURE) -> dict[str, Any]:
    return {"v": PROTOCOL, "ok": False, "error": message, "code": code}


class ControlServer(Listener):
    recv_size = 65536
    max_request = MAX_REQUEST
    max_clients = MAX_CLIENTS
    timeout = IDLE_TIMEOUT
    terminators = (b"\n",)

    def __init__(self, path: str, handler: Handler, selector: selectors.BaseSelector) -> None:
        self.path = path
        self.handler = handler
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        super().__init__(sock, selector)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _timed_out(self, client: Client) -> None:
        """Drop clients that sent nothing useful in time (slow or stuck writers); a request
        being worked on (a long sync) keeps its client."""
        if not client.answered:
            self._send(client, error("request timed out"))

    def _accepted(self, client: Client) -> None:
        creds = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != 0:
            self._send(client, error("permission denied: the control socket is for root only"))

    def _too_large(self, client: Client) -> None:
        self._send(client, error(f"request larger than {MAX_REQUEST} bytes"))

    def _request(self, client: Client) -> None:
        line = client.inbuf.split(b"\n", 1)[0]
        if len(line) > MAX_REQUEST:
            self._too_large(client)
            return
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            self._send(client, error("not a JSON request"))
            return
        except RecursionError:  # "[[[[...": nesting deeper than the parser's stack
            self._send(client, error("request nested too deeply"))
            return
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            self._send(client, error("a request is an object with a 'cmd' string"))
            return
        if request.get("v") != PROTOCOL:
            self._send(
                client,
                error(
                    f"protocol version mismatch: daemon speaks {PROTOCOL},"
                    f" client {request.get('v')!r}"
                    " (restart the daemon after an upgrade)"
                ),
            )
            return
        args = request.get("args") or {}
        if not isinstance(args, dict):
            self._send(client, error("'args' must be an object"))
            return
        try:
            self.handler(request["cmd"], args, functools.partial(self._send, client))
        except Exception as exc:  # the daemon runs on whatever a request does
            log.exception("control command %r failed", request["cmd"])
            self._send(client, error(f"internal error: {exc}"))

    def _send(self, client: Client, response: dict[str, Any]) -> None:
        self._reply(client, json.dumps(response).encode() + b"\n")


def call(
    path: str, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = ANSWER_WAIT
) -> dict[str, Any]:
    """Send one request and wait for its response. Raises NotRunning when nobody listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(f"rampiped is not running (no daemon at {path})") from exc
        except PermissionError as exc:
            raise RampipeError(f"permission denied: {path} is for root only (use sudo)") from exc
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise NotRunning(f"rampiped is not running ({path} is not a socket)") from exc
            raise
        request = json.dumps({"v": PROTOCOL, "cmd": cmd, "args": args or {}}).encode() + b"\n"
        # The daemon may answer and close before it reads (a refused peer): its answer is
        # still there to read after our send fails.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        buf = b""
        while b"\n" not in buf:
            try:
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                raise RampipeError(f"no answer from rampiped within {timeout:.0f}s") from exc
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    finally:
        sock.close()
    if not buf:
        raise RampipeError("rampiped closed the connection without an answer")
    try:
        response = json.loads(buf.split(b"\n", 1)[0])
    except ValueError as exc:
        raise RampipeError("rampiped sent an answer that is not JSON") from exc
    if not isinstance(response, dict):
        raise RampipeError("rampiped sent an answer that is not an object")
    if response.get("v") != PROTOCOL and response.get("ok") is not False:
        raise RampipeError(
            f"protocol version mismatch: daemon speaks {response.get('v')!r},"
            f" rampipectl {PROTOCOL} (restart the daemon after an upgrade)"
        )
    return response
