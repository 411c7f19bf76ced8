"""RateTable (continuous-time EMA, DESIGN §3) and Attributor (path -> candidate directory)."""

from __future__ import annotations

import math
import random

import pytest

from rampiped.config import WatchRoot
from rampiped.rates import (
    PRUNE_FLOOR,
    Attributor,
    PathPattern,
    RateTable,
    is_within,
    normalize,
)

H = 10.0
LAM = math.log(2) / H
EXACT = 1e-12


# --------------------------------------------------------------------------- RateTable


def test_one_event_reads_lambda_times_weight_and_halves_per_half_life() -> None:
    t = RateTable(H)
    t.add("a", 1, 100.0)
    assert t.rate("a", 100.0) == pytest.approx(LAM, rel=EXACT)
    assert t.rate("a", 110.0) == pytest.approx(LAM / 2, rel=EXACT)
    assert t.rate("a", 120.0) == pytest.approx(LAM / 4, rel=EXACT)
    assert t.rate("a", 105.0) == pytest.approx(LAM / math.sqrt(2), rel=EXACT)


def test_two_events_one_half_life_apart() -> None:
    t = RateTable(H)
    t.add("a", 1, 0.0)
    t.add("a", 1, 10.0)
    assert t.rate("a", 10.0) == pytest.approx(1.5 * LAM, rel=EXACT)
    assert t.rate("a", 30.0) == pytest.approx(1.5 * LAM / 4, rel=EXACT)


def test_weight_counts_as_that_many_events() -> None:
    t = RateTable(H)
    t.add("a", 3, 0.0)
    t.add("b", 1, 0.0)
    t.add("b", 1, 0.0)
    t.add("b", 1, 0.0)
    assert t.rate("a", 0.0) == pytest.approx(3 * LAM, rel=EXACT)
    assert t.rate("a", 7.0) == pytest.approx(t.rate("b", 7.0), rel=EXACT)


def test_decay_over_one_half_life_halves_any_reading() -> None:
    t = RateTable(H)
    for i in range(37):
        t.add("a", 1 + i % 3, i * 0.3)
    before = t.rate("a", 20.0)
    assert t.rate("a", 30.0) == pytest.approx(before / 2, rel=EXACT)


def test_event_earlier_than_the_last_counts_at_the_last_time() -> None:
    t = RateTable(H)
    t.add("a", 1, 10.0)
    t.add("a", 1, 5.0)
    assert t.rate("a", 10.0) == pytest.approx(2 * LAM, rel=EXACT)
    # A reading before the last event does not grow by decaying backwards.
    assert t.rate("a", 0.0) == pytest.approx(2 * LAM, rel=EXACT)


def test_unknown_key_reads_zero() -> None:
    assert RateTable(H).rate("nowhere", 5.0) == 0.0


@pytest.mark.parametrize("spacing, n", [(0.01, 500), (0.5, 7), (3.0, 4)])
def test_closed_form_of_a_regular_stream(spacing: float, n: int) -> None:
    # n events of weight 1 at 0, spacing, ...: r = lambda * (1 - q^n) / (1 - q), q = e^(-lambda dt)
    t = RateTable(H)
    for i in range(n):
        t.add("a", 1, i * spacing)
    q = math.exp(-LAM * spacing)
    assert t.rate("a", (n - 1) * spacing) == pytest.approx(LAM * (1 - q**n) / (1 - q), rel=1e-9)


