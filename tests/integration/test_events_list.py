"""Recent events with the runs each resumed or started, and the whole run, against a real nats-server:
``GET /api/v1/events``, ``bide events list``, ``GET /api/v1/runs/{id}?detail=full`` and ``bide runs show --json``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actors.engine.wire import Subjects
from actors.hosting.router_reads import StreamReads
from actors.store.server import EmbeddedServer
from sdk import Bide, Context, DurableContext, RunStatus
from tests.e2e.test_cli_events import cli
from tests.integration.test_http_api import client_for
from tests.support import running_worker, wait_until


def outcomes(doc: dict[str, Any]) -> dict[int, list[tuple[str, str, str]]]:
    """By event seq: (how, run id, task) of each run it resumed or started, sorted."""
    return {e["seq"]: sorted((o["how"], o["run_id"], o["task"]) for o in e["outcomes"]) for e in doc["events"]}


async def test_events_list_the_runs_each_resumed_or_started(nats_server: EmbeddedServer, bide: Bide) -> None:
    @bide.durable_task(name="EvWaiter")
    async def waiter(input: Any, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("ev:approved", "input.ok == true", timeout="1h")

    @bide.task(name="EvOnShipped", on_events=["ev:shipped"])
    def on_shipped(input: Any, ctx: Context) -> str:
        return "shipped"

    async with running_worker(bide, [waiter, on_shipped]):
        refs = [await waiter.aio_run_no_wait(i, additional_metadata={"tenant": "t1"}) for i in range(2)]

        async def both_waiting() -> bool:
            states = [(await bide.runs.aio_get(r.workflow_run_id)).status for r in refs]
            return states == [RunStatus.WAITING] * len(refs)

        await wait_until(both_waiting, what="both runs to wait")
        async with client_for(bide) as api:
            # The whole run while it waits: its input, metadata, history and pending wait.
            full = (await api.get(f"/api/v1/runs/{refs[0].workflow_run_id}", params={"detail": "full"})).json()
            assert full["status"] == "waiting" and full["input"] == 0
            assert full["additional_metadata"] == {"tenant": "t1"}
            assert full["history"][0]["entry"]["k"] == "run_started" and full["entries"] == len(full["history"])
            [wait] = full["pending_waits"]
            [event_cond] = [c for c in wait["conditions"] if c["kind"] == "event"]
            assert (event_cond["event_key"], event_cond["expression"]) == ("ev:approved", "input.ok == true")
            assert wait["timeout_at"] is not None and full["result"] is None and full["children"] == []
            plain = (await api.get(f"/api/v1/runs/{refs[0].workflow_run_id}")).json()
            assert set(plain) == {"run_id", "task", "status", "started_at", "result", "error", "entries", "trace_id"}

            approved = await bide.event.aio_push("ev:approved", {"ok": True}, metadata={"who": "ada"})
            shipped = await bide.event.aio_push("ev:shipped", {"parcel": 7}, event_id="parcel-7")
            for r in refs:
                assert await r.aio_result(timeout=20) == {"ok": True}
            expected = {approved.seq: 2, shipped.seq: 1}

            async def recorded() -> bool:  # the records are not acknowledged: they may lag the runs a little
                got = outcomes((await api.get("/api/v1/events")).json())
                return all(len(got.get(seq, [])) == n for seq, n in expected.items())

            await wait_until(recorded, what="the outcome records")
            body = (await api.get("/api/v1/events", params={"limit": 10})).json()
            got = outcomes(body)
            assert got[approved.seq] == sorted(("resumed", r.workflow_run_id, "EvWaiter") for r in refs)
            [(how, started_id, task)] = got[shipped.seq]
            assert (how, task) == ("started", "EvOnShipped")
            assert (await bide.runs.aio_get(started_id)).task == "EvOnShipped"
            newest = body["events"][0]
            assert (newest["seq"], newest["key"], newest["event_id"]) == (shipped.seq, "ev:shipped", "parcel-7")
            assert newest["payload"] == {"parcel": 7} and newest["size"] == len(b'{"parcel":7}')
            ev = next(e for e in body["events"] if e["seq"] == approved.seq)
            assert ev["metadata"] == {"who": "ada"} and ev["scope"] is None
            assert all(o["wait_id"] for o in ev["outcomes"])

            page = await api.get("/events")  # the web UI's Events page: one column of runs
            assert page.status_code == 200 and f"started {started_id[:12]}" in page.text
            assert all(f"resumed {r.workflow_run_id[:12]}" in page.text for r in refs)

            by_key = (await api.get("/api/v1/events", params={"key": "ev:approved"})).json()
            assert [e["seq"] for e in by_key["events"]] == [approved.seq]
            recent = (await api.get("/api/v1/events", params={"since": "10m"})).json()
            assert {approved.seq, shipped.seq} <= {e["seq"] for e in recent["events"]}
            later = (await api.get("/api/v1/events", params={"since": "2999-01-01T00:00:00Z"})).json()
            assert later == {"events": []}

            # The whole run once completed: its result, no pending wait.
            done = (await api.get(f"/api/v1/runs/{refs[0].workflow_run_id}", params={"detail": "full"})).json()
            assert done["status"] == "completed" and done["result"] == {"ok": True} and done["pending_waits"] == []

            for params, named in [({"since": "soon"}, "'soon'"), ({"limit": "0"}, "0"), ({"limit": "5000"}, "5000"),
                                  ({"kee": "x"}, "'kee'"), ({"key": " ev:approved"}, "' ev:approved'")]:
                bad = await api.get("/api/v1/events", params=params)
                assert bad.status_code == 400 and named in bad.json()["detail"], bad.text
            bad = await api.get(f"/api/v1/runs/{refs[0].workflow_run_id}", params={"detail": "everything"})
            assert bad.status_code == 422 and "everything" in bad.text

        # The CLI prints the same document.
        out = await cli("events", "list", "--limit", "10", "--json", url=nats_server.url)
        assert out.returncode == 0, out.stderr
        assert outcomes(json.loads(out.stdout)) == got
        out = await cli("events", "list", "--key", "ev:shipped", "--since", "10m", url=nats_server.url)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:3] == ["SEQ", "STORED", "KEY"] and len(lines) == 2
        assert f"started:{started_id}" in lines[1] and "parcel-7" in lines[1]
        out = await cli("events", "list", "--since", "soon", url=nats_server.url)
        assert out.returncode == 2 and "'soon'" in out.stderr
        out = await cli("events", "list", "--limit", "0", url=nats_server.url)
        assert out.returncode == 2 and "got 0" in out.stderr
        out = await cli("runs", "show", refs[0].workflow_run_id, "--json", url=nats_server.url)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == done


def test_the_outcome_records_are_outside_the_stream_the_router_reads() -> None:
    from actors.store.jetstream import Layout, _stream_configs

    s = Subjects("bide")
    [holder] = [c for c in _stream_configs(Layout(subjects=s)) if s.outcomes_all in (c.subjects or [])]
    assert holder.name == s.outcomes_stream != s.events_stream
    assert s.parse_outcome_subject(s.outcome(42)) == 42 and s.parse_outcome_subject(s.rejected(42)) is None


async def test_outcome_records_cause_no_router_gap_reads(bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    """The records live outside the stream the router partitions consume: a record there, which no
    partition's filter delivers, would be a gap in the delivered sequences, and each partition would
    read the stream to fill it before its next event."""
    gaps: list[tuple[int, int]] = []
    between = StreamReads.between

    async def counted(self: StreamReads, first: int, last: int) -> Any:
        gaps.append((first, last))
        return await between(self, first, last)

    monkeypatch.setattr(StreamReads, "between", counted)

    @bide.durable_task(name="GapWaiter")
    async def waiter(input: Any, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("gap:go", scope=str(input))

    @bide.task(name="GapOnEvent", on_events=["gap:go"])
    def on_event(input: Any, ctx: Context) -> None:
        return None

    async with running_worker(bide, [waiter, on_event]):
        refs = [await waiter.aio_run_no_wait(i) for i in range(5)]

        async def all_waiting() -> bool:
            states = [(await bide.runs.aio_get(r.workflow_run_id)).status for r in refs]
            return states == [RunStatus.WAITING] * len(refs)

        await wait_until(all_waiting, what="the runs to wait")
        gaps.clear()
        for i, r in enumerate(refs):
            await bide.event.aio_push("gap:go", i, scope=str(i))
            assert await r.aio_result(timeout=20) == i
        async with client_for(bide) as api:
            async def recorded() -> bool:
                events = (await api.get("/api/v1/events", params={"key": "gap:go"})).json()["events"]
                return len(events) == 5 and all(len(e["outcomes"]) == 2 for e in events)

            await wait_until(recorded, what="a resumed and a started run per event")
    assert gaps == []
