"""An ended run's inbox is drained even when the purge after its last turn failed (real nats-server).

The turn that takes a signal purges it from the inbox after its append. When that turn also
ends the run, nothing ever comes back to the run: a purge that failed (a node lost for a
moment) used to leave the taken signal stored until the run's retention ran out. The long
chaos run found one such message. Here the host's user may not purge at first (the server's
permissions, changed by a configuration reload), so the purge fails for sure; once it may,
the inbox must be empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actors.store.jetstream import api_request
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, EmptyModel
from tests.support import DenyingServer, running_worker, wait_until


async def _inbox_messages(bide: Bide, run_id: str) -> int:
    conn = await bide._pool.get()
    s = conn.layout.subjects
    info = await api_request(conn.nc, f"$JS.API.STREAM.INFO.{s.history_stream}",
                             {"subjects_filter": s.inbox(run_id)})
    subjects: dict[str, int] = info.get("state", {}).get("subjects") or {}
    return sum(subjects.values())


async def test_a_run_that_ends_in_the_turn_taking_a_signal_drains_its_inbox_though_that_purge_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with DenyingServer(tmp_path, "$JS.API.STREAM.PURGE.BIDE_HISTORY", monkeypatch) as server:
        bide = Bide(server.url, ack_wait=2.0)

        @bide.durable_task(name="DrainWaiter")
        async def waiter(input: EmptyModel, ctx: DurableContext) -> Any:
            return await ctx.aio_wait_for_event("drain:go")

        try:
            async with running_worker(bide, [waiter]):
                conn = await bide._pool.get()
                ref = await waiter.aio_run_no_wait(EmptyModel())
                run_id = ref.workflow_run_id

                async def registered() -> bool:
                    return any(e.k == "wait_registered" for e in (await conn.history.read(run_id)).entries)

                await wait_until(registered, what="the run to wait")
                await bide.event.aio_push("drain:go", {"go": 1})
                assert await ref.aio_result(timeout=20) == {"go": 1}
                # The signal was taken (the run ended with it) and could not be purged.
                assert await _inbox_messages(bide, run_id) == 1

                await server.allow()  # a reload changes a connected client's permissions

                async def drained() -> bool:
                    return await _inbox_messages(bide, run_id) == 0

                await wait_until(drained, timeout=20, what="the ended run's inbox to be drained")
        finally:
            await bide.aclose()


async def test_a_malformed_inbox_message_is_drained_with_the_run_that_ended_after_reading_it(
        nats_server: EmbeddedServer, bide: Bide) -> None:
    """A ``nats pub`` of garbage on a run's inbox is dropped (logged) by the turn that reads it; the run's
    end drains it with the rest, not leaving it stored until the run's retention runs out."""
    @bide.durable_task(name="GarbageWaiter")
    async def waiter(input: EmptyModel, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("garbage:never", timeout="3s")

    conn = await bide._pool.get()
    async with running_worker(bide, [waiter]):
        ref = await waiter.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id

        async def waiting() -> bool:
            return (await bide.runs.aio_get(run_id)).status.value == "waiting"

        await wait_until(waiting, what="the run to wait")
        await conn.publisher.publish(conn.layout.subjects.inbox(run_id), b"\x00 not a signal")
        assert await ref.aio_result(timeout=30) is None  # its wait timed out, after the garbage was stored

        async def drained() -> bool:
            return await _inbox_messages(bide, run_id) == 0

        await wait_until(drained, timeout=15, what="the ended run's inbox to be drained")
