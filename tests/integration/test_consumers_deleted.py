"""Consumers deleted by hand (``nats consumer rm``) are made again by the hosts that pull them."""

from __future__ import annotations

import nats

from actors.engine.wire import Subjects
from actors.store.jetstream import api_request
from sdk import Bide, DurableContext, RunStatus
from tests.support import running_worker, wait_until


async def test_hosts_make_deleted_work_consumers_again_and_nothing_queued_is_lost(bide: Bide) -> None:
    # A pull on a deleted consumer is answered "409 Consumer Deleted", then "503" for good: every
    # host went on pulling nothing, and the task's runs (queued, or due to wake) stalled until a
    # host restarted. The activations themselves were never lost: a work queue keeps them.
    @bide.durable_task(name="AcrossDeletedConsumers")
    async def across(input: dict[str, float], ctx: DurableContext) -> str:
        await ctx.aio_sleep_for(input["sleep"])
        return "woke"

    s = Subjects()
    async with running_worker(bide, [across]):
        assert await across.aio_run({"sleep": 0}, timeout=15) == "woke"
        sleeping = await across.aio_run_no_wait({"sleep": 2.0})
        nc = await nats.connect(bide.config.nats_url)
        try:
            for stream in (s.queue_stream, s.work_stream):
                names = (await api_request(nc, f"$JS.API.CONSUMER.NAMES.{stream}", {}))["consumers"]
                assert s.consumer_name("AcrossDeletedConsumers") in names
                for name in names:
                    await api_request(nc, f"$JS.API.CONSUMER.DELETE.{stream}.{name}", {})
            await api_request(nc, f"$JS.API.CONSUMER.DELETE.{s.history_stream}.{s.inbox_sweeper_consumer}", {})

            async def sweeper_consumer_back() -> bool:
                names = (await api_request(nc, f"$JS.API.CONSUMER.NAMES.{s.history_stream}", {}))["consumers"]
                return s.inbox_sweeper_consumer in names

            await wait_until(sweeper_consumer_back, timeout=20, what="the inbox sweeper's consumer to be back")
        finally:
            await nc.close()
        queued = await across.aio_run_no_wait({"sleep": 0})
        assert await queued.aio_result(timeout=20) == "woke"  # its start, on BIDE_QUEUE
        assert await sleeping.aio_result(timeout=20) == "woke"  # its timer's fire, on BIDE_WORK


async def test_hosts_make_deleted_router_consumers_again_and_waits_still_resume(bide: Bide) -> None:
    # The router's consumers hold its checkpoints (their ack floors). Made again, a partition
    # reads its events, waits and triggers from the start of the stream: the index is rebuilt
    # from what the stream retains, as a new owner rebuilds it.
    @bide.durable_task(name="WaitsAcrossDeletedRouter")
    async def waits(input: dict[str, str], ctx: DurableContext) -> dict[str, object]:
        got = await ctx.aio_wait_for_event(input["key"])
        return {"got": str(got)}

    s = Subjects()
    async with running_worker(bide, [waits]):
        async def waiting(run_id: str) -> bool:
            return (await bide.runs.aio_get(run_id)).status is RunStatus.WAITING

        before = await waits.aio_run_no_wait({"key": "router:before"})
        await wait_until(lambda: waiting(before.workflow_run_id), timeout=15, what="the first run to wait")
        await bide.event.aio_push("router:before", {"n": 1})
        assert "1" in (await before.aio_result(timeout=15))["got"]
        parked = await waits.aio_run_no_wait({"key": "router:after"})
        await wait_until(lambda: waiting(parked.workflow_run_id), timeout=15, what="the second run to wait")
        nc = await nats.connect(bide.config.nats_url)
        try:
            names = (await api_request(nc, f"$JS.API.CONSUMER.NAMES.{s.events_stream}", {}))["consumers"]
            assert names
            for name in names:
                await api_request(nc, f"$JS.API.CONSUMER.DELETE.{s.events_stream}.{name}", {})
        finally:
            await nc.close()
        await bide.event.aio_push("router:after", {"n": 2})
        assert "2" in (await parked.aio_result(timeout=30))["got"]
