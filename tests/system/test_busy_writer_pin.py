"""A directory written the way loggers write (open, append, fsync, close, 200 times a second)
is pinned as soon as it is hot: a hold that ends within milliseconds is waited out, not
answered with a refusal and a 5 s backoff. Every line the logger wrote is on disk after the
stop, in order."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.system.daemon_harness import make_env, running
from tests.system.helpers import drop_caches, remount, wait_for

pytestmark = pytest.mark.system

# open(O_APPEND), write a line, fsync, close; `rate` times a second until the stop file exists
LOGGER = r"""
import os, sys, time
path, rate, stop = sys.argv[1], float(sys.argv[2]), sys.argv[3]
os.makedirs(os.path.dirname(path), exist_ok=True)
print('ready', flush=True)
n, start = 0, time.monotonic()
while not os.path.exists(stop):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b'line %06d\n' % n)
        os.fsync(fd)
    finally:
        os.close(fd)
    n += 1
    delay = start + n / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(n, flush=True)
"""

TRIES = 6


def _log_once(path: Path, stop: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", LOGGER, str(path), "200", str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_logger_that_holds_its_file_for_moments_is_pinned_without_a_refusal(
    tmp_path: Path,
) -> None:
    with make_env(tmp_path) as env:
        env.write_config()
        refusals: list[str] = []
        waits: list[float] = []
        for i in range(TRIES):
            d = env.data / f"logs{i}"
            log, stop = d / "app.log", env.data / f".stop{i}"
            with running(env) as dm:
                proc = _log_once(log, stop)
                started = time.monotonic()
                try:
                    # hot_for is 1 s; a refusal costs a 5 s backoff before the next try
                    wait_for(lambda d=d: env.overlay_at(d), 30, f"the pin of {d}")
                    waits.append(time.monotonic() - started)
                finally:
                    stop.touch()
                    assert proc.stdout is not None
                    written = int(proc.stdout.read().strip().splitlines()[-1])
                    proc.wait(30)
                assert dm.stop() == 0, dm.log_text()
                refusals += [
                    line
                    for line in dm.lines
                    if re.search(r"cannot pin .*(in use by|opened on disk during the pin)", line)
                ]
            assert not env.overlay_at(d)
            remount(env.disk)
            drop_caches()
            want = b"".join(b"line %06d\n" % n for n in range(written))
            assert log.read_bytes() == want, f"try {i}: {written} lines written"
        assert refusals == [], (refusals, waits)
