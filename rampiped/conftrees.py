"""Configuration paths against each other: pins, watch roots and excludes against the trees
that can be neither pinned nor watched, against rampiped's own directories, and against each
other. Paths may be glob patterns, compared component by component.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from rampiped.confvalues import GLOB_CHARS, has_glob
from rampiped.confyaml import Entry, Placed, Reader

# Trees that can be neither pinned nor watched, and why (after "... is").
_SPECIAL_TREES = {
    "/proc": "a kernel virtual filesystem",
    "/sys": "a kernel virtual filesystem",
    "/dev": "the kernel's device filesystem",
    "/run": "already in RAM (tmpfs)",
    "/boot": "for boot files, which must be on disk when the machine starts",
}


# --------------------------------------------------------------------------- paths as patterns


def _components(path: str) -> list[str]:
    return [name for name in path.split("/") if name]


def _literal_head(name: str) -> str:
    for i, c in enumerate(name):
        if c in GLOB_CHARS:
            return name[:i]
    return name


def _literal_tail(name: str) -> str:
    if "[" in name:
        return ""
    cut = max(name.rfind("*"), name.rfind("?"))
    return name[cut + 1 :]


def _may_match(a: str, b: str) -> bool:
    """Whether two path components, either of which may be a glob, can name the same entry.
    Two globs are compared by their literal head and tail (`*.log` and `*.cache` never meet);
    otherwise they are assumed to meet."""
    glob_a, glob_b = has_glob(a), has_glob(b)
    if not glob_a and not glob_b:
        return a == b
    if not glob_b:
        return fnmatchcase(b, a)
    if not glob_a:
        return fnmatchcase(a, b)
    head_a, head_b = _literal_head(a), _literal_head(b)
    tail_a, tail_b = _literal_tail(a), _literal_tail(b)
    return (head_a.startswith(head_b) or head_b.startswith(head_a)) and (
        tail_a.endswith(tail_b) or tail_b.endswith(tail_a)
    )


def _relation(a: str, b: str) -> str | None:
    """Where path (or pattern) `a` can lie relative to `b`: "same", "inside", "contains", or
    None when they cannot meet. A glob matches within one component (as glob(3) does), so
    patterns are compared component by component, not as text prefixes."""
    parts_a, parts_b = _components(a), _components(b)
    if not all(_may_match(x, y) for x, y in zip(parts_a, parts_b, strict=False)):
        return None
    if len(parts_a) == len(parts_b):
        return "same"
    return "inside" if len(parts_a) > len(parts_b) else "contains"


_RELATION_WORDS = {
    # relation: (both literal, with a glob)
    "same": ("is the same directory as", "can match the same directory as"),
    "inside": ("is inside", "can match a directory inside"),
    "contains": ("contains", "can match a directory that contains"),
}


def _relation_words(relation: str, a: str, b: str) -> str:
    definite, possible = _RELATION_WORDS[relation]
    return possible if has_glob(a) or has_glob(b) else definite


# --------------------------------------------------------------------------- the checks


def check_dirs(reader: Reader, top: dict[str, Entry], runtime_dir: str, journal_dir: str) -> None:
    """runtime_dir is RAM of rampiped's own; journal_dir must be on disk; they are apart."""
    for key, path in (("runtime_dir", runtime_dir), ("journal_dir", journal_dir)):
        entry = top.get(key)
        if entry is None or key in reader.bad:
            continue
        if path == "/":
            reader.issue(entry.value, key, "cannot use /: name a directory of rampiped's own")
            continue
        for tree, why in _SPECIAL_TREES.items():
            if tree == "/run" and key == "runtime_dir":
                continue  # where it belongs
            if _relation(path, tree) in ("same", "inside"):
                if tree == "/run":
                    why = "already in RAM (tmpfs), and journal_dir must be on disk"
                reader.issue(entry.value, key, f"cannot use {path}: {tree} is {why}")
                break
    if {"runtime_dir", "journal_dir"} & reader.bad:
        return
    relation = _relation(journal_dir, runtime_dir)
    if relation is None:
        return
    dirs = {"runtime_dir": runtime_dir, "journal_dir": journal_dir}
    key, other = ("journal_dir", "runtime_dir")
    if relation == "contains":
        key, other = other, key
        relation = "inside"
    entry = top.get(key) or top.get(other)
    words = _RELATION_WORDS[relation][0]
    reader.issue(
        entry.value if entry else None,
        key,
        f"{dirs[key]} {words} {other} ({dirs[other]}): "
        "the RAM area and the on-disk journal must be separate directories",
    )


