"""The contexts a task function receives. Interfaces only: the machinery lives in ``actors``."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NoReturn, Protocol, TypeVar, overload

from pydantic import BaseModel, ValidationError

from sdk.conditions import Condition, OrGroup, SleepCondition, UserEventCondition, as_groups
from sdk.durations import parse_duration
from sdk.errors import EventTimeout, PayloadValidationError
from sdk.models import SleepResult

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ChildSpec:
    """A child run a durable task asks for: which task, its JSON input, an optional ``child_key``."""

    task: str
    durable: bool
    input: Any
    key: str | None = None
    execution_timeout_s: float | None = None
    additional_metadata: dict[str, str] = field(default_factory=dict)
    """The child's own metadata; its parent's is merged under it when it is started."""


class DurableRuntime(Protocol):
    """What a :class:`DurableContext` asks of the runtime driving the run (see ``actors.engine.replay``)."""

    async def spawn(self, children: list[ChildSpec], wait: bool) -> list[Any]: ...

    async def outcomes(self, ids: list[str]) -> list[Any]: ...

    async def memo(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any: ...

    async def sleep_until(self, wake_at: datetime | None, duration: timedelta | None) -> SleepResult: ...

    async def now(self) -> datetime: ...

    def patched(self, change_id: str) -> bool: ...

    async def wait(self, label: str, groups: list[list[Condition]],
                   any_of: list[tuple[str, Condition]] | None = None) -> dict[str, Any]: ...


current_runtime: contextvars.ContextVar[DurableRuntime | None] = contextvars.ContextVar(
    "bide_durable_runtime", default=None
)
"""Set inside a durable run's code: ``task.aio_run()`` there spawns a child instead of a top-level run."""


class Context:
    """What every task receives: who it is and where it runs."""

    def __init__(self, run_id: str, task_name: str, delivery: int, input_data: Any, *, retry_count: int = 0,
                 parents: dict[str, Any] | None = None, additional_metadata: dict[str, str] | None = None) -> None:
        self._run_id = run_id
        self._metadata = dict(additional_metadata or {})
        self._task_name = task_name
        self._delivery = delivery
        self._retry_count = retry_count
        self._input = input_data
        self._parents = parents or {}
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
    def additional_metadata(self) -> dict[str, str]:
        """The run's metadata, set when it was started (a child's includes its parent's)."""
        return dict(self._metadata)

    @property
    def attempt_number(self) -> int:
        """1 on the first attempt, 2 on the first retry (``retries=``), and so on."""
        return self._retry_count + 1

    @property
    def retry_count(self) -> int:
        """How many earlier attempts of this run failed and were retried (Hatchet's ``retry_count``)."""
        return self._retry_count

    @property
    def delivery_count(self) -> int:
        """How many times this activation was delivered (above 1 after a host crash)."""
        return self._delivery

    def task_output(self, parent: Any) -> Any:
        """The output of a parent task of this workflow task (``None`` if the parent was skipped)."""
        _, outcome = self._parent_outcome(parent)
        if outcome.get("skipped"):
            return None
        load = getattr(parent, "signature", None)
        result = outcome.get("result")
        return load.load_output(result) if load is not None else result

    def was_skipped(self, parent: Any) -> bool:
        """Whether a parent task was skipped (its ``skip_if`` held, or a parent condition was false)."""
        return bool(self._parent_outcome(parent)[1].get("skipped"))

    def _parent_outcome(self, parent: Any) -> tuple[str, dict[str, Any]]:
        key = parent if isinstance(parent, str) else getattr(parent, "workflow_key", None)
        if key is None or key not in self._parents:
            known = ", ".join(sorted(self._parents)) or "none: this task has no parents"
            raise ValueError(f"task {self._task_name!r}: {parent!r} is not a parent of this task (parents: {known})")
        out: dict[str, Any] = self._parents[key]
        return key, out

    @property
    def input(self) -> Any:
        """The run's input as JSON data."""
        return self._input

    def log(self, message: str) -> None:
        self.logger.info("[%s] %s", self._run_id, message)


class ContinuedAsNew(BaseException):
    """Raised by :meth:`DurableContext.continue_as_new`; a ``BaseException`` so user code does not catch it."""

    def __init__(self, input: Any) -> None:
        super().__init__("the run continues as new")
        self.input = input


