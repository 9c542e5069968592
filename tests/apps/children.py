"""Tasks for the children, DAG, retry and cancellation tests.

``define(client)`` registers them on a client, so a test starts runs with the very
definitions a worker process hosts (``WorkerProcess("tests.apps.children:worker")``).
Children append a line to a file named in their input, so every execution is counted
outside any (killable) process.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sdk import (
    Bide,
    Context,
    DurableContext,
    EmptyModel,
    NonRetryableError,
    ParentCondition,
    RunFailedError,
    SleepCondition,
    UserEventCondition,
    or_,
)


class ChildInput(BaseModel):
    n: int
    log: str = ""
    fail: bool = False
    delay: float = 0.0


class FanOutInput(BaseModel):
    count: int
    log: str = ""
    gate: str = ""
    fail_at: int = -1
    delay: float = 0.0


class FlakyInput(BaseModel):
    log: str
    fail_times: int
    non_retryable: bool = False


class StepOutput(BaseModel):
    random_number: int


def _record(log: str, line: str) -> None:
    if log:
        with open(log, "a") as f:
            f.write(f"{line} {os.getpid()}\n")


def define(client: Bide) -> dict[str, Any]:
    @client.task(name="ChildSquare")
    async def child_square(input: ChildInput, ctx: Context) -> dict[str, int]:
        _record(input.log, f"child {input.n}")
        if input.delay:
            await asyncio.sleep(input.delay)
        if input.fail:
            raise ValueError(f"child {input.n} was told to fail")
        return {"square": input.n * input.n}

    @client.durable_task(name="ChildSleeper")
    async def child_sleeper(input: ChildInput, ctx: DurableContext) -> dict[str, int]:
        await ctx.aio_sleep_for(timedelta(seconds=input.n))
        return {"slept": input.n}

    @client.durable_task(name="FanOut")
    async def fan_out(input: FanOutInput, ctx: DurableContext) -> dict[str, Any]:
        if input.gate:
            # Hold the parent until the test says go, so it can be killed mid-spawn.
            while not Path(input.gate).exists():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        results = await child_square.aio_run_many(
            [ChildInput(n=i, log=input.log, fail=i == input.fail_at, delay=input.delay) for i in range(input.count)]
        )
        return {"total": sum(r["square"] for r in results), "count": len(results)}

    @client.durable_task(name="FanOutCatch")
    async def fan_out_catch(input: FanOutInput, ctx: DurableContext) -> dict[str, Any]:
        results = await child_square.aio_run_many(
            [ChildInput(n=i, fail=i == input.fail_at) for i in range(input.count)], return_exceptions=True
        )
        try:
            await child_square.aio_run(ChildInput(n=99, fail=True))
            caught = ""
        except RunFailedError as e:
            caught = e.error_message
        return {"failed": [i for i, r in enumerate(results) if isinstance(r, Exception)], "caught": caught}

    @client.durable_task(name="OneChild")
    async def one_child(input: ChildInput, ctx: DurableContext) -> dict[str, Any]:
        a = await child_square.aio_run(ChildInput(n=input.n, log=input.log))
        ref = await child_sleeper.aio_run_no_wait(ChildInput(n=1))
        b = await child_square.aio_run(ChildInput(n=input.n + 1, log=input.log), child_key="second")
        slept = await ref.aio_result()
        return {"a": a["square"], "b": b["square"], "slept": slept["slept"]}

    @client.durable_task(name="Flaky", retries=3, backoff_factor=2, backoff_max_seconds=1.5)
    async def flaky(input: FlakyInput, ctx: DurableContext) -> dict[str, int]:
        seen = await ctx.memo(_count_once, input.log)
        _record(input.log, f"attempt {ctx.attempt_number}")
        if ctx.retry_count < input.fail_times:
            if input.non_retryable:
                raise NonRetryableError("this cannot work")
            raise RuntimeError(f"attempt {ctx.attempt_number} failed")
        return {"attempt": ctx.attempt_number, "seen": seen}

    @client.task(name="FlakyRegular", retries=2)
    def flaky_regular(input: FlakyInput, ctx: Context) -> dict[str, int]:
        _record(input.log, f"attempt {ctx.attempt_number}")
        if ctx.retry_count < input.fail_times:
            raise RuntimeError(f"attempt {ctx.attempt_number} failed")
        return {"attempt": ctx.attempt_number}

    @client.task(name="Slow", execution_timeout="1s")
    async def slow(input: EmptyModel, ctx: Context) -> None:
        await asyncio.sleep(30)

    @client.task(name="Blocker")
    async def blocker(input: FanOutInput, ctx: Context) -> None:
        _record(input.log, "blocking")
        try:
            await asyncio.sleep(600)
        finally:
            _record(input.log, "interrupted")

    @client.task(name="LateStart", schedule_timeout="1s")
    def late_start(input: EmptyModel, ctx: Context) -> str:
        return "ran"

    @client.durable_task(name="CancelMe")
    async def cancel_me(input: FanOutInput, ctx: DurableContext) -> dict[str, Any]:
        refs = [await child_sleeper.aio_run_no_wait(ChildInput(n=600)) for _ in range(input.count)]
        try:
            await ctx.aio_wait_for_event("never:happens")
            return {"cancelled": False}
        except asyncio.CancelledError:
            _record(input.log, "cleanup")
            raise
        finally:
            del refs

    # The seed's DAG, as documented.
    wf = client.workflow(name="TaskConditionWorkflow")

    @wf.task()
    def start(input: EmptyModel, ctx: Context) -> StepOutput:
        return StepOutput(random_number=7)

    @wf.task(
        parents=[start],
        wait_for=[
            or_(
                SleepCondition(duration=timedelta(minutes=1)),
                UserEventCondition(event_key="wait_for_event:start"),
            )
        ],
    )
    def wait_for_event(input: EmptyModel, ctx: Context) -> StepOutput:
        return StepOutput(random_number=ctx.task_output(start).random_number + 1)

    @wf.task(
        parents=[start],
        wait_for=[SleepCondition(timedelta(seconds=30))],
        skip_if=[UserEventCondition(event_key="skip_on_event:skip")],
    )
    def skip_on_event(input: EmptyModel, ctx: Context) -> StepOutput:
        return StepOutput(random_number=3)

    @wf.task(parents=[start], skip_if=[ParentCondition(parent=start, expression="output.random_number > 5")])
    def skipped_by_parent(input: EmptyModel, ctx: Context) -> StepOutput:
        return StepOutput(random_number=0)

    @wf.durable_task(parents=[wait_for_event, skip_on_event, skipped_by_parent])
    async def sum_up(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        return {
            "sum": ctx.task_output(wait_for_event).random_number,
            "skipped": [p for p in ("skip_on_event", "skipped_by_parent") if ctx.was_skipped(p)],
        }

    quick = client.workflow(name="QuickConditions")

    @quick.task()
    def first(input: EmptyModel, ctx: Context) -> StepOutput:
        return StepOutput(random_number=1)

    @quick.task(parents=[first], wait_for=[or_(SleepCondition("1s"), UserEventCondition(event_key="quick:go"))],
                skip_if=[UserEventCondition(event_key="quick:skip")])
    def second(input: EmptyModel, ctx: Context) -> StepOutput:
        return StepOutput(random_number=ctx.task_output(first).random_number + 1)

    @quick.task(parents=[first], cancel_if=[UserEventCondition(event_key="quick:cancel")],
                wait_for=[SleepCondition("2s")])
    def third(input: EmptyModel, ctx: Context) -> StepOutput:
        return StepOutput(random_number=3)

    @client.durable_task(name="RunsWorkflow")
    async def runs_workflow(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        out = await quick.aio_run(EmptyModel())
        return {"second": out["second"].random_number, "third": out["third"].random_number}

    return {
        "child_square": child_square, "child_sleeper": child_sleeper, "fan_out": fan_out,
        "fan_out_catch": fan_out_catch, "one_child": one_child, "flaky": flaky, "flaky_regular": flaky_regular,
        "slow": slow, "cancel_me": cancel_me, "workflow": wf, "runs_workflow": runs_workflow, "quick": quick,
        "blocker": blocker, "late_start": late_start,
    }


if os.environ.get("BIDE_TEST_DIE_AFTER_SPAWN"):
    # A crash at the worst moment: the spawn is in the parent's history, no child exists yet.
    import signal

    import actors.hosting.turn_effects

    async def _die(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    actors.hosting.turn_effects.start_children = _die  # type: ignore[assignment]

if os.environ.get("BIDE_TEST_DIE_BEFORE_NOTIFY"):
    # A crash after a child's end is in its history, before its parent has heard of it.
    import signal

    import actors.hosting.turn_effects

    async def _die_before_notify(*args: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    actors.hosting.turn_effects.notify_parent = _die_before_notify  # type: ignore[assignment]

_client = Bide()
defs = define(_client)
worker = _client.worker("children-worker", slots=200, durable_slots=int(os.environ.get("BIDE_DURABLE_SLOTS", "1000")))


def _count_once(log: str) -> int:
    _record(log, "memo")
    return 1
