"""deploy/nats/accounts.conf on a real nats-server: a publisher pushes an event that resumes a run, and nothing else."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, EmptyModel
from tests.support import REPO, running_worker, wait_until

ACCOUNTS = REPO / "deploy" / "nats" / "accounts.conf"


async def denied(what: Any) -> bool:
    """The server never answers a request or publish the user may not make (the client times out)."""
    try:
        await what
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return True
    return False


async def test_a_publisher_pushes_an_event_that_resumes_a_run_and_can_touch_nothing_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host_pw, pub_pw = secrets.token_hex(12), secrets.token_hex(12)
    monkeypatch.setenv("BIDE_HOST_PASSWORD", host_pw)  # read by nats-server from its environment
    monkeypatch.setenv("BIDE_PUBLISHER_PASSWORD", pub_pw)
    server = EmbeddedServer(store_dir=tmp_path / "js", config=ACCOUNTS.read_text()).start()
    try:
        monkeypatch.setenv("BIDE_NATS_USER", "host")
        monkeypatch.setenv("BIDE_NATS_PASSWORD", host_pw)
        bide = Bide(server.url, ack_wait=3.0)

        @bide.durable_task(name="LpWaiter")
        async def waiter(input: EmptyModel, ctx: DurableContext) -> Any:
            return await ctx.aio_wait_for_event("order:paid", "input.order == 7")

        violations: list[str] = []

        async def on_error(e: Exception) -> None:
            violations.append(str(e))

        pub = await nats.connect(server.url, user="publisher", password=pub_pw, error_cb=on_error)
        try:
            async with running_worker(bide, [waiter]):
                ref = await waiter.aio_run_no_wait(EmptyModel())
                run_id = ref.workflow_run_id
                conn = await bide._pool.get()
                s = conn.layout.subjects

                async def registered() -> bool:
                    return any(e.k == "wait_registered" for e in (await conn.history.read(run_id)).entries)

                await wait_until(registered, what="the run to wait")
                js = pub.jetstream(timeout=1.0)
                # What a publisher is for: a JetStream publish (acknowledged) on an event subject.
                ack = await js.publish(s.event("order:paid", None), orjson.dumps({"order": 7}))
                assert ack.stream == s.events_stream
                assert await ref.aio_result(timeout=20) == {"order": 7}
                before = await conn.history.read(run_id)

                # Everything else is refused: writing a history, an inbox, work, a registration...
                for subject in (s.history(run_id), s.inbox(run_id), s.work("LpWaiter", run_id),
                                s.waits("order:paid"), s.timer(run_id, 0)):
                    assert await denied(js.publish(subject, b"{}")), subject
                # ...reading a history, and any JetStream API call (purge, delete, stream info).
                for api in (f"$JS.API.DIRECT.GET.{s.history_stream}.{s.history(run_id)}",
                            f"$JS.API.STREAM.PURGE.{s.history_stream}", f"$JS.API.STREAM.PURGE.{s.events_stream}",
                            f"$JS.API.STREAM.DELETE.{s.history_stream}", f"$JS.API.STREAM.INFO.{s.history_stream}"):
                    assert await denied(pub.request(api, b"{}", timeout=1.0)), api
                after = await conn.history.read(run_id)
                assert after.entries == before.entries and after.inbox == before.inbox
                await wait_until(lambda: bool(violations), what="the server to report a violation")
                assert all("permissions violation" in v.lower() for v in violations), violations
        finally:
            await pub.close()
            await bide.aclose()
    finally:
        server.stop()
