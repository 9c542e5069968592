"""What a turn asks its host to do: commands, and the pure functions that decide them.

The engine decides; the host carries out (``actors.hosting.turn_effects.RunWriter``,
the one home of every write a turn makes). A turn's commands come in two kinds:

- **Before the code goes on** (:class:`Append` of a memo's result, a sleep's schedule, a
  spawn; :class:`StartChildren`): the run's code waits for each, because what it does
  next depends on it being durable (invariant 1). The turn hands these to its effects
  port one at a time (:class:`Effects`).
- **After the code stopped** (parked at a wait or a sleep, or ended): a list the turn
  returns (:meth:`actors.engine.replay.Turn.conclude`), carried out in order: register
  the wait, append, schedule timers, withdraw what the append ended, purge the inbox,
  and, when the run ended, schedule its removal, tell its parent, cancel its children.

Every list here is a pure function of the history (and what the turn wrote), so the next
delivery of a turn whose host died half-way computes the same list again and repeats it
(:func:`redo_last_turn`): each command is idempotent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from actors.engine.child_ids import ChildStart
from actors.engine.run_history import RunHistory
from actors.engine.run_state import RunState
from actors.engine.wire import (
    TERMINAL,
    ActivationBegun,
    AttemptFailed,
    ChildrenSpawned,
    EventSignal,
    HistoryEntry,
    ParentLink,
    RunCancelled,
    RunFailed,
    RunStarted,
    SignalReceived,
    SleepFired,
    SleepScheduled,
    Terminal,
    WaitRegistered,
    WaitResolved,
)


@dataclass(frozen=True)
class Append:
    """Append ``entries`` to the run's history as one message, guarded by the run's last sequence."""

    entries: list[HistoryEntry]
    on_durable: Callable[[list[HistoryEntry]], None] | None = field(default=None, compare=False)
    """Told once the entries are durable (the turn counts them as written, its observer hears)."""


@dataclass(frozen=True)
class StartChildren:
    """Start these child runs of ``parent`` (idempotent: a start id per spawn)."""

    parent: ParentLink
    starts: list[ChildStart]


@dataclass(frozen=True)
class RegisterWait:
    """Register the wait's event conditions with the router (before the wait is in the history)."""

    wait: WaitRegistered
    run_input: Any


@dataclass(frozen=True)
class WithdrawWait:
    """Withdraw the wait's router registrations; ``satisfied``: conditions the router removed itself."""

    wait: WaitRegistered
    satisfied: frozenset[int | None] = frozenset()
    registered_before: bool = False
    """The wait was recorded by an earlier append than the one that ended it, so its registrations
    were stored before that append (``False``: not known, as for a wait resolved at once, whose only
    registration may be a dead turn's, still on its way)."""


@dataclass(frozen=True)
class ScheduleTimer:
    """Wake the run at ``wake_at`` for the sleep (or wait timeout) at ``pos``, its timer firing ``lead`` early."""

    pos: int
    wake_at: datetime
    lead: timedelta | None = None
    """``None``: the scheduler's default (``actors.store.timers.FIRE_LEAD``)."""


@dataclass(frozen=True)
class WaitBriefly:
    """The code waits on its host until ``until``: a sleep's last stretch (at most ``RESIDENT_MAX``).

    The turn only waits, so the host may lend its slot to other work meanwhile. The activation
    stays unacked (heartbeats keep it), so a host that dies here hands the run on.
    """

    until: datetime
    history_bytes: int = 0
    """What the waiting turn holds in memory (its run's stored history): lending is bounded by it too."""


@dataclass(frozen=True)
class CancelTimer:
    """Withdraw the timer of ``pos`` (best effort: a late firing replays to nothing new)."""

    pos: int


@dataclass(frozen=True)
class ScheduleRetry:
    """Start the run's next attempt at ``retry.retry_at``."""

    retry: AttemptFailed


@dataclass(frozen=True)
class PurgeInbox:
    """The inbox's signals up to ``upto_seq`` are in the history: remove them (best effort)."""

    upto_seq: int


@dataclass(frozen=True)
class ClearInbox:
    """The run ended: its inbox's messages up to ``upto_seq`` (signals taken whose purge failed,
    signals that came after the end) go, and the wind-up waits for it.

    Not best effort like :class:`PurgeInbox`: a failure leaves the activation unacknowledged,
    and its redelivery winds the run up again, so an ended run's inbox is always drained. A
    message that comes later has its own activation (or the inbox sweeper's), whose wind-up
    drains it in turn.
    """

    upto_seq: int


