"""The tasks the throughput benchmarks run: one memoised step then done, or nothing at all."""
# mypy: disable-error-code="untyped-decorator"
# (``Bide.task`` and ``Bide.durable_task`` return ``Any``: the decorators are untyped on the SDK's side.)

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
