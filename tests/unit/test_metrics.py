"""Metrics: the registry's text as Prometheus parses it, the accounting of absorbed and written
bytes, the STATUS line text and the textfile."""

from __future__ import annotations

import os
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rampiped import metrics, pins
from rampiped.metrics import Metrics, PinSample, Sample

NGINX = "/var/log/nginx"
PVE = "/var/lib/pve-cluster"


def scrape(text: bytes | str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample: (name, labels) -> value, parsed the way Prometheus does."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


def sample(*pins_: PinSample, monitor: dict[str, int] | None = None) -> Sample:
    return Sample(pins_, 1 << 30, monitor or {})


def _has_created_series() -> bool:
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("probe_total", "A probe.", registry=registry).inc()
    return b"probe_created" in prometheus_client.generate_latest(registry)


def test_no_created_series_with_disable_created_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", True)
    assert _has_created_series()  # (else the assertion below proves nothing)
    metrics.disable_created_series()
    assert not _has_created_series()
    assert b"_created" not in Metrics().render()


def test_no_created_series_without_disable_created_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Debian 12's prometheus-client 0.16 has no disable_created_metrics()."""
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", True)
    monkeypatch.delattr(prometheus_client, "disable_created_metrics")
    assert _has_created_series()
    metrics.disable_created_series()
    assert not _has_created_series()


def test_gauges_per_pin_and_overall() -> None:
    m = Metrics()
    m.update(
        sample(
            PinSample(NGINX, "overlay", "pinned", 812.5, 4096, 1000, 42.0),
            PinSample(PVE, "copy", "draining", 3.0, 8192, 24, 7.5),
            monitor={"events": 1234, "lost_events": 2, "ignored": 5, "unresolved": 1},
        )
    )
    s = scrape(m.render())
    assert value(s, "rampiped_pins") == 2
    assert value(s, "rampiped_ram_bytes") == 12288
    assert value(s, "rampiped_ram_max_bytes") == 1 << 30
    assert value(s, "rampiped_dirty_bytes") == 1024
    assert value(s, "rampiped_data_at_risk_seconds") == 42.0
    assert value(s, "rampiped_pin_write_rate", path=NGINX, mode="overlay") == 812.5
    assert value(s, "rampiped_pin_ram_bytes", path=PVE, mode="copy") == 8192
    assert value(s, "rampiped_pin_dirty_bytes", path=NGINX, mode="overlay") == 1000
    assert value(s, "rampiped_pin_data_at_risk_seconds", path=PVE, mode="copy") == 7.5
    states = {
        st: value(s, "rampiped_pin_state", path=PVE, mode="copy", state=st)
        for st in ("pinning", "pinned", "draining")
    }
    assert states == {"pinning": 0, "pinned": 0, "draining": 1}
    assert value(s, "rampiped_monitor_events_total") == 1234
    assert value(s, "rampiped_monitor_lost_events_total") == 2
    assert value(s, "rampiped_monitor_ignored_events_total") == 5
    assert value(s, "rampiped_monitor_unresolved_events_total") == 1
    assert value(s, "rampiped_info", version=metrics.__version__) == 1
    assert not [k for k in s if k[0].endswith("_created")]


def test_what_a_pins_checkpoints_wrote_and_would_have_written_whole() -> None:
    m = Metrics()
    m.update(
        sample(
            PinSample(
                NGINX, "copy", "pinned", 1.0, 4096, 0, 0.0, written_bytes=300, whole_file_bytes=9000
            )
        )
    )
    s = scrape(m.render())
    assert value(s, "rampiped_pin_written_bytes", path=NGINX, mode="copy") == 300
    assert value(s, "rampiped_pin_whole_file_bytes", path=NGINX, mode="copy") == 9000


def test_nothing_pinned_is_zero_not_absent() -> None:
    m = Metrics()
    m.update(sample())
    s = scrape(m.render())
    for name in ("rampiped_pins", "rampiped_ram_bytes", "rampiped_dirty_bytes"):
        assert value(s, name) == 0
    assert value(s, "rampiped_data_at_risk_seconds") == 0


def test_a_pin_that_is_gone_leaves_its_gauges_but_keeps_its_counters() -> None:
    m = Metrics()
    m.pinned(NGINX, "overlay")
    m.update(sample(PinSample(NGINX, "overlay", "pinned", 1.0, 10, 0, 0.0)))
    m.unpinned(NGINX, "overlay", evicted=False, seconds=0.2, files=3, nbytes=300)
    m.update(sample())
    s = scrape(m.render())
    assert not [
        k for k in s if k[0].startswith("rampiped_pin_") and k[0] != "rampiped_pins_made_total"
    ]
    assert value(s, "rampiped_pins_made_total", path=NGINX, mode="overlay") == 1
    assert value(s, "rampiped_unpins_total", path=NGINX, mode="overlay") == 1
    assert value(s, "rampiped_pins") == 0


def test_counts_of_every_outcome() -> None:
    m = Metrics()
    m.pinned(NGINX, "overlay")
    m.pin_failed(PVE, "copy", "refused")
    m.pin_failed(PVE, "copy", "refused")
    m.pin_failed(PVE, "copy", "error")
    m.checkpointed(NGINX, "overlay", ok=True, seconds=0.03, files=2, nbytes=2000)
    m.checkpointed(NGINX, "overlay", ok=False, seconds=1.0, files=0, nbytes=0)
    m.unpin_failed(NGINX, "overlay", "busy")
    m.unpinned(NGINX, "overlay", evicted=True, seconds=7.0, files=5, nbytes=5000)
    m.absorbed(NGINX, "overlay", 900)
    m.absorbed(NGINX, "overlay", 0)
    s = scrape(m.render())
    o = {"path": NGINX, "mode": "overlay"}
    assert value(s, "rampiped_pins_made_total", **o) == 1
    assert (
        value(s, "rampiped_failures_total", path=PVE, mode="copy", operation="pin", kind="refused")
        == 2
    )
    assert (
        value(s, "rampiped_failures_total", path=PVE, mode="copy", operation="pin", kind="error")
        == 1
    )
    assert value(s, "rampiped_checkpoints_total", **o, result="ok") == 1
    assert value(s, "rampiped_checkpoints_total", **o, result="failed") == 1
    assert value(s, "rampiped_failures_total", **o, operation="checkpoint", kind="error") == 1
    assert value(s, "rampiped_failures_total", **o, operation="unpin", kind="busy") == 1
    assert value(s, "rampiped_unpins_total", **o) == 1
    assert value(s, "rampiped_evictions_total", **o) == 1
    assert value(s, "rampiped_written_bytes_total", **o, operation="checkpoint") == 2000
    assert value(s, "rampiped_written_bytes_total", **o, operation="unpin") == 5000
    assert value(s, "rampiped_written_files_total", **o, operation="unpin") == 5
    assert value(s, "rampiped_absorbed_events_total", **o) == 900
    # the histogram: 0.03 s lands in the 0.05 bucket, 7 s in the 10 s one
    h = "rampiped_writeback_duration_seconds"
    assert value(s, h + "_bucket", **o, operation="checkpoint", le="0.01") == 0
    assert value(s, h + "_bucket", **o, operation="checkpoint", le="0.05") == 1
    assert value(s, h + "_bucket", **o, operation="unpin", le="5.0") == 0
    assert value(s, h + "_bucket", **o, operation="unpin", le="10.0") == 1
    assert value(s, h + "_count", **o, operation="unpin") == 1
    assert value(s, h + "_sum", **o, operation="unpin") == 7.0


def test_absorbed_bytes_are_growth_plus_what_a_write_back_wrote_beyond_it() -> None:
    m = Metrics()
    o = {"path": NGINX, "mode": "overlay"}
    steps: list[tuple[str, int, float]] = [
        # (event, bytes, absorbed total after it)
        ("pinned", 0, 0),
        ("measured", 100, 100),
        ("measured", 300, 300),
        ("measured", 250, 300),  # a file shrank or went: nothing absorbed, nothing undone
        ("checkpoint", 400, 450),  # 150 beyond the 250 last measured went through RAM unseen
        ("measured", 50, 500),  # growth since the checkpoint
        ("measured", 0, 500),  # removed before it reached the disk: spared
        ("measured", 70, 570),
        ("unpin", 80, 580),
    ]
    written = 0
    for event, n, absorbed in steps:
        if event == "pinned":
            m.pinned(NGINX, "overlay")
        elif event == "measured":
            m.measured(NGINX, "overlay", n)
        elif event == "checkpoint":
            m.checkpointed(NGINX, "overlay", ok=True, seconds=0.1, files=1, nbytes=n)
            written += n
        else:
            m.unpinned(NGINX, "overlay", evicted=False, seconds=0.1, files=1, nbytes=n)
            written += n
        s = scrape(m.render())
        assert value(s, "rampiped_absorbed_bytes_total", **o) == absorbed, (event, n)
    assert written == 480
    assert value(s, "rampiped_absorbed_bytes_total", **o) - written == 100


def test_a_failed_checkpoint_keeps_the_growth_measured() -> None:
    m = Metrics()
    m.measured(NGINX, "overlay", 100)
    m.checkpointed(NGINX, "overlay", ok=False, seconds=0.0, files=0, nbytes=0)
    m.measured(NGINX, "overlay", 150)
    s = scrape(m.render())
    assert value(s, "rampiped_absorbed_bytes_total", path=NGINX, mode="overlay") == 150


def test_paths_that_are_not_utf8_still_render() -> None:
    m = Metrics()
    odd = os.fsdecode(b"/var/log/caf\xe9")
    m.pinned(odd, "overlay")
    s = scrape(m.render())
    assert value(s, "rampiped_pins_made_total", path="/var/log/caf\\xe9", mode="overlay") == 1


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.pinned('/srv/a "quoted"\\dir', "copy")
    s = scrape(m.render())
    assert value(s, "rampiped_pins_made_total", path='/srv/a "quoted"\\dir', mode="copy") == 1


def test_what_the_alert_rules_compare_against() -> None:
    """The checkpoint interval of each pin, the eviction threshold and the textfile interval:
    the alert rules (packaging/prometheus) compare data at risk, RAM and the textfile's age
    with them."""
    m = Metrics()
    m.update(
        Sample(
            (
                PinSample(NGINX, "overlay", "pinned", 1.0, 4096, 10, 12.0, sync_interval=300.0),
                PinSample(PVE, "copy", "pinned", 1.0, 4096, 0, 0.0),
            ),
            1000,
            {},
            ram_high_bytes=900,
            textfile_interval=15.0,
        )
    )
    s = scrape(m.render())
    assert value(s, "rampiped_pin_sync_interval_seconds", path=NGINX, mode="overlay") == 300.0
    assert value(s, "rampiped_pin_sync_interval_seconds", path=PVE, mode="copy") == 0.0
    assert value(s, "rampiped_ram_high_watermark_bytes") == 900
    assert value(s, "rampiped_textfile_interval_seconds") == 15.0
    m.update(sample())
    s = scrape(m.render())
    assert not [k for k in s if k[0] == "rampiped_pin_sync_interval_seconds"]


def test_failure_counters_start_at_zero_with_the_pin() -> None:
    """increase() cannot see the first failure of a series that appears with it at 1."""
    m = Metrics()
    m.pinned(NGINX, "overlay")
    s = scrape(m.render())
    o = {"path": NGINX, "mode": "overlay"}
    assert value(s, "rampiped_checkpoints_total", **o, result="ok") == 0
    assert value(s, "rampiped_checkpoints_total", **o, result="failed") == 0
    assert value(s, "rampiped_failures_total", **o, operation="checkpoint", kind="error") == 0
    assert value(s, "rampiped_failures_total", **o, operation="unpin", kind="error") == 0
    assert value(s, "rampiped_unpins_total", **o) == 0
    assert value(s, "rampiped_evictions_total", **o) == 0


# --------------------------------------------------------------------------- the daemon's side


def test_observer_counts_job_outcomes(tmp_path: Path) -> None:
    mgr = pins.PinManager(str(tmp_path / "run"), str(tmp_path / "journal"), ram_limit=1 << 20)
    obs = metrics.Observer(
        metrics.config.MetricsConfig(),
        mgr,
        rate=lambda _p, _now: 0.0,
        ram_max=lambda: 1 << 20,
        monitor=dict,
    )
    rec = pins.SyncRecord(time=0.0, ok=True, seconds=0.5, files=4, bytes=4096)
    bad = pins.SyncRecord(time=0.0, ok=False, seconds=0.5, error="rsync failed")
    obs.finished("pin", NGINX, "overlay", "hot", object(), None)
    obs.finished("pin", PVE, "copy", "static pin", None, pins.PinRefused("in use"))
    obs.finished("checkpoint", NGINX, "overlay", "periodic", rec, None)
    obs.finished("checkpoint", NGINX, "overlay", "periodic", bad, None)
    obs.finished("checkpoint", NGINX, "overlay", "periodic", None, OSError("gone"))
    obs.finished("unpin", NGINX, "overlay", "stopping", None, pins.UnpinBusy("held", []))
    obs.finished("unpin", NGINX, "overlay", "stopping", None, RuntimeError("rsync"))
    obs.finished("unpin", NGINX, "overlay", "evicted: RAM short", rec, None)
    obs.finished("unpin", NGINX, "overlay", "2.0 events/s < 5/s for 2m", rec, None)
    s = scrape(obs.metrics.render())
    o = {"path": NGINX, "mode": "overlay"}
    assert value(s, "rampiped_pins_made_total", **o) == 1
    assert (
        value(s, "rampiped_failures_total", path=PVE, mode="copy", operation="pin", kind="refused")
        == 1
    )
    assert value(s, "rampiped_checkpoints_total", **o, result="ok") == 1
    assert value(s, "rampiped_checkpoints_total", **o, result="failed") == 2
    assert value(s, "rampiped_failures_total", **o, operation="unpin", kind="busy") == 1
    assert value(s, "rampiped_failures_total", **o, operation="unpin", kind="error") == 1
    assert value(s, "rampiped_unpins_total", **o) == 2
    assert value(s, "rampiped_evictions_total", **o) == 1
    assert value(s, "rampiped_written_bytes_total", **o, operation="unpin") == 8192


def test_observer_reports_intervals_and_the_watermark(tmp_path: Path) -> None:
    mgr = pins.PinManager(str(tmp_path / "run"), str(tmp_path / "journal"), ram_limit=1 << 20)
    obs = metrics.Observer(
        metrics.config.MetricsConfig(interval=30.0),
        mgr,
        rate=lambda _p, _now: 0.0,
        ram_max=lambda: 1000,
        monitor=dict,
        ram_high=lambda: 900,
        sync_interval=lambda: 120.0,
    )
    for path, own in ((NGINX, None), (PVE, 30.0)):
        mgr.pins[path] = pins.Pin(
            path=path,
            id=path.rsplit("/", 1)[1],
            mode="copy",
            origin="static",
            state="pinning",  # not walked: nothing on disk to measure here
            pinned_at=0.0,
            pinned_wall=0.0,
            sync_interval=own,
        )
    s = scrape(obs.render(0.0))
    assert value(s, "rampiped_pin_sync_interval_seconds", path=NGINX, mode="copy") == 120.0
    assert value(s, "rampiped_pin_sync_interval_seconds", path=PVE, mode="copy") == 30.0
    assert value(s, "rampiped_ram_high_watermark_bytes") == 900
    assert value(s, "rampiped_textfile_interval_seconds") == 30.0


# --------------------------------------------------------------------------- texts and files


@pytest.mark.parametrize(
    ("dirty", "age", "text"),
    [
        (0, 0.0, "nothing at risk"),
        (1363148, 42.4, "1.3 MiB at risk (oldest 42s)"),
        (0, 3.0, "0 B at risk (oldest 3s)"),  # a deletion: no bytes, still not on disk
        (512, 3725.0, "512 B at risk (oldest 1h2m5s)"),
    ],
)
def test_risk_text(dirty: int, age: float, text: str) -> None:
    assert metrics.risk_text(dirty, age) == text
    assert text.isascii()


def test_at_risk_is_the_age_of_the_oldest_change() -> None:
    assert metrics.at_risk(pins.Dirty(10, 1, 1000.0), 1042.5) == 42.5
    assert metrics.at_risk(pins.Dirty(0, 0, None), 1042.5) == 0.0
    assert metrics.at_risk(pins.Dirty(10, 1, 1050.0), 1042.5) == 0.0  # clock stepped back


def test_write_textfile_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "rampiped.prom"
    target.write_text("old\n")
    inode = target.stat().st_ino
    metrics.write_textfile(str(target), b"rampiped_pins 1\n")
    assert target.read_bytes() == b"rampiped_pins 1\n"
    assert target.stat().st_ino != inode  # renamed over, never rewritten in place
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rampiped.prom"]


def test_write_textfile_leaves_nothing_behind_when_it_fails(tmp_path: Path) -> None:
    target = tmp_path / "rampiped.prom"
    target.mkdir()  # a directory in the way: the rename fails
    with pytest.raises(OSError):
        metrics.write_textfile(str(target), b"x\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rampiped.prom"]
