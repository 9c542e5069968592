"""A message on a history subject that is not a Bide history message (garbage from a `nats pub`).

Only hosts may publish there, but when one does: listing runs goes on for every other run, the
run's activations are dropped with an error naming the run and the message's sequence (no
endless redelivery), and reading that run says which message is bad.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from actors.engine.wire import Activation, encode_activation
from actors.store.history import CorruptHistoryError
from sdk import Bide, DurableContext, EmptyModel
from tests.support import running_worker, wait_until


async def test_an_unreadable_history_message_is_named_and_wedges_nothing(
        bide: Bide, caplog: pytest.LogCaptureFixture) -> None:
    @bide.durable_task(name="UnreadableWaiter")
    async def waiter(input: EmptyModel, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("go")

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [waiter]):
        bad, good = await waiter.aio_run_no_wait(EmptyModel()), await waiter.aio_run_no_wait(EmptyModel())

        async def both_wait() -> bool:
            hists = [await conn.history.read(r.workflow_run_id) for r in (bad, good)]
            return all(any(e.k == "wait_registered" for e in h.entries) for h in hists)

        await wait_until(both_wait, what="both runs to wait")
        ack = await conn.js.publish(s.history(bad.workflow_run_id), b"\xffgarbage")

        # Listing goes on, both runs in it.
        listed = await bide.runs.aio_list(task="UnreadableWaiter")
        assert {r.run_id for r in listed.runs} == {bad.workflow_run_id, good.workflow_run_id}
        # Reading the run names the run and the message.
        with pytest.raises(CorruptHistoryError, match=rf"run {bad.workflow_run_id}: .* sequence {ack.seq} "):
            await conn.history.read(bad.workflow_run_id)

        # A turn of that run is dropped once, with the error; it is not redelivered for ever.
        caplog.set_level(logging.ERROR, logger="bide.host")
        with pytest.raises(CorruptHistoryError, match=bad.workflow_run_id):  # a send says why it cannot
            await bide.event.aio_send(bad.workflow_run_id, "go", {"ok": 1})
        await conn.js.publish(s.queue("UnreadableWaiter", bad.workflow_run_id), encode_activation(
            Activation(run_id=bad.workflow_run_id, task="UnreadableWaiter", kind="signal")))

        async def dropped() -> bool:
            info = await conn.js.consumer_info(s.queue_stream, s.consumer_name("UnreadableWaiter"))
            return info.num_pending == 0 and info.num_ack_pending == 0 and \
                any(f"sequence {ack.seq} " in r.getMessage() for r in caplog.records)

        await wait_until(dropped, timeout=15, what="the unreadable run's activation to be dropped with an error")
        info = await conn.js.consumer_info(s.queue_stream, s.consumer_name("UnreadableWaiter"))
        assert info.num_redelivered == 0, info
        # The other run goes on.
        await bide.event.aio_send(good.workflow_run_id, "go", {"ok": 2})
        assert await good.aio_result(timeout=20) == {"ok": 2}
