"""DAG workflows against a real nats-server: the seed's example, conditions, skips, definition errors."""

from __future__ import annotations

from typing import Any

import pytest

from actors.engine.wire import decode_token
from sdk import (
    Bide,
    Context,
    EmptyModel,
    ParentCondition,
    RunCancelledError,
    RunNotFoundError,
    RunStatus,
    SleepCondition,
    UserEventCondition,
    WorkflowDefinitionError,
)
from tests.apps.children import StepOutput, define
from tests.support import running_worker, wait_until


async def _waiting_on(client: Bide, worker: Any, run_id: str, task_key: str) -> bool:
    """Whether the workflow's task ``task_key`` is started and its wait is registered with the router.

    Only then is an event pushed certain to be seen (before, it would be lookback, and these
    waits have none).
    """
    hist = await client.runs.aio_history(run_id)
    for e in hist.entries:
        if e.k == "children_spawned" and e.task.endswith(f":{task_key}"):
            try:
                child = await client.runs.aio_history(e.run_ids[0])
            except RunNotFoundError:
                return False  # recorded, not started yet
            index = worker.host.router.index
            return any(c.k == "wait_registered" for c in child.entries) and any(
                w.run_id == e.run_ids[0] for w in index.by_cid.values())
    return False


async def test_the_seeds_dag_with_conditions(bide: Bide) -> None:
    """start -> wait_for_event (or_(sleep 1 min, event)) and skip_on_event (sleep 30 s, skip_if event)."""
    d = define(bide)
    wf = d["workflow"]
    async with running_worker(bide, [wf]) as worker:
        ref = await wf.aio_run_no_wait()
        for key in ("wait_for_event", "skip_on_event"):
            await wait_until(lambda key=key: _waiting_on(bide, worker, ref.workflow_run_id, key), timeout=20,
                             what=f"{key} waiting")
        # The event wins the or-group long before its one-minute sleep; the skip event skips
        # the other task before its 30 s wait is over.
        await bide.event.aio_push("wait_for_event:start", {"go": True})
        await bide.event.aio_push("skip_on_event:skip", {})
        out = await ref.aio_result(timeout=20)
        assert out["start"] == StepOutput(random_number=7)
        assert out["wait_for_event"] == StepOutput(random_number=8)
        assert out["skip_on_event"] == {"skipped": True}
        # skip_if=[ParentCondition(start, "output.random_number > 5")]: start returned 7.
        assert out["skipped_by_parent"] == {"skipped": True}
        assert out["sum_up"] == {"sum": 8, "skipped": ["skip_on_event", "skipped_by_parent"]}
        info = await bide.runs.aio_get(ref.workflow_run_id)
        assert info.status == RunStatus.COMPLETED


async def test_sleep_path_and_a_workflow_as_a_child(bide: Bide) -> None:
    """No events: the or-group's 1 s sleep lets ``second`` run, ``third`` runs after its 2 s wait."""
    d = define(bide)
    async with running_worker(bide, [d["quick"], d["runs_workflow"]]):
        out = await d["runs_workflow"].aio_run(EmptyModel(), timeout=30)
        assert out == {"second": 2, "third": 3}


async def test_cancel_if_cancels_the_workflow(bide: Bide) -> None:
    d = define(bide)
    quick = d["quick"]
    async with running_worker(bide, [quick]) as worker:
        ref = await quick.aio_run_no_wait()
        await wait_until(lambda: _waiting_on(bide, worker, ref.workflow_run_id, "third"), timeout=20,
                         what="third waiting")
        await bide.event.aio_push("quick:cancel", {})
        with pytest.raises(RunCancelledError, match="third"):
            await ref.aio_result(timeout=20)


def test_definition_errors_name_the_problem(bide: Bide) -> None:
    wf = bide.workflow(name="Errors")
    other = bide.workflow(name="Other")

    @wf.task()
    def a(input: EmptyModel, ctx: Context) -> None: ...

    @other.task()
    def b(input: EmptyModel, ctx: Context) -> None: ...

    with pytest.raises(WorkflowDefinitionError, match=r"unknown parent .*workflow 'Other'"):
        wf.task(parents=[b])(_noop)
    with pytest.raises(WorkflowDefinitionError, match="parents must be a list"):
        wf.task(parents="a")(_noop)  # type: ignore[arg-type]
    with pytest.raises(WorkflowDefinitionError, match=r"names 'a', which is not a parent"):
        wf.task(skip_if=[ParentCondition(parent=a, expression="output.x > 1")])(_noop)
    with pytest.raises(WorkflowDefinitionError, match="wait_for takes SleepCondition"):
        wf.task(parents=[a], wait_for=["soon"])(_noop)  # type: ignore[list-item]
    with pytest.raises(WorkflowDefinitionError, match="already has a task named 'a'"):
        wf.task(name="a")(_noop)

    @wf.task(parents=[a], wait_for=[SleepCondition("1s")], skip_if=[UserEventCondition("k", "input.x == 1")])
    def c(input: EmptyModel, ctx: Context) -> None: ...

    # Parents are defined before their children, so the order is always a valid one.
    assert [t.workflow_key for t in wf.order()] == ["a", "c"]
    # A cycle cannot be declared with task objects; a graph edited into one is still refused.
    a.parents = [c]
    with pytest.raises(WorkflowDefinitionError, match="cycle"):
        wf.order()


def _noop(input: Any, ctx: Context) -> None: ...


async def test_on_events_starts_one_workflow_run_per_event(bide: Bide) -> None:
    wf = bide.workflow(name="OnSignup", on_events=["user:signup"])

    @wf.task()
    def greet(input: dict[str, Any], ctx: Context) -> dict[str, str]:
        return {"hello": input["name"]}

    @wf.task(parents=[greet])
    def shout(input: dict[str, Any], ctx: Context) -> dict[str, str]:
        return {"loud": ctx.task_output(greet)["hello"].upper()}

    async with running_worker(bide, [wf]):
        await bide.event.aio_push("user:signup", {"name": "ada"})
        await bide.event.aio_push("user:signup", {"name": "bob"})
        conn = await bide._pool.get()
        s = conn.layout.subjects
        results: list[Any] = []

        async def both_done() -> bool:
            results.clear()
            info = await conn.js.stream_info(s.history_stream, subjects_filter=s.history_all)
            head = f"{s.prefix}.history."
            ids = [decode_token(subj.removeprefix(head)) for subj in (info.state.subjects or {})]
            for rid in ids:
                hist = await bide.runs.aio_history(rid)
                if hist.entries[0].task == wf.name and hist.terminal is not None:
                    results.append(hist.terminal.result)
            return len(results) == 2

        await wait_until(both_done, timeout=20, what="two workflow runs completed")
        assert sorted(r["shout"]["loud"] for r in results) == ["ADA", "BOB"]
