"""The durable-sleep example from the issue: a task that sleeps 5 s without holding a worker."""

from datetime import timedelta

from sdk import Bide, Context, DurableContext, EmptyModel

bide = Bide()  # NATS URL from BIDE_NATS_URL, default nats://127.0.0.1:4222 (where `bide dev` serves)


@bide.durable_task(name="SimpleDurable", execution_timeout=timedelta(minutes=10))
async def simple_durable(input: EmptyModel, ctx: DurableContext) -> dict[str, str | int]:
    res = await ctx.aio_sleep_for(timedelta(seconds=5))
    return {"result": "slept", "seconds": res.duration.seconds}


@bide.durable_task(name="StepsThenSleep")
async def steps_then_sleep(input: EmptyModel, ctx: DurableContext) -> dict[str, int | str]:
    def fetch_order(order_id: int) -> dict[str, int]:
        return {"order_id": order_id, "total": 42}

    order = await ctx.memo(fetch_order, 7)  # runs once; replays return the recorded result
    started = await ctx.aio_now()  # recorded: every replay sees the same time
    await ctx.aio_sleep_for("2s")
    return {"order_total": order["total"], "started": started.isoformat()}


@bide.task(name="Hello")
def hello(input: EmptyModel, ctx: Context) -> dict[str, str]:
    return {"hello": ctx.workflow_run_id}


worker = bide.worker("durable-worker", workflows=[simple_durable, steps_then_sleep, hello], slots=100,
                     durable_slots=1000)

if __name__ == "__main__":
    worker.start()
