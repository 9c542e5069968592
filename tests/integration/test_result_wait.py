"""Waiting for a run's result (``RunRef.aio_result``) against a real nats-server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from actors.engine.wire import RunStarted, utcnow
from actors.store.jetstream import api_request
from sdk import Bide, RunNotFoundError
from sdk.runs import wait_terminal


async def test_a_run_removed_while_its_result_is_awaited_is_reported_not_waited_on(
        bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short retention can remove a finished run before a waiter that missed its end reads again:
    the waiter says the run is gone (as a read of a removed run does) instead of waiting out its timeout."""
    conn = await bide._pool.get()
    s = conn.layout.subjects
    run_id = "removed-while-awaited"
    await conn.history.append(run_id, [RunStarted(run_id=run_id, task="t", durable=True, at=utcnow())], 0)
    read_once = asyncio.Event()
    real_read_last = conn.history.read_last

    async def read_last(rid: str, min_seq: int = 0) -> list[Any]:
        got = await real_read_last(rid, min_seq)
        read_once.set()  # observed, not changed: the waiter has read the run once
        return got

    monkeypatch.setattr(conn.history, "read_last", read_last)
    waiter = asyncio.create_task(wait_terminal(conn, run_id, timeout=30))
    await asyncio.wait_for(read_once.wait(), 10)
    await api_request(conn.nc, f"$JS.API.STREAM.PURGE.{s.history_stream}", {"filter": s.history(run_id)})
    with pytest.raises(RunNotFoundError, match="was removed while its result was awaited"):
        await asyncio.wait_for(waiter, 10)
