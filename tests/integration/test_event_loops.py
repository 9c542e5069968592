"""Sync and async calls mixed in one process, across event loops, as users write them."""

from __future__ import annotations

import asyncio

from actors.store.server import EmbeddedServer
from sdk import Bide, Context, EmptyModel
from tests.support import WorkerProcess


def test_sync_and_async_calls_across_event_loops(nats_server: EmbeddedServer) -> None:
    worker = WorkerProcess("examples.durable.worker:worker", nats_server.url).start()
    client = Bide(nats_server.url)

    @client.task(name="Hello")
    def hello(input: EmptyModel, ctx: Context) -> dict[str, str]:
        raise AssertionError("runs on the worker, not here")

    try:
        ref = hello.run_no_wait(EmptyModel())  # plain code: the client's private loop thread
        # A new event loop each time: the connection of a finished loop must not be reused.
        assert asyncio.run(ref.aio_result(timeout=20)) == {"hello": ref.workflow_run_id}
        first = asyncio.run(hello.aio_run(EmptyModel(), timeout=20))
        second = asyncio.run(hello.aio_run(EmptyModel(), timeout=20))
        assert first["hello"] != second["hello"]
        assert ref.result(timeout=20) == {"hello": ref.workflow_run_id}
        assert "hello" in hello.run(EmptyModel(), timeout=20)
        assert client.runs.get(ref.workflow_run_id).status.value == "completed"
    finally:
        client.close()
        worker.kill()
