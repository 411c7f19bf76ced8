"""The Prometheus alert rules in packaging/prometheus: valid for `promtool check rules`, their
unit tests pass under `promtool test rules`, every alert has a case where it fires and one
where it does not, and every metric, label and label value they read is one rampiped exports
(taken from the registry here, so that renaming a metric fails this test)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rampiped.metrics import Metrics, PinSample, Sample

RULES_DIR = Path(__file__).resolve().parents[2] / "packaging" / "prometheus"
RULES = RULES_DIR / "rampiped-alerts.yml"
RULE_TESTS = RULES_DIR / "rampiped-alerts.test.yml"
REQUIRE_ALL = os.environ.get("RAMPIPED_REQUIRE_ALL_TIERS") == "1"
# Metrics of other exporters the rules read: node_exporter's textfile collector.
FOREIGN = {"node_textfile_mtime_seconds": {"file", "instance", "job"}}
# Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"instance", "job"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is not installed (Debian: prometheus; `make deps` installs it)"
        if REQUIRE_ALL:
            pytest.fail(f"{reason}, and RAMPIPED_REQUIRE_ALL_TIERS=1")
        pytest.skip(reason)
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@cache
def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> list[str]:
    return [rule["alert"] for rule in rules()]


@cache
def rule_tests() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    return [case for test in doc["tests"] for case in test["alert_rule_test"]]


@cache
def exported() -> dict[str, dict[str, set[str]]]:
    """Every series name rampiped exports -> label -> the values seen, from a registry that
    went through every event and a sample with a pin and a stranded write-back."""
    m = Metrics()
    path, mode = "/var/log/nginx", "overlay"
    m.pinned(path, mode)
    m.pin_failed(path, mode, "refused")
    m.checkpointed(path, mode, ok=True, seconds=0.1, files=1, nbytes=10)
    m.checkpointed(path, mode, ok=False, seconds=0.1, files=0, nbytes=0)
    m.unpin_failed(path, mode, "busy")
    m.unpinned(path, mode, evicted=True, seconds=0.1, files=1, nbytes=10)
    m.absorbed(path, mode, 3)
    pin = PinSample(path, mode, "pinned", 1.0, 100, 10, 5.0, sync_interval=300.0)
    m.update(Sample((pin,), 1000, {"lost_events": 1}, {path: 10}, 900, 15.0))
    out: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            labels = out.setdefault(s.name, {})
            for key, val in s.labels.items():
                labels.setdefault(key, set()).add(val)
    return out


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, the text between its braces) for every series the expression reads."""
    out = []
    for match in re.finditer(r"\b((?:rampiped|node)_[a-z0-9_]+)\b(\{[^}]*\})?", expr):
        out.append((match.group(1), (match.group(2) or "{}")[1:-1]))
    return out


# ------------------------------------------------------------------------------ promtool


def test_promtool_checks_the_rules() -> None:
    proc = run_promtool("check", "rules", RULES.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    proc = run_promtool("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_fails_a_rule_test_that_expects_the_wrong_alert(tmp_path: Path) -> None:
    """The unit tests are compared with what fires: a wrong expectation fails."""
    (tmp_path / RULES.name).write_text(RULES.read_text())
    text = RULE_TESTS.read_text().replace(
        'summary: "A write-back of /var/log/app on pi1 did not complete"',
        'summary: "A write-back of /var/log/elsewhere on pi1 did not complete"',
    )
    assert text != RULE_TESTS.read_text()
    (tmp_path / RULE_TESTS.name).write_text(text)
    proc = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "alertname: RampipedWriteBackStranded" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ coverage


def test_the_rules_cover_what_goes_wrong() -> None:
    assert alerts() == [
        "RampipedWriteBackFailing",
        "RampipedDataAtRisk",
        "RampipedWriteBackStranded",
        "RampipedTextfileStale",
        "RampipedFanotifyEventsLost",
        "RampipedRamBudgetExhausted",
        "RampipedEvicting",
    ]


@pytest.mark.parametrize("alert", alerts())
def test_every_alert_fires_in_a_test_and_stays_quiet_in_another(alert: str) -> None:
    cases = [case for case in rule_tests() if case["alertname"] == alert]
    assert [c for c in cases if c.get("exp_alerts")], f"{alert}: no test where it fires"
    assert [c for c in cases if not c.get("exp_alerts")], f"{alert}: no test where it is quiet"


@pytest.mark.parametrize("alert", alerts())
def test_every_alert_says_how_bad_what_and_where(alert: str) -> None:
    rule = next(r for r in rules() if r["alert"] == alert)
    assert rule["labels"]["severity"] in ("critical", "warning")
    notes = rule["annotations"]
    assert set(notes) == {"summary", "description"}
    assert "{{ $labels.instance }}" in notes["summary"]
    assert len(notes["description"]) > len(notes["summary"])
    fired = [
        alert_["exp_labels"]
        for case in rule_tests()
        if case["alertname"] == alert
        for alert_ in case.get("exp_alerts") or []
    ]
    if any("path" in labels for labels in fired):
        for key in ("summary", "description"):
            assert "{{ $labels.path }}" in notes[key], f"{alert}: {key} does not name the path"


# ------------------------------------------------------------------------------ metric names


def test_the_registry_exports_what_the_check_below_relies_on() -> None:
    names = exported()
    assert "rampiped_checkpoints_total" in names
    assert "rampiped_writeback_duration_seconds_bucket" in names
    assert names["rampiped_failures_total"]["operation"] >= {"pin", "checkpoint", "unpin"}


@pytest.mark.parametrize("alert", alerts())
def test_every_metric_and_label_the_rule_reads_is_exported(alert: str) -> None:
    rule = next(r for r in rules() if r["alert"] == alert)
    used = selectors(rule["expr"])
    assert used, f"{alert}: reads no metric"
    for name, matchers in used:
        if name in FOREIGN:
            known = {key: set[str]() for key in FOREIGN[name]}
        else:
            assert name in exported(), f"{alert}: rampiped exports no {name}"
            known = {**exported()[name], **{key: set() for key in TARGET_LABELS}}
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
            assert label in known, f"{alert}: {name} has no label {label}"
            if name in FOREIGN or label in TARGET_LABELS:
                continue
            for one in value.split("|") if op == "=~" else [value]:
                assert one in known[label], f"{alert}: {name}{{{label}}} is never {one!r}"
        for grouping in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", rule["expr"]):
            for label in (g.strip() for g in grouping.split(",")):
                assert label in TARGET_LABELS or any(
                    label in exported().get(n, {}) or label in FOREIGN.get(n, set())
                    for n, _ in used
                ), f"{alert}: groups by {label}, which no series it reads has"


def test_the_name_check_catches_a_renamed_metric() -> None:
    expr = 'rampiped_pin_data_at_risk_secs > 3 * rampiped_pin_sync_interval_seconds{mode="x"}'
    names = [name for name, _ in selectors(expr)]
    assert names == ["rampiped_pin_data_at_risk_secs", "rampiped_pin_sync_interval_seconds"]
    assert "rampiped_pin_data_at_risk_secs" not in exported()
    assert "rampiped_pin_data_at_risk_seconds" in exported()
