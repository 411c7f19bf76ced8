"""Configuration values: what each setting accepts (durations, sizes, percentages, paths,
unit names, the metrics endpoint) and the message when a value does not fit.

Each converter takes a value as YAML read it and returns it converted, or raises `Invalid`
saying what was expected; `parse_duration`, `parse_size`, `parse_size_or_percent` and
`parse_listen` are the same for callers outside the configuration (`rampipectl`, the daemon).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import TypeVar

from rampiped.confschema import MODES, Size
from rampiped.confyaml import Invalid, describe_value

T = TypeVar("T")
_Num = TypeVar("_Num", int, float)

# Durations longer than this are refused: timers built from them would overflow (select() and
# friends reject timeouts beyond a few hundred years) and no setting here needs more.
_MAX_SECONDS = 100 * 365 * 86400
# The largest size the kernel can express (off_t and tmpfs `size=` are signed 64-bit).
_MAX_BYTES = 2**63 - 1
# Longer number strings are certainly mistakes; the cap also keeps Decimal arithmetic cheap.
_MAX_NUMBER_TEXT = 64


def format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def format_memory(size: int) -> str:
    """An amount of memory in binary units with one decimal, rounded down, so that a size
    reported as more than it also reads as more: 23.4 GiB, 512.0 MiB."""
    value, unit = float(size), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    if unit == "B":
        return f"{size} B"
    return f"{math.floor(value * 10) / 10:.1f} {unit}"


# --------------------------------------------------------------------------- durations

_DURATION_UNITS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}

_DURATION_EXPECTED = "expected a duration like 10s, 5m or a number of seconds"
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d)", re.ASCII)
_DURATION_WHOLE = re.compile(rf"(?:\s*{_NUMBER}\s*(?:ms|s|m|h|d))+\s*", re.ASCII)
_PLAIN_NUMBER = re.compile(rf"\s*({_NUMBER})\s*", re.ASCII)


def _check_number(value: object, expected: str, negative: str = "cannot be negative") -> float:
    """An int or float that is finite and not negative (bool is not a number here: YAML reads
    `yes` and `on` as booleans). `negative` is the hint for a negative value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(expected)
    if isinstance(value, float):
        if math.isnan(value):
            raise Invalid(expected, "not a number")
        if math.isinf(value):
            raise Invalid(expected, "must be finite")
    if value < 0:
        raise Invalid(expected, negative)
    if value > _MAX_BYTES:
        raise Invalid(expected, "too large")
    return float(value)


