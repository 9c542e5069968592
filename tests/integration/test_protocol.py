"""The protocol writes (start a run, deliver a signal): idempotent, and complete whatever a crash leaves."""

from __future__ import annotations

from typing import Any

import pytest

from actors.engine.wire import (
    HDR_BIDE_KIND,
    HDR_TTL,
    Activation,
    RunStarted,
    WaitRegistered,
    encode_activation,
    utcnow,
)
from sdk import Bide, Context, DurableContext
from sdk.errors import RunAlreadyExistsError
from tests.support import registrations as registrations_of
from tests.support import running_worker, wait_until


async def test_a_starter_that_dies_after_the_activation_leaves_a_run_that_completes(bide: Bide) -> None:
    """Only the first write of a start was made (the starter died): the host records the start itself."""
    @bide.durable_task(name="HalfStarted")
    async def half(input: dict, ctx: DurableContext) -> int:
        return int(await ctx.memo(lambda: input["x"] * 2))

    conn = await bide._pool.get()
    s = conn.layout.subjects
    started = RunStarted(run_id="half-started-1", task="HalfStarted", durable=True, input={"x": 21}, at=utcnow(),
                         start_id="only-the-activation")
    act = Activation(run_id=started.run_id, task=started.task, kind="start", started=started)
    await conn.js.publish(s.queue(started.task, started.run_id), encode_activation(act),
                          headers={HDR_BIDE_KIND: "start"})
    async with running_worker(bide, [half]):
        async def recorded() -> bool:
            return bool((await conn.history.read(started.run_id)).entries)

        await wait_until(recorded, what="the host to record the start")
        assert await bide.runs.aio_result(started.run_id, timeout=20) == 42
    kinds = [e.k for e in (await bide.runs.aio_history(started.run_id)).entries]
    assert kinds.count("run_started") == 1, kinds


async def test_a_starter_whose_activation_is_refused_records_no_start(bide: Bide) -> None:
    # The start went out as two concurrent writes: with the queue stream leaderless (a node lost)
    # the start entry could be stored while the activation was refused and retried, and a
    # starter that died then left a run that would never run. The activation comes first now:
    # until it is stored, nothing of the run is.
    import asyncio

    import nats.js.errors

    from actors.store.history import HistoryLog
    from actors.store.protocol import start_run
    from actors.store.requests import Publisher

    conn = await bide._pool.get()
    s = conn.layout.subjects

    refused = 0

    class QueueDown(Publisher):
        async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
                          **kw: Any) -> int:
            nonlocal refused
            if subject.startswith(f"{s.prefix}.queue."):
                refused += 1
                raise nats.js.errors.NoStreamResponseError
            return await super().publish(subject, data, headers, **kw)

    pub = await QueueDown(conn.nc).start()
    started = RunStarted(run_id="refused-start-1", task="Refused", durable=True, input={}, at=utcnow(),
                         start_id="refused")
    starting = asyncio.ensure_future(start_run(HistoryLog(conn.nc, pub, s), pub, s, started))
    await wait_until(lambda: refused >= 4, timeout=10, what="the activation to be refused four times")
    starting.cancel()  # the starter dies
    await asyncio.gather(starting, return_exceptions=True)
    assert (await conn.history.read(started.run_id)).entries == []


async def test_a_start_retried_with_its_run_id_is_one_run(bide: Bide) -> None:
    runs: list[int] = []

    @bide.task(name="Idempotent")
    def once(input: dict, ctx: Context) -> int:
        runs.append(input["n"])
        return int(input["n"])

    async with running_worker(bide, [once]):
        first = await once.aio_run_no_wait({"n": 1}, run_id="order-1")
        again = await once.aio_run_no_wait({"n": 1}, run_id="order-1")  # a caller's retry after an error
        assert again.workflow_run_id == first.workflow_run_id
        assert await first.aio_result(timeout=20) == 1
        with pytest.raises(RunAlreadyExistsError, match="order-1"):
            await once.aio_run_no_wait({"n": 2}, run_id="order-1")  # another request for that id
        await wait_until(lambda: runs == [1], what="the run's code to have run once")
    kinds = [e.k for e in (await bide.runs.aio_history("order-1")).entries]
    assert kinds.count("run_started") == 1 and kinds.count("run_completed") == 1, kinds


@pytest.mark.parametrize("unrecorded", [None, True], ids=["starter-records", "host-records"])
async def test_a_start_sent_again_does_not_replay_a_begun_run(bide: Bide, unrecorded: bool | None) -> None:
    """A second start activation (a spawn replayed after the de-duplication window) for a run under way.

    Also one marked for its host to record (``start_unrecorded``: a new run id's start, sent again
    after the queue's two-minute de-duplication window, which only a forger does): its host takes
    it for a first turn without reading, so the code runs from the top until the turn's first
    write, which carries the start, is refused; the next delivery finds the run begun and replays
    it. Either way the run keeps one start and goes on.
    """
    entered: list[Any] = []

    @bide.durable_task(name="BegunOnce")
    async def begun(input: dict, ctx: DurableContext) -> Any:
        entered.append(1)  # code before the first checkpoint: re-run only by a replay
        return await ctx.aio_wait_for_event("go")

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [begun]):
        ref = await begun.aio_run_no_wait({})

        async def waiting() -> bool:
            h = await bide.runs.aio_history(ref.workflow_run_id)
            return any(e.k == "wait_registered" for e in h.entries)

        await wait_until(waiting, what="the run to wait")
        started = (await bide.runs.aio_history(ref.workflow_run_id)).entries[0]
        act = Activation(run_id=ref.workflow_run_id, task="BegunOnce", kind="start", started=started,
                         start_unrecorded=unrecorded)
        await conn.js.publish(s.queue("BegunOnce", ref.workflow_run_id), encode_activation(act),
                              headers={HDR_BIDE_KIND: "start"})
        await wait_until(lambda: _drained(conn, s, "BegunOnce"), timeout=10, what="the duplicate start to be taken")
        # The duplicate's first turn, then its replay once the write was refused.
        assert entered == ([1, 1, 1] if unrecorded else [1])
        await bide.event.aio_send(ref.workflow_run_id, "go", {"ok": 1})
        assert await ref.aio_result(timeout=20) == {"ok": 1}
    kinds = [e.k for e in (await bide.runs.aio_history(ref.workflow_run_id)).entries]
    assert kinds.count("run_started") == 1 and kinds.count("wait_registered") == 1, kinds


