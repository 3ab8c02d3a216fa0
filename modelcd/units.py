"""Durations and sizes, read and written the same way everywhere.

One grammar for every CLI flag, API field and `MODELCD_*` setting that takes a duration
or a size, so `deploy --expiry 7d`, `gc --retention 1h`, `replay --since 5m`,
`shadow add --until 14d`, `rollout start --interval 1m` and `MODELCD_GC_RETENTION=7d`
all accept what the others accept.

- A duration is a number of seconds (`90`, `1.5`) or numbers with units, summed:
  `500ms`, `30s`, `5m`, `1.5h`, `7d`, `2w`, `1d12h`, `1h 30m`. Units: ms, s, m (minutes),
  h, d, w. Never negative.
- A size is a number of bytes or a number with a unit: `512MiB`, `2GiB`, `64k`, `1.5g`.
  Units are binary (k = KiB = 1024), as memory and upload limits are read.

Errors are `UnitError` (a ValueError) whose message says what was wrong and shows
examples; `duration_arg` and `size_arg` are the argparse types built on them.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Final

__all__ = ["UnitError", "duration_arg", "format_duration", "format_size", "parse_duration", "parse_size", "size_arg"]


class UnitError(ValueError):
    """A duration or size that cannot be read; the message names the value and shows examples."""


_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0,
                          "d": 86400.0, "w": 604800.0}
_PART: Final = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|sec|min|s|m|h|d|w)", re.IGNORECASE)
_NUMBER: Final = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*$")
DURATION_HINT: Final = "use seconds or a number with a unit (ms, s, m, h, d, w), e.g. 30s, 5m, 1h, 7d, 1d12h"


def parse_duration(value: str | float | int, *, positive: bool = False) -> float:
    """Seconds in `value`: a number of seconds, or unit parts summed ('1d12h'); `positive` refuses 0."""
    if isinstance(value, bool):
        raise UnitError(f"not a duration: {value!r} ({DURATION_HINT})")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        number = _NUMBER.match(text)
        if number:
            seconds = float(number.group(1))
        else:
            parts = _PART.findall(text)
            if not parts or _PART.sub("", text).strip():
                raise UnitError(f"not a duration: {value!r} ({DURATION_HINT})")
            seconds = sum(float(n) * _DURATION_UNITS[u.lower()] for n, u in parts)
    else:
        raise UnitError(f"not a duration: {value!r} ({DURATION_HINT})")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise UnitError(f"not a duration: {value!r} (must be zero or more; {DURATION_HINT})")
    if positive and seconds == 0:
        raise UnitError(f"not a duration: {value!r} (must be more than zero; {DURATION_HINT})")
    return seconds


_SIZE_UNITS: Final = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
                      "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4, "tb": 1024**4,
                      "tib": 1024**4}
_SIZE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
SIZE_HINT: Final = "use a number of bytes or a number with a unit (KiB, MiB, GiB), e.g. 512MiB, 2GiB"


def parse_size(value: str | int) -> int:
    """Bytes in `value`: '512MiB' / '2g' / '64k' / '1048576'."""
    if isinstance(value, bool):
        raise UnitError(f"not a size: {value!r} ({SIZE_HINT})")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(f"not a size: {value!r} (must be zero or more)")
        return value
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise UnitError(f"not a size: {value!r} ({SIZE_HINT})")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_duration(seconds: float) -> str:
    """A short human duration: '350 ms', '12 s', '5m 30s', '3h 20m', '7d 2h'; '-' for a negative one."""
    if seconds < 0 or math.isnan(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    total = int(round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m {secs}s" if secs else f"{minutes}m"


def format_size(n: int) -> str:
    """'512 B', '1.5 KiB', '2.0 GiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def duration_arg(text: str) -> float:
    """argparse type: a duration in seconds (see the module docstring)."""
    try:
        return parse_duration(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_duration_arg(text: str) -> float:
    """argparse type: a duration of more than zero seconds."""
    try:
        return parse_duration(text, positive=True)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size_arg(text: str) -> int:
    """argparse type: a size in bytes."""
    try:
        return parse_size(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
