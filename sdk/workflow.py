"""``bide.workflow(name=...)``: a DAG of tasks, as in Hatchet.

Tasks declare their ``parents``; a task runs once every parent has ended (completed or
skipped). ``wait_for`` holds a task back until its conditions hold, ``skip_if`` skips it,
``cancel_if`` cancels the workflow; conditions are checked in the task's own run, before
its function, with the same race-free waits as ``ctx.aio_wait_for``. A workflow run's
result maps each task's name to its output (``{"skipped": True}`` for a skipped task).

A run of the workflow is itself a run (of the task named like the workflow), driven by
the host: it records which tasks it started, as children, and wakes when one ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sdk._codec import to_json_value
from sdk.conditions import Condition, OrGroup, ParentCondition, SleepCondition, UserEventCondition
from sdk.context import ChildSpec, current_runtime
from sdk.errors import WorkflowDefinitionError
from sdk.gates import SKIPPED
from sdk.runs import RunRef, StartRequest, new_run_id, start_and_wait, start_run, unwrap_outcome, unwrap_terminal

if TYPE_CHECKING:
    from sdk.client import Bide
    from sdk.tasks import TaskDefinition



class Workflow:
    """Tasks defined with ``@wf.task()`` / ``@wf.durable_task()``; run with ``wf.run()`` and friends."""

    def __init__(self, client: Bide, name: str, on_events: Sequence[str] | None = None) -> None:
        from sdk.tasks import TaskDefinition, validate_task_name

        self.name = validate_task_name(name)
        self._client = client
        self.tasks: list[TaskDefinition] = []
        # The run of the workflow itself: hosted next to its tasks, driven by the host.
        self.runner = TaskDefinition(client._pool, _runner_placeholder, name=self.name, durable=True,
                                     on_events=on_events)
        self.runner.workflow = self

    @property
    def on_events(self) -> tuple[str, ...]:
        return self.runner.on_events

    def task(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
             parents: Sequence[TaskDefinition] | None = None,
             wait_for: Sequence[Condition | OrGroup] | None = None,
             skip_if: Sequence[Condition | OrGroup] | None = None,
             cancel_if: Sequence[Condition | OrGroup] | None = None,
             execution_timeout: timedelta | float | str | None = None,
             schedule_timeout: timedelta | float | str | None = None,
             retries: int = 0, backoff_factor: float | None = None,
             backoff_max_seconds: float | None = None) -> Any:
        """A regular task of this workflow (sync or async; at least once)."""
        return self._add(fn, name, False, locals())

    def durable_task(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
                     parents: Sequence[TaskDefinition] | None = None,
                     wait_for: Sequence[Condition | OrGroup] | None = None,
                     skip_if: Sequence[Condition | OrGroup] | None = None,
                     cancel_if: Sequence[Condition | OrGroup] | None = None,
                     execution_timeout: timedelta | float | str | None = None,
                     schedule_timeout: timedelta | float | str | None = None,
                     retries: int = 0, backoff_factor: float | None = None,
                     backoff_max_seconds: float | None = None) -> Any:
        """A durable task of this workflow (checkpointed, gets a ``DurableContext``)."""
        return self._add(fn, name, True, locals())

    def _add(self, fn: Callable[..., Any] | None, name: str | None, durable: bool, opts: dict[str, Any]) -> Any:
        def wrap(f: Callable[..., Any]) -> TaskDefinition:
            short = name or f.__name__
            # Checked once the function (and so the task's name) is known: `@wf.task(parents=[...])`
            # calls this with no function yet.
            parents = self._parents(opts.get("parents"), short)
            conds = {k: self._conditions(k, opts.get(k), parents, short)
                     for k in ("wait_for", "skip_if", "cancel_if")}
            if any(t.workflow_key == short for t in self.tasks):
                raise WorkflowDefinitionError(f"workflow {self.name!r} already has a task named {short!r}")
            define = self._client.durable_task if durable else self._client.task
            t: TaskDefinition = define(
                name=f"{self.name}:{short}", execution_timeout=opts["execution_timeout"],
                schedule_timeout=opts["schedule_timeout"], retries=opts["retries"],
                backoff_factor=opts["backoff_factor"], backoff_max_seconds=opts["backoff_max_seconds"],
            )(f)
            t.workflow_key = short
            t.workflow = self
            t.parents = parents
            t.wait_for, t.skip_if, t.cancel_if = conds["wait_for"], conds["skip_if"], conds["cancel_if"]
            self.tasks.append(t)
            return t

        return wrap(fn) if fn is not None else wrap

    def _parents(self, parents: Any, task: str) -> list[TaskDefinition]:
        from sdk.tasks import TaskDefinition

        if parents is None:
            return []
        if isinstance(parents, str) or not isinstance(parents, Sequence):
            raise WorkflowDefinitionError(
                f"workflow {self.name!r}, task {task!r}: parents must be a list of tasks of this workflow, "
                f"got {parents!r}")
        out = []
        for p in parents:
            # A parent must be defined (in this workflow) before its children, so a cycle cannot be written.
            if not isinstance(p, TaskDefinition) or p not in self.tasks:
                where = f"workflow {p.workflow.name!r}" if isinstance(p, TaskDefinition) and p.workflow else \
                    "no workflow" if isinstance(p, TaskDefinition) else "not a task"
                raise WorkflowDefinitionError(
                    f"workflow {self.name!r}, task {task!r}: unknown parent {p!r} ({where}); parents must be tasks "
                    f"of this workflow defined before it: {[t.workflow_key for t in self.tasks]}")
            out.append(p)
        return out

    def _conditions(self, kind: str, items: Any, parents: list[TaskDefinition], task: str) -> list[Any]:
        if items is None:
            return []
        if isinstance(items, Condition | OrGroup):
            items = [items]
        if not isinstance(items, Sequence):
            raise WorkflowDefinitionError(f"workflow {self.name!r}, task {task!r}: {kind} must be a list of "
                                          f"conditions, got {items!r}")
        for item in items:
            conds = item.conditions if isinstance(item, OrGroup) else (item,)
            for c in conds:
                if not isinstance(c, SleepCondition | UserEventCondition | ParentCondition):
                    raise WorkflowDefinitionError(
                        f"workflow {self.name!r}, task {task!r}: {kind} takes SleepCondition, UserEventCondition, "
                        f"ParentCondition or or_(...), got {c!r}")
                if isinstance(c, ParentCondition) and c.parent not in parents:
                    raise WorkflowDefinitionError(
                        f"workflow {self.name!r}, task {task!r}: a ParentCondition in {kind} names "
                        f"{getattr(c.parent, 'workflow_key', c.parent)!r}, which is not a parent of this task "
                        f"(parents: {[p.workflow_key for p in parents]})")
        return list(items)

    # -- the graph ---------------------------------------------------------------------------------

    def order(self) -> list[TaskDefinition]:
        """The tasks in an order where every parent comes before its children (checks for cycles)."""
        done: list[TaskDefinition] = []
        left = list(self.tasks)
        while left:
            ready = [t for t in left if all(p in done for p in t.parents)]
            if not ready:
                raise WorkflowDefinitionError(
                    f"workflow {self.name!r} has a cycle among {[t.workflow_key for t in left]}")
            done.extend(ready)
            left = [t for t in left if t not in ready]
        return done

    def _check_runnable(self) -> None:
        if not self.tasks:
            raise WorkflowDefinitionError(f"workflow {self.name!r} has no tasks")
        self.order()

    # -- running -----------------------------------------------------------------------------------

    def _input(self, input: Any) -> Any:
        self._check_runnable()
        first = self.order()[0]
        return first.signature.dump_input(input) if first.signature.input_model is not None else \
            to_json_value(input, f"input for workflow {self.name!r}", is_input=True)

    def load_output(self, result: Any) -> dict[str, Any]:
        """The workflow's result: each task's output, typed by its function's return annotation."""
        out: dict[str, Any] = {}
        by_key = {t.workflow_key: t for t in self.tasks}
        for key, value in (result or {}).items():
            t = by_key.get(key)
            if t is None or value == SKIPPED:
                out[key] = value
                continue
            try:
                out[key] = t.signature.load_output(value)
            except Exception:
                out[key] = value
        return out

    async def aio_run_no_wait(self, input: Any = None, *, child_key: str | None = None) -> RunRef:
        rt = current_runtime.get()
        if rt is not None:
            from sdk.tasks import ChildRef

            spec = ChildSpec(task=self.name, durable=True, input=self._input(input), key=child_key)
            rid = (await rt.spawn([spec], wait=False))[0]
            return ChildRef(self._client._pool, rid, self.load_output, rt)
        req = StartRequest(task=self.name, durable=True, input=self._input(input), run_id=new_run_id(), new_id=True)
        conn = await self._client._pool.get()
        await start_run(conn, req)
        return RunRef(self._client._pool, req.run_id, self.load_output)

    def run_no_wait(self, input: Any = None) -> RunRef:
        return self._client._pool.run_sync(self.aio_run_no_wait(input))

    async def aio_run(self, input: Any = None, timeout: float | None = None, *,
                      child_key: str | None = None) -> dict[str, Any]:
        """Run the workflow and return ``{task name: output}``; inside a durable task, as a child."""
        rt = current_runtime.get()
        if rt is not None:
            spec = ChildSpec(task=self.name, durable=True, input=self._input(input), key=child_key)
            outcome = (await rt.spawn([spec], wait=True))[0]
            result: dict[str, Any] = unwrap_outcome(outcome, self.load_output)
            return result
        req = StartRequest(task=self.name, durable=True, input=self._input(input), run_id=new_run_id(), new_id=True)
        conn = await self._client._pool.get()
        entry = await start_and_wait(conn, req, timeout)
        return self.load_output(unwrap_terminal(req.run_id, entry))

    def run(self, input: Any = None, timeout: float | None = None) -> dict[str, Any]:
        return self._client._pool.run_sync(self.aio_run(input, timeout))

    def __repr__(self) -> str:
        return f"<workflow {self.name!r} tasks={[t.workflow_key for t in self.tasks]}>"


async def _runner_placeholder(input: Any, ctx: Any) -> None:
    raise RuntimeError("a workflow's run is driven by the host, not called")