async def test_a_start_left_to_its_host_for_a_run_id_another_start_holds_is_dropped(bide: Bide) -> None:
    """A forged ``start_unrecorded`` start for a run in use: its turn's write is refused, the start dropped.

    Whoever may publish activations (the HTTP API's user) can mark a start for its host to record.
    For an id another start holds, its code runs once with the forged input, as a new run's would
    (the host reads nothing before a first turn), but nothing of it is recorded: its first write,
    which carries the start, expects an empty history. The next delivery finds another start and
    drops it, and the run goes on with its own input.
    """
    entered: list[str] = []

    @bide.durable_task(name="HeldId")
    async def held(input: dict, ctx: DurableContext) -> Any:
        entered.append(input["who"])
        return await ctx.aio_wait_for_event("go")

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [held]):
        ref = await held.aio_run_no_wait({"who": "first"}, run_id="held-id-1")

        async def waiting() -> bool:
            return any(e.k == "wait_registered" for e in (await bide.runs.aio_history(ref.workflow_run_id)).entries)

        await wait_until(waiting, what="the run to wait")
        forged = RunStarted(run_id="held-id-1", task="HeldId", durable=True, input={"who": "forged"}, at=utcnow(),
                            start_id="another-request")
        act = Activation(run_id="held-id-1", task="HeldId", kind="start", started=forged, start_unrecorded=True)
        await conn.js.publish(s.queue("HeldId", "held-id-1"), encode_activation(act), headers={HDR_BIDE_KIND: "start"})
        await wait_until(lambda: _drained(conn, s, "HeldId"), timeout=10, what="the forged start to be taken")
        assert entered == ["first", "forged"]
        await bide.event.aio_send(ref.workflow_run_id, "go", {"ok": 1})
        assert await ref.aio_result(timeout=20) == {"ok": 1}
    entries = (await bide.runs.aio_history("held-id-1")).entries
    assert [st.input for st in entries if isinstance(st, RunStarted)] == [{"who": "first"}]
    assert [e.k for e in entries].count("wait_registered") == 1, entries


async def _drained(conn: Any, s: Any, task: str) -> bool:
    for stream in s.activation_streams:
        info = await conn.js.consumer_info(stream, s.consumer_name(task))
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def test_a_send_retried_with_its_event_id_wakes_the_run_once(bide: Bide) -> None:
    @bide.durable_task(name="TwoSends")
    async def two(input: dict, ctx: DurableContext) -> list[Any]:
        a = await ctx.aio_wait_for_event("approval")
        b = await ctx.aio_wait_for_event("approval", timeout="2s")
        return [a, b]

    async with running_worker(bide, [two]):
        ref = await two.aio_run_no_wait({})
        for _ in range(3):  # the same delivery retried: stored, and taken, once
            await bide.event.aio_send(ref.workflow_run_id, "approval", {"ok": True}, event_id="approval-1")
        assert await ref.aio_result(timeout=20) == [{"ok": True}, None]


async def test_a_signal_during_a_turn_on_another_host_neither_reruns_steps_nor_is_lost(bide: Bide) -> None:
    """Two hosts: a run's slow step is under way on one while its signals reach the other."""
    import asyncio
    import threading

    ran: list[str] = []
    lock = threading.Lock()

    @bide.durable_task(name="SlowThenTwo")
    async def slow_then_two(input: dict, ctx: DurableContext) -> list[Any]:
        async def step() -> int:
            with lock:
                ran.append(input["id"])
            await asyncio.sleep(1.0)  # the step under way while the signals arrive
            return 1

        await ctx.memo(step)
        a = await ctx.aio_wait_for_event("msg")
        b = await ctx.aio_wait_for_event("msg")
        return [a, b]

    async with running_worker(bide, [slow_then_two], name="host-a"), \
            running_worker(bide, [slow_then_two], name="host-b"):
        refs = [await slow_then_two.aio_run_no_wait({"id": f"r{i}"}) for i in range(6)]
        await wait_until(lambda: len(ran) >= 6, timeout=20, what="every step to begin")
        for ref in refs:
            for n in range(2):
                await bide.event.aio_send(ref.workflow_run_id, "msg", {"n": n})
        results = await asyncio.gather(*(r.aio_result(timeout=40) for r in refs))
    assert results == [[{"n": 0}, {"n": 1}]] * 6
    assert sorted(ran) == sorted(f"r{i}" for i in range(6)), f"a step ran again: {sorted(ran)}"


