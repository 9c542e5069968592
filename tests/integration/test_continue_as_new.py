"""ctx.continue_as_new: a run that lives forever keeps a short history; its callers see one run."""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import pytest

from actors.engine.commands import NextGeneration
from actors.engine.wire import RunStarted, utcnow
from actors.hosting.turn_effects import RunWriter
from sdk import Bide, DurableContext, EmptyModel
from sdk.errors import RunCancelledError, RunFailedError, RunNotFoundError
from tests.support import registrations, running_worker, wait_until

STEPS: list[int] = []


def record(total: int) -> int:
    STEPS.append(total)
    return total


def define(bide: Bide, name: str, per_generation: int = 3) -> Any:
    @bide.durable_task(name=name)
    async def counter(input: dict, ctx: DurableContext) -> Any:
        total = input.get("total", 0)
        for _ in range(per_generation):
            event = await ctx.aio_wait_for_event("can:tick")  # pushed by key: through the router
            total = await ctx.memo(record, total + event["n"])
        if total >= input["until"]:
            return {"total": total}
        ctx.continue_as_new({"total": total, "until": input["until"]})

    return counter


async def at_wait(bide: Bide, run_id: str, generation: int, waits: int) -> bool:
    try:
        hist = await bide.runs.aio_history(run_id)
    except RunNotFoundError:
        return False  # (a child not started yet)
    first = hist.entries[0]
    return (getattr(first, "generation", 0) == generation
            and [e.k for e in hist.entries].count("wait_registered") == waits)


async def push_ticks(bide: Bide, run_id: str, generations: int, per_generation: int = 3) -> None:
    """One event per wait, each pushed once the run waits for it (no lookback involved)."""
    for g in range(generations):
        for w in range(per_generation):
            await wait_until(lambda g=g, w=w: at_wait(bide, run_id, g, w + 1), what=f"generation {g}, wait {w}")
            await bide.event.aio_push("can:tick", {"n": 1})


async def test_a_run_continues_as_new_keeps_its_id_and_its_caller_gets_the_last_generations_result(
        bide: Bide) -> None:
    counter = define(bide, "CanCounter")
    STEPS.clear()
    async with running_worker(bide, [counter]):
        ref = await counter.aio_run_no_wait({"until": 9})
        await push_ticks(bide, ref.workflow_run_id, generations=3)
        assert await ref.aio_result(timeout=20) == {"total": 9}
        assert STEPS == list(range(1, 10))  # every step once, in order, across the generations
        hist = await bide.runs.aio_history(ref.workflow_run_id)
        first = hist.entries[0]
        assert isinstance(first, RunStarted) and first.generation == 2 and first.input == {"total": 6, "until": 9}
        # Only the last generation is kept: its start, three waits and steps, its end.
        assert [e.k for e in hist.entries].count("wait_resolved") == 3
        conn = await bide._pool.get()
        oldest = await conn.history.read_first(ref.workflow_run_id)  # the subject's first stored message
        assert isinstance(oldest, RunStarted) and oldest.generation == 2  # the earlier ones were purged


async def test_a_caller_waiting_with_aio_run_and_a_parent_get_the_result(bide: Bide) -> None:
    counter = define(bide, "CanChild", per_generation=1)

    @bide.durable_task(name="CanParent")
    async def parent(input: EmptyModel, ctx: DurableContext) -> Any:
        return await counter.aio_run({"until": 3})

    async with running_worker(bide, [counter, parent]):
        ref = await parent.aio_run_no_wait(EmptyModel())
        child_id = f"{ref.workflow_run_id}~0~0"
        await push_ticks(bide, child_id, generations=3, per_generation=1)
        assert await ref.aio_result(timeout=20) == {"total": 3}


