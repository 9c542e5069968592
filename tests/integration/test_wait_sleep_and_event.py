"""A wait for a sleep *and* an event: once the sleep is over, the run waits for the event alone.

``aio_wait_for(label, SleepCondition(1s), UserEventCondition(key))`` needs both. Its turn
looked for its next wake-up among every sleep condition, satisfied ones too: once the
second was over it found that moment (past), waited until then (not at all) and looked
again, for ever and without yielding. The host's event loop was wedged, every other run on
it stopped too, and its heartbeat thread kept the activation from every other host.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from actors.store.server import EmbeddedServer
from sdk import Bide
from tests.apps.and_wait import EVENT_KEY, define
from tests.support import WorkerProcess, wait_until


async def test_a_wait_for_a_sleep_and_an_event_waits_for_the_event_and_its_host_goes_on(
    nats_server: EmbeddedServer,
) -> None:
    client = Bide(nats_server.url, ack_wait=3.0)
    sleep_and_event, echo = define(client)
    host = WorkerProcess("tests.apps.and_wait:worker", nats_server.url).start()
    try:
        ref = await sleep_and_event.aio_run_no_wait({})

        async def sleep_over() -> bool:
            hist = await client.runs.aio_history(ref.workflow_run_id)
            reg = next((e for e in hist.entries if e.k == "wait_registered"), None)
            wakes = [] if reg is None else [c.wake_at for c in reg.flat() if c.kind == "sleep"]
            return bool(wakes) and datetime.now(UTC) > max(wakes) + timedelta(seconds=0.5)

        await wait_until(sleep_over, timeout=15, what="the wait registered and its sleep condition over")
        # The host must still serve other runs.
        other = await echo.aio_run_no_wait({"still": "serving"})
        assert await other.aio_result(timeout=15) == {"still": "serving"}
        await client.event.aio_push(EVENT_KEY, {"ok": 1})
        result = await ref.aio_result(timeout=15)
        assert result["sleep:1s"] == {"duration_seconds": 1.0}, result
        assert list(result[EVENT_KEY].values()) == [{"ok": 1}], result
    finally:
        host.kill()
        await client.aclose()
