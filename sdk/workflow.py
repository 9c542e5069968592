"""``bide.workflow(name=...)``: a named group of tasks, as in Hatchet.

This is the single-task form: a workflow with one task runs that task, and its result
maps the task's name to its output (``{"durable_task": {...}}``), as Hatchet's does.
Workflows of several tasks are DAGs (parents, conditions); defining one works, running
one raises until DAG execution lands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sdk.runs import RunRef

if TYPE_CHECKING:
    from sdk.client import Bide
    from sdk.tasks import TaskDefinition


class Workflow:
    """Tasks defined with ``@wf.task()`` / ``@wf.durable_task()``; run with ``wf.run()`` and friends."""

    def __init__(self, client: Bide, name: str, on_events: Sequence[str] | None = None) -> None:
        from sdk.tasks import validate_task_name

        self.name = validate_task_name(name)
        self._client = client
        self._on_events = list(on_events or [])
        self.tasks: list[TaskDefinition] = []

    def task(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
             execution_timeout: timedelta | float | str | None = None, **dag: Any) -> Any:
        """A regular task of this workflow."""
        return self._add(fn, name, False, execution_timeout, dag)

    def durable_task(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
                     execution_timeout: timedelta | float | str | None = None, **dag: Any) -> Any:
        """A durable task of this workflow."""
        return self._add(fn, name, True, execution_timeout, dag)

    def _add(self, fn: Callable[..., Any] | None, name: str | None, durable: bool, timeout: Any,
             dag: dict[str, Any]) -> Any:
        if any(dag.get(k) for k in ("parents", "wait_for", "skip_if", "cancel_if")):
            raise NotImplementedError(
                f"workflow {self.name!r}: parents/wait_for/skip_if/cancel_if need DAG execution, which Bide "
                "does not have yet; use a durable task with ctx.aio_wait_for instead"
            )
        unknown = set(dag) - {"parents", "wait_for", "skip_if", "cancel_if"}
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)} for a task of workflow {self.name!r}")

        def wrap(f: Callable[..., Any]) -> TaskDefinition:
            short = name or f.__name__
            define = self._client.durable_task if durable else self._client.task
            t: TaskDefinition = define(name=f"{self.name}:{short}", execution_timeout=timeout,
                                       on_events=self._on_events or None)(f)
            t.workflow_key = short
            self.tasks.append(t)
            return t

        return wrap(fn) if fn is not None else wrap

    def _only(self) -> TaskDefinition:
        if len(self.tasks) != 1:
            raise NotImplementedError(
                f"workflow {self.name!r} has {len(self.tasks)} tasks; running a workflow of several tasks "
                "(a DAG) is not supported yet — run its tasks one by one"
            )
        return self.tasks[0]

    async def aio_run_no_wait(self, input: Any = None) -> RunRef:
        t = self._only()
        ref = await t.aio_run_no_wait(input)
        return RunRef(ref._pool, ref.workflow_run_id, lambda out: {t.workflow_key: t.signature.load_output(out)})

    def run_no_wait(self, input: Any = None) -> RunRef:
        return self._client._pool.run_sync(self.aio_run_no_wait(input))

    async def aio_run(self, input: Any = None, timeout: float | None = None) -> dict[str, Any]:
        ref = await self.aio_run_no_wait(input)
        result: dict[str, Any] = await ref.aio_result(timeout)
        return result

    def run(self, input: Any = None, timeout: float | None = None) -> dict[str, Any]:
        return self._client._pool.run_sync(self.aio_run(input, timeout))

    def __repr__(self) -> str:
        return f"<workflow {self.name!r} tasks={[t.workflow_key for t in self.tasks]}>"
