"""The README's "Fleets" section: the Prometheus and Ansible YAML it shows parses, names the
real rules file, the real configuration path and the real `rampipectl check-config` command
(run here the way Ansible's `validate` runs it), and its table of alerts is the rules file's.
Ansible itself is not needed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from rampiped import cli, config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RULES = ROOT / "packaging" / "prometheus" / "rampiped-alerts.yml"
UNIT = ROOT / "packaging" / "systemd" / "rampiped.service"
EXAMPLE = ROOT / "rampipe.conf.example"


def section() -> str:
    match = re.search(r"^## Fleets\n(.*?)(?=^## )", README.read_text(), re.S | re.M)
    assert match, "README has no section 'Fleets'"
    return match.group(1)


def blocks() -> list[Any]:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section(), re.S)]


def ansible_lists() -> list[list[dict[str, Any]]]:
    return [b for b in blocks() if isinstance(b, list)]


def tasks() -> list[dict[str, Any]]:
    lists = ansible_lists()
    assert len(lists) == 2, "expected a task list and a handler list"
    return lists[0]


def handlers() -> list[dict[str, Any]]:
    return ansible_lists()[1]


def template_task() -> dict[str, Any]:
    found = [t for t in tasks() if "ansible.builtin.template" in t]
    assert len(found) == 1
    return found[0]


def installed_rampipectl() -> str:
    """Where `make install` puts rampipectl (the unit's ExecReload calls it there)."""
    match = re.search(r"^ExecReload=(\S+/rampipectl) ", UNIT.read_text(), re.M)
    assert match, "the unit has no ExecReload through rampipectl"
    return match.group(1)


def test_prometheus_loads_the_rules_file_of_the_repository() -> None:
    prometheus = [b for b in blocks() if isinstance(b, dict) and "rule_files" in b]
    assert len(prometheus) == 1
    files = prometheus[0]["rule_files"]
    assert [Path(f).name for f in files] == [RULES.name]
    assert RULES.is_file()


def test_the_template_installs_the_configuration_and_validates_it() -> None:
    task = template_task()["ansible.builtin.template"]
    assert task["dest"] == config.DEFAULT_PATH == "/etc/rampipe.conf"
    assert task["src"].endswith(".j2")
    argv = shlex.split(task["validate"])
    assert argv == [installed_rampipectl(), "check-config", "%s"]


def test_a_changed_configuration_reloads_rampiped() -> None:
    notify = template_task()["notify"]
    handler = next(h for h in handlers() if h["name"] == notify)
    assert handler["ansible.builtin.systemd"] == {"name": "rampiped", "state": "reloaded"}
    assert UNIT.name == "rampiped.service"
    assert "ExecReload=" in UNIT.read_text()


def validate(rendered: Path) -> int:
    """The template task's `validate` command on a rendered file, as Ansible runs it."""
    argv = shlex.split(template_task()["ansible.builtin.template"]["validate"])
    argv = [str(rendered) if arg == "%s" else arg for arg in argv]
    assert Path(argv[0]).name == "rampipectl"
    return cli.main(argv[1:])


def test_validate_accepts_a_valid_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert validate(EXAMPLE) == 0
    assert capsys.readouterr().out == f"{EXAMPLE}: valid\n"


def test_validate_rejects_an_invalid_file_with_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "source"  # Ansible's name for the rendered file it checks
    bad.write_text("ram:\n  high_watermark: 2\n")
    assert validate(bad) == 78
    assert capsys.readouterr().err.startswith(f"{bad}:2: ram.high_watermark: ")


def test_the_alert_table_is_the_rules_file() -> None:
    rules = {
        rule["alert"]: rule["labels"]["severity"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }
    table = dict(re.findall(r"^\| `(Rampiped\w+)` \| (\w+) \|", section(), re.M))
    assert table == rules


def test_the_stale_textfile_alert_knows_the_documented_file_names() -> None:
    """PromQL regular expressions match the whole label value; node_exporter gives the file's
    path (older versions its name)."""
    rule = next(
        rule
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if rule["alert"] == "RampipedTextfileStale"
    )
    patterns = set(re.findall(r'node_textfile_mtime_seconds\{file=~"([^"]+)"\}', rule["expr"]))
    assert len(patterns) == 1
    pattern = re.compile(patterns.pop().replace("\\\\", "\\"))
    documented = set(
        re.findall(r"^#?\s*textfile: (\S+)$", EXAMPLE.read_text() + README.read_text(), re.M)
    )
    assert documented == {"/var/lib/prometheus/node-exporter/rampiped.prom"}
    for name in documented:
        assert pattern.fullmatch(name)
        assert pattern.fullmatch(Path(name).name)
    for other in ("apt.prom", "/var/lib/prometheus/node-exporter/rampiped.prom.812.tmp"):
        assert not pattern.fullmatch(other)
