"""The tasks of the scale benchmarks: many turns of one run, many sleepers, many runs parked on a wait."""
# mypy: disable-error-code="untyped-decorator"
# (``Bide.durable_task`` returns ``Any``: the decorator is untyped on the SDK's side.)

from datetime import datetime
from typing import Any

from sdk import Bide, DurableContext

bide = Bide()  # BIDE_NATS_URL is set by the benchmark

TURN_EVENT = "bench:turn"
"""The direct-delivery event each turn of ``BenchTurns`` waits for (``bide.event.aio_send``)."""
NEVER_KEY = "bench:never"
"""The event key ``BenchParked`` runs wait for; nothing is ever pushed on it."""


@bide.durable_task(name="BenchTurns")
async def bench_turns(input: dict[str, Any], ctx: DurableContext) -> dict[str, int]:
    """``k`` turns: each waits for one direct event, so each is evicted and resumed from its history."""
    for _ in range(int(input["k"])):
        await ctx.aio_wait_for_event(TURN_EVENT)
    return {"turns": int(input["k"])}


@bide.durable_task(name="BenchSleepUntil")
async def bench_sleep_until(input: dict[str, Any], ctx: DurableContext) -> dict[str, str]:
    """Sleep durably until the absolute time in the input (the driver gives every run the same second)."""
    await ctx.aio_sleep_until(datetime.fromisoformat(input["wake_at"]))
    return {"wake_at": input["wake_at"]}


@bide.durable_task(name="BenchParked")
async def bench_parked(input: dict[str, Any], ctx: DurableContext) -> dict[str, int]:
    """Wait for an event that never comes (an indexable expression: the router keeps one entry per run)."""
    await ctx.aio_wait_for_event(NEVER_KEY, f"input.n == {int(input['n'])}")
    return {"n": int(input["n"])}


# The benchmarks override durable_slots with ``bide worker --durable-slots``.
worker = bide.worker("bench-scale", workflows=[bench_turns, bench_sleep_until, bench_parked], durable_slots=2000)
