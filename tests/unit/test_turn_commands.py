"""A turn with no server: what it hands its effects port while the code runs, and what it returns once it stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from actors.engine.commands import (
    Append,
    CancelChildren,
    CancelTimer,
    ClearInbox,
    Command,
    NotifyParent,
    PurgeInbox,
    RegisterWait,
    ScheduleRemoval,
    ScheduleRetry,
    ScheduleTimer,
    StartChildren,
    WaitBriefly,
    WithdrawWait,
    ended_registrations,
    redo_last_turn,
)
from actors.engine.replay import SLEEP_LEAD_MAX, Turn, sleep_lead
from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    ActivationBegun,
    AttemptFailed,
    ChildrenSpawned,
    ErrorInfo,
    EventSignal,
    HistoryEntry,
    MemoRecorded,
    ParentLink,
    RunCancelled,
    RunCompleted,
    RunStarted,
    SignalReceived,
    SleepScheduled,
    WaitRegistered,
    WaitResolved,
    args_hash,
    sleep_to,
    utcnow,
)
from sdk.conditions import SleepCondition, UserEventCondition
from sdk.context import ChildSpec
from sdk.errors import NonDeterminismError

AT = datetime(2026, 1, 1, tzinfo=UTC)
PARENT = ParentLink(run_id="p1", task="Parent", pos=3, n=1)


class Port:
    """Records the commands a turn hands over while its code runs, and makes each append durable at once."""

    def __init__(self) -> None:
        self.done: list[Command] = []

    async def __call__(self, command: Command) -> None:
        self.done.append(command)
        if isinstance(command, Append) and command.on_durable is not None:
            command.on_durable(command.entries)


def history(*entries: HistoryEntry, inbox: list[tuple[int, EventSignal]] | None = None,
            parent: ParentLink | None = None) -> RunHistory:
    started = RunStarted(run_id="r1", task="Job", durable=True, input={"id": 7}, at=AT, parent=parent)
    return RunHistory("r1", [started, *entries], last_seq=len(entries) + 1, inbox=inbox or [])


def new_run() -> RunHistory:
    """A new run's first turn: its start alone, not written yet (the host writes it with the turn's first append)."""
    started = RunStarted(run_id="r1", task="Job", durable=True, input={"id": 7}, at=AT)
    return RunHistory("r1", [started], 0, start_unrecorded=True)


def direct(name: str, payload: Any, event_id: str = "e1") -> EventSignal:
    return EventSignal(source="direct", name=name, payload=payload, event_id=event_id, at=AT)


async def run(hist: RunHistory, code: Callable[[Turn], Awaitable[Any]], delivery: int = 1,
              port: Port | None = None) -> tuple[Turn, Port, Any]:
    """Drive ``code`` on a fresh turn until it finishes or parks: (turn, port, result or None if parked)."""
    port = port if port is not None else Port()
    turn = Turn(history=hist, effects=port, task="Job", host_id="h", delivery=delivery)
    user = asyncio.create_task(code(turn))
    turn.code = user  # as the host does
    done, _ = await asyncio.wait({user, turn.suspended}, return_when=asyncio.FIRST_COMPLETED)
    if user in done:
        return turn, port, user.result()
    user.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await user
    return turn, port, None


def kinds(commands: list[Command]) -> list[str]:
    return [type(c).__name__ for c in commands]


def double(n: int) -> int:
    return n * 2


async def test_a_memo_is_durable_before_the_wait_after_it_is_registered_then_recorded() -> None:
    """A registration refused in an outage retries the turn: a step not recorded before it would run again."""
    async def code(turn: Turn) -> Any:
        n = await turn.memo(double, (21,))
        return await turn.wait("ok", [[UserEventCondition("order:ok", expression=f"input.n == {n}")]])

    turn, port, result = await run(new_run(), code)
    assert result is None  # parked at the wait
    [memo] = port.done
    assert isinstance(memo, Append)
    assert [type(e) for e in memo.entries] == [ActivationBegun, MemoRecorded]
    commands = turn.conclude()
    assert kinds(commands) == ["RegisterWait", "Append"]
    register, append = commands
    assert isinstance(register, RegisterWait) and register.wait.wait_id == "r1:1"
    assert register.run_input == {"id": 7}
    assert isinstance(append, Append) and [type(e) for e in append.entries] == [WaitRegistered]


async def test_a_run_that_ends_right_after_its_step_records_both_in_one_append() -> None:
    async def code(turn: Turn) -> Any:
        return await turn.memo(double, (21,))

    turn, port, result = await run(new_run(), code)
    assert result == 42
    await turn.steps_recorded()
    assert port.done == []
    [append, *_] = turn.conclude(RunCompleted(result=42, at=AT))
    assert isinstance(append, Append)
    assert [type(e) for e in append.entries] == [ActivationBegun, MemoRecorded, RunCompleted]


def appended(port: Port) -> list[str]:
    """The kinds of the entries the port's appends held so far, in order."""
    return [type(e).__name__ for c in port.done if isinstance(c, Append) for e in c.entries]


