"""Retention against a real nats-server: a live run never expires (DESIGN.md invariant 9); a finished
run is removed completely ``BIDE_HISTORY_RETENTION`` after it ended, and reads of it say so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.apps.http_api import create_app
from actors.engine.wire import (
    HDR_BIDE_KIND,
    HDR_SCHEDULE,
    HDR_SCHEDULE_TARGET,
    Activation,
    ErrorInfo,
    EventSignal,
    RunCompleted,
    RunFailed,
    RunRemoval,
    RunRemovals,
    RunStarted,
    WaitCondition,
    WaitRegistered,
    encode_activation,
    rfc3339,
    utcnow,
)
from actors.hosting.router import publish_registrations
from actors.store.jetstream import api_request, direct_get_subject
from actors.store.server import EmbeddedServer
from sdk import Bide, Context, DurableContext, EmptyModel, RunNotFoundError, RunStatus
from sdk._connection import Connection
from tests.e2e.test_cli_events import cli
from tests.support import DenyingServer, running_worker, wait_until


@pytest.fixture
async def short(nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Bide]:
    """A client (and the workers it starts) that keeps finished runs for 5 s."""
    monkeypatch.setenv("BIDE_HISTORY_RETENTION", "5s")
    client = Bide(nats_server.url, ack_wait=3.0)
    try:
        yield client
    finally:
        await client.aclose()


async def _subjects(conn: Connection, stream: str, subject_filter: str) -> dict[str, int]:
    info = await api_request(conn.nc, f"$JS.API.STREAM.INFO.{stream}", {"subjects_filter": subject_filter})
    subjects: dict[str, int] = info.get("state", {}).get("subjects") or {}
    return subjects


async def _leftovers(conn: Connection, run_id: str) -> dict[str, int]:
    """Whatever of the run is still stored: history, inbox, counters, schedules and activations."""
    s = conn.layout.subjects
    found: dict[str, int] = {}
    for stream, subject in ((s.history_stream, s.history(run_id)), (s.history_stream, s.inbox(run_id)),
                            (s.counters_stream, s.run_counters(run_id)), (s.work_stream, s.run_timers(run_id)),
                            (s.work_stream, s.run_work(run_id))):
        found |= await _subjects(conn, stream, subject)
    return found


async def _removals_scheduled(conn: Connection, run_id: str) -> int:
    """How many pending removal schedules (batches) name ``run_id``."""
    s = conn.layout.subjects
    msgs = await direct_get_subject(conn.nc, s.work_stream, s.removals_timer("*"))
    return sum(run_id in RunRemovals.model_validate_json(m.data).run_ids for m in msgs)


async def _removal_handled(conn: Connection, run_id: str) -> None:
    """Until the removal message for ``run_id`` has been taken and acked (a work queue drops it then)."""
    s = conn.layout.subjects

    async def gone() -> bool:
        return not await _subjects(conn, s.work_stream, s.reap(run_id))

    await wait_until(gone, timeout=15, what=f"the removal of {run_id} to be handled")


async def _publish_removal(conn: Connection, run_id: str) -> None:
    """A removal message falling due now, as the run's schedule would publish it."""
    removal = RunRemoval(run_id=run_id).model_dump_json().encode()
    await conn.publisher.publish(conn.layout.subjects.reap(run_id), removal)


async def test_history_and_counter_streams_have_no_max_age(nats_server: EmbeddedServer, bide: Bide) -> None:
    conn = await bide._pool.get()
    s = conn.layout.subjects
    # A stream made by an older version (30 days) loses its max age when the next host starts
    # (hosts own the streams' configuration; a client leaves streams that exist as they are).
    await api_request(conn.nc, f"$JS.API.STREAM.UPDATE.{s.history_stream}",
                      {**(await api_request(conn.nc, f"$JS.API.STREAM.INFO.{s.history_stream}", {}))["config"],
                       "max_age": 30 * 86400 * 10**9})
    async with Bide(nats_server.url) as client:
        await client._pool.get()
        info = await api_request(conn.nc, f"$JS.API.STREAM.INFO.{s.history_stream}", {})
        assert info["config"]["max_age"] == 30 * 86400 * 10**9

    @bide.task(name="RetNoop")
    async def noop(input: EmptyModel, ctx: Context) -> None:
        return None

    async with running_worker(bide, [noop]):  # a host's start-up creates or updates every stream
        for stream in (s.history_stream, s.counters_stream):
            info = await api_request(conn.nc, f"$JS.API.STREAM.INFO.{stream}", {})
            assert info["config"]["max_age"] == 0, stream


