"""What the engine needs to know of a run's history, folded entry by entry.

The decisions of a turn (is the code parked, can this activation change what it does,
what must be withdrawn after an append) ask the same few questions of the whole history.
Asking them by scanning costs a run that has lived long (an agent loop of 10,000 waits
holds 40,000 entries) tens of milliseconds per turn. A :class:`RunState` answers them
from a fold that costs O(1) per entry: built once per read, and, for a run a host keeps
resident, moved forward by only what each turn appends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from actors.engine.wire import (
    TERMINAL,
    ActivationBegun,
    AttemptFailed,
    ChildrenSpawned,
    HistoryEntry,
    RunStarted,
    SignalReceived,
    SleepFired,
    SleepScheduled,
    Terminal,
    WaitRegistered,
    WaitResolved,
)


@dataclass
class RunState:
    """The fold of a run's history entries (see the module's docs)."""

    began: bool = False
    """A turn has begun (an ``activation_begun`` is recorded)."""
    failed_attempts: int = 0
    terminal: Terminal | None = None
    registered: dict[str, WaitRegistered] = field(default_factory=dict)
    """Every wait the run recorded whose router registration may still be live, by wait id: all of
    them, less those resolved by a turn whose next turn says it tidied after it (``tidied``)."""
    resolved_this_turn: list[str] = field(default_factory=list)
    open_waits: dict[str, WaitRegistered] = field(default_factory=dict)
    """Waits registered and not yet resolved (their router registrations are live)."""
    resolved: set[str] = field(default_factory=set)
    router_satisfied: dict[str, set[int | None]] = field(default_factory=dict)
    """By wait id: the conditions the router satisfied (it deleted those registrations itself)."""
    sleeping: dict[int, SleepScheduled] = field(default_factory=dict)
    """Sleeps scheduled and not yet fired, by position."""
    fired: set[int] = field(default_factory=set)
    """Positions whose sleep fired or whose wait was resolved (a late timer for them changes nothing)."""
    unreported: dict[str, str] = field(default_factory=dict)
    """Children spawned that have not reported back: run id -> task."""
    reported: set[str] = field(default_factory=set)
    taken_upto: int = 0
    """The highest inbox sequence a ``signal_received`` took."""

    @classmethod
    def of(cls, entries: Iterable[HistoryEntry]) -> RunState:
        state = cls()
        state.fold(entries)
        return state

    def fold(self, entries: Iterable[HistoryEntry]) -> None:
        """Move the state past ``entries`` (appended after everything folded so far)."""
        for e in entries:
            if isinstance(e, ActivationBegun):
                self.began = True
                if e.tidied:
                    for wait_id in self.resolved_this_turn:
                        self.registered.pop(wait_id, None)
                self.resolved_this_turn = []
            elif isinstance(e, SignalReceived):
                self.taken_upto = max(self.taken_upto, e.inbox_seq)
                sig = e.signal
                if sig.source == "child":
                    self.reported.add(sig.name)
                    self.unreported.pop(sig.name, None)
                elif sig.source == "event" and sig.wait_id is not None:
                    self.router_satisfied.setdefault(sig.wait_id, set()).add(sig.cond)
            elif isinstance(e, WaitRegistered):
                if e.wait_id not in self.resolved:
                    self.registered[e.wait_id] = e
                if e.wait_id not in self.resolved:
                    self.open_waits[e.wait_id] = e
            elif isinstance(e, WaitResolved):
                self.resolved.add(e.wait_id)
                self.resolved_this_turn.append(e.wait_id)
                self.open_waits.pop(e.wait_id, None)
                self.fired.add(e.pos)
            elif isinstance(e, SleepScheduled):
                if e.pos not in self.fired:
                    self.sleeping[e.pos] = e
            elif isinstance(e, SleepFired):
                self.fired.add(e.pos)
                self.sleeping.pop(e.pos, None)
            elif isinstance(e, ChildrenSpawned):
                for rid in e.run_ids:
                    if rid not in self.reported:
                        self.unreported[rid] = e.task
            elif isinstance(e, AttemptFailed):
                self.failed_attempts += 1
            elif isinstance(e, TERMINAL):
                self.terminal = e
            elif isinstance(e, RunStarted):
                self.taken_upto = max(self.taken_upto, e.inbox_taken)
