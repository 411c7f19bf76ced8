"""rampipectl explain: the daemon's raw facts as sentences (exact texts)."""

from __future__ import annotations

from typing import Any

from rampiped.explain import sentences

BUDGET_LINE = (
    "RAM budget: pins use 41.2 MiB of 256.0 MiB (high watermark 90% = 230.4 MiB);"
    " MemAvailable 1.2 GiB (min_free 64.0 MiB); adaptive pins: 1 of max_pins 8"
)


def facts(**changes: Any) -> dict[str, Any]:
    """A reply of the daemon's explain command: a hot candidate, not pinned, at now=1000."""
    base: dict[str, Any] = {
        "path": "/var/log/nginx",
        "now": 1000.0,
        "rate": 812.34,
        "pinned": None,
        "static": None,
        "hot_since": 996.8,
        "eligible_at": 1001.8,
        "cool_since": None,
        "unpin_at": None,
        "blocked": None,
        "retry_at": None,
        "refusals": 0,
        "candidate": "/var/log/nginx",
        "pending": None,
        "last_refusal": None,
        "pin": None,
        "adaptive": {
            "enabled": True,
            "watch": [{"path": "/var/log", "depth": 1}],
            "exclude": ["/var/log/journal"],
            "pin_above": 50.0,
            "hot_for": 5.0,
            "unpin_below": 5.0,
            "cool_for": 120.0,
            "max_pins": 8,
            "adaptive_pins": 1,
        },
        "sync_interval": 300.0,
        "budget": {
            "used_bytes": 43201331,
            "max_bytes": 268435456,
            "high_watermark": 0.9,
            "available_bytes": 1288490188,
            "min_free_bytes": 67108864,
            "pressure": None,
        },
    }
    base.update(changes)
    return base


PIN = {
    "mode": "overlay",
    "origin": "adaptive",
    "state": "pinned",
    "ram_bytes": 4096,
    "dirty_bytes": 1363148,
    "data_at_risk_s": 42.0,
    "holders": [],
    "error": None,
    "retry_at": None,
    "unpin_requested": False,
    "sync_interval": None,
    "last_sync_at": 940.0,
}


def test_hot_candidate_pins_soon() -> None:
    assert sentences(facts()) == [
        "/var/log/nginx is not pinned.",
        "rate 812.3/s is above pin_above 50/s since 3.2s (hot_for 5s): pins in 1.8s",
        BUDGET_LINE,
    ]


def test_hot_but_held_names_the_holder_and_the_retry() -> None:
    refusal = (
        "cannot pin /var/log/nginx: in use by pid 123 (rsyslogd, rsyslog.service):"
        " fd 5 /var/log/nginx/access.log"
    )
    out = sentences(
        facts(
            hot_since=960.0,
            eligible_at=965.0,
            last_refusal=refusal,
            retry_at=1040.0,
            refusals=3,
            blocked=refusal + " (refused 3 times; retry in 40s)",
        )
    )
    assert out == [
        "/var/log/nginx is not pinned.",
        "rate 812.3/s is above pin_above 50/s since 40s (hot_for 5s): hot long enough to pin",
        "blocked: in use by pid 123 (rsyslogd, rsyslog.service): fd 5"
        " /var/log/nginx/access.log; retry in 40s (refused 3 times)",
        BUDGET_LINE,
    ]


def test_a_refusal_whose_backoff_ran_out() -> None:
    out = sentences(facts(last_refusal="cannot pin /var/log/nginx: it is a mount point"))
    assert (
        out[1] == "rate 812.3/s is above pin_above 50/s since 3.2s (hot_for 5s): eligible in 1.8s"
    )
    assert out[2] == "last attempt refused: it is a mount point; tried again when it is next due"


def test_excluded() -> None:
    out = sentences(
        facts(
            path="/var/log/journal",
            candidate=None,
            rate=0.0,
            hot_since=None,
            eligible_at=None,
            blocked="excluded by /var/log/journal",
        )
    )
    assert out == [
        "/var/log/journal is not pinned.",
        "blocked: excluded by /var/log/journal",
        BUDGET_LINE,
    ]


def test_budget_refusal_and_pressure() -> None:
    budget = dict(facts()["budget"], pressure="MemAvailable 100.0 MiB below min_free 256.0 MiB")
    blocked = "RAM budget: MemAvailable 100.0 MiB - estimate 2.0 MiB < min_free 256.0 MiB"
    out = sentences(facts(hot_since=900.0, eligible_at=905.0, blocked=blocked, budget=budget))
    assert out[1:] == [
        "rate 812.3/s is above pin_above 50/s since 1m40s (hot_for 5s): hot long enough to pin",
        "blocked: " + blocked,
        BUDGET_LINE + "; short of RAM: MemAvailable 100.0 MiB below min_free 256.0 MiB",
    ]


