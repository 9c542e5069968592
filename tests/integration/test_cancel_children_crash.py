"""A host killed after a parent's end is durable, before it asked the children to stop.

The parent's wind-up (``CancelChildren``) ran as a background chore after the terminal append
and nothing redid it: the children slept on for good. Now the activation is acked only once
every child's cancel is stored, and a redelivery to the ended parent (``ActorHost._ended``)
redoes the whole wind-up (``end_of_run``) under the same ids: for a cancelled parent, and for
a workflow that failed, which stops its tasks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors.engine.wire import ChildrenSpawned
from actors.store.server import EmbeddedServer
from sdk import Bide
from tests.support import WorkerProcess, wait_until

APP = "tests.apps.cancel_crash:worker"
N = 5


@dataclass
class CrashingHosts:
    """A first host that SIGKILLs itself at its first child cancel, and a second started after it."""

    client: Bide
    url: str
    mark: Path
    first: WorkerProcess
    second: WorkerProcess | None = None

    async def first_died_cancelling(self, timeout: float) -> None:
        assert self.first.proc is not None
        await asyncio.to_thread(self.first.proc.wait, timeout)
        assert self.mark.exists(), "the first host never began cancelling the children"

    def start_second(self) -> None:
        self.second = WorkerProcess(APP, self.url, env={"BIDE_TEST_CRASH_MARK": str(self.mark)}).start()


@pytest.fixture
async def hosts_crashing(nats_server: EmbeddedServer, tmp_path: Path) -> AsyncIterator[CrashingHosts]:
    mark = tmp_path / "crashed"
    first = WorkerProcess(APP, nats_server.url, env={"BIDE_TEST_CRASH_MARK": str(mark)}).start()
    hosts = CrashingHosts(Bide(nats_server.url, ack_wait=3.0), nats_server.url, mark, first)
    try:
        yield hosts
    finally:
        first.kill()
        if hosts.second is not None:
            hosts.second.kill()
        await hosts.client.aclose()


async def test_children_of_a_cancelled_parent_are_cancelled_though_its_host_died_in_the_wind_up(
        hosts_crashing: CrashingHosts) -> None:
    client = hosts_crashing.client
    ref = await client.aio_run_no_wait_by_name("CrashParent", {"n": N})
    parent = ref.workflow_run_id

    async def children() -> list[str]:
        hist = await client.runs.aio_history(parent)
        return [rid for e in hist.entries if isinstance(e, ChildrenSpawned) for rid in e.run_ids]

    async def all_asleep() -> bool:
        ids = await children()
        if len(ids) < N:
            return False
        for rid in ids:
            try:
                h = await client.runs.aio_history(rid)
            except Exception:
                return False
            if h.entries[-1].k != "sleep_scheduled":
                return False
        return True

    await wait_until(all_asleep, timeout=30, interval=0.1, what="every child asleep")
    ids = await children()
    assert await client.runs.aio_cancel(parent, reason="test")
    await hosts_crashing.first_died_cancelling(20)
    assert (await client.runs.aio_get(parent)).status.value == "cancelled"  # the end is durable

    hosts_crashing.start_second()
    deadline = time.monotonic() + 30  # ack wait 3 s: a redelivery would have come long before
    ended: dict[str, str | None] = {}
    while time.monotonic() < deadline:
        for rid in ids:
            term = (await client.runs.aio_history(rid)).terminal
            ended[rid] = term.k if term is not None else None
        if all(v is not None for v in ended.values()):
            break
        await asyncio.sleep(0.5)
    assert ended == dict.fromkeys(ids, "run_cancelled"), f"children not cancelled: {ended}"


async def test_tasks_of_a_failed_workflow_are_cancelled_though_its_host_died_in_the_wind_up(
        hosts_crashing: CrashingHosts) -> None:
    """A workflow that fails stops its running tasks; a redelivery to the ended workflow asks again."""
    client = hosts_crashing.client
    ref = await client.aio_run_no_wait_by_name("CrashFlow", {})
    await hosts_crashing.first_died_cancelling(30)
    hist = await client.runs.aio_history(ref.workflow_run_id)
    assert hist.terminal is not None and hist.terminal.k == "run_failed"  # the end is durable
    [hang] = [rid for e in hist.entries if isinstance(e, ChildrenSpawned) and e.task.endswith("hang")
              for rid in e.run_ids]

    hosts_crashing.start_second()

    async def hang_ended() -> str | None:
        term = (await client.runs.aio_history(hang)).terminal
        return term.k if term is not None else None

    # ack wait 3 s: a redelivery comes within seconds; the task sleeps 600 s.
    await wait_until(hang_ended, timeout=30, interval=0.5, what="the workflow's sleeping task ended")
    assert await hang_ended() == "run_cancelled"
