"""Listing runs from the runs index against a real nats-server, with a few thousand runs."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from actors.engine.wire import utcnow
from actors.store.jetstream import api_request
from actors.store.server import EmbeddedServer
from sdk import Bide, Context, DurableContext, NonRetryableError, RunList, RunStatus
from tests.e2e.test_cli_events import cli
from tests.integration.test_http_api import client_for
from tests.support import REPO, running_worker, wait_until

NOOPS = 2200
FAILS = 300
PARKED = 20


async def _all(bide: Bide, limit: int = 200, **filters: Any) -> list[str]:
    """Every run a listing pages through, in order (duplicates kept, so a test can see them)."""
    ids: list[str] = []
    cursor: str | None = None
    while True:
        page: RunList = await bide.runs.aio_list(limit=limit, cursor=cursor, **filters)
        assert len(page.runs) <= limit
        ids += [r.run_id for r in page.runs]
        if page.cursor is None:
            return ids
        cursor = page.cursor


async def _http_all(api: httpx.AsyncClient, **params: Any) -> list[str]:
    ids: list[str] = []
    while True:
        resp = await api.get("/api/v1/runs", params=params)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        ids += [r["run_id"] for r in body["runs"]]
        if body["cursor"] is None:
            return ids
        params = {**params, "cursor": body["cursor"]}


async def test_a_few_thousand_runs_listed_by_status_task_metadata_and_time(nats_server: EmbeddedServer,
                                                                          bide: Bide) -> None:
    @bide.task(name="ix_noop")
    def noop(input: Any, ctx: Context) -> None:
        return None

    @bide.task(name="ix_boom")
    def boom(input: Any, ctx: Context) -> None:
        raise NonRetryableError("boom")

    @bide.durable_task(name="ix_parked")
    async def parked(input: Any, ctx: DurableContext) -> str:
        await ctx.aio_wait_for_event("ix:go", scope=str(input))
        return "done"

    async with running_worker(bide, [noop, boom, parked], slots=200):
        refs = await asyncio.gather(*(noop.aio_run_no_wait(i, additional_metadata={
            "tenant": "a" if i % 2 else "b", **({"rare": "yes"} if i % 100 == 0 else {})}) for i in range(NOOPS)))
        fails = await asyncio.gather(*(boom.aio_run_no_wait(i) for i in range(FAILS)))
        await asyncio.gather(*(r.aio_result(timeout=60) for r in refs))
        await asyncio.gather(*(r.aio_result(timeout=60) for r in fails), return_exceptions=True)
        between = utcnow()
        waiting = [await parked.aio_run_no_wait(i, additional_metadata={"tenant": "a"}) for i in range(PARKED)]

        async def all_parked() -> bool:
            return len(await _all(bide, status="waiting")) == PARKED

        await wait_until(all_parked, timeout=20, what="every parked run to be waiting")

        async def all_indexed() -> bool:  # the index's writes are not acknowledged: they may lag a result
            return len(await _all(bide, limit=1000)) == NOOPS + FAILS + PARKED and not await _all(
                bide, status="running")

        await wait_until(all_indexed, timeout=20, what="every run's record")

        # Paging returns every run exactly once, newest first, by status and task.
        completed = await _all(bide, status="completed", task="ix_noop")
        assert len(completed) == NOOPS and set(completed) == {r.workflow_run_id for r in refs}
        assert set(await _all(bide, status="failed")) == {r.workflow_run_id for r in fails}
        everything = await _all(bide, limit=333)
        assert len(everything) == len(set(everything)) == NOOPS + FAILS + PARKED
        assert await _all(bide, status="running") == []
        assert await _all(bide, status="cancelled") == []
        assert await _all(bide, task="nobody") == []
        # Metadata (every given pair must match) and the time window (the start time).
        assert len(await _all(bide, metadata={"rare": "yes"})) == NOOPS // 100
        assert len(await _all(bide, task="ix_noop", metadata={"tenant": "a"})) == NOOPS // 2
        assert len(await _all(bide, metadata={"tenant": "a"})) == NOOPS // 2 + PARKED
        assert set(await _all(bide, since=between)) == {r.workflow_run_id for r in waiting}
        assert len(await _all(bide, until=between)) == NOOPS + FAILS
        page = await bide.runs.aio_list(status="waiting", limit=5)
        assert [r.status for r in page.runs] == [RunStatus.WAITING] * 5 and page.cursor is not None
        newest = page.runs[0]
        assert newest.run_id == waiting[-1].workflow_run_id and newest.additional_metadata == {"tenant": "a"}
        assert newest.task == "ix_parked" and newest.ended_at is None
        # The newest first: a page of everything starts with the runs started last.
        assert [r.run_id for r in (await bide.runs.aio_list(limit=PARKED)).runs] == \
            [r.workflow_run_id for r in reversed(waiting)]

        # The HTTP API and the CLI list the same, with the same filters and cursor paging.
        async with client_for(bide) as api:
            listed = await _http_all(api, status="completed", task="ix_noop", limit=400)
            assert len(listed) == NOOPS and set(listed) == set(completed)
            assert len(await _http_all(api, meta=["tenant=b", "rare=yes"])) == NOOPS // 100
            assert await _http_all(api, meta=["tenant=a", "rare=yes"]) == []
            assert set(await _http_all(api, since=between.isoformat())) == {r.workflow_run_id for r in waiting}
            one = (await api.get("/api/v1/runs", params={"status": "waiting", "limit": 1})).json()["runs"][0]
            assert one["run_id"] == waiting[-1].workflow_run_id and one["status"] == "waiting"
            assert one["additional_metadata"] == {"tenant": "a"} and one["ended_at"] is None
            bad = await api.get("/api/v1/runs", params={"status": "bogus"})
            assert bad.status_code == 422 and "bogus" in bad.text
            bad = await api.get("/api/v1/runs", params={"meta": "no-equals-sign"})
            assert bad.status_code == 400 and "no-equals-sign" in bad.json()["detail"]
            bad = await api.get("/api/v1/runs", params={"cursor": "0"})
            assert bad.status_code == 400 and "'0'" in bad.json()["detail"]
        out = await cli("runs", "list", "--status", "waiting", "--meta", "tenant=a", "--limit", "3", "--json",
                        url=nats_server.url)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert [r["run_id"] for r in doc["runs"]] == [r.workflow_run_id for r in reversed(waiting)][:3]
        assert doc["cursor"] is not None
        out = await cli("runs", "list", "--task", "ix_parked", "--since", "1h", "--limit", "2", url=nats_server.url)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:3] == ["RUN", "ID", "TASK"] and len(lines) == 3
        assert waiting[-1].workflow_run_id in lines[1] and "tenant=a" in lines[1] and "--cursor" in out.stderr
        out = await cli("runs", "list", "--since", "soon", url=nats_server.url)
        assert out.returncode == 2 and "'soon'" in out.stderr

        # A run that ends moves from live to ended.
        first = waiting[0].workflow_run_id
        await bide.event.aio_push("ix:go", scope="0")
        assert await waiting[0].aio_result(timeout=20) == "done"

        async def moved() -> bool:
            return (first in await _all(bide, status="completed", task="ix_parked")
                    and first not in await _all(bide, status="waiting"))

        await wait_until(moved, timeout=15, what="the ended run to be listed as completed")
        conn = await bide._pool.get()
        s = conn.layout.subjects

        async def live_record_gone() -> bool:
            info = await api_request(conn.nc, f"$JS.API.STREAM.INFO.{s.runs_stream}",
                                     {"subjects_filter": s.run_record("live", "ix_parked", first)})
            return not (info.get("state", {}).get("subjects") or {})

        await wait_until(live_record_gone, timeout=10, what="the live record's marker to expire")
        ended = [r for r in (await bide.runs.aio_list(status="completed", task="ix_parked")).runs]
        assert [(r.run_id, r.status) for r in ended] == [(first, RunStatus.COMPLETED)]
        assert ended[0].ended_at is not None and ended[0].ended_at >= ended[0].started_at


@pytest.mark.parametrize(("filters", "named"), [
    ({"status": "bogus"}, "'bogus'"),
    ({"limit": 0}, "0"),
    ({"limit": 5000}, "5000"),
    ({"cursor": "not-a-cursor"}, "'not-a-cursor'"),
    ({"cursor": "0"}, "'0'"),
    ({"since": "yesterday-ish"}, "'yesterday-ish'"),
    ({"metadata": {"a": 1}}, "metadata"),
])
async def test_bad_filters_are_refused_naming_the_value(bide: Bide, filters: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError) as err:
        await bide.runs.aio_list(**filters)
    assert named in str(err.value)


@pytest.fixture
async def short(nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Bide]:
    """A client (and the workers it starts) that keeps finished runs for 2 s."""
    monkeypatch.setenv("BIDE_HISTORY_RETENTION", "2s")
    client = Bide(nats_server.url, ack_wait=3.0)
    try:
        yield client
    finally:
        await client.aclose()


async def test_the_reaper_removes_a_runs_index_records_with_the_run(short: Bide) -> None:
    @short.task(name="ix_short")
    def quick(input: Any, ctx: Context) -> int:
        return 1

    async with running_worker(short, [quick]):
        ref = await quick.aio_run_no_wait(None)
        assert await ref.aio_result(timeout=20) == 1

        async def listed() -> bool:
            runs = (await short.runs.aio_list(task="ix_short")).runs
            return [(r.run_id, r.status) for r in runs] == [(ref.workflow_run_id, RunStatus.COMPLETED)]

        await wait_until(listed, timeout=10, what="the run listed as completed")
        conn = await short._pool.get()
        s = conn.layout.subjects

        async def removed() -> bool:
            info = await api_request(conn.nc, f"$JS.API.STREAM.INFO.{s.runs_stream}",
                                     {"subjects_filter": s.runs_all})
            return not (info.get("state", {}).get("subjects") or {}) and not (
                await conn.history.read(ref.workflow_run_id)).entries

        await wait_until(removed, timeout=20, what="the run and its index records to be removed")
        assert (await short.runs.aio_list(task="ix_short")).runs == []


async def test_a_run_whose_end_record_was_lost_is_listed_with_its_historys_status(bide: Bide) -> None:
    """The index narrows, the history decides: a live record left by a host that died before
    writing the end's record never makes a finished run look running or waiting."""
    from actors.store.runs_index import LIVE, record

    @bide.task(name="ix_lost_end")
    async def quick(input: dict[str, Any], ctx: Context) -> str:
        return "done"

    async with running_worker(bide, [quick]):
        ref = await quick.aio_run_no_wait({})
        assert await ref.aio_result(timeout=20) == "done"
        run_id = ref.workflow_run_id
        conn = await bide._pool.get()
        s = conn.layout.subjects
        started = (await conn.history.read(run_id)).started

        async def ended_record() -> bool:
            return run_id in await _all(bide, status="completed", task="ix_lost_end")

        await wait_until(ended_record, timeout=15, what="the end's index record")
        # As if the end's records were never written: the ended one gone, the live one back.
        await api_request(conn.nc, f"$JS.API.STREAM.PURGE.{s.runs_stream}",
                          {"filter": s.run_records("ix_lost_end", run_id)})
        await conn.publisher.publish(s.run_record(LIVE, "ix_lost_end", run_id), record(started))
        listed = (await bide.runs.aio_list(task="ix_lost_end")).runs
        assert [(r.run_id, r.status) for r in listed] == [(run_id, RunStatus.COMPLETED)]
        assert run_id not in await _all(bide, status="running")
        assert run_id not in await _all(bide, status="waiting")