async def test_a_signal_during_a_long_first_turn_on_another_host_waits_for_its_first_write(
    nats_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run started with a new id has no history until its first turn's first write, which carries
    its start. A signal that reaches another host meanwhile waits for that write: handed back at
    once instead, each hand-back a delivery, it was dropped after BIDE_MAX_DELIVERIES, or failed the run
    if its history was written by then.
    """
    import asyncio
    import logging

    from actors.store.jetstream import api_request

    monkeypatch.setenv("BIDE_MAX_DELIVERIES", "2")
    bide = Bide(nats_server.url, ack_wait=3.0)
    steps: list[str] = []
    gate = asyncio.Event()

    @bide.durable_task(name="LongFirstStep")
    async def long_first(input: dict, ctx: DurableContext) -> Any:
        async def step() -> int:
            steps.append(ctx.run_id)
            await gate.wait()  # the first turn's step, under way while the signals arrive
            return 1

        await ctx.memo(step)
        return await ctx.aio_wait_for_event("go", timeout="60s")

    runs = 8  # about half the signals reach the host that is not running their run's first turn
    conn = await bide._pool.get()
    s = conn.layout.subjects
    consumer = s.consumer_name("LongFirstStep")

    async def signals_taken() -> bool:
        info = await api_request(conn.nc, f"$JS.API.CONSUMER.INFO.{s.queue_stream}.{consumer}", {})
        return int(info["num_ack_pending"]) >= 2 * runs and not int(info["num_pending"])

    caplog.set_level(logging.WARNING, logger="bide")
    try:
        async with running_worker(bide, [long_first], name="host-a"), \
                running_worker(bide, [long_first], name="host-b"):
            refs = [await long_first.aio_run_no_wait({}) for _ in range(runs)]
            await wait_until(lambda: len(steps) >= runs, timeout=20, what="every first step to begin")
            for i, ref in enumerate(refs):
                await bide.event.aio_send(ref.workflow_run_id, "go", {"n": i})
            await wait_until(signals_taken, timeout=20, what="the hosts to take the signals")
            # The steps go on for longer than two hand-backs of a signal take (0.2 s apart).
            asyncio.get_running_loop().call_later(1.5, gate.set)
            results = await asyncio.gather(*(r.aio_result(timeout=40) for r in refs))
    finally:
        await bide.aclose()
    assert results == [{"n": i} for i in range(runs)]
    assert sorted(steps) == sorted(r.workflow_run_id for r in refs), f"a first step ran again: {steps}"
    dropped = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()
               or "BIDE_MAX_DELIVERIES" in r.getMessage()]
    assert not dropped, dropped


async def test_a_signal_whose_sender_died_before_the_activation_still_wakes_the_run(
    nats_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the first write of a delivery was made: the hosts' inbox sweeper publishes the activation."""
    from actors.engine.wire import EventSignal

    monkeypatch.setenv("BIDE_SWEEP_AFTER", "1")
    bide = Bide(nats_server.url, ack_wait=3.0)

    @bide.durable_task(name="Orphaned")
    async def orphaned(input: dict, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("approval")

    try:
        conn = await bide._pool.get()
        async with running_worker(bide, [orphaned]):
            ref = await orphaned.aio_run_no_wait({})

            async def waiting() -> bool:
                h = await bide.runs.aio_history(ref.workflow_run_id)
                return any(e.k == "wait_registered" for e in h.entries)

            await wait_until(waiting, what="the run to wait")
            sig = EventSignal(source="direct", name="approval", payload={"ok": True}, event_id="orphan-1", at=utcnow())
            await conn.js.publish(conn.layout.subjects.inbox(ref.workflow_run_id), sig.model_dump_json().encode())
            assert await ref.aio_result(timeout=20) == {"ok": True}
    finally:
        await bide.aclose()


@pytest.mark.parametrize("first_withdrawal_fails", [False, True], ids=["", "withdrawal-times-out-once"])
async def test_a_run_cancelled_mid_sleep_leaves_no_timer(bide: Bide, monkeypatch: pytest.MonkeyPatch,
                                                         first_withdrawal_fails: bool) -> None:
    """Also when the withdrawal of the timer first meets an infrastructure error (the cluster chaos
    run left a cancelled run's one-hour timer behind: its withdrawal, best effort in the
    background, met a node kill and was not tried again)."""
    import nats.errors

    from actors.store.timers import TimerScheduler

    if first_withdrawal_fails:
        failures = [nats.errors.TimeoutError()]
        cancel = TimerScheduler.cancel

        async def cancel_failing_once(self: TimerScheduler, run_id: str, pos: int) -> None:
            if failures:
                raise failures.pop()
            await cancel(self, run_id, pos)

        monkeypatch.setattr(TimerScheduler, "cancel", cancel_failing_once)

    @bide.durable_task(name="SleepsLong")
    async def sleeps(input: dict, ctx: DurableContext) -> None:
        await ctx.aio_sleep_for("1h")

    conn = await bide._pool.get()
    s = conn.layout.subjects

    async def timers(run_id: str) -> dict[str, int]:
        info = await conn.js.stream_info(s.work_stream, subjects_filter=s.timers_all)
        return {k: v for k, v in (info.state.subjects or {}).items() if run_id in k and not k.endswith(".reap")}

    async with running_worker(bide, [sleeps]):
        ref = await sleeps.aio_run_no_wait({})
        await wait_until(lambda: _has_timer(timers, ref.workflow_run_id), what="the sleep's timer")
        await bide.runs.aio_cancel(ref.workflow_run_id)

        async def gone() -> bool:
            return not await timers(ref.workflow_run_id)

        await wait_until(gone, what="the cancelled run's timer to be withdrawn")


async def _has_timer(timers: Any, run_id: str) -> bool:
    return bool(await timers(run_id))


async def test_a_refused_append_is_not_taken_for_the_runs_end(bide: Bide) -> None:
    """A host that lost the single-writer race published an end JetStream refused; a waiter must not believe it."""
    import asyncio

    import nats.js.errors

    from actors.engine.wire import HDR_EXPECTED_LAST_SUBJECT_SEQ, ErrorInfo, RunFailed, encode_history

    @bide.durable_task(name="RaceLoser")
    async def loser(input: dict, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("go")

    conn = await bide._pool.get()
    async with running_worker(bide, [loser]):
        ref = await loser.aio_run_no_wait({})

        async def waiting() -> bool:
            h = await bide.runs.aio_history(ref.workflow_run_id)
            return any(e.k == "wait_registered" for e in h.entries)

        await wait_until(waiting, what="the run to wait")
        result = asyncio.create_task(bide.runs.aio_result(ref.workflow_run_id, timeout=20))
        await asyncio.sleep(0.2)  # the waiter is subscribed (a fixed pause: the fault must come after it)
        stale = RunFailed(error=ErrorInfo(type="CancelledError", message="", traceback=""), at=utcnow())
        with pytest.raises(nats.js.errors.APIError):  # a host that lost the race for the run's first write
            await conn.js.publish(conn.layout.subjects.history(ref.workflow_run_id), encode_history([stale]),
                                  headers={HDR_EXPECTED_LAST_SUBJECT_SEQ: "0"})
        await bide.event.aio_send(ref.workflow_run_id, "go", {"ok": 1})
        assert await result == {"ok": 1}


async def test_a_wait_registration_is_withdrawn_even_if_the_resolving_turn_failed_after_its_append(
    bide: Bide, caplog: pytest.LogCaptureFixture
) -> None:
    """The withdrawal of a resolved wait's registration is refused (503) after the resolving append.

    The turn is retried from the stored history, where the wait is already resolved: the
    retry must still withdraw the registration, or it stays in the router's index for good.
    """
    import logging

    @bide.durable_task(name="WithdrawnLate")
    async def withdrawn(input: dict, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("late-approval")

    conn = await bide._pool.get()
    s = conn.layout.subjects

    async def registrations() -> int:
        return await registrations_of(bide, "late-approval")

    caplog.set_level(logging.WARNING, logger="bide.host")
    async with running_worker(bide, [withdrawn]):
        ref = await withdrawn.aio_run_no_wait({})

        async def registered() -> bool:
            return await registrations() == 1

        await wait_until(registered, what="the wait's registration")
        events = (await conn.js.stream_info(s.events_stream)).config
        # Nothing takes registrations for a while: the withdrawal's publish is answered 503.
        await conn.js.update_stream(events.evolve(subjects=[x for x in events.subjects or [] if x != s.waits_all]))
        try:
            await bide.event.aio_send(ref.workflow_run_id, "late-approval", {"ok": 1})

            def refused() -> bool:
                return any("infrastructure error" in r.getMessage() and ref.workflow_run_id in r.getMessage()
                           for r in caplog.records)

            await wait_until(refused, timeout=20, what="the withdrawal to be refused")
        finally:
            await conn.js.update_stream(events)
        assert await ref.aio_result(timeout=20) == {"ok": 1}

        async def withdrawn_for_good() -> bool:
            return await registrations() == 0

        await wait_until(withdrawn_for_good, timeout=20, what="the resolved wait's registration to be withdrawn")


async def test_a_cancel_recorded_by_a_host_that_died_before_its_code_reacted_still_cancels(bide: Bide) -> None:
    """A host took the cancel (its first append) and was SIGKILLed before the run ended: the redelivered
    activation finds no new signal in the inbox, yet the recorded cancel must still end the run."""
    from actors.engine.wire import ActivationBegun, EventSignal, SignalReceived

    @bide.durable_task(name="CancelledByTheDead")
    async def sleeper(input: dict, ctx: DurableContext) -> None:
        await ctx.aio_sleep_for("1h")

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [sleeper]):
        ref = await sleeper.aio_run_no_wait({})
        run_id = ref.workflow_run_id

        async def asleep() -> bool:
            return any(e.k == "sleep_scheduled" for e in (await conn.history.read(run_id)).entries)

        await wait_until(asleep, what="the run to sleep")
    # What the dead host left: the cancel taken from the inbox and recorded, the run not ended.
    cancel = EventSignal(source="cancel", name="cancel", payload={"reason": "by the test"}, event_id="c-1",
                         at=utcnow())
    inbox_seq = (await conn.js.publish(s.inbox(run_id), cancel.model_dump_json().encode())).seq
    hist = await conn.history.read(run_id, inbox_seq=inbox_seq)
    await conn.history.append(run_id, [ActivationBegun(host="dead", delivery=1, at=utcnow()),
                                       SignalReceived(inbox_seq=inbox_seq, signal=cancel)], hist.last_seq)
    # Its activation comes back (a redelivery); the inbox holds nothing new.
    act = Activation(run_id=run_id, task="CancelledByTheDead", kind="signal", inbox_seq=inbox_seq)
    await conn.js.publish(s.queue("CancelledByTheDead", run_id), encode_activation(act),
                          headers={HDR_BIDE_KIND: "signal"})
    async with running_worker(bide, [sleeper]):
        async def cancelled() -> bool:
            return any(e.k == "run_cancelled" for e in (await conn.history.read(run_id)).entries)

        await wait_until(cancelled, timeout=20, what="the recorded cancel to end the run")


class GatedSteps:
    """A memo step that records its run id and runs until the test opens ``gate`` (the hosts run in
    this process): a step under way for as long as the test needs."""

    def __init__(self) -> None:
        import asyncio

        self.gate = asyncio.Event()
        self.ran: list[str] = []

    async def step(self, run_id: str) -> int:
        self.ran.append(run_id)
        await self.gate.wait()
        return 1

    def define(self, bide: Bide, name: str) -> Any:
        """A task that waits for "a", runs the step, then returns what it gets with "b"."""
        step = self.step

        @bide.durable_task(name=name)
        async def a_step_b(input: dict, ctx: DurableContext) -> Any:
            await ctx.aio_wait_for_event("a")
            await ctx.memo(step, ctx.run_id)
            return await ctx.aio_wait_for_event("b")

        return a_step_b

    async def under_way(self, bide: Bide, task: Any, runs: int) -> list[Any]:
        """``runs`` runs of ``task`` (from :meth:`define`), each sent "a" once it waits: each one's step under way."""
        conn = await bide._pool.get()
        refs = [await task.aio_run_no_wait({}) for _ in range(runs)]

        async def all_waiting() -> bool:
            hists = [await conn.history.read(r.workflow_run_id) for r in refs]
            return all(any(e.k == "wait_registered" for e in h.entries) for h in hists)

        await wait_until(all_waiting, what="every run to wait for 'a'")
        for r in refs:
            await bide.event.aio_send(r.workflow_run_id, "a", {"n": 1})
        await wait_until(lambda: len(self.ran) >= runs, timeout=20, what="every step to start")
        return refs


async def test_a_signal_for_a_run_whose_turn_on_another_host_is_running_a_step_does_not_rerun_it(
    bide: Bide,
) -> None:
    """Host A claimed signal "a" and is running the step after the wait; signal "b" reaches host B meanwhile.

    B must wait for A's turn to park, not record "b" under it (A's next append would then fail
    and its step run again) nor run the code beside it (seen in the long chaos run: a step ran
    twice on two hosts in the same millisecond, no host killed).
    """

    from actors.store.jetstream import api_request

    steps = GatedSteps()
    claimed = steps.define(bide, "ClaimedThenStep")
    conn = await bide._pool.get()
    s = conn.layout.subjects
    runs = 8
    async with running_worker(bide, [claimed], name="host-a"), running_worker(bide, [claimed], name="host-b"):
        refs = await steps.under_way(bide, claimed, runs)
        for r in refs:
            await bide.event.aio_send(r.workflow_run_id, "b", {"n": 2})

        async def both_taken() -> bool:
            consumer = s.consumer_name("ClaimedThenStep")
            info = await api_request(conn.nc, f"$JS.API.CONSUMER.INFO.{s.queue_stream}.{consumer}", {})
            return int(info["num_ack_pending"]) >= 2 * runs

        await wait_until(both_taken, timeout=20, what="the 'b' activations to be taken while the steps run")
        steps.gate.set()
        assert [await r.aio_result(timeout=30) for r in refs] == [{"n": 2}] * runs
    ran = steps.ran
    assert len(ran) == runs, f"steps ran {len(ran)} times for {runs} runs: {sorted(ran)}"


async def test_a_signal_for_a_run_whose_step_outlasts_the_wait_for_it_does_not_run_the_step_again(
    bide: Bide, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Host A runs a step longer than a signal's wait for a turn under way (10 s; 1 s here). The
    signal's activation on host B must not then run the code beside it: A is alive, its turn under
    way. B ran it, and every step that outlasted the wait ran twice with no host killed (a model
    call of a minute in an agent loop, an event sent to the run meanwhile)."""

    from actors.hosting import host as host_module

    monkeypatch.setattr(host_module, "_SUSPENSION_WAIT_S", 1.0)
    from actors.store.jetstream import api_request

    steps = GatedSteps()
    long_step = steps.define(bide, "LongStep")
    conn = await bide._pool.get()
    s = conn.layout.subjects
    runs = 4
    # Host A's slots: one per step, and the one credit its other queue (timers) keeps. Once every step
    # runs, A pulls no more: the "b" signals go to host B (one that A took waits for A's own turn).
    async with running_worker(bide, [long_step], name="host-a", durable_slots=runs + 1):
        refs = await steps.under_way(bide, long_step, runs)
        async with running_worker(bide, [long_step], name="host-b") as b:
            waiting: set[str] = set()  # runs whose "b" waits on host B for the turn under way
            alive: set[str] = set()  # and those whose turn B then asked about and found running
            until_suspended, turn_running = b.host._until_suspended, b.host._turn_running

            async def recorded_wait(act: Any, hist: Any, wait_s: float) -> Any:
                waiting.add(act.run_id)
                return await until_suspended(act, hist, wait_s)

            async def recorded_answer(run_id: str) -> bool:
                running: bool = await turn_running(run_id)
                if running:
                    alive.add(run_id)
                return running

            b.host._until_suspended, b.host._turn_running = recorded_wait, recorded_answer
            for r in refs:
                await bide.event.aio_send(r.workflow_run_id, "b", {"n": 2})

            async def b_taken_and_waited_past_its_time() -> bool:
                if len(steps.ran) > runs:
                    return True  # a step ran again: the assertion below says so
                consumer = s.consumer_name("LongStep")
                info = await api_request(conn.nc, f"$JS.API.CONSUMER.INFO.{s.queue_stream}.{consumer}", {})
                # Every "b" taken; each on host B (a busy slot there) waited out its time and found the turn alive.
                return (int(info["num_ack_pending"]) >= 2 * runs
                        and len(alive) == len(waiting) == b.host.durable_slots.busy > 0)

            await wait_until(b_taken_and_waited_past_its_time, timeout=20,
                             what="host B to find each step's turn alive once its wait was over")
            assert len(steps.ran) == runs, "a step ran again while its turn was under way"
            steps.gate.set()
            assert [await r.aio_result(timeout=30) for r in refs] == [{"n": 2}] * runs
    assert sorted(steps.ran) == sorted(r.workflow_run_id for r in refs)


async def test_a_signal_for_a_new_run_whose_first_step_outlasts_the_wait_for_it_is_kept_until_it_writes(
    bide: Bide, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A run started with a new id has no history until its first turn writes: here after a step longer
    than a signal's wait for that write (10 s; 1 s here). The signal's activation on another host must
    wait on while that turn runs. It was handed back each time (a delivery counted), then dropped as
    for a run with no history, and the run heard of the signal only from the inbox sweeper."""
    import logging

    from actors.hosting import host as host_module

    monkeypatch.setattr(host_module, "_SUSPENSION_WAIT_S", 1.0)
    monkeypatch.setattr(host_module, "_MISSING_HISTORY_RETRIES", 3)
    monkeypatch.setenv("BIDE_SWEEP_AFTER", "600")  # the sweeper would deliver a dropped signal only after this
    bide = Bide(bide.config.nats_url, ack_wait=3.0)  # with that setting
    try:
        caplog.set_level(logging.WARNING, logger="bide")
        steps = GatedSteps()
        step = steps.step

        @bide.durable_task(name="LongFirstStep")
        async def long_first(input: dict, ctx: DurableContext) -> Any:
            await ctx.memo(step, ctx.run_id)
            return await ctx.aio_wait_for_event("b")

        def dropped() -> list[str]:
            return [r.getMessage() for r in caplog.records if "dropping activation" in r.getMessage()]

        runs = 2
        # Host A's slots: one per first turn and the credit of its other queue; the "b" signals go to host B.
        async with running_worker(bide, [long_first], name="host-a", durable_slots=runs + 1):
            refs = [await long_first.aio_run_no_wait({}) for _ in range(runs)]
            await wait_until(lambda: len(steps.ran) >= runs, timeout=20, what="every first step to start")
            async with running_worker(bide, [long_first], name="host-b") as b:
                alive: set[str] = set()
                turn_running = b.host._turn_running

                async def recorded_answer(run_id: str) -> bool:
                    running: bool = await turn_running(run_id)
                    if running:
                        alive.add(run_id)
                    return running

                b.host._turn_running = recorded_answer
                for r in refs:
                    await bide.event.aio_send(r.workflow_run_id, "b", {"n": 2})
                await wait_until(lambda: len(alive) == b.host.durable_slots.busy > 0 or bool(dropped()), timeout=20,
                                 what="host B to find each first turn alive once its wait was over")
                assert not dropped(), "a signal's activation was dropped while the run's first turn ran"
                steps.gate.set()
                assert [await r.aio_result(timeout=20) for r in refs] == [{"n": 2}] * runs
    finally:
        await bide.aclose()
    assert len(steps.ran) == runs


async def test_a_signal_waiting_for_a_turn_elsewhere_waits_again_for_a_claim_made_before_its_lock_is_back(
    bide: Bide,
) -> None:
    """A signal's activation waits for a turn under way elsewhere to park, lending this host's lock of
    the run meanwhile. That turn parks, and another turn claims signals before the lock is back: the
    activation must wait for that turn too. It read the run again and ran the code beside it (CI: a
    step of a run continuing as new ran twice on two hosts, no host killed).

    The test plays the turns elsewhere by appending what they write; the second claim is appended at
    the exact moment the wait ends, before the lock is taken back.
    """
    import contextlib
    from collections.abc import AsyncIterator

    from actors.engine.wire import ActivationBegun, EventSignal, SignalReceived, TurnParked

    steps: list[str] = []

    def step(n: int) -> int:
        steps.append("ran")
        return n

    @bide.durable_task(name="ClaimedAgain")
    async def claimed(input: dict, ctx: DurableContext) -> Any:
        event = await ctx.aio_wait_for_event("note")
        return await ctx.memo(step, event["n"])

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [claimed]) as worker:
        host = worker.host
        ref = await claimed.aio_run_no_wait({})
        run_id = ref.workflow_run_id

        async def waiting() -> bool:
            return any(e.k == "wait_registered" for e in (await conn.history.read(run_id)).entries)

        await wait_until(waiting, what="the run to wait for 'note'")
        # Two signals the code never waits for, each taken by one of the turns played elsewhere.
        others = [EventSignal(source="direct", name="other", payload={"i": i}, event_id=f"o-{i}", at=utcnow())
                  for i in range(2)]
        seqs = [(await conn.js.publish(s.inbox(run_id), o.model_dump_json().encode())).seq for o in others]

        async def append(*entries: Any) -> None:
            hist = await conn.history.read(run_id, inbox_seq=seqs[-1])
            await conn.history.append(run_id, list(entries), hist.last_seq)

        async def claim(i: int) -> None:
            await append(ActivationBegun(host="elsewhere", delivery=1, at=utcnow()),
                         SignalReceived(inbox_seq=seqs[i], signal=others[i]))

        await claim(0)
        lent = host._lock_lent
        lendings: list[str] = []

        @contextlib.asynccontextmanager
        async def lent_then_claimed(rid: str) -> AsyncIterator[None]:
            async with lent(rid):
                lendings.append(rid)
                yield
                if len(lendings) == 1:
                    await claim(1)  # the code parked; another turn claims before the lock is back

        host._lock_lent = lent_then_claimed
        await bide.event.aio_send(run_id, "note", {"n": 7})
        await wait_until(lambda: bool(lendings), what="the activation to wait for the turn elsewhere")
        await append(TurnParked(at=utcnow()))  # the first turn elsewhere parks

        await wait_until(lambda: len(lendings) >= 2 or bool(steps), what="the activation to wait again, or run")
        assert not steps, "the code ran while a turn elsewhere had claimed signals and not parked"
        await append(TurnParked(at=utcnow()))  # the second turn elsewhere parks
        assert await ref.aio_result(timeout=20) == 7
    assert steps == ["ran"]


async def test_a_timer_stored_after_another_host_ended_the_run_is_withdrawn(bide: Bide) -> None:
    """Host A records a wait with a timeout and publishes its timer; the publish is held up (an election:
    the chaos run saw it stored 650 ms later). Meanwhile host B resolves the wait and ends the run, and
    its withdrawal of the timer finds nothing yet. The timer stored after it must not stay behind (it
    did, until the timeout fired or the run was removed: a month for a long timeout)."""
    import asyncio

    from actors.store.jetstream import direct_get_last

    @bide.durable_task(name="TimerOvertaken")
    async def overtaken(input: dict, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("go", timeout="1h")

    conn = await bide._pool.get()
    s = conn.layout.subjects
    held, go, stored = asyncio.Event(), asyncio.Event(), asyncio.Event()
    # Host A's slots: the turn held in its timer publish, and the credit of its other queue.
    async with running_worker(bide, [overtaken], name="host-a", durable_slots=2) as a:
        timers = a.host._effects.timers
        schedule = timers.schedule

        async def held_up(*args: Any, **kwargs: Any) -> None:
            held.set()
            await go.wait()
            await schedule(*args, **kwargs)
            stored.set()

        timers.schedule = held_up
        ref = await overtaken.aio_run_no_wait({})
        run_id = ref.workflow_run_id
        await wait_until(held.wait, what="host A to publish the wait's timer")
        async with running_worker(bide, [overtaken], name="host-b") as b:
            withdrawn = asyncio.Event()
            cancel = b.host._effects.timers.cancel

            async def withdrawing(*args: Any) -> None:
                await cancel(*args)
                withdrawn.set()

            b.host._effects.timers.cancel = withdrawing
            await bide.event.aio_send(run_id, "go", {"n": 1})
            assert await ref.aio_result(timeout=20) == {"n": 1}
            await wait_until(withdrawn.wait, what="host B to withdraw the wait's timer (there is none yet)")
            go.set()  # the held timer is stored now, after host B ended the run and withdrew it

            async def no_timer_left() -> bool:
                return await direct_get_last(conn.nc, s.work_stream, s.timer(run_id, 0)) is None

            await wait_until(stored.wait, what="host A's timer to be stored")
            await wait_until(no_timer_left, timeout=10, what="the timer stored after the run ended to be withdrawn")


async def test_a_registration_left_by_a_host_that_died_before_recording_its_wait_is_withdrawn(bide: Bide) -> None:
    """A host registered a wait with the router and died before appending it; the next turn found the message
    already in the inbox and resolved the wait at once. The run's end must withdraw the orphan (seen in the long
    chaos run: 12 registrations left behind)."""
    import orjson

    from actors.engine.wire import HDR_MSG_ID

    @bide.durable_task(name="OrphanedWait")
    async def orphaned(input: dict, ctx: DurableContext) -> Any:
        await ctx.aio_sleep_for("3s")
        return await ctx.aio_wait_for_event("orphan-msg")

    conn = await bide._pool.get()
    s = conn.layout.subjects

    async def registrations() -> int:
        return await registrations_of(bide, "orphan-msg")

    async with running_worker(bide, [orphaned]):
        ref = await orphaned.aio_run_no_wait({})
        run_id = ref.workflow_run_id

        async def asleep() -> bool:
            return any(e.k == "sleep_scheduled" for e in (await conn.history.read(run_id)).entries)

        await wait_until(asleep, what="the run to sleep")
        # What a host that woke it and died left: the wait's registration (published before the wait is
        # recorded), nothing in the history; the message the wait is for is in the inbox already.
        reg = {"v": 1, "op": "register", "wait_id": f"{run_id}:1", "cond": 0, "run_id": run_id,
               "task": "OrphanedWait", "event_key": "orphan-msg"}
        await conn.js.publish(s.waits("orphan-msg"), orjson.dumps(reg),
                              headers={HDR_MSG_ID: f"register:{run_id}:1/0", HDR_TTL: "never"})
        await bide.event.aio_send(run_id, "orphan-msg", {"ok": 1})
        assert await ref.aio_result(timeout=20) == {"ok": 1}

        async def withdrawn() -> bool:
            return await registrations() == 0

        await wait_until(withdrawn, timeout=20, what="the orphaned registration to be withdrawn")


async def test_a_resolved_waits_registration_is_withdrawn_at_the_runs_end_if_its_host_died_before_withdrawing(
    bide: Bide, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host appended the resolution of wait 0, went on to park at wait 2, and died before withdrawing wait 0's
    registration; the turn that ended the run was a fresh activation on another host (not a redelivery, so no
    redo of the dead turn). Seen twice in the long chaos run: 2 registrations left behind."""
    from actors.engine.commands import ScheduleRemoval, WithdrawWait
    from actors.hosting.turn_effects import RunWriter

    @bide.durable_task(name="TwoDirectWaits")
    async def two_waits(input: dict, ctx: DurableContext) -> Any:
        first = await ctx.aio_wait_for_event("dead-turn-msg")
        second = await ctx.aio_wait_for_event("dead-turn-msg")
        return [first["n"], second["n"]]

    conn = await bide._pool.get()

    async def registrations() -> int:
        return await registrations_of(bide, "dead-turn-msg")

    real = RunWriter.carry_out
    skipped: list[str] = []

    async def dies_before_withdrawing(self: RunWriter, commands: Any) -> None:
        ends = any(isinstance(c, ScheduleRemoval) for c in commands)
        if not skipped and not ends and any(isinstance(c, WithdrawWait) for c in commands):
            skipped.append(self.run_id)  # the host that resolved wait 0 never withdrew it
            commands = [c for c in commands if not isinstance(c, WithdrawWait)]
        await real(self, commands)

    monkeypatch.setattr(RunWriter, "carry_out", dies_before_withdrawing)
    async with running_worker(bide, [two_waits]):
        ref = await two_waits.aio_run_no_wait({})
        run_id = ref.workflow_run_id

        async def waits_at(pos: int) -> bool:
            entries = (await conn.history.read(run_id)).entries
            return any(isinstance(e, WaitRegistered) and e.pos == pos for e in entries)

        await wait_until(lambda: waits_at(0), what="the first wait")
        await bide.event.aio_send(run_id, "dead-turn-msg", {"n": 0})
        await wait_until(lambda: waits_at(1), what="the second wait")
        assert skipped == [run_id]
        await bide.event.aio_send(run_id, "dead-turn-msg", {"n": 1})
        assert await ref.aio_result(timeout=20) == [0, 1]

        async def withdrawn() -> bool:
            return await registrations() == 0

        await wait_until(withdrawn, timeout=20, what="every registration of the run to be withdrawn")


async def test_a_signal_that_comes_after_the_runs_end_leaves_its_inbox(bide: Bide) -> None:
    """A cancel or event that lands just after the end is never taken: its activation drops it (the quick
    chaos run in CI found one left behind)."""
    from actors.engine.wire import EventSignal

    @bide.durable_task(name="EndsQuickly")
    async def ends(input: dict, ctx: DurableContext) -> int:
        return 1

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [ends]):
        ref = await ends.aio_run_no_wait({})
        assert await ref.aio_result(timeout=20) == 1
        run_id = ref.workflow_run_id
        late = EventSignal(source="cancel", name="cancel", payload={"reason": "too late"}, event_id="late", at=utcnow())
        seq = await conn.publisher.publish(s.inbox(run_id), late.model_dump_json().encode())
        await conn.publisher.publish(s.queue("EndsQuickly", run_id), encode_activation(
            Activation(run_id=run_id, task="EndsQuickly", kind="signal", inbox_seq=seq)))

        async def inbox_empty() -> bool:
            info = await conn.js.stream_info(s.history_stream, subjects_filter=s.inbox(run_id))
            return not sum((info.state.subjects or {}).values())

        await wait_until(inbox_empty, timeout=10, what="the late signal to leave the inbox")


async def test_a_late_signal_whose_message_was_purged_with_the_ended_runs_inbox_is_dropped(bide: Bide) -> None:
    """Signals sent after a run ended (a child's end reported again after its parent ended) are purged by
    the first of their activations to find the run ended. The others named a message no read could see
    any more, and were retried for ever (the cluster chaos run left four on the queue)."""
    from actors.engine.wire import EventSignal

    @bide.durable_task(name="EndsAtOnce")
    async def ends(input: dict, ctx: DurableContext) -> Any:
        return {"ok": True}

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [ends]):
        ref = await ends.aio_run_no_wait({})
        assert await ref.aio_result(timeout=20) == {"ok": True}
    run_id = ref.workflow_run_id
    late = EventSignal(source="direct", name="late", payload={}, event_id="late-1", at=utcnow())
    seq = (await conn.js.publish(s.inbox(run_id), late.model_dump_json().encode())).seq
    await conn.js.purge_stream(s.history_stream, subject=s.inbox(run_id))  # what the first late activation did
    hist = await conn.history.read(run_id, inbox_seq=seq, timeout=2.0)  # raised StaleReadError
    assert hist.terminal is not None and not hist.inbox
    act = Activation(run_id=run_id, task="EndsAtOnce", kind="signal", inbox_seq=seq)
    await conn.js.publish(s.queue("EndsAtOnce", run_id), encode_activation(act), headers={HDR_BIDE_KIND: "signal"})
    async with running_worker(bide, [ends]):
        async def queue_empty() -> bool:
            info = await conn.js.stream_info(s.queue_stream, subjects_filter=s.queue("EndsAtOnce", run_id))
            return not sum((info.state.subjects or {}).values())

        await wait_until(queue_empty, timeout=20, what="the late signal's activation to be dropped")


async def test_a_turn_that_resolved_a_wait_acks_its_activation_only_once_the_waits_timer_is_withdrawn(
        bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    """The withdrawal of a resolved wait's timer is a tidy-up the code does not wait for. A host
    killed after the turn's ack but before that withdrawal left the timer for good, since no
    redelivery comes to redo it (the cluster chaos run, seed 30: timers of ended runs left behind).
    So the activation is acked only once it is done: a host that dies before leaves a redelivery
    that redoes it (``redo_last_turn``)."""
    import asyncio
    import contextlib

    from nats.aio.msg import Msg

    from actors.store.timers import TimerScheduler

    order: list[str] = []
    held = asyncio.Event()
    cancel, ack = TimerScheduler.cancel, Msg.ack

    async def held_cancel(self: TimerScheduler, run_id: str, pos: int) -> None:
        # Held until the activation is acked, or for 1 s if it is not (as it must not be): well inside
        # the ack wait (3 s), so a starved heartbeat cannot bring the activation back meanwhile.
        order.append("withdrawal begun")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(held.wait(), 1)
        await cancel(self, run_id, pos)
        order.append("withdrawal stored")

    async def recorded_ack(self: Msg) -> None:
        # The signal's activation only: under load the start's can be delivered twice (its turn
        # outran the ack wait), and the second delivery's ack come after the run was seen waiting.
        if "WaitsWithTimer" in self.subject and (self.headers or {}).get(HDR_BIDE_KIND) == "signal":
            order.append("ack")
            held.set()
        await ack(self)

    monkeypatch.setattr(TimerScheduler, "cancel", held_cancel)
    monkeypatch.setattr(Msg, "ack", recorded_ack)

    @bide.durable_task(name="WaitsWithTimer")
    async def waits(input: dict, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("go", timeout="1h")

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [waits]):
        ref = await waits.aio_run_no_wait({})
        await wait_until(lambda: _drained(conn, s, "WaitsWithTimer"), what="the run to wait")
        await bide.event.aio_send(ref.workflow_run_id, "go", {"ok": 1})
        assert await ref.aio_result(timeout=20) == {"ok": 1}
        await wait_until(lambda: _drained(conn, s, "WaitsWithTimer"), what="the signal's activation to be acked")
    assert order == ["withdrawal begun", "withdrawal stored", "ack"], order