def forbidden(
    reader: Reader, verb: str, path: str, runtime_dir: str, journal_dir: str, *, contains: bool
) -> str | None:
    """Why `path` cannot be pinned or watched, or None."""
    if path == "/":
        return f"cannot {verb} /: it is the whole root filesystem (name directories below it)"
    for tree, why in _SPECIAL_TREES.items():
        relation = _relation(path, tree)
        if relation in ("same", "inside"):
            if has_glob(path):
                return f"cannot {verb} {path}: it can match a directory in {tree}, which is {why}"
            return f"cannot {verb} {path}: {tree} is {why}"
    for key, own in (("runtime_dir", runtime_dir), ("journal_dir", journal_dir)):
        if key in reader.bad:
            continue
        relation = _relation(path, own)
        if relation is None or (relation == "contains" and not contains):
            continue
        words = _relation_words(relation, path, own)
        return f"cannot {verb} {path}: it {words} {key} ({own}), which rampiped uses itself"
    return None


def check_trees(
    reader: Reader,
    runtime_dir: str,
    journal_dir: str,
    pins: list[Placed],
    watch: list[Placed],
    excludes: list[Placed],
) -> None:
    """Pins and watch roots against the special trees, rampiped's own directories and each
    other. Each path gets at most one such issue: the first that applies."""
    earlier: list[tuple[str, str]] = []
    for path, key_path, node in pins:
        problem = forbidden(reader, "pin", path, runtime_dir, journal_dir, contains=True)
        if problem is None:
            problem = _conflict(path, earlier)
        if problem is None:
            for excluded, exclude_path, _ in excludes:
                relation = _relation(path, excluded)
                if relation in ("same", "inside"):
                    words = _relation_words(relation, path, excluded)
                    problem = (
                        f"{path} {words} {excluded} ({exclude_path}): "
                        "an excluded tree cannot hold a static pin"
                    )
                    break
        if problem is not None:
            reader.issue(node, key_path, problem)
        earlier.append((path, key_path.removesuffix(".path")))
    for path, key_path, node in watch:
        problem = forbidden(reader, "watch", path, runtime_dir, journal_dir, contains=False)
        if problem is not None:
            reader.issue(node, key_path, problem)
            continue
        for pin_path, pin_key, pin_node in pins:
            if pin_key in reader.bad:
                continue
            relation = _relation(path, pin_path)
            if relation not in ("same", "inside"):
                continue
            if node is None:
                # A default watch root: the pin is what the file says, so it gets the issue.
                words = _relation_words(
                    "same" if relation == "same" else "contains", pin_path, path
                )
                reader.issue(
                    pin_node,
                    pin_key,
                    f"{pin_path} {words} the default watch root {path} "
                    f"({key_path.removesuffix('.path')}): a watch root cannot be inside a "
                    "static pin (set adaptive.watch)",
                )
            else:
                words = _relation_words(relation, path, pin_path)
                reader.issue(
                    node,
                    key_path,
                    f"{path} {words} {pin_key.removesuffix('.path')} ({pin_path}): "
                    "a watch root cannot be inside a static pin",
                )
            break


def _conflict(path: str, earlier: list[tuple[str, str]]) -> str | None:
    for other, other_key in earlier:
        if other == path:
            return f"{path} repeats {other_key}"
        relation = _relation(path, other)
        if relation is not None:
            words = _relation_words(relation, path, other)
            return f"{path} {words} {other_key} ({other}): a directory can be in only one pin"
    return None
