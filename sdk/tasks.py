"""Task definitions: what ``@bide.task`` and ``@bide.durable_task`` return."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from math import inf
from typing import TYPE_CHECKING, Any

from actors.engine.child_ids import validate_child_key
from actors.engine.wire import args_hash
from sdk._codec import Signature
from sdk._connection import task_loop
from sdk.context import ChildSpec, DurableRuntime, current_runtime
from sdk.durations import parse_duration
from sdk.gates import gate
from sdk.limits import validate_metadata
from sdk.runs import (
    RunRef,
    StartRequest,
    new_run_id,
    start_and_wait,
    start_run,
    unwrap_outcome,
    unwrap_terminal,
    validate_run_id,
)

if TYPE_CHECKING:
    from sdk._connection import ConnectionPool
    from sdk.conditions import Condition, OrGroup
    from sdk.workflow import Workflow

_VALID_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_:/")


def validate_task_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 200 or not set(name) <= _VALID_NAME_CHARS:
        raise ValueError(
            f"task name {name!r} must be 1-200 characters of letters, digits, '-', '_', ':' or '/'"
        )
    return name


@dataclass(frozen=True)
class BulkRunItem:
    """One run of :meth:`TaskDefinition.aio_run_many`: its input and an optional ``child_key``."""

    input: Any = None
    key: str | None = None


class TaskDefinition:
    """A task a worker can host and a client can run: ``run``, ``aio_run``, ``run_no_wait``.

    Inside a durable task, ``aio_run`` / ``aio_run_many`` / ``aio_run_no_wait`` spawn *child*
    runs: their ids follow from the parent's position (or ``child_key``), the parent is
    evicted while they run, and a replay never spawns them twice.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        fn: Callable[..., Any],
        *,
        name: str,
        durable: bool,
        execution_timeout: timedelta | float | str | None = None,
        on_events: Sequence[str] | None = None,
        retries: int = 0,
        backoff_factor: float | None = None,
        backoff_max_seconds: float | None = None,
        schedule_timeout: timedelta | float | str | None = None,
    ) -> None:
        if durable and not inspect.iscoroutinefunction(fn):
            raise TypeError(f"durable task {name!r} must be an async function (async def)")
        self.name = validate_task_name(name)
        self.fn = fn
        self.durable = durable
        self.execution_timeout: timedelta | None = (
            parse_duration(execution_timeout, "execution_timeout") if execution_timeout is not None else None
        )
        self.signature = Signature(fn, self.name, pool.config.payload_limits)
        if on_events is not None and (isinstance(on_events, str) or not all(
            isinstance(k, str) and k.strip() for k in on_events
        )):
            raise ValueError(f"on_events of task {name!r} must be a list of event keys, got {on_events!r}")
        self.on_events: tuple[str, ...] = tuple(on_events or ())
        """Event keys that start a run of this task, one run per event (the payload is its input)."""
        self.workflow_key: str = name
        """The task's name inside its workflow (its key in the workflow's result)."""
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries of task {name!r} must be a whole number >= 0, got {retries!r}")
        if backoff_factor is not None and (
            not isinstance(backoff_factor, int | float) or not 1 <= backoff_factor < inf
        ):
            raise ValueError(f"backoff_factor of task {name!r} must be a finite number >= 1, "
                             f"got {backoff_factor!r}")
        if backoff_max_seconds is not None and (
            not isinstance(backoff_max_seconds, int | float) or not 0 < backoff_max_seconds < inf
        ):
            raise ValueError(f"backoff_max_seconds of task {name!r} must be a finite number > 0, "
                             f"got {backoff_max_seconds!r}")
        self.retries = retries
        self.backoff_factor = backoff_factor
        self.backoff_max_seconds = backoff_max_seconds
        self.schedule_timeout: timedelta | None = (
            parse_duration(schedule_timeout, "schedule_timeout") if schedule_timeout is not None else None
        )
        # Set for the tasks of a DAG workflow (see sdk.workflow).
        self.workflow: Workflow | None = None
        self.parents: list[TaskDefinition] = []
        self.wait_for: list[Condition | OrGroup] = []
        self.skip_if: list[Condition | OrGroup] = []
        self.cancel_if: list[Condition | OrGroup] = []
        self._pool = pool

    # -- retries -------------------------------------------------------------------------------

    def retry_delay(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (1-based): ``backoff_factor ** (retry - 1)``, capped."""
        if self.backoff_factor is None:
            return 0.0
        delay = float(self.backoff_factor) ** (retry - 1)
        return min(delay, self.backoff_max_seconds) if self.backoff_max_seconds is not None else delay

    @property
    def has_conditions(self) -> bool:
        return bool(self.wait_for or self.skip_if or self.cancel_if)

    @property
    def runs_durably(self) -> bool:
        """Durable tasks, and workflow tasks whose conditions must wait before they run."""
        return self.durable or self.has_conditions

    async def entry(self, value: Any, ctx: Any) -> Any:
        """What a host runs: the task's conditions (a workflow task's), then the function."""
        task_loop.set(asyncio.get_running_loop())  # the synchronous API refuses to block it
        if self.has_conditions:
            await gate(self, ctx)
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(value, ctx)
        return await asyncio.to_thread(self.fn, value, ctx)

    # -- children ------------------------------------------------------------------------------

    def _child(self, input: Any, key: str | None, metadata: Mapping[str, str] | None = None) -> ChildSpec:
        if key is not None:
            validate_child_key(key)
        return ChildSpec(task=self.name, durable=self.runs_durably, input=self.signature.dump_input(input), key=key,
                         execution_timeout_s=self.execution_timeout.total_seconds() if self.execution_timeout else None,
                         additional_metadata=validate_metadata(metadata,
                                                               f"additional_metadata of a {self.name!r} child"))

    def _load(self, outcome: dict[str, Any]) -> Any:
        return unwrap_outcome(outcome, self.signature.load_output)

    def create_bulk_run_item(self, input: Any = None, key: str | None = None, *,
                             child_key: str | None = None, **_options: Any) -> BulkRunItem:
        """An item for :meth:`aio_run_many` (Hatchet's name)."""
        return BulkRunItem(input=input, key=child_key or key)

    def _request(self, input: Any, run_id: str | None, metadata: Mapping[str, str] | None = None) -> StartRequest:
        if run_id is not None:
            validate_run_id(run_id)  # "" is a mistake, not a request for a new id
        dumped = self.signature.dump_input(input)
        return StartRequest(
            task=self.name,
            durable=self.durable,
            input=dumped,
            run_id=run_id if run_id is not None else new_run_id(),
            new_id=run_id is None,
            execution_timeout_s=self.execution_timeout.total_seconds() if self.execution_timeout else None,
            # With the caller's run id, the same task and input again is the same start (a retry):
            # it returns the run; anything else for that id is refused.
            start_id=f"{self.name}:{args_hash(dumped)}" if run_id is not None else new_run_id(),
            additional_metadata=validate_metadata(metadata, f"additional_metadata of a run of {self.name!r}"),
        )

    async def aio_run(self, input: Any = None, *, run_id: str | None = None, timeout: float | None = None,
                      child_key: str | None = None, additional_metadata: Mapping[str, str] | None = None) -> Any:
        """Start a run and wait for its result (raises ``RunFailedError`` if it failed).

        Inside a durable task this spawns a child run and evicts the parent until it ends.
        ``additional_metadata`` (string keys and values) is the run's, readable as
        ``ctx.additional_metadata`` and filterable with ``bide.runs.list(metadata=...)``; a
        child's is its parent's merged with its own.
        """
        rt = current_runtime.get()
        if rt is not None:
            outcome = (await rt.spawn([self._child(input, child_key, additional_metadata)], wait=True))[0]
            return self._load(outcome)
        req = self._request(input, run_id, additional_metadata)
        conn = await self._pool.get()
        entry = await start_and_wait(conn, req, timeout)
        return self.signature.load_output(unwrap_terminal(req.run_id, entry))

    def run(self, input: Any = None, *, run_id: str | None = None, timeout: float | None = None,
            additional_metadata: Mapping[str, str] | None = None) -> Any:
        """Synchronous :meth:`aio_run`."""
        return self._pool.run_sync(self.aio_run(input, run_id=run_id, timeout=timeout,
                                                additional_metadata=additional_metadata))

    async def aio_run_many(self, items: Sequence[Any], *, return_exceptions: bool = False) -> list[Any]:
        """Run one task many times and return the results in order.

        Items are inputs or :meth:`create_bulk_run_item` items. Inside a durable task this is
        a fan-out of child runs recorded as one checkpoint; the parent wakes once, when the
        last child ends. A failed run raises its ``RunFailedError`` (the first in order)
        after all have ended, or takes its place in the list with ``return_exceptions``.
        """
        if isinstance(items, str | bytes) or not isinstance(items, Sequence):
            raise TypeError(f"aio_run_many takes a list of inputs or bulk run items, got {items!r}")
        parsed = [i if isinstance(i, BulkRunItem) else BulkRunItem(input=i) for i in items]
        if not parsed:
            return []
        rt = current_runtime.get()
        if rt is not None:
            outcomes = await rt.spawn([self._child(i.input, i.key) for i in parsed], wait=True)
        else:
            refs = [await self.aio_run_no_wait(i.input) for i in parsed]
            conn = await self._pool.get()
            from sdk.runs import outcome_of_terminal, wait_terminal

            terms = await asyncio.gather(*(wait_terminal(conn, r.workflow_run_id) for r in refs))
            outcomes = [outcome_of_terminal(r.workflow_run_id, t) for r, t in zip(refs, terms, strict=True)]
        results: list[Any] = []
        for o in outcomes:
            try:
                results.append(self._load(o))
            except Exception as e:
                if not return_exceptions:
                    raise
                results.append(e)
        return results

    def run_many(self, items: Sequence[Any], *, return_exceptions: bool = False) -> list[Any]:
        """Synchronous :meth:`aio_run_many`."""
        return self._pool.run_sync(self.aio_run_many(items, return_exceptions=return_exceptions))

    async def aio_run_no_wait(self, input: Any = None, *, run_id: str | None = None,
                              child_key: str | None = None,
                              additional_metadata: Mapping[str, str] | None = None) -> RunRef:
        """Start a run and return its handle as soon as it is durably recorded.

        Inside a durable task this spawns a child; ``await ref.aio_result()`` there is a
        checkpoint that evicts the parent until the child ends.
        """
        rt = current_runtime.get()
        if rt is not None:
            rid = (await rt.spawn([self._child(input, child_key, additional_metadata)], wait=False))[0]
            return ChildRef(self._pool, rid, self.signature.load_output, rt)
        req = self._request(input, run_id, additional_metadata)
        conn = await self._pool.get()
        await start_run(conn, req)
        return RunRef(self._pool, req.run_id, self.signature.load_output)

    def run_no_wait(self, input: Any = None, *, run_id: str | None = None,
                    additional_metadata: Mapping[str, str] | None = None) -> RunRef:
        """Synchronous :meth:`aio_run_no_wait`."""
        return self._pool.run_sync(self.aio_run_no_wait(input, run_id=run_id, additional_metadata=additional_metadata))

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling the definition calls the function itself (handy in unit tests)."""
        return await self.fn(*args, **kwargs) if inspect.iscoroutinefunction(self.fn) else self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        kind = "durable_task" if self.durable else "task"
        return f"<{kind} {self.name!r}>"


class ChildRef(RunRef):
    """A child spawned with ``aio_run_no_wait`` inside a durable task."""

    def __init__(self, pool: ConnectionPool, run_id: str, load_output: Any, runtime: DurableRuntime) -> None:
        super().__init__(pool, run_id, load_output)
        self._runtime = runtime

    async def aio_result(self, timeout: float | None = None) -> Any:
        if current_runtime.get() is self._runtime:
            outcome = (await self._runtime.outcomes([self.workflow_run_id]))[0]
            return unwrap_outcome(outcome, self._load_output)
        return await super().aio_result(timeout)
