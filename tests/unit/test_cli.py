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
