"""Durable event waits against a real server: keys, CEL, scope, lookback, or-groups, direct delivery."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from sdk import (
    Bide,
    DurableContext,
    EmptyModel,
    EventTimeout,
    InvalidExpression,
    RunFailedError,
    RunStatus,
    SleepCondition,
    UserEventCondition,
    or_,
)
from tests.support import running_worker, wait_until


async def waiting(bide: Bide, run_id: str, timeout: float = 10.0) -> None:
    """Until the run has registered its wait (and been evicted)."""

    async def _is_waiting() -> bool:
        hist = await bide.runs.aio_history(run_id)
        return any(e.k == "wait_registered" for e in hist.entries) and (
            (await bide.runs.aio_get(run_id)).status is RunStatus.WAITING
        )

    await wait_until(_is_waiting, timeout=timeout, what=f"run {run_id} to wait")


class AwaitedEvent(BaseModel):
    id: str


async def test_wait_for_event_by_key(bide: Bide) -> None:
    @bide.durable_task(name="DurableEventTask")
    async def durable_event_task(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        res = await ctx.aio_wait_for_event("user:update")
        return {"got": res}

    async with running_worker(bide, [durable_event_task]):
        ref = await durable_event_task.aio_run_no_wait(EmptyModel())
        await waiting(bide, ref.workflow_run_id)
        await bide.event.aio_push("user:update", {"user_id": "1234"})
        assert await ref.aio_result(timeout=10) == {"got": {"user_id": "1234"}}


async def test_cel_filter_and_payload_validator(bide: Bide) -> None:
    @bide.durable_task(name="Filtered")
    async def filtered(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        res = await ctx.aio_wait_for_event("user:update", "input.user_id == '1234'")
        ev = await ctx.aio_wait_for_event("durable-example:event", "true", payload_validator=AwaitedEvent)
        return {"first": res, "id": ev.id}

    async with running_worker(bide, [filtered]):
        ref = await filtered.aio_run_no_wait(EmptyModel())
        await waiting(bide, ref.workflow_run_id)
        await bide.event.aio_push("user:update", {"user_id": "999"})
        await bide.event.aio_push("user:update", {"user_id": 1234})  # a number is not the string '1234'
        await bide.event.aio_push("user:update", {"user_id": "1234", "n": 1})

        async def on_second_wait() -> bool:
            hist = await bide.runs.aio_history(ref.workflow_run_id)
            return sum(e.k == "wait_registered" for e in hist.entries) == 2

        await wait_until(on_second_wait, what="the second wait")
        await bide.event.aio_push("durable-example:event", AwaitedEvent(id="123").model_dump(mode="json"))
        assert await ref.aio_result(timeout=10) == {"first": {"user_id": "1234", "n": 1}, "id": "123"}


async def test_or_group_sleep_wins_and_event_never_resumes(bide: Bide) -> None:
    resumed: list[str] = []

    @bide.durable_task(name="OrGroup")
    async def or_group(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        res = await ctx.aio_wait_for(
            "either", or_(SleepCondition(timedelta(seconds=1)), UserEventCondition(event_key="or:event"))
        )
        resumed.append(next(iter(res)))
        return {"key": next(iter(res))}

    async with running_worker(bide, [or_group]) as worker:
        ref = await or_group.aio_run_no_wait(EmptyModel())
        assert await ref.aio_result(timeout=10) == {"key": "sleep:1s"}
        hist_before = await bide.runs.aio_history(ref.workflow_run_id)
        router = worker.host.router
        routed = router.events_routed
        await bide.event.aio_push("or:event", {})
        await wait_until(lambda: router.events_routed > routed, what="the router to see the late event")
        turns = worker.host.turns
        # A marker run proves the host has drained anything the late event could have caused.
        assert await or_group.aio_run(EmptyModel(), timeout=10) == {"key": "sleep:1s"}
        assert worker.host.turns == turns + 2
        hist = await bide.runs.aio_history(ref.workflow_run_id)
        assert [e.k for e in hist.entries].count("wait_resolved") == 1
        assert len(hist.entries) == len(hist_before.entries)
        assert resumed == ["sleep:1s", "sleep:1s"]


async def test_timeout_returns_none_or_raises(bide: Bide) -> None:
    @bide.durable_task(name="TimesOut")
    async def times_out(input: dict, ctx: DurableContext) -> dict[str, Any]:
        got = await ctx.aio_wait_for_event("never:comes", timeout="1s")
        try:
            await ctx.aio_wait_for_event("never:comes", timeout=timedelta(seconds=1), raise_on_timeout=True)
            raised = False
        except EventTimeout:
            raised = True
        return {"got": got, "raised": raised}

    async with running_worker(bide, [times_out]):
        assert await times_out.aio_run({}, timeout=15) == {"got": None, "raised": True}


async def test_direct_delivery_before_after_and_fifo(bide: Bide) -> None:
    @bide.durable_task(name="Approval")
    async def approval(input: dict, ctx: DurableContext) -> list[Any]:
        got = []
        await ctx.aio_sleep_for(input["sleep"])
        for _ in range(input["n"]):
            got.append(await ctx.aio_wait_for_event("manager-approval", timeout="30s"))
        return got

    async with running_worker(bide, [approval]):
        # Before the wait: the run is sleeping; both events are kept, in order.
        early = await approval.aio_run_no_wait({"sleep": 1.0, "n": 2})
        r1 = await bide.event.aio_send(early.workflow_run_id, "manager-approval", {"n": 1})
        await bide.event.aio_send(early.workflow_run_id, "manager-approval", {"n": 2})
        assert r1.as_dict() == {"status": "delivered", "execution_id": early.workflow_run_id,
                                "event_name": "manager-approval"}
        # After the wait.
        late = await approval.aio_run_no_wait({"sleep": 0, "n": 1})
        await waiting(bide, late.workflow_run_id)
        await bide.event.aio_send(late.workflow_run_id, "manager-approval", {"approved": True})
        assert await early.aio_result(timeout=15) == [{"n": 1}, {"n": 2}]
        assert await late.aio_result(timeout=15) == [{"approved": True}]


async def test_invalid_cel_fails_the_run_with_the_expression(bide: Bide) -> None:
    @bide.durable_task(name="BadCel")
    async def bad_cel(input: EmptyModel, ctx: DurableContext) -> None:
        await ctx.aio_wait_for_event("k", "input.user_id ==")

    with pytest.raises(InvalidExpression, match=r"'input.x = 1': syntax error at column 9"):
        UserEventCondition("k", "input.x = 1")
    async with running_worker(bide, [bad_cel]):
        with pytest.raises(RunFailedError, match=r"InvalidExpression: invalid CEL expression 'input.user_id =='"):
            await bad_cel.aio_run(EmptyModel(), timeout=10)
