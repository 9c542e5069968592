"""A task for the router partition tests, hosted by ``WorkerProcess("tests.apps.partitions:worker")``."""

from __future__ import annotations

from sdk import Bide, DurableContext

bide = Bide()


@bide.durable_task(name="PartitionWait")
async def partition_wait(input: dict, ctx: DurableContext) -> int:
    payload = await ctx.aio_wait_for_event(input["key"], f"input.n == {input['n']}")
    return int(payload["n"])


worker = bide.worker("partitions", workflows=[partition_wait], durable_slots=1000)
