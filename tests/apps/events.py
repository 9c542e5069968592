"""Tasks for the router crash test, hosted by ``WorkerProcess("tests.apps.events:worker")``."""

from __future__ import annotations

from sdk import Bide, DurableContext, TaskDefinition


def define(client: Bide) -> TaskDefinition:
    @client.durable_task(name="WaitForN")
    async def wait_for_n(input: dict, ctx: DurableContext) -> int:
        payload = await ctx.aio_wait_for_event("router:crash", f"input.n == {input['n']}")
        return int(payload["n"])

    return wait_for_n


bide = Bide()
wait_for_n = define(bide)
worker = bide.worker("router-crash", workflows=[wait_for_n], durable_slots=2000)