@dataclass(frozen=True)
class ScheduleRemoval:
    """The run ended: its retention starts now (DESIGN.md invariant 9)."""

    end: Terminal


@dataclass(frozen=True)
class RecordEnd:
    """Move the run's record in the runs index from live to ended (a view: best effort, no ack awaited)."""

    started: RunStarted
    end: Terminal


@dataclass(frozen=True)
class NotifyParent:
    """Tell the parent run that this child ended (idempotent: one report per child)."""

    parent: ParentLink
    end: Terminal


@dataclass(frozen=True)
class NextGeneration:
    """The run continued as new: the earlier generation's messages go, the new one's first turn is asked for.

    Carried out after the ``Append`` of ``started`` (the switch): it purges the history's
    messages before that append and publishes ``started``'s start activation.
    """

    started: RunStarted


@dataclass(frozen=True)
class CancelChildren:
    """Ask these ``(run id, task)`` children to stop (background: a child's own turn records it)."""

    children: list[tuple[str, str]]
    reason: str


Command = (Append | StartChildren | RegisterWait | WithdrawWait | ScheduleTimer | CancelTimer | ScheduleRetry
           | PurgeInbox | ClearInbox | ScheduleRemoval | RecordEnd | NotifyParent | CancelChildren | NextGeneration
           | WaitBriefly)


class Effects(Protocol):
    """Carries out one command a turn's code depends on (the host's ``RunWriter``)."""

    def __call__(self, command: Append | StartChildren | WaitBriefly) -> Awaitable[None]: ...


class TurnObserver(Protocol):
    """Watches a turn's steps (the host's tracing): the engine reports, and knows nothing of spans."""

    def memo(self, name: str, pos: int) -> Any:
        """A context manager around a step that runs now (a replayed step is not reported)."""

    def sleep(self, pos: int, duration_s: float, began: datetime, ended: datetime) -> None:
        """A sleep that this turn recorded as fired."""

    def wait(self, reg: WaitRegistered, resolved: WaitResolved, signals: list[EventSignal]) -> None:
        """A wait that this turn recorded as resolved, with the signals that resolved it."""


@dataclass(frozen=True)
class RunEnd:
    """How a run that ended is wound up: what is carried out after its terminal entry is durable."""

    end: Terminal
    unfinished: list[tuple[str, str]] = field(default_factory=list)
    """Children spawned and not heard back from: ``(run id, task)``."""
    cancels_children_on_failure: bool = False
    """A workflow run that failed stops its tasks; a plain run's failure leaves its children be."""
    inbox_upto: int = 0
    """The last inbox message the run's history knows of (taken or waiting); the wind-up drains
    the inbox up to it. 0: the run never had a signal, and its end costs no purge."""


def end_of_run(started: RunStarted, how: RunEnd) -> list[Command]:
    """After a run's terminal entry is durable: its index record, removal, inbox, parent's report, children."""
    end = how.end
    commands: list[Command] = [RecordEnd(started, end), ScheduleRemoval(end)]
    if how.inbox_upto:
        commands.append(ClearInbox(how.inbox_upto))
    if started.parent is not None:
        commands.append(NotifyParent(started.parent, end))
    stops = isinstance(end, RunCancelled) or (isinstance(end, RunFailed) and how.cancels_children_on_failure)
    if stops and how.unfinished:
        commands.append(CancelChildren(list(how.unfinished),
                                       f"parent run {started.run_id} ended: {end.k.removeprefix('run_')}"))
    return commands


def inbox_upto(hist: RunHistory) -> int:
    """The last inbox message ``hist`` knows of (0: none): the last signal taken or waiting, or the last
    message its read saw, which may be a malformed one the read dropped (logged; never taken)."""
    return max(hist.state.taken_upto, hist.inbox[-1][0] if hist.inbox else 0, hist.inbox_seen)


def ends(written: Sequence[HistoryEntry]) -> bool:
    """Whether ``written`` ends the run's current history: its end, or a next generation's start."""
    return any(isinstance(e, TERMINAL) or (isinstance(e, RunStarted) and e.generation) for e in written)


