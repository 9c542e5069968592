"""A sleep never ends before its moment, in a worker process on its default event loop.

uvloop keeps timers to the millisecond and measures them from the time it read when the
loop's iteration began, so ``asyncio.sleep(s)`` there can end a millisecond or so before ``s``
has passed: 1,000 runs due within one second recorded ``sleep_fired`` up to 1.2 ms before
``wake_at``, 572 of them early (``python -m benchmarks.timers_at_scale --runs 1000``).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from actors.engine.wire import SleepFired, SleepScheduled
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
