"""The tasks the throughput benchmarks run: one memoised step then done, or nothing at all."""

from sdk import Bide, DurableContext, EmptyModel

bide = Bide()  # BIDE_NATS_URL is set by the benchmark


def _step(x: int) -> int:
    return x + 1


@bide.durable_task(name="BenchTrivial")
async def bench_trivial(input: EmptyModel, ctx: DurableContext) -> dict[str, int]:
    return {"value": await ctx.memo(_step, 1)}


@bide.durable_task(name="BenchNoop")
async def bench_noop(input: EmptyModel, ctx: DurableContext) -> dict[str, int]:
    return {"value": 2}  # what BenchTrivial returns, so both pass the same check


worker = bide.worker("bench", workflows=[bench_trivial, bench_noop], slots=1000, durable_slots=1000)
