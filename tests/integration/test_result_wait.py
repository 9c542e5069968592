"""Waiting for a run's result (``RunRef.aio_result``) against a real nats-server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from actors.engine.wire import RunCompleted, RunStarted, utcnow
from actors.store.jetstream import api_request
from sdk import Bide, RunNotFoundError
from sdk.runs import _await_terminal, wait_terminal


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


async def test_a_result_whose_inbox_message_never_comes_is_read_from_the_history(
        bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    """The result inbox is best effort: a starter that hears nothing reads the run's last entry
    now and then (soon at first, then further apart), and returns the end it finds there."""
    conn = await bide._pool.get()
    run_id = "inbox-message-lost"
    await conn.history.append(run_id, [RunStarted(run_id=run_id, task="t", durable=True, at=utcnow())], 0)
    reads = 0
    read_twice = asyncio.Event()
    real_read_last = conn.history.read_last

    async def read_last(rid: str, min_seq: int = 0) -> list[Any]:
        nonlocal reads
        got = await real_read_last(rid, min_seq)
        reads += 1  # observed, not changed
        if reads == 2:
            read_twice.set()
        return got

    monkeypatch.setattr(conn.history, "read_last", read_last)
    never_set: asyncio.Future[Any] = asyncio.get_running_loop().create_future()  # the lost inbox message
    waiter = asyncio.create_task(_await_terminal(conn, run_id, never_set, timeout=30, first_interval=0.05))
    # The run ends after the waiter has looked twice and found it running.
    await asyncio.wait_for(read_twice.wait(), 10)
    assert not waiter.done()
    await conn.history.append(run_id, [RunCompleted(result={"v": 1}, at=utcnow())], 1)
    end = await asyncio.wait_for(waiter, 10)
    assert isinstance(end, RunCompleted) and end.result == {"v": 1}


async def test_a_result_awaited_past_its_timeout_raises_timeout_naming_the_run(bide: Bide) -> None:
    conn = await bide._pool.get()
    run_id = "never-ends"
    await conn.history.append(run_id, [RunStarted(run_id=run_id, task="t", durable=True, at=utcnow())], 0)
    never_set: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(TimeoutError, match=r"run never-ends did not finish within 0\.3s"):
        await asyncio.wait_for(_await_terminal(conn, run_id, never_set, timeout=0.3, first_interval=0.05), 10)
    assert loop.time() - began >= 0.3
