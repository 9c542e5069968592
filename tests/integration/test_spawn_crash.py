"""A host killed between a turn's append and its effects: the next host carries them out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from actors.store.server import EmbeddedServer
from sdk import Bide, RunStatus
from tests.support import WorkerProcess, wait_until

APP = "tests.apps.spawn_crash:worker"


@pytest.mark.parametrize(("task", "effect"), [
    ("SpawnAfterEvent", "start_children"), ("SpawnAfterSleep", "start_children"), ("SpawnAtStart", "start_children"),
    ("SleepAfterEvent", "schedule_timer"),
])
async def test_what_a_turn_recorded_is_carried_out_though_its_host_died_before_doing_it(
        nats_server: EmbeddedServer, tmp_path: Path, task: str, effect: str) -> None:
    # The spawn is appended before any child exists (a replay never spawns twice), and a sleep's
    # wake time before its timer: a host killed right after such an append leaves children that
    # do not exist, or a sleep with no timer. A redelivered start replays the code and redoes
    # them, but a redelivered timer or signal activation found the run "parked" and skipped the
    # code: the run waited for ever.
    mark = tmp_path / "crashed"
    env = {"BIDE_TEST_CRASH_MARK": str(mark), "BIDE_TEST_CRASH_AT": effect}
    client = Bide(nats_server.url)
    first = WorkerProcess(APP, nats_server.url, env=env).start()
    second: WorkerProcess | None = None
    try:
        ref = await client.aio_run_no_wait_by_name(task, {"key": f"crash:{task}"})
        if task.endswith("AfterEvent"):
            async def waiting() -> bool:
                return (await client.runs.aio_get(ref.workflow_run_id)).status is RunStatus.WAITING

            await wait_until(waiting, timeout=15, what="the parent to wait for its event")
            await client.event.aio_push(f"crash:{task}", {"go": True})
        assert first.proc is not None
        await asyncio.to_thread(first.proc.wait, 20)
        assert mark.exists(), f"the first host did not reach {effect}"
        second = WorkerProcess(APP, nats_server.url, env=env).start()
        assert await ref.aio_result(timeout=30) == [0, 1, 4]
    finally:
        first.kill()
        if second is not None:
            second.kill()
        await client.aclose()