async def test_runs_no_host_has_taken_are_listed_and_found_as_queued(nats_server: EmbeddedServer, bide: Bide) -> None:
    """`bide runs list` prints `queued`; every way in takes it as a filter too, and `running` leaves them out."""

    @bide.task(name="ix_unserved")
    def unserved(input: Any, ctx: Context) -> None:
        return None

    refs = [await unserved.aio_run_no_wait(i) for i in range(3)]  # no worker: nobody takes them
    ids = {r.workflow_run_id for r in refs}

    async def indexed() -> bool:
        return len((await bide.runs.aio_list(task="ix_unserved")).runs) == 3

    await wait_until(indexed, timeout=20, what="the three runs' records")
    page = await bide.runs.aio_list(status="queued")
    assert {r.run_id for r in page} == ids and {r.status for r in page} == {RunStatus.QUEUED}
    assert (await bide.runs.aio_list(status="running")).runs == []
    async with client_for(bide) as api:
        assert set(await _http_all(api, status="queued")) == ids
    out = await cli("runs", "list", "--status", "queued", "--json", url=nats_server.url)
    assert out.returncode == 0, out.stderr
    assert {r["run_id"] for r in json.loads(out.stdout)["runs"]} == ids
    # A reader that has gone (`| head -1`, done) ends the listing quietly.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "actors.apps.cli", "runs", "list", stdout=write_end,
            stderr=asyncio.subprocess.PIPE, cwd=REPO, env={**os.environ, "BIDE_NATS_URL": nats_server.url})
    finally:
        os.close(write_end)
    _, stderr = await proc.communicate()
    assert (proc.returncode, stderr) == (141, b"")
