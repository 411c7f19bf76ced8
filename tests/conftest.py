"""Test tiers: unit (pure), system (real kernel, private mount namespace, loop filesystems) and
systemd (booted in a container). The header says which tiers can run here and why not; with
RAMPIPED_REQUIRE_ALL_TIERS=1 (CI) a tier that cannot run is a failure, not a skip."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ALL = os.environ.get("RAMPIPED_REQUIRE_ALL_TIERS") == "1"


def _in_private_mount_namespace() -> bool:
    """True inside the namespace `make test` made for this run (it records its id) when no
    mount there propagates to another namespace."""
    try:
        here = os.readlink("/proc/self/ns/mnt")
        with open("/proc/self/mountinfo") as f:
            shared = any(" shared:" in line.split(" - ")[0] for line in f)
    except OSError:
        return False
    return here == os.environ.get("RAMPIPED_TEST_MNTNS") and not shared


def system_tier_blocker() -> str | None:
    """Why the system tier cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not _in_private_mount_namespace():
        return "not in a private mount namespace (run through `make test`)"
    for tool in ("rsync", "mkfs.ext4", "losetup", "getfacl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (`make deps`)"
    return None


def systemd_tier_blocker() -> str | None:
    blocker = system_tier_blocker()
    if blocker:
        return blocker
    for tool in ("systemd-nspawn", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (`make deps`)"
    if os.environ.get("RAMPIPED_SKIP_SYSTEMD") == "1" and not REQUIRE_ALL:
        return "RAMPIPED_SKIP_SYSTEMD=1"
    return None


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = ["tiers: unit: runs"]
    for name, blocker in (("system", system_tier_blocker()), ("systemd", systemd_tier_blocker())):
        lines.append(f"tiers: {name}: " + ("runs" if blocker is None else f"skipped ({blocker})"))
    return lines


def pytest_runtest_setup(item: pytest.Item) -> None:
    for tier, blocker in (("system", system_tier_blocker()), ("systemd", systemd_tier_blocker())):
        if blocker is None or item.get_closest_marker(tier) is None:
            continue
        if REQUIRE_ALL:
            pytest.fail(f"{tier} tier required (RAMPIPED_REQUIRE_ALL_TIERS=1) but {blocker}")
        pytest.skip(f"{tier} tier: {blocker}")
