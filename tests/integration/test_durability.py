"""Durability under crashes, races, code changes and tight slots, on a real nats-server.

Crashes are real: worker hosts run as child processes (``tests.apps.durability:worker``)
and are SIGKILLed. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from actors.engine.wire import Activation, MemoRecorded, RunStarted, encode_activation, utcnow
from actors.store.history import HistoryConflict
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, EmptyModel, RunFailedError
from tests.apps.durability import SleepInput, StepsInput, define, define_step_then_gate
from tests.support import WorkerProcess, running_worker, wait_until

APP = "tests.apps.durability:worker"
CHECKPOINT_KINDS = ("memo", "now", "sleep_scheduled", "sleep_fired")
TERMINAL = ("run_completed", "run_failed", "run_cancelled")


async def start_host(procs: list[WorkerProcess], url: str) -> WorkerProcess:
    proc = WorkerProcess(APP, url, ack_wait=3.0)
    procs.append(proc)
    await asyncio.to_thread(proc.start)
    return proc


def pid_of(proc: WorkerProcess) -> int:
    assert proc.proc is not None
    return proc.proc.pid


async def history_has(bide: Bide, run_id: str, kind: str) -> bool:
    hist = await bide.runs.aio_history(run_id)
    return any(e.k == kind for e in hist.entries)


async def test_sigkill_during_sleep_keeps_the_deadline(
    bide: Bide, nats_server: EmbeddedServer, hosts: list[WorkerProcess]
) -> None:
    durable_sleep, _ = define(bide)
    first = await start_host(hosts, nats_server.url)

    t0 = time.monotonic()
    ref = await durable_sleep.aio_run_no_wait(SleepInput(seconds=6))
    run_id = ref.workflow_run_id
    await wait_until(lambda: history_has(bide, run_id, "sleep_scheduled"), timeout=15, what="the sleep to start")
    hist = await bide.runs.aio_history(run_id)
    wake_at = next(e.wake_at for e in hist.entries if e.k == "sleep_scheduled")
    # Fault injection, not a wait for state: crash the host half way through the 6 s sleep.
    midpoint = wake_at - timedelta(seconds=3)
    await wait_until(lambda: utcnow() >= midpoint, timeout=10, what="the middle of the sleep")
    first.kill()
    killed_at = time.monotonic() - t0
    assert 2.5 <= killed_at < 4.5, killed_at

    second = await start_host(hosts, nats_server.url)
    assert await ref.aio_result(timeout=20) == {"slept": 6.0}
    elapsed = time.monotonic() - t0
    # The wake time was recorded once: ~6 s in all, not 3 s + a fresh 6 s on the new host.
    assert 6.0 <= elapsed < 8.5, elapsed

    hist = await bide.runs.aio_history(run_id)
    kinds = [e.k for e in hist.entries]
    assert kinds.count("sleep_scheduled") == 1 and kinds.count("sleep_fired") == 1
    activations = [e.host for e in hist.entries if e.k == "activation"]
    assert activations[0].endswith(f":{pid_of(first)}")
    assert activations[-1].endswith(f":{pid_of(second)}"), "the second host finished the run"


async def test_sigkill_mid_run_reruns_only_the_step_in_progress(
    bide: Bide, nats_server: EmbeddedServer, hosts: list[WorkerProcess], tmp_path: Path
) -> None:
    _, durable_steps = define(bide)
    log, gate = tmp_path / "steps.log", tmp_path / "gate"
    log.touch()

    def executions() -> list[tuple[str, int]]:
        return [(step, int(pid)) for step, pid in (line.split() for line in log.read_text().splitlines())]

    first = await start_host(hosts, nats_server.url)
    ref = await durable_steps.aio_run_no_wait(StepsInput(log=str(log), gate=str(gate)))
    await wait_until(lambda: any(s == "step_two" for s, _ in executions()), timeout=15, what="step two to start")
    first.kill()
    assert executions() == [("step_one", pid_of(first)), ("step_two", pid_of(first))]

    second = await start_host(hosts, nats_server.url)
    gate.touch()
    # The killed host's activation comes back after ack_wait (3 s); the second host replays it.
    assert await ref.aio_result(timeout=30) == {"one": 10, "two": 15, "three": 30}

    steps = Counter(s for s, _ in executions())
    assert steps["step_one"] == 1, executions()  # recorded before the crash: never re-run
    # In progress when the host died (at least once): re-run once on the new host, not more.
    assert steps["step_two"] == 2, executions()
    assert steps["step_three"] == 1, executions()
    assert executions()[-2:] == [("step_two", pid_of(second)), ("step_three", pid_of(second))]
    hist = await bide.runs.aio_history(ref.workflow_run_id)
    assert [e.pos for e in hist.entries if e.k == "memo"] == [0, 1, 2]


async def test_sigkill_while_the_code_waits_after_a_step_does_not_run_the_step_again(
    bide: Bide, nats_server: EmbeddedServer, hosts: list[WorkerProcess], tmp_path: Path
) -> None:
    """A step's result goes with the run's next write, and is written on its own as soon as the
    code waits on anything else: a host killed during that wait leaves it recorded."""
    step_then_gate = define_step_then_gate(bide)
    log, gate = tmp_path / "steps.log", tmp_path / "gate"
    log.touch()
    first = await start_host(hosts, nats_server.url)
    ref = await step_then_gate.aio_run_no_wait(StepsInput(log=str(log), gate=str(gate)))
    await wait_until(lambda: history_has(bide, ref.workflow_run_id, "memo"), timeout=15,
                     what="the step's result to be recorded while the code waits")
    first.kill()
    await start_host(hosts, nats_server.url)
    gate.touch()
    assert await ref.aio_result(timeout=30) == {"one": 10}
    assert log.read_text().split() == ["step_one", str(pid_of(first))]  # run once, on the killed host


async def test_a_run_that_ends_right_after_its_step_is_one_message(bide: Bide) -> None:
    """Its start, its step's result and its end are appended together: one write, one ack."""
    @bide.durable_task(name="OneStep")
    async def one_step(input: EmptyModel, ctx: DurableContext) -> int:
        return int(await ctx.memo(lambda: 7))

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [one_step]):
        ref = await one_step.aio_run_no_wait(EmptyModel())
        assert await ref.aio_result(timeout=20) == 7
    info = await conn.js.stream_info(s.history_stream, subjects_filter=s.history(ref.workflow_run_id))
    assert sum((info.state.subjects or {}).values()) == 1
    hist = await bide.runs.aio_history(ref.workflow_run_id)
    assert [e.k for e in hist.entries] == ["run_started", "activation", "memo", "run_completed"]