async def test_a_host_that_dies_after_the_switch_leaves_a_run_that_goes_on(
        bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next generation's start is appended, then the turn fails before its purge and its activation."""
    counter = define(bide, "CanDies", per_generation=1)
    real = RunWriter.__call__
    failed: list[str] = []

    async def dies_at_the_next_generation(self: RunWriter, command: Any) -> None:
        if isinstance(command, NextGeneration) and not failed:
            failed.append(self.run_id)
            raise RuntimeError("the host died here")
        await real(self, command)

    monkeypatch.setattr(RunWriter, "__call__", dies_at_the_next_generation)
    STEPS.clear()
    async with running_worker(bide, [counter]):
        ref = await counter.aio_run_no_wait({"until": 2})
        await push_ticks(bide, ref.workflow_run_id, generations=2, per_generation=1)
        assert await ref.aio_result(timeout=20) == {"total": 2}
        assert failed == [ref.workflow_run_id]
        assert STEPS == [1, 2]


async def test_an_input_that_is_not_json_fails_the_run_naming_it(bide: Bide) -> None:
    @bide.durable_task(name="CanBad")
    async def bad(input: EmptyModel, ctx: DurableContext) -> Any:
        ctx.continue_as_new({"when": object()})

    async with running_worker(bide, [bad]):
        with pytest.raises(RunFailedError) as err:
            await bad.aio_run(EmptyModel(), timeout=20)
    assert "the input of continue_as_new" in str(err.value)



def define_inbox(bide: Bide, name: str, got: list[tuple[int, Any]]) -> Any:
    @bide.durable_task(name=name)
    async def inbox(input: dict, ctx: DurableContext) -> Any:
        # Continues as new right after its wait resolves: the switch is the message that also
        # records the wait's end, so the run's first stored message does not begin with its start.
        gen = input.get("gen", 0)
        event = await ctx.aio_wait_for_event("note", timeout="30s")
        got.append((gen, event))
        if gen == 0:
            ctx.continue_as_new({"gen": 1})
        return {"gen": gen, "event": event}

    return inbox


async def into_second_generation(bide: Bide, inbox: Any, first: dict[str, int], event_id: str | None = None) -> Any:
    """Start ``inbox``, send it ``first`` once it waits, and return once its next generation waits."""
    ref = await inbox.aio_run_no_wait({})
    run_id = ref.workflow_run_id
    await wait_until(lambda: at_wait(bide, run_id, 0, 1), what="generation 0 to wait")
    await bide.event.aio_send(run_id, "note", first, event_id=event_id)
    await wait_until(lambda: at_wait(bide, run_id, 1, 1), what="generation 1 to wait")
    return ref


async def test_a_run_that_continued_as_new_takes_direct_events_and_cancels(bide: Bide) -> None:
    """``event.send`` and ``runs.cancel`` find the run's task from its start: after the switch, the
    start of the new generation, not the first entry of the run's first message."""
    got: list[tuple[int, Any]] = []
    inbox = define_inbox(bide, "CanSendCancel", got)
    async with running_worker(bide, [inbox]):
        ref = await into_second_generation(bide, inbox, {"n": 1})
        await bide.event.aio_send(ref.workflow_run_id, "note", {"n": 2})
        assert await ref.aio_result(timeout=20) == {"gen": 1, "event": {"n": 2}}

        ref = await into_second_generation(bide, inbox, {"n": 3})
        assert await bide.runs.aio_cancel(ref.workflow_run_id, reason="enough")
        with pytest.raises(RunCancelledError, match="enough"):
            await ref.aio_result(timeout=20)


async def test_a_send_retried_after_the_run_continued_as_new_is_delivered_once(bide: Bide) -> None:
    """``event.send`` with an event id is stored once: sent again within the de-duplication window,
    after the run took the first copy and continued as new (which removed that generation's
    history, the only record of what it took), it must not reach the new generation as well."""
    got: list[tuple[int, Any]] = []
    inbox = define_inbox(bide, "CanInbox", got)
    async with running_worker(bide, [inbox]):
        ref = await into_second_generation(bide, inbox, {"n": 1}, event_id="note-1")
        run_id = ref.workflow_run_id
        await bide.event.aio_send(run_id, "note", {"n": 1}, event_id="note-1")  # the sender retries
        await bide.event.aio_send(run_id, "note", {"n": 2}, event_id="note-2")
        assert await ref.aio_result(timeout=20) == {"gen": 1, "event": {"n": 2}}
        assert got == [(0, {"n": 1}), (1, {"n": 2})]


def held() -> int:
    return 1


class Carrying:
    """A run whose first generation is held before its wait until two direct events are in its inbox:
    the turn that resumes it takes both, its wait consumes the first and it continues as new, so
    the next generation begins with the second carried into it. It ends at generation ``last``."""

    def __init__(self, bide: Bide, name: str, last: int) -> None:
        self.gate, self.reached = asyncio.Event(), asyncio.Event()
        self.got: list[tuple[int, Any]] = []

        @bide.durable_task(name=name)
        async def carry(input: dict, ctx: DurableContext) -> Any:
            gen = input.get("gen", 0)
            if gen == 0:
                self.reached.set()
                await self.gate.wait()  # the events are sent meanwhile
                await ctx.memo(held)
            event = await ctx.aio_wait_for_event("note", timeout="30s")
            self.got.append((gen, event))
            if gen < last:
                ctx.continue_as_new({"gen": gen + 1})
            return {"gen": gen, "event": event}

        self.task = carry

    async def start_holding_two(self, bide: Bide) -> Any:
        """Start it, and send it ``{"n": 0}`` and ``{"n": 1}`` while its first generation is held."""
        ref = await self.task.aio_run_no_wait({})
        await asyncio.wait_for(self.reached.wait(), 10)
        for n in range(2):
            await bide.event.aio_send(ref.workflow_run_id, "note", {"n": n})
        return ref


async def test_a_signal_taken_with_another_goes_on_to_the_next_generation(bide: Bide) -> None:
    """Two direct events reach a run's inbox before it waits: the turn that resumes it takes both,
    its wait consumes the first and it continues as new. The second is the next generation's (it
    was lost: purged with the inbox, and marked taken)."""
    carrying = Carrying(bide, "CanCarry", last=1)
    async with running_worker(bide, [carrying.task]):
        ref = await carrying.start_holding_two(bide)
        carrying.gate.set()
        assert await ref.aio_result(timeout=20) == {"gen": 1, "event": {"n": 1}}
        assert carrying.got == [(0, {"n": 0}), (1, {"n": 1})]


STEPS_BY_GENERATION: collections.Counter[tuple[str, int]] = collections.Counter()


def counted(run_id: str, gen: int) -> int:
    STEPS_BY_GENERATION[(run_id, gen)] += 1
    return gen


def define_forever(bide: Bide, name: str) -> Any:
    @bide.durable_task(name=name)
    async def forever(input: dict, ctx: DurableContext) -> Any:
        gen, got = input.get("gen", 0), input.get("got", [])
        event = await ctx.aio_wait_for_event("note")
        await ctx.memo(counted, ctx.run_id, gen)
        got = [*got, event["n"]]
        if gen + 1 < input["gens"]:
            ctx.continue_as_new({"gens": input["gens"], "gen": gen + 1, "got": got})
        return {"got": got}

    return forever


async def send_one_per_generation(bide: Bide, forever: Any, seed: int, runs: int, result_timeout: float) -> None:
    """``runs`` runs of ``forever``, each sent one event per generation (each twice, as a retrying sender
    would) with random pauses: each result holds every event once, in order."""
    rng = random.Random(seed)

    async def one() -> None:
        gens = rng.randint(2, 4)
        ref = await forever.aio_run_no_wait({"gens": gens})
        await asyncio.sleep(rng.uniform(0, 0.3))
        for n in range(gens):
            for _ in range(2):
                await bide.event.aio_send(ref.workflow_run_id, "note", {"n": n}, event_id=f"note-{n}")
            await asyncio.sleep(rng.choice([0, 0, 0.01, 0.1]))
        assert await ref.aio_result(timeout=result_timeout) == {"got": list(range(gens))}

    await asyncio.gather(*(one() for _ in range(runs)))


async def test_events_sent_to_a_run_continuing_as_new_on_two_hosts_run_each_step_once(bide: Bide) -> None:
    """Two hosts take a generation's start and the signals sent to it. Each generation's step runs once:
    before its first turn claimed the signals carried into it, a second turn ran the step again."""
    forever = define_forever(bide, "CanForeverTwoHosts")
    STEPS_BY_GENERATION.clear()
    async with running_worker(bide, [forever]), running_worker(bide, [forever], name="second-host"):
        await send_one_per_generation(bide, forever, seed=5, runs=30, result_timeout=30)
    assert not {k: n for k, n in STEPS_BY_GENERATION.items() if n > 1}


async def test_a_signal_before_its_generations_start_on_one_host_does_not_hold_it_up(bide: Bide) -> None:
    """A signal's activation that comes before its generation's start, on the same host, waits for
    that generation's first turn without holding the run's lock on the host: it held it, and the
    start waited out its ten seconds."""
    forever = define_forever(bide, "CanForeverOneHost")
    async with running_worker(bide, [forever]):
        await send_one_per_generation(bide, forever, seed=7, runs=10, result_timeout=8)


async def test_a_switch_whose_withdrawals_failed_has_them_redone_by_its_retry(
        bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch is appended, then the withdrawal of the wait it resolved (by a direct event: the
    router still holds its registration) meets an infrastructure error, as in an election (the
    cluster chaos run). The retried turn reads only the next generation, yet must withdraw that
    registration: it was left at the router for good."""
    import nats.errors

    import actors.hosting.turn_effects as turn_effects

    publish = turn_effects.publish_registrations
    failed: list[str] = []

    async def failing_once(*args: Any, **kwargs: Any) -> None:
        wait, op = args[2], args[6]
        if op == "cancel" and not failed:
            failed.append(wait.wait_id)
            raise nats.errors.TimeoutError
        await publish(*args, **kwargs)

    monkeypatch.setattr(turn_effects, "publish_registrations", failing_once)
    forever = define_forever(bide, "CanWithdrawRedone")

    async with running_worker(bide, [forever]):
        ref = await forever.aio_run_no_wait({"gens": 2})
        run_id = ref.workflow_run_id
        for n in range(2):
            await wait_until(lambda n=n: at_wait(bide, run_id, n, 1), what=f"generation {n} to wait")
            await bide.event.aio_send(run_id, "note", {"n": n})
        assert await ref.aio_result(timeout=20) == {"got": [0, 1]}
        assert failed == [f"{run_id}:0"]  # generation 0's wait, withdrawn after the switch

        async def withdrawn() -> bool:
            return await registrations(bide, "note") == 0

        await wait_until(withdrawn, timeout=10, what="every registration of the run to be withdrawn")


async def test_a_registration_left_for_a_wait_the_generation_resolved_at_once_is_withdrawn_by_the_switch(
        bide: Bide) -> None:
    """A turn parks at a generation's wait, registers it with the router and loses its append to a
    turn that took a signal (or dies before the append): the winner resolves the wait at once and
    never records it as registered. A run's end withdraws such registrations; a switch must too,
    since no later generation knows of the wait (the cluster chaos run, seed 32, left one)."""
    from actors.engine.wire import WaitRegistered
    from actors.hosting.router_inputs import publish_registrations

    carrying = Carrying(bide, "CanUnrecorded", last=2)
    async with running_worker(bide, [carrying.task]):
        ref = await carrying.start_holding_two(bide)
        run_id = ref.workflow_run_id
        # What the turn that lost generation 1's first append would have registered.
        conn = await bide._pool.get()
        lost = WaitRegistered(pos=0, wait_id=f"{run_id}~g1:0", label="event:note", args_hash="lost",
                              groups=[[{"kind": "event", "key": "event", "event_key": "note"}]], at=utcnow())
        await publish_registrations(conn.publisher, conn.layout, lost, run_id, "CanUnrecorded", {}, "register")
        assert await registrations(bide, "note") == 1
        carrying.gate.set()
        await wait_until(lambda: at_wait(bide, run_id, 2, 1), what="generation 2 to wait")
        await bide.event.aio_send(run_id, "note", {"n": 2})
        assert await ref.aio_result(timeout=20) == {"gen": 2, "event": {"n": 2}}

        async def withdrawn() -> bool:
            return await registrations(bide, "note") == 0

        await wait_until(withdrawn, timeout=10, what="the registration generation 1 never recorded to be withdrawn")