def duration(value: object) -> float:
    if isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_NUMBER_TEXT:
            raise Invalid(_DURATION_EXPECTED)
        plain = _PLAIN_NUMBER.fullmatch(text)
        if plain:
            total = Decimal(plain.group(1))
        elif _DURATION_WHOLE.fullmatch(text):
            total = Decimal(0)
            for part in _DURATION_PART.finditer(text):
                total += Decimal(part.group(1)) * _DURATION_UNITS[part.group(2)]
        elif text.startswith("-") and (
            _PLAIN_NUMBER.fullmatch(text[1:]) or _DURATION_WHOLE.fullmatch(text[1:])
        ):
            raise Invalid(_DURATION_EXPECTED, "a duration cannot be negative")
        elif re.match(_NUMBER, text, re.ASCII):
            raise Invalid(_DURATION_EXPECTED, "units are ms, s, m, h and d")
        else:
            raise Invalid(_DURATION_EXPECTED)
        if total > _MAX_SECONDS:
            raise Invalid(_DURATION_EXPECTED, "at most 100 years")
        return float(total)
    seconds = _check_number(value, _DURATION_EXPECTED, "a duration cannot be negative")
    if seconds > _MAX_SECONDS:
        raise Invalid(_DURATION_EXPECTED, "at most 100 years")
    return seconds


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string: "500ms", "10s", "5m", "1h", "1d", "1m30s",
    "2.5" (seconds). Raises ValueError saying what was expected."""
    try:
        return duration(value)
    except Invalid as e:
        raise ValueError(e.render(describe_value(value))) from None


# --------------------------------------------------------------------------- sizes

_SIZE_UNITS = {
    **dict.fromkeys(("", "B"), 1),
    **dict.fromkeys(("k", "K", "KiB"), 1024),
    **dict.fromkeys(("M", "MiB"), 1024**2),
    **dict.fromkeys(("G", "GiB"), 1024**3),
    **dict.fromkeys(("T", "TiB"), 1024**4),
}

_SIZE_EXPECTED = "expected a size like 512M, 2G or a number of bytes"
_SIZE_OR_PERCENT_EXPECTED = (
    "expected a size like 512M, 2G, a number of bytes or a percentage like 25%"
)
_SIZE = re.compile(rf"\s*({_NUMBER})\s*([A-Za-z]*)\s*", re.ASCII)
_PERCENT = re.compile(rf"\s*({_NUMBER})\s*%\s*", re.ASCII)


def size(value: object, expected: str = _SIZE_EXPECTED) -> int:
    if isinstance(value, str):
        text = value.strip()
        match = _SIZE.fullmatch(text) if len(text) <= _MAX_NUMBER_TEXT else None
        if match is None:
            if text.startswith("-") and _SIZE.fullmatch(text[1:]):
                raise Invalid(expected, "a size cannot be negative")
            if _PERCENT.fullmatch(text):
                raise Invalid(expected, "a percentage is not allowed here")
            raise Invalid(expected)
        number, unit = Decimal(match.group(1)), match.group(2)
        if unit not in _SIZE_UNITS:
            if unit.upper() in ("KB", "MB", "GB", "TB"):
                number_text, prefix = match.group(1), unit[0].upper()
                hint = f"write {number_text}{prefix} or {number_text}{prefix}iB: powers of 1024"
            else:
                hint = "units are K, M, G and T (powers of 1024)"
            raise Invalid(expected, hint)
        if _SIZE_UNITS[unit] == 1 and number != number.to_integral_value():
            raise Invalid(expected, "a number of bytes must be whole")
        result = int(number * _SIZE_UNITS[unit])
    elif isinstance(value, float) and math.isfinite(value) and not value.is_integer():
        raise Invalid(expected, "a number of bytes must be whole")
    else:
        _check_number(value, expected, "a size cannot be negative")
        assert isinstance(value, int | float)
        result = int(value)  # an int stays exact; a float here is whole
    if result > _MAX_BYTES:
        raise Invalid(expected, "too large")
    return result


def _percent(value: object) -> float | None:
    """The number in "25%", or None when `value` is not written as a percentage."""
    if not isinstance(value, str):
        return None
    match = _PERCENT.fullmatch(value) if len(value) <= _MAX_NUMBER_TEXT else None
    return float(Decimal(match.group(1))) if match else None


def _size_or_percent(value: object) -> Size:
    percent = _percent(value)
    if percent is not None:
        return Size(percent=percent)
    if (
        isinstance(value, str)
        and value.strip()[:1] == "-"
        and _percent(value.strip()[1:]) is not None
    ):
        raise Invalid(_SIZE_OR_PERCENT_EXPECTED, "cannot be negative")
    return Size(bytes=size(value, _SIZE_OR_PERCENT_EXPECTED))


def parse_size(value: object) -> int:
    """Bytes from an int or a string: "512", "64K", "64k", "64KiB", "64M", "2G", "1T" (powers
    of 1024), "1.5G". Raises ValueError saying what was expected."""
    try:
        return size(value)
    except Invalid as e:
        raise ValueError(e.render(describe_value(value))) from None


def parse_size_or_percent(value: object) -> Size:
    """Like `parse_size`, but "25%" is also accepted: Size(percent=25.0); otherwise
    Size(bytes=...). The range of a percentage is the caller's to check."""
    try:
        return _size_or_percent(value)
    except Invalid as e:
        raise ValueError(e.render(describe_value(value))) from None


# --------------------------------------------------------------------------- other values

GLOB_CHARS = "*?["
_UNIT_SUFFIXES = (
    "service", "socket", "mount", "target", "timer", "path",
    "scope", "slice", "swap", "device", "automount",
)  # fmt: skip
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]+")


def _normalise(path: str) -> str:
    parts: list[str] = []
    for name in path.split("/"):
        if name in ("", "."):
            continue
        if name == "..":
            if parts:
                parts.pop()
            continue
        parts.append(name)
    return "/" + "/".join(parts)


def has_glob(text: str) -> bool:
    return any(c in text for c in GLOB_CHARS)


def abs_path(value: object, *, glob: bool = False) -> str:
    expected = "expected an absolute path"
    if not isinstance(value, str) or not value:
        raise Invalid(expected)
    if "\0" in value:
        raise Invalid(expected, "a path cannot contain a NUL character")
    if not value.startswith("/"):
        if value.startswith("~"):
            raise Invalid(expected, "~ is not expanded: write the whole path")
        raise Invalid(expected, "it must start with /")
    normal = _normalise(value)
    if normal != value:
        raise Invalid("expected a normalised absolute path", f"write {normal!r}")
    if not glob and has_glob(value):
        raise Invalid(
            "expected a path without glob characters",
            "*, ? and [ are allowed only in pin paths",
        )
    return value


def glob_path(value: object) -> str:
    return abs_path(value, glob=True)


def _above_zero(convert: Callable[[object], _Num], what: str) -> Callable[[object], _Num]:
    """`convert`, refusing 0: "expected <what> greater than 0"."""

    def convert_above_zero(value: object) -> _Num:
        result = convert(value)
        if result <= 0:
            raise Invalid(f"expected {what} greater than 0")
        return result

    return convert_above_zero


positive_duration = _above_zero(duration, "a duration")
positive_size = _above_zero(size, "a size")


def ram_max(value: object) -> Size:
    size = _size_or_percent(value)
    if size.percent is not None and not 0 < size.percent <= 100:
        raise Invalid("expected a percentage above 0% and at most 100%")
    if size.bytes is not None and size.bytes <= 0:
        raise Invalid("expected a size greater than 0")
    return size


