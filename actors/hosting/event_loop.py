"""The event loop a host process runs on: uvloop where it is installed, else asyncio's own.

A host's turns are many small callbacks (a publish, its ack, a resumed coroutine), so the loop's
own cost per callback decides how late a timer's turn starts when thousands are due at once.
``python -m benchmarks.timers_at_scale --runs 10000`` (10,000 sleepers due in one second, one
worker process), five alternated pairs on the 2-core development machine: lateness p99 34-95 ms
(median 80) on asyncio's loop, 32-69 ms (median 52) on uvloop. uvloop's timers are kept to the
millisecond and can end early: a wait for a moment goes through ``actors.engine.wire.sleep_to``.
``BIDE_EVENT_LOOP=asyncio`` keeps asyncio's loop (uvloop is not built for Windows).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("uvloop", "asyncio")


def loop_name() -> str:
    """``BIDE_EVENT_LOOP``, validated: ``uvloop`` (the default where it is installed) or ``asyncio``."""
    raw = os.environ.get("BIDE_EVENT_LOOP", "").strip().lower()
    if raw and raw not in CHOICES:
        raise ValueError(f"BIDE_EVENT_LOOP={raw!r} must be one of {', '.join(CHOICES)}")
    if raw == "asyncio":
        return raw
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if raw == "uvloop":
            raise ValueError("BIDE_EVENT_LOOP=uvloop but uvloop is not installed (pip install uvloop)") from None
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_name` picks."""
    try:
        name = loop_name()
    except ValueError:
        main.close()
        raise
    if name == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
