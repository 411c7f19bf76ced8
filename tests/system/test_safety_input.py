"""Bad input: a corpus of broken configuration files, each rejected with file, line, key path
and a hint (in-process for all of them, and through the real `rampiped` and `rampipectl
check-config` for a sample), sizes above the machine's memory among them (also refused by a
reload); the control socket fed garbage, oversized, deeply nested, slow
and abandoned messages, after each of which the daemon still answers; and a user other than
root, who gets "permission denied" whether the socket's mode or the daemon's SO_PEERCRED check
stops them."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rampiped import config
from tests.system import safety
from tests.system.daemon_harness import VENV_BIN, Env, running
from tests.system.helpers import wait_for
from tests.unit.test_config import ERRORS, MEMORY, MEMORY_ERRORS, SRC

pytestmark = pytest.mark.system

# Broken files that the unit table does not hold as text: bytes that are not UTF-8, a YAML
# byte-order mark with garbage, a binary blob, an enormous line.
RAW = [
    ("latin-1 bytes", b"ram:\n  max: 1G # caf\xe9\n", ":2: cannot read: not UTF-8 text"),
    ("binary blob", bytes(range(256)), ":2: cannot read: not UTF-8 text (byte 0x80)"),
    ("only a key", b"ram\n", ":1: expected a mapping of settings"),
    ("a megabyte of brackets", b"[" * (1 << 20), ":1:101: [0][0][0][0]...: YAML syntax error"),
    ("unterminated quote", b'runtime_dir: "/run/x\n', ":2:1: YAML syntax error: found unexpected"),
]


def _ids(cases: list[tuple[str, str, list[str]]]) -> list[str]:
    return [c[0] for c in cases]


@pytest.mark.parametrize(("name", "text", "expected"), ERRORS, ids=_ids(ERRORS))
def test_config_corpus_is_rejected_with_place_and_hint(
    tmp_path: Path, name: str, text: str, expected: list[str]
) -> None:
    path = tmp_path / "rampipe.conf"
    path.write_text(text)
    safety.count("bad inputs")
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    lines = str(info.value).splitlines()
    assert lines == [e.replace(SRC, str(path)) for e in expected]
    for line in lines:
        assert line.startswith(f"{path}:"), line  # the file and, after it, the line


@pytest.mark.parametrize(("name", "text", "expected"), MEMORY_ERRORS, ids=_ids(MEMORY_ERRORS))
def test_sizes_above_the_memory_are_rejected_with_place_and_hint(
    tmp_path: Path, name: str, text: str, expected: list[str]
) -> None:
    path = tmp_path / "rampipe.conf"
    path.write_text(text)
    safety.count("bad inputs")
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path), memory_total=MEMORY)
    assert str(info.value).splitlines() == [e.replace(SRC, str(path)) for e in expected]


@pytest.mark.parametrize(("name", "data", "where"), RAW, ids=[r[0] for r in RAW])
def test_broken_bytes_are_rejected(tmp_path: Path, name: str, data: bytes, where: str) -> None:
    path = tmp_path / "rampipe.conf"
    path.write_bytes(data)
    safety.count("bad inputs")
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert str(info.value).startswith(f"{path}{where}"), str(info.value)[:300]


# One of each kind, through the real programs: exit 78 (EX_CONFIG) and the message on stderr.
SAMPLE = [
    "tab indentation",
    "unknown nested key without a close match",
    "negative duration",
    "size beyond 64 bits",
    "relative path",
    "pin the root",
    "pin inside runtime_dir",
    "pin inside an earlier pin",
    "inverted thresholds",
    "high_watermark above 100%",
    "nested too deeply in block style",
    "nested too deeply after other settings",
]
# Sizes in terabytes: above this machine's memory too, which the programs measure themselves.
MEMORY_SAMPLE = [
    "ram.min_free above the machine's memory",
    "ram.max and ram.min_free above the machine's memory",
    "ram.max above the machine's memory in JSON",
]


def _this_machines_memory() -> str:
    """The machine's memory as the messages give it: GiB with one decimal, rounded down."""
    total = psutil.virtual_memory().total
    assert 1 << 30 <= total < 1 << 40
    return f"{math.floor(total / (1 << 30) * 10) / 10:.1f} GiB"


