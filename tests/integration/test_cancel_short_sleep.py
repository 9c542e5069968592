"""A durable run cancelled with 6 s or less of a sleep left ends cancelled.

A replayed sleep with at most ``WOKEN_MAX`` (6 s) left waits the rest out on its host
(``WaitBriefly``) instead of parking; the cancel was checked only when parking, so the run
recorded the cancel, then ``sleep_fired``, and completed.
"""

from __future__ import annotations

from datetime import timedelta

from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext
from tests.support import running_worker, wait_until


async def test_a_cancel_during_the_last_seconds_of_a_sleep_ends_the_run_cancelled(
        nats_server: EmbeddedServer, bide: Bide) -> None:
    @bide.durable_task(name="ShortSleeper")
    async def short_sleeper(input: dict[str, int], ctx: DurableContext) -> str:
        await ctx.aio_sleep_for(timedelta(seconds=input["s"]))
        return "slept"

    async with running_worker(bide, [short_sleeper]):
        ref = await short_sleeper.aio_run_no_wait({"s": 5})
        rid = ref.workflow_run_id

        async def asleep() -> bool:
            h = await bide.runs.aio_history(rid)
            return h.entries[-1].k == "sleep_scheduled"

        await wait_until(asleep, timeout=10, what="the run asleep")
        assert await bide.runs.aio_cancel(rid, reason="test")

        async def ended() -> bool:
            return (await bide.runs.aio_history(rid)).terminal is not None

        await wait_until(ended, timeout=15, interval=0.1, what="the run ended")
        hist = await bide.runs.aio_history(rid)
        kinds = [e.k for e in hist.entries]
        assert hist.terminal.k == "run_cancelled", kinds
