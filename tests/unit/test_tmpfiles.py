"""The tmpfiles.d lines for volatile pins' max_age: their text, the paths they may carry, and
the helper's command line. (tests/system/test_tmpfiles_clean.py runs systemd-tmpfiles.)"""

from __future__ import annotations

import pytest

from rampiped import tmpfiles
from rampiped.tmpfiles import Target


@pytest.mark.parametrize(
    ("seconds", "field"),
    [(600.0, "600s"), (0.001, "1s"), (1.5, "2s"), (86400.0, "86400s"), (59.0, "59s")],
)
def test_age_field_is_whole_seconds_rounded_up(seconds: float, field: str) -> None:
    assert tmpfiles.age_field(seconds) == field


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/home/alice/.cache", True),
        ("/var/tmp/a-b_c+d,e@f=g:h/x.y", True),
        ("/tmp/with space", False),
        ("/tmp/100%", False),  # a specifier
        ("/tmp/a*b", False),  # a glob
        ("/tmp/a?b", False),
        ("/tmp/[ab]", False),
        ('/tmp/"q"', False),
        ("/tmp/back\\slash", False),
        ("/tmp/tab\there", False),
        ("/tmp/ünï", False),
        ("relative", False),
    ],
)
def test_plain_paths(path: str, ok: bool) -> None:
    assert tmpfiles.plain(path) is ok


def test_render() -> None:
    text = tmpfiles.render(
        [
            Target(
                "/home/alice/.cache", 600.0, ("/home/alice/.cache/a/db", "/home/alice/.cache/b")
            ),
            Target("/var/tmp", 86400.0),
        ],
        "/etc/rampipe.conf",
    )
    lines = text.splitlines()
    assert all(line.startswith("# ") for line in lines[:3])
    assert "/etc/rampipe.conf" in lines[0]
    assert lines[3:] == [
        "e /home/alice/.cache - - - 600s",
        "x /home/alice/.cache/a/db",
        "x /home/alice/.cache/b",
        "e /var/tmp - - - 86400s",
    ]
    assert text.endswith("\n")


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert tmpfiles.main([]) == 2
    assert tmpfiles.main(["clean"]) == 2
    assert capsys.readouterr().err == 2 * (
        "rampiped-tmpfiles: usage: rampiped-tmpfiles write|remove"
        " (systemd-tmpfiles-clean.service runs it)\n"
    )
