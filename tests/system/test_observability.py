"""Observability end to end: the Prometheus textfile and HTTP endpoint scraped and parsed after a
pin, a checkpoint and an unpin; systemd's STATUS line; `rampipectl top` under a pseudo-terminal;
`rampipectl explain` for a held and for an excluded directory."""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.system.daemon_harness import VENV_BIN, Env, Writer, make_env, running
from tests.system.helpers import holding_open, wait_for

pytestmark = pytest.mark.system

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as e:
        yield e


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(samples: Samples, name: str, default: float | None = None, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    if key not in samples:
        if default is not None:
            return default
        raise AssertionError(f"no sample {name}{labels}; have {sorted(k[0] for k in samples)}")
    return samples[key]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body); http.client, so that no proxy setting gets in the way."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def seed(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(10):
        (root / f"old{i}.log").write_text(f"old line {i}\n" * (i + 1))


def test_textfile_and_endpoint_after_pin_checkpoint_and_unpin(env: Env, tmp_path: Path) -> None:
    hot = env.data / "hot"
    seed(hot)
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    textfile = textdir / "rampiped.prom"
    port = free_port()
    env.write_config(
        adaptive={"cool_for": "10m"},  # unpinned by hand below, not by cooling
        sync={"interval": "10m"},  # checkpointed by hand below, not by the timer
        ram={"high_watermark": 0.8},
        metrics={"textfile": str(textfile), "listen": f"127.0.0.1:{port}", "interval": "1s"},
    )
    label = {"path": str(hot), "mode": "overlay"}

    def textfile_samples() -> Samples:
        return parse(textfile.read_text()) if textfile.exists() else {}

    def scraped() -> Samples:
        status, ctype, body = http_get(port)
        assert status == 200
        assert ctype.startswith("text/plain; version=0.0.4")
        return parse(body)

    with running(env) as daemon:
        daemon.wait_log(rf"serving metrics at http://127\.0\.0\.1:{port}/metrics")
        s = scraped()
        assert get(s, "rampiped_pins") == 0
        assert get(s, "rampiped_monitor_lost_events_total") == 0

        # -- a pin
        writer = Writer(hot, rate=300)
        try:
            daemon.wait_log(rf"pinned {hot}: ")  # logged once the RAM side is watched
        finally:
            writer.stop()
        payload = os.urandom(100_000)
        (hot / "fresh.bin").write_bytes(payload)
        for source in (scraped, textfile_samples):
            wait_for(
                lambda src=source: (
                    get(src(), "rampiped_pin_dirty_bytes", 0.0, **label) >= 100_000
                    and get(src(), "rampiped_absorbed_events_total", 0.0, **label) > 0
                ),
                15,
                f"dirty bytes and absorbed events in {source.__name__}",
            )
            s = source()
            assert get(s, "rampiped_pins") == 1
            assert get(s, "rampiped_pin_state", **label, state="pinned") == 1
            assert get(s, "rampiped_pin_state", **label, state="draining") == 0
            assert get(s, "rampiped_pins_made_total", **label) == 1
            assert get(s, "rampiped_pin_ram_bytes", **label) >= 100_000
            assert get(s, "rampiped_pin_write_rate", **label) > 0
            assert get(s, "rampiped_pin_data_at_risk_seconds", **label) > 0
            assert get(s, "rampiped_data_at_risk_seconds") > 0
            assert get(s, "rampiped_absorbed_bytes_total", **label) >= 100_000
            assert get(s, "rampiped_monitor_events_total") > 0
            assert get(s, "rampiped_ram_max_bytes") == 256 << 20
            # what the alert rules compare with (packaging/prometheus)
            assert get(s, "rampiped_ram_high_watermark_bytes") == int(0.8 * (256 << 20))
            assert get(s, "rampiped_textfile_interval_seconds") == 1.0
            assert get(s, "rampiped_pin_sync_interval_seconds", **label) == 600.0
        pin = env.status()["pins"][0]
        assert pin["data_at_risk_s"] > 0 and pin["dirty_bytes"] >= 100_000
        explained = env.ctl("explain", str(hot), check=True).stdout
        assert f"{hot} is pinned (overlay mode, pinned for its write rate)." in explained
        assert "not yet on disk:" in explained

        # -- a checkpoint: what it wrote, and nothing at risk any more
        env.ctl("sync", str(hot), check=True)
        last = env.status()["pins"][0]["last_sync"]
        assert last["ok"] and last["bytes"] >= 100_000
        wait_for(
            lambda: get(scraped(), "rampiped_pin_dirty_bytes", **label) == 0,
            15,
            "no dirty bytes after the checkpoint",
        )
        s = scraped()
        assert get(s, "rampiped_pin_data_at_risk_seconds", **label) == 0
        assert get(s, "rampiped_data_at_risk_seconds") == 0
        assert get(s, "rampiped_checkpoints_total", **label, result="ok") == 1
        assert get(s, "rampiped_checkpoints_total", 0.0, **label, result="failed") == 0
        assert (
            get(s, "rampiped_written_bytes_total", **label, operation="checkpoint") == last["bytes"]
        )
        assert (
            get(s, "rampiped_written_files_total", **label, operation="checkpoint") == last["files"]
        )
        h = "rampiped_writeback_duration_seconds"
        assert get(s, h + "_count", **label, operation="checkpoint") == 1
        assert get(s, h + "_bucket", **label, operation="checkpoint", le="+Inf") == 1
        assert env.status()["pins"][0]["data_at_risk_s"] == 0

        # -- new data after it is at risk again
        (hot / "after.log").write_text("written after the checkpoint\n")
        wait_for(
            lambda: get(scraped(), "rampiped_pin_dirty_bytes", **label) > 0,
            15,
            "dirty bytes after a new write",
        )

        # -- an unpin: its write-back counted, the pin's gauges gone
        res = env.ctl("unpin", str(hot), check=True).stdout
        m = re.search(r"wrote (\d+) files", res)
        assert m, res
        files = int(m.group(1))
        s = scraped()
        assert get(s, "rampiped_pins") == 0
        assert get(s, "rampiped_unpins_total", **label) == 1
        assert get(s, "rampiped_evictions_total", 0.0, **label) == 0
        assert get(s, "rampiped_written_files_total", **label, operation="unpin") == files
        unpin_bytes = get(s, "rampiped_written_bytes_total", **label, operation="unpin")
        assert unpin_bytes >= 100_000
        assert get(s, h + "_count", **label, operation="unpin") == 1
        assert not [k for k in s if k[0] == "rampiped_pin_state"]
        written = unpin_bytes + last["bytes"]
        assert get(s, "rampiped_absorbed_bytes_total", **label) >= written
        assert get(s, "rampiped_ram_bytes") == 0
        assert get(s, "rampiped_monitor_lost_events_total") == 0
        wait_for(
            lambda: get(textfile_samples(), "rampiped_unpins_total", 0.0, **label) == 1,
            10,
            "the unpin in the textfile",
        )

        # -- the endpoint serves nothing else, and HEAD has no body
        assert http_get(port, "/nothing")[0] == 404
        assert http_get(port, "/metrics", "POST")[0] == 405
        status, _, body = http_get(port, "/metrics", "HEAD")
        assert (status, body) == (200, "")
        # written atomically: no temporary file is ever left next to it
        assert [p.name for p in textdir.iterdir()] == ["rampiped.prom"]
        assert daemon.stop() == 0
    assert (hot / "fresh.bin").read_bytes() == payload
    assert get(parse(textfile.read_text()), "rampiped_pins") == 0  # the state it left


