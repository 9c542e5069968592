"""Task definitions: what ``@bide.task`` and ``@bide.durable_task`` return."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sdk._codec import Signature
from sdk.context import parse_duration
from sdk.runs import RunRef, StartRequest, new_run_id, start_and_wait, start_run, unwrap_terminal

if TYPE_CHECKING:
    from sdk._connection import ConnectionPool

_VALID_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_:/")


def validate_task_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 200 or not set(name) <= _VALID_NAME_CHARS:
        raise ValueError(
            f"task name {name!r} must be 1-200 characters of letters, digits, '-', '_', ':' or '/'"
        )
    return name


class TaskDefinition:
    """A task a worker can host and a client can run: ``run``, ``aio_run``, ``run_no_wait``."""

    def __init__(
        self,
        pool: ConnectionPool,
        fn: Callable[..., Any],
        *,
        name: str,
        durable: bool,
        execution_timeout: timedelta | float | str | None = None,
        on_events: Sequence[str] | None = None,
    ) -> None:
        if durable and not inspect.iscoroutinefunction(fn):
            raise TypeError(f"durable task {name!r} must be an async function (async def)")
        self.name = validate_task_name(name)
        self.fn = fn
        self.durable = durable
        self.execution_timeout: timedelta | None = (
            parse_duration(execution_timeout, "execution_timeout") if execution_timeout is not None else None
        )
        self.signature = Signature(fn, self.name)
        if on_events is not None and (isinstance(on_events, str) or not all(
            isinstance(k, str) and k.strip() for k in on_events
        )):
            raise ValueError(f"on_events of task {name!r} must be a list of event keys, got {on_events!r}")
        self.on_events: tuple[str, ...] = tuple(on_events or ())
        self.workflow_key: str = name
        """The task's name inside its workflow (its key in the workflow's result)."""
        """Event keys that start a run of this task, one run per event (the payload is its input)."""
        self._pool = pool

    def _request(self, input: Any, run_id: str | None) -> StartRequest:
        return StartRequest(
            task=self.name,
            durable=self.durable,
            input=self.signature.dump_input(input),
            run_id=run_id or new_run_id(),
            execution_timeout_s=self.execution_timeout.total_seconds() if self.execution_timeout else None,
        )

    async def aio_run(self, input: Any = None, *, run_id: str | None = None, timeout: float | None = None) -> Any:
        """Start a run and wait for its result (raises ``RunFailedError`` if it failed)."""
        req = self._request(input, run_id)
        conn = await self._pool.get()
        entry = await start_and_wait(conn, req, timeout)
        return self.signature.load_output(unwrap_terminal(req.run_id, entry))

    def run(self, input: Any = None, *, run_id: str | None = None, timeout: float | None = None) -> Any:
        """Synchronous :meth:`aio_run`."""
        return self._pool.run_sync(self.aio_run(input, run_id=run_id, timeout=timeout))

    async def aio_run_no_wait(self, input: Any = None, *, run_id: str | None = None) -> RunRef:
        """Start a run and return its handle as soon as it is durably recorded."""
        req = self._request(input, run_id)
        conn = await self._pool.get()
        await start_run(conn, req)
        return RunRef(self._pool, req.run_id, self.signature.load_output)

    def run_no_wait(self, input: Any = None, *, run_id: str | None = None) -> RunRef:
        """Synchronous :meth:`aio_run_no_wait`."""
        return self._pool.run_sync(self.aio_run_no_wait(input, run_id=run_id))

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling the definition calls the function itself (handy in unit tests)."""
        return await self.fn(*args, **kwargs) if inspect.iscoroutinefunction(self.fn) else self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        kind = "durable_task" if self.durable else "task"
        return f"<{kind} {self.name!r}>"
