"""Tasks for ``tests/integration/test_recovery.py`` and ``benchmarks/recovery.py``.

Hosted by ``WorkerProcess("tests.apps.recovery:worker")``; ``define(client)`` registers the
same tasks on a client, so a test can start runs of what the worker process hosts. Steps
append ``<step> <pid>`` to a file named in the input, outside any killable process.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from pydantic import BaseModel

from sdk import Bide, Context, DurableContext, TaskDefinition


class StepInput(BaseModel):
    log: str
    seconds: float
    blocking: bool = False
    """Sleep in synchronous code (the host's event loop is blocked meanwhile)."""


class GatedInput(BaseModel):
    log: str
    gate: str


def _record(log: str, step: str) -> None:
    with open(log, "a") as f:
        f.write(f"{step} {os.getpid()}\n")


def slow_step(log: str, seconds: float) -> int:
    _record(log, "step")
    time.sleep(seconds)
    return os.getpid()


async def slow_async_step(log: str, seconds: float) -> int:
    _record(log, "step")
    await asyncio.sleep(seconds)
    return os.getpid()


async def gated_step(log: str, gate: str) -> int:
    _record(log, "gated")
    # Done when the test (another process) creates the gate file: polling is the only way.
    while not Path(gate).exists():  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    return 1


def define(client: Bide) -> dict[str, TaskDefinition]:
    @client.durable_task(name="RecoveryStep")
    async def recovery_step(input: StepInput, ctx: DurableContext) -> dict[str, int]:
        step = slow_step if input.blocking else slow_async_step
        pid = await ctx.memo(step, input.log, input.seconds)
        return {"pid": pid}

    @client.durable_task(name="RecoveryPoison")
    async def poison(input: StepInput, ctx: DurableContext) -> None:
        _record(input.log, "poison")
        os._exit(1)  # the worker process dies on every delivery

    @client.task(name="RecoveryChild")
    async def child(input: GatedInput, ctx: Context) -> int:
        return 7

    @client.durable_task(name="RecoveryInfra", retries=1)
    async def infra(input: GatedInput, ctx: DurableContext) -> int:
        try:
            one = await ctx.memo(gated_step, input.log, input.gate)
            res = await child.aio_run(input)
        except Exception as e:
            _record(input.log, f"saw:{type(e).__name__}")
            raise
        _record(input.log, "done")
        return one + int(res)

    return {"step": recovery_step, "poison": poison, "child": child, "infra": infra}


bide = Bide()  # BIDE_NATS_URL, BIDE_ACK_WAIT and BIDE_MAX_DELIVERIES come from the worker's environment
tasks = define(bide)
worker = bide.worker("recovery-app", workflows=list(tasks.values()))
