"""The manual pages rampiped(8), rampipectl(8) and rampipe.conf(5): up to date with man/build.py,
rendered by man(1) without a warning, and naming every command, flag, configuration key (with
its default), exit status and signal that the code has, and what the README tells a reader to
use. Names are taken from the code here, not from the generator, so a generator that dropped
one fails these tests."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import textwrap
import typing
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from man import build
from rampiped import cli, config, daemon, errors

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = {page.filename: page.output for page in build.PAGES}
REQUIRE_ALL = os.environ.get("RAMPIPED_REQUIRE_ALL_TIERS") == "1"


def need_man() -> None:
    if shutil.which("man") is None:
        reason = "man is not installed (Debian: man-db; `make deps` installs it)"
        if REQUIRE_ALL:
            pytest.fail(f"{reason}, and RAMPIPED_REQUIRE_ALL_TIERS=1")
        pytest.skip(reason)


def man_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAN", "GROFF"))}
    env.update(MANWIDTH="80", LC_ALL="C.UTF-8", PAGER="cat", MANPAGER="cat")
    return env


@cache
def rendered(filename: str) -> str:
    """The page as `man -l` shows it on an 80-column terminal, without formatting."""
    need_man()
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(PAGES[filename])],
        env=man_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, ""), f"man -l {filename}: {proc.stderr}"
    return proc.stdout


def sections(filename: str) -> dict[str, str]:
    """The rendered page's sections (NAME, SYNOPSIS, ...) by their headings."""
    out: dict[str, str] = {}
    name = ""
    for line in rendered(filename).splitlines()[1:-1]:  # without header and footer
        if re.fullmatch(r"[A-Z][A-Z ]*", line):
            name = line
            out[name] = ""
        elif name:
            out[name] += line + "\n"
    return out


def entries(text: str, tag_line: str = r" {7}(\S+)") -> dict[str, str]:
    """The tagged paragraphs of a section by their tag's first word (without a trailing
    comma), their text with whitespace made single spaces (a name that wraps still matches).
    `tag_line` matches the start of a tag's line."""
    out: dict[str, str] = {}
    tag = ""
    for line in text.splitlines():
        match = re.match(tag_line, line)
        if match:
            tag = match.group(1).rstrip(",")
            out.setdefault(tag, "")
        if tag:
            out[tag] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in out.items()}


def flat(text: str) -> str:
    return " " + " ".join(text.split()) + " "


def expanded_help(prog: str, action: argparse.Action) -> str:
    """An argument's help as --help shows it (%(default)s and %(choices)s filled in), without
    its first letter (the page makes it a capital), whitespace made single spaces."""
    return " ".join(argparse.HelpFormatter(prog)._expand_help(action).split())[1:]


def commands() -> dict[str, argparse.ArgumentParser]:
    return build.subcommands(cli.build_parser())


# ---------------------------------------------------------------------------- the pages as such


def test_the_committed_pages_are_what_man_build_makes() -> None:
    stale = build.stale(build.render_all())
    assert stale == [], f"stale: {[p.name for p in stale]}; run `make man` and commit them"


