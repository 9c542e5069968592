from __future__ import annotations

from datetime import timedelta

from sdk import Bide, Context, DurableContext, EmptyModel
from tests.support import running_worker


async def test_durable_sleep_and_memo_complete(bide: Bide) -> None:
    @bide.durable_task(name="SmokeDurable")
    async def smoke(input: EmptyModel, ctx: DurableContext) -> dict[str, int]:
        doubled = await ctx.memo(lambda x: x * 2, 21)
        res = await ctx.aio_sleep_for(timedelta(seconds=1))
        return {"doubled": doubled, "slept": res.duration.seconds}

    @bide.task(name="SmokePlain")
    def plain(input: EmptyModel, ctx: Context) -> dict[str, str]:
        return {"run": ctx.workflow_run_id}

    async with running_worker(bide, [smoke, plain]):
        assert await smoke.aio_run(EmptyModel(), timeout=20) == {"doubled": 42, "slept": 1}
        ref = await plain.aio_run_no_wait({})
        assert await ref.aio_result(timeout=20) == {"run": ref.workflow_run_id}
