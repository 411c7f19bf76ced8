"""A directory written the way loggers write (open, append, fsync, close, 200 times a second)
is pinned as soon as it is hot: a hold that ends within milliseconds is waited out, not
answered with a refusal and a 5 s backoff. Every line the logger wrote is on disk after the
stop, in order. (`make bench` tries it 20 times: busy_writer_*.)"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.system.daemon_harness import FsyncLogger, make_env, running
from tests.system.helpers import drop_caches, remount, wait_for

pytestmark = pytest.mark.system

TRIES = 6
REFUSED = re.compile(r"cannot pin .*(in use by|opened on disk during the pin)")


def test_a_logger_that_holds_its_file_for_moments_is_pinned_without_a_refusal(
    tmp_path: Path,
) -> None:
    with make_env(tmp_path) as env:
        env.write_config()  # hot_for 1 s; a refusal would cost a 5 s backoff
        refusals: list[str] = []
        waits: list[float] = []
        for i in range(TRIES):
            d = env.data / f"logs{i}"
            with running(env) as dm:
                logger = FsyncLogger(d / "app.log")
                started = time.monotonic()
                try:
                    wait_for(lambda d=d: env.overlay_at(d), 30, f"the pin of {d}")
                    waits.append(time.monotonic() - started)
                finally:
                    written = logger.stop()
                assert dm.stop() == 0, dm.log_text()
                refusals += [line for line in dm.lines if REFUSED.search(line)]
            assert not env.overlay_at(d)
            remount(env.disk)
            drop_caches()
            assert (d / "app.log").read_bytes() == FsyncLogger.expected(written), f"try {i}"
        assert refusals == [], (refusals, waits)