@pytest.mark.parametrize(
    "half_life, spacing, weight",
    [
        (10.0, 0.01, 1),  # 100 events/s one by one
        (10.0, 0.001, 0.1),  # fractional weights
        (10.0, 0.1, 10),  # bursts of 10
        (10.0, 0.5, 50),
        (10.0, 1.0, 100),  # one burst of 100 per second
        (2.0, 0.01, 1),
        (2.0, 0.2, 20),
    ],
)
def test_steady_100_per_second_reads_100_after_five_half_lives(
    half_life: float, spacing: float, weight: float
) -> None:
    t = RateTable(half_life)
    end = 5 * half_life
    for i in range(round(end / spacing) + 1):
        t.add("a", weight, i * spacing)
    # Five half-lives in, the start-up shortfall is 1/32 (about 3 %).
    assert t.rate("a", end) == pytest.approx(100, abs=5)
    assert t.rate("a", end + spacing / 2) == pytest.approx(100, abs=5)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_jittered_stream_reads_100(seed: int) -> None:
    rng = random.Random(seed)
    t = RateTable(H)
    x = 0.0
    while x < 5 * H:
        t.add("a", 1, x)
        x += rng.uniform(0.005, 0.015)  # mean spacing 10 ms
    # Over 200 seeds these parameters read 95.6 .. 98.2 (the 1/32 start-up shortfall included).
    assert t.rate("a", 5 * H) == pytest.approx(100, abs=5)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_jittered_bursts_read_100(seed: int) -> None:
    rng = random.Random(seed)
    t = RateTable(H)
    x = 0.0
    while x < 5 * H:
        w = rng.randint(2, 10)
        t.add("a", w, x)
        x += rng.uniform(0.8, 1.2) * w / 100  # w events, then a gap of w/100 s on average
    # Over 300 seeds these parameters read 95.1 .. 98.8. (Bursts of 1..20 with +-50 % gaps
    # are noisier: 92 .. 106, an EMA with a 10 s half-life does not average that away.)
    assert t.rate("a", 5 * H) == pytest.approx(100, abs=5)


def test_snapshot_applies_the_floor_at_now() -> None:
    t = RateTable(H)
    t.add("hot", 1000, 0.0)
    t.add("cold", 1, 0.0)  # reads 0.0693 at 0
    assert t.snapshot(0.0) == pytest.approx({"hot": 1000 * LAM, "cold": LAM})
    snap = t.snapshot(40.0)  # cold: 0.0693 / 16 = 0.0043 < 0.01
    assert set(snap) == {"hot"}
    assert snap["hot"] == pytest.approx(1000 * LAM / 16, rel=EXACT)
    assert t.snapshot(40.0, floor=0.001).keys() == {"hot", "cold"}


def test_prune_forgets_decayed_keys() -> None:
    t = RateTable(H)
    t.add("old", 1, 0.0)  # 0.0693 -> below 0.001 after log2(69.3) = 6.1 half-lives
    t.add("new", 1, 100.0)
    assert len(t) == 2
    t.prune(60.0)
    assert len(t) == 2
    t.prune(62.0)
    assert len(t) == 1
    assert "old" not in t and "new" in t
    assert t.rate("old", 62.0) == 0.0


def test_prune_looks_at_the_keys_once_per_eighth_of_a_half_life() -> None:
    t = RateTable(H)
    t.add("old", 1, 0.0)
    assert t.prune(10.0) == 0  # 0.0347: kept; the next look is due at 11.25
    assert t.prune(61.9, floor=1.0) == 1  # due: gone
    t.add("old", 1, 61.9)
    assert t.prune(62.0, floor=1.0) == 0  # not due before 61.9 + H / 8
    assert "old" in t
    assert t.prune(61.9 + H / 8, floor=1.0) == 1
    assert "old" not in t


def test_prune_keeps_what_is_asked_to_be_kept_however_quiet() -> None:
    t = RateTable(H)
    for key in ("pinned", "pending", "other"):
        t.add(key, 1, 0.0)
    assert t.prune(1000.0, keep={"pinned", "pending"}) == 1
    assert "pinned" in t and "pending" in t and "other" not in t
    assert 0.0 < t.rate("pinned", 1000.0) < 1e-20  # kept as it is: tiny, never negative


