"""Engine decisions on scripted timelines with exact times and figures."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest

from rampiped.config import AdaptiveConfig, RamConfig, Size, SyncConfig, WatchRoot
from rampiped.engine import (
    Action,
    CandidateFacts,
    Checkpoint,
    Engine,
    Evict,
    MemoryInfo,
    Pin,
    PinInfo,
    Unpin,
    format_bytes,
    format_duration,
)

MiB = 1024 * 1024
GiB = 1024 * MiB

ADAPTIVE = AdaptiveConfig(
    watch=(WatchRoot("/var/log", 1),),
    exclude=("/var/log/journal",),
    half_life=10.0,
    pin_above=50.0,
    hot_for=5.0,
    unpin_below=5.0,
    cool_for=120.0,
    max_pins=8,
)
RAM = RamConfig(max=Size(bytes=100 * MiB), high_watermark=0.9, min_free=256 * MiB)
SYNC = SyncConfig(interval=300.0)
MEM = MemoryInfo(total=8 * GiB, available=4 * GiB)

NGINX = "/var/log/nginx"
APACHE = "/var/log/apache2"
MYSQL = "/var/log/mysql"


def local(estimate: int = MiB, fstype: str | None = "ext4") -> CandidateFacts:
    return CandidateFacts(
        exists=True,
        is_dir=True,
        is_mountpoint=False,
        contains_mount=False,
        fstype=fstype,
        ram_estimate=estimate,
    )


class Facts:
    """A fake filesystem: facts per path (default: a local ext4 directory of 1 MiB), and a
    record of which paths were asked about."""

    def __init__(self, table: Mapping[str, CandidateFacts] | None = None) -> None:
        self.table = dict(table or {})
        self.asked: list[str] = []

    def __call__(self, path: str) -> CandidateFacts:
        self.asked.append(path)
        return self.table.get(path, local())


def make(
    adaptive: AdaptiveConfig = ADAPTIVE,
    ram: RamConfig = RAM,
    sync: SyncConfig = SYNC,
    runtime_dir: str = "/run/rampiped",
    journal_dir: str = "/var/lib/rampiped",
) -> Engine:
    return Engine(adaptive, ram, sync, runtime_dir, journal_dir)


def pinned(
    path: str,
    *,
    static: bool = False,
    state: str = "pinned",
    ram: int = MiB,
    at: float = 0.0,
    last_sync: float | None = None,
    sync_interval: float | None = None,
    busy: bool = False,
    fill: int | None = None,
) -> PinInfo:
    return PinInfo(path, static, state, ram, at, last_sync, sync_interval, busy, fill)


def pins_of(*infos: PinInfo) -> dict[str, PinInfo]:
    return {i.path: i for i in infos}


def run(
    engine: Engine,
    now: float,
    rates: Mapping[str, float],
    pins: Mapping[str, PinInfo] | None = None,
    memory: MemoryInfo = MEM,
    facts: Facts | None = None,
    overflow: bool = False,
) -> list[Action]:
    return engine.decide(now, rates, pins or {}, memory, facts or Facts(), overflow)


# --------------------------------------------------------------------------- pinning


def test_pins_exactly_when_hot_for_has_elapsed() -> None:
    e = make()
    facts = Facts()
    assert run(e, 100.0, {NGINX: 812.34}, facts=facts) == []
    assert run(e, 104.999, {NGINX: 812.34}, facts=facts) == []
    assert facts.asked == []  # not eligible yet: no syscalls spent on it
    assert run(e, 105.0, {NGINX: 812.34}, facts=facts) == [
        Pin(NGINX, 812.34, "812.3 events/s > 50/s for 5s")
    ]
    assert facts.asked == [NGINX]


def test_rate_equal_to_pin_above_is_not_hot() -> None:
    e = make()
    run(e, 0.0, {NGINX: 50.0})
    assert run(e, 10.0, {NGINX: 50.0}) == []
    assert e.explain(NGINX, 10.0)["hot_since"] is None


def test_a_dip_resets_the_hot_timer() -> None:
    e = make()
    run(e, 0.0, {NGINX: 80.0})
    run(e, 3.0, {NGINX: 49.0})  # dip: the timer starts again
    assert e.explain(NGINX, 3.0)["hot_since"] is None
    run(e, 4.0, {NGINX: 80.0})
    assert run(e, 5.0, {NGINX: 80.0}) == []
    assert run(e, 8.999, {NGINX: 80.0}) == []
    assert run(e, 9.0, {NGINX: 80.0}) == [Pin(NGINX, 80.0, "80.0 events/s > 50/s for 5s")]


def test_absence_from_the_rates_resets_the_hot_timer() -> None:
    e = make()
    run(e, 0.0, {NGINX: 80.0})
    run(e, 2.0, {})
    run(e, 3.0, {NGINX: 80.0})
    assert run(e, 7.5, {NGINX: 80.0}) == []
    assert run(e, 8.0, {NGINX: 80.0}) != []


def test_hottest_first_within_max_pins() -> None:
    e = make(dataclasses.replace(ADAPTIVE, max_pins=3))
    rates = {NGINX: 60.0, APACHE: 90.0, MYSQL: 70.0, "/var/log/a": 60.0}
    # A draining adaptive pin holds a place until it is gone; a static one and a failed one
    # do not count.
    pins = pins_of(
        pinned("/var/log/old", state="draining"),
        pinned("/var/lib/pve-cluster", static=True),
        pinned("/var/log/broken", state="failed"),
    )
    run(e, 0.0, rates, pins)
    facts = Facts()
    actions = run(e, 5.0, rates, pins, facts=facts)
    assert actions == [
        Pin(APACHE, 90.0, "90.0 events/s > 50/s for 5s"),
        Pin(MYSQL, 70.0, "70.0 events/s > 50/s for 5s"),
    ]
    assert facts.asked == [APACHE, MYSQL]  # the others were refused before any syscall
    for path in ("/var/log/a", NGINX):  # equal rates: by path
        assert e.explain(path, 5.0)["blocked"] == "max_pins reached: 3 adaptive pins"


def test_equal_rates_are_admitted_in_path_order() -> None:
    e = make()
    rates = {MYSQL: 70.0, APACHE: 70.0, NGINX: 70.0}
    run(e, 0.0, rates)
    assert [a.path for a in run(e, 5.0, rates)] == [APACHE, MYSQL, NGINX]


def test_disabled_adaptive_pins_nothing() -> None:
    e = make(dataclasses.replace(ADAPTIVE, enabled=False))
    run(e, 0.0, {NGINX: 900.0})
    assert run(e, 60.0, {NGINX: 900.0}) == []
    assert e.explain(NGINX, 60.0)["blocked"] == "adaptive pinning is disabled"


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/", "the root directory is never pinned"),
        ("/proc/sys", "/proc and below are never pinned"),
        ("/sys", "/sys and below are never pinned"),
        ("/dev/shm", "/dev and below are never pinned"),
        ("/run/user", "/run and below are never pinned"),
        ("/boot/grub", "/boot and below are never pinned"),
        ("/srv/rp/state", "inside the runtime directory /srv/rp"),
        ("/srv", "contains the runtime directory /srv/rp"),
        ("/var/lib/rampiped", "inside the journal directory /var/lib/rampiped"),
        ("/var/lib", "contains the journal directory /var/lib/rampiped"),
        ("/var/log/journal", "excluded by /var/log/journal"),
        ("/var/log/journal/0123", "excluded by /var/log/journal"),
        ("/var/log", "contains the excluded /var/log/journal"),
        ("/home/ann/.cache", "excluded by /home/*/.cache"),
        ("/home/ann", "contains the excluded /home/*/.cache"),
        ("/var/lib/pve-cluster/sub", "inside the pinned /var/lib/pve-cluster"),
        ("/var/lib/pve", "contains the pinned /var/lib/pve/x"),
    ],
)
def test_never_pinned(path: str, reason: str) -> None:
    adaptive = dataclasses.replace(ADAPTIVE, exclude=("/var/log/journal", "/home/*/.cache"))
    e = make(adaptive, runtime_dir="/srv/rp")
    pins = pins_of(pinned("/var/lib/pve-cluster", static=True), pinned("/var/lib/pve/x"))
    facts = Facts()
    run(e, 0.0, {path: 500.0}, pins, facts=facts)
    assert run(e, 5.0, {path: 500.0}, pins, facts=facts) == []
    assert facts.asked == []
    assert e.explain(path, 5.0)["blocked"] == reason


def test_not_excluded_when_only_a_prefix_of_the_name_matches() -> None:
    e = make()
    run(e, 0.0, {"/var/log/journalx": 500.0})
    assert [a.path for a in run(e, 5.0, {"/var/log/journalx": 500.0})] == ["/var/log/journalx"]


def test_a_candidate_admitted_in_this_round_occupies_its_tree() -> None:
    e = make()
    rates = {"/srv/a": 90.0, "/srv/a/b": 80.0}
    run(e, 0.0, rates)
    assert [a.path for a in run(e, 5.0, rates)] == ["/srv/a"]
    assert e.explain("/srv/a/b", 5.0)["blocked"] == "inside the pinned /srv/a"


@pytest.mark.parametrize(
    "facts, reason",
    [
        (dataclasses.replace(local(), exists=False), "does not exist"),
        (dataclasses.replace(local(), is_dir=False), "not a directory"),
        (dataclasses.replace(local(), is_mountpoint=True), "is a mount point"),
        (dataclasses.replace(local(), contains_mount=True), "contains a mount point"),
        (local(fstype=None), "filesystem type unknown"),
        (local(fstype="tmpfs"), "not on a local disk filesystem (tmpfs)"),
        (local(fstype="overlay"), "not on a local disk filesystem (overlay)"),
        (local(fstype="nfs4"), "not on a local disk filesystem (nfs4)"),
        (local(fstype="cifs"), "not on a local disk filesystem (cifs)"),
        (local(fstype="fuse.sshfs"), "not on a local disk filesystem (fuse.sshfs)"),
    ],
)
def test_refused_by_the_filesystem(facts: CandidateFacts, reason: str) -> None:
    e = make()
    f = Facts({NGINX: facts})
    run(e, 0.0, {NGINX: 500.0}, facts=f)
    assert run(e, 5.0, {NGINX: 500.0}, facts=f) == []
    assert e.explain(NGINX, 5.0)["blocked"] == reason
    # Still refused on the next round, and said so again.
    assert run(e, 6.0, {NGINX: 500.0}, facts=f) == []
    assert f.asked == [NGINX, NGINX]


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "f2fs", "vfat", "ntfs3", "bcachefs"])
def test_local_filesystems_are_accepted(fstype: str) -> None:
    e = make()
    f = Facts({NGINX: local(fstype=fstype)})
    run(e, 0.0, {NGINX: 500.0}, facts=f)
    assert [a.path for a in run(e, 5.0, {NGINX: 500.0}, facts=f)] == [NGINX]


# --------------------------------------------------------------------------- RAM


def test_ram_admission_against_the_high_watermark() -> None:
    # max 100 MiB, high watermark 90 %: 90 MiB. Pins use 80 MiB.
    pins = pins_of(pinned("/var/lib/pve-cluster", static=True, ram=80 * MiB))
    e = make()
    f = Facts({NGINX: local(11 * MiB)})
    run(e, 0.0, {NGINX: 500.0}, pins, facts=f)
    assert run(e, 5.0, {NGINX: 500.0}, pins, facts=f) == []
    assert e.explain(NGINX, 5.0)["blocked"] == (
        "RAM budget: pins use 80.0 MiB + estimate 11.0 MiB > high watermark 90.0 MiB"
        " (90% of 100.0 MiB)"
    )
    f.table[NGINX] = local(10 * MiB)  # exactly up to the watermark is allowed
    assert [a.path for a in run(e, 6.0, {NGINX: 500.0}, pins, facts=f)] == [NGINX]
    assert e.explain(NGINX, 6.0)["blocked"] is None


def test_ram_admission_counts_pins_admitted_in_the_same_round() -> None:
    pins = pins_of(pinned("/var/lib/pve-cluster", static=True, ram=80 * MiB))
    e = make()
    rates = {NGINX: 500.0, APACHE: 400.0}
    f = Facts({NGINX: local(6 * MiB), APACHE: local(6 * MiB)})
    run(e, 0.0, rates, pins, facts=f)
    assert [a.path for a in run(e, 5.0, rates, pins, facts=f)] == [NGINX]
    assert e.explain(APACHE, 5.0)["blocked"] == (
        "RAM budget: pins use 86.0 MiB + estimate 6.0 MiB > high watermark 90.0 MiB"
        " (90% of 100.0 MiB)"
    )


def test_ram_max_as_a_percentage_of_physical_ram() -> None:
    ram = RamConfig(max=Size(percent=25.0), high_watermark=0.5, min_free=0)
    e = make(ram=ram)
    mem = MemoryInfo(total=400 * MiB, available=300 * MiB)  # max 100 MiB, high 50 MiB
    f = Facts({NGINX: local(51 * MiB)})
    run(e, 0.0, {NGINX: 500.0}, memory=mem, facts=f)
    assert run(e, 5.0, {NGINX: 500.0}, memory=mem, facts=f) == []
    assert e.explain(NGINX, 5.0)["blocked"] == (
        "RAM budget: pins use 0 B + estimate 51.0 MiB > high watermark 50.0 MiB (50% of 100.0 MiB)"
    )


def test_ram_admission_against_min_free() -> None:
    e = make()
    mem = MemoryInfo(total=8 * GiB, available=300 * MiB)  # min_free 256 MiB
    f = Facts({NGINX: local(45 * MiB)})
    run(e, 0.0, {NGINX: 500.0}, memory=mem, facts=f)
    assert run(e, 5.0, {NGINX: 500.0}, memory=mem, facts=f) == []
    assert e.explain(NGINX, 5.0)["blocked"] == (
        "RAM budget: MemAvailable 300.0 MiB - estimate 45.0 MiB < min_free 256.0 MiB"
    )
    f.table[NGINX] = local(44 * MiB)  # leaves exactly min_free
    assert [a.path for a in run(e, 6.0, {NGINX: 500.0}, memory=mem, facts=f)] == [NGINX]


def test_evicts_the_coldest_pin_above_the_high_watermark() -> None:
    e = make()
    pins = pins_of(
        pinned(NGINX, ram=50 * MiB),
        pinned(APACHE, ram=45 * MiB),
        pinned("/var/lib/pve-cluster", static=True, ram=0),
    )
    rates = {NGINX: 20.0, APACHE: 10.0, "/var/lib/pve-cluster": 0.0}
    assert run(e, 10.0, rates, pins) == [
        Evict(
            APACHE,
            10.0,
            "RAM used by pins 95.0 MiB above high watermark 90.0 MiB (90% of 100.0 MiB);"
            " coldest pin at 10.0 events/s",
        )
    ]
    assert e.pressure is not None and e.pressure.startswith("RAM used by pins 95.0 MiB")


def test_a_fast_growing_pin_is_evicted_before_it_passes_the_watermark() -> None:
    # 40 MiB at 10.0 s, 70 MiB half a second later: 60 MiB/s would pass 90 MiB within the
    # eviction's lead time, and the writes landing meanwhile would find the tmpfs full
    e = make()
    rates = {NGINX: 20.0, APACHE: 10.0}
    assert run(e, 10.0, rates, pins_of(pinned(NGINX, ram=MiB), pinned(APACHE, ram=40 * MiB))) == []
    assert run(e, 10.5, rates, pins_of(pinned(NGINX, ram=MiB), pinned(APACHE, ram=70 * MiB))) == [
        Evict(
            APACHE,
            10.0,
            "RAM used by pins 71.0 MiB, growing 60.0 MiB/s, would pass high watermark 90.0 MiB"
            " (90% of 100.0 MiB) within 1s; coldest pin at 10.0 events/s",
        )
    ]


def test_a_pin_filled_fast_right_after_it_was_made_is_evicted_at_the_first_decide() -> None:
    # made empty at 10.0 s, 70 MiB half a second later: the first decide after the pin knows
    # how fast it grows (without `made`, only the second one would)
    e = make()
    rates = {APACHE: 10.0}
    e.made(APACHE, 10.0, 0)
    assert run(e, 10.5, rates, pins_of(pinned(APACHE, ram=70 * MiB))) == [
        Evict(
            APACHE,
            10.0,
            "RAM used by pins 70.0 MiB, growing 140.0 MiB/s, would pass high watermark"
            " 90.0 MiB (90% of 100.0 MiB) within 1s; coldest pin at 10.0 events/s",
        )
    ]


def test_a_pin_made_with_its_copy_does_not_count_the_copy_as_growth() -> None:
    # a copy pin holds its copy from the start: growth is measured from there
    e = make()
    rates = {APACHE: 10.0}
    e.made(APACHE, 10.0, 60 * MiB)
    assert run(e, 10.5, rates, pins_of(pinned(APACHE, ram=61 * MiB))) == []
    assert e.pressure is None


def test_a_compressed_pin_filling_fast_is_evicted_before_its_area_is_full() -> None:
    # ram.backend zram: 1 MiB of RAM holds 40, then 70 MiB of files; the budget counts the RAM
    # until the files near the area's size, but the area fills as a tmpfs would (ENOSPC)
    e = make()
    rates = {NGINX: 20.0, APACHE: 10.0}
    at_40 = pins_of(pinned(NGINX, ram=MiB), pinned(APACHE, ram=MiB, fill=40 * MiB))
    assert run(e, 10.0, rates, at_40) == []
    at_70 = pins_of(pinned(NGINX, ram=MiB), pinned(APACHE, ram=2 * MiB, fill=70 * MiB))
    assert run(e, 10.5, rates, at_70) == [
        Evict(
            APACHE,
            10.0,
            "RAM used by pins 3.0 MiB (their files 71.0 MiB), growing 60.0 MiB/s, would pass"
            " high watermark 90.0 MiB"
            " (90% of 100.0 MiB) within 1s; coldest pin at 10.0 events/s",
        )
    ]


def test_a_compressed_pin_whose_count_jumps_to_its_files_is_not_evicted_for_the_jump() -> None:
    # a slow writer's files reach the area's AREA_FULL: what the budget counts jumps from the
    # RAM (2 MiB) to the files (76 MiB), which is not growth
    e = make()
    rates = {APACHE: 10.0}
    assert run(e, 10.0, rates, pins_of(pinned(APACHE, ram=2 * MiB, fill=74 * MiB))) == []
    assert run(e, 10.5, rates, pins_of(pinned(APACHE, ram=76 * MiB, fill=76 * MiB))) == []
    assert e.pressure is None


def test_slow_growth_and_pins_being_made_do_not_evict_early() -> None:
    e = make()
    rates = {NGINX: 20.0, APACHE: 10.0}
    assert run(e, 10.0, rates, pins_of(pinned(APACHE, ram=40 * MiB))) == []
    # 5 MiB in half a second: 10 MiB/s, 55 MiB within the lead time
    assert run(e, 10.5, rates, pins_of(pinned(APACHE, ram=45 * MiB))) == []
    # a pin being made grows by its initial copy: that is not a writer filling RAM
    making = pins_of(pinned(APACHE, ram=45 * MiB), pinned(NGINX, ram=0, state="pinning"))
    assert run(e, 11.0, rates, making) == []
    made = pins_of(pinned(APACHE, ram=45 * MiB), pinned(NGINX, ram=40 * MiB, state="pinning"))
    assert run(e, 11.5, rates, made) == []
    both = pins_of(pinned(APACHE, ram=45 * MiB), pinned(NGINX, ram=40 * MiB))
    assert run(e, 12.0, rates, both) == []
    assert e.pressure is None


def test_no_eviction_at_exactly_the_high_watermark() -> None:
    e = make()
    pins = pins_of(pinned(NGINX, ram=45 * MiB), pinned(APACHE, ram=45 * MiB))
    assert run(e, 10.0, {NGINX: 20.0, APACHE: 10.0}, pins) == []
    assert e.pressure is None


def test_evicts_when_available_memory_falls_below_min_free() -> None:
    e = make()
    pins = pins_of(pinned(NGINX, ram=MiB), pinned(APACHE, ram=MiB))
    mem = MemoryInfo(total=8 * GiB, available=200 * MiB)
    assert run(e, 10.0, {NGINX: 20.0, APACHE: 30.0}, pins, memory=mem) == [
        Evict(
            NGINX,
            20.0,
            "MemAvailable 200.0 MiB below min_free 256.0 MiB; coldest pin at 20.0 events/s",
        )
    ]


def test_eviction_skips_busy_and_static_pins_and_waits_for_a_draining_one() -> None:
    e = make()
    rates = {NGINX: 20.0, APACHE: 10.0, "/s": 0.0}
    static = pinned("/s", static=True, ram=60 * MiB)
    busy = pins_of(pinned(NGINX, ram=20 * MiB), pinned(APACHE, ram=20 * MiB, busy=True), static)
    assert [(type(a), a.path) for a in run(e, 10.0, rates, busy)] == [(Evict, NGINX)]
    draining = pins_of(
        pinned(NGINX, ram=20 * MiB), pinned(APACHE, ram=20 * MiB, state="draining"), static
    )
    assert run(e, 11.0, rates, draining) == []
    only_static = pins_of(static, pinned("/t", static=True, ram=40 * MiB))
    assert run(e, 12.0, {}, only_static) == []
    assert e.pressure is not None


def test_an_evicted_pin_is_not_also_checkpointed() -> None:
    e = make()
    pins = pins_of(pinned(NGINX, ram=95 * MiB, at=0.0))
    assert [type(a) for a in run(e, 400.0, {NGINX: 20.0}, pins)] == [Evict]


# --------------------------------------------------------------------------- unpinning


def test_unpins_after_cool_for_below_unpin_below() -> None:
    e = make()
    pins = pins_of(pinned(NGINX, at=0.0, last_sync=0.0))
    assert run(e, 10.0, {NGINX: 0.4}, pins) == []
    assert e.explain(NGINX, 10.0)["cool_since"] == 10.0
    assert e.explain(NGINX, 10.0)["unpin_at"] == 130.0
    assert run(e, 129.999, {NGINX: 0.4}, pins) == []
    assert run(e, 130.0, {NGINX: 0.4}, pins) == [Unpin(NGINX, 0.4, "0.4 events/s < 5/s for 2m")]


def test_a_rise_to_unpin_below_resets_the_cool_timer() -> None:
    e = make()
    pins = pins_of(pinned(NGINX, at=0.0, last_sync=0.0))
    run(e, 10.0, {NGINX: 1.0}, pins)
    run(e, 100.0, {NGINX: 5.0}, pins)  # not below 5
    run(e, 101.0, {}, pins)  # absent: 0 events/s
    assert run(e, 220.999, {}, pins) == []
    assert run(e, 221.0, {}, pins) == [Unpin(NGINX, 0.0, "0.0 events/s < 5/s for 2m")]


def test_overflow_resets_the_cool_timer() -> None:
    e = make()
    pins = pins_of(pinned(NGINX, at=0.0, last_sync=0.0))
    run(e, 10.0, {NGINX: 1.0}, pins)
    assert run(e, 130.0, {NGINX: 1.0}, pins, overflow=True) == []
    assert e.explain(NGINX, 130.0)["cool_since"] is None
    run(e, 131.0, {NGINX: 1.0}, pins)
    assert run(e, 250.999, {NGINX: 1.0}, pins) == []
    assert run(e, 251.0, {NGINX: 1.0}, pins) == [Unpin(NGINX, 1.0, "1.0 events/s < 5/s for 2m")]


def test_busy_pinning_and_static_pins_are_not_unpinned() -> None:
    e = make()
    pins = pins_of(
        pinned(NGINX, busy=True, last_sync=0.0),
        pinned(APACHE, state="pinning"),
        pinned("/var/lib/pve-cluster", static=True, last_sync=0.0),
    )
    run(e, 0.0, {}, pins)
    assert run(e, 200.0, {}, pins) == []
    # Once the operation is over, the time spent cold while busy counts.
    pins[NGINX] = pinned(NGINX, last_sync=0.0)
    assert run(e, 201.0, {}, pins) == [Unpin(NGINX, 0.0, "0.0 events/s < 5/s for 2m")]


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_every_sync_interval() -> None:
    e = make()
    p = pinned(NGINX, at=100.0)
    rates = {NGINX: 100.0}
    assert run(e, 399.999, rates, pins_of(p)) == []
    assert run(e, 400.0, rates, pins_of(p)) == [Checkpoint(NGINX, "periodic, every 5m")]
    p = dataclasses.replace(p, last_sync=400.5)
    assert run(e, 700.0, rates, pins_of(p)) == []
    assert run(e, 700.5, rates, pins_of(p)) == [Checkpoint(NGINX, "periodic, every 5m")]


def test_per_pin_sync_interval_and_zero_disabling() -> None:
    e = make(sync=SyncConfig(interval=0.0))
    pins = pins_of(
        pinned("/a", static=True, at=0.0, sync_interval=60.0),
        pinned("/b", static=True, at=0.0, sync_interval=0.0),
        pinned("/c", static=True, at=0.0),  # sync.interval 0: never
        pinned("/d", static=True, at=0.0, sync_interval=90.0, busy=True),
        pinned("/e", static=True, at=0.0, sync_interval=1.5, state="pinning"),
        pinned("/f", static=True, at=0.0, sync_interval=0.5, state="failed"),
    )
    assert run(e, 59.0, {}, pins) == []
    assert run(e, 3600.0, {}, pins) == [Checkpoint("/a", "periodic, every 1m")]


# --------------------------------------------------------------------------- order


def test_actions_come_in_the_order_unpin_checkpoint_pin() -> None:
    e = make()
    pins = pins_of(
        pinned(MYSQL, at=0.0, last_sync=0.0),
        pinned("/var/lib/pve-cluster", static=True, at=0.0, sync_interval=60.0),
        pinned("/var/log/cold", at=0.0, last_sync=0.0),
    )
    rates = {NGINX: 90.0, APACHE: 90.0, MYSQL: 1.0}
    run(e, 0.0, rates, pins)
    actions = run(e, 120.0, rates, pins)
    assert [(type(a).__name__, a.path) for a in actions] == [
        ("Unpin", "/var/log/cold"),
        ("Unpin", MYSQL),
        ("Checkpoint", "/var/lib/pve-cluster"),
        ("Pin", APACHE),
        ("Pin", NGINX),
    ]


def test_eviction_comes_before_unpin_and_checkpoint() -> None:
    e = make()
    pins = pins_of(
        pinned(MYSQL, ram=90 * MiB, at=0.0, last_sync=0.0),
        pinned("/var/log/cold", ram=MiB, at=0.0, last_sync=0.0),
        pinned("/var/lib/pve-cluster", static=True, at=0.0, sync_interval=60.0),
    )
    rates = {MYSQL: 0.5, "/var/log/cold": 1.0}
    run(e, 0.0, rates, pins)
    actions = run(e, 120.0, rates, pins)
    assert [(type(a).__name__, a.path) for a in actions] == [
        ("Evict", MYSQL),
        ("Unpin", "/var/log/cold"),
        ("Checkpoint", "/var/lib/pve-cluster"),
    ]


# --------------------------------------------------------------------------- backoff


def test_refusal_backoff_doubles_up_to_five_minutes() -> None:
    e = make()
    rates = {NGINX: 500.0}
    run(e, 0.0, rates)
    now = 5.0
    assert [a.path for a in run(e, now, rates)] == [NGINX]
    delays = []
    for n in range(1, 10):
        e.refused(NGINX, now, "held open by nginx (pid 812)")
        info = e.explain(NGINX, now)
        assert info["refusals"] == n
        retry_at = info["retry_at"]
        assert isinstance(retry_at, float)
        delays.append(retry_at - now)
        assert run(e, retry_at - 0.001, rates) == []
        assert run(e, retry_at, rates) == [Pin(NGINX, 500.0, "500.0 events/s > 50/s for 5s")]
        now = retry_at
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]


def test_explain_shows_the_refusal_and_the_retry_time() -> None:
    e = make()
    rates = {NGINX: 500.0}
    run(e, 0.0, rates)
    run(e, 5.0, rates)
    e.refused(NGINX, 5.0, "held open by nginx (pid 812)")
    e.refused(NGINX, 6.0, "held open by nginx (pid 812)")
    assert run(e, 7.0, rates) == []
    info = e.explain(NGINX, 7.0)
    assert info["blocked"] == "held open by nginx (pid 812) (refused 2 times; retry in 9s)"
    assert info["retry_at"] == 16.0


def test_backoff_resets_when_the_directory_cools() -> None:
    e = make()
    run(e, 0.0, {NGINX: 500.0})
    run(e, 5.0, {NGINX: 500.0})
    e.refused(NGINX, 5.0, "busy")
    e.refused(NGINX, 10.0, "busy")
    run(e, 11.0, {NGINX: 20.0})  # cooler, but not below unpin_below: kept
    assert e.explain(NGINX, 11.0)["refusals"] == 2
    run(e, 12.0, {NGINX: 4.9})
    info = e.explain(NGINX, 12.0)
    assert (info["refusals"], info["retry_at"], info["blocked"]) == (0, None, None)
    e.refused(NGINX, 13.0, "busy")
    assert e.explain(NGINX, 13.0)["retry_at"] == 18.0  # 5 s again


def test_backoff_resets_when_pinned() -> None:
    e = make()
    e.refused(NGINX, 0.0, "busy")
    e.refused(NGINX, 5.0, "busy")
    run(e, 6.0, {NGINX: 500.0}, pins_of(pinned(NGINX, state="pinning")))
    assert e.explain(NGINX, 6.0)["refusals"] == 2
    run(e, 7.0, {NGINX: 500.0}, pins_of(pinned(NGINX)))
    assert e.explain(NGINX, 7.0)["refusals"] == 0


# --------------------------------------------------------------------------- reconfigure


def test_reconfigure_applies_thresholds_at_once_and_keeps_timers() -> None:
    e = make()
    run(e, 0.0, {NGINX: 80.0})
    assert run(e, 3.0, {NGINX: 80.0}) == []
    e.reconfigure(
        dataclasses.replace(ADAPTIVE, hot_for=2.0), RAM, SYNC, "/run/rampiped", "/var/lib/rampiped"
    )
    assert run(e, 3.0, {NGINX: 80.0}) == [Pin(NGINX, 80.0, "80.0 events/s > 50/s for 2s")]


def test_reconfigure_raising_pin_above_cools_a_hot_directory() -> None:
    e = make()
    run(e, 0.0, {NGINX: 80.0})
    e.reconfigure(dataclasses.replace(ADAPTIVE, pin_above=100.0), RAM, SYNC, "/run/rampiped", "/x")
    assert run(e, 5.0, {NGINX: 80.0}) == []
    assert e.explain(NGINX, 5.0)["hot_since"] is None


def test_reconfigure_thresholds_for_unpin_and_ram() -> None:
    e = make()
    pins = pins_of(pinned(NGINX, ram=50 * MiB, last_sync=0.0))
    run(e, 0.0, {NGINX: 8.0}, pins)
    assert e.explain(NGINX, 0.0)["cool_since"] is None
    e.reconfigure(
        dataclasses.replace(ADAPTIVE, unpin_below=10.0, cool_for=30.0),
        RamConfig(max=Size(bytes=50 * MiB), high_watermark=0.9, min_free=0),
        SYNC,
        "/run/rampiped",
        "/var/lib/rampiped",
    )
    # 50 MiB now exceeds 90 % of 50 MiB: evicted at once.
    assert [type(a) for a in run(e, 1.0, {NGINX: 8.0}, pins)] == [Evict]
    e.reconfigure(
        dataclasses.replace(ADAPTIVE, unpin_below=10.0, cool_for=30.0),
        RAM,
        SYNC,
        "/run/rampiped",
        "/var/lib/rampiped",
    )
    assert run(e, 30.999, {NGINX: 8.0}, pins) == []
    assert run(e, 31.0, {NGINX: 8.0}, pins) == [Unpin(NGINX, 8.0, "8.0 events/s < 10/s for 30s")]


def test_reconfigure_excluding_unpins_and_disabling_stops_new_pins() -> None:
    e = make()
    pins = pins_of(
        pinned(NGINX, last_sync=0.0),
        pinned(APACHE, last_sync=0.0),
        pinned("/var/lib/pve-cluster", static=True, last_sync=0.0),
    )
    rates = {NGINX: 900.0, APACHE: 900.0}
    assert run(e, 1.0, rates, pins) == []
    e.reconfigure(dataclasses.replace(ADAPTIVE, exclude=(NGINX,)), RAM, SYNC, "/run/rampiped", "/x")
    assert run(e, 2.0, rates, pins) == [Unpin(NGINX, 900.0, f"excluded by {NGINX}")]
    del pins[NGINX]
    e.reconfigure(dataclasses.replace(ADAPTIVE, enabled=False), RAM, SYNC, "/run/rampiped", "/x")
    rates["/var/log/new"] = 900.0
    assert run(e, 3.0, rates, pins) == []
    assert run(e, 30.0, rates, pins) == []  # hot, but no new pins; the old ones stay
    assert run(e, 31.0, {}, pins) == []
    assert run(e, 151.0, {}, pins) == [Unpin(APACHE, 0.0, "0.0 events/s < 5/s for 2m")]


def test_never_pin_reason() -> None:
    e = make()
    assert e.never_pin_reason("/var/log/journal/") == "excluded by /var/log/journal"
    assert e.never_pin_reason("/var/lib") == "contains the journal directory /var/lib/rampiped"
    assert e.never_pin_reason("/run/rampiped/x") == "/run and below are never pinned"
    assert e.never_pin_reason("/var/log/nginx") is None


# --------------------------------------------------------------------------- queries


def test_explain_reports_the_timers() -> None:
    e = make()
    run(e, 10.0, {NGINX: 80.0})
    assert e.explain(NGINX, 12.0) == {
        "path": NGINX,
        "pinned": None,
        "static": None,
        "hot_since": 10.0,
        "eligible_at": 15.0,
        "cool_since": None,
        "unpin_at": None,
        "blocked": None,
        "retry_at": None,
        "refusals": 0,
    }
    assert e.explain("/var/log/other/", 12.0)["path"] == "/var/log/other"


def test_top() -> None:
    e = make()
    rates = {NGINX: 1.0, APACHE: 30.0, MYSQL: 30.0, "/var/log/x": 2.0}
    assert e.top(rates, 3) == [(APACHE, 30.0), (MYSQL, 30.0), ("/var/log/x", 2.0)]
    assert e.top(rates, 0) == []


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0.0, "0s"),
        (0.5, "500ms"),
        (0.0999, "100ms"),
        (0.9999, "1s"),
        (1.0, "1s"),
        (2.5, "2.5s"),
        (5.0, "5s"),
        (59.0, "59s"),
        (60.0, "1m"),
        (90.0, "1m30s"),
        (120.0, "2m"),
        (300.0, "5m"),
        (3600.0, "1h"),
        (5400.0, "1h30m"),
        (3661.0, "1h1m1s"),
        (90000.0, "25h"),
        (-5.0, "-5s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (95 * MiB, "95.0 MiB"),
        (0.9 * 100 * MiB, "90.0 MiB"),
        (1536 * MiB, "1.5 GiB"),
        (2048 * GiB, "2.0 TiB"),
    ],
)
def test_format_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text
