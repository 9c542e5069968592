"""A run started with a new id is recorded by the host that takes it: until then it is queued.

The starter of a run whose id it made at random stops once the start activation is stored
(``new_id`` in ``actors.store.protocol.start_run``): its history is empty until a host records
the start. Every reader finds such a run on the queue and reads it as its start alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from actors.engine.wire import RunCancelled, RunStarted
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, RunAlreadyExistsError, RunCancelledError, RunStatus
from tests.e2e.test_cli_events import cli
from tests.integration.test_http_api import client_for
from tests.support import running_worker


def _define(bide: Bide) -> Any:
    @bide.durable_task(name="QueuedWaiter")
    async def waiter(input: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
        got = await ctx.aio_wait_for_event("go")
        return {"n": input["n"], "got": got}

    return waiter


async def test_a_run_no_host_has_taken_is_found_as_queued_by_every_reader(nats_server: EmbeddedServer,
                                                                         bide: Bide) -> None:
    waiter = _define(bide)
    ref = await waiter.aio_run_no_wait({"n": 7})  # no worker: nobody takes it
    run_id = ref.workflow_run_id
    conn = await bide._pool.get()
    assert (await conn.history.read(run_id)).entries == []  # the starter wrote no entry

    info = await bide.runs.aio_get(run_id)
    assert (info.status, info.task, info.input) == (RunStatus.QUEUED, "QueuedWaiter", {"n": 7})
    hist = await bide.runs.aio_history(run_id)
    assert [type(e) for e in hist.entries] == [RunStarted]
    async with client_for(bide) as api:
        resp = await api.get(f"/api/v1/runs/{run_id}")
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "queued"
    out = await cli("runs", "show", run_id, url=nats_server.url)
    assert out.returncode == 0 and "queued" in out.stdout, out.stdout + out.stderr
    with pytest.raises(TimeoutError):  # waiting for it, not "no run with that id"
        await ref.aio_result(timeout=1.5)

    # Deliveries and cancels reach queued runs: they wait on the inbox for the host that takes the run.
    other = await waiter.aio_run_no_wait({"n": 8})
    await bide.event.aio_send(other.workflow_run_id, "go", {"ok": True})
    assert await bide.runs.aio_cancel(run_id, "not needed") is True
    async with running_worker(bide, [waiter]):
        with pytest.raises(RunCancelledError, match="not needed"):
            await ref.aio_result(timeout=20)
        assert await other.aio_result(timeout=20) == {"n": 8, "got": {"ok": True}}
    hist = await bide.runs.aio_history(run_id)
    assert sum(isinstance(e, RunStarted) for e in hist.entries) == 1 and isinstance(hist.entries[-1], RunCancelled)


async def test_the_host_records_the_start_and_the_run_goes_on(bide: Bide) -> None:
    waiter = _define(bide)
    refs = [await waiter.aio_run_no_wait({"n": n}) for n in range(20)]
    async with running_worker(bide, [waiter]):
        for ref in refs:
            await bide.event.aio_send(ref.workflow_run_id, "go", {"n": 1})
        results = await asyncio.gather(*(r.aio_result(timeout=30) for r in refs))
    assert [r["n"] for r in results] == list(range(20))
    for ref in refs:
        hist = await bide.runs.aio_history(ref.workflow_run_id)
        assert isinstance(hist.entries[0], RunStarted) and sum(isinstance(e, RunStarted) for e in hist.entries) == 1


async def test_a_run_id_the_caller_chose_is_recorded_by_its_starter(bide: Bide) -> None:
    """Another start could hold a chosen id: its starter records the start, and refuses another request."""
    waiter = _define(bide)
    await waiter.aio_run_no_wait({"n": 1}, run_id="queued-chosen-id")
    conn = await bide._pool.get()
    assert [type(e) for e in (await conn.history.read("queued-chosen-id")).entries] == [RunStarted]
    with pytest.raises(RunAlreadyExistsError):
        await waiter.aio_run_no_wait({"n": 2}, run_id="queued-chosen-id")