def test_a_hot_or_cooling_candidate_is_never_pruned() -> None:
    """The engine pins above pin_above held for hot_for and unpins below unpin_below held for
    cool_for; every reading it acts on is far above the floor, and a forgotten key reads 0,
    below any threshold, as its true reading (below the floor) is too."""
    pin_above, unpin_below = 0.5, 0.05  # low thresholds
    t = RateTable(H)
    now = 0.0
    while now < 300.0:  # a steady 1 event/s: the reading stays near 1 > pin_above
        t.add("hot", 1, now)
        now += 1.0
        t.prune(now)
    assert t.rate("hot", now) > pin_above
    # writes stop: it cools (below unpin_below, held for cool_for) long before it is forgotten
    while t.rate("hot", now) >= unpin_below:
        t.prune(now)
        assert "hot" in t
        now += 0.5
    cooling_since = now
    while "hot" in t:
        reading = t.rate("hot", now)
        t.prune(now)
        if "hot" not in t:
            assert reading < PRUNE_FLOOR
        now += 0.5
    assert now - cooling_since > math.log2(unpin_below / PRUNE_FLOOR) * H
    assert t.rate("hot", now) == 0.0


def test_the_table_holds_the_recent_keys_not_every_key_ever_written() -> None:
    """100,000 candidates written once each, 1000 a second, pruned on every 0.5 s tick: the
    table holds those written in the last ~log2(lambda * 3 / floor) half-lives, then none."""
    t = RateTable(H)
    most = 0
    now = 0.0
    for i in range(100_000):
        now = i / 1000
        t.add(f"/srv/c{i}", 3, now)
        if i % 500 == 0:
            t.prune(now)
            most = max(most, len(t))
    kept_for = math.log2(LAM * 3 / PRUNE_FLOOR) * H + H / 8  # seconds a key lives
    assert most <= (kept_for + 0.5) * 1000
    assert most < 100_000
    t.prune(now + kept_for + 1.0)
    assert len(t) == 0


def test_set_half_life_keeps_the_reading_at_now() -> None:
    t = RateTable(10.0)
    t.add("a", 1, 0.0)
    t.set_half_life(20.0, now=10.0)
    assert t.half_life == 20.0
    assert t.rate("a", 10.0) == pytest.approx(LAM / 2, rel=EXACT)
    assert t.rate("a", 30.0) == pytest.approx(LAM / 4, rel=EXACT)
    t.add("a", 1, 30.0)  # new events weigh with the new lambda
    assert t.rate("a", 30.0) == pytest.approx(LAM / 4 + math.log(2) / 20, rel=EXACT)


def test_set_half_life_without_now_keeps_the_value_at_the_last_event() -> None:
    t = RateTable(10.0)
    t.add("a", 1, 0.0)
    t.set_half_life(5.0)
    assert t.rate("a", 0.0) == pytest.approx(LAM, rel=EXACT)
    assert t.rate("a", 5.0) == pytest.approx(LAM / 2, rel=EXACT)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_half_life_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="half-life"):
        RateTable(bad)
    with pytest.raises(ValueError, match="half-life"):
        RateTable(1.0).set_half_life(bad)


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "path, root, inside",
    [
        ("/var/log", "/var/log", True),
        ("/var/log/x", "/var/log", True),
        ("/var/logx", "/var/log", False),
        ("/var", "/var/log", False),
        ("/anything", "/", True),
        ("/", "/", True),
    ],
)
def test_is_within_compares_components(path: str, root: str, inside: bool) -> None:
    assert is_within(path, root) is inside


def test_normalize() -> None:
    assert normalize("//var//log/./nginx/") == "/var/log/nginx"
    assert normalize("/var/log/../lib") == "/var/lib"
    assert normalize("/") == "/"


def test_path_pattern_with_wildcards() -> None:
    p = PathPattern("/home/*/.cache")
    assert p.match_at_or_above("/home/ann/.cache/pip") == "/home/ann/.cache"
    assert p.match_at_or_above("/home/ann/.cachex") is None
    assert p.match_at_or_above("/home/ann") is None
    assert p.may_match_below("/home/ann")
    assert p.may_match_below("/home")
    assert not p.may_match_below("/home/ann/.cache")
    assert not p.may_match_below("/srv")


# --------------------------------------------------------------------------- Attributor