def turn_of_this_task(hist: RunHistory, port: Port) -> Turn:
    """A turn whose code runs in the calling task (the host tells a turn its code's task)."""
    turn = Turn(history=hist, effects=port, task="Job", host_id="h", delivery=1)
    turn.code = asyncio.current_task()
    return turn


async def test_a_steps_result_is_durable_before_the_next_step_runs() -> None:
    seen: list[list[str]] = []

    async def code(turn: Turn) -> Any:
        await turn.memo(double, (1,))

        def second() -> int:
            seen.append(appended(port))
            return 2

        return await turn.memo(second, ())

    port = Port()
    assert await code(turn_of_this_task(new_run(), port)) == 2
    assert seen == [["ActivationBegun", "MemoRecorded"]]


class TellingPort(Port):
    """A port that says when it was first handed a command."""

    def __init__(self) -> None:
        super().__init__()
        self.called = asyncio.Event()

    async def __call__(self, command: Command) -> None:
        await super().__call__(command)
        self.called.set()


async def test_a_steps_result_is_written_once_the_code_waits_on_anything_else() -> None:
    gate = asyncio.Event()

    async def code(turn: Turn) -> Any:
        n = await turn.memo(double, (21,))
        await gate.wait()  # not a checkpoint: an outside call, a lock
        return n

    port = TellingPort()
    turn = Turn(history=new_run(), effects=port, task="Job", host_id="h", delivery=1)
    user = asyncio.create_task(code(turn))
    turn.code = user
    await asyncio.wait_for(port.called.wait(), 5)
    assert not user.done()
    [append] = port.done
    assert isinstance(append, Append) and [type(e) for e in append.entries] == [ActivationBegun, MemoRecorded]
    gate.set()
    assert await user == 42
    await turn.steps_recorded()
    assert turn.conclude(RunCompleted(result=42, at=AT))[0] == Append([RunCompleted(result=42, at=AT)],
                                                                      on_durable=turn._recorded)


class WaitingPort(Port):
    """A port whose ``WaitBriefly`` waits (in engine time), as a host's does."""

    async def __call__(self, command: Command) -> None:
        await super().__call__(command)
        if isinstance(command, WaitBriefly):
            await sleep_to(command.until)


async def test_a_wait_waited_out_on_the_host_is_not_written_with_the_step_before_it() -> None:
    async def code(turn: Turn) -> Any:
        await turn.memo(double, (21,))
        return await turn.wait("soon", [[SleepCondition(timedelta(milliseconds=200))]])

    turn, port, _ = await run(new_run(), code, port=WaitingPort())
    appends = [[type(e) for e in c.entries] for c in port.done if isinstance(c, Append)]
    # Written while the code waited: the step only, never a wait the router was not told of.
    assert appends == [[ActivationBegun, MemoRecorded]]
    await turn.steps_recorded()
    [append, *_] = turn.conclude(RunCompleted(result=None, at=AT))
    assert isinstance(append, Append)
    assert [type(e) for e in append.entries] == [WaitRegistered, WaitResolved, RunCompleted]


async def test_a_sleep_schedules_its_timer_after_the_append_that_records_it() -> None:
    async def code(turn: Turn) -> Any:
        return await turn.sleep_until(None, timedelta(hours=1))

    turn, port, _ = await run(history(), code)
    [sched] = port.done  # the wake time is durable before any timer exists
    assert isinstance(sched, Append) and isinstance(sched.entries[-1], SleepScheduled)
    wake = sched.entries[-1].wake_at
    # An hour's sleep has its timer fire SLEEP_LEAD_MAX early: its host replays it ahead of the moment.
    assert turn.conclude() == [ScheduleTimer(0, wake, SLEEP_LEAD_MAX)]
    assert sleep_lead(timedelta(seconds=4)) == timedelta(seconds=2)  # a short sleep: half its length


