"""The seeds' children and DAG examples (``examples/workflows/worker.py``) against a real server."""

from __future__ import annotations

import importlib
import sys
from datetime import timedelta
from types import ModuleType
from typing import Any

import pytest

from actors.store.server import EmbeddedServer
from sdk import RunNotFoundError
from sdk.testing import BideTestEnv
from tests.support import running_worker, wait_until


@pytest.fixture
def examples(nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("BIDE_NATS_URL", nats_server.url)
    monkeypatch.setenv("BIDE_ACK_WAIT", "3")
    sys.modules.pop("examples.workflows.worker", None)
    return importlib.import_module("examples.workflows.worker")


async def _task_waiting(m: ModuleType, worker: Any, run_id: str, key: str) -> bool:
    """Whether task ``key`` of the workflow run waits, registered with the router (events now count)."""
    hist = await m.hatchet.runs.aio_history(run_id)
    for e in hist.entries:
        if e.k == "children_spawned" and e.task.endswith(f":{key}"):
            try:
                child = await m.hatchet.runs.aio_history(e.run_ids[0])
            except RunNotFoundError:
                return False  # recorded, not started yet
            index = worker.host.router.index
            return any(c.k == "wait_registered" for c in child.entries) and any(
                w.run_id == e.run_ids[0] for w in index.by_cid.values())
    return False


async def test_fan_out_parent(examples: ModuleType) -> None:
    m = examples
    async with running_worker(m.hatchet, m.worker.tasks):
        total = sum(i * i for i in range(10))
        assert await m.fan_out_parent.aio_run(m.ParentInput(n=10), timeout=30) == {
            "total": total, "extra": (total % 7) ** 2}


async def test_durable_workflow_of_two_root_tasks() -> None:
    sys.modules.pop("examples.workflows.worker", None)
    m = importlib.import_module("examples.workflows.worker")
    async with BideTestEnv(m.hatchet, workflows=m.worker.tasks) as env:
        ref = await m.durable_workflow.aio_run_no_wait()
        await env.skip(timedelta(seconds=m.SLEEP_TIME))  # its sleep, without waiting it out
        await wait_until(lambda: _task_waiting(m, env.worker, ref.workflow_run_id, "durable_task"), timeout=30,
                         what="durable_task waiting for its event")
        await m.hatchet.event.aio_push(m.EVENT_KEY, {"id": "evt-1"})
        out = await ref.aio_result(timeout=20)
        assert out == {"ephemeral_task": None, "durable_task": {
            "status": "success", "event_id": "evt-1", "sleep_duration_seconds": m.SLEEP_TIME}}


async def test_task_condition_workflow(examples: ModuleType) -> None:
    m = examples
    async with running_worker(m.hatchet, m.worker.tasks) as worker:
        ref = await m.task_condition_workflow.aio_run_no_wait()
        for key in ("wait_for_event", "skip_on_event"):
            await wait_until(lambda key=key: _task_waiting(m, worker, ref.workflow_run_id, key), timeout=20,
                             what=f"{key} waiting")
        await m.hatchet.event.aio_push("wait_for_event:start", {})
        await m.hatchet.event.aio_push("skip_on_event:skip", {})
        out = await ref.aio_result(timeout=20)
        start = out["start"].random_number
        assert out["skip_on_event"] == {"skipped": True}
        left_skipped = start > 50
        assert (out["left_branch"] == {"skipped": True}) is left_skipped
        expected = out["wait_for_event"].random_number + (0 if left_skipped else start)
        assert out["sum_task"] == {"sum": expected,
                                   "skipped": ["skip_on_event", *(["left_branch"] if left_skipped else [])]}
