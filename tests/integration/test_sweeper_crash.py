"""A signal whose sender died before its activation, and whose sweeper then died holding it.

The inbox sweeper (``actors.hosting.inbox_sweeper``) publishes the activation a dead sender did
not. Its consumer held a fetched message 30 s (``ack_wait``) before another host could see it,
so a sweeper killed mid-batch stalled those runs half a minute more; now 10 s (the test
allows 20 s from its death to the result: a second host starts, then waits out the 10 s).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from actors.engine.wire import EventSignal, utcnow
from actors.store.server import EmbeddedServer
from sdk import Bide
from tests.support import WorkerProcess, wait_until

APP = "tests.apps.sweep_crash:worker"


async def test_a_signal_held_by_a_sweeper_that_died_wakes_its_run_soon_after(
        nats_server: EmbeddedServer, tmp_path: Path) -> None:
    env = {"BIDE_TEST_CRASH_MARK": str(tmp_path / "crashed"), "BIDE_SWEEP_AFTER": "1"}
    client = Bide(nats_server.url)
    first = WorkerProcess(APP, nats_server.url, env=env).start()
    second: WorkerProcess | None = None
    try:
        ref = await client.aio_run_no_wait_by_name("AwaitsApproval", {})

        async def waiting() -> bool:
            h = await client.runs.aio_history(ref.workflow_run_id)
            return any(e.k == "wait_registered" for e in h.entries)

        await wait_until(waiting, timeout=20, what="the run to wait")
        # The sender's first write only: the signal in the run's inbox, no activation.
        conn = await client._pool.get()
        sig = EventSignal(source="direct", name="approval", payload={"ok": True}, event_id="orphan-1", at=utcnow())
        await conn.js.publish(conn.layout.subjects.inbox(ref.workflow_run_id), sig.model_dump_json().encode())
        assert first.proc is not None
        await asyncio.to_thread(first.proc.wait, 30)  # its sweeper SIGKILLs it, holding the signal
        assert (tmp_path / "crashed").exists(), "the first host's sweeper never took up the signal"

        died = time.monotonic()
        second = WorkerProcess(APP, nats_server.url, env=env).start()
        assert await ref.aio_result(timeout=30) == {"ok": True}
        assert time.monotonic() - died < 20, f"woken {time.monotonic() - died:.1f} s after the sweeper died"
    finally:
        first.kill()
        if second is not None:
            second.kill()
        await client.aclose()
