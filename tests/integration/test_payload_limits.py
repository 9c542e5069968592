"""Payload limits at every way in (SDK, host results, HTTP, CLI), against a real nats-server.

A payload near the server's 1 MiB used to be accepted and then fail inside Bide (its
envelopes add bytes); JSON nested deeper than the encoders can write and integers outside
int64 failed late too. Each is now refused where it comes in, naming the limit.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from actors.apps.http_api import create_app
from actors.store.server import EmbeddedServer
from sdk import (
    Bide,
    Context,
    DurableContext,
    EmptyModel,
    PayloadLimitError,
    PayloadTooLargeError,
    RunFailedError,
    RunStatus,
)
from tests.e2e.test_cli_events import cli
from tests.support import running_worker

NEAR_ONE_MIB = "x" * 1_000_000
OVER_DEFAULT = "x" * 300_000  # over the default 256 KiB
LIMIT_TEXT = "262,144 bytes (256 KiB) (BIDE_MAX_PAYLOAD)"
LIMIT_RE = re.escape(LIMIT_TEXT)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


async def stored_events(bide: Bide) -> int:
    conn = await bide._pool.get()
    info = await conn.js.stream_info(conn.layout.subjects.events_stream)
    return int(info.state.messages)


async def test_sdk_push_and_send_refuse_payloads_over_the_limit_before_publishing(bide: Bide) -> None:
    before = await stored_events(bide)
    for payload in (NEAR_ONE_MIB, OVER_DEFAULT):
        with pytest.raises(PayloadTooLargeError, match=rf"the payload of event 'big' is over Bide's limit of "
                                                       rf"{LIMIT_RE}: it has {len(payload) + 2:,} bytes"):
            await bide.event.aio_push("big", payload)
    with pytest.raises(PayloadTooLargeError, match="payload and metadata together"):
        await bide.event.aio_push("big", "x" * 200_000, metadata={"note": "y" * 100_000})
    with pytest.raises(PayloadLimitError, match=r"the integer 9223372036854775808 at \['n'\]"):
        await bide.event.aio_push("big", {"n": 2**63})
    with pytest.raises(PayloadLimitError, match="64 levels of nesting"):
        await bide.event.aio_push("big", nested(65))
    with pytest.raises(PayloadTooLargeError):  # bulk: checked before any event is published
        await bide.event.aio_bulk_push([{"key": "ok", "payload": 1}, {"key": "big", "payload": OVER_DEFAULT}])
    assert await stored_events(bide) == before
    with pytest.raises(PayloadTooLargeError, match="the payload of event 'poke' for run some-run"):
        await bide.event.aio_send("some-run", "poke", NEAR_ONE_MIB)
    ok = await bide.event.aio_push("fine", {"n": 2**63 - 1, "deep": nested(63), "s": "x" * 200_000})
    assert ok.seq > 0


async def test_a_configured_limit_is_the_one_applied(nats_server: EmbeddedServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDE_MAX_PAYLOAD", "512KiB")
    async with Bide(nats_server.url) as bide:
        assert (await bide.event.aio_push("big", OVER_DEFAULT)).seq > 0
        with pytest.raises(PayloadTooLargeError, match=r"524,288 bytes \(512 KiB\)"):
            await bide.event.aio_push("big", NEAR_ONE_MIB)


async def test_run_inputs_over_the_limit_are_refused_and_no_run_is_created(bide: Bide) -> None:
    @bide.task(name="TakesAnything")
    def takes_anything(input: Any, ctx: Context) -> Any:
        return input

    for bad, match in ((NEAR_ONE_MIB, LIMIT_RE), ({"n": -(2**63) - 1}, "-9223372036854775809"),
                       (nested(100), "64 levels")):
        with pytest.raises(PayloadLimitError, match=match):
            await takes_anything.aio_run_no_wait(bad, run_id="too-big")
        with pytest.raises(PayloadLimitError, match=match):
            await takes_anything.aio_run(bad)
    async with running_worker(bide, [takes_anything]):
        with pytest.raises(PayloadLimitError, match=LIMIT_RE):  # by name, as the CLI starts runs
            await bide.aio_run_no_wait_by_name("TakesAnything", NEAR_ONE_MIB)
        assert await takes_anything.aio_run({"n": 2**63 - 1}, timeout=10) == {"n": 2**63 - 1}
    with pytest.raises(Exception, match="no run with id 'too-big'"):
        await bide.runs.aio_get("too-big")


async def test_a_result_over_the_limit_fails_the_run_once_without_a_retry(bide: Bide) -> None:
    attempts: list[int] = []

    @bide.task(name="ReturnsTooMuch", retries=3)
    def returns_too_much(input: EmptyModel, ctx: Context) -> str:
        attempts.append(1)
        return NEAR_ONE_MIB

    @bide.durable_task(name="MemoTooMuch")
    async def memo_too_much(input: EmptyModel, ctx: DurableContext) -> int:
        def big() -> dict[str, int]:
            return {"n": 2**64}

        return len(await ctx.memo(big))

    async with running_worker(bide, [returns_too_much, memo_too_much]):
        with pytest.raises(RunFailedError, match=rf"OutputSerializationError: the result of task 'ReturnsTooMuch' "
                                                 rf"is over Bide's limit of {LIMIT_RE}") as failed:
            await returns_too_much.aio_run(EmptyModel(), timeout=20)
        assert attempts == [1]  # the code returned: a retry would only return the same again
        info = await bide.runs.aio_get(failed.value.run_id)
        assert info.status is RunStatus.FAILED
        with pytest.raises(RunFailedError, match=r"PayloadLimitError: the result of memo '.*big' in run .* the integer "
                                                 r"18446744073709551616"):
            await memo_too_much.aio_run(EmptyModel(), timeout=20)


async def test_a_child_input_over_the_limit_fails_at_the_spawn(bide: Bide) -> None:
    @bide.task(name="LimitChild")
    def limit_child(input: Any, ctx: Context) -> Any:
        return input

    @bide.durable_task(name="LimitParent")
    async def limit_parent(input: EmptyModel, ctx: DurableContext) -> str:
        try:
            await limit_child.aio_run(OVER_DEFAULT)
        except PayloadTooLargeError as e:
            return f"refused: {e}"
        return "spawned"

    async with running_worker(bide, [limit_child, limit_parent]):
        result = await limit_parent.aio_run(EmptyModel(), timeout=20)
        assert result.startswith("refused: input for task 'LimitChild' is over Bide's limit")


async def test_http_api_refuses_payloads_over_the_limits(bide: Bide) -> None:
    app = create_app(bide, None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bide.test",
                                 headers={"Content-Type": "application/json"}) as api:
        before = await stored_events(bide)
        big = await api.post("/api/v1/events", json={"key": "k", "payload": NEAR_ONE_MIB[:900_000]})
        assert big.status_code == 413, big.text
        assert LIMIT_TEXT in big.json()["detail"]
        raw = await api.post("/api/v1/webhooks/k", content=b'"' + OVER_DEFAULT.encode() + b'"')
        assert raw.status_code == 413 and LIMIT_TEXT in raw.json()["detail"]
        huge_int = await api.post("/api/v1/webhooks/k", content=b'{"id": 123456789012345678901234567890}')
        assert huge_int.status_code == 400
        assert "the integer 123456789012345678901234567890 at ['id']" in huge_int.json()["detail"]
        deep = await api.post("/api/v1/webhooks/k", content=b"[" * 100 + b"]" * 100)
        assert deep.status_code == 400 and "64 levels of nesting" in deep.json()["detail"]
        deep_field = await api.post("/api/v1/events", content=b'{"key": "k", "payload": ' + b"[" * 3000
                                    + b"]" * 3000 + b"}", headers={"Content-Type": "application/json"})
        assert deep_field.status_code == 400, deep_field.text
        delivered = await api.post("/api/v1/events/some-run/poke", content=b'"' + OVER_DEFAULT.encode() + b'"')
        assert delivered.status_code == 413 and LIMIT_TEXT in delivered.json()["detail"]
        assert await stored_events(bide) == before


async def test_cli_refuses_payloads_over_the_limits(nats_server: EmbeddedServer, bide: Bide,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url = nats_server.url
    monkeypatch.setenv("BIDE_MAX_PAYLOAD", "4KiB")  # an argument cannot be as large as the default limit
    out = await cli("event", "push", "k", "--data", f'"{"x" * 5000}"', url=url)
    assert out.returncode == 2 and "4,096 bytes (4 KiB) (BIDE_MAX_PAYLOAD)" in out.stderr, out.stderr
    out = await cli("event", "push", "k", "--data", '{"n": 99999999999999999999}', url=url)
    assert out.returncode == 2 and "the integer 99999999999999999999" in out.stderr, out.stderr
    out = await cli("event", "push", "k", "--data", "[" * 5000 + "]" * 5000, url=url)
    assert out.returncode == 2 and "nested" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert await stored_events(bide) == 0



async def test_an_input_and_a_memo_at_the_ceiling_fit_a_new_runs_first_write(
        nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new run id's start goes with its first turn's first write: at the highest limit, the start's
    input and a memo's result together are more than one message holds, and the write is split."""
    monkeypatch.setenv("BIDE_MAX_PAYLOAD", "768KiB")
    near = 768 * 1024 - 1024

    async with Bide(nats_server.url) as bide:
        @bide.durable_task(name="BigInBigMemo")
        async def big_in_big_memo(input: dict[str, str], ctx: DurableContext) -> int:
            def echo() -> str:
                return input["s"][::-1]

            return len(await ctx.memo(echo)) + len(input["s"])

        async with running_worker(bide, [big_in_big_memo]):
            ref = await big_in_big_memo.aio_run_no_wait({"s": "y" * near})
            assert await ref.aio_result(timeout=30) == 2 * near
            hist = await bide.runs.aio_history(ref.workflow_run_id)
            assert [e.k for e in hist.entries] == ["run_started", "activation", "memo", "run_completed"]