async def test_a_run_sleeping_past_the_retention_completes_then_is_removed_completely(
        nats_server: EmbeddedServer, short: Bide) -> None:
    @short.task(name="RetChild")
    async def child(input: EmptyModel, ctx: Context) -> int:
        return 21

    @short.durable_task(name="RetSleeper")
    async def sleeper(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        got = await child.aio_run(EmptyModel())  # a child: the run gets a batch counter
        missed = await ctx.aio_wait_for_event("ret:never", timeout="1s")  # a wait registration
        await ctx.aio_sleep_for(timedelta(seconds=7))  # longer than the retention
        return {"twice": got * 2, "missed": missed}

    conn = await short._pool.get()
    s = conn.layout.subjects
    async with running_worker(short, [child, sleeper]):
        ref = await sleeper.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id
        # 8 s alone; a wide deadline for a loaded machine (see docs/architecture.md, "A waiter that
        # missed a run's end": this test found that bug).
        assert await ref.aio_result(timeout=90) == {"twice": 42, "missed": None}
        child_id = f"{run_id}-0-0"
        assert await _subjects(conn, s.counters_stream, s.run_counters(run_id))  # there is something to remove
        # Left behind, as a late signal or a crashed host can leave them: an inbox message and a timer.
        late = EventSignal(source="event", name="late", payload=1, event_id="late-1", at=utcnow())
        await conn.publisher.publish(s.inbox(run_id), late.model_dump_json().encode())
        await conn.publisher.publish(s.timer(run_id, 99), b"{}", {
            HDR_SCHEDULE: f"@at {rfc3339(utcnow() + timedelta(days=3))}",
            HDR_SCHEDULE_TARGET: s.work("RetSleeper", run_id)})
        assert set(await _leftovers(conn, run_id)) >= {s.history(run_id), s.inbox(run_id), s.timer(run_id, 99)}

        async def removed() -> bool:
            return not await _leftovers(conn, run_id) and not await _leftovers(conn, child_id)

        await wait_until(removed, timeout=20, interval=0.2, what=f"run {run_id} and its child to be removed")
        assert not await _subjects(conn, s.events_stream, s.waits_all)  # no registration is left either

        with pytest.raises(RunNotFoundError) as err:
            await short.runs.aio_get(run_id)
        assert err.value.run_id == run_id
        assert str(err.value) == (
            f"no run with id {run_id!r}: it never existed, or it finished and was removed after the history "
            "retention period (BIDE_HISTORY_RETENTION: 5s)")

        out = await cli("runs", "show", run_id, url=nats_server.url)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr == f"bide: error: {err.value}\n"

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(short, None)),
                                     base_url="http://bide.test") as api:
            resp = await api.get(f"/api/v1/runs/{run_id}")
            assert resp.status_code == 404 and resp.json() == {"detail": str(err.value)}

        # A removal that falls due again (a re-fired schedule, a redelivery) is harmless.
        await _publish_removal(conn, run_id)
        await _removal_handled(conn, run_id)
        assert not await _leftovers(conn, run_id)


