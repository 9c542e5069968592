"""The contexts a task function receives. Interfaces only: the machinery lives in ``actors``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from sdk.models import SleepResult

T = TypeVar("T")


class DurableRuntime(Protocol):
    """What a :class:`DurableContext` asks of the runtime driving the run (see ``actors.replay``)."""

    async def memo(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any: ...

    async def sleep_until(self, wake_at: datetime | None, duration: timedelta | None) -> SleepResult: ...

    async def now(self) -> datetime: ...


class Context:
    """What every task receives: who it is and where it runs."""

    def __init__(self, run_id: str, task_name: str, attempt: int, input_data: Any) -> None:
        self._run_id = run_id
        self._task_name = task_name
        self._attempt = attempt
        self._input = input_data
        self.logger = logging.getLogger(f"bide.task.{task_name}")

    @property
    def workflow_run_id(self) -> str:
        """The run's id (Hatchet's name for it)."""
        return self._run_id

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def task_name(self) -> str:
        return self._task_name

    @property
    def attempt_number(self) -> int:
        """1 on the first delivery of this activation, higher after a host crash or retry."""
        return self._attempt

    @property
    def input(self) -> Any:
        """The run's input as JSON data."""
        return self._input

    def log(self, message: str) -> None:
        self.logger.info("[%s] %s", self._run_id, message)


class DurableContext(Context):
    """A :class:`Context` whose awaits are checkpoints: they survive crashes and free the worker."""

    def __init__(
        self, run_id: str, task_name: str, attempt: int, input_data: Any, runtime: DurableRuntime
    ) -> None:
        super().__init__(run_id, task_name, attempt, input_data)
        self._runtime = runtime

    async def aio_sleep_for(self, duration: timedelta | float | str) -> SleepResult:
        """Sleep durably. The wake time is recorded once: a restarted run sleeps only what is left."""
        return await self._runtime.sleep_until(None, parse_duration(duration, "duration"))

    async def aio_sleep_until(self, wake_at: datetime) -> SleepResult:
        """Sleep durably until an absolute, timezone-aware time."""
        if not isinstance(wake_at, datetime) or wake_at.tzinfo is None:
            raise ValueError(f"aio_sleep_until needs a timezone-aware datetime, got {wake_at!r}")
        return await self._runtime.sleep_until(wake_at, None)

    async def aio_now(self) -> datetime:
        """The current time, recorded: every replay sees the same value."""
        return await self._runtime.now()

    async def memo(self, fn: Callable[..., Awaitable[T] | T], *args: Any) -> T:
        """Run ``fn(*args)`` once; replays return the recorded result (keyed on the arguments)."""
        result: T = await self._runtime.memo(fn, args)
        return result


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: timedelta | float | int | str, what: str) -> timedelta:
    """Accept a timedelta, seconds, or a string such as ``"5s"``, ``"2m"``, ``"1h30m"``."""
    if isinstance(value, timedelta):
        td = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        td = timedelta(seconds=value)
    elif isinstance(value, str):
        td = _parse_duration_str(value, what)
    else:
        raise TypeError(f"{what} must be a timedelta, seconds or a string like '5s', got {value!r}")
    if td.total_seconds() < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    return td


def _parse_duration_str(text: str, what: str) -> timedelta:
    s = text.strip()
    total = 0.0
    num = ""
    i = 0
    matched = False
    while i < len(s):
        c = s[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = "ms" if s[i : i + 2] == "ms" else c
        if unit not in _UNITS or not num:
            raise ValueError(f"{what} {text!r} is not a duration like '500ms', '5s', '2m', '1h' or '3d'")
        total += float(num) * _UNITS[unit]
        num = ""
        i += len(unit)
        matched = True
    if num or not matched:
        raise ValueError(f"{what} {text!r} is not a duration like '500ms', '5s', '2m', '1h' or '3d'")
    return timedelta(seconds=total)
