"""A host killed between recording a spawn and starting the children: the next host starts them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from actors.store.server import EmbeddedServer
from sdk import Bide, RunStatus
from tests.support import WorkerProcess, wait_until

APP = "tests.apps.spawn_crash:worker"


@pytest.mark.parametrize("task", ["SpawnAfterEvent", "SpawnAfterSleep", "SpawnAtStart"])
async def test_children_recorded_by_a_host_that_died_before_starting_them_are_started(
        nats_server: EmbeddedServer, tmp_path: Path, task: str) -> None:
    # The spawn is appended before any child exists (a replay never spawns twice); a host killed
    # right after that append leaves children that do not exist. A redelivered start replays the
    # code and starts them, but a redelivered timer or signal activation found the run "parked
    # on its children" and skipped the code: the parent waited for ever.
    mark = tmp_path / "crashed"
    env = {"BIDE_TEST_CRASH_MARK": str(mark)}
    client = Bide(nats_server.url)
    first = WorkerProcess(APP, nats_server.url, env=env).start()
    second: WorkerProcess | None = None
    try:
        ref = await client.aio_run_no_wait_by_name(task, {"key": f"crash:{task}"})
        if task == "SpawnAfterEvent":
            async def waiting() -> bool:
                return (await client.runs.aio_get(ref.workflow_run_id)).status is RunStatus.WAITING

            await wait_until(waiting, timeout=15, what="the parent to wait for its event")
            await client.event.aio_push(f"crash:{task}", {"go": True})
        assert first.proc is not None
        await asyncio.to_thread(first.proc.wait, 20)
        assert mark.exists(), "the first host did not reach the spawn"
        second = WorkerProcess(APP, nats_server.url, env=env).start()
        assert await ref.aio_result(timeout=30) == [0, 1, 4]
    finally:
        first.kill()
        if second is not None:
            second.kill()
        await client.aclose()
