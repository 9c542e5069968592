"""deploy/nats/accounts.conf on a real nats-server: a publisher pushes an event that resumes a run, and nothing else."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest

from actors.apps.http_api import create_app
from actors.hosting.router_partitions import deployment_status
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, EmptyModel, RunStatus
from tests.support import REPO, running_worker, wait_until

ACCOUNTS = REPO / "deploy" / "nats" / "accounts.conf"


async def denied(what: Any) -> bool:
    """The server never answers a request or publish the user may not make (the client times out)."""
    try:
        await what
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return True
    return False


def _accounts_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[EmbeddedServer, dict[str, str]]:
    """A server with accounts.conf's users (each password new), and the environment set for the ``host``."""
    passwords = {user: secrets.token_hex(12) for user in ("host", "publisher", "api")}
    for user, password in passwords.items():
        monkeypatch.setenv(f"BIDE_{user.upper()}_PASSWORD", password)  # read by nats-server from its environment
    server = EmbeddedServer(store_dir=tmp_path / "js", config=ACCOUNTS.read_text()).start()
    monkeypatch.setenv("BIDE_NATS_USER", "host")
    monkeypatch.setenv("BIDE_NATS_PASSWORD", passwords["host"])
    return server, passwords


async def test_a_publisher_pushes_an_event_that_resumes_a_run_and_can_touch_nothing_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host_pw, pub_pw = secrets.token_hex(12), secrets.token_hex(12)
    monkeypatch.setenv("BIDE_HOST_PASSWORD", host_pw)  # read by nats-server from its environment
    monkeypatch.setenv("BIDE_PUBLISHER_PASSWORD", pub_pw)
    monkeypatch.setenv("BIDE_API_PASSWORD", secrets.token_hex(12))
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