class DurableContext(Context):
    """A :class:`Context` whose awaits are checkpoints: they survive crashes and free the worker."""

    def __init__(
        self, run_id: str, task_name: str, delivery: int, input_data: Any, runtime: DurableRuntime, *,
        retry_count: int = 0, parents: dict[str, Any] | None = None, additional_metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(run_id, task_name, delivery, input_data, retry_count=retry_count, parents=parents,
                         additional_metadata=additional_metadata)
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

    def patched(self, change_id: str) -> bool:
        """Whether this run takes the changed code's path marked ``change_id`` (Temporal's ``patched``).

        True for new runs and for runs that had not reached this point when the change was
        deployed (the answer is recorded, so every replay sees it); False when replaying a run
        that passed this point under the old code. Keep both paths until no run needs the old one::

            if ctx.patched("send-receipt-v2"):
                await ctx.memo(send_receipt_v2, order)
            else:
                await ctx.memo(send_receipt, order)
        """
        if not isinstance(change_id, str) or not change_id:
            raise ValueError(f"patched() needs a non-empty change id string, got {change_id!r}")
        return self._runtime.patched(change_id)

    def continue_as_new(self, input: Any = None) -> NoReturn:
        """End this history here and go on as a fresh one with ``input``: same run id, code from the top.

        For runs meant to live forever (an agent loop, a monthly job): each generation's history
        stays short, so turns stay cheap and the history never reaches ``BIDE_MAX_HISTORY``.
        Callers waiting for the run's result, its parent and its trace are unaffected; the
        result is the last generation's. What the current history recorded is gone (carry
        what the next generation needs in ``input``); direct deliveries not yet taken wait for
        the next generation; waits, sleeps and children of this one are not carried over (its
        waits are withdrawn, its timers cancelled, its children left running). ``input`` must
        be JSON (or a pydantic model) that fits one message (768 KiB), or the run fails with
        ``OutputSerializationError`` or ``PayloadLimitError``. Call it as a statement: it
        raises :class:`ContinuedAsNew`, which ``except Exception`` does not catch::

            if turns >= 1000:
                ctx.continue_as_new({"total": total})
        """
        raise ContinuedAsNew(input)

    async def memo(self, fn: Callable[..., Awaitable[T] | T], *args: Any) -> T:
        """Run ``fn(*args)`` once; replays return the recorded result (keyed on the arguments)."""
        result: T = await self._runtime.memo(fn, args)
        return result

    async def aio_wait_for(self, label: str, *conditions: Condition | OrGroup) -> dict[str, Any]:
        """Wait durably until every condition (or ``or_`` group) is satisfied; the run is evicted meanwhile.

        Returns:
            ``{condition key: {event id: payload}}`` for events and ``{condition key:
            {"duration_seconds": ...}}`` for sleeps; in an ``or_`` group only the winner appears.
        """
        if not isinstance(label, str) or not label:
            raise ValueError(f"aio_wait_for needs a non-empty label, got {label!r}")
        return await self._runtime.wait(label, as_groups(conditions))

    @overload
    async def aio_wait_for_event(
        self,
        key: str,
        expression: str | None = None,
        *,
        scope: str | None = None,
        lookback_window: timedelta | float | str | None = None,
        payload_validator: type[M],
        timeout: timedelta | float | str | None = None,
        match: str | None = None,
        raise_on_timeout: bool = False,
    ) -> M: ...

    @overload
    async def aio_wait_for_event(
        self,
        key: str,
        expression: str | None = None,
        *,
        scope: str | None = None,
        lookback_window: timedelta | float | str | None = None,
        payload_validator: None = None,
        timeout: timedelta | float | str | None = None,
        match: str | None = None,
        raise_on_timeout: bool = False,
    ) -> Any: ...

    async def aio_wait_for_event(
        self,
        key: str,
        expression: str | None = None,
        *,
        scope: str | None = None,
        lookback_window: timedelta | float | str | None = None,
        payload_validator: type[BaseModel] | None = None,
        timeout: timedelta | float | str | None = None,
        match: str | None = None,
        raise_on_timeout: bool = False,
    ) -> Any:
        """Wait durably for one event with ``key`` and return its payload.

        Args:
            key: the event key (or the name a direct delivery uses).
            expression: CEL over ``input`` (the payload) and ``event`` (this run's input).
            scope: only events pushed with this scope; lookback reads only that scope.
            lookback_window: also accept events pushed this long before the wait.
            payload_validator: a pydantic model the payload is validated into.
            timeout: give up after this long: returns ``None`` (or raises :class:`EventTimeout`
                with ``raise_on_timeout=True``).
            match: a field equal in the payload and this run's input (``"data.userId"``).
        """
        if payload_validator is not None and not (isinstance(payload_validator, type)
                                                  and issubclass(payload_validator, BaseModel)):
            raise TypeError(f"payload_validator must be a pydantic BaseModel subclass, got {payload_validator!r}")
        group: list[Condition] = [
            UserEventCondition(
                key, expression, scope=scope, lookback_window=lookback_window, readable_data_key="event", match=match
            )
        ]
        if timeout is not None:
            # Checked here so the error names `timeout`, not the SleepCondition it becomes.
            group.append(SleepCondition(parse_duration(timeout, "timeout"), readable_data_key="timeout"))
        result = await self._runtime.wait(f"event:{key}", [group])
        got = result.get("event")
        if not got:
            if raise_on_timeout:
                raise EventTimeout(f"run {self.run_id}: no event {key!r} arrived within {timeout}")
            return None
        payload = next(iter(got.values()))
        if payload_validator is None:
            return payload
        try:
            return payload_validator.model_validate(payload)
        except ValidationError as e:
            raise PayloadValidationError(
                f"run {self.run_id}: the payload of event {key!r} does not fit {payload_validator.__name__}: "
                f"{e.error_count()} error(s): {'; '.join(_brief(err) for err in e.errors()[:3])}; "
                f"payload was {payload!r:.300}"
            ) from None


def _brief(err: Any) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ())) or "payload"
    return f"{loc}: {err.get('msg')}"


