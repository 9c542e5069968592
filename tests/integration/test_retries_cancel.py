"""Retries with backoff, timeouts and cancellation against a real nats-server."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from actors.engine.wire import EventSignal, utcnow
from actors.store.protocol import deliver_signal
from sdk import Bide, DurableContext, EmptyModel, RunCancelledError, RunFailedError, RunStatus
from tests.apps.children import FanOutInput, FlakyInput, define
from tests.support import running_worker, wait_until


def _lines(log: Path) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in log.read_text().splitlines()] if log.exists() else []


async def test_retries_with_backoff_count_attempts_and_keep_checkpoints(bide: Bide, tmp_path: Path) -> None:
    d = define(bide)
    log = tmp_path / "flaky.log"
    async with running_worker(bide, [d["flaky"]]):
        ref = await d["flaky"].aio_run_no_wait(FlakyInput(log=str(log), fail_times=2))
        assert await ref.aio_result(timeout=30) == {"attempt": 3, "seen": 1}
        # The memo before the failure ran once: a durable retry resumes from its checkpoints.
        assert _lines(log) == ["memo", "attempt 1", "attempt 2", "attempt 3"]
        hist = await bide.runs.aio_history(ref.workflow_run_id)
        failed = [e for e in hist.entries if e.k == "attempt_failed"]
        assert [f.attempt for f in failed] == [1, 2]
        assert "attempt 1 failed" in failed[0].error.message
        # backoff_factor=2, backoff_max_seconds=1.5: 2**0 = 1 s, then 2**1 = 2 s capped at 1.5 s.
        delays = [(f.retry_at - f.at).total_seconds() for f in failed]
        assert delays == pytest.approx([1.0, 1.5], abs=0.01)
        begun = [e.at for e in hist.entries if e.k == "activation"]
        assert (begun[1] - failed[0].at).total_seconds() >= 0.95
        assert (begun[2] - failed[1].at).total_seconds() >= 1.45


async def test_retries_run_out_and_non_retryable_fails_at_once(bide: Bide, tmp_path: Path) -> None:
    d = define(bide)
    log = tmp_path / "flaky.log"
    async with running_worker(bide, [d["flaky"], d["flaky_regular"]]):
        with pytest.raises(RunFailedError, match="attempt 3 failed"):
            await d["flaky_regular"].aio_run(FlakyInput(log=str(log), fail_times=5), timeout=30)
        assert _lines(log) == ["attempt 1", "attempt 2", "attempt 3"]  # retries=2: three attempts
        log.unlink()
        with pytest.raises(RunFailedError) as err:
            await d["flaky"].aio_run(FlakyInput(log=str(log), fail_times=5, non_retryable=True), timeout=30)
        assert err.value.error_type == "NonRetryableError"
        assert _lines(log) == ["memo", "attempt 1"]


async def test_execution_timeout_and_schedule_timeout(bide: Bide) -> None:
    d = define(bide)
    async with running_worker(bide, [d["slow"]]):
        with pytest.raises(RunFailedError) as err:
            await d["slow"].aio_run(EmptyModel(), timeout=30)
        assert err.value.error_type == "TaskTimeoutError"
    # No worker hosts LateStart yet: the run waits in the queue past its schedule_timeout.
    ref = await d["late_start"].aio_run_no_wait(EmptyModel())
    queued_at = time.monotonic()
    await wait_until(lambda: time.monotonic() - queued_at > 1.2, timeout=5, what="the schedule timeout to pass")
    async with running_worker(bide, [d["late_start"]]):
        with pytest.raises(RunFailedError) as err:
            await ref.aio_result(timeout=30)
        assert err.value.error_type == "ScheduleTimeoutError"
        # In time, the same task runs.
        assert await d["late_start"].aio_run(EmptyModel(), timeout=30) == "ran"


async def test_cancel_cascades_to_children_and_pending_waits(bide: Bide, tmp_path: Path) -> None:
    d = define(bide)
    log = tmp_path / "cancel.log"
    async with running_worker(bide, list(bide.tasks.values())) as worker:
        ref = await d["cancel_me"].aio_run_no_wait(FanOutInput(count=3, log=str(log)))
        rid = ref.workflow_run_id

        async def waiting() -> bool:
            hist = await bide.runs.aio_history(rid)
            return any(e.k == "wait_registered" for e in hist.entries)

        await wait_until(waiting, timeout=20, what="the parent waiting for its event")
        children = [f"{rid}~{i}~0" for i in range(3)]
        for c in children:
            await wait_until(lambda c=c: _status_is(bide, c, RunStatus.WAITING), timeout=20, what=f"{c} sleeping")
        index = worker.host.router.index
        await wait_until(lambda: any(w.run_id == rid for w in index.by_cid.values()), timeout=10,
                         what="the wait registered with the router")
        assert await bide.runs.aio_cancel(rid, reason="test says stop") is True
        with pytest.raises(RunCancelledError, match="test says stop"):
            await ref.aio_result(timeout=20)
        # The task saw the cancellation where it waited and cleaned up.
        assert "cleanup" in _lines(log)
        for c in children:
            await wait_until(lambda c=c: _status_is(bide, c, RunStatus.CANCELLED), timeout=20,
                             what=f"child {c} cancelled")
        # Its event wait is gone from the router: a late event resumes nothing.
        await wait_until(lambda: not any(w.run_id == rid for w in index.by_cid.values()), timeout=10,
                         what="the wait withdrawn from the router")
        assert await bide.runs.aio_cancel(rid) is False  # already finished


async def test_cancel_interrupts_a_running_regular_task(bide: Bide, tmp_path: Path) -> None:
    d = define(bide)
    log = tmp_path / "blocker.log"
    async with running_worker(bide, [d["blocker"]]):
        ref = await d["blocker"].aio_run_no_wait(FanOutInput(count=0, log=str(log)))
        await wait_until(lambda: "blocking" in _lines(log), timeout=20, what="the task running")
        assert await bide.runs.aio_cancel(ref.workflow_run_id, reason="no longer needed") is True
        with pytest.raises(RunCancelledError, match="no longer needed"):  # the reason travels with the broadcast
            await ref.aio_result(timeout=10)
        assert _lines(log) == ["blocking", "interrupted"]


async def _status_is(client: Bide, run_id: str, status: RunStatus) -> bool:
    try:
        return (await client.runs.aio_get(run_id)).status == status
    except Exception:
        return False



async def _noted(note: str) -> str:
    return note


async def test_a_cancel_that_stops_the_code_while_its_checkpoint_is_written_cancels_the_run(
        bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cancel broadcast stops the code where it is, even inside the write that records its
    last step before a wait (slow in a leader election: the long cluster chaos run, seed 56, saw
    8 s). The run is cancelled, not failed with the ``CancelledError`` that stopped the write."""

    @bide.durable_task(name="CancelMidWrite")
    async def cancel_mid_write(input: EmptyModel, ctx: DurableContext) -> dict[str, str]:
        await ctx.memo(_noted, "before the wait")
        await ctx.aio_wait_for_event("never:cancel-mid-write")
        return {"not": "cancelled"}

    async with running_worker(bide, [cancel_mid_write]) as worker:
        history = worker.host._history
        real_append = history.append
        writing, release = asyncio.Event(), asyncio.Event()

        async def slow_append(run_id: str, entries: list[Any], expected_seq: int, notify: str | None = None) -> int:
            if any(e.k == "memo" for e in entries):
                writing.set()
                await release.wait()  # the write of the step's result takes a while
            return await real_append(run_id, entries, expected_seq, notify)

        monkeypatch.setattr(history, "append", slow_append)
        try:
            ref = await cancel_mid_write.aio_run_no_wait(EmptyModel())
            await asyncio.wait_for(writing.wait(), 20)
            assert await bide.runs.aio_cancel(ref.workflow_run_id, reason="stop mid-write") is True
            with pytest.raises(RunCancelledError, match="stop mid-write"):
                await ref.aio_result(timeout=20)
        finally:
            release.set()


