"""Durable event waits against a real server: keys, CEL, scope, lookback, or-groups, direct delivery."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from sdk import (
    Bide,
    DurableContext,
    EmptyModel,
    EventTimeout,
    InvalidExpression,
    RunAlreadyFinishedError,
    RunFailedError,
    RunStatus,
    SleepCondition,
    UserEventCondition,
    or_,
)
from tests.support import running_worker, wait_until


async def waiting(bide: Bide, run_id: str, timeout: float = 10.0) -> None:
    """Until the run has registered its wait (and been evicted)."""

    async def _is_waiting() -> bool:
        hist = await bide.runs.aio_history(run_id)
        return any(e.k == "wait_registered" for e in hist.entries) and (
            (await bide.runs.aio_get(run_id)).status is RunStatus.WAITING
        )

    await wait_until(_is_waiting, timeout=timeout, what=f"run {run_id} to wait")


class AwaitedEvent(BaseModel):
    id: str


async def test_wait_for_event_by_key(bide: Bide) -> None:
    @bide.durable_task(name="DurableEventTask")
    async def durable_event_task(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        res = await ctx.aio_wait_for_event("user:update")
        return {"got": res}

    async with running_worker(bide, [durable_event_task]):
        ref = await durable_event_task.aio_run_no_wait(EmptyModel())
        await waiting(bide, ref.workflow_run_id)
        await bide.event.aio_push("user:update", {"user_id": "1234"})
        assert await ref.aio_result(timeout=10) == {"got": {"user_id": "1234"}}


async def test_cel_filter_and_payload_validator(bide: Bide) -> None:
    @bide.durable_task(name="Filtered")
    async def filtered(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        res = await ctx.aio_wait_for_event("user:update", "input.user_id == '1234'")
        ev = await ctx.aio_wait_for_event("durable-example:event", "true", payload_validator=AwaitedEvent)
        return {"first": res, "id": ev.id}

    async with running_worker(bide, [filtered]):
        ref = await filtered.aio_run_no_wait(EmptyModel())
        await waiting(bide, ref.workflow_run_id)
        await bide.event.aio_push("user:update", {"user_id": "999"})
        await bide.event.aio_push("user:update", {"user_id": 1234})  # a number is not the string '1234'
        await bide.event.aio_push("user:update", {"user_id": "1234", "n": 1})

        async def on_second_wait() -> bool:
            hist = await bide.runs.aio_history(ref.workflow_run_id)
            return sum(e.k == "wait_registered" for e in hist.entries) == 2

        await wait_until(on_second_wait, what="the second wait")
        await bide.event.aio_push("durable-example:event", AwaitedEvent(id="123").model_dump(mode="json"))
        assert await ref.aio_result(timeout=10) == {"first": {"user_id": "1234", "n": 1}, "id": "123"}


async def test_or_group_sleep_wins_and_event_never_resumes(bide: Bide) -> None:
    resumed: list[str] = []

    @bide.durable_task(name="OrGroup")
    async def or_group(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        res = await ctx.aio_wait_for(
            "either", or_(SleepCondition(timedelta(seconds=1)), UserEventCondition(event_key="or:event"))
        )
        resumed.append(next(iter(res)))
        return {"key": next(iter(res))}

    async with running_worker(bide, [or_group]) as worker:
        ref = await or_group.aio_run_no_wait(EmptyModel())
        assert await ref.aio_result(timeout=10) == {"key": "sleep:1s"}
        hist_before = await bide.runs.aio_history(ref.workflow_run_id)
        router = worker.host.router
        routed = router.events_routed
        await bide.event.aio_push("or:event", {})
        await wait_until(lambda: router.events_routed > routed, what="the router to see the late event")
        turns = worker.host.turns
        # A marker run proves the host has drained anything the late event could have caused.
        assert await or_group.aio_run(EmptyModel(), timeout=10) == {"key": "sleep:1s"}
        assert worker.host.turns == turns + 2
        hist = await bide.runs.aio_history(ref.workflow_run_id)
        assert [e.k for e in hist.entries].count("wait_resolved") == 1
        assert len(hist.entries) == len(hist_before.entries)
        assert resumed == ["sleep:1s", "sleep:1s"]


async def test_timeout_returns_none_or_raises(bide: Bide) -> None:
    @bide.durable_task(name="TimesOut")
    async def times_out(input: dict, ctx: DurableContext) -> dict[str, Any]:
        got = await ctx.aio_wait_for_event("never:comes", timeout="1s")
        try:
            await ctx.aio_wait_for_event("never:comes", timeout=timedelta(seconds=1), raise_on_timeout=True)
            raised = False
        except EventTimeout:
            raised = True
        return {"got": got, "raised": raised}

    async with running_worker(bide, [times_out]):
        assert await times_out.aio_run({}, timeout=15) == {"got": None, "raised": True}


async def test_direct_delivery_before_after_and_fifo(bide: Bide) -> None:
    @bide.durable_task(name="Approval")
    async def approval(input: dict, ctx: DurableContext) -> list[Any]:
        got = []
        await ctx.aio_sleep_for(input["sleep"])
        for _ in range(input["n"]):
            got.append(await ctx.aio_wait_for_event("manager-approval", timeout="30s"))
        return got

    async with running_worker(bide, [approval]):
        # Before the wait: the run is sleeping; both events are kept, in order.
        early = await approval.aio_run_no_wait({"sleep": 1.0, "n": 2})
        r1 = await bide.event.aio_send(early.workflow_run_id, "manager-approval", {"n": 1})
        await bide.event.aio_send(early.workflow_run_id, "manager-approval", {"n": 2})
        assert r1.as_dict() == {"status": "delivered", "execution_id": early.workflow_run_id,
                                "event_name": "manager-approval"}
        # After the wait.
        late = await approval.aio_run_no_wait({"sleep": 0, "n": 1})
        await waiting(bide, late.workflow_run_id)
        await bide.event.aio_send(late.workflow_run_id, "manager-approval", {"approved": True})
        assert await early.aio_result(timeout=15) == [{"n": 1}, {"n": 2}]
        assert await late.aio_result(timeout=15) == [{"approved": True}]


async def test_invalid_cel_fails_the_run_with_the_expression(bide: Bide) -> None:
    @bide.durable_task(name="BadCel")
    async def bad_cel(input: EmptyModel, ctx: DurableContext) -> None:
        await ctx.aio_wait_for_event("k", "input.user_id ==")

    with pytest.raises(InvalidExpression, match=r"'input.x = 1': syntax error at column 9"):
        UserEventCondition("k", "input.x = 1")
    async with running_worker(bide, [bad_cel]):
        with pytest.raises(RunFailedError, match=r"InvalidExpression: invalid CEL expression 'input.user_id =='"):
            await bad_cel.aio_run(EmptyModel(), timeout=10)


async def test_raw_nats_publish_resumes_a_wait(bide: Bide, nats_server: Any) -> None:
    """Exactly what ``nats pub bide.events.<key>[.<scope>] '<json>' [-H ...]`` sends: a core publish."""
    import nats

    @bide.durable_task(name="RawPub")
    async def raw_pub(input: dict, ctx: DurableContext) -> list[Any]:
        a = await ctx.aio_wait_for_event("user:update", f"input.user_id == {input['user_id']}")
        b = await ctx.aio_wait_for_event("order:paid", scope=f"user_id:{input['user_id']}")
        return [a, b]

    nc = await nats.connect(nats_server.url)
    try:
        async with running_worker(bide, [raw_pub]):
            ref = await raw_pub.aio_run_no_wait({"user_id": 7})
            await waiting(bide, ref.workflow_run_id)
            await nc.publish("bide.events.user:update", b'{"user_id": 7}')

            async def second_wait() -> bool:
                hist = await bide.runs.aio_history(ref.workflow_run_id)
                return sum(e.k == "wait_registered" for e in hist.entries) == 2

            await wait_until(second_wait, what="the scoped wait")
            await nc.publish("bide.events.order:paid.user_id:8", b'{"total": 1}')  # another scope
            await nc.publish(
                "bide.events.order:paid.user_id:7", b'{"total": 2}', headers={"Nats-Msg-Id": "pay-7", "X-Any": "1"}
            )
            assert await ref.aio_result(timeout=10) == [{"user_id": 7}, {"total": 2}]
            hist = await bide.runs.aio_history(ref.workflow_run_id)
            signals = [e.signal for e in hist.entries if e.k == "signal"]
            assert [s.event_id for s in signals][-1] == "pay-7"
            assert signals[-1].scope == "user_id:7"
    finally:
        await nc.close()


async def test_an_event_with_its_own_header_named_status_is_an_event_like_any_other(
        bide: Bide, nats_server: Any) -> None:
    # `nats pub -H 'Status:408' bide.events.<key> ...`: nats-py files a publisher's header named
    # Status where it files a server's status line, and the router took such an event for a
    # status answer to its pull: the event was skipped and acked past, its waits waited for
    # ever, no trigger ran, and `bide events list` left it out (a batch read ended at it).
    import nats

    from tests.integration.test_http_api import client_for

    @bide.durable_task(name="WaitsPastStatus")
    async def waits(input: dict, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("raw:status", f"input.id == {input['id']}")

    @bide.task(name="OnStatusEvent", on_events=["raw:status"])
    def on_event(input: Any, ctx: Any) -> Any:
        return input

    statuses = ("408", "423", "503", "100", "204")
    nc = await nats.connect(nats_server.url)
    try:
        async with running_worker(bide, [waits, on_event]):
            refs = [await waits.aio_run_no_wait({"id": i}) for i in range(len(statuses))]
            for ref in refs:
                await waiting(bide, ref.workflow_run_id)
            js = nc.jetstream()
            for i, status in enumerate(statuses):
                await js.publish("bide.events.raw:status", b'{"id": %d}' % i,
                                 headers={"Status": status, "Description": "not the server's"})
            for i, ref in enumerate(refs):
                assert await ref.aio_result(timeout=15) == {"id": i}

            async def triggered() -> bool:
                page = await bide.runs.aio_list(task="OnStatusEvent", status="completed")
                return len(page.runs) == len(statuses)

            await wait_until(triggered, timeout=15, what="a triggered run for every event")
            async with client_for(bide) as api:
                listed = (await api.get("/api/v1/events", params={"key": "raw:status"})).json()["events"]
            assert sorted(e["payload"]["id"] for e in listed) == list(range(len(statuses)))
    finally:
        await nc.close()


class LookbackEventPayload(BaseModel):
    user_id: int
    name: str


async def test_lookback_sees_the_window_and_only_its_scope(bide: Bide) -> None:
    @bide.durable_task(name="Lookback")
    async def lookback(input: dict, ctx: DurableContext) -> dict[str, Any]:
        event = await ctx.aio_wait_for_event(
            key="user:create",
            expression=f"input.user_id == {input['user_id']}",
            scope=f"user_id:{input['user_id']}",
            lookback_window=timedelta(seconds=input["window"]),
            payload_validator=LookbackEventPayload,
            timeout=input["timeout"],
        )
        return {"event": None if event is None else event.model_dump()}

    async with running_worker(bide, [lookback]):
        # Inside the window, same scope: found although pushed before the wait existed.
        await bide.event.aio_push("user:create", {"user_id": 1, "name": "in-window"}, scope="user_id:1")
        assert await lookback.aio_run({"user_id": 1, "window": 60, "timeout": 30}, timeout=15) == {
            "event": {"user_id": 1, "name": "in-window"}
        }
        # Same payload under another scope: neither lookback nor live delivery sees it.
        await bide.event.aio_push("user:create", {"user_id": 2, "name": "wrong-scope"}, scope="user_id:3")
        ref = await lookback.aio_run_no_wait({"user_id": 2, "window": 60, "timeout": 2})
        await waiting(bide, ref.workflow_run_id)
        await bide.event.aio_push("user:create", {"user_id": 2, "name": "live-wrong-scope"}, scope="user_id:3")
        assert await ref.aio_result(timeout=15) == {"event": None}
        # Outside the window: an event older than the lookback is not seen.
        old = await bide.event.aio_push("user:create", {"user_id": 4, "name": "too-old"}, scope="user_id:4")
        await asyncio.sleep(1.2)  # age the event past a 1 s window (the behaviour under test, not a wait)
        assert old.seq > 0
        assert await lookback.aio_run({"user_id": 4, "window": 1, "timeout": 1.5}, timeout=15) == {"event": None}


async def test_unscoped_lookback_reads_every_scope_of_the_key(bide: Bide) -> None:
    @bide.durable_task(name="LookbackAnyScope")
    async def any_scope(input: dict, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("invoice:sent", "input.n == 2", lookback_window="1m", timeout="5s")

    async with running_worker(bide, [any_scope]):
        await bide.event.aio_push("invoice:sent", {"n": 1}, scope="a")
        await bide.event.aio_push("invoice:sent", {"n": 2}, scope="b")
        await bide.event.aio_push("invoice:sent", {"n": 2, "late": True})
        assert await any_scope.aio_run({}, timeout=15) == {"n": 2}


async def test_payload_validator_failure_fails_that_run_only(bide: Bide) -> None:
    @bide.durable_task(name="Validated")
    async def validated(input: dict, ctx: DurableContext) -> str:
        ev = await ctx.aio_wait_for_event("typed:event", f"input.run == {input['run']}",
                                          payload_validator=AwaitedEvent)
        return ev.id

    async with running_worker(bide, [validated]):
        bad = await validated.aio_run_no_wait({"run": 1})
        good = await validated.aio_run_no_wait({"run": 2})
        await waiting(bide, bad.workflow_run_id)
        await waiting(bide, good.workflow_run_id)
        await bide.event.aio_push("typed:event", {"run": 1, "id": 5})
        with pytest.raises(RunFailedError, match=r"PayloadValidationError: .*does not fit AwaitedEvent.*id"):
            await bad.aio_result(timeout=10)
        await bide.event.aio_push("typed:event", {"run": 2, "id": "ok"})
        assert await good.aio_result(timeout=10) == "ok"


async def test_one_event_satisfies_every_matching_wait(bide: Bide) -> None:
    @bide.durable_task(name="Broadcast")
    async def broadcast(input: dict, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("deploy:done", "input.env == 'prod'")

    async with running_worker(bide, [broadcast]):
        refs = [await broadcast.aio_run_no_wait({}) for _ in range(5)]
        for r in refs:
            await waiting(bide, r.workflow_run_id)
        await bide.event.aio_push("deploy:done", {"env": "staging"})
        await bide.event.aio_push("deploy:done", {"env": "prod"})
        assert [await r.aio_result(timeout=10) for r in refs] == [{"env": "prod"}] * 5


async def test_and_of_or_groups(bide: Bide) -> None:
    @bide.durable_task(name="AndOfOr")
    async def and_of_or(input: dict, ctx: DurableContext) -> dict[str, Any]:
        res = await ctx.aio_wait_for(
            "both",
            or_(UserEventCondition("a:event"), SleepCondition("30s")),
            UserEventCondition("b:event", "input.ok == true"),
        )
        return {k: list(v.values()) for k, v in res.items()}

    async with running_worker(bide, [and_of_or]):
        ref = await and_of_or.aio_run_no_wait({})
        await waiting(bide, ref.workflow_run_id)
        await bide.event.aio_push("b:event", {"ok": True}, event_id="b1")
        await bide.event.aio_push("a:event", {"x": 1}, event_id="a1")
        assert await ref.aio_result(timeout=10) == {"a:event": [{"x": 1}], "b:event": [{"ok": True}]}


async def test_a_wait_is_live_before_the_history_shows_it(bide: Bide) -> None:
    """Waits are race-free from the moment a reader sees them: the router's registration is
    published before the ``wait_registered`` entry, so an event pushed by someone who saw the
    run waiting (in its history, or `bide runs show`) is after the registration in the stream."""
    from actors.engine.wire import decode_history

    @bide.durable_task(name="WaitOrderProbe")
    async def probe(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        return await ctx.aio_wait_for("probe", UserEventCondition(event_key="probe:go"))

    conn = await bide._pool.get()
    s = conn.layout.subjects
    seen: list[str] = []

    async def on_msg(msg: Any) -> None:
        if msg.subject.startswith(f"{s.prefix}.waits."):
            seen.append("registration")
        elif any(e.k == "wait_registered" for e in decode_history(msg.data)):
            seen.append("history")

    sub_waits = await conn.nc.subscribe(s.waits_all, cb=on_msg)
    sub_hist = await conn.nc.subscribe(f"{s.prefix}.history.>", cb=on_msg)
    try:
        async with running_worker(bide, [probe]):
            ref = await probe.aio_run_no_wait()
            await wait_until(lambda: "history" in seen, timeout=20, what="the wait in the history")
            assert seen[:2] == ["registration", "history"], seen
            await bide.event.aio_push("probe:go", {"n": 1})
            result = await ref.aio_result(timeout=10)
            assert [list(got.values()) for got in result.values()] == [[{"n": 1}]], result
    finally:
        await sub_waits.unsubscribe()
        await sub_hist.unsubscribe()


async def test_the_third_positional_argument_names_the_condition_as_in_the_seeds(bide: Bide) -> None:
    # `new UserEventCondition(EVENT_KEY, '', 'event')`, Python-spelled: a TypeError inside the run before.
    @bide.durable_task(name="NamedByPosition")
    async def named(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        res = await ctx.aio_wait_for("either", or_(SleepCondition(timedelta(minutes=5)),
                                                   UserEventCondition("named:event", "", "event")))
        return dict(res)

    async with running_worker(bide, [named]):
        ref = await named.aio_run_no_wait(EmptyModel())
        await waiting(bide, ref.workflow_run_id)
        await bide.event.aio_push("named:event", {"n": 1})
        result = await ref.aio_result(timeout=10)
        assert list(result) == ["event"] and list(result["event"].values()) == [{"n": 1}]


async def test_a_bad_timeout_is_named_as_the_timeout(bide: Bide) -> None:
    # It said "SleepCondition duration must not be negative": the caller passed no SleepCondition.
    @bide.durable_task(name="BadWaitTimeout")
    async def bad_timeout(input: EmptyModel, ctx: DurableContext) -> None:
        await ctx.aio_wait_for_event("never:mind", timeout=-1)

    async with running_worker(bide, [bad_timeout]):
        with pytest.raises(RunFailedError, match=r"ValueError: timeout must not be negative, got -1"):
            await bad_timeout.aio_run(EmptyModel(), timeout=15)


async def test_a_send_retried_after_the_run_took_it_and_finished_returns_its_receipt(bide: Bide) -> None:
    """A sender retries a send (its first try's answer was lost) after the run took the event and
    finished: the retry is told it was delivered, as it was. It raised RunAlreadyFinishedError (the
    cluster chaos run's retrying sender). Another event, or another payload under that id, still raises."""
    @bide.durable_task(name="TakesOneSend")
    async def takes_one(input: dict, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("approval")

    async with running_worker(bide, [takes_one]):
        ref = await takes_one.aio_run_no_wait({})
        run_id = ref.workflow_run_id
        first = await bide.event.aio_send(run_id, "approval", {"ok": True}, event_id="approval-1")
        assert await ref.aio_result(timeout=20) == {"ok": True}
        again = await bide.event.aio_send(run_id, "approval", {"ok": True}, event_id="approval-1")
        assert again == first
        with pytest.raises(RunAlreadyFinishedError, match=run_id):
            await bide.event.aio_send(run_id, "approval", {"ok": True}, event_id="approval-2")
        with pytest.raises(RunAlreadyFinishedError, match=run_id):
            await bide.event.aio_send(run_id, "approval", {"ok": False}, event_id="approval-1")
        with pytest.raises(RunAlreadyFinishedError, match=run_id):
            await bide.event.aio_send(run_id, "approval", {"ok": True})
