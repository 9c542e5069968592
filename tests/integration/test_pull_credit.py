"""How often a host asks a task's consumer for work, against a real nats-server."""

from __future__ import annotations

from typing import Any

from sdk import Bide, DurableContext, EmptyModel
from tests.support import running_worker


async def _double(x: int) -> int:
    return 2 * x


async def test_a_host_running_one_run_after_another_does_not_ask_for_work_after_each(bide: Bide) -> None:
    """Pull credit is topped up once half of it is used, not after every activation: run one at
    a time, a host asked the server for one more activation per run (a request the server
    parses and queues), 9 messages a run instead of 8."""

    @bide.durable_task(name="OneAfterAnother")
    async def one_after_another(input: EmptyModel, ctx: DurableContext) -> int:
        return await ctx.memo(_double, 21)

    conn = await bide._pool.get()
    pulls: list[str] = []

    async def count(msg: Any) -> None:
        if ".BIDE_QUEUE." in msg.subject:
            pulls.append(msg.subject)

    sub = await conn.nc.subscribe("$JS.API.CONSUMER.MSG.NEXT.>", cb=count)
    try:
        async with running_worker(bide, [one_after_another]):
            assert await one_after_another.aio_run(EmptyModel(), timeout=20) == 42  # credit settles
            await conn.nc.flush()
            before = len(pulls)
            for _ in range(40):
                assert await one_after_another.aio_run(EmptyModel(), timeout=20) == 42
            await conn.nc.flush()
            asked = len(pulls) - before
    finally:
        await sub.unsubscribe()
    assert asked <= 10, f"the host asked for work {asked} times in 40 runs"

