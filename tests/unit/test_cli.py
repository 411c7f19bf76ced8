"""rampipectl's exit codes and messages, without a daemon (or with a fake one)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from rampiped import cli


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_config_valid_and_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.conf"
    good.write_text("sync:\n  interval: 1m\n")
    assert run(capsys, "check-config", str(good)) == (0, f"{good}: valid\n", "")
    bad = tmp_path / "bad.conf"
    bad.write_text("sync:\n  interval: soon\n")
    code, out, err = run(capsys, "check-config", str(bad))
    assert code == 78 and out == ""
    assert err.startswith(f"{bad}:2: sync.interval: ")
    assert "Traceback" not in err
    code, _, err = run(capsys, "check-config", str(tmp_path / "missing.conf"))
    assert code == 78 and "cannot read" in err


def test_check_config_reports_a_bad_max_age(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text(
        "pins:\n  - path: /var/tmp\n    mode: volatile\n    max_age: 0s\n"
        "  - path: /srv/db\n    max_age: 10m\n"
    )
    assert run(capsys, "check-config", str(bad)) == (
        78,
        "",
        f"{bad}:4: pins[0].max_age: expected a duration greater than 0, got '0s'\n"
        f"{bad}:6: pins[1].max_age: applies only to volatile pins (this pin's mode is copy)\n",
    )
    good = tmp_path / "good.conf"
    good.write_text("pins:\n  - path: /var/tmp\n    mode: volatile\n    max_age: 10m\n")
    assert run(capsys, "check-config", str(good)) == (0, f"{good}: valid\n", "")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys)[0] == 2
    assert run(capsys, "pin")[0] == 2


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("rampipectl ")


def test_not_running_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--socket", str(tmp_path / "none.sock"), "status")
    assert code == 3 and "not running" in err


def _fake_daemon(path: Path, response: dict[str, object]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(json.dumps(response).encode() + b"\n")
        conn.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_protocol_mismatch_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "c.sock"
    t = _fake_daemon(sock, {"v": 99, "ok": True, "result": {}})
    code, _, err = run(capsys, "--socket", str(sock), "status")
    t.join(5)
    assert code == 1 and "protocol version mismatch" in err


def test_daemon_error_code_is_the_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "c.sock"
    t = _fake_daemon(sock, {"v": 1, "ok": False, "error": "x.conf:3: ram.max: bad", "code": 78})
    code, _, err = run(capsys, "--socket", str(sock), "reload")
    t.join(5)
    assert code == 78 and "x.conf:3: ram.max: bad" in err


def _recording_daemon(
    path: Path, response: dict[str, object], requests: list[dict[str, object]]
) -> threading.Thread:
    """A fake daemon that answers one request with `response` and keeps what was asked."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        buf = b""
        while b"\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                break
            buf += chunk
        requests.append(json.loads(buf.split(b"\n", 1)[0]))
        conn.sendall(json.dumps(response).encode() + b"\n")
        conn.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(
    ("argv", "args"),
    [
        ((), {"wait": 600.0}),  # the default limit: 10 minutes
        (("/srv/x",), {"path": "/srv/x", "wait": 600.0}),
        (("/srv/x", "--timeout", "90s"), {"path": "/srv/x", "wait": 90.0}),
        (("--timeout", "1m30s"), {"wait": 90.0}),
        (("--timeout", "0"), {"wait": 0.0}),
    ],
)
def test_sync_sends_how_long_to_wait_for_a_running_operation(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    args: dict[str, object],
) -> None:
    sock = tmp_path / "c.sock"
    requests: list[dict[str, object]] = []
    t = _recording_daemon(
        sock, {"v": 1, "ok": True, "result": {"synced": [], "failed": []}}, requests
    )
    code, out, err = run(capsys, "--socket", str(sock), "sync", *argv)
    t.join(5)
    assert (code, err) == (0, "")
    assert out.startswith("synced 0 pins in ")
    assert requests == [{"v": 1, "cmd": "sync", "args": args}]


@pytest.mark.parametrize("value", ["soon", "-5s", "10x"])
def test_sync_timeout_must_be_a_duration(capsys: pytest.CaptureFixture[str], value: str) -> None:
    code, out, err = run(capsys, "--socket", "/nonexistent.sock", "sync", f"--timeout={value}")
    assert code == 2 and out == ""
    assert "argument --timeout: expected a duration like 10s, 5m or a number of seconds" in err


def test_sync_that_waited_too_long_exits_1_with_the_daemons_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "c.sock"
    message = "/srv/x: waited 1s for the running checkpoint to end; no checkpoint made"
    t = _recording_daemon(sock, {"v": 1, "ok": False, "error": message, "code": 1}, [])
    code, out, err = run(capsys, "--socket", str(sock), "sync", "/srv/x", "--timeout", "1s")
    t.join(5)
    assert (code, out, err) == (1, "", f"rampipectl: {message}\n")


def test_status_shows_what_compressed_pins_store(capsys: pytest.CaptureFixture[str]) -> None:
    pin = {
        "path": "/var/log",
        "mode": "copy",
        "state": "pinned",
        "rate": 1.0,
        "ram_bytes": 30 << 20,
        "dirty_bytes": 0,
        "static": True,
        "ram_backend": "zram",
        "stored_bytes": 100 << 20,
        "ram_per_stored_byte": 0.3,
    }
    st = {"version": "x", "pid": 1, "ram": {"used_bytes": 30 << 20, "max_bytes": 256 << 20}}
    cli.print_status({**st, "pins": [pin]})
    out = capsys.readouterr().out
    assert "compressed (zram): 100.0 MiB stored in 30.0 MiB of RAM (0.30 RAM per byte)\n" in out
    cli.print_status({**st, "pins": [{**pin, "ram_backend": "tmpfs"}]})
    assert "compressed" not in capsys.readouterr().out