class RaceInput(BaseModel):
    n: int


async def test_two_hosts_racing_write_each_checkpoint_once(bide: Bide, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="bide.host")

    def add(i: int, n: int) -> int:
        return i * 100 + n

    @bide.durable_task(name="RaceSteps")
    async def race(input: RaceInput, ctx: DurableContext) -> int:
        total = 0
        for i in range(3):
            total += await ctx.memo(add, i, input.n)
            # A resident sleep, then one long enough to evict the run and go through a timer.
            await ctx.aio_sleep_for(0.05 if i % 2 == 0 else 0.7)
        return total

    runs = 50
    async with (
        running_worker(bide, [race], name="racer-a") as a,
        running_worker(bide, [race], name="racer-b") as b,
    ):
        conn = await bide._pool.get()
        refs = []
        for n in range(runs):
            ref = await race.aio_run_no_wait(RaceInput(n=n))
            refs.append(ref)
            # Extra activations of the same run: both hosts take turns of it at the same time.
            dup = Activation(run_id=ref.workflow_run_id, task="RaceSteps", kind="retry")
            for _ in range(2):
                await conn.js.publish(conn.layout.subjects.queue("RaceSteps", ref.workflow_run_id),
                                      encode_activation(dup))
        results = await asyncio.gather(*(r.aio_result(timeout=40) for r in refs))
        assert results == [300 + 3 * n for n in range(runs)]
        assert a.host.turns > 0 and b.host.turns > 0

    conflicts = [r for r in caplog.records if r.name == "bide.host" and "history moved past" in r.getMessage()]
    assert conflicts, "the hosts never raced: the test did not exercise the single-writer guard"
    for ref in refs:
        hist = await bide.runs.aio_history(ref.workflow_run_id)
        keys = Counter((e.k, e.pos) for e in hist.entries if e.k in CHECKPOINT_KINDS)
        dupes = {k: c for k, c in keys.items() if c > 1}
        assert not dupes, f"run {ref.workflow_run_id}: duplicate checkpoints {dupes}"
        assert sorted(keys) == sorted(
            [("memo", p) for p in (0, 2, 4)] + [(k, p) for p in (1, 3, 5) for k in ("sleep_fired", "sleep_scheduled")]
        )
        assert sum(e.k in TERMINAL for e in hist.entries) == 1
        assert hist.entries[-1].k == "run_completed"