async def test_an_event_that_wins_an_or_group_withdraws_the_registration_and_the_timer_then_purges_the_inbox() -> None:
    async def asks(turn: Turn) -> Any:
        return await turn.wait("w", [[UserEventCondition("paid"), SleepCondition(timedelta(days=1))]])

    # First turn: the code parks at the or-group; what it records is the next turn's history.
    first, _, _ = await run(history(), asks)
    register, append, timer = first.conclude()
    assert isinstance(register, RegisterWait) and isinstance(append, Append)
    assert isinstance(timer, ScheduleTimer) and timer.pos == 0  # the sleep condition's wake-up
    parked = history(*append.entries)
    signal = EventSignal(source="event", name="paid", payload={"ok": 1}, event_id="e9", wait_id="r1:0", cond=0, at=AT)

    turn, _, result = await run(RunHistory("r1", parked.entries, last_seq=2, inbox=[(5, signal)]), asks)
    assert result == {"paid": {"e9": {"ok": 1}}}
    commands = turn.conclude(RunCompleted(result=result, at=utcnow()))
    # The run ends in this turn: its whole inbox is drained by the wind-up (awaited), not purged in passing.
    assert kinds(commands) == ["Append", "WithdrawWait", "CancelTimer", "RecordEnd", "ScheduleRemoval", "ClearInbox"]
    withdraw = commands[1]
    assert isinstance(withdraw, WithdrawWait) and withdraw.satisfied == {0}  # the router deleted that one itself
    assert commands[2] == CancelTimer(0)
    assert commands[5] == ClearInbox(5)


async def test_children_are_recorded_before_they_are_started_and_their_end_tells_the_parent() -> None:
    specs = [ChildSpec(task="Child", durable=True, input={"i": i}) for i in range(3)]

    async def code(turn: Turn) -> Any:
        return await turn.spawn(specs, wait=True)

    turn, port, _ = await run(history(parent=PARENT), code)
    spawned, start = port.done
    assert isinstance(spawned, Append) and isinstance(spawned.entries[-1], ChildrenSpawned)
    assert isinstance(start, StartChildren)
    assert [c.run_id for c in start.starts] == spawned.entries[-1].run_ids
    assert start.parent == ParentLink(run_id="r1", task="Job", pos=0, n=3)
    # Cancelled while waiting for them: the end stops the children and tells this run's parent.
    commands = turn.conclude(RunCancelled(reason="stop", at=utcnow()))
    assert kinds(commands) == ["Append", "RecordEnd", "ScheduleRemoval", "NotifyParent", "CancelChildren"]
    assert isinstance(commands[3], NotifyParent) and commands[3].parent == PARENT
    cancel = commands[4]
    assert isinstance(cancel, CancelChildren) and [rid for rid, _ in cancel.children] == start_ids(start)


def start_ids(start: StartChildren) -> list[str]:
    return [c.run_id for c in start.starts]


async def test_a_redelivered_turn_starts_again_the_children_recorded_and_not_heard_from() -> None:
    specs = [ChildSpec(task="Child", durable=True, input={"i": i}) for i in range(2)]
    spawned = ChildrenSpawned(pos=0, task="Child", run_ids=["r1-0-0", "r1-0-1"],
                              args_hash=args_hash([[c.task, c.input, c.key] for c in specs]), at=AT)
    one_ended = EventSignal(source="child", name="r1-0-0", payload={"status": "completed", "result": 1},
                            event_id="x", at=AT)
    hist = history(ActivationBegun(host="dead", delivery=1, at=AT), spawned,
                   SignalReceived(inbox_seq=4, signal=one_ended))

    async def code(turn: Turn) -> Any:
        return await turn.spawn(specs, wait=True)

    _, port, _ = await run(hist, code, delivery=2)
    [start] = port.done
    assert isinstance(start, StartChildren) and start_ids(start) == ["r1-0-1"]


async def test_a_failed_attempt_is_appended_then_retried_and_nothing_is_wound_up() -> None:
    async def code(turn: Turn) -> Any:
        return await turn.memo(double, (1,))

    turn, _, _ = await run(history(), code)  # the host decided the attempt failed (the code's error)
    failed = AttemptFailed(attempt=1, error=ErrorInfo(type="RuntimeError", message="boom", traceback=""),
                           retry_at=AT + timedelta(seconds=5), at=AT)
    commands = turn.conclude(failed)
    assert kinds(commands) == ["Append", "ScheduleRetry"]
    assert commands[1] == ScheduleRetry(failed)


