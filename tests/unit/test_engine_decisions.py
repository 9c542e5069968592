"""The engine's decisions with no server: a workflow run's next turn, and whether an activation needs the code."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from actors.engine.dag import plan_workflow_turn
from actors.engine.decisions import expected_wakeups, failed_attempts, is_suspended, needs_user_code, unheeded_signals
from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    Activation,
    ActivationBegun,
    AttemptFailed,
    ChildrenSpawned,
    ErrorInfo,
    EventSignal,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    SignalReceived,
    SleepScheduled,
    WaitCondition,
    WaitRegistered,
)

AT = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Step:
    name: str
    workflow_key: str
    parents: list[Step] = field(default_factory=list)


A = Step("wf:a", "a")
B = Step("wf:b", "b", [A])
C = Step("wf:c", "c", [A])
STEPS = [A, B, C]


def history(*entries: Any, inbox: list[tuple[int, EventSignal]] | None = None) -> RunHistory:
    started = RunStarted(run_id="w1", task="wf", durable=True, input={}, at=AT)
    return RunHistory("w1", [started, *entries], last_seq=len(entries) + 1, inbox=inbox or [])


def child_signal(run_id: str, outcome: dict[str, Any]) -> EventSignal:
    return EventSignal(source="child", name=run_id, payload=outcome, event_id=f"end:{run_id}", at=AT)


def spawned(idx: int, step: Step, run_id: str) -> ChildrenSpawned:
    return ChildrenSpawned(pos=idx, task=step.name, run_ids=[run_id], args_hash="", at=AT)


def test_a_new_workflow_run_starts_its_roots_only() -> None:
    plan = plan_workflow_turn(history(), STEPS, "h", 1, AT, None)
    assert plan.to_start == [0] and plan.end is None
    assert [type(e) for e in plan.new] == [ActivationBegun, ChildrenSpawned]


def test_a_task_starts_when_its_parents_ended_and_the_run_ends_when_all_have() -> None:
    a_done = {"status": "completed", "result": 1}
    hist = history(spawned(0, A, "ra"), inbox=[(1, child_signal("ra", a_done))])
    plan = plan_workflow_turn(hist, STEPS, "h", 1, AT, None)
    assert plan.to_start == [1, 2] and plan.done == {"a": a_done}
    assert isinstance(plan.new[1], SignalReceived)  # the report is recorded with the spawns
    ended = history(spawned(0, A, "ra"), SignalReceived(inbox_seq=1, signal=child_signal("ra", a_done)),
                    spawned(1, B, "rb"), spawned(2, C, "rc"),
                    inbox=[(2, child_signal("rb", {"status": "completed", "result": 2})),
                           (3, child_signal("rc", {"status": "completed", "result": 3, "skipped": True}))])
    plan = plan_workflow_turn(ended, STEPS, "h", 1, AT, None)
    assert isinstance(plan.end, RunCompleted) and plan.to_start == []
    assert plan.end.result == {"a": 1, "b": 2, "c": {"skipped": True}}


def test_a_failed_task_fails_the_run_and_names_it() -> None:
    failed = {"status": "failed", "error": {"type": "KeyError", "message": "x"}}
    plan = plan_workflow_turn(history(spawned(0, A, "ra"), inbox=[(1, child_signal("ra", failed))]), STEPS, "h", 1,
                              AT, None)
    assert isinstance(plan.end, RunFailed) and "'a' failed: KeyError" in plan.end.error.message
    assert plan.to_start == [] and plan.unfinished == []


def test_a_cancel_ends_the_run_and_lists_the_tasks_still_running() -> None:
    cancel = EventSignal(source="cancel", name="cancel", payload={"reason": "stop"}, event_id="c", at=AT)
    plan = plan_workflow_turn(history(spawned(0, A, "ra"), inbox=[(1, cancel)]), STEPS, "h", 1, AT, None)
    assert isinstance(plan.end, RunCancelled) and plan.end.reason == "stop"
    assert plan.unfinished == [("ra", "wf:a")]


def test_a_redelivered_turn_starts_again_what_was_recorded_and_not_heard_from() -> None:
    plan = plan_workflow_turn(history(spawned(0, A, "ra")), STEPS, "h", 2, AT, None)
    assert plan.to_start == [0] and plan.end is None
    late = RunFailed(error=ErrorInfo(type="ScheduleTimeoutError", message="late"), at=AT)
    assert plan_workflow_turn(history(), STEPS, "h", 1, AT, late).end is late


def test_decisions_read_from_the_history() -> None:
    wait = WaitRegistered(pos=0, wait_id="w1:0", label="l", args_hash="x", at=AT,
                          groups=[[WaitCondition(kind="event", key="k", event_key="order:paid")]])
    waiting = history(ActivationBegun(host="h", delivery=1, at=AT), wait)
    assert is_suspended(waiting)
    paid = EventSignal(source="direct", name="order:paid", payload={}, event_id="e1", at=AT)
    other = EventSignal(source="direct", name="something:else", payload={}, event_id="e2", at=AT)
    signal = Activation(run_id="w1", task="t", kind="signal")
    assert needs_user_code(signal, history(*waiting.entries[1:], inbox=[(1, paid)]))
    assert not needs_user_code(signal, history(*waiting.entries[1:], inbox=[(1, other)]))
    # A turn that claimed a signal and then died: the signal is reconsidered, the code has not reacted.
    claimed = history(*waiting.entries[1:], ActivationBegun(host="h2", delivery=1, at=AT),
                      SignalReceived(inbox_seq=1, signal=paid))
    assert not is_suspended(claimed) and unheeded_signals(claimed) == [paid]
    sleeping = history(ActivationBegun(host="h", delivery=1, at=AT),
                       SleepScheduled(pos=0, duration_s=60, wake_at=AT + timedelta(minutes=1)))
    assert needs_user_code(Activation(run_id="w1", task="t", kind="timer", pos=0), sleeping)
    failures = history(AttemptFailed(attempt=1, error=ErrorInfo(type="E", message="m"), retry_at=AT, at=AT))
    assert failed_attempts(failures) == 1


def _sleep(key: str, seconds: float) -> WaitCondition:
    return WaitCondition(kind="sleep", key=key, duration_s=seconds, wake_at=AT + timedelta(seconds=seconds))


def _event(key: str) -> WaitCondition:
    return WaitCondition(kind="event", key=key, event_key=key)


def _wait(pos: int, groups: list[list[WaitCondition]], any_of: list[WaitCondition] | None = None) -> WaitRegistered:
    return WaitRegistered(pos=pos, wait_id=f"w:{pos}", label="l", args_hash="", groups=groups, at=AT,
                          any_of=any_of or [])


def test_a_parked_runs_expected_wakeups_are_its_sleeps_its_waits_sleeps_and_its_retry() -> None:
    sleeping = history(SleepScheduled(pos=0, duration_s=60, wake_at=AT + timedelta(seconds=60)))
    assert [(w.pos, w.at, w.certain) for w in expected_wakeups(sleeping)] == [(0, AT + timedelta(seconds=60), True)]
    # A timeout (an event or a sleep): the sleep alone ends the wait.
    timeout = history(_wait(1, [[_event("k"), _sleep("t", 30)]]))
    assert [(w.pos, w.at, w.certain) for w in expected_wakeups(timeout)] == [(1, AT + timedelta(seconds=30), True)]
    # Every group has a sleep: they end it once the latest group's earliest is over.
    both = history(_wait(2, [[_sleep("a", 10), _event("x")], [_sleep("b", 20)]]))
    assert [(w.at, w.certain) for w in expected_wakeups(both)] == [(AT + timedelta(seconds=20), True)]
    # A sleep and an event, both needed: the sleep may come and leave nothing to record.
    and_event = history(_wait(3, [[_sleep("a", 10)], [_event("x")]]))
    assert [(w.at, w.certain) for w in expected_wakeups(and_event)] == [(AT + timedelta(seconds=10), False)]
    # ... unless an any_of sleep ends it by itself.
    skip = history(_wait(4, [[_event("x")]], any_of=[_sleep("skip", 40)]))
    assert [(w.at, w.certain) for w in expected_wakeups(skip)] == [(AT + timedelta(seconds=40), True)]
    assert expected_wakeups(history(_wait(5, [[_event("x")]]))) == []  # events only: no timer
    failed = AttemptFailed(attempt=2, error=ErrorInfo(type="E", message="m"), retry_at=AT + timedelta(seconds=5), at=AT)
    retrying = history(failed)
    assert [(w.retry, w.at) for w in expected_wakeups(retrying)] == [(failed, AT + timedelta(seconds=5))]
    # Begun again: no retry pending.
    assert expected_wakeups(history(failed, ActivationBegun(host="h", delivery=1, at=AT))) == []
    assert expected_wakeups(history(SleepScheduled(pos=0, duration_s=1, wake_at=AT),
                                    RunCompleted(result=None, at=AT))) == []  # ended
    # Its start alone (a chosen id, a child, a new generation): its start activation wakes it.
    assert [(w.start, w.at) for w in expected_wakeups(history())] == [(True, AT)]
