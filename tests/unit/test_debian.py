"""The Debian package's metadata agrees with pyproject.toml: the same version, a Debian
package for every dependency but the vendored pyfanotify, and pins that Debian 12's versions
of them satisfy (the package installs from Debian's archive alone)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from rampiped import __version__

REPO = Path(__file__).resolve().parents[2]
# What Debian 12 (bookworm) has, by the name pyproject.toml uses: (Debian package, version).
BOOKWORM = {
    "pyyaml": ("python3-yaml", "6.0"),
    "psutil": ("python3-psutil", "5.9.4"),
    "sdnotify": ("python3-sdnotify", "0.3.1"),
    "prometheus-client": ("python3-prometheus-client", "0.16.0"),
    "jeepney": ("python3-jeepney", "0.8.0"),
}
VENDORED = "pyfanotify"


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = (Requirement(r) for r in project["dependencies"])
    return {r.name.lower(): r for r in reqs}


def depends() -> set[str]:
    control = (REPO / "debian/control").read_text()
    binary = control.split("\nPackage: rampiped\n", 1)[1]
    field = re.search(r"^Depends:(.*?)(?=^\S)", binary, re.S | re.M)
    assert field is not None
    return {re.sub(r"\s*\(.*\)", "", d).strip() for d in field.group(1).split(",") if d.strip()}


def test_changelog_version_is_the_package_version() -> None:
    first = (REPO / "debian/changelog").read_text().splitlines()[0]
    m = re.match(r"rampiped \(([^)]+)\) ", first)
    assert m is not None, first
    assert m.group(1).split("-")[0] == __version__


def test_every_dependency_is_accounted_for() -> None:
    assert set(requirements()) == set(BOOKWORM) | {VENDORED}


@pytest.mark.parametrize("name", sorted(BOOKWORM))
def test_debian_12_satisfies_the_pin(name: str) -> None:
    package, version = BOOKWORM[name]
    assert requirements()[name].specifier.contains(version), (name, version)
    assert package in depends()


def test_pyfanotify_is_the_vendored_version() -> None:
    spec = requirements()[VENDORED].specifier
    vendored = [p.name.removeprefix("pyfanotify-") for p in (REPO / "third_party").iterdir()]
    assert len(vendored) == 1 and spec.contains(vendored[0]), (spec, vendored)
    assert (
        f"PYFANOTIFY = third_party/pyfanotify-{vendored[0]}" in (REPO / "debian/rules").read_text()
    )