async def test_code_that_asks_for_something_else_at_a_recorded_position_is_a_non_determinism_error() -> None:
    hist = history(ActivationBegun(host="h", delivery=1, at=AT),
                   MemoRecorded(pos=0, name="other", args_hash=args_hash(1), result=1))

    async def code(turn: Turn) -> Any:
        return await turn.memo(double, (1,))

    with pytest.raises(NonDeterminismError) as err:
        await run(hist, code)
    assert err.value.position == 0
    assert "other" in err.value.recorded and "double" in err.value.requested


async def test_signals_that_woke_a_run_that_has_begun_are_claimed_before_any_code_runs() -> None:
    hist = history(ActivationBegun(host="h", delivery=1, at=AT),
                   WaitRegistered(pos=0, wait_id="r1:0", label="w", args_hash="", at=AT, groups=[]),
                   inbox=[(9, direct("msg", {"n": 1}))])

    port = Port()
    turn = Turn(history=hist, effects=port, task="Job", host_id="h", delivery=1)
    await turn.claim_signals()  # a run that has begun claims what woke it before any code runs
    [claim] = port.done
    assert isinstance(claim, Append) and [type(e) for e in claim.entries] == [ActivationBegun, SignalReceived]


def test_a_redelivery_redoes_the_withdrawals_of_the_last_turn_and_the_inbox_purge() -> None:
    reg = WaitRegistered(pos=0, wait_id="r1:0", label="w", args_hash="", at=AT, groups=[])
    sig = direct("msg", {"n": 1})
    hist = history(ActivationBegun(host="h1", delivery=1, at=AT), reg,
                   ActivationBegun(host="h2", delivery=1, at=AT), SignalReceived(inbox_seq=9, signal=sig),
                   WaitResolved(pos=0, wait_id="r1:0", label="w", args_hash="", result={}, consumed=[9], at=AT))
    # Recorded by an earlier turn: its registration was stored before, and holds its id.
    assert redo_last_turn(hist, AT) == [WithdrawWait(reg, registered_before=True), PurgeInbox(9)]
    assert ScheduleRemoval not in map(type, redo_last_turn(hist, AT))


def test_a_runs_end_withdraws_again_only_what_no_later_turn_vouched_for() -> None:
    """A warm turn says its host made (and tidied after) the turn before it: the end skips those waits."""

    def reg(pos: int) -> WaitRegistered:
        return WaitRegistered(pos=pos, wait_id=f"r1:{pos}", label="w", args_hash="", at=AT, groups=[])

    def resolved(pos: int) -> WaitResolved:
        return WaitResolved(pos=pos, wait_id=f"r1:{pos}", label="w", args_hash="", result={}, at=AT)

    hist = history(ActivationBegun(host="h", delivery=1, at=AT), reg(0),
                   ActivationBegun(host="h", delivery=1, at=AT), resolved(0), reg(1),
                   ActivationBegun(host="h", delivery=1, at=AT, tidied=True), resolved(1), reg(2),
                   ActivationBegun(host="other", delivery=1, at=AT), resolved(2), reg(3))
    # Wait 0 was resolved by a turn the next (warm) turn vouched for; 1 and 2 were not; 3 is open.
    assert [w.wait.pos for w in ended_registrations(hist.state, [RunCancelled(reason="x", at=AT)])] == [1, 2, 3]


async def test_a_run_that_never_used_its_inbox_ends_without_draining_it() -> None:
    """The wind-up's inbox purge is awaited: a run with no signal, taken or waiting, does not pay for it."""

    async def code(turn: Turn) -> Any:
        return 1

    turn, _, result = await run(history(), code)
    commands = turn.conclude(RunCompleted(result=result, at=utcnow()))
    assert kinds(commands) == ["Append", "RecordEnd", "ScheduleRemoval"]


