"""The RAM area's figures: what the budget counts, what status shows (ramarea.Usage)."""

from __future__ import annotations

import pytest

from rampiped.ramarea import Usage, status_fields, status_text

MiB = 1 << 20


def test_a_tmpfs_area_takes_the_ram_it_stores() -> None:
    u = Usage(10 * MiB, 10 * MiB)
    assert u.ratio == 1.0
    assert u.counted(64 * MiB) == 10 * MiB
    assert Usage(0, 0).ratio == 1.0


@pytest.mark.parametrize(
    ("stored", "ram", "counted"),
    [
        (40 * MiB, 10 * MiB, 10 * MiB),  # below 75% of ram.max: the memory it takes
        (48 * MiB, 12 * MiB, 48 * MiB),  # from there its files: evicted when a tmpfs would be
        (60 * MiB, 61 * MiB, 61 * MiB),  # incompressible: the memory, the larger
    ],
)
def test_the_budget_counts_a_zram_area_by_memory_until_its_files_fill_it(
    stored: int, ram: int, counted: int
) -> None:
    assert Usage(stored, ram, "zram").counted(64 * MiB) == counted


def test_status_shows_stored_bytes_and_ram_per_stored_byte() -> None:
    u = Usage(30 * MiB, 9 * MiB, "zram")
    assert status_fields(u) == {
        "ram_backend": "zram",
        "stored_bytes": 30 * MiB,
        "ram_per_stored_byte": 0.3,
    }
    assert status_text([Usage(MiB, MiB)]) == ""
    assert status_text([u, Usage(10 * MiB, 10 * MiB)]) == " (40.0 MiB stored, 0.47 RAM per byte)"
