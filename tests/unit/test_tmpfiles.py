"""The tmpfiles.d lines for volatile pins' max_age: their text, the paths they may carry, and
the helper's command line. (tests/system/test_tmpfiles_clean.py runs systemd-tmpfiles.)"""

from __future__ import annotations

import os

import pytest

from rampiped import tmpfiles
from rampiped.config import load_text
from rampiped.mounts import MountEntry
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


CFG = """\
pins:
  - path: /srv/cache
    mode: volatile
    max_age: 10m
  - path: /srv/not-mounted
    mode: volatile
    max_age: 10m
  - path: /srv/no-max-age
    mode: volatile
  - path: /srv/someone-elses
    mode: volatile
    max_age: 10m
"""


def entry(mountpoint: str, source: str, dev: str) -> MountEntry:
    return MountEntry(1, 0, dev, "/", mountpoint, "rw", (), "tmpfs", source, "rw")


def fake_targets(
    monkeypatch: pytest.MonkeyPatch, held: set[str], unknown: list[str] | None = None
) -> tuple[list[Target], list[str]]:
    table = {
        "/srv/cache": entry("/srv/cache", "rp-/srv/cache", "0:40"),
        "/srv/no-max-age": entry("/srv/no-max-age", "rp-/srv/no-max-age", "0:41"),
        "/srv/someone-elses": entry("/srv/someone-elses", "tmpfs", "0:42"),
    }
    monkeypatch.setattr(tmpfiles.mounts, "mount_at", table.get)
    devs: list[int] = []

    def in_use(dev: int) -> tuple[set[str], list[str]]:
        devs.append(dev)
        return held, list(unknown or [])

    said: list[str] = []
    found = tmpfiles.targets(
        load_text(CFG, "test.conf"), lambda p: "rp-" + p, said.append, in_use=in_use
    )
    assert devs == [os.makedev(0, 40)]  # only the mounted pin of rampiped's with max_age
    return found, said


def test_targets_spare_what_is_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    held = {"/srv/cache", "/srv/cache/a/db", "/srv/cache/b/c d", "/srv/cache/x/100%/y"}
    assert fake_targets(monkeypatch, held) == (
        [Target("/srv/cache", 600.0, ("/srv/cache/a/db", "/srv/cache/b", "/srv/cache/x"))],
        [],
    )


def test_a_holder_that_cannot_be_named_skips_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fake_targets(monkeypatch, {"/srv/cache/a"}, ["pid 7: /other/ns/file"]) == (
        [],
        [
            "/srv/cache: not cleaned this time, in use where it cannot be named:"
            " pid 7: /other/ns/file"
        ],
    )
    assert fake_targets(monkeypatch, {"/srv/cache/a b"}) == (
        [],
        [
            "/srv/cache: not cleaned this time, in use where it cannot be named: a name in"
            " /srv/cache that a tmpfiles.d line cannot carry"
        ],
    )