async def test_the_http_apis_user_pushes_delivers_cancels_and_reads_and_can_change_nothing_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `api` user of accounts.conf serves every route of `bide serve`, and no more."""
    server, passwords = _accounts_server(tmp_path, monkeypatch)
    try:
        bide = Bide(server.url, ack_wait=3.0)
        monkeypatch.setenv("BIDE_NATS_USER", "api")
        monkeypatch.setenv("BIDE_NATS_PASSWORD", passwords["api"])
        api_bide = Bide(server.url, ack_wait=3.0)

        @bide.durable_task(name="LpApiWaiter")
        async def waiter(input: EmptyModel, ctx: DurableContext) -> Any:
            paid = await ctx.aio_wait_for_event("order:paid", "input.order == 7")
            approval = await ctx.aio_wait_for_event("approval", timeout="30s")
            return {"paid": paid, "approval": approval}

        flow = bide.workflow(name="LpFlow")

        @flow.task()
        async def first(input: EmptyModel, ctx: Any) -> int:
            return 1

        @flow.task(parents=[first])
        async def second(input: EmptyModel, ctx: Any) -> int:
            return 2

        async with running_worker(bide, [waiter, flow]):
            conn = await bide._pool.get()
            s = conn.layout.subjects
            paid, stopped = (await waiter.aio_run_no_wait(EmptyModel()), await waiter.aio_run_no_wait(EmptyModel()))
            flowed = await flow.aio_run_no_wait(EmptyModel())
            await flowed.aio_result(timeout=20)

            async def waits(run_id: str, n: int) -> bool:
                return sum(e.k == "wait_registered" for e in (await conn.history.read(run_id)).entries) >= n

            await wait_until(lambda: waits(paid.workflow_run_id, 1), what="the run to wait")
            await wait_until(lambda: waits(stopped.workflow_run_id, 1), what="the other run to wait")
            app = create_app(api_bide, None)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1",
                                         headers={"Content-Type": "application/json"}) as api:
                assert (await api.get("/readyz")).status_code == 200
                pushed = await api.post("/api/v1/events", json={"key": "order:paid", "payload": {"order": 7}})
                assert pushed.status_code == 202, pushed.text
                await wait_until(lambda: waits(paid.workflow_run_id, 2), what="the run to wait for its approval")
                delivered = await api.post(f"/api/v1/events/{paid.workflow_run_id}/approval", json={"ok": True})
                assert delivered.status_code == 200, delivered.text
                assert await paid.aio_result(timeout=20) == {"paid": {"order": 7}, "approval": {"ok": True}}
                read = await api.get(f"/api/v1/runs/{paid.workflow_run_id}")
                assert read.status_code == 200 and read.json()["status"] == "completed", read.text
                full = await api.get(f"/api/v1/runs/{paid.workflow_run_id}", params={"detail": "full"})
                assert full.status_code == 200 and full.json()["result"]["paid"] == {"order": 7}, full.text
                # A workflow run's DAG: the hosts' status records (the shapes they advertise) are readable.
                dag = (await api.get(f"/api/v1/runs/{flowed.workflow_run_id}", params={"detail": "full"})).json()["dag"]
                assert dag["shape"] == "advertised", dag
                assert [(t["key"], t["parents"], t["state"]) for t in dag["tasks"]] == [
                    ("first", [], "completed"), ("second", ["first"], "completed")]
                async def listed() -> bool:  # with the runs it resumed (records that may lag a moment)
                    events = await api.get("/api/v1/events", params={"key": "order:paid"})
                    assert events.status_code == 200, events.text
                    [event] = events.json()["events"]
                    assert event["payload"] == {"order": 7}
                    return {o["run_id"] for o in event["outcomes"]} == {paid.workflow_run_id, stopped.workflow_run_id}

                await wait_until(listed, what="the event listed with the runs it resumed")
                for _ in range(2):  # a send repeated under its id (its first copy is checked with the leader)
                    await api_bide.event.aio_send(stopped.workflow_run_id, "note", {"n": 1}, event_id="lp-note")
                cancelled = await api.post(f"/api/v1/runs/{stopped.workflow_run_id}/cancel", json={"reason": "lp"})
                assert cancelled.status_code == 200, cancelled.text

                async def is_cancelled() -> bool:
                    return (await bide.runs.aio_get(stopped.workflow_run_id)).status is RunStatus.CANCELLED

                await wait_until(is_cancelled, what="the other run to be cancelled")
                notes = [e for e in (await conn.history.read(stopped.workflow_run_id)).entries
                         if e.k == "signal" and e.signal.event_id == "lp-note"]
                assert len(notes) == 1, notes

            # The Workers page: every stream's state, the hosts up and who owns each router partition.
            api_conn = await api_bide._pool.get()

            async def status_complete() -> bool:
                st = await deployment_status(api_conn.nc, api_conn.layout)
                return bool(st["hosts"]) and bool(st["router"]) and all(r["owner"] for r in st["router"])

            await wait_until(status_complete, what="the API's user to see the hosts and partition owners")
            st = await deployment_status(api_conn.nc, api_conn.layout)
            assert not [x for x in st["streams"] if "error" in x], st["streams"]

            # What the API's user may not do: write a history, a timer or a registration, or change a stream.
            violations: list[str] = []

            async def on_error(e: Exception) -> None:
                violations.append(str(e))

            raw = await nats.connect(server.url, user="api", password=passwords["api"], error_cb=on_error)
            try:
                js = raw.jetstream(timeout=1.0)
                before = await conn.history.read(paid.workflow_run_id)
                for subject in (s.history(paid.workflow_run_id), s.timer(paid.workflow_run_id, 0),
                                s.waits("order:paid"), s.reap(paid.workflow_run_id)):
                    assert await denied(js.publish(subject, b"{}")), subject
                for api_call in (f"$JS.API.STREAM.PURGE.{s.history_stream}", f"$JS.API.STREAM.DELETE.{s.events_stream}",
                                 f"$JS.API.STREAM.UPDATE.{s.work_stream}", f"$JS.API.STREAM.CREATE.{s.work_stream}",
                                 f"$JS.API.CONSUMER.DELETE.{s.work_stream}.{s.consumer_name('LpApiWaiter')}"):
                    assert await denied(raw.request(api_call, b"{}", timeout=1.0)), api_call
                assert (await conn.history.read(paid.workflow_run_id)).entries == before.entries
                await wait_until(lambda: bool(violations), what="the server to report a violation")
                assert all("permissions violation" in v.lower() for v in violations), violations
            finally:
                await raw.close()
        await api_bide.aclose()
        await bide.aclose()
    finally:
        server.stop()


async def test_the_http_apis_user_cannot_wipe_pending_work_or_timers_with_a_rollup_header(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant 10 on the queue the API's user publishes activations to.

    A stream that schedules messages always accepts ``Nats-Rollup`` (nats-server turns it on with
    ``allow_msg_schedules`` and will not turn it off), and a rollup of ``all`` purges the whole
    stream: every sleeping run's timer and every queued activation. The activations that users
    other than hosts publish go to a stream that refuses the header.
    """
    server, passwords = _accounts_server(tmp_path, monkeypatch)
    try:
        bide = Bide(server.url, ack_wait=3.0)

        @bide.durable_task(name="LpSleeper")
        async def sleeper(input: EmptyModel, ctx: DurableContext) -> Any:
            await ctx.aio_sleep_for(timedelta(seconds=3))
            return "woke"

        raw = await nats.connect(server.url, user="api", password=passwords["api"])
        try:
            async with running_worker(bide, [sleeper]):
                conn = await bide._pool.get()
                s = conn.layout.subjects
                refs = [await sleeper.aio_run_no_wait(EmptyModel()) for _ in range(3)]

                async def asleep(run_id: str) -> bool:
                    return any(e.k == "sleep_scheduled" for e in (await conn.history.read(run_id)).entries)

                for ref in refs:
                    await wait_until(lambda r=ref.workflow_run_id: asleep(r), what="the run to sleep")  # type: ignore[misc]
                js = raw.jetstream(timeout=2.0)
                for rollup in ("all", "sub"):
                    # Where the API's user publishes activations (a delivery's, a cancel's).
                    subject = s.queue("LpSleeper", refs[0].workflow_run_id)
                    with pytest.raises(nats.js.errors.APIError, match="rollup not permitted"):
                        await js.publish(subject, b"", headers={"Nats-Rollup": rollup})
                # Nor can a header there expire, schedule or count other messages.
                for header, refusal in ((("Nats-TTL", "1s"), "TTL is disabled"),
                                        (("Nats-Schedule", "@at 2030-01-01T00:00:00Z"), "schedules is disabled"),
                                        (("Nats-Incr", "1"), "counters is disabled")):
                    with pytest.raises(nats.js.errors.APIError, match=refusal):
                        await js.publish(subject, b"", headers=dict([header]))
                # And the stream that holds the timers is out of its reach.
                assert await denied(js.publish(s.work("LpSleeper", refs[0].workflow_run_id), b"",
                                               headers={"Nats-Rollup": "all"}))
                for ref in refs:
                    assert await ref.aio_result(timeout=30) == "woke"
        finally:
            await raw.close()
            await bide.aclose()
    finally:
        server.stop()