async def test_history_append_with_a_stale_sequence_is_refused(bide: Bide) -> None:
    conn = await bide._pool.get()
    log = conn.history
    run_id = "guard-run"
    started = RunStarted(run_id=run_id, task="Guard", durable=True, at=utcnow())
    seq1 = await log.append(run_id, [started], expected_seq=0)
    with pytest.raises(HistoryConflict):
        await log.append(run_id, [started], expected_seq=0)  # the run already exists

    stale = seq1
    memo = MemoRecorded(pos=0, name="step", args_hash="x", result=1)
    seq2 = await log.append(run_id, [memo], expected_seq=seq1)  # the first writer wins
    with pytest.raises(HistoryConflict) as ei:
        await log.append(run_id, [memo.model_copy(update={"result": 2})], expected_seq=stale)
    assert ei.value.expected_seq == stale and ei.value.run_id == run_id

    hist = await log.read(run_id)
    assert [e.k for e in hist.entries] == ["run_started", "memo"]
    assert hist.entries[1].result == 1 and hist.last_seq == seq2


async def test_changed_code_fails_the_run_with_non_determinism(bide: Bide, nats_server: EmbeddedServer) -> None:
    def step_a() -> str:
        return "a"

    def step_b() -> str:
        return "b"

    @bide.durable_task(name="Versioned")
    async def version_a(input: EmptyModel, ctx: DurableContext) -> str:
        res = await ctx.memo(step_a)
        await ctx.aio_sleep_for(2)  # evicted: the run resumes on whichever host runs the task then
        return res

    client_b = Bide(nats_server.url, ack_wait=3.0)

    @client_b.durable_task(name="Versioned")
    async def version_b(input: EmptyModel, ctx: DurableContext) -> str:
        res = await ctx.memo(step_b)
        await ctx.aio_sleep_for(2)
        return res

    try:
        async with running_worker(bide, [version_a], name="version-a"):
            ref = await version_a.aio_run_no_wait(EmptyModel())
            run_id = ref.workflow_run_id
            await wait_until(lambda: history_has(bide, run_id, "sleep_scheduled"), timeout=15,
                             what="version A to sleep")
        async with running_worker(client_b, [version_b], name="version-b"):
            with pytest.raises(RunFailedError) as ei:
                await ref.aio_result(timeout=20)
    finally:
        await client_b.aclose()

    err = ei.value
    assert err.error_type == "NonDeterminismError"
    assert "position 0" in err.error_message
    assert "step_a" in err.error_message and "step_b" in err.error_message
    assert err.error_message.index("step_a") < err.error_message.index("step_b")  # recorded, then requested
    hist = await bide.runs.aio_history(run_id)
    assert [e.name.rsplit(".", 1)[-1] for e in hist.entries if e.k == "memo"] == ["step_a"]
    assert hist.entries[-1].k == "run_failed"


