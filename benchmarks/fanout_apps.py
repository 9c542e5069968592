"""The tasks the fan-out benchmark runs: a durable parent that spawns ``n`` trivial children at once."""
# mypy: disable-error-code="untyped-decorator"
# (``Bide.task`` and ``Bide.durable_task`` return ``Any``: the decorators are untyped on the SDK's side.)

from typing import Any

from sdk import Bide, Context, DurableContext

bide = Bide()  # BIDE_NATS_URL is set by the benchmark


@bide.task(name="FanoutChild")
async def fanout_child(input: dict[str, Any], ctx: Context) -> dict[str, int]:
    # async: the child costs only the engine (a sync task would also pay for a thread hop).
    return {"v": input["i"] * 2}


@bide.durable_task(name="FanoutParent")
async def fanout_parent(input: dict[str, Any], ctx: DurableContext) -> dict[str, int]:
    # One checkpoint spawns every child; the parent is evicted and woken once, when the last one ends.
    results = await fanout_child.aio_run_many([{"i": i} for i in range(input["n"])])
    return {"n": len(results), "sum": sum(r["v"] for r in results)}


# ``slots`` (the children's concurrency) is overridden with ``bide worker --slots`` by the benchmark.
worker = bide.worker("bench-fanout", workflows=[fanout_parent, fanout_child], slots=200, durable_slots=100)
