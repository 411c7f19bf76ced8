"""Configuration files as YAML: composing the text into nodes that keep their line numbers,
syntax errors as a person can act on them, and reading nodes while collecting every problem
(`ConfigIssue`, `ConfigError`) with file, line and key path.

It knows nothing of the schema: `rampiped.config` reads the sections with a `Reader`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

T = TypeVar("T")

NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"

# Lists and mappings nested deeper than this are refused. No setting needs more than a few
# levels, and PyYAML composes a document by recursing once per level (three Python frames
# each): a limit of its own keeps far inside Python's default 1000 frames, so that the error
# can say where, instead of the stack running out somewhere.
_MAX_DEPTH = 100


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration file. `line` and `column` are 1-based; None when the
    problem is not at one place (the file cannot be read at all)."""

    source: str
    line: int | None
    key_path: str  # "pins[1].path"; "" for the file as a whole
    message: str  # what is wrong and, in parentheses, what to write instead
    column: int | None = None

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        if self.key_path:
            return f"{where}: {self.key_path}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """An invalid configuration: every issue found, in the order of the file. `str()` is what
    a person should read: one line per issue."""

    def __init__(self, errors: Sequence[ConfigIssue]) -> None:
        self.errors = sorted(errors, key=lambda e: (e.line is None, e.line or 0, e.column or 0))
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class Invalid(Exception):
    """A value that does not fit: what was expected, and optionally a hint. The caller adds
    ", got <value>" in the words of its input (YAML text or a Python value)."""

    def __init__(self, expected: str, hint: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.hint = hint

    def render(self, got: str) -> str:
        text = f"{self.expected}, got {got}"
        return f"{text} ({self.hint})" if self.hint else text


def quote(text: str) -> str:
    if len(text) > 60:
        return repr(text[:50]) + "..."
    return repr(text)


def describe_value(value: object) -> str:
    """A Python value as a message shows it."""
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, bool):
        return f"{value} (a boolean)"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- composing


def _syntax_issue(source: str, text: str, error: yaml.YAMLError) -> ConfigIssue:
    if isinstance(error, yaml.reader.ReaderError):
        position = int(error.position)
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        message = f"YAML syntax error: character U+{int(error.character):04X} is not allowed"
        return ConfigIssue(source, line, "", message, column)
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        message = f"YAML syntax error: {error.problem or error}"
        if "'\\t'" in (error.problem or ""):
            message = (
                "YAML syntax error: found a tab (indent with spaces: YAML does not allow tabs)"
            )
        elif error.context:
            context = error.context
            if error.context_mark is not None and error.context_mark.line != mark.line:
                context += f" at line {error.context_mark.line + 1}"
            message += f" ({context})"
        return ConfigIssue(source, mark.line + 1, "", message, mark.column + 1)
    return ConfigIssue(source, None, "", f"YAML syntax error: {error}")


class _TooDeep(Exception):
    """Raised by `_Composer` at the first list or mapping nested deeper than `_MAX_DEPTH`."""

    def __init__(self, mark: yaml.Mark, key_path: str) -> None:
        super().__init__(key_path)
        self.mark = mark
        self.key_path = key_path


class _Composer(yaml.SafeLoader):
    """PyYAML's safe loader, composing nodes only, that counts how deep it is and stops with
    the place (and the key path) of a list or mapping nested too deeply."""

    # the key path is shown down to this many steps: enough to name the setting
    _SHOWN_STEPS = 4

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._steps: list[str] = []  # one per node being composed: "key", "[i]" or ""

    def compose_node(self, parent: Node | None, index: int | Node | None) -> Node | None:
        # `index` is the item's position in a list, the key node of a mapping's value, or
        # None for a mapping's key and for the document itself (the stub says int only)
        if isinstance(parent, SequenceNode):
            step = f"[{index}]"
        elif isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
            step = f".{index.value}"
        else:
            step = ""
        self._steps.append(step)
        try:
            if len(self._steps) > _MAX_DEPTH and self.check_event(
                yaml.SequenceStartEvent, yaml.MappingStartEvent
            ):
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _TooDeep(event.start_mark, self._key_path())
            return super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            self._steps.pop()

    def _key_path(self) -> str:
        steps = [step for step in self._steps if step]
        path = "".join(steps[: self._SHOWN_STEPS]).lstrip(".")
        return path + "..." if len(steps) > self._SHOWN_STEPS else path


def _compose_nodes(text: str) -> Node | None:
    composer = _Composer(text)
    try:
        return composer.get_single_node()
    finally:
        composer.dispose()


def compose(text: str, source: str) -> Node | None:
    try:
        try:
            return _compose_nodes(text)
        except yaml.YAMLError as first_error:
            error = first_error
            # JSON is YAML, except that YAML refuses tabs as indentation. Outside its strings
            # JSON has tabs only as whitespace (inside them they must be written \t), so a
            # document that looks like JSON is read again with its tabs as spaces; columns stay
            # the same.
            if "\t" in text and text.lstrip()[:1] in ("{", "["):
                try:
                    return _compose_nodes(text.replace("\t", " "))
                except yaml.YAMLError as json_error:
                    error = json_error
            raise ConfigError([_syntax_issue(source, text, error)]) from None
    except _TooDeep as e:
        message = (
            f"YAML syntax error: nested too deeply (more than {_MAX_DEPTH} levels of lists "
            "and mappings)"
        )
        line, column = e.mark.line + 1, e.mark.column + 1
        raise ConfigError([ConfigIssue(source, line, e.key_path, message, column)]) from None
    except RecursionError:
        # only when called with most of the stack already used
        raise ConfigError(
            [ConfigIssue(source, None, "", "YAML syntax error: nested too deeply")]
        ) from None


# --------------------------------------------------------------------------- reading nodes


# A path from the file: (value, key path, node). The node is None for a default value, which
# has no line of its own.
Placed = tuple[str, str, Node | None]


@dataclass
class Entry:
    key: Node
    value: Node


def join_key(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


class Reader:
    """Reads composed YAML nodes, recording each problem as a `ConfigIssue` and going on;
    the schema's own reading (`rampiped.config`) is built on it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.issues: list[ConfigIssue] = []
        self.bad: set[str] = set()  # key paths whose value was rejected
        self._constructor = yaml.constructor.SafeConstructor()

    # ----------------------------------------------------------------- recording

    def issue(self, node: Node | None, key_path: str, message: str) -> None:
        line = None
        if node is not None and node.start_mark is not None:
            line = node.start_mark.line + 1
        self.issues.append(ConfigIssue(self.source, line, key_path, message))
        self.bad.add(key_path)

    def describe(self, node: Node, value: object) -> str:
        """A value as the file wrote it."""
        if isinstance(node, SequenceNode):
            return "a list"
        if isinstance(node, MappingNode):
            return "a mapping"
        text = str(node.value)
        if value is None:
            return "nothing" if text == "" else text
        if isinstance(value, bool):
            return f"{text} (a boolean)"
        if isinstance(value, int | float):
            return text
        if isinstance(value, str):
            return quote(value)
        return f"{quote(text)} (a {type(value).__name__})"

    # ----------------------------------------------------------------- reading nodes

    def scalar(self, node: Node, key_path: str) -> tuple[bool, object]:
        """(True, value) for a scalar YAML can read; (True, node) for a list or mapping, which
        converters refuse; (False, None) after recording why the value cannot be read."""
        if not isinstance(node, ScalarNode):
            return True, node
        try:
            return True, self._constructor.construct_object(node)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            self.issue(node, key_path, f"cannot read this value: {problem}")
        except Exception:
            # PyYAML's constructors trust the resolver: a value whose explicit tag it does not
            # fit (`!!bool x`, `!!int `, `!!timestamp 2024-13-45`) fails with whatever error
            # the conversion hits (KeyError, IndexError, ValueError, ...).
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.issue(node, key_path, f"cannot read this value: {node.value!r} is not a {tag}")
        return False, None

    def convert(self, node: Node, key_path: str, convert: Callable[[object], T], default: T) -> T:
        ok, value = self.scalar(node, key_path)
        if not ok:
            return default
        try:
            return convert(value)
        except Invalid as e:
            self.issue(node, key_path, e.render(self.describe(node, value)))
            return default

    def get(
        self,
        entries: dict[str, Entry],
        key: str,
        parent: str,
        convert: Callable[[object], T],
        default: T,
    ) -> T:
        """The converted value of `key`; `default` when it is absent or was rejected (then the
        issue is recorded and the key path is in `self.bad`)."""
        entry = entries.get(key)
        if entry is None:
            return default
        return self.convert(entry.value, join_key(parent, key), convert, default)

    def _pairs(self, node: MappingNode, key_path: str, depth: int = 0) -> list[tuple[Node, Node]]:
        """The key/value pairs of a mapping with YAML merge keys (`<<: *defaults`) expanded:
        the mapping's own keys first, then merged keys it does not set itself."""
        own = [(k, v) for k, v in node.value if k.tag != _MERGE_TAG]
        pairs = list(own)
        seen = {k.value for k, _ in own if isinstance(k, ScalarNode)}
        for k, v in node.value:
            if k.tag != _MERGE_TAG:
                continue
            sources = v.value if isinstance(v, SequenceNode) else [v]
            for source in sources:
                if not isinstance(source, MappingNode) or depth > 16:
                    self.issue(k, join_key(key_path, "<<"), "expected a mapping to merge")
                    continue
                for mk, mv in self._pairs(source, key_path, depth + 1):
                    if isinstance(mk, ScalarNode) and mk.value not in seen:
                        seen.add(mk.value)
                        pairs.append((mk, mv))
        return pairs

    def mapping(
        self,
        node: Node,
        key_path: str,
        known: Sequence[str],
        expected: str = "expected a mapping of settings",
    ) -> dict[str, Entry] | None:
        """The known keys of a mapping; unknown and repeated keys are recorded as issues.
        An empty value (`ram:` with nothing after it) is an empty mapping."""
        if isinstance(node, ScalarNode) and node.tag == NULL_TAG:
            return {}
        if not isinstance(node, MappingNode):
            ok, value = self.scalar(node, key_path)
            if ok:
                self.issue(node, key_path, f"{expected}, got {self.describe(node, value)}")
            return None
        entries: dict[str, Entry] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in self._pairs(node, key_path):
            ok, key = self.scalar(key_node, key_path)
            if not ok:
                continue
            if not isinstance(key, str):
                self.issue(
                    key_node, key_path, f"expected a key name, got {self.describe(key_node, key)}"
                )
                continue
            path = join_key(key_path, key)
            line = key_node.start_mark.line + 1 if key_node.start_mark else 0
            if key in first_line:
                self.issue(key_node, path, f"repeated key (first given at line {first_line[key]})")
                continue
            first_line[key] = line
            if key not in known:
                self.issue(key_node, path, self._unknown_key(key, known))
                continue
            entries[key] = Entry(key_node, value_node)
        return entries

    @staticmethod
    def _unknown_key(key: str, known: Sequence[str]) -> str:
        close = difflib.get_close_matches(key, known, n=1)
        names = ", ".join(known)
        if close:
            return f"unknown key (did you mean {close[0]}? known keys here: {names})"
        return f"unknown key (known keys here: {names})"

    def items(self, node: Node, key_path: str, expected: str) -> list[tuple[str, Node]] | None:
        """(key path, node) of each list item; an empty value is an empty list."""
        if isinstance(node, ScalarNode) and node.tag == NULL_TAG:
            return []
        if isinstance(node, SequenceNode):
            return [(f"{key_path}[{i}]", item) for i, item in enumerate(node.value)]
        ok, value = self.scalar(node, key_path)
        if ok:
            hint = ""
            if isinstance(value, str):
                hint = f" (write [{value}] for a list of one)"
            self.issue(node, key_path, f"{expected}, got {self.describe(node, value)}{hint}")
        return None

    def string_list(
        self,
        entries: dict[str, Entry],
        key: str,
        parent: str,
        expected: str,
        convert: Callable[[object], str],
        default: tuple[str, ...],
    ) -> tuple[tuple[str, ...], list[Placed]]:
        """A list of strings, each converted; repeats are issues. Returns the values and
        where each accepted one is (defaults included)."""
        entry = entries.get(key)
        path = join_key(parent, key)
        if entry is None:
            return default, [(v, f"{path}[{i}]", None) for i, v in enumerate(default)]
        items = self.items(entry.value, path, expected)
        if items is None:
            return default, []
        accepted: list[Placed] = []
        for item_path, item in items:
            value = self.convert(item, item_path, convert, "")
            if item_path in self.bad:
                continue
            first = next((p for v, p, _ in accepted if v == value), None)
            if first is not None:
                self.issue(item, item_path, f"repeats {first}")
                continue
            accepted.append((value, item_path, item))
        return tuple(v for v, _, _ in accepted), accepted
