"""Stream settings changed by hand (``nats stream edit``) are put back by the hosts (the stream guard)."""

from __future__ import annotations

import logging

import nats
import nats.js.errors
import pytest

from actors.engine.wire import Subjects
from actors.store.jetstream import Layout, api_request, restore_streams
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext
from tests.support import running_worker, wait_until


async def test_a_max_age_put_on_the_histories_by_hand_is_taken_off_before_a_sleeping_run_expires(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # `nats stream edit BIDE_HISTORY --max-age 5s` (or 30d, to save disk) expired every run that
    # lived longer than that, until some host restarted and set the stream up again: the run
    # below lost its start while it slept, and its wake-up found no run.
    monkeypatch.setenv("BIDE_STREAM_CHECK_INTERVAL", "0.3")
    caplog.set_level(logging.WARNING, logger="bide.streams")
    client = Bide(nats_server.url, ack_wait=3.0)

    @client.durable_task(name="SleepsThroughAnEdit")
    async def sleeper(input: dict[str, float], ctx: DurableContext) -> str:
        await ctx.aio_sleep_for(input["sleep"])
        return "woke"

    s = Subjects()
    nc = await nats.connect(nats_server.url)
    try:
        async with running_worker(client, [sleeper]):
            # Right after set-up there is nothing to put back (no update on every check).
            assert await restore_streams(nc, Layout.from_config(client.config)) == []
            run = await sleeper.aio_run_no_wait({"sleep": 8.0})

            async def edit(stream: str, **changes: object) -> None:
                config = (await api_request(nc, f"$JS.API.STREAM.INFO.{stream}", {}))["config"]
                await api_request(nc, f"$JS.API.STREAM.UPDATE.{stream}", {**config, **changes})

            five_s = 5 * 10**9  # nanoseconds; the server wants the dedupe window within the max age
            await edit(s.history_stream, max_age=five_s, duplicate_window=five_s, description="the operator's own note")
            await edit(s.events_stream, allow_rollup_hdrs=True)
            await api_request(nc, f"$JS.API.STREAM.DELETE.{s.outcomes_stream}", {})

            async def put_back() -> bool:
                history = (await api_request(nc, f"$JS.API.STREAM.INFO.{s.history_stream}", {}))["config"]
                events = (await api_request(nc, f"$JS.API.STREAM.INFO.{s.events_stream}", {}))["config"]
                names = (await api_request(nc, "$JS.API.STREAM.NAMES", {}))["streams"]
                return history["max_age"] == 0 and not events["allow_rollup_hdrs"] and s.outcomes_stream in names

            await wait_until(put_back, timeout=4, what="the hosts to put the streams' settings back")
            history = (await api_request(nc, f"$JS.API.STREAM.INFO.{s.history_stream}", {}))["config"]
            assert history["description"] == "the operator's own note"  # not a setting a guarantee rests on
            assert await run.aio_result(timeout=20) == "woke"
    finally:
        await nc.close()
        await client.aclose()
    said = caplog.text
    assert "stream BIDE_HISTORY: max_age was 5s, put back to 0 (none)" in said
    assert "stream BIDE_HISTORY: duplicate_window was 5s, put back to 120s" in said
    assert "stream BIDE_EVENTS: allow_rollup_hdrs was True, put back to False" in said
    assert "stream BIDE_OUTCOMES was deleted outside Bide: created again" in said


async def test_an_event_that_asks_to_be_kept_for_ever_is_removed_after_the_events_max_age(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The events stream allows per-message TTLs (a registration is kept with `never`), so an event
    published with `Nats-TTL: never` (or longer than the max age) was kept for good."""
    monkeypatch.setenv("BIDE_STREAM_CHECK_INTERVAL", "0.3")
    monkeypatch.setenv("BIDE_EVENTS_MAX_AGE", "2")
    client = Bide(nats_server.url)

    @client.durable_task(name="WaitsThroughOverdue")
    async def waiter(input: dict[str, str], ctx: DurableContext) -> object:
        return await ctx.aio_wait_for_event("overdue:go")

    s = Subjects()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        async with running_worker(client, [waiter]):
            ref = await waiter.aio_run_no_wait({})  # its registration is kept with `never`: it must stay
            immortal = [(await js.publish(s.event("overdue:k"), b"{}", headers={"Nats-TTL": ttl})).seq
                        for ttl in ("never", "1h")]
            plain = (await js.publish(s.event("overdue:k"), b"{}")).seq

            async def gone(seq: int) -> bool:
                try:
                    await api_request(nc, f"$JS.API.STREAM.MSG.GET.{s.events_stream}", {"seq": seq})
                except nats.js.errors.NotFoundError:
                    return True
                return False

            for seq in (plain, *immortal):
                await wait_until(lambda seq=seq: gone(seq), timeout=15, what=f"event {seq} to be removed")
            await client.event.aio_push("overdue:go", {"ok": 1})
            assert await ref.aio_result(timeout=20) == {"ok": 1}
    finally:
        await nc.close()
        await client.aclose()
