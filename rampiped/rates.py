"""Write rates per directory, and which directory a write counts towards.

Pure: times are arguments (monotonic seconds), nothing here touches the system.

`RateTable` keeps a continuous-time exponential moving average per key (DESIGN §3):

    lambda = ln 2 / H
    on an event of weight w at time t:  r = r * exp(-lambda * (t - t_last)) + lambda * w
    reading at time t:                   r * exp(-lambda * (t - t_last))

A steady stream of k events/s reads k, whatever the spacing of the events, and a reading
halves every H seconds once the writes stop. Only one float pair per key is kept, and events
never have to be stored or binned.

`Attributor` maps the directory in which a write happened to the candidate directory it counts
towards: a watch root's subdirectory at the configured depth, or a static pin.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Container, Mapping, Sequence
from fnmatch import fnmatchcase

from rampiped.config import WatchRoot

__all__ = [
    "Attributor",
    "PathPattern",
    "RateTable",
    "components",
    "is_within",
    "normalize",
]


# --------------------------------------------------------------------------- paths


def normalize(path: str) -> str:
    """`path` without `.`, `..`, doubled or trailing slashes. POSIX keeps a leading `//` as
    implementation-defined; Linux treats it as `/`, and so do we."""
    p = posixpath.normpath(path)
    if p.startswith("//"):
        p = "/" + p.lstrip("/")
    return p


def is_within(path: str, root: str) -> bool:
    """True when `path` is `root` or below it, comparing whole components (`/var/logx` is not
    inside `/var/log`). Both must be normalized."""
    if root == "/":
        return path.startswith("/")
    return path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/")


def components(path: str) -> tuple[str, ...]:
    """The names of a normalized absolute path: `/a/b` -> ("a", "b"), `/` -> ()."""
    return tuple(c for c in path.split("/") if c)


def _rebase(path: str, src: str, dst: str) -> str:
    """`path` (at or below `src`) moved from below `src` to below `dst`."""
    rest = path[len(src) :] if src != "/" else path[1:]
    rest = rest.lstrip("/")
    if not rest:
        return dst
    return dst + rest if dst == "/" else dst + "/" + rest


_GLOB_CHARS = frozenset("*?[")


class PathPattern:
    """An absolute path, possibly with shell wildcards in some of its components
    (`/home/*/.cache`). A wildcard never matches across a `/`."""

    __slots__ = ("_glob", "_parts", "text")

    def __init__(self, pattern: str) -> None:
        self.text = normalize(pattern)
        self._glob = any(c in _GLOB_CHARS for c in self.text)
        self._parts = components(self.text)

    def __repr__(self) -> str:
        return f"PathPattern({self.text!r})"

    def match_at_or_above(self, path: str) -> str | None:
        """The directory at or above `path` that matches the pattern, or None."""
        if not self._glob:
            return self.text if is_within(path, self.text) else None
        parts = components(path)
        n = len(self._parts)
        if len(parts) < n:
            return None
        for name, pat in zip(parts, self._parts, strict=False):
            if not fnmatchcase(name, pat):
                return None
        return "/" + "/".join(parts[:n])

    def may_match_below(self, path: str) -> bool:
        """True when a match of the pattern may lie strictly below `path` (for a wildcard
        pattern: when `path` matches the pattern's leading components)."""
        if not self._glob:
            return self.text != path and is_within(self.text, path)
        parts = components(path)
        if len(parts) >= len(self._parts):
            return False
        return all(fnmatchcase(name, pat) for name, pat in zip(parts, self._parts, strict=False))


# --------------------------------------------------------------------------- rates


# A reading below this is nothing: a tenth of the floor below which `snapshot` (what the
# engine decides on) leaves a key out, and far below any threshold one would set (events per
# second). A key below it is forgotten, and reads 0.0 from then on.
PRUNE_FLOOR = 0.001
# `prune` looks at every key at most once per this fraction of the half-life: a reading falls
# by less than 9% in that time, and the work is spread over the many calls of the daemon's
# loop (it calls `prune` on every tick).
PRUNE_EVERY = 1 / 8


class RateTable:
    """Continuous-time EMA of events per second, per key (a candidate directory).

    Its size is bounded by the keys written recently, not by every key ever written: `prune`
    forgets the keys whose reading decayed below `PRUNE_FLOOR`."""

    __slots__ = ("_entries", "_half_life", "_lambda", "_next_prune")

    def __init__(self, half_life: float) -> None:
        self._half_life = 0.0
        self._lambda = 0.0
        self._set(half_life)
        # key -> [r, t_last]; a two-element list is updated in place, which keeps `add`
        # (called once per directory per batch of events) allocation-free.
        self._entries: dict[str, list[float]] = {}
        self._next_prune = -math.inf

    def _set(self, half_life: float) -> None:
        if not half_life > 0 or math.isinf(half_life):
            raise ValueError(f"half-life must be a positive number of seconds, not {half_life!r}")
        self._half_life = float(half_life)
        self._lambda = math.log(2.0) / self._half_life

    @property
    def half_life(self) -> float:
        return self._half_life

    def add(self, key: str, weight: float, t: float) -> None:
        """Count `weight` events for `key` at time `t`. An event older than the key's last one
        (clocks of batches may interleave) counts as happening at that last time: a reading
        never grows by decaying backwards."""
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = [self._lambda * weight, t]
            return
        r, t_last = entry
        if t > t_last:
            r *= math.exp(-self._lambda * (t - t_last))
            entry[1] = t
        entry[0] = r + self._lambda * weight

    def rate(self, key: str, now: float) -> float:
        """Events per second for `key` at `now`; 0.0 for a key never seen (or pruned)."""
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        return self._reading(entry, now)

    def _reading(self, entry: list[float], now: float) -> float:
        r, t_last = entry
        if now <= t_last:
            return r
        return r * math.exp(-self._lambda * (now - t_last))

    def snapshot(self, now: float, floor: float = 0.01) -> dict[str, float]:
        """Every key whose reading at `now` is at least `floor`, with that reading."""
        out: dict[str, float] = {}
        for key, entry in self._entries.items():
            value = self._reading(entry, now)
            if value >= floor:
                out[key] = value
        return out

    def prune(self, now: float, floor: float = PRUNE_FLOOR, keep: Container[str] = ()) -> int:
        """Forget keys whose reading at `now` fell below `floor`, except those in `keep` (a
        pinned or pending directory keeps its entry, however quiet), so that memory is bounded
        by the directories written recently, not by every directory ever written. Cheap to
        call often: the keys are looked at once per `PRUNE_EVERY` half-lives, and calls in
        between return at once. Returns the number of keys forgotten."""
        if now < self._next_prune:
            return 0
        self._next_prune = now + PRUNE_EVERY * self._half_life
        reading = self._reading
        gone = [k for k, e in self._entries.items() if reading(e, now) < floor and k not in keep]
        for key in gone:
            del self._entries[key]
        return len(gone)

    def set_half_life(self, half_life: float, now: float | None = None) -> None:
        """Use a new half-life from here on. Readings are kept: with `now`, every key's reading
        at `now` is folded in and decays with the new half-life after `now`; without it, each
        key's value at its last event is kept and decays with the new half-life after that."""
        if now is not None:
            for entry in self._entries.values():
                if now > entry[1]:
                    entry[0] = self._reading(entry, now)
                    entry[1] = now
        self._set(half_life)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------- attribution


class Attributor:
    """Maps the directory in which a write happened to the candidate directory it counts
    towards, or None when it counts for none.

    In order: `translate` (a pin's RAM-side directory back to the pinned path, longest prefix
    first); an exclusion at or above it -> None; a static pin at or above it -> that pin; else
    the longest watch root R containing it: R plus the first `depth` components below R
    (None when the directory is fewer than `depth` levels below R; depth 0 -> R itself).

    Fixed once made: the daemon makes a new one when the configuration or the pins change.
    """

    # Distinct directories written between two changes of the configuration or of the pins;
    # beyond this the cache is simply started again (a miss costs a few string operations).
    # About 250 bytes an entry (two paths and a dict slot): at most ~2 MiB.
    CACHE_LIMIT = 8192

    def __init__(
        self,
        watch: Sequence[WatchRoot],
        exclude: Sequence[str],
        static: Sequence[str] = (),
        translate: Mapping[str, str] | None = None,
    ) -> None:
        roots = {normalize(w.path): w.depth for w in watch}
        for root, depth in roots.items():
            if depth < 0:
                raise ValueError(f"watch root {root}: depth must be 0 or more, not {depth}")
        # Longest first, so that the first root containing a path is the longest one.
        self._roots: tuple[tuple[str, int], ...] = tuple(
            sorted(roots.items(), key=lambda item: (-len(item[0]), item[0]))
        )
        self._exclude = tuple(PathPattern(e) for e in exclude)
        self._static = tuple(PathPattern(s) for s in static)
        pairs = {normalize(src): normalize(dst) for src, dst in (translate or {}).items()}
        self._translate = tuple(sorted(pairs.items(), key=lambda item: (-len(item[0]), item[0])))
        self._cache: dict[str, str | None] = {}

    def candidate(self, dirpath: str) -> str | None:
        try:
            return self._cache[dirpath]
        except KeyError:
            pass
        result = self._resolve(dirpath)
        if len(self._cache) >= self.CACHE_LIMIT:
            self._cache.clear()
        self._cache[dirpath] = result
        return result

    def _resolve(self, dirpath: str) -> str | None:
        path = normalize(dirpath)
        for src, dst in self._translate:
            if is_within(path, src):
                path = _rebase(path, src, dst)
                break
        for pattern in self._exclude:
            if pattern.match_at_or_above(path) is not None:
                return None
        best: str | None = None
        for pattern in self._static:
            match = pattern.match_at_or_above(path)
            if match is not None and (best is None or len(match) > len(best)):
                best = match
        if best is not None:
            return best
        for root, depth in self._roots:
            if not is_within(path, root):
                continue
            if depth == 0:
                return root
            below = components(path[len(root) :])
            if len(below) < depth:
                return None
            return _rebase("/" + "/".join(below[:depth]), "/", root)
        return None