def _case(name: str) -> tuple[str, list[str]]:
    """The text and the expected lines of a corpus entry, as this machine's programs say them."""
    if name in MEMORY_SAMPLE:
        _, text, expected = next(e for e in MEMORY_ERRORS if e[0] == name)
        shown = f"this machine's {_this_machines_memory()} of memory"
        return text, [e.replace("this machine's 16.0 GiB of memory", shown) for e in expected]
    _, text, expected = next(e for e in ERRORS if e[0] == name)
    return text, expected


@pytest.mark.parametrize("name", SAMPLE + MEMORY_SAMPLE)
def test_programs_refuse_a_broken_config(tmp_path: Path, name: str) -> None:
    text, expected = _case(name)
    path = tmp_path / "rampipe.conf"
    path.write_text(text)
    want = [e.replace(SRC, str(path)) for e in expected]
    daemon = subprocess.run(
        [str(VENV_BIN / "rampiped"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    check = subprocess.run(
        [str(VENV_BIN / "rampipectl"), "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    safety.count("bad inputs")
    assert daemon.returncode == 78, daemon.stderr
    assert check.returncode == 78, check.stderr
    for line in want:
        assert line in daemon.stderr
        assert line in check.stderr
    assert "not starting" in daemon.stderr


def test_reload_refuses_sizes_above_the_memory(tmp_path: Path) -> None:
    with safety.manual_env(tmp_path) as env, running(env) as daemon:
        pid = env.status()["pid"]
        env.write_config(adaptive={"enabled": False}, ram={"max": "64T", "min_free": "100T"})
        lines = env.config_path.read_text().splitlines()
        memory = _this_machines_memory()
        want = [
            f"{env.config_path}:{lines.index('  max: 64T') + 1}: ram.max: 64T is more than "
            f"this machine's {memory} of memory (write a smaller size, or a percentage "
            "like 25%)",
            f"{env.config_path}:{lines.index('  min_free: 100T') + 1}: ram.min_free: 100T is "
            f"more than this machine's {memory} of memory (nothing could ever be pinned: "
            "MemAvailable is below it)",
        ]
        bad = env.ctl("reload")
        safety.count("bad inputs")
        assert bad.returncode == 78, bad
        for line in want:
            assert line in bad.stderr
            daemon.wait_log(re.escape(line))
        daemon.wait_log(r"reload refused")
        st = env.status()
        assert st["pid"] == pid
        assert st["ram"]["max_bytes"] == 256 << 20  # the running configuration stays


# --- the control socket ----------------------------------------------------------------------


def _sock(env: Env) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(env.runtime / "control.sock"))
    return s


def _exchange(env: Env, payload: bytes, *, shut: bool = True) -> bytes:
    with contextlib.closing(_sock(env)) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
            if shut:
                s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


GARBAGE: list[tuple[str, bytes, str | None]] = [
    ("not json", b"hello\n", "not a JSON request"),
    ("invalid utf-8", b"\xff\xfe{\n", "not a JSON request"),
    ("json array", b"[1, 2]\n", "a request is an object"),
    ("cmd not a string", b'{"v": 1, "cmd": 5}\n', "a request is an object"),
    ("wrong protocol", b'{"v": 99, "cmd": "status"}\n', "protocol version mismatch"),
    ("args not an object", b'{"v": 1, "cmd": "status", "args": [1]}\n', "'args' must be"),
    ("unknown command", b'{"v": 1, "cmd": "format-disk"}\n', "unknown command"),
    ("relative path", b'{"v": 1, "cmd": "pin", "args": {"path": "etc"}}\n', "absolute"),
    ("path not a string", b'{"v": 1, "cmd": "unpin", "args": {"path": 7}}\n', "absolute"),
    ("NUL in a path", b'{"v": 1, "cmd": "pin", "args": {"path": "/a\\u0000b"}}\n', None),
    ("pin outside", b'{"v": 1, "cmd": "pin", "args": {"path": "/proc/1"}}\n', None),
    ("bad mode", b'{"v": 1, "cmd": "pin", "args": {"path": "/x", "mode": 3}}\n', "mode"),
    ("huge number", b'{"v": 1, "cmd": "status", "n": 1' + b"0" * 5000 + b"}\n", None),
    ("deeply nested", b"[" * 60000 + b"\n", "nested too deeply"),
    ("oversized line", b"x" * (200 * 1024) + b"\n", "request larger than"),
    ("oversized, no newline", b"{" * (200 * 1024), "request larger than"),
    ("empty line", b"\n", "not a JSON request"),
    ("nothing at all", b"", None),
]


@pytest.fixture
def daemon_env(tmp_path: Path) -> Iterator[Env]:
    with safety.manual_env(tmp_path) as env, running(env):
        yield env


def _alive(env: Env) -> None:
    st = env.status()
    assert st["pid"] > 0


def test_control_socket_survives_garbage(daemon_env: Env) -> None:
    env = daemon_env
    for name, payload, expected in GARBAGE:
        safety.count("bad inputs")
        out = _exchange(env, payload)
        if expected is not None:
            reply = json.loads(out.split(b"\n", 1)[0])
            assert reply["ok"] is False and expected in reply["error"], (name, reply)
        _alive(env)


def test_control_socket_survives_abandoned_and_slow_clients(daemon_env: Env) -> None:
    env = daemon_env
    # clients that connect and vanish, or send half a request and vanish
    for payload in (b"", b'{"v": 1, "cmd": "sta'):
        safety.count("bad inputs")
        s = _sock(env)
        s.sendall(payload)
        s.close()
        _alive(env)
    # a client that asks and never reads its answer
    safety.count("bad inputs")
    deaf = _sock(env)
    deaf.sendall(b'{"v": 1, "cmd": "status"}\n')
    _alive(env)
    # more connections than the daemon serves at once, all idle
    safety.count("bad inputs")
    crowd = []
    for _ in range(80):
        with contextlib.suppress(OSError):
            crowd.append(_sock(env))
    for s in crowd:
        s.close()
    wait_for(lambda: env.ctl("status").returncode == 0, 30, "the daemon to answer again")
    # a slow client: one byte now and then; others are served meanwhile, and it is dropped
    safety.count("bad inputs")
    slow = _sock(env)
    slow.sendall(b"{")
    start = time.monotonic()
    _alive(env)
    reply = b""
    while b"\n" not in reply:
        with contextlib.suppress(BrokenPipeError):
            slow.sendall(b" ")
        try:
            slow.settimeout(1.0)
            chunk = slow.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            break
        reply += chunk
        assert time.monotonic() - start < 60
    assert b"request timed out" in reply
    slow.close()
    deaf.close()
    _alive(env)


# --- users other than root -----------------------------------------------------------------

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _ctl_as_nobody(sock: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AS_NOBODY, str(VENV_BIN / "rampipectl"), "--socket", str(sock), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_non_root_user_gets_permission_denied(daemon_env: Env) -> None:
    env = daemon_env
    sock = env.runtime / "control.sock"
    assert os.stat(sock).st_mode & 0o777 == 0o600
    # where the socket lives (its mode, the runtime dir): refused before the daemon hears it
    proc = _ctl_as_nobody(sock)
    assert proc.returncode == 1, proc
    assert (
        proc.stderr.strip() == f"rampipectl: permission denied: {sock} is for root only (use sudo)"
    )
    # a socket that a mistake made reachable: the daemon itself checks the peer (SO_PEERCRED)
    with tempfile.TemporaryDirectory(prefix="rp-sock-") as open_dir:
        os.chmod(open_dir, 0o755)
        subprocess.run(["mount", "--bind", str(env.runtime), open_dir], check=True)
        try:
            os.chmod(sock, 0o666)
            proc = _ctl_as_nobody(Path(open_dir) / "control.sock")
        finally:
            os.chmod(sock, 0o600)
            subprocess.run(["umount", open_dir], check=True)
    assert proc.returncode == 1, proc
    assert (
        proc.stderr.strip() == "rampipectl: permission denied: the control socket is for root only"
    )
    _alive(env)
