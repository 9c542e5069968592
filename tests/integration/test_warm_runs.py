"""Warm runs: a host keeps a parked run's code in memory and its next turn goes on without a replay.

A warm run is only ever a shortcut: whenever the host cannot be sure its view is the
stored history (another writer, a redelivery), the turn replays as before.
"""

from __future__ import annotations

from typing import Any

import pytest

from actors.engine.wire import TurnParked, utcnow
from sdk import Bide, DurableContext
from sdk.config import BideConfig
from tests.support import running_worker, wait_until

ENTERED: list[str] = []
"""Each time the task's code starts from its top (the first turn, and every replay)."""


def define(bide: Bide, name: str) -> Any:
    @bide.durable_task(name=name)
    async def loop_of_waits(input: dict, ctx: DurableContext) -> Any:
        ENTERED.append(ctx.workflow_run_id)
        total = 0
        for _ in range(input["waits"]):
            got = await ctx.aio_wait_for_event("warm:next")
            total += got["n"]
        return total

    return loop_of_waits


async def waiting_at(bide: Bide, run_id: str, waits: int) -> bool:
    """The run has recorded ``waits`` registrations (so it is parked at the last one)."""
    hist = await bide.runs.aio_history(run_id)
    return [e.k for e in hist.entries].count("wait_registered") >= waits


async def send_each(bide: Bide, run_id: str, waits: int) -> None:
    """One event for each of the run's waits, each sent once the run waits for it: ``n`` = 0, 1, ..."""
    for i in range(waits):
        await wait_until(lambda i=i: waiting_at(bide, run_id, i + 1), what=f"wait {i}")
        await bide.event.aio_send(run_id, "warm:next", {"n": i})


async def test_a_run_that_waits_ten_times_runs_its_code_from_the_top_once(bide: Bide) -> None:
    task = define(bide, "WarmLoop")
    ENTERED.clear()
    async with running_worker(bide, [task]) as worker:
        ref = await task.aio_run_no_wait({"waits": 10})
        run_id = ref.workflow_run_id
        await send_each(bide, run_id, 10)
        assert await ref.aio_result(timeout=20) == sum(range(10))
        assert ENTERED.count(run_id) == 1  # never replayed: each turn went on from where the code parked
        assert worker.host._warm.hits == 10
        assert len(worker.host._warm) == 0  # a run that ended is not kept


async def test_another_writer_makes_the_next_turn_replay_from_the_stored_history(bide: Bide) -> None:
    task = define(bide, "WarmLoopMoved")
    ENTERED.clear()
    async with running_worker(bide, [task]) as worker:
        ref = await task.aio_run_no_wait({"waits": 2})
        run_id = ref.workflow_run_id
        await wait_until(lambda: waiting_at(bide, run_id, 1), what="the first wait")
        # Someone else appends (as another host's turn would): this host's view is stale now.
        conn = await bide._pool.get()
        hist = await conn.history.read(run_id)
        await conn.history.append(run_id, [TurnParked(at=utcnow())], hist.last_seq)
        await bide.event.aio_send(run_id, "warm:next", {"n": 1})
        await wait_until(lambda: waiting_at(bide, run_id, 2), what="the second wait")
        assert ENTERED.count(run_id) == 2  # the second turn replayed
        hits = worker.host._warm.hits
        await bide.event.aio_send(run_id, "warm:next", {"n": 2})
        assert await ref.aio_result(timeout=20) == 3
        assert worker.host._warm.hits == hits + 1  # and the run was warm again after it
        assert ENTERED.count(run_id) == 2


async def test_with_warm_runs_off_every_turn_replays(bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDE_WARM_RUNS", "0")
    cold = Bide(bide.config.nats_url, ack_wait=3.0)
    try:
        task = define(cold, "ColdLoop")
        ENTERED.clear()
        async with running_worker(cold, [task]) as worker:
            ref = await task.aio_run_no_wait({"waits": 3})
            run_id = ref.workflow_run_id
            await send_each(cold, run_id, 3)
            assert await ref.aio_result(timeout=20) == 3
            assert ENTERED.count(run_id) == 4
            assert worker.host._warm.hits == 0
    finally:
        await cold.aclose()


def test_a_negative_warm_run_count_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDE_WARM_RUNS", "-1")
    with pytest.raises(ValueError, match="BIDE_WARM_RUNS=-1"):
        BideConfig.from_env()
