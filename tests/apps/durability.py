"""Tasks for ``tests/integration/test_durability.py``, hosted by ``WorkerProcess("tests.apps.durability:worker")``.

``define(client)`` registers the tasks on a client, so the test process can start runs
with the very same definitions the worker process hosts. Steps append a line to a file
named in the run input, so executions are counted outside any (killable) process.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pydantic import BaseModel

from sdk import Bide, DurableContext, TaskDefinition


class SleepInput(BaseModel):
    seconds: float


class StepsInput(BaseModel):
    log: str
    gate: str


def _record(log: str, step: str) -> None:
    with open(log, "a") as f:
        f.write(f"{step} {os.getpid()}\n")


def step_one(log: str) -> int:
    _record(log, "step_one")
    return 10


async def step_two(log: str, gate: str, prev: int) -> int:
    _record(log, "step_two")
    await gate_opened(gate)  # in progress until the test opens the gate
    return prev + 5


def step_three(log: str, prev: int) -> int:
    _record(log, "step_three")
    return prev * 2


async def gate_opened(gate: str) -> None:
    """Until the test (another process) creates the gate file: polling is the only way."""
    while not Path(gate).exists():  # noqa: ASYNC110
        await asyncio.sleep(0.05)


def define(client: Bide) -> tuple[TaskDefinition, TaskDefinition]:
    @client.durable_task(name="DurabilitySleep")
    async def durable_sleep(input: SleepInput, ctx: DurableContext) -> dict[str, float]:
        res = await ctx.aio_sleep_for(input.seconds)
        return {"slept": res.duration.total_seconds()}

    @client.durable_task(name="DurabilitySteps")
    async def durable_steps(input: StepsInput, ctx: DurableContext) -> dict[str, int]:
        a = await ctx.memo(step_one, input.log)
        b = await ctx.memo(step_two, input.log, input.gate, a)
        c = await ctx.memo(step_three, input.log, b)
        return {"one": a, "two": b, "three": c}

    return durable_sleep, durable_steps


def define_step_then_gate(client: Bide) -> TaskDefinition:
    @client.durable_task(name="DurabilityStepThenGate")
    async def step_then_gate(input: StepsInput, ctx: DurableContext) -> dict[str, int]:
        a = await ctx.memo(step_one, input.log)
        await gate_opened(input.gate)  # not a checkpoint: the code waits on something else
        return {"one": a}

    return step_then_gate


bide = Bide()  # BIDE_NATS_URL and BIDE_ACK_WAIT come from WorkerProcess
durable_sleep, durable_steps = define(bide)
step_then_gate = define_step_then_gate(bide)
worker = bide.worker("durability-app", workflows=[durable_sleep, durable_steps, step_then_gate])