@pytest.mark.parametrize(("reason", "why"), [
    (None, "cancel reason must be a string, got NoneType: None"),
    (123, "cancel reason must be a string, got int: 123"),
    ("x" * 5000, "cancel reason is 5,000 bytes, more than the 4,096 allowed"),
    ("half a pair \ud800", "cancel reason is not valid UTF-8 (surrogates not allowed at character 12)"),
])
async def test_a_cancel_with_a_bad_reason_is_refused_and_cancels_nothing(bide: Bide, reason: Any, why: str) -> None:
    @bide.durable_task(name="NotCancelledByABadReason")
    async def waits(input: EmptyModel, ctx: DurableContext) -> None:
        await ctx.aio_wait_for_event("never:bad-reason")

    ref = await waits.aio_run_no_wait(EmptyModel())
    with pytest.raises(ValueError, match=re.escape(why)):
        await bide.runs.aio_cancel(ref.workflow_run_id, reason=reason)
    with pytest.raises(ValueError, match=re.escape(why)):
        await asyncio.to_thread(bide.runs.cancel, ref.workflow_run_id, reason)
    assert (await bide.runs.aio_get(ref.workflow_run_id)).status == RunStatus.QUEUED  # nothing was asked of it


@pytest.mark.parametrize("payload", [{"reason": 123}, {"reason": ["x"]}, [1, 2], "stop", None])
async def test_a_cancel_signal_with_a_malformed_reason_cancels_the_run(bide: Bide, payload: Any) -> None:
    """Whoever may publish on a run's inbox can send a cancel with any payload (the SDK and the
    HTTP API refuse a bad reason, a ``nats pub`` does not): the run is cancelled, with the reason
    ``cancelled``, instead of every turn failing on an end that cannot hold it."""

    @bide.durable_task(name="CancelledByAForgedSignal")
    async def waits(input: EmptyModel, ctx: DurableContext) -> None:
        await ctx.aio_wait_for_event("never:forged-cancel")

    async with running_worker(bide, [waits]):
        ref = await waits.aio_run_no_wait(EmptyModel())
        rid = ref.workflow_run_id
        await wait_until(lambda: _status_is(bide, rid, RunStatus.WAITING), timeout=20, what="the run waiting")
        conn = await bide._pool.get()
        forged = EventSignal(source="cancel", name="cancel", payload=payload, event_id=f"forged-{rid}", at=utcnow())
        await deliver_signal(conn.publisher, conn.layout.subjects, rid, "CancelledByAForgedSignal", forged)
        with pytest.raises(RunCancelledError, match="was cancelled: cancelled"):
            await ref.aio_result(timeout=20)


