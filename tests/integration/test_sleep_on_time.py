"""A sleep never ends before its moment, nor a time limit before its time, in a worker process
on its default event loop.

uvloop keeps timers to the millisecond and measures them from the time it read when the
loop's iteration began, so ``asyncio.sleep(s)`` there can end a millisecond or so before ``s``
has passed: 1,000 runs due within one second recorded ``sleep_fired`` up to 1.2 ms before
``wake_at``, 572 of them early (``python -m benchmarks.timers_at_scale --runs 1000``).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from actors.engine.wire import ActivationBegun, RunFailed, SleepFired, SleepScheduled
from actors.store.server import EmbeddedServer
from sdk import Bide
from tests.support import WorkerProcess

N = 300


async def test_no_sleep_fires_before_its_moment(nats_server: EmbeddedServer) -> None:
    client = Bide(nats_server.url)
    worker = WorkerProcess("tests.apps.sleepers:worker", nats_server.url).start()
    try:
        due = datetime.now(UTC) + timedelta(seconds=3)
        # Spread over half a second, most of them less than 600 ms after their start: they stay
        # on the host and wait out their moment there, as a sleep whose timer fired early does.
        refs = await asyncio.gather(*(client.aio_run_no_wait_by_name(
            "SleepUntilMoment", {"wake_at": (due + timedelta(seconds=i / (2 * N))).isoformat()}) for i in range(N)))
        results = await asyncio.gather(*(ref.aio_result() for ref in refs))
        assert len(results) == N
        early: list[float] = []
        for ref in refs:
            hist = await client.runs.aio_history(ref.workflow_run_id)
            [scheduled] = [e for e in hist.entries if isinstance(e, SleepScheduled)]
            [fired] = [e for e in hist.entries if isinstance(e, SleepFired)]
            if fired.at < scheduled.wake_at:
                early.append((scheduled.wake_at - fired.at).total_seconds() * 1000)
        assert not early, f"{len(early)} of {N} sleeps fired before their moment, by up to {max(early):.2f} ms"
    finally:
        worker.kill()
        await client.aclose()


@pytest.mark.parametrize("task", ["OverItsLimit", "DurableOverItsLimit"])
async def test_no_run_fails_over_its_time_limit_before_the_limit(nats_server: EmbeddedServer, task: str) -> None:
    """A run that fails for exceeding its ``execution_timeout`` (50 ms) ran at least that long."""
    client = Bide(nats_server.url)
    worker = WorkerProcess("tests.apps.sleepers:worker", nats_server.url).start()
    try:
        refs = await asyncio.gather(*(client.aio_run_no_wait_by_name(task, {}) for _ in range(N)))
        # Each result is the run's failure: awaiting them all waits for every run to end.
        await asyncio.gather(*(ref.aio_result(timeout=30) for ref in refs), return_exceptions=True)
        short: list[float] = []
        for ref in refs:
            hist = await client.runs.aio_history(ref.workflow_run_id)
            begun = next(e for e in hist.entries if isinstance(e, ActivationBegun))
            assert isinstance(hist.terminal, RunFailed), hist.terminal
            ran_ms = (hist.terminal.at - begun.at).total_seconds() * 1000
            if ran_ms < 50:
                short.append(ran_ms)
        assert not short, f"{len(short)} of {N} runs failed over a 50 ms limit after {min(short):.3f} ms"
    finally:
        worker.kill()
        await client.aclose()