def test_a_new_command_changes_the_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pages come from the parser: a command added there shows up, and the committed page
    is then stale."""

    def parser() -> argparse.ArgumentParser:
        p = cli.build_parser()
        sub = build._subparsers_action(p)
        s = sub.add_parser("frobnicate", help="turn the knob")
        s.add_argument("--knob", metavar="N", help="which knob")
        return p

    monkeypatch.setitem(build.PARSERS, "rampipectl", parser)
    text = build.render(build.PAGES[1])
    assert r"\fBfrobnicate\fR [\fB\-\-knob\fR \fIN\fR]" in text
    assert "Turn the knob." in text
    assert build.stale({build.PAGES[1].output: text}) == [build.PAGES[1].output]


def test_an_argument_without_help_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def parser() -> argparse.ArgumentParser:
        p = cli.build_parser()
        build.subcommands(p)["status"].add_argument("--quiet", action="store_true")
        return p

    monkeypatch.setitem(build.PARSERS, "rampipectl", parser)
    with pytest.raises(build.BuildError, match=r"rampipectl status --quiet: give it a help"):
        build.render(build.PAGES[1])


def test_a_key_without_a_description_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = build.schema_keys()
    monkeypatch.setattr(build, "schema_keys", lambda: {**keys, "ram.spare": lambda: 1})
    with pytest.raises(build.BuildError, match=r"no @key for ram\.spare"):
        build.render(build.PAGES[2])


@pytest.mark.parametrize("filename", sorted(PAGES))
def test_page_renders_without_warnings(filename: str) -> None:
    text = rendered(filename)  # asserts exit 0 and nothing on stderr
    assert text.splitlines()[0].startswith(filename.rsplit(".", 1)[0].upper() + "(")
    assert {"NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"} <= set(sections(filename))


@pytest.mark.parametrize("filename", sorted(PAGES))
def test_page_passes_groffs_every_warning(filename: str) -> None:
    if shutil.which("groff") is None:
        need_man()  # groff-base comes with man-db
        pytest.skip("groff is not installed (Debian: groff-base)")
    source = PAGES[filename].read_bytes()
    assert source.isascii()
    proc = subprocess.run(
        ["groff", "-man", "-ww", "-z", "-rLL=80n", str(PAGES[filename])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("filename", sorted(PAGES))
def test_whatis_reads_the_name_line(filename: str) -> None:
    """mandb(8) indexes the NAME line for whatis(1) and apropos(1)."""
    need_man()
    name = filename.rsplit(".", 1)[0]
    proc = subprocess.run(
        ["lexgrog", str(PAGES[filename])], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f': "{name} - ' in proc.stdout


def test_pages_refer_to_each_other() -> None:
    names = [f"{p.name}({p.section})" for p in build.PAGES]
    for filename in PAGES:
        see_also = flat(sections(filename)["SEE ALSO"])
        own = filename.rsplit(".", 1)[0] + "(" + filename.rsplit(".", 1)[1] + ")"
        for other in names:
            if other != own:
                assert other in see_also, f"{filename}: SEE ALSO lacks {other}"


# ---------------------------------------------------------------------------- rampiped(8)


def test_daemon_page_has_every_flag() -> None:
    parser = daemon.build_parser()
    page = sections("rampiped.8")
    options = entries(page["OPTIONS"])
    synopsis = flat(page["SYNOPSIS"])
    assert len(parser._actions) == 5
    for action in parser._actions:
        assert action.option_strings, "the daemon takes no arguments but options"
        entry = options[action.option_strings[0]]
        for flag in action.option_strings:
            assert flag in entry.replace(",", " ").split(), flag
        long = max(action.option_strings, key=len)
        assert f" {long}" in synopsis or f"[{long}" in synopsis, long
        if action.metavar:
            assert f"{long} {action.metavar}" in entry
            assert f"[{long} {action.metavar}]" in synopsis
        assert expanded_help(parser.prog, action) in entry
    for level in ("debug", "info", "warning", "error"):
        assert level in options["--log-level"]


def daemon_modules() -> list[ModuleType]:
    """The daemon package and every module in it (but `__main__`, which runs the daemon)."""
    names = [m.name for m in pkgutil.iter_modules(daemon.__path__) if m.name != "__main__"]
    return [daemon, *(importlib.import_module(f"{daemon.__name__}.{n}") for n in names)]


def test_daemon_page_has_every_signal_it_handles() -> None:
    source = "".join(inspect.getsource(m) for m in daemon_modules())
    handled = set(re.findall(r"signal\.signal\(signal\.(SIG[A-Z0-9]+)", source))
    assert {"SIGHUP", "SIGTERM"} <= handled
    signals = flat(sections("rampiped.8")["SIGNALS"])
    for name in handled:
        assert f" {name}" in signals, name
    assert "Reload the configuration" in signals
    assert "every pin is written back to disk" in signals


def exit_statuses(filename: str) -> set[int]:
    return {int(tag) for tag in entries(sections(filename)["EXIT STATUS"]) if tag.isdigit()}


def test_daemon_page_has_its_exit_statuses() -> None:
    used = {v for m in daemon_modules() for k, v in vars(m).items() if k.startswith("EXIT_")}
    assert used >= {errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_CONFIG}
    # argparse exits 2 on a usage error
    assert exit_statuses("rampiped.8") == used | {errors.EXIT_USAGE}


def test_daemon_page_names_its_files() -> None:
    files = entries(sections("rampiped.8")["FILES"])
    defaults = config.Config()
    for path in (config.DEFAULT_PATH, defaults.runtime_dir, defaults.journal_dir):
        assert path in files
    assert "control.sock" in files[defaults.runtime_dir]
    assert defaults.control_socket == defaults.runtime_dir + "/control.sock"


def test_daemon_page_points_to_the_guarantees_in_the_readme() -> None:
    text = flat(sections("rampiped.8")["GUARANTEES AND LIMITS"])
    assert 'The section "Guarantees and limits" of the README' in text
    assert "\n## Guarantees and limits\n" in README.read_text()


# ---------------------------------------------------------------------------- rampipectl(8)


def test_ctl_page_has_every_command_with_its_arguments() -> None:
    page = sections("rampipectl.8")
    documented = entries(page["COMMANDS"])
    synopsis = flat(page["SYNOPSIS"])
    assert len(commands()) >= 8
    for name, sub in commands().items():
        assert name in documented, f"COMMANDS lacks {name}"
        assert f" {name} " in synopsis or synopsis.rstrip().endswith(f" {name}"), name
        entry = documented[name]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                assert flag in entry, f"rampipectl {name}: {flag} is not described"
            if action.metavar:
                assert action.metavar in entry, f"rampipectl {name}: {action.metavar}"
            assert expanded_help(f"rampipectl {name}", action) in entry, (name, action.dest)


def test_ctl_page_has_every_global_option() -> None:
    options = entries(sections("rampipectl.8")["OPTIONS"])
    parser = cli.build_parser()
    for action in parser._actions:
        if not action.option_strings:
            continue  # the commands
        entry = options[action.option_strings[0]]
        for flag in action.option_strings:
            assert flag in entry.replace(",", " ").split(), flag
        assert expanded_help(parser.prog, action) in entry
    synopsis = flat(sections("rampipectl.8")["SYNOPSIS"])
    assert "[--config PATH | --socket PATH]" in synopsis


def test_ctl_page_has_every_exit_status() -> None:
    every = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert len(every) == 5
    assert exit_statuses("rampipectl.8") == every
    text = entries(sections("rampipectl.8")["EXIT STATUS"])
    assert "No daemon answers" in text[str(errors.EXIT_NOT_RUNNING)]


# ---------------------------------------------------------------------------- rampipe.conf(5)


def config_keys() -> list[str]:
    """Every key path of the schema, from config.py's dataclasses: the top level's dataclass
    fields are sections, a tuple of dataclasses is a list of mappings."""
    keys: list[str] = []

    def walk(cls: type, prefix: str, top: bool) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "source":
                continue
            kind = hints[f.name]
            if top and isinstance(kind, type) and dataclasses.is_dataclass(kind):
                walk(kind, f"{f.name}.", False)
                continue
            keys.append(prefix + f.name)
            args = typing.get_args(kind)
            if typing.get_origin(kind) is tuple and args and dataclasses.is_dataclass(args[0]):
                assert isinstance(args[0], type)
                walk(args[0], f"{prefix}{f.name}[].", False)

    walk(config.Config, "", True)
    return keys


def key_entries() -> dict[str, str]:
    """The keys rampipe.conf(5) describes: `KEY (its kind; default ...)`."""
    return entries(sections("rampipe.conf.5")["KEYS"], r" {7}(\S+) \(")


def test_conf_page_has_every_key_of_the_schema() -> None:
    keys = config_keys()
    assert {"ram.max", "adaptive.watch[].depth", "pins[].keep", "metrics.listen"} <= set(keys)
    documented = key_entries()
    for key in keys:
        assert key in documented, f"rampipe.conf(5) lacks {key}"
    # and nothing else
    assert set(documented) == set(keys), set(documented) - set(keys)


def _yaml_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    return str(value)


def example_defaults() -> dict[str, str]:
    """Key path: the default as rampipe.conf.example writes it (its values are the defaults;
    the keys it leaves commented out have none)."""
    doc = yaml.safe_load((ROOT / "rampipe.conf.example").read_text())
    out: dict[str, str] = {}

    def walk(mapping: dict[str, object], prefix: str) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = _yaml_text(value)

    walk(doc, "")
    return out


def test_conf_page_gives_the_defaults_of_the_example() -> None:
    defaults = example_defaults()
    assert len(defaults) >= 15 and defaults["ram.high_watermark"] == "90%"
    documented = key_entries()
    for key, value in defaults.items():
        assert f"default {value})" in documented[key], f"{key}: not 'default {value}'"
    # an empty file gives those defaults: the example says so, and config.py agrees
    empty = config.load_text("", "empty")
    assert config.load_text((ROOT / "rampipe.conf.example").read_text(), "example") == (
        dataclasses.replace(empty, source="example")
    )


def test_conf_page_says_which_keys_are_required() -> None:
    documented = key_entries()
    for key in ("adaptive.watch[].path", "pins[].path"):
        assert "; required)" in documented[key]
    assert "one of " + ", ".join(config.MODES) in documented["pins[].mode"]


def test_conf_page_example_is_a_valid_configuration() -> None:
    example = sections("rampipe.conf.5")["EXAMPLE"]
    block = "\n".join(
        line for line in example.splitlines() if line.startswith(" " * 11) or not line.strip()
    )
    text = textwrap.dedent(block).strip() + "\n"
    assert "pins:" in text
    cfg = config.load_text(text, "rampipe.conf(5) EXAMPLE")
    assert [p.path for p in cfg.pins] == ["/var/lib/pve-cluster", "/home/*/.cache"]


# ---------------------------------------------------------------------------- what the README uses


def readme_sections(*titles: str) -> str:
    text = README.read_text()
    out = []
    for title in titles:
        match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
        assert match, f"README has no section {title!r}"
        out.append(match.group(1))
    return "\n".join(out)


OTHER_PROGRAMS = {"systemctl", "journalctl", "make", "sudoedit", "pytest", "ls"}


def readme_flags(text: str) -> set[str]:
    """The flags the text gives rampiped and rampipectl: on each line, those after one of
    them or after no program at all (`--log-level debug`), not those of systemctl & co."""
    flags = set()
    for line in text.splitlines():
        program = None
        for word in re.findall(r"[\w.-]+|&&|\||;", line.replace("`", " ")):
            if word in ("&&", "|", ";"):
                program = None
            elif word in OTHER_PROGRAMS or word in ("rampiped", "rampipectl"):
                program = word
            elif re.fullmatch(r"--[a-z][a-z-]+", word) and program not in OTHER_PROGRAMS:
                flags.add(word)
    return flags


def test_every_command_and_flag_of_the_readme_is_in_the_pages() -> None:
    text = readme_sections("Quick start", "Configuration", "Running it")
    used = set(re.findall(r"rampipectl ([a-z][a-z-]+)", text))
    assert {"status", "check-config", "sync", "pin", "unpin", "explain", "reload"} <= used
    documented = entries(sections("rampipectl.8")["COMMANDS"])
    for command in used:
        assert command in documented, f"rampipectl {command}"
    flags = readme_flags(text)
    assert {"--dry-run", "--config", "--json", "--timeout", "--mode", "--log-level"} <= flags
    pages = rendered("rampiped.8") + rendered("rampipectl.8")
    for flag in flags:
        assert flag in pages, flag


def test_every_key_of_the_readme_configuration_is_in_the_page() -> None:
    block = re.search(r"```yaml\n(.*?)```", readme_sections("Configuration"), re.S)
    assert block
    keys: set[str] = set()

    def walk(value: object, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                path = f"{prefix}{k}"
                if not isinstance(v, dict):
                    keys.add(path)
                walk(v, path + ".")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    walk(item, prefix[:-1] + "[].")

    walk(yaml.safe_load(block.group(1)), "")
    assert {"ram.max", "adaptive.watch[].depth", "pins[].before"} <= keys
    documented = key_entries()
    for key in keys:
        assert key in documented, key