def ended_registrations(before: RunState, written: Sequence[HistoryEntry],
                        unrecorded: Sequence[WaitRegistered] = ()) -> list[WithdrawWait]:
    """The router registrations that a turn appending ``written`` after ``before`` must withdraw.

    A wait's registration is live while the wait is open in the history; the turn that
    resolves it withdraws it, and the turn that ends the run withdraws every registration
    the run ever made. Each wait comes with the conditions the router satisfied itself (it
    deleted those already).
    """
    written_waits = {e.wait_id: e for e in written if isinstance(e, WaitRegistered)}
    # Resolved: open before, or recorded by this append (one waited out on the host, one resolved
    # at once that a dead turn may have registered).
    ended = {w.wait_id: w for e in written if isinstance(e, WaitResolved)
             and (w := before.open_waits.get(e.wait_id) or written_waits.get(e.wait_id)) is not None}
    if ends(written):
        # The run ended: every wait it registered, open or resolved. A host that died between
        # the append resolving a wait and its withdrawal left that registration, and when the
        # next turn was not a redelivery of the dead one, nothing redid it. Also any
        # registration a dead host made for a wait it never recorded (``Turn._unrecorded_waits``).
        # Not those resolved by a turn the next turn vouched for (``ActivationBegun.tidied``: its
        # host made that turn and withdrew them), so a long-lived warm run's end stays small.
        for w in (*before.registered.values(), *written_waits.values(), *unrecorded):
            ended.setdefault(w.wait_id, w)
    if not ended:
        return []
    satisfied = {wait_id: set(conds) for wait_id, conds in before.router_satisfied.items() if wait_id in ended}
    for e in written:
        if isinstance(e, SignalReceived) and e.signal.source == "event" and e.signal.wait_id in ended:
            satisfied.setdefault(e.signal.wait_id, set()).add(e.signal.cond)
    # Recorded by an earlier append (open waits are among those too): registered before it.
    return [WithdrawWait(w, frozenset(satisfied.get(w.wait_id, ())), w.wait_id in before.registered)
            for w in ended.values()]


def after_append(before: RunState, written: Sequence[HistoryEntry], now: datetime,
                 unrecorded: Sequence[WaitRegistered] = ()) -> list[Command]:
    """What a turn leaves to tidy once ``written`` is durable: registrations and timers it ended."""
    withdrawals = ended_registrations(before, written, unrecorded)
    commands: list[Command] = list(withdrawals)
    for w in withdrawals:
        wait = w.wait
        if wait.wait_id not in before.resolved and any(
                c.kind == "sleep" and c.wake_at is not None and c.wake_at > now for c in wait.flat()):
            # The loser of an or-group never resumes the run: its timer is withdrawn (once,
            # by the turn that resolved it; a late firing of it only replays to nothing new).
            commands.append(CancelTimer(wait.pos))
    if ends(written):
        # A run that ended mid-sleep (cancelled, failed) withdraws that sleep's timer too.
        fired = {e.pos for e in written if isinstance(e, SleepFired)}
        sleeping = [*before.sleeping.values(), *(e for e in written if isinstance(e, SleepScheduled))]
        commands += [CancelTimer(e.pos) for e in sleeping if e.pos not in fired and e.wake_at > now]
    return commands


def last_turn(entries: list[HistoryEntry]) -> tuple[list[HistoryEntry], list[HistoryEntry]]:
    """The history split before the last turn that wrote anything (each turn's first append begins with its marker)."""
    for i in range(len(entries) - 1, -1, -1):
        if isinstance(entries[i], ActivationBegun):
            return entries[:i], entries[i:]
    return entries, []


def redo_last_turn(hist: RunHistory, now: datetime) -> list[Command]:
    """What a redelivered activation redoes first: the tidying after its last turn's append.

    The host that made that turn may have died, or failed to reach the server, between its
    append and the withdrawals that follow from it: a registration left live would never be
    withdrawn, and a signal left in the inbox never purged.
    """
    before, written = last_turn(hist.entries)
    commands = after_append(RunState.of(before), written, now) if written else []
    if hist.entries:
        # The earlier generation's last turn (skipped by readers: its start is the switch) may
        # have died before withdrawing what it ended. Also once this generation has begun: with
        # an ack wait longer than the wait for a turn under way, a signal's activation begins it
        # before the dead host's activation comes back.
        commands += [WithdrawWait(w.wait, frozenset(w.satisfied)) for w in hist.started.withdrawn]
    if hist.state.taken_upto:
        commands.append(PurgeInbox(hist.state.taken_upto))
    return commands


def unfinished_children(entries: Sequence[HistoryEntry]) -> list[tuple[str, str]]:
    """``(run id, task)`` of the children a history spawned and heard no outcome of (as a turn counts them)."""
    heard = {e.signal.name for e in entries if isinstance(e, SignalReceived) and e.signal.source == "child"}
    return [(rid, e.task) for e in entries if isinstance(e, ChildrenSpawned) for rid in e.run_ids if rid not in heard]
