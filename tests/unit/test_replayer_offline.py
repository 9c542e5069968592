"""The replay engine with no server: histories written by hand, replayed against code (sdk.testing.replay)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from actors.engine.run_history import RunHistory
from actors.engine.wire import ActivationBegun, MemoRecorded, PatchMarked, RunCompleted, RunStarted, args_hash
from sdk import Bide, DurableContext, EmptyModel, NonDeterminismError
from sdk.testing import replay

AT = datetime(2026, 1, 1, tzinfo=UTC)
CALLS: list[str] = []


def fetch(n: int) -> int:
    CALLS.append("fetch")
    return n * 2


def store(n: int) -> str:
    CALLS.append("store")
    return f"stored {n}"


def history(*entries: Any, done: Any = None) -> RunHistory:
    started = RunStarted(run_id="r1", task="Job", durable=True, input={}, at=AT)
    tail = [RunCompleted(result=done, at=AT)] if done is not None else []
    return RunHistory(run_id="r1", entries=[started, ActivationBegun(host="h", delivery=1, at=AT), *entries, *tail])


def memo(pos: int, fn: Any, *args: Any, result: Any) -> MemoRecorded:
    return MemoRecorded(pos=pos, name=fn.__qualname__, args_hash=args_hash(*args), result=result)


def job(body: Any) -> Any:
    bide = Bide("nats://127.0.0.1:1")

    @bide.durable_task(name="Job")
    async def run(input: EmptyModel, ctx: DurableContext) -> Any:
        return await body(ctx)

    return run


def test_recorded_steps_are_not_run_again_and_new_ones_are_not_run_at_all() -> None:
    CALLS.clear()

    async def body(ctx: DurableContext) -> Any:
        a = await ctx.memo(fetch, 2)
        return await ctx.memo(store, a)

    replay(history(memo(0, fetch, 2, result=4)), [job(body)])  # a live run: stops where its history ends
    replay(history(memo(0, fetch, 2, result=4), memo(1, store, 4, result="stored 4"), done="stored 4"), [job(body)])
    assert CALLS == []


def test_a_changed_argument_is_named_with_its_position() -> None:
    async def body(ctx: DurableContext) -> Any:
        return await ctx.memo(fetch, 3)

    with pytest.raises(NonDeterminismError) as err:
        replay(history(memo(0, fetch, 2, result=4)), [job(body)])
    assert err.value.position == 0 and "args hash" in err.value.recorded


def test_code_that_ends_before_the_recorded_steps_is_a_mismatch() -> None:
    async def body(ctx: DurableContext) -> Any:
        return await ctx.memo(fetch, 2)

    with pytest.raises(NonDeterminismError) as err:
        replay(history(memo(0, fetch, 2, result=4), memo(1, store, 4, result="s"), done="s"), [job(body)])
    assert err.value.position == 1 and "store" in err.value.recorded and "end" in err.value.requested


def test_patched_takes_the_recorded_path() -> None:
    async def body(ctx: DurableContext) -> Any:
        if ctx.patched("double-store"):
            await ctx.memo(store, 1)
        return await ctx.memo(fetch, 2)

    old = history(memo(0, fetch, 2, result=4), done=4)  # recorded before the change: no marker
    new = history(PatchMarked(pos=0, change_id="double-store"), memo(1, store, 1, result="s"),
                  memo(2, fetch, 2, result=4), done=4)
    replay(old, [job(body)])
    replay(new, [job(body)])

    async def other_patch(ctx: DurableContext) -> Any:
        ctx.patched("another-change")
        return await ctx.memo(fetch, 2)

    with pytest.raises(NonDeterminismError, match="double-store"):
        replay(new, [job(other_patch)])


def test_a_regular_task_has_nothing_to_replay() -> None:
    bide = Bide("nats://127.0.0.1:1")

    @bide.task(name="Job")
    def plain(input: EmptyModel, ctx: Any) -> None:
        return None

    with pytest.raises(ValueError, match="not durable"):
        replay(history(), [plain])