WATCH = (
    WatchRoot("/var/log", 1),
    WatchRoot("/srv", 1),
    WatchRoot("/srv/data", 2),
    WatchRoot("/home", 0),
)
EXCLUDE = ("/var/log/journal", "/home/*/.cache")
STATIC = ("/var/lib/pve-cluster", "/var/log/apps/special")
TRANSLATE = {
    "/run/rampiped/pins/3/ram/upper": "/var/log/nginx",
    "/run/rampiped/pins/4/ram/upper": "/var/lib/pve-cluster",
    "/run/rampiped/pins/5/ram/upper": "/var/log/journal",
}


@pytest.mark.parametrize(
    "dirpath, expected",
    [
        # depth 1 below /var/log
        ("/var/log", None),  # a file directly in the root counts for no candidate
        ("/var/log/nginx", "/var/log/nginx"),
        ("/var/log/nginx/sub/deeper", "/var/log/nginx"),
        ("/var/logx/a", None),
        ("/var", None),
        # exclusions, component-aware, wildcards
        ("/var/log/journal", None),
        ("/var/log/journal/0123abcd", None),
        ("/var/log/journalx", "/var/log/journalx"),
        ("/home/ann/.cache", None),
        ("/home/ann/.cache/pip/http", None),
        ("/home/ann/.cachex", "/home"),
        # depth 0: the root itself
        ("/home", "/home"),
        ("/home/ann/docs", "/home"),
        # nested roots: the longest wins; depth 2
        ("/srv/web/html", "/srv/web"),
        ("/srv/data", None),
        ("/srv/data/a", None),
        ("/srv/data/a/b", "/srv/data/a/b"),
        ("/srv/data/a/b/c/d", "/srv/data/a/b"),
        ("/srv/datax/y", "/srv/datax"),
        # static pins: at or below, also inside a watch root
        ("/var/lib/pve-cluster", "/var/lib/pve-cluster"),
        ("/var/lib/pve-cluster/priv/lock", "/var/lib/pve-cluster"),
        ("/var/lib/pve-clusterx", None),
        ("/var/log/apps/special/x", "/var/log/apps/special"),
        ("/var/log/apps/other", "/var/log/apps"),
        # translation of a pin's RAM side, longest prefix, before everything else
        ("/run/rampiped/pins/3/ram/upper", "/var/log/nginx"),
        ("/run/rampiped/pins/3/ram/upper/sub", "/var/log/nginx"),
        ("/run/rampiped/pins/3/ram/upperx", None),
        ("/run/rampiped/pins/4/ram/upper/priv", "/var/lib/pve-cluster"),
        ("/run/rampiped/pins/5/ram/upper/x", None),  # translated into an exclusion
        # unnormalized input
        ("/var/log//nginx/", "/var/log/nginx"),
        ("/elsewhere", None),
    ],
)
def test_attribution(dirpath: str, expected: str | None) -> None:
    a = Attributor(WATCH, EXCLUDE, STATIC, TRANSLATE)
    assert a.candidate(dirpath) == expected
    assert a.candidate(dirpath) == expected  # from the cache


def test_root_watch_root() -> None:
    a = Attributor([WatchRoot("/", 1)], [])
    assert a.candidate("/") is None
    assert a.candidate("/opt/app/x") == "/opt"
    a0 = Attributor([WatchRoot("/", 0)], ["/proc"])
    assert a0.candidate("/opt") == "/"
    assert a0.candidate("/proc/1") is None


def test_translation_to_a_deeper_path_keeps_the_rest() -> None:
    a = Attributor([WatchRoot("/srv/data", 2)], [], translate={"/run/rp/7/upper": "/srv/data/a/b"})
    assert a.candidate("/run/rp/7/upper/c/d") == "/srv/data/a/b"


def test_cache_is_bounded() -> None:
    a = Attributor(WATCH, EXCLUDE)
    a.CACHE_LIMIT = 8
    for i in range(100):
        assert a.candidate(f"/var/log/d{i}/x") == f"/var/log/d{i}"
        assert len(a._cache) <= 8


def test_negative_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="/var/log: depth"):
        Attributor([WatchRoot("/var/log", -1)], [])