async def test_one_slot_sleeps_many_runs_at_once(bide: Bide) -> None:
    @bide.durable_task(name="SlotSleeper")
    async def slot_sleeper(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        before = await ctx.aio_now()
        res = await ctx.aio_sleep_for(3)
        after = await ctx.aio_now()
        return {"before": before.isoformat(), "after": after.isoformat(), "slept": res.duration.total_seconds()}

    runs = 50
    async with running_worker(bide, [slot_sleeper], slots=1, durable_slots=1):
        t0 = time.monotonic()
        refs = [await slot_sleeper.aio_run_no_wait(EmptyModel()) for _ in range(runs)]
        results = await asyncio.gather(*(r.aio_result(timeout=30) for r in refs))
        total = time.monotonic() - t0

    assert total < 20, f"{runs} runs of a 3 s sleep took {total:.1f}s on one durable slot"
    before = [datetime.fromisoformat(r["before"]) for r in results]
    after = [datetime.fromisoformat(r["after"]) for r in results]
    # Every run went to sleep before the first one woke up: the slot is freed while a run sleeps.
    window = (max(before) - min(before)).total_seconds()
    assert window < 1.5, f"the runs went to sleep over {window:.2f}s, not all at once"
    assert max(before) < min(after)
    assert all(r["slept"] == 3.0 and (a - b).total_seconds() >= 3.0 for r, a, b in zip(results, after, before,
                                                                                          strict=True))


async def test_sigterm_on_idle_worker_exits_zero_promptly(
    nats_server: EmbeddedServer, hosts: list[WorkerProcess]
) -> None:
    proc = await start_host(hosts, nats_server.url)
    t0 = time.monotonic()
    code = await asyncio.to_thread(proc.terminate, 10)
    elapsed = time.monotonic() - t0
    assert code == 0
    assert elapsed < 8.0, f"shutdown took {elapsed:.1f}s"


async def test_sigterm_lets_the_turn_in_flight_finish(
    bide: Bide, nats_server: EmbeddedServer, hosts: list[WorkerProcess], tmp_path: Path
) -> None:
    _, durable_steps = define(bide)
    log, gate = tmp_path / "steps.log", tmp_path / "gate"
    log.touch()
    proc = await start_host(hosts, nats_server.url)
    ref = await durable_steps.aio_run_no_wait(StepsInput(log=str(log), gate=str(gate)))
    await wait_until(lambda: "step_two" in log.read_text(), timeout=15, what="step two to start")
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    gate.touch()  # the step in flight can now end: graceful shutdown waits for it
    code = await asyncio.to_thread(proc.proc.wait, 30)
    assert code == 0
    # Finished by the stopping host itself, each step exactly once.
    assert await ref.aio_result(timeout=5) == {"one": 10, "two": 15, "three": 30}
    assert Counter(line.split()[0] for line in log.read_text().splitlines()) == {
        "step_one": 1, "step_two": 1, "step_three": 1,
    }


async def test_every_task_of_a_host_is_served_promptly(bide: Bide) -> None:
    # Tasks of one kind share the host's slot pool; none may reserve all of it and starve the rest.
    defined = []
    for i in range(4):
        async def step(input: EmptyModel, ctx: DurableContext, i: int = i) -> int:
            return await ctx.memo(lambda: i)

        defined.append(bide.durable_task(name=f"Shared{i}")(step))

    async with running_worker(bide, defined, slots=10, durable_slots=10):
        t0 = time.monotonic()
        for i in reversed(range(4)):
            assert await defined[i].aio_run(EmptyModel(), timeout=10) == i
        elapsed = time.monotonic() - t0
    # Starved tasks waited for pull expiry (10 s); served ones take milliseconds.
    assert elapsed < 5.0, f"one run of each of 4 tasks took {elapsed:.1f}s"


STEP_RUNS: list[str] = []


def counted_step(run_id: str) -> str:
    STEP_RUNS.append(run_id)
    return run_id


async def test_two_first_turns_at_once_with_signals_waiting_run_the_step_once(
        bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the long chaos run: a run's start and a signal's activation, both redelivered after their
    hosts died, ran its first turn on two live hosts at once; the turn took the waiting signals without
    claiming them (the run had not begun), so both ran the step after the wait and one append lost."""
    from actors.engine.wire import Activation, encode_activation
    from actors.store.history import HistoryLog

    real_read = HistoryLog.read

    async def slow_read(self: HistoryLog, *args: Any, **kwargs: Any) -> Any:
        hist = await real_read(self, *args, **kwargs)
        await asyncio.sleep(0.1)  # a slow host: another may read the same history before this one appends
        return hist

    monkeypatch.setattr(HistoryLog, "read", slow_read)

    @bide.durable_task(name="FirstTurnRace")
    async def first_turn(input: EmptyModel, ctx: DurableContext) -> str:
        await ctx.aio_wait_for_event("race:go")
        return await ctx.memo(counted_step, ctx.workflow_run_id)

    STEP_RUNS.clear()
    conn = await bide._pool.get()
    runs = 30
    refs = [await first_turn.aio_run_no_wait(EmptyModel()) for _ in range(runs)]
    for ref in refs:  # the event is there before any turn, and the run gets extra activations
        await bide.event.aio_send(ref.workflow_run_id, "race:go", {"ok": True})
        extra = Activation(run_id=ref.workflow_run_id, task="FirstTurnRace", kind="retry")
        for _ in range(2):
            await conn.js.publish(conn.layout.subjects.queue("FirstTurnRace", ref.workflow_run_id),
                                  encode_activation(extra))
    async with (  # few slots each, so the two hosts share every run's activations
        running_worker(bide, [first_turn], name="first-a", durable_slots=3),
        running_worker(bide, [first_turn], name="first-b", durable_slots=3),
    ):
        results = await asyncio.gather(*(r.aio_result(timeout=60) for r in refs))
    assert results == [r.workflow_run_id for r in refs]
    twice = {rid for rid in STEP_RUNS if STEP_RUNS.count(rid) > 1}
    assert not twice, f"the step ran more than once in {len(twice)} of {runs} runs, with no host dying"
