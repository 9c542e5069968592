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


async def test_a_registration_for_a_wait_resolved_at_once_is_withdrawn_though_the_host_died_after_the_end(
        nats_server: EmbeddedServer, tmp_path: Path) -> None:
    """A turn parks at a wait, registers it with the router and dies before its append (or loses
    it): the next turn resolves that wait at once from the run's inbox. When the run ends there and
    its host dies after the end's append, before the withdrawals, the redelivered activation must
    withdraw that registration too (the cluster chaos run, seed 50, left one for good)."""
    from actors.engine.wire import WaitRegistered, utcnow
    from actors.hosting.router_inputs import publish_registrations
    from tests.support import registrations

    mark = tmp_path / "crashed"
    env = {"BIDE_TEST_CRASH_MARK": str(mark), "BIDE_TEST_CRASH_AT": "withdraw_wait"}
    client = Bide(nats_server.url)
    first = WorkerProcess(APP, nats_server.url, env=env).start()
    second: WorkerProcess | None = None
    try:
        ref = await client.aio_run_no_wait_by_name("AtOnceThenEnd", {"key": "at-once"})
        run_id = ref.workflow_run_id

        async def asleep() -> bool:
            return any(e.k == "sleep_scheduled" for e in (await client.runs.aio_history(run_id)).entries)

        await wait_until(asleep, timeout=15, what="the run to sleep")
        # What the turn that parked at the wait and died before its append would have registered.
        conn = await client._pool.get()
        lost = WaitRegistered(pos=1, wait_id=f"{run_id}:1", label="event:at-once", args_hash="lost",
                              groups=[[{"kind": "event", "key": "event", "event_key": "at-once"}]], at=utcnow())
        await publish_registrations(conn.publisher, conn.layout, lost, run_id, "AtOnceThenEnd", {}, "register")
        await client.event.aio_send(run_id, "at-once", {"n": 1})
        assert first.proc is not None
        await asyncio.to_thread(first.proc.wait, 20)
        assert mark.exists(), "the first host did not reach the withdrawal"
        assert (await client.runs.aio_history(run_id)).terminal is not None  # it died after the end's append
        second = WorkerProcess(APP, nats_server.url, env=env).start()
        assert await ref.aio_result(timeout=30) == {"n": 1}

        async def withdrawn() -> bool:
            return await registrations(client, "at-once") == 0

        await wait_until(withdrawn, timeout=15, what="the registration of the wait resolved at once to be withdrawn")
    finally:
        first.kill()
        if second is not None:
            second.kill()
        await client.aclose()