async def test_a_removal_for_a_live_run_changes_nothing(short: Bide) -> None:
    @short.durable_task(name="RetWaiter")
    async def waiter(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        return {"got": await ctx.aio_wait_for_event("ret:go")}

    conn = await short._pool.get()
    async with running_worker(short, [waiter]):
        ref = await waiter.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id

        async def waiting() -> bool:
            return (await short.runs.aio_get(run_id)).status is RunStatus.WAITING

        await wait_until(waiting, what=f"run {run_id} to wait")
        before = await short.runs.aio_history(run_id)
        await _publish_removal(conn, run_id)  # early, stray or forged: the run has not ended
        await _removal_handled(conn, run_id)
        after = await short.runs.aio_history(run_id)
        assert after.entries == before.entries and after.last_seq == before.last_seq

        await conn.publisher.publish(conn.layout.subjects.reap(run_id), b'{"run": 1}')  # malformed: dropped
        await _removal_handled(conn, run_id)
        assert (await short.runs.aio_history(run_id)).last_seq == before.last_seq

        await short.event.aio_push("ret:go", {"ok": True})
        assert await ref.aio_result(timeout=15) == {"got": {"ok": True}}


async def test_a_removal_before_the_retention_has_passed_is_put_off(bide: Bide) -> None:
    @bide.task(name="RetQuick")
    async def quick(input: EmptyModel, ctx: Context) -> int:
        return 7

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [quick]):
        ref = await quick.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id
        assert await ref.aio_result(timeout=15) == 7
        # Ending it scheduled its removal for 30 days (the default) after its end (just after the
        # result was sent: wait for it).
        async def scheduled() -> bool:
            return await _removals_scheduled(conn, run_id) == 1

        await wait_until(scheduled, what="the removal to be scheduled")
        # A removal falling due now (in the form earlier versions scheduled, still carried out).
        await _publish_removal(conn, run_id)
        await _removal_handled(conn, run_id)
        assert (await bide.runs.aio_get(run_id)).status is RunStatus.COMPLETED
        # Put off: scheduled again for its own due time, and the first schedule is still pending.
        assert await _removals_scheduled(conn, run_id) == 2
        assert not await _subjects(conn, s.work_stream, s.reap_timer(run_id))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(bide, None)),
                                     base_url="http://bide.test") as api:
            resp = await api.get(f"/api/v1/runs/{run_id}")
            assert resp.status_code == 200, resp.text
            assert resp.json() | {"started_at": "", "trace_id": ""} == {
                "run_id": run_id, "task": "RetQuick", "status": "completed", "started_at": "", "result": 7,
                "error": None, "entries": 3, "trace_id": ""}


async def test_the_removal_withdraws_the_waits_a_dead_host_left_registered(short: Bide) -> None:
    @short.durable_task(name="RetLeft")
    async def left(input: EmptyModel, ctx: DurableContext) -> None:
        await ctx.aio_wait_for_event("ret:left")

    conn = await short._pool.get()
    s = conn.layout.subjects
    run_id = "ret-left-1"
    ended = utcnow() - timedelta(seconds=10)
    wait = WaitRegistered(pos=0, wait_id=f"{run_id}:0", label="ret:left", args_hash="", at=ended,
                          groups=[[WaitCondition(kind="event", key="ret:left", event_key="ret:left")]])
    # What a host that died right after ending the run leaves: the end is in the history, but the
    # wait it was in is still registered with the router (and no removal was scheduled).
    await conn.history.append(run_id, [
        RunStarted(run_id=run_id, task="RetLeft", durable=True, input={}, at=ended), wait,
        RunFailed(error=ErrorInfo(type="Crash", message="host died", traceback=""), at=ended)], 0)
    await publish_registrations(conn.publisher, conn.layout, wait, run_id, "RetLeft", {}, "register")
    async with running_worker(short, [left]):  # the event router and the reaper
        await _publish_removal(conn, run_id)

        async def removed() -> bool:
            return not await _leftovers(conn, run_id) and not await _subjects(conn, s.events_stream, s.waits_all)

        await wait_until(removed, timeout=15, interval=0.2, what=f"run {run_id} and its registration to be removed")