async def test_a_durable_run_that_swallows_the_cancel_still_ends_cancelled(bide: Bide) -> None:
    """Its code may clean up in ``except asyncio.CancelledError`` (and even return): the run
    ends cancelled, with the reason given, and what the code returned is not its result."""

    @bide.durable_task(name="SwallowsTheCancel")
    async def swallows(input: EmptyModel, ctx: DurableContext) -> str:
        try:
            await ctx.aio_wait_for_event("never:swallowed")
        except asyncio.CancelledError:
            return "swallowed"
        return "resumed"

    async with running_worker(bide, [swallows]):
        ref = await swallows.aio_run_no_wait(EmptyModel())
        rid = ref.workflow_run_id
        await wait_until(lambda: _status_is(bide, rid, RunStatus.WAITING), timeout=20, what="the run waiting")
        assert await bide.runs.aio_cancel(rid, reason="stop anyway") is True
        with pytest.raises(RunCancelledError, match="stop anyway"):
            await ref.aio_result(timeout=20)


async def test_a_cancel_taken_with_a_timer_is_not_lost_when_the_code_continues_as_new(bide: Bide) -> None:
    """A cancel sent while no host runs, after the run's sleep fell due, is taken by the same
    turn as the timer: the code goes past its sleep and calls ``continue_as_new``. The run ends
    cancelled; the next generation, whose start marks that cancel as taken, would run for ever."""

    @bide.durable_task(name="LoopsForever")
    async def loops(input: dict[str, int], ctx: DurableContext) -> None:
        await ctx.aio_sleep_for(timedelta(seconds=1))
        ctx.continue_as_new({"gen": input["gen"] + 1})

    async with running_worker(bide, [loops]):
        ref = await loops.aio_run_no_wait({"gen": 0})
        rid = ref.workflow_run_id
        await wait_until(lambda: _status_is(bide, rid, RunStatus.WAITING), timeout=20, what="the run asleep")
    # No host now: the sleep falls due, then the cancel comes; the next host takes both at once.
    began = time.monotonic()
    await wait_until(lambda: time.monotonic() - began > 2.5, timeout=10, what="the sleep to fall due")
    assert await bide.runs.aio_cancel(rid, reason="stop the loop") is True
    async with running_worker(bide, [loops]):
        with pytest.raises(RunCancelledError, match="stop the loop"):
            await ref.aio_result(timeout=20)
