"""The task the event latency benchmark runs: wait durably for one event, then return its send time."""
# mypy: disable-error-code="untyped-decorator"
# (``Bide.task`` and ``Bide.durable_task`` return ``Any``: the decorators are untyped on the SDK's side.)

from typing import Any

from sdk import Bide, DurableContext

bide = Bide()  # BIDE_NATS_URL is set by the benchmark


@bide.durable_task(name="WaitForMe")
async def wait_for_me(input: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
    payload = await ctx.aio_wait_for_event("bench:go", f"input.n == {input['n']}")
    return {"n": input["n"], "sent_at": payload["sent_at"]}


worker = bide.worker("bench-events", workflows=[wait_for_me], durable_slots=2000)
