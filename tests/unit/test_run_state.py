"""The fold of a run's history answers what scanning the whole history answers, however it is cut."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from actors.engine.run_state import RunState
from actors.engine.wire import (
    ActivationBegun,
    AttemptFailed,
    ChildrenSpawned,
    ErrorInfo,
    EventSignal,
    HistoryEntry,
    RunCompleted,
    RunStarted,
    SignalReceived,
    SleepFired,
    SleepScheduled,
    WaitRegistered,
    WaitResolved,
)

AT = datetime(2026, 1, 1, tzinfo=UTC)
ERR = ErrorInfo(type="E", message="m", traceback="")


def random_history(rng: random.Random, turns: int) -> list[HistoryEntry]:
    """A plausible history: each turn resolves or leaves what earlier turns opened, and opens new things."""
    entries: list[HistoryEntry] = [RunStarted(run_id="r", task="T", durable=True, input={}, at=AT)]
    open_waits: list[int] = []
    sleeping: list[int] = []
    children: list[str] = []
    pos = 0
    inbox = 0
    for _ in range(turns):
        entries.append(ActivationBegun(host="h", delivery=1, at=AT, tidied=rng.random() < 0.5))
        for _ in range(rng.randint(0, 3)):
            choice = rng.random()
            if choice < 0.25:
                entries.append(WaitRegistered(pos=pos, wait_id=f"r:{pos}", label="w", args_hash="", at=AT, groups=[]))
                open_waits.append(pos)
                pos += 1
            elif choice < 0.45 and open_waits:
                p = open_waits.pop(rng.randrange(len(open_waits)))
                inbox += 1
                sig = EventSignal(source="event", name="k", event_id=f"e{inbox}", wait_id=f"r:{p}",
                                  cond=rng.randint(0, 2), at=AT)
                entries += [SignalReceived(inbox_seq=inbox, signal=sig),
                            WaitResolved(pos=p, wait_id=f"r:{p}", label="w", args_hash="", result={}, at=AT)]
            elif choice < 0.6:
                entries.append(SleepScheduled(pos=pos, duration_s=1, wake_at=AT + timedelta(seconds=1)))
                sleeping.append(pos)
                pos += 1
            elif choice < 0.7 and sleeping:
                entries.append(SleepFired(pos=sleeping.pop(0), at=AT))
            elif choice < 0.8:
                ids = [f"c{pos}-{i}" for i in range(rng.randint(1, 3))]
                entries.append(ChildrenSpawned(pos=pos, task="C", run_ids=ids, args_hash="", at=AT))
                children += ids
                pos += 1
            elif choice < 0.9 and children:
                inbox += 1
                child = children.pop(rng.randrange(len(children)))
                entries.append(SignalReceived(inbox_seq=inbox, signal=EventSignal(
                    source="child", name=child, event_id=child, payload={}, at=AT)))
            else:
                entries.append(AttemptFailed(attempt=1, error=ERR, retry_at=AT, at=AT))
    if rng.random() < 0.3:
        entries.append(RunCompleted(result=1, at=AT))
    return entries


def scanned(entries: list[HistoryEntry]) -> dict[str, object]:
    """The same questions answered by scanning every entry (what the engine did before the fold)."""
    opened: dict[str, WaitRegistered] = {}
    for e in entries:
        if isinstance(e, WaitRegistered):
            opened[e.wait_id] = e
        elif isinstance(e, WaitResolved):
            opened.pop(e.wait_id, None)
    fired = {e.pos for e in entries if isinstance(e, SleepFired | WaitResolved)}
    tidied: set[str] = set()  # resolved in a turn whose next turn says it tidied after it
    this_turn: list[str] = []
    for e in entries:
        if isinstance(e, ActivationBegun):
            if e.tidied:
                tidied.update(this_turn)
            this_turn = []
        elif isinstance(e, WaitResolved):
            this_turn.append(e.wait_id)
    reported = {e.signal.name for e in entries if isinstance(e, SignalReceived) and e.signal.source == "child"}
    return {
        "open_waits": set(opened),
        "registered": {e.wait_id for e in entries if isinstance(e, WaitRegistered)} - tidied,
        "sleeping": {e.pos for e in entries if isinstance(e, SleepScheduled) and e.pos not in fired},
        "fired": fired,
        "unreported": {rid for e in entries if isinstance(e, ChildrenSpawned) for rid in e.run_ids} - reported,
        "failed_attempts": sum(isinstance(e, AttemptFailed) for e in entries),
        "terminal": next((e for e in reversed(entries) if isinstance(e, RunCompleted)), None),
        "taken_upto": max((e.inbox_seq for e in entries if isinstance(e, SignalReceived)), default=0),
        "began": any(isinstance(e, ActivationBegun) for e in entries),
    }


def folded(state: RunState) -> dict[str, object]:
    return {
        "open_waits": set(state.open_waits), "registered": set(state.registered), "sleeping": set(state.sleeping),
        "fired": state.fired, "unreported": set(state.unreported), "failed_attempts": state.failed_attempts,
        "terminal": state.terminal, "taken_upto": state.taken_upto, "began": state.began,
    }


@pytest.mark.parametrize("seed", range(40))
def test_the_fold_answers_what_a_scan_answers_however_the_history_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    entries = random_history(rng, turns=rng.randint(1, 30))
    assert folded(RunState.of(entries)) == scanned(entries)
    cut = rng.randint(0, len(entries))
    state = RunState.of(entries[:cut])
    state.fold(entries[cut:])  # a warm run's state moved forward by what its turn appended
    assert folded(state) == scanned(entries)
