"""Run states, recorded time, absolute sleeps, and timers that fire late or twice."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from actors.engine.wire import Activation, encode_activation
from sdk import Bide, DurableContext, EmptyModel, RunStatus
from tests.support import running_worker, wait_until


def _define(bide: Bide) -> tuple:
    @bide.durable_task(name="LifecycleSleep")
    async def sleeper(input: EmptyModel, ctx: DurableContext) -> dict[str, str]:
        first = await ctx.aio_now()
        await ctx.aio_sleep_for(timedelta(seconds=1.5))
        again = await ctx.aio_now()
        return {"first": first.isoformat(), "again": again.isoformat()}

    @bide.durable_task(name="LifecycleUntil")
    async def until(input: dict, ctx: DurableContext) -> float:
        res = await ctx.aio_sleep_until(datetime.fromisoformat(input["at"]))
        return res.duration.total_seconds()

    return sleeper, until


async def test_states_go_queued_waiting_completed(bide: Bide) -> None:
    sleeper, until = _define(bide)
    ref = await sleeper.aio_run_no_wait(EmptyModel())
    # No worker yet: the run exists durably and is queued.
    assert (await bide.runs.aio_get(ref.workflow_run_id)).status is RunStatus.QUEUED
    async with running_worker(bide, [sleeper, until]):
        async def status_is(s: RunStatus) -> bool:
            return (await bide.runs.aio_get(ref.workflow_run_id)).status is s

        await wait_until(lambda: status_is(RunStatus.WAITING), timeout=10, what="the run to be waiting")
        result = await ref.aio_result(timeout=15)
        info = await bide.runs.aio_get(ref.workflow_run_id)
        assert info.status is RunStatus.COMPLETED
        assert info.result == result
        # aio_now is recorded: the value from before the eviction is the one replayed after it.
        hist = await bide.runs.aio_history(ref.workflow_run_id)
        recorded = [e.at for e in hist.entries if e.k == "now"]
        assert len(recorded) == 2
        assert datetime.fromisoformat(result["first"]) == recorded[0]
        assert datetime.fromisoformat(result["again"]) - datetime.fromisoformat(result["first"]) >= timedelta(
            seconds=1.5
        )


async def test_sleep_until_an_absolute_time(bide: Bide) -> None:
    sleeper, until = _define(bide)
    async with running_worker(bide, [sleeper, until]):
        at = datetime.now(UTC) + timedelta(seconds=2)
        slept = await until.aio_run({"at": at.isoformat()}, timeout=15)
        assert datetime.now(UTC) >= at
        assert 1.0 < slept <= 2.0


async def test_duplicate_and_late_timers_do_no_harm(bide: Bide) -> None:
    sleeper, until = _define(bide)
    conn = await bide._pool.get()
    async with running_worker(bide, [sleeper, until]):
        ref = await sleeper.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id

        async def sleeping() -> bool:
            return any(e.k == "sleep_scheduled" for e in (await bide.runs.aio_history(run_id)).entries)

        await wait_until(sleeping, timeout=10, what="the run to sleep")
        subject = conn.layout.subjects.work("LifecycleSleep", run_id)
        early = Activation(run_id=run_id, task="LifecycleSleep", kind="timer", pos=1)
        # A timer that fires twice, early: the run replays, finds its deadline ahead, and waits
        # out the rest of it (which is shorter than WOKEN_MAX) on its host; the other finds it ended.
        for _ in range(2):
            await conn.js.publish(subject, encode_activation(early))
        await ref.aio_result(timeout=15)

        async def consumed() -> bool:
            info = await conn.js.consumer_info(conn.layout.subjects.work_stream,
                                               conn.layout.subjects.consumer_name("LifecycleSleep"))
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_until(consumed, timeout=10, what="the early timers to be consumed")
        # A late duplicate after the run finished is acknowledged and changes nothing.
        before = (await bide.runs.aio_history(run_id)).entries
        await conn.js.publish(subject, encode_activation(early))
        await wait_until(consumed, timeout=10, what="the late timer to be consumed")
        after = (await bide.runs.aio_history(run_id)).entries
        assert [e.k for e in after] == [e.k for e in before]
        kinds = [(e.k, getattr(e, "pos", None)) for e in after]
        assert kinds.count(("sleep_scheduled", 1)) == 1
        assert kinds.count(("sleep_fired", 1)) == 1
        assert sum(1 for e in after if e.k == "run_completed") == 1
        # The early timers did not end the sleep before its recorded deadline.
        wake_at = next(e.wake_at for e in after if e.k == "sleep_scheduled")
        fired_at = next(e.at for e in after if e.k == "sleep_fired")
        assert fired_at >= wake_at


async def test_slots_in_use_are_the_turns_running_not_the_credit_pulls_reserve(bide: Bide) -> None:
    # `bide status` read 272 of 500 durable slots "used" with no run in flight: the pulls' credit.
    sleeper, until = _define(bide)
    async with running_worker(bide, [sleeper, until], durable_slots=500) as worker:
        at = datetime.now(UTC) + timedelta(milliseconds=100)
        await asyncio.gather(*(until.aio_run({"at": at.isoformat()}, timeout=15) for _ in range(20)))
        # The last turns are acking their activations: used falls to 0 once they have, and stays,
        # while every idle queue keeps credit reserved.
        await wait_until(lambda: worker.host.describe()["durable_slots"] == {"used": 0, "of": 500}, timeout=10,
                         what="no durable slot in use")
        assert worker.host.durable_slots.free < 500


async def test_a_sleep_fires_early_and_waits_out_its_moment_with_its_slot_lent_to_other_work(bide: Bide) -> None:
    # A sleep's timer fires ahead of the moment (half its length, at most SLEEP_LEAD_MAX), so
    # that thousands of runs due together are read and replayed before it; each then waits on
    # its host. Holding its slot meanwhile, it would keep the host's other runs from starting.
    sleeper, until = _define(bide)
    async with running_worker(bide, [sleeper, until], durable_slots=1) as worker:
        at = datetime.now(UTC) + timedelta(seconds=6)
        slow = await until.aio_run_no_wait({"at": at.isoformat()})
        slots = worker.host.durable_slots
        await wait_until(lambda: slots.lent_out == 1, timeout=10, what="the sleep to wait out its moment on its host")
        assert datetime.now(UTC) < at - timedelta(seconds=1)  # its timer fired seconds early
        # The host's one durable slot is free for another run meanwhile.
        quick = await until.aio_run({"at": datetime.now(UTC).isoformat()}, timeout=10)
        assert quick < 0.1
        assert datetime.now(UTC) < at, "the other run had to wait for the sleeper's slot"
        assert 5.0 < await slow.aio_result(timeout=15) <= 6.0
        hist = await bide.runs.aio_history(slow.workflow_run_id)
        fired = next(e.at for e in hist.entries if e.k == "sleep_fired")
        assert at <= fired < at + timedelta(milliseconds=500)  # on time, never before
        assert slots.lent_out == 0 and slots.busy == 0


async def test_a_bad_timeout_is_refused_before_the_run_starts(bide: Bide) -> None:
    _, until = _define(bide)
    for bad in (-1, float("nan"), "5s"):
        with pytest.raises(ValueError, match="timeout must be a number of seconds"):
            await until.aio_run({"at": datetime.now(UTC).isoformat()}, timeout=bad)
    assert (await bide.runs.aio_list(task="LifecycleUntil")).runs == []