async def test_a_run_whose_host_died_before_scheduling_its_removal_is_removed_at_its_next_activation(
        short: Bide) -> None:
    @short.task(name="RetEnded")
    async def ended(input: EmptyModel, ctx: Context) -> int:
        return 1

    conn = await short._pool.get()
    s = conn.layout.subjects
    run_id = "ret-ended-1"
    at = utcnow() - timedelta(seconds=10)
    # What a host that died right after appending the end leaves: a finished run, no removal scheduled.
    await conn.history.append(run_id, [RunStarted(run_id=run_id, task="RetEnded", durable=False, input={}, at=at),
                                       RunCompleted(result=1, at=at)], 0)
    async with running_worker(short, [ended]):
        # Its activation comes back (unacked by the dead host): the run is finished, its removal is scheduled.
        await conn.publisher.publish(s.queue("RetEnded", run_id),
                                     encode_activation(Activation(run_id=run_id, task="RetEnded", kind="start")),
                                     {HDR_BIDE_KIND: "start"})

        async def removed() -> bool:
            return not await _leftovers(conn, run_id)

        await wait_until(removed, timeout=15, interval=0.2, what=f"run {run_id} to be removed")


async def test_runs_that_end_together_share_their_removal_schedules_and_each_is_removed(short: Bide) -> None:
    """Removals are group-committed: the server holds a schedule per batch of ended runs, not per run.

    The run ids include ``@reaper`` and ``%reaper``: no run's removal (which purges that run's
    schedules) may reach a batch's schedule, on which other runs' removals wait.
    """
    @short.task(name="RetMany")
    async def many(input: EmptyModel, ctx: Context) -> int:
        return 1

    conn = await short._pool.get()
    s = conn.layout.subjects
    async with running_worker(short, [many]):
        run_ids = ["@reaper", "%reaper", *(f"ret-many-{i}" for i in range(298))]
        refs = await asyncio.gather(*(many.aio_run_no_wait(EmptyModel(), run_id=r) for r in run_ids))
        assert await asyncio.gather(*(ref.aio_result(timeout=60) for ref in refs)) == [1] * len(run_ids)

        async def all_scheduled() -> bool:
            msgs = await direct_get_subject(conn.nc, s.work_stream, s.removals_timer("*"))
            named = [r for m in msgs for r in RunRemovals.model_validate_json(m.data).run_ids]
            return set(named) >= set(run_ids)

        await wait_until(all_scheduled, timeout=30, what="every removal to be scheduled")
        schedules = await _subjects(conn, s.work_stream, s.removals_timer("*"))
        assert len(schedules) < len(run_ids) / 4, f"{len(schedules)} removal schedules for {len(run_ids)} runs"

        async def all_removed() -> bool:
            for r in run_ids:
                if await _leftovers(conn, r):
                    return False
            return not await _subjects(conn, s.work_stream, s.removals_timer("*")) and \
                not await _subjects(conn, s.work_stream, s.reap_all)

        await wait_until(all_removed, timeout=60, interval=0.5, what="every run and every removal schedule to go")
        for r in ("@reaper", "%reaper", "ret-many-0"):
            with pytest.raises(RunNotFoundError):
                await short.runs.aio_get(r)


async def test_a_removal_whose_schedule_could_not_be_stored_is_scheduled_once_it_can_be(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's failed publish fails every turn in it, and those turns are retried: no removal is dropped.

    The host's user may not publish removal schedules at first (the server's permissions); a
    configuration reload (SIGHUP) then allows it.
    """
    with DenyingServer(tmp_path, "bide.timers.%reaper.>", monkeypatch) as server:
        bide = Bide(server.url, ack_wait=3.0)

        @bide.task(name="RetDenied")
        async def denied(input: EmptyModel, ctx: Context) -> int:
            return 5

        try:
            async with running_worker(bide, [denied]):
                conn = await bide._pool.get()
                ref = await denied.aio_run_no_wait(EmptyModel())
                assert await ref.aio_result(timeout=30) == 5  # the end is appended before its removal
                assert await _removals_scheduled(conn, ref.workflow_run_id) == 0
                await server.allow()

                async def scheduled() -> bool:
                    return await _removals_scheduled(conn, ref.workflow_run_id) >= 1

                await wait_until(scheduled, timeout=90, what="the run's removal to be scheduled after all")
        finally:
            await bide.aclose()
