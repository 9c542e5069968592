"""The testing kit's environment: a real server, a worker in this process, and time that skips."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from sdk import Bide, Context, DurableContext, EmptyModel, RunStatus, SleepCondition
from sdk.testing import BideTestEnv


class Account(BaseModel):
    user_id: str


def make_app() -> tuple[Bide, Any]:
    bide = Bide("nats://127.0.0.1:1")  # nowhere: the environment points it at its own server

    @bide.durable_task(name="Onboarding")
    async def onboarding(input: Account, ctx: DurableContext) -> dict[str, Any]:
        await ctx.aio_sleep_for(timedelta(days=3))
        reply = await ctx.aio_wait_for_event(f"reply:{input.user_id}", timeout=timedelta(days=1))
        return {"nudged": reply is None}

    return bide, onboarding


async def test_a_three_day_sleep_and_a_one_day_timeout_complete_without_waiting() -> None:
    bide, onboarding = make_app()
    wall = time.monotonic()
    async with BideTestEnv(bide, workflows=[onboarding]) as env:
        ref = await onboarding.aio_run_no_wait(Account(user_id="u1"))
        await env.skip(timedelta(days=3))
        assert (await bide.runs.aio_get(ref.workflow_run_id)).status is RunStatus.WAITING  # within the timeout
        await env.skip(timedelta(days=1))
        assert await ref.aio_result(timeout=10) == {"nudged": True}
    assert time.monotonic() - wall < 30  # days of durable time, not days of wall time


async def test_an_event_inside_the_window_wins_over_the_timeout() -> None:
    bide, onboarding = make_app()
    async with BideTestEnv(bide, workflows=[onboarding]) as env:
        ref = await onboarding.aio_run_no_wait(Account(user_id="u2"))
        await env.skip(timedelta(days=3, hours=1))
        await bide.event.aio_push("reply:u2", {"text": "thanks"})
        assert await ref.aio_result(timeout=10) == {"nudged": False}


async def test_timers_in_one_skip_fire_in_order_each_at_its_time() -> None:
    bide = Bide("nats://127.0.0.1:1")

    @bide.durable_task(name="Daily")
    async def daily(input: EmptyModel, ctx: DurableContext) -> list[str]:
        seen = [(await ctx.aio_now()).isoformat()]
        for _ in range(2):
            await ctx.aio_sleep_for(timedelta(days=1))
            seen.append((await ctx.aio_now()).isoformat())
        return seen

    async with BideTestEnv(bide, workflows=[daily]) as env:
        ref = await daily.aio_run_no_wait(EmptyModel())
        await env.skip(timedelta(days=3))
        start, first, second = (datetime.fromisoformat(x) for x in await ref.aio_result(timeout=10))
        assert timedelta(days=1) <= first - start < timedelta(days=1, seconds=5)
        assert timedelta(days=1) <= second - first < timedelta(days=1, seconds=5)
        assert env.now() - start >= timedelta(days=3)


async def test_a_retry_backoff_is_skipped() -> None:
    bide = Bide("nats://127.0.0.1:1")
    attempts: list[int] = []

    @bide.task(name="Flaky", retries=2, backoff_factor=3600.0)  # an hour, then 3600**2 s capped below
    def flaky(input: EmptyModel, ctx: Context) -> dict[str, int]:
        attempts.append(ctx.retry_count)
        if len(attempts) < 3:
            raise RuntimeError("not yet")
        return {"attempts": len(attempts)}

    async with BideTestEnv(bide, workflows=[flaky]) as env:
        ref = await flaky.aio_run_no_wait(EmptyModel())
        await env.skip(timedelta(days=30))
        assert await ref.aio_result(timeout=10) == {"attempts": 3}


async def test_a_short_sleep_fires_by_itself_without_a_skip() -> None:
    bide = Bide("nats://127.0.0.1:1")

    @bide.durable_task(name="Nap")
    async def nap(input: EmptyModel, ctx: DurableContext) -> str:
        await ctx.aio_sleep_for(timedelta(seconds=1))
        return "rested"

    async with BideTestEnv(bide, workflows=[nap]) as env:
        await env.skip(timedelta(hours=5))  # the clock is ahead of the wall: timers still fire at their moment
        assert await nap.aio_run(EmptyModel(), timeout=15) == "rested"


async def test_children_and_direct_delivery_work_inside() -> None:
    bide = Bide("nats://127.0.0.1:1")

    @bide.durable_task(name="Child")
    async def child(input: EmptyModel, ctx: DurableContext) -> int:
        await ctx.aio_sleep_for(timedelta(hours=2))
        return 7

    @bide.durable_task(name="Parent")
    async def parent(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        got = await child.aio_run(EmptyModel())
        msg = await ctx.aio_wait_for_event("approve")
        return {"child": got, "msg": msg}

    async with BideTestEnv(bide, workflows=[child, parent]) as env:
        ref = await parent.aio_run_no_wait(EmptyModel())
        await env.skip(timedelta(hours=3))
        await bide.event.aio_send(ref.workflow_run_id, "approve", {"ok": True})
        assert await ref.aio_result(timeout=10) == {"child": 7, "msg": {"ok": True}}


async def test_bad_skips_are_refused_and_the_environment_cleans_up_after_a_failure() -> None:
    bide = Bide("nats://127.0.0.1:1")

    @bide.task(name="Noop")
    def noop(input: EmptyModel, ctx: Context) -> None:
        return None

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with BideTestEnv(bide, workflows=[noop]) as env:
            with pytest.raises(ValueError, match="backwards"):
                await env.skip(timedelta(seconds=-1))
            with pytest.raises(TypeError, match="timedelta"):
                await env.skip(5)  # type: ignore[arg-type]
            with pytest.raises(RuntimeError, match="one at a time"):
                async with BideTestEnv(bide, workflows=[noop]):
                    pass
            raise Boom("the test's own failure")
    # The clock is back to the wall and another environment may open.
    async with BideTestEnv(bide, workflows=[noop]) as env:
        assert abs(env.now() - datetime.now(env.now().tzinfo)) < timedelta(seconds=5)
        await asyncio.wait_for(noop.aio_run(EmptyModel()), 15)


async def test_a_workflow_tasks_sleep_condition_is_skipped() -> None:
    bide = Bide("nats://127.0.0.1:1")
    wf = bide.workflow(name="Nightly")

    @wf.task()
    def collect(input: EmptyModel, ctx: Context) -> dict[str, int]:
        return {"rows": 3}

    @wf.task(parents=[collect], wait_for=[SleepCondition(timedelta(hours=8))])
    def report(input: EmptyModel, ctx: Context) -> dict[str, int]:
        return {"reported": ctx.task_output(collect)["rows"]}

    async with BideTestEnv(bide, workflows=[wf]) as env:
        ref = await wf.aio_run_no_wait(EmptyModel())
        await env.skip(timedelta(hours=8))
        assert await ref.aio_result(timeout=10) == {"collect": {"rows": 3}, "report": {"reported": 3}}
