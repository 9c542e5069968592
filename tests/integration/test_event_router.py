"""The event router under stress: races with registration, a SIGKILLed owner, triggers."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from actors.engine.wire import utcnow
from actors.hosting.router import IncomingEvent
from actors.hosting.router_effects import Effects
from actors.store.server import EmbeddedServer
from sdk import Bide, Context, DurableContext
from tests.apps.events import define
from tests.support import WorkerProcess, running_worker, wait_until


async def test_event_published_as_the_wait_registers_is_seen_once(bide: Bide) -> None:
    """200 rounds: the event is pushed at the moment the wait registers (before or after it)."""
    entered: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(200)}

    @bide.durable_task(name="Race")
    async def race(input: dict, ctx: DurableContext) -> int:
        entered[input["i"]].set()
        got = await ctx.aio_wait_for_event(
            "race:event", f"input.i == {input['i']}", scope=f"i:{input['i']}", lookback_window="1m"
        )
        return int(got["i"])

    async def round_(i: int) -> str:
        ref = await race.aio_run_no_wait({"i": i})
        await entered[i].wait()
        await asyncio.sleep(random.uniform(0, 0.004))  # jitter around the registration
        await bide.event.aio_push("race:event", {"i": i}, scope=f"i:{i}")
        assert await ref.aio_result(timeout=30) == i
        return ref.workflow_run_id

    async with running_worker(bide, [race]):
        run_ids = await asyncio.gather(*(round_(i) for i in range(200)))
    for run_id in run_ids:
        kinds = [e.k for e in (await bide.runs.aio_history(run_id)).entries]
        assert kinds.count("wait_resolved") == 1, kinds
        assert kinds.count("signal") == 1, kinds  # never satisfied twice (lookback and live are disjoint)


async def test_router_owner_sigkilled_with_1000_pending_waits(nats_server: EmbeddedServer) -> None:
    bide = Bide(nats_server.url, ack_wait=3.0)
    task = define(bide)
    first = WorkerProcess("tests.apps.events:worker", nats_server.url).start()
    try:
        refs = []
        for chunk in range(0, 1000, 100):
            refs += await asyncio.gather(*(task.aio_run_no_wait({"n": n}) for n in range(chunk, chunk + 100)))
        conn = await bide._pool.get()
        s = conn.layout.subjects

        async def all_registered_and_routed() -> bool:
            info = await conn.js.stream_info(s.events_stream, subjects_filter=s.waits_all)
            registered = sum((info.state.subjects or {}).values())
            routers = [await conn.js.consumer_info(s.events_stream, s.router_consumer(p))
                       for p in range(conn.layout.router_partitions)]
            return registered >= 1000 and all(r.num_pending == 0 and r.num_ack_pending == 0 for r in routers)

        await wait_until(all_registered_and_routed, timeout=60, interval=0.2,
                         what="1000 waits registered and taken in by the router")
        first.kill()
        second = WorkerProcess("tests.apps.events:worker", nats_server.url).start()
        try:
            await bide.event.aio_bulk_push([{"key": "router:crash", "payload": {"n": n}} for n in range(1000)])
            results = await asyncio.gather(*(r.aio_result(timeout=90) for r in refs))
            assert results == list(range(1000))
        finally:
            second.kill()
    finally:
        first.kill()
        await bide.aclose()


async def test_on_events_starts_exactly_one_run_per_event(bide: Bide) -> None:
    seen: list[Any] = []

    @bide.task(name="OnOrder", on_events=["order:created"])
    def on_order(input: dict, ctx: Context) -> str:
        seen.append(input["order"])
        return f"handled {input['order']}"

    async with running_worker(bide, [on_order]) as worker:
        await bide.event.aio_push("order:created", {"order": 1}, event_id="order-1")
        await bide.event.aio_push("order:created", {"order": 1}, event_id="order-1")  # de-duplicated
        await bide.event.aio_push("order:created", {"order": 2}, event_id="order-2")
        await wait_until(lambda: sorted(seen) == [1, 2], what="one run per event")
        # A redelivered event (the router crashed before its ack) starts nothing new.
        router = worker.host.router.for_key("order:created")
        again = IncomingEvent("order:created", None, {"order": 3}, "order-3", seq=999, at=utcnow(), meta={})
        for _ in range(2):
            effects = Effects(router._nc, router._pub, router._s)
            await router._on_event(again, "bide.events.order:created", effects)
            await effects.flush()
        await wait_until(lambda: 3 in seen, what="the event-started run")
        await bide.event.aio_push("order:created", {"order": 4}, event_id="order-4")
        await wait_until(lambda: 4 in seen, what="a later run")
        assert sorted(seen) == [1, 2, 3, 4]