def test_cold_and_not_yet_hot() -> None:
    assert sentences(facts(rate=3.0, hot_since=None))[1] == (
        "rate 3.0/s is below pin_above 50/s: not hot enough to pin"
    )
    assert sentences(facts(hot_since=None))[1] == (
        "rate 812.3/s is above pin_above 50/s: counted as hot from the next decision (hot_for 5s)"
    )
    assert sentences(facts(hot_since=990.0, eligible_at=995.0))[1] == (
        "rate 812.3/s is above pin_above 50/s since 10s (hot_for 5s): pins at the next decision"
    )


def test_adaptive_pinning_off() -> None:
    adaptive = dict(facts()["adaptive"], enabled=False)
    out = sentences(facts(adaptive=adaptive, blocked="adaptive pinning is disabled"))
    assert out[1:3] == [
        "rate 812.3/s; adaptive pinning is off (adaptive.enabled: false)",
        "blocked: adaptive pinning is disabled",
    ]


def test_not_a_candidate_and_below_a_candidate() -> None:
    out = sentences(facts(path="/srv/x", candidate=None, rate=0.0, hot_since=None))
    assert out[:2] == [
        "/srv/x is not pinned.",
        "its writes are not counted: it is not a candidate directory"
        " (watch roots: /var/log (depth 1))",
    ]
    out = sentences(facts(path="/var/log/nginx/old", rate=0.0, hot_since=None))
    assert out[1] == "its writes count towards /var/log/nginx, the candidate directory above it"
    assert len(out) == 3


def test_pinned_and_cooling() -> None:
    out = sentences(facts(pin=PIN, rate=1.25, hot_since=None, cool_since=970.0, unpin_at=1090.0))
    assert out == [
        "/var/log/nginx is pinned (overlay mode, pinned for its write rate).",
        "rate 1.2/s is below unpin_below 5/s since 30s (cool_for 2m): unpins in 1m30s",
        "in RAM: 4.0 KiB; not yet on disk: 1.3 MiB, the oldest change 42s ago",
        "last checkpoint 1m ago; one every 5m",
        BUDGET_LINE,
    ]


def test_pinned_and_held_at_unpin() -> None:
    pin = dict(
        PIN,
        dirty_bytes=0,
        data_at_risk_s=0.0,
        last_sync_at=None,
        error="/var/log/nginx is in use by pid 7 (tail): fd 3 /var/log/nginx/a.log",
        retry_at=1010.0,
    )
    out = sentences(facts(pin=pin, rate=80.0, hot_since=None))
    assert out[1:5] == [
        "rate 80.0/s is not below unpin_below 5/s: stays pinned",
        "in RAM: 4.0 KiB; everything is on disk",
        "no checkpoint yet; one every 5m",
        "unpin blocked: in use by pid 7 (tail): fd 3 /var/log/nginx/a.log; retry in 10s",
    ]


def test_static_and_manual_pins() -> None:
    static = dict(PIN, origin="static", mode="copy", sync_interval=60.0)
    out = sentences(facts(pin=static, rate=1.25, hot_since=None))
    assert out[:2] == [
        "/var/log/nginx is pinned (copy mode, a static pin of the configuration).",
        "rate 1.2/s; stays pinned while rampiped runs",
    ]
    assert out[3] == "last checkpoint 1m ago; one every 1m"
    manual = dict(PIN, origin="manual")
    out = sentences(facts(pin=manual, rate=0.0, hot_since=None, sync_interval=0))
    assert out[1] == "rate 0.0/s; stays pinned until rampipectl unpin"
    assert out[3] == (
        "last checkpoint 1m ago; no periodic checkpoints (written back at unpin, stop and"
        " rampipectl sync)"
    )


def test_being_pinned_and_draining() -> None:
    assert sentences(facts(pending="pin"))[0] == (
        "/var/log/nginx is not pinned yet: its pin is under way."
    )
    out = sentences(facts(pin=dict(PIN, state="draining"), hot_since=None))
    assert out[0] == (
        "/var/log/nginx is being written back and unpinned (overlay mode, pinned for its"
        " write rate)."
    )


def test_every_sentence_is_ascii() -> None:
    for f in (facts(), facts(pin=PIN, hot_since=None)):
        assert all(line.isascii() for line in sentences(f))


BLIND = "fanotify_init: Operation not permitted; a container's seccomp filter or a user namespace"
BLIND_LINE = (
    f"adaptive pinning is off: fanotify is not available here ({BLIND}); static and manual"
    " pins work"
)


def test_fanotify_refused_unpinned() -> None:
    out = sentences(facts(fanotify_off=BLIND, rate=0.0, hot_since=None))
    assert out == ["/var/log/nginx is not pinned.", BLIND_LINE, BUDGET_LINE]


def test_fanotify_refused_pins() -> None:
    for origin, line in (
        ("static", "stays pinned while rampiped runs"),
        ("manual", "stays pinned until rampipectl unpin"),
        ("adaptive", "its writes cannot be counted: stays pinned until rampipectl unpin or a stop"),
    ):
        pin = dict(PIN, origin=origin)
        out = sentences(facts(fanotify_off=BLIND, pin=pin, rate=0.0, hot_since=None))
        assert out[1:3] == [BLIND_LINE, line], origin
        assert out[-1] == BUDGET_LINE
        assert not any("unpin_below" in s for s in out), origin