def fraction(value: object) -> float:
    expected = "expected a percentage like 90% or a fraction like 0.9"
    percent = _percent(value)
    if percent is not None:
        if not 0 < percent <= 100:
            raise Invalid(expected, "must be above 0% and at most 100%")
        return percent / 100.0
    if isinstance(value, str) and _PLAIN_NUMBER.fullmatch(value):
        value = float(value)
    fraction = _check_number(value, expected)
    if 1 < fraction <= 100:
        raise Invalid(expected, f"did you mean {format_number(fraction)}%?")
    if not 0 < fraction <= 1:
        raise Invalid(expected, "must be above 0 and at most 1")
    return fraction


def events_per_second(value: object) -> float:
    return _check_number(value, "expected a number of events per second")


positive_events_per_second = _above_zero(events_per_second, "a number of events per second")


def count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("expected a whole number (0 or more)")
    if value < 0:
        raise Invalid("expected a whole number (0 or more)", "cannot be negative")
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid("expected true or false")
    return value


def command(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("expected a command line")
    return value


def one_of(choices: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise Invalid("expected one of " + ", ".join(choices))
        return value

    return convert


mode = one_of(MODES)


def unit_name(value: object) -> str:
    expected = "expected a systemd unit name like pve-cluster.service"
    if not isinstance(value, str):
        raise Invalid(expected)
    stem, dot, suffix = value.rpartition(".")
    if not dot or not stem or suffix not in _UNIT_SUFFIXES:
        raise Invalid(expected, "unit names end in ." + ", .".join(_UNIT_SUFFIXES))
    if not _UNIT_NAME.fullmatch(value) or len(value) > 255:
        raise Invalid(expected, r"unit names use letters, digits and :-_.\@")
    return value


def keep_name(value: object) -> str:
    expected = "expected a directory name relative to the pin, like pip or a/b"
    if not isinstance(value, str) or not value or "\0" in value:
        raise Invalid(expected)
    if value.startswith("/"):
        raise Invalid(expected, "keep names are relative to the pin")
    names = value.split("/")
    if ".." in names:
        raise Invalid(expected, ".. is not allowed")
    if "" in names or "." in names:
        normal = _normalise(value)[1:]
        raise Invalid(expected, f"write {normal!r}" if normal else None)
    return value


_LISTEN_EXPECTED = "expected a loopback address and port like 127.0.0.1:9586 or [::1]:9586"
# Each rewrite of the textfile is a write to wherever it lives; more often than once a second
# serves no scraper (Prometheus scrapes every 15s to 1m) and would itself wear a disk.
_MIN_METRICS_INTERVAL = 1.0


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of a `metrics.listen` value such as "127.0.0.1:9586" or "[::1]:9586"; the
    host must be a loopback address, written as digits. Raises ValueError saying why not."""
    try:
        return _split_listen(text)
    except Invalid as e:
        raise ValueError(e.render(describe_value(text))) from None


def _split_listen(value: object) -> tuple[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        raise Invalid(_LISTEN_EXPECTED, f"write 127.0.0.1:{value}")
    if not isinstance(value, str):
        raise Invalid(_LISTEN_EXPECTED)
    host, colon, port = value.rpartition(":")
    if not colon or not host:
        raise Invalid(_LISTEN_EXPECTED, "give the address and the port")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise Invalid(_LISTEN_EXPECTED, "the port is a number from 1 to 65535")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise Invalid(
            _LISTEN_EXPECTED, "write the address as digits (127.0.0.1 or [::1]), not a name"
        ) from None
    if address.version == 6 and not bracketed:
        raise Invalid(_LISTEN_EXPECTED, f"write an IPv6 address in brackets: [{host}]:{port}")
    if address.version == 4 and bracketed:
        raise Invalid(_LISTEN_EXPECTED, f"brackets are for IPv6 addresses: {host}:{port}")
    if not address.is_loopback:
        raise Invalid(
            _LISTEN_EXPECTED,
            "the endpoint has no authentication, so rampiped serves it to this machine only;"
            " let node_exporter read metrics.textfile, or put a proxy in front",
        )
    return host, int(port)


def listen(value: object) -> str:
    _split_listen(value)
    assert isinstance(value, str)
    return value


def textfile(value: object) -> str:
    path = abs_path(value)
    if not path.endswith(".prom") or path.rsplit("/", 1)[1] == ".prom":
        raise Invalid(
            "expected a file name ending in .prom",
            "node_exporter's textfile collector reads only *.prom files",
        )
    return path


def metrics_interval(value: object) -> float:
    seconds = duration(value)
    if seconds < _MIN_METRICS_INTERVAL:
        raise Invalid("expected a duration of at least 1s")
    return seconds


def optional(convert: Callable[[object], T]) -> Callable[[object], T | None]:
    def convert_optional(value: object) -> T | None:
        return None if value is None else convert(value)

    return convert_optional
