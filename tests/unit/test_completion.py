"""The bash completion of rampipectl (packaging/bash-completion/rampipectl): valid bash, and,
sourced into a bash that is then asked as readline would ask it (COMP_WORDS, COMP_CWORD), it
offers exactly the commands and flags of rampipectl's parser, the choices of --mode,
directories where a command takes DIR and files where it takes a PATH."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rampiped import cli

SCRIPT = Path(__file__).resolve().parents[2] / "packaging" / "bash-completion" / "rampipectl"

# Sources the script, finds the function that `complete` registered for rampipectl, calls it
# as bash's programmable completion does (COMP_WORDS, COMP_CWORD, COMP_LINE, COMP_POINT, and
# the arguments: command, word, previous word) and prints COMPREPLY, one per line.
DRIVER = r"""
source "$1" || exit 3
shift
spec=$(complete -p rampipectl) || exit 4
func=${spec#*-F }
func=${func%% *}
COMP_WORDS=("$@")
COMP_CWORD=$(($# - 1))
COMP_LINE="$*"
COMP_POINT=${#COMP_LINE}
COMPREPLY=()
"$func" rampipectl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


@pytest.fixture(autouse=True)
def _bash() -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")


def complete(*words: str, cwd: Path | None = None) -> set[str]:
    """What completing the last of `words` offers (`rampipectl` is the first)."""
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", DRIVER, "driver", str(SCRIPT), *words],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd or "/")},
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    return {line for line in proc.stdout.splitlines() if line}


def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("rampipectl has no commands")


def flags(p: argparse.ArgumentParser) -> set[str]:
    return {flag for action in p._actions for flag in action.option_strings}


def takes(p: argparse.ArgumentParser, metavar: str) -> bool:
    return any(not a.option_strings and a.metavar == metavar for a in p._actions)


def test_the_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_it_registers_a_function_for_rampipectl() -> None:
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", 'source "$0" && complete -p rampipectl', SCRIPT],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("complete -F ") and proc.stdout.rstrip().endswith(" rampipectl")


def test_first_word_offers_every_command() -> None:
    assert len(subcommands()) >= 8
    assert complete("rampipectl", "") == set(subcommands())


def test_a_prefix_narrows_the_commands() -> None:
    expected = {name for name in subcommands() if name.startswith("s")}
    assert expected == {"status", "sync"}
    assert complete("rampipectl", "s") == expected


def test_global_flags() -> None:
    assert complete("rampipectl", "-") == flags(parser())
    assert complete("rampipectl", "--") == {f for f in flags(parser()) if f.startswith("--")}


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_each_command_offers_its_flags(command: str) -> None:
    expected = flags(subcommands()[command])
    assert "--help" in expected
    assert complete("rampipectl", command, "-") == expected


def test_pin_flags_after_a_global_option() -> None:
    assert complete("rampipectl", "--config", "/etc/rampipe.conf", "pin", "--") == {
        "--mode",
        "--help",
    }
    # --config=PATH: bash splits the word at '='
    words = ("rampipectl", "--config", "=", "/etc/rampipe.conf", "pin", "--")
    assert complete(*words) == {"--mode", "--help"}


def test_mode_offers_its_choices() -> None:
    mode = next(a for a in subcommands()["pin"]._actions if "--mode" in a.option_strings)
    assert mode.choices
    assert complete("rampipectl", "pin", "--mode", "") == set(mode.choices)
    assert complete("rampipectl", "pin", "--mode", "c") == {"copy"}


def test_values_that_are_not_names_get_nothing() -> None:
    assert complete("rampipectl", "sync", "--timeout", "") == set()
    assert complete("rampipectl", "top", "--interval", "") == set()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "alpha").mkdir()
    (tmp_path / "also dir").mkdir()
    (tmp_path / "afile").write_text("")
    (tmp_path / "beta").mkdir()
    return tmp_path


DIR_COMMANDS = sorted(name for name, sub in subcommands().items() if takes(sub, "DIR"))


def test_the_commands_that_take_a_dir() -> None:
    assert DIR_COMMANDS == ["explain", "pin", "sync", "unpin"]


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_dir_arguments_complete_directories_only(command: str, tree: Path) -> None:
    assert complete("rampipectl", command, "a", cwd=tree) == {"alpha", "also dir"}
    assert complete("rampipectl", command, "", cwd=tree) == {"alpha", "also dir", "beta"}


def test_pin_dir_after_its_mode(tree: Path) -> None:
    assert complete("rampipectl", "pin", "--mode", "copy", "b", cwd=tree) == {"beta"}


def test_commands_without_a_dir_offer_no_names(tree: Path) -> None:
    for command in ("status", "reload", "top"):
        assert not takes(subcommands()[command], "DIR")
        assert complete("rampipectl", command, "", cwd=tree) == set()


def test_paths_complete_files(tree: Path) -> None:
    assert takes(subcommands()["check-config"], "PATH")
    assert complete("rampipectl", "check-config", "a", cwd=tree) == {"alpha", "also dir", "afile"}
    assert complete("rampipectl", "--config", "a", cwd=tree) == {"alpha", "also dir", "afile"}
    assert complete("rampipectl", "--socket", "b", cwd=tree) == {"beta"}
