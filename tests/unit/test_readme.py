"""Every YAML configuration shown in the README is valid: a reader may copy any of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rampiped import config

README = Path(__file__).resolve().parents[2] / "README.md"
# Sections whose YAML is not rampiped's configuration (Prometheus's, Ansible's): checked by
# tests/unit/test_fleets.py.
OTHER_YAML = ("Fleets",)


def _configuration_text() -> str:
    text = README.read_text()
    for title in OTHER_YAML:
        text, found = re.subn(rf"^## {re.escape(title)}\n.*?(?=^## )", "", text, flags=re.S | re.M)
        assert found == 1, f"README has no section {title!r}"
    return text


BLOCKS = re.findall(r"```yaml\n(.*?)```", _configuration_text(), re.S)


def test_the_readme_shows_configurations() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_yaml_block_is_a_valid_configuration(index: int) -> None:
    config.load_text(BLOCKS[index], f"README.md yaml block {index}")
