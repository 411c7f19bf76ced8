"""The one retry policy (rampiped/backoff.py): exact waits."""

from __future__ import annotations

import pytest

from rampiped.backoff import RETRY, Backoff


def test_retry_waits_five_seconds_doubling_up_to_five_minutes() -> None:
    waits = []
    delay = 0.0
    for _ in range(9):
        delay = RETRY.next(delay)
        waits.append(delay)
    assert waits == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]
    assert [RETRY.after(n) for n in range(1, 10)] == waits


@pytest.mark.parametrize(("delay", "expected"), [(-1.0, 2.0), (0.5, 2.0), (3.0, 6.0), (9.0, 10.0)])
def test_next_keeps_within_first_and_max(delay: float, expected: float) -> None:
    assert Backoff(first=2.0, max=10.0).next(delay) == expected


def test_after_many_failures_stays_at_max() -> None:
    assert RETRY.after(10_000) == 300.0
