"""Test pause points: inert unless the test variables are set."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


# For the crash and power-cut tests only, and inert unless both variables are set: when
# RAMPIPED_TEST_PAUSE_AT names stages (comma-separated; see the pause_point calls:
# "pin:layers", "pin:overlay-mounted", "pin:bound", "pin:mounted", "checkpoint:copied",
# "checkpoint:renamed", "copy-checkpoint:renames-linked", "copy-checkpoint:staged",
# "copy-checkpoint:moved", "copy-checkpoint:copied",
# "unpin:copy-synced", "evict:begin", "unpin:written-early", "apply:linked-one", "unpin:unmounted",
# "copy-window:written", "unpin:journaled", "unpin:applied", "held:appended"), the thread
# that reaches it writes the stage into RAMPIPED_TEST_PAUSE_FILE and blocks until that file is
# removed, so that a test can kill -9 the daemon, drop its RAM, or play a hostile user at
# exactly that point of the operation.
PAUSE_ENV = "RAMPIPED_TEST_PAUSE_AT"


PAUSE_FILE_ENV = "RAMPIPED_TEST_PAUSE_FILE"


# For the tests of the write-back window after an overlay's unmount, inert unless set to "1":
# overlay unpins then skip the write-back before the unmount, as they do on their own for a
# pin with a renamed directory, a mapped file or a late disk writer, so that those tests reach
# that window with the disk as it was when the pin was made.
LATE_ENV = "RAMPIPED_TEST_LATE_WRITEBACK"


def late_writeback_only() -> bool:
    return os.environ.get(LATE_ENV) == "1"


def pause_point(stage: str) -> None:
    wanted = os.environ.get(PAUSE_ENV)
    marker = os.environ.get(PAUSE_FILE_ENV)
    if not wanted or not marker or stage not in wanted.split(","):
        return
    log.warning("test pause point %s reached: blocking (%s is set)", stage, PAUSE_ENV)
    with open(marker, "w") as f:
        f.write(stage + "\n")
    while os.path.exists(marker):
        time.sleep(0.05)
    log.warning("test pause point %s released", stage)