def test_a_redelivery_in_a_generation_that_has_begun_redoes_what_its_switch_withdrew() -> None:
    """The host that made the switch died before its withdrawals; a signal's activation began the
    next generation before the dead host's activation came back (an ack wait over ten seconds)."""
    from actors.engine.wire import EndedWait

    old = WaitRegistered(pos=0, wait_id="r1:0", label="w", args_hash="", at=AT, groups=[])
    started = RunStarted(run_id="r1", task="Job", durable=True, input={}, at=AT, generation=1,
                         withdrawn=[EndedWait(wait=old, satisfied=[0])])
    new = WaitRegistered(pos=0, wait_id="r1~g1:0", label="w", args_hash="", at=AT, groups=[])
    hist = RunHistory("r1", [started, ActivationBegun(host="h2", delivery=1, at=AT), new], last_seq=3)
    assert redo_last_turn(hist, AT) == [WithdrawWait(old, frozenset({0}))]


async def test_a_switch_withdraws_every_wait_of_its_generation_and_names_for_a_retry_those_it_resolved() -> None:
    """Tidied as at a run's end, so a registration whose withdrawal a dead host never made goes too;
    the next start names only the waits the switching turn resolved (a start naming every wait of a
    long generation would make the switch, one message, as large as the generation)."""

    async def code(turn: Turn) -> Any:
        for _ in range(2):
            await turn.wait("w", [[UserEventCondition("note")]])
        return "next"

    entries: list[HistoryEntry] = []
    turn: Turn | None = None
    for n in range(3):  # parks at wait 0; resolves it, parks at wait 1; resolves it
        inbox = [(10 + n, direct("note", {"n": n}, event_id=f"e{n}"))] if n else []
        hist = RunHistory("r1", [*history().entries, *entries], last_seq=len(entries) + 1, inbox=inbox)
        turn, port, result = await run(hist, code)
        if result is None:
            done = [*port.done, *turn.conclude()]
            entries += [e for c in done if isinstance(c, Append) for e in c.entries]
    assert turn is not None and result == "next"
    commands = turn.continue_as_new({"gen": 1})
    withdrawals = [c.wait.wait_id for c in commands if isinstance(c, WithdrawWait)]
    assert sorted(withdrawals) == ["r1:0", "r1:1"]
    [switch] = [c for c in commands if isinstance(c, Append)]
    nxt = switch.entries[-1]
    assert isinstance(nxt, RunStarted) and nxt.generation == 1
    assert [w.wait.wait_id for w in nxt.withdrawn] == ["r1:1"]


async def test_a_wait_resolved_at_once_is_recorded_and_withdrawn_by_its_turn_and_by_a_redelivery() -> None:
    """A turn that parked at the wait and died before its append may have registered it: the
    turn that resolves it at once records it and withdraws it, and so does a redelivery of that
    turn (its host may die between the append and the withdrawal)."""
    async def code(turn: Turn) -> Any:
        return await turn.wait("w", [[UserEventCondition("note")]])

    hist = history(inbox=[(9, direct("note", {"n": 1}))])
    turn, _, result = await run(hist, code)
    assert result is not None
    commands = turn.conclude(RunCompleted(result=result, at=AT))
    append = commands[0]
    assert isinstance(append, Append)
    assert [type(e) for e in append.entries] == [ActivationBegun, SignalReceived, WaitRegistered, WaitResolved,
                                                  RunCompleted]
    # Not "registered before": the only registration may be a dead turn's, still on its way, so the
    # withdrawal must hold the registration's message id.
    assert [(c.wait.wait_id, c.registered_before) for c in commands if isinstance(c, WithdrawWait)] == [
        ("r1:0", False)]
    ended = RunHistory("r1", [*hist.entries, *append.entries], last_seq=3)
    assert [(c.wait.wait_id, c.registered_before) for c in redo_last_turn(ended, utcnow())
            if isinstance(c, WithdrawWait)] == [("r1:0", False)]


async def test_a_turn_that_read_its_history_writes_once_before_its_first_step_runs() -> None:
    """Read from a replica that may be behind, the view may miss another host's last append: the
    turn's first write, guarded by the sequence it saw, fails before any step runs on it."""
    written: list[list[str]] = []

    async def code(turn: Turn) -> Any:
        def step() -> int:
            written.append(appended(port))
            return 1

        return await turn.memo(step, ())

    port = Port()
    assert await code(turn_of_this_task(history(), port)) == 1
    assert written == [["ActivationBegun"]]
    port.done.clear()
    assert await code(turn_of_this_task(new_run(), port)) == 1  # nothing read
    assert written[-1] == []
