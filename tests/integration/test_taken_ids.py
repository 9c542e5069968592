"""A ``Nats-Msg-Id`` taken first by someone else's message never swallows Bide's own write.

JetStream de-duplicates by id across a whole stream. Whoever may publish to any subject of a
stream (an event publisher on the events stream, the HTTP API's user on the queue and the
inboxes) could publish first under an id Bide was about to use: ``register:<wait>/<cond>`` for a
wait's registration, ``start:<run>`` for a run's first activation. The server then acknowledged
Bide's write as a duplicate and dropped it: the wait was never registered, the run never ran.
Each test below failed that way before the fix.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson

from sdk import Bide, DurableContext
from tests.support import running_worker, wait_until


async def test_an_event_published_with_a_wait_registrations_id_does_not_unregister_the_wait(bide: Bide) -> None:
    @bide.durable_task(name="TakenRegisterWaiter")
    async def waiter(input: dict[str, Any], ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event(input["key"])

    conn = await bide._pool.get()
    s = conn.layout.subjects
    u = uuid.uuid4().hex[:8]
    victim, control, key = f"order-{u}", f"control-{u}", f"order:approved:{u}"
    # What an event publisher may do: an event, here carrying the id the victim's registration will use.
    await conn.js.publish(s.event("anything"), b"{}", headers={"Nats-Msg-Id": f"register:{victim}:0/0"})
    async with running_worker(bide, [waiter]):
        refs = [await waiter.aio_run_no_wait({"key": key}, run_id=rid) for rid in (victim, control)]

        async def both_wait() -> bool:
            hists = [await conn.history.read(r.workflow_run_id) for r in refs]
            return all(any(e.k == "wait_registered" for e in h.entries) for h in hists)

        await wait_until(both_wait, what="both runs to wait")

        async def registered() -> bool:
            info = await conn.js.stream_info(s.events_stream, subjects_filter=s.waits(key))
            return sum((info.state.subjects or {}).values()) >= 2

        await wait_until(registered, what="both registrations to be stored")
        await bide.event.aio_push(key, {"approved": True})
        for ref in refs:
            assert await ref.aio_result(timeout=20) == {"approved": True}


async def test_an_activation_published_with_a_starts_id_does_not_keep_the_run_from_running(bide: Bide) -> None:
    @bide.task(name="TakenStartEcho")
    async def echo(input: dict[str, Any], ctx: Any) -> Any:
        return input

    conn = await bide._pool.get()
    s = conn.layout.subjects
    on_another, on_its_own = f"job-{uuid.uuid4().hex[:8]}", f"job-{uuid.uuid4().hex[:8]}"
    # What the HTTP API's user may do: publish on the queue, under a start's id, on another
    # run's subject or on the run's own (garbage a host drops, or it is still queued).
    await conn.js.publish(s.queue("TakenStartEcho", "anything"), b"{}", headers={"Nats-Msg-Id": f"start:{on_another}"})
    await conn.js.publish(s.queue("TakenStartEcho", on_its_own), b"{}", headers={"Nats-Msg-Id": f"start:{on_its_own}"})
    async with running_worker(bide, [echo]):
        for i, rid in enumerate((on_another, on_its_own)):
            ref = await echo.aio_run_no_wait({"v": i}, run_id=rid)
            assert await ref.aio_result(timeout=20) == {"v": i}


async def test_one_event_id_on_two_keys_or_two_runs_reaches_both(bide: Bide) -> None:
    """An event id names one event of one key (or one delivery to one run): reused elsewhere, it is another."""
    @bide.durable_task(name="TakenIdWaiter")
    async def waiter(input: dict[str, Any], ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event(input["key"])

    conn = await bide._pool.get()
    u = uuid.uuid4().hex[:8]
    async with running_worker(bide, [waiter]):
        keyed = [await waiter.aio_run_no_wait({"key": f"k{i}:{u}"}) for i in range(2)]
        direct = [await waiter.aio_run_no_wait({"key": "approval"}) for _ in range(2)]

        async def all_wait() -> bool:
            hists = [await conn.history.read(r.workflow_run_id) for r in keyed + direct]
            return all(any(e.k == "wait_registered" for e in h.entries) for h in hists)

        await wait_until(all_wait, what="every run to wait")
        for i in range(2):
            await bide.event.aio_push(f"k{i}:{u}", {"i": i}, event_id=f"order-{u}")
            await bide.event.aio_send(direct[i].workflow_run_id, "approval", {"i": i}, event_id=f"appr-{u}")
        for i in range(2):
            assert await keyed[i].aio_result(timeout=20) == {"i": i}
            assert await direct[i].aio_result(timeout=20) == {"i": i}
        # The same push again is still the same event: stored once.
        again = await bide.event.aio_push(f"k1:{u}", {"i": 1}, event_id=f"order-{u}")
        info = await conn.js.stream_info(conn.layout.subjects.events_stream,
                                         subjects_filter=conn.layout.subjects.event(f"k1:{u}"))
        assert sum((info.state.subjects or {}).values()) == 1, (again, info.state.subjects)


def _junk(name: str) -> bytes:
    """A well-formed direct delivery, as whoever may deliver to runs may publish on any inbox."""
    return orjson.dumps({"v": 1, "source": "direct", "name": name, "event_id": "junk",
                         "at": "2026-01-01T00:00:00Z", "payload": {"junk": True}})


async def test_a_signal_published_first_with_the_routers_id_does_not_stand_for_the_event(bide: Bide) -> None:
    """The router's inbox id is `sig:<wait>/<cond>:<event seq>`: the wait id is in the history and the
    sequence is the stream's next. Taken first, the router's signal was dropped as a duplicate and its
    activation named the taken message: the run waited for ever, its registration deleted."""

    @bide.durable_task(name="TakenSignalWaiter")
    async def waiter(input: dict[str, Any], ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event(input["key"], "input.n == 1")

    conn = await bide._pool.get()
    s = conn.layout.subjects
    key = f"sig:{uuid.uuid4().hex[:8]}"
    async with running_worker(bide, [waiter]):
        ref = await waiter.aio_run_no_wait({"key": key})
        rid = ref.workflow_run_id

        async def waiting() -> list[Any]:
            return [e for e in (await conn.history.read(rid)).entries if e.k == "wait_registered"]

        await wait_until(waiting, what="the run to wait")
        wait_id = (await waiting())[-1].wait_id
        last = (await conn.js.stream_info(s.events_stream)).state.last_seq
        for seq in range(last + 1, last + 5):
            await conn.js.publish(s.inbox(rid), _junk("x"), headers={"Nats-Msg-Id": f"sig:{wait_id}/0:{seq}"})
        await bide.event.aio_push(key, {"n": 1})
        assert await ref.aio_result(timeout=20) == {"n": 1}


async def test_a_signal_published_first_with_a_childs_id_does_not_stand_for_its_outcome(bide: Bide) -> None:
    """A child's end goes to its parent's inbox as `child:<child run>`: taken first, the parent read the
    taken message as the child's outcome."""

    @bide.task(name="TakenChildLeaf")
    async def leaf(input: dict[str, Any], ctx: Any) -> Any:
        await asyncio.sleep(float(input["after"]))
        return {"leaf": input["v"]}

    @bide.durable_task(name="TakenChildParent")
    async def parent(input: dict[str, Any], ctx: DurableContext) -> Any:
        return await leaf.aio_run({"v": 7, "after": 2})

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [leaf, parent]):
        ref = await parent.aio_run_no_wait({})
        rid = ref.workflow_run_id

        async def spawned() -> list[str]:
            return [c for e in (await conn.history.read(rid)).entries if e.k == "children_spawned"
                    for c in e.run_ids]

        await wait_until(spawned, what="the child to be spawned")
        (child,) = await spawned()
        await conn.js.publish(s.inbox(rid), _junk(child), headers={"Nats-Msg-Id": f"child:{child}"})
        assert await ref.aio_result(timeout=20) == {"leaf": 7}