def test_endpoint_that_cannot_bind_is_logged_and_the_daemon_runs_on(env: Env) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env.write_config(metrics={"listen": f"127.0.0.1:{port}"})
        with running(env) as daemon:
            daemon.wait_log(
                rf"cannot serve metrics on 127\.0\.0\.1:{port}: Address already in use;"
                " no metrics endpoint until a reload"
            )
            assert env.status()["pins"] == []
            assert daemon.stop() == 0


def test_status_line_shows_pins_ram_and_data_at_risk(env: Env, tmp_path: Path) -> None:
    """The daemon's sd_notify STATUS messages, received on a NOTIFY_SOCKET of our own."""
    d = env.data / "app"
    seed(d)
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    statuses: list[str] = []

    def receive() -> None:
        while select.select([sock], [], [], 0.2)[0]:
            for line in sock.recv(65536).decode("ascii").splitlines():
                if line.startswith("STATUS="):
                    statuses.append(line[len("STATUS=") :])

    def seen(pattern: str) -> str | None:
        receive()
        return next((s for s in reversed(statuses) if re.fullmatch(pattern, s)), None)

    log_path = tmp_path / "daemon.log"
    environ = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "WATCHDOG_USEC")}
    environ["NOTIFY_SOCKET"] = notify_path
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [str(VENV_BIN / "rampiped"), "--config", str(env.config_path)],
            stderr=log_file,
            env=environ,
        )
    try:
        wait_for(lambda: seen(r"0 pinned, 0 B in RAM"), 30, "READY with its STATUS")
        env.ctl("pin", str(d), check=True)
        (d / "new.bin").write_bytes(b"x" * 300_000)
        found = wait_for(
            lambda: seen(r"1 pinned, [\d.]+ KiB in RAM, 293\.0 KiB at risk \(oldest \d+s\)"),
            20,
            "a STATUS line with the data at risk",
        )
        assert found is not None and found.isascii()
        env.ctl("sync", check=True)
        wait_for(
            lambda: seen(r"1 pinned, [\d.]+ KiB in RAM, nothing at risk"),
            20,
            "a STATUS line with nothing at risk after the checkpoint",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    assert (d / "new.bin").stat().st_size == 300_000


# --------------------------------------------------------------------------- rampipectl top


@contextlib.contextmanager
def top_in_a_terminal(env: Env, columns: int = 200, rows: int = 40) -> Iterator[dict[str, Any]]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [str(VENV_BIN / "rampipectl"), "--config", str(env.config_path), "top"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm"},
    )
    screen = {"text": "", "proc": proc, "master": master, "slave": slave, "before": before}
    try:
        yield screen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


def drain(screen: dict[str, Any]) -> None:
    """What rampipectl top wrote to its terminal so far, added to screen["text"]."""
    master = screen["master"]
    while select.select([master], [], [], 0.1)[0]:
        try:
            screen["text"] += os.read(master, 65536).decode("utf-8", "replace")
        except OSError:
            break


def read_until(screen: dict[str, Any], what: str, timeout: float) -> None:
    def more() -> bool:
        drain(screen)
        return what in screen["text"]

    wait_for(more, timeout, f"{what!r} on the screen of rampipectl top")


def exit_status(screen: dict[str, Any], timeout: float) -> int:
    """The exit status of rampipectl top, reading its screen meanwhile: a terminal that is not
    read fills up, and top, blocked writing its last frame, never gets to exit."""
    proc = screen["proc"]

    def exited() -> bool:
        drain(screen)
        return proc.poll() is not None

    wait_for(exited, timeout, "rampipectl top to exit")
    return int(proc.returncode)


def test_top_shows_the_hot_directory_and_quits_on_q(env: Env) -> None:
    hot, cold = env.data / "hot", env.data / "cold"
    seed(hot)
    seed(cold)
    env.write_config(adaptive={"hot_for": "1h"})  # hot, but left on disk
    with running(env) as daemon:
        writer = Writer(hot, rate=200)
        try:
            wait_for(
                lambda: any(
                    c["path"] == str(hot) and c["rate"] > 50 for c in env.status()["candidates"]
                ),
                15,
                "the hot directory among the candidates, above pin_above",
            )
            with top_in_a_terminal(env) as screen:
                start = time.monotonic()
                read_until(screen, str(hot), 5)
                assert time.monotonic() - start < 5
                read_until(screen, "DIRECTORY", 5)
                frames = [f for f in screen["text"].split("\x1b[H") if f.endswith("\x1b[J")]
                last = next(f for f in reversed(frames) if str(hot) in f)
                row = next(line for line in last.split("\r\n") if str(hot) in line)
                fields = row.replace("\x1b[K", "").split()
                assert fields[1] == "watched" and float(fields[3]) > 0, row
                screen["text"] = ""
                read_until(screen, "\x1b[H", 3)  # it redraws: another frame within a second
                os.write(screen["master"], b"q")
                assert screen["proc"].wait(10) == 0
                read_until(screen, "\x1b[?25h\x1b[?1049l", 3)  # cursor back, screen restored
                after = termios.tcgetattr(screen["slave"])
                assert after[3] & termios.ICANON and after[3] & termios.ECHO
                assert after == screen["before"]
        finally:
            writer.stop()
        assert daemon.stop() == 0


def test_top_ends_on_ctrl_c_and_without_a_terminal_prints_once(env: Env) -> None:
    with running(env) as daemon:
        with top_in_a_terminal(env) as screen:
            read_until(screen, "DIRECTORY", 10)
            screen["proc"].send_signal(signal.SIGINT)  # what Ctrl-C makes the terminal send
            assert exit_status(screen, 10) == 0
            read_until(screen, "\x1b[?1049l", 3)
            assert termios.tcgetattr(screen["slave"]) == screen["before"]
        plain = env.ctl("top", check=True)
        assert "\x1b" not in plain.stdout
        assert plain.stdout.splitlines()[1] == "0 pinned, 0 B of 256.0 MiB in RAM, nothing at risk"
        assert daemon.stop() == 0


# --------------------------------------------------------------------------- rampipectl explain


def test_explain_names_the_holder_and_the_exclusion(env: Env) -> None:
    hot, skip = env.data / "hot", env.data / "skip"
    seed(hot)
    seed(skip)
    env.write_config(adaptive={"exclude": [str(skip)]})
    with holding_open(hot / "held.log") as holder, running(env) as daemon:
        writer = Writer(hot, rate=300)
        try:
            daemon.wait_log(rf"not pinned: cannot pin {hot}: in use by pid {holder.pid}")
            since = re.compile(
                r"rate [\d.]+/s is above pin_above 50/s since [\w.]+ \(hot_for 1s\): .+"
            )

            def explained() -> list[str] | None:
                # right after the refusal, until the engine's next decision, the rate is
                # "counted as hot from the next decision"
                lines = env.ctl("explain", str(hot), check=True).stdout.splitlines()
                return lines if len(lines) > 1 and since.fullmatch(lines[1]) else None

            out = wait_for(explained, 30, "explain to say since when the rate is above pin_above")
            assert out[0] == f"{hot} is not pinned."
            assert since.fullmatch(out[1]), out
            blocked = next(line for line in out if line.startswith("blocked: "))
            assert blocked.startswith(f"blocked: in use by pid {holder.pid} (python"), out
            assert f"{hot}/held.log" in blocked
            assert re.search(r"; retry in [\w.]+", blocked), blocked
            assert out[-1].startswith("RAM budget: pins use 0 B of 256.0 MiB")
            raw = env.ctl("explain", "--json", str(hot), check=True).stdout
            assert f"in use by pid {holder.pid}" in raw
        finally:
            writer.stop()
        out = env.ctl("explain", str(skip), check=True).stdout.splitlines()
        assert out[:2] == [f"{skip} is not pinned.", f"blocked: excluded by {skip}"]
        assert daemon.stop() == 0
