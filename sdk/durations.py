"""Durations as users write them: a ``timedelta``, seconds, or a string such as ``"5s"`` or ``"1h30m"``."""

from __future__ import annotations

import math
import re
from datetime import timedelta

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


MAX_DURATION = timedelta(days=36_525)
"""The longest duration accepted (100 years): a sleep's wake time must be a date Python can hold."""


def parse_duration(value: timedelta | float | int | str, what: str) -> timedelta:
    """Accept a timedelta, seconds, or a string such as ``"5s"``, ``"2m"``, ``"1h30m"``."""
    if isinstance(value, timedelta):
        td = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or abs(value) > MAX_DURATION.total_seconds():
            raise ValueError(f"{what} must be a finite number of seconds, at most {MAX_DURATION.days} days (100 "
                             f"years), got {value!r}")
        td = timedelta(seconds=value)
    elif isinstance(value, str):
        td = _parse_duration_str(value, what)
    else:
        raise TypeError(f"{what} must be a timedelta, seconds or a string like '5s', got {value!r}")
    if td.total_seconds() < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    if td > MAX_DURATION:
        raise ValueError(f"{what} is longer than 100 years ({MAX_DURATION.days} days), got {value!r}")
    return td


_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h|d)")


def _parse_duration_str(text: str, what: str) -> timedelta:
    s = text.strip()
    total = 0.0
    at = 0
    while at < len(s):
        part = _PART.match(s, at)
        if part is None:
            break
        total += float(part.group(1)) * _UNITS[part.group(2)]
        at = part.end()
    if not s or at != len(s):
        raise ValueError(f"{what} {text!r} is not a duration like '500ms', '5s', '2m', '1h' or '3d'")
    if not total <= MAX_DURATION.total_seconds():
        raise ValueError(f"{what} {text!r} is longer than 100 years ({MAX_DURATION.days} days)")
    return timedelta(seconds=total)
