"""The task the router burst benchmark runs: wait for a keyed event (matched by the router) or a direct send."""
# mypy: disable-error-code="untyped-decorator"
# (``Bide.task`` and ``Bide.durable_task`` return ``Any``: the decorators are untyped on the SDK's side.)

from typing import Any

from sdk import Bide, DurableContext

bide = Bide()  # BIDE_NATS_URL is set by the benchmark


@bide.durable_task(name="BurstWait")
async def burst_wait(input: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
    if input["mode"] == "direct":
        await ctx.aio_wait_for_event("burst:direct")
    else:
        await ctx.aio_wait_for_event("burst:keyed", f"input.id == {input['id']}")
    return {"id": input["id"]}


worker = bide.worker("bench-burst", workflows=[burst_wait], durable_slots=5000)
