"""A host whose NATS connection the server closes for good stops, so its work moves to other hosts."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from actors.store.jetstream import NatsUnavailableError
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, EmptyModel
from tests.support import WorkerProcess, running_worker


async def test_a_host_whose_connection_the_server_closes_stops_and_its_work_moves(bide: Bide) -> None:
    # nats-py gives a connection up for good on a protocol error from the server (a line past
    # the 4 KiB limit, an account's subscription limit, an expired credential): the host
    # stopped pulling, but its heartbeat (a connection of its own) kept its activations alive,
    # so a run in its hands went nowhere and the process lived on as if it served.
    attempts: list[str] = []
    first_attempt_running = asyncio.Event()

    @bide.durable_task(name="StepAcrossALostConnection")
    async def step_across(input: EmptyModel, ctx: DurableContext) -> str:
        async def step() -> str:
            attempts.append("step")
            if len(attempts) == 1:
                first_attempt_running.set()
                await asyncio.Event().wait()  # the first host never finishes it
            return "done"

        return await ctx.memo(step)

    first = bide.worker("loses-its-connection", workflows=[step_across])
    ready = asyncio.Event()
    serving = asyncio.create_task(first.async_start(ready=ready))
    await asyncio.wait_for(ready.wait(), 30)
    ref = await step_across.aio_run_no_wait(EmptyModel())
    await asyncio.wait_for(first_attempt_running.wait(), 15)

    # A protocol error: the server answers -ERR and closes the host's connection.
    await first.host._nc.publish("x" * 5000, b"")
    with pytest.raises(NatsUnavailableError, match=r"closed by the server .*maximum control line exceeded"):
        await asyncio.wait_for(serving, 30)

    async with running_worker(bide, [step_across], name="takes-over"):
        assert await ref.aio_result(timeout=30) == "done"
    assert attempts == ["step", "step"]  # at least once: the step ran again on the next host


def test_bide_worker_exits_with_the_reason_when_the_server_revokes_its_credentials(tmp_path: Path) -> None:
    # An operator rotates the hosts' password and reloads the server: nats-server closes their
    # connections with "Authorization Violation", and nats-py does not reconnect after that.
    server = EmbeddedServer(store_dir=tmp_path / "js",
                            config='authorization { users = [ { user: host, password: "first" } ] }\n')
    server.start()
    worker = WorkerProcess("examples.durable.worker:worker", server.url,
                           env={"BIDE_NATS_USER": "host", "BIDE_NATS_PASSWORD": "first"})
    try:
        worker.start()
        config = server.config_file
        config.write_text(config.read_text().replace('"first"', '"second"'))
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGHUP)
        assert worker.proc is not None
        assert worker.proc.wait(timeout=30) == 2
        assert worker.proc.stdout is not None
        out = worker.proc.stdout.read()
        assert "its NATS connection was closed by the server (nats: authorization failed)" in out
        assert "Traceback" not in out
    finally:
        worker.kill()
        server.stop()
