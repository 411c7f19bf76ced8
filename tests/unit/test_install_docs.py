"""`make install` puts the manual pages and the bash completion in place and `make uninstall`
takes them away (packaging/install-docs.sh, which packaging/install.sh calls), here into
temporary directories: no root needed, nothing of the machine touched."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "packaging" / "install-docs.sh"
INSTALL = ROOT / "packaging" / "install.sh"
SOURCES = {
    "man8/rampiped.8": ROOT / "man" / "rampiped.8",
    "man8/rampipectl.8": ROOT / "man" / "rampipectl.8",
    "man5/rampipe.conf.5": ROOT / "man" / "rampipe.conf.5",
}
COMPLETION = ROOT / "packaging" / "bash-completion" / "rampipectl"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SCRIPT), *map(str, args)], capture_output=True, text=True, check=False
    )


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "share" / "man", tmp_path / "share" / "bash-completion" / "completions"


def installed(mandir: Path, compdir: Path) -> dict[Path, Path]:
    """Installed file: its source."""
    out = {mandir / rel: src for rel, src in SOURCES.items()}
    out[compdir / "rampipectl"] = COMPLETION
    return out


def test_install_copies_every_page_and_the_completion(dirs: tuple[Path, Path]) -> None:
    mandir, compdir = dirs
    proc = run("install", mandir, compdir)
    assert proc.returncode == 0, proc.stderr
    for dst, src in installed(mandir, compdir).items():
        assert dst.read_bytes() == src.read_bytes(), dst
        assert stat.S_IMODE(dst.stat().st_mode) == 0o644, dst
    assert f"in {mandir}" in proc.stdout and f"in {compdir}" in proc.stdout
    # again: the same, no complaint (an upgrade replaces its own files)
    assert run("install", mandir, compdir).returncode == 0


def test_man_finds_the_installed_pages(dirs: tuple[Path, Path]) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed (Debian: man-db)")
    mandir, compdir = dirs
    assert run("install", mandir, compdir).returncode == 0
    for section, name, rel in (
        ("8", "rampiped", "man8/rampiped.8"),
        ("8", "rampipectl", "man8/rampipectl.8"),
        ("5", "rampipe.conf", "man5/rampipe.conf.5"),
    ):
        proc = subprocess.run(
            ["man", f"--manpath={mandir}", "-w", section, name],
            capture_output=True,
            text=True,
            check=False,
        )
        assert (proc.returncode, proc.stdout.strip()) == (0, str(mandir / rel)), proc.stderr


def test_uninstall_removes_them_and_nothing_else(dirs: tuple[Path, Path]) -> None:
    mandir, compdir = dirs
    assert run("install", mandir, compdir).returncode == 0
    other = mandir / "man8" / "other.8"
    other.write_text(".TH OTHER 8\n")
    proc = run("uninstall", mandir, compdir)
    assert proc.returncode == 0, proc.stderr
    for dst in installed(mandir, compdir):
        assert not dst.exists(), dst
        assert f"removed {dst}" in proc.stdout
    assert other.exists() and compdir.is_dir()
    # nothing left to remove: fine
    assert run("uninstall", mandir, compdir).returncode == 0


def test_a_file_of_someone_else_is_neither_replaced_nor_removed(dirs: tuple[Path, Path]) -> None:
    mandir, compdir = dirs
    foreign = compdir / "rampipectl"
    compdir.mkdir(parents=True)
    foreign.write_text("complete -F _other rampipectl\n")
    proc = run("install", mandir, compdir)
    assert proc.returncode == 1
    assert f"{foreign} exists and was not installed by rampiped" in proc.stderr
    assert foreign.read_text() == "complete -F _other rampipectl\n"
    assert not (mandir / "man8" / "rampiped.8").exists()  # checked before anything is copied
    proc = run("uninstall", mandir, compdir)
    assert proc.returncode == 0
    assert f"leaving {foreign}: it was not installed by rampiped" in proc.stdout
    assert foreign.exists()


def test_bad_arguments(tmp_path: Path) -> None:
    assert run("install", tmp_path).returncode == 2
    proc = run("install", "share/man", tmp_path)
    assert proc.returncode == 1 and "'share/man' is not an absolute path" in proc.stderr
    assert run("frob", tmp_path, tmp_path).returncode == 1


def test_make_passes_mandir_and_completiondir_to_install_sh() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for target in ("install", "uninstall"):
        proc = subprocess.run(
            ["make", "-s", "-n", "-C", str(ROOT), target],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        words = proc.stdout.split()
        assert words[-2:] == [
            '"/usr/local/share/man"',
            '"/usr/local/share/bash-completion/completions"',
        ], proc.stdout
        proc = subprocess.run(
            ["make", "-s", "-n", "-C", str(ROOT), target, "MANDIR=/m", "COMPLETIONDIR=/c"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.stdout.split()[-2:] == ['"/m"', '"/c"']


def test_install_sh_hands_them_to_install_docs_sh() -> None:
    text = INSTALL.read_text()
    for action in ("install", "uninstall"):
        call = f'sh "$SRC/packaging/install-docs.sh" {action} "$MANDIR" "$COMPLETIONDIR"'
        assert text.count(call) == 1, call
    # the arguments are checked before anything else happens (before the check for root)
    paths = ["/opt/x", "/usr/local/bin", "/etc/systemd/system", "/etc/rampipe.conf"]
    proc = subprocess.run(
        ["sh", str(INSTALL), "install", *paths, "/usr/local/share/man", "completions"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and "'completions' is not an absolute path" in proc.stderr
    too_many = ["/a", "/b", "/c", "/d", "/e", "/f", "/g"]
    proc = subprocess.run(
        ["sh", str(INSTALL), "install", *too_many], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "usage:" in proc.stderr
