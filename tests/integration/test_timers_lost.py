"""Wake-ups whose timers the server lost are armed again by the hosts (the wake-up check).

A run's sleep, a wait's timeout and a retry's backoff are scheduled messages in the work
stream, which nats-server makes accept rollup headers (it has schedules). Its messages go
with it when an operator deletes or purges it (`nats stream rm BIDE_WORK`, `nats stream purge`),
and with a rollup anyone who may publish there sends (`nats pub bide.work.x.y -H
'Nats-Rollup: all'` on a server without permissions, as `bide dev` starts; or `-H
'Nats-Rollup: sub'` on a timer's own subject, which replaces the schedule with a plain
message). The history still says what each parked run waits for, so the hosts find every
wake-up overdue and arm it again.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import nats
import pytest

from actors.engine.wire import Subjects
from actors.store.jetstream import api_request, leader_next
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, RunNotFoundError, SleepCondition, UserEventCondition
from tests.support import running_worker, wait_until

S = Subjects()


async def _parked(client: Bide, run_id: str, kind: str) -> bool:
    hist = await client.runs.aio_history(run_id)
    return bool(hist.entries) and hist.entries[-1].k == kind


async def _lose_the_timers(nc: Any, how: str, timers: list[str]) -> None:
    if how == "replaced":
        # A plain message on each timer's own subject with a rollup of that subject: the schedule is gone.
        for subject in timers:
            ack = await nc.request(subject, b"not a schedule", headers={"Nats-Rollup": "sub"}, timeout=5)
            assert b'"error"' not in ack.data, ack.data
    elif how == "deleted":
        await api_request(nc, f"$JS.API.STREAM.DELETE.{S.work_stream}", {})
    elif how == "purged, check's marker taken":
        # A message with no expiry on the subject that says which host checks this round.
        await nc.publish(S.wakeup_pass, b"mine")
        await api_request(nc, f"$JS.API.STREAM.PURGE.{S.work_stream}", {})
    elif how == "purged":
        await api_request(nc, f"$JS.API.STREAM.PURGE.{S.work_stream}", {})
    else:
        # A plain publish, as `nats pub` sends it: the server takes the rollup (the stream has schedules).
        ack = await nc.request(S.work("NoSuchTask", "someone"), b"{}", headers={"Nats-Rollup": "all"}, timeout=5)
        assert b'"error"' not in ack.data, ack.data


@pytest.mark.parametrize("how", ["deleted", "purged", "rolled up", "replaced", "purged, check's marker taken"])
async def test_a_sleep_a_waits_timeout_and_a_retry_whose_timers_were_lost_still_wake(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch, how: str,
) -> None:
    monkeypatch.setenv("BIDE_STREAM_CHECK_INTERVAL", "0.3")
    monkeypatch.setenv("BIDE_WAKEUP_CHECK_INTERVAL", "1")
    client = Bide(nats_server.url, ack_wait=3.0)

    @client.durable_task(name="LostSleep")
    async def sleeper(input: dict[str, Any], ctx: DurableContext) -> str:
        await ctx.aio_sleep_for(timedelta(seconds=10))  # its timer fires 5 s early: well after the loss
        return "woke"

    @client.durable_task(name="LostTimeout")
    async def waiter(input: dict[str, Any], ctx: DurableContext) -> str:
        got = await ctx.aio_wait_for_event("never:comes", timeout=timedelta(seconds=10))
        return "timed out" if got is None else "an event?"

    attempts: list[int] = []

    @client.durable_task(name="LostRetry", retries=2, backoff_factor=10)
    async def flaky(input: dict[str, Any], ctx: DurableContext) -> str:
        attempts.append(ctx.retry_count)
        if ctx.retry_count < 2:
            raise RuntimeError("not yet")
        return "third time"

    nc = await nats.connect(nats_server.url)
    try:
        async with running_worker(client, [sleeper, waiter, flaky]) as worker:
            slept = await sleeper.aio_run_no_wait({})
            waited = await waiter.aio_run_no_wait({})
            retried = await flaky.aio_run_no_wait({})

            async def all_parked() -> bool:
                # The retry's second backoff (10 s) is a timer; the first (1 s) may wait on the host.
                return (await _parked(client, slept.workflow_run_id, "sleep_scheduled")
                        and await _parked(client, waited.workflow_run_id, "wait_registered")
                        and len(attempts) == 2 and await _parked(client, retried.workflow_run_id, "attempt_failed"))

            await wait_until(all_parked, timeout=15, what="the three runs parked on their timers")
            timers = [S.timer(slept.workflow_run_id, 0), S.timer(waited.workflow_run_id, 0),
                      S.timer(retried.workflow_run_id, "retry2")]
            for subject in timers:  # not fired yet: what is lost below is each run's only wake-up
                assert await leader_next(nc, S.work_stream, subject) is not None, subject
            await _lose_the_timers(nc, how, timers)

            async def work_stream_back() -> bool:
                names = (await api_request(nc, "$JS.API.STREAM.NAMES", {}))["streams"] or []
                return S.work_stream in names

            await wait_until(work_stream_back, timeout=10, what="the work stream created again")
            assert await slept.aio_result(timeout=30) == "woke"
            assert await waited.aio_result(timeout=30) == "timed out"
            assert await retried.aio_result(timeout=30) == "third time"
            assert worker.host.wakeups.rearmed == 3
    finally:
        await nc.close()
        await client.aclose()


async def test_wake_ups_on_their_way_are_not_armed_again(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Timers that fire, a step that runs past its sleep's wake time with its activation held,
    # and a wait whose sleep is over while it waits for its event: nothing is lost, nothing re-armed.
    monkeypatch.setenv("BIDE_WAKEUP_CHECK_INTERVAL", "1")
    client = Bide(nats_server.url, ack_wait=3.0)
    release = asyncio.Event()

    @client.durable_task(name="OnTime")
    async def sleeper(input: dict[str, Any], ctx: DurableContext) -> str:
        await ctx.aio_sleep_for(timedelta(seconds=input["s"]))
        return "woke"

    @client.durable_task(name="LongStep")
    async def long_step(input: dict[str, Any], ctx: DurableContext) -> str:
        await ctx.aio_sleep_for(timedelta(seconds=1))

        async def step() -> str:
            await release.wait()
            return "done"

        return await ctx.memo(step)

    @client.durable_task(name="SleepThenEvent")
    async def sleep_then_event(input: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
        return await ctx.aio_wait_for("both", SleepCondition(timedelta(seconds=1)),
                                      UserEventCondition(event_key="lost:late"))

    async with running_worker(client, [sleeper, long_step, sleep_then_event]) as worker:
        check = worker.host.wakeups
        sleepers = [await sleeper.aio_run_no_wait({"s": s}) for s in (1, 2, 3)]
        held = await long_step.aio_run_no_wait({})
        both = await sleep_then_event.aio_run_no_wait({})
        assert [await r.aio_result(timeout=20) for r in sleepers] == ["woke"] * 3
        passes = check.passes
        await wait_until(lambda: check.passes >= passes + 3, timeout=20, what="three more passes of the check")
        release.set()
        assert await held.aio_result(timeout=20) == "done"
        await client.event.aio_push("lost:late", {"ok": 1})
        assert len(await both.aio_result(timeout=20)) == 2
        # The wait whose sleep was over may get its timer once more (nothing shows it came), never more.
        assert check.rearmed <= 1
    await client.aclose()


async def test_runs_whose_start_activations_the_queue_lost_still_run(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A run started with its own id (and a child) has its start in the history before any host
    # takes it; `nats stream purge BIDE_QUEUE` while it is queued left it never running.
    monkeypatch.setenv("BIDE_WAKEUP_CHECK_INTERVAL", "1")
    client = Bide(nats_server.url, ack_wait=3.0)

    @client.task(name="QueuedChild")
    async def child(input: dict[str, Any], ctx: Any) -> str:
        return f"child of {input['of']}"

    @client.durable_task(name="QueuedParent")
    async def parent(input: dict[str, Any], ctx: DurableContext) -> str:
        return str(await child.aio_run({"of": "parent"}))

    @client.task(name="OnlyWhenServed")
    async def queued(input: dict[str, Any], ctx: Any) -> str:
        return "ran"

    nc = await nats.connect(nats_server.url)
    try:
        # The parent's host serves no QueuedChild: its child waits on the queue, as the other run does.
        async with running_worker(client, [parent], name="parents-only") as first:
            ref = await parent.aio_run_no_wait({})
            waiting = await queued.aio_run_no_wait({}, run_id="chosen-id-1")

            async def child_queued() -> bool:
                hist = await client.runs.aio_history(ref.workflow_run_id)
                return any(e.k == "children_spawned" for e in hist.entries)

            await wait_until(child_queued, timeout=15, what="the child started and queued")
            await api_request(nc, f"$JS.API.STREAM.PURGE.{S.queue_stream}", {})
            async with running_worker(client, [child, queued], name="the-rest") as rest:
                assert await waiting.aio_result(timeout=30) == "ran"
                assert await ref.aio_result(timeout=30) == "child of parent"
                assert first.host.wakeups.rearmed + rest.host.wakeups.rearmed == 2  # whichever held the rounds
    finally:
        await nc.close()
        await client.aclose()


async def test_a_finished_run_whose_removal_the_work_stream_lost_is_removed_all_the_same(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A run's removal (retention) is a scheduled message too: lost with the work stream, the
    # finished run was kept for ever.
    monkeypatch.setenv("BIDE_WAKEUP_CHECK_INTERVAL", "1")
    monkeypatch.setenv("BIDE_HISTORY_RETENTION", "2")
    client = Bide(nats_server.url, ack_wait=3.0)

    @client.task(name="Finishes")
    async def finishes(input: dict[str, Any], ctx: Any) -> str:
        return "done"

    nc = await nats.connect(nats_server.url)
    try:
        async with running_worker(client, [finishes]) as worker:
            ref = await finishes.aio_run_no_wait({})
            assert await ref.aio_result(timeout=15) == "done"

            async def removal_scheduled() -> bool:
                info = await api_request(nc, f"$JS.API.STREAM.INFO.{S.work_stream}",
                                         {"subjects_filter": S.removals_timer("*")})
                return int(info["state"].get("num_subjects", 0)) > 0

            await wait_until(removal_scheduled, timeout=10, what="the run's removal scheduled")
            await api_request(nc, f"$JS.API.STREAM.PURGE.{S.work_stream}", {})

            async def removed() -> bool:
                try:
                    await client.runs.aio_history(ref.workflow_run_id)
                except RunNotFoundError:
                    return True
                return False

            await wait_until(removed, timeout=20, what="the finished run removed though its removal was lost")
            assert worker.host.wakeups.removed == 1
    finally:
        await nc.close()
        await client.aclose()


async def test_a_run_whose_index_record_was_lost_gets_it_back_when_it_waits_on_a_timer(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The check finds runs through their live records, which starters write best effort: the
    # long chaos run (node kills, then work stream purges) left 28 sleeping runs with none, never
    # found. A run that parks on a timer writes its record again if it has none.
    monkeypatch.setenv("BIDE_WAKEUP_CHECK_INTERVAL", "1")
    client = Bide(nats_server.url, ack_wait=3.0)

    @client.durable_task(name="GoAheadThenSleep")
    async def go_then_sleep(input: dict[str, Any], ctx: DurableContext) -> str:
        await ctx.aio_wait_for_event("go")
        await ctx.aio_sleep_for(timedelta(seconds=3))
        return "woke"

    nc = await nats.connect(nats_server.url)
    try:
        async with running_worker(client, [go_then_sleep]):
            ref = await go_then_sleep.aio_run_no_wait({})
            rid = ref.workflow_run_id
            await wait_until(lambda: _parked(client, rid, "wait_registered"), timeout=15, what="the run waiting")
            # Its index record lost (as a write during an outage is).
            await api_request(nc, f"$JS.API.STREAM.PURGE.{S.runs_stream}",
                              {"filter": S.run_records("GoAheadThenSleep", rid)})
            await client.event.aio_send(rid, "go", {})
            await wait_until(lambda: _parked(client, rid, "sleep_scheduled"), timeout=15, what="the run asleep")

            async def listed() -> bool:
                return rid in {r.run_id for r in await client.runs.aio_list(status="waiting")}

            await wait_until(listed, timeout=10, what="the run's live record written again")
            await api_request(nc, f"$JS.API.STREAM.PURGE.{S.work_stream}", {})
            assert await ref.aio_result(timeout=30) == "woke"
    finally:
        await nc.close()
        await client.aclose()