async def test_a_send_retried_after_its_signal_was_taken_is_not_delivered_again(bide: Bide) -> None:
    """The same `event_id` sent again is one delivery, also once the run has taken the first copy
    off its inbox: the history says which signal it took at that sequence."""

    @bide.durable_task(name="RetriedSendWaiter")
    async def waiter(input: dict[str, Any], ctx: DurableContext) -> Any:
        first = await ctx.aio_wait_for_event("approval")
        second = await ctx.aio_wait_for_event("approval")
        return [first, second]

    conn = await bide._pool.get()
    async with running_worker(bide, [waiter]):
        ref = await waiter.aio_run_no_wait({})
        rid = ref.workflow_run_id

        async def waits(n: int) -> bool:
            return sum(e.k == "wait_registered" for e in (await conn.history.read(rid)).entries) >= n

        await wait_until(lambda: waits(1), what="the first wait")
        await bide.event.aio_send(rid, "approval", {"n": 1}, event_id="once")
        await wait_until(lambda: waits(2), what="the second wait")

        async def inbox_empty() -> bool:
            info = await conn.js.stream_info(conn.layout.subjects.history_stream,
                                             subjects_filter=conn.layout.subjects.inbox(rid))
            return not (info.state.subjects or {})

        await wait_until(inbox_empty, what="the taken signal to leave the inbox")
        await bide.event.aio_send(rid, "approval", {"n": 1}, event_id="once")  # a retry: not a second event
        await bide.event.aio_send(rid, "approval", {"n": 2}, event_id="twice")
        assert await ref.aio_result(timeout=20) == [{"n": 1}, {"n": 2}]
