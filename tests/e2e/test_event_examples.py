"""The seeds' event-wait examples (``examples/events/worker.py``) against a real server."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import pytest

from actors.store.server import EmbeddedServer
from sdk import RunStatus
from sdk.errors import RunNotFoundError
from tests.support import running_worker, wait_until


@pytest.fixture
def examples(nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("BIDE_NATS_URL", nats_server.url)
    monkeypatch.setenv("BIDE_ACK_WAIT", "3")
    sys.modules.pop("examples.events.worker", None)
    return importlib.import_module("examples.events.worker")


async def _waiting(mod: ModuleType, run_id: str, waits: int = 1) -> None:
    async def ok() -> bool:
        hist = await mod.hatchet.runs.aio_history(run_id)
        # A workflow's run waits through its tasks' runs (its children).
        children = [rid for e in hist.entries if e.k == "children_spawned" for rid in e.run_ids]
        for rid in [run_id, *children]:
            try:
                h = await mod.hatchet.runs.aio_history(rid)
            except RunNotFoundError:  # a task's run spawned, its start entry on its way
                continue
            if sum(e.k == "wait_registered" for e in h.entries) >= waits and (
                    (await mod.hatchet.runs.aio_get(rid)).status is RunStatus.WAITING):
                return True
        return False

    await wait_until(ok, timeout=15, what=f"run {run_id} to wait")


async def _runs_of(mod: ModuleType, task: str, count: int) -> list[Any]:
    """The histories of the ``count`` runs of ``task`` that events started (their ids are new)."""
    found: list[Any] = []

    async def ok() -> bool:
        found.clear()
        conn = await mod.hatchet._pool.get()
        s = conn.layout.subjects
        info = await conn.js.stream_info(s.history_stream, subjects_filter=f"{s.prefix}.history.>")
        for subject in info.state.subjects or {}:
            hist = await mod.hatchet.runs.aio_history(subject.rsplit(".", 1)[1])
            if hist.entries[0].task == task:
                found.append(hist)
        return len(found) >= count

    await wait_until(ok, what=f"{count} runs of {task}")
    return found


async def test_hatchet_examples(examples: ModuleType) -> None:
    m = examples
    async with running_worker(m.hatchet, m.worker.tasks):
        plain = await m.durable_event_task.aio_run_no_wait()
        filtered = await m.durable_event_task_with_filter.aio_run_no_wait()
        await _waiting(m, plain.workflow_run_id)
        await _waiting(m, filtered.workflow_run_id)
        await m.hatchet.event.aio_push("user:update", {"user_id": "42"})
        assert await plain.aio_result(timeout=10) is None
        assert (await m.hatchet.runs.aio_get(filtered.workflow_run_id)).status is RunStatus.WAITING
        await m.hatchet.event.aio_push("user:update", {"user_id": "1234"})
        assert await filtered.aio_result(timeout=10) == {"got": {"user_id": "1234"}}

        # Lookback: the event came first, under the scope the wait names.
        await m.hatchet.event.aio_push("user:create", {"user_id": 5, "name": "Ada"}, scope="user_id:5")
        assert await m.durable_lookback_task.aio_run(m.LookbackInput(user_id=5), timeout=10) == {
            "user_id": 5, "name": "Ada"}

        # The workflow examples, with the seed's own trigger code (push from the application).
        ref = m.durable_workflow.run_no_wait()
        await _waiting(m, ref.workflow_run_id)
        m.hatchet.event.push(m.EVENT_KEY, m.AwaitedEvent(id="123").model_dump(mode="json"))
        assert await ref.aio_result(timeout=10) == {"durable_task": {"status": "success", "event_id": "123"}}

        ref = await m.or_workflow.aio_run_no_wait()
        await _waiting(m, ref.workflow_run_id)
        await m.hatchet.event.aio_push(m.EVENT_KEY, {"id": "x"})
        assert await ref.aio_result(timeout=10) == {"wait_for_or_group_1": {"key": m.EVENT_KEY}}


async def test_inngest_examples_triggered_by_events(examples: ModuleType) -> None:
    m = examples
    async with running_worker(m.hatchet, m.worker.tasks):
        await m.hatchet.event.aio_push("app/account.created", {"data": {"userId": "u1"}})
        await m.hatchet.event.aio_push("app/account.created", {"data": {"userId": "u2"}})
        await wait_until(lambda: sorted(t for _, t in m.sent_emails) == ["welcome", "welcome"],
                         what="both welcome emails")
        # A wait sees events sent after it began (Inngest's rule): wait for both runs to wait.
        for hist in await _runs_of(m, "send-onboarding-nudge-email", count=2):
            await _waiting(m, hist.run_id)
        # u2's completion must not wake u1's run (match="data.userId").
        await m.hatchet.event.aio_push("app/onboarding.completed", {"data": {"userId": "u2"}})
        await wait_until(lambda: ("u2", "new_user_tips") in m.sent_emails, what="u2's tips email")
        assert ("u1", "new_user_tips") not in m.sent_emails

        await m.hatchet.event.aio_push("ai/post.generator.requested", {"data": {"prompt": "p1"}})
        await m.hatchet.event.aio_push("ai/post.topic.selected", {"data": {"completionId": "other", "topic": "no"}})
        (blog,) = await _runs_of(m, "generate-blog-post-with-ai", count=1)
        await _waiting(m, blog.run_id)
        await m.hatchet.event.aio_push("ai/post.topic.selected", {"data": {"completionId": "cmpl-p1", "topic": "ok"}})
        run_id = blog.run_id
        assert await m.hatchet.runs.aio_result(run_id, timeout=10) == {"topic": "ok"}


async def test_zart_examples_direct_delivery(examples: ModuleType) -> None:
    m = examples
    async with running_worker(m.hatchet, m.worker.tasks):
        ref = await m.order_approval.aio_run_no_wait(m.OrderData(order_id="o-1"))
        await _waiting(m, ref.workflow_run_id)
        receipt = await m.hatchet.event.aio_offer_event(
            ref.workflow_run_id, "manager-approval", {"approved": True, "reviewer": "jane@example.com"})
        assert receipt.as_dict()["status"] == "delivered"
        assert await ref.aio_result(timeout=10) == {
            "order_id": "o-1", "status": "fulfilled", "reviewer": "jane@example.com"}
        # The typed timeout: nobody approves within a second.
        late = await m.order_approval.aio_run(m.OrderData(order_id="o-2", approval_timeout_s=1), timeout=15)
        assert late == {"order_id": "o-2", "status": "escalated"}
