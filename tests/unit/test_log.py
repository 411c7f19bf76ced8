"""Journal-friendly logging: `<N>` priority prefixes only when stderr is the journal."""

from __future__ import annotations

import io
import logging
import os
import sys

import pytest

from rampiped import log as logsetup


def _emit(monkeypatch: pytest.MonkeyPatch, journal: bool) -> str:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    r, w = os.pipe()
    try:
        st = os.fstat(w)
        monkeypatch.setattr(out, "fileno", lambda: w, raising=False)
        if journal:
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        else:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        logger = logsetup.setup("debug")
        logger.info("pinned /x: 812.3 events/s > 50/s for 5s (overlay)")
        logger.warning("cannot unpin /x yet")
        logger.error("checkpoint of /x failed")
        logger.debug("detail")
    finally:
        os.close(r)
        os.close(w)
        logging.getLogger("rampiped").handlers.clear()
    return out.getvalue()


def test_priority_prefixes_for_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _emit(monkeypatch, journal=True).splitlines() == [
        "<6>pinned /x: 812.3 events/s > 50/s for 5s (overlay)",
        "<4>cannot unpin /x yet",
        "<3>checkpoint of /x failed",
        "<7>detail",
    ]


def test_plain_lines_for_a_terminal_without_timestamps(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _emit(monkeypatch, journal=False).splitlines() == [
        "pinned /x: 812.3 events/s > 50/s for 5s (overlay)",
        "warning: cannot unpin /x yet",
        "error: checkpoint of /x failed",
        "detail",
    ]
