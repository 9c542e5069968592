"""The replay engine: one turn of a durable run, rebuilt from its history.

User code between checkpoints is re-run; checkpointed operations (memo, now, sleep)
return what the history recorded. Every checkpoint has a *position* (the order in
which the code asked for it) and records what was asked, so a replay that asks for
something else fails with :class:`NonDeterminismError` (invariant 3).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from actors.engine.child_ids import CHILD_ID_SEPARATOR, ChildStart, child_run_ids
from actors.engine.commands import (
    Append,
    Command,
    Effects,
    NextGeneration,
    PurgeInbox,
    RegisterWait,
    RunEnd,
    ScheduleRetry,
    ScheduleTimer,
    StartChildren,
    TurnObserver,
    WaitBriefly,
    WithdrawWait,
    after_append,
    end_of_run,
    inbox_upto,
)
from actors.engine.decisions import claimed_signals
from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    ActivationBegun,
    AttemptFailed,
    ChildrenSpawned,
    EndedWait,
    EventSignal,
    HistoryEntry,
    MemoRecorded,
    NowRecorded,
    ParentLink,
    PatchMarked,
    SignalReceived,
    SleepFired,
    SleepScheduled,
    Terminal,
    TurnParked,
    WaitCondition,
    WaitRegistered,
    WaitResolved,
    args_hash,
    args_hash_matches,
    encode_history,
    sleep_to,
    utcnow,
)
from sdk import _cel
from sdk._codec import return_adapter, to_json_value
from sdk.conditions import Condition, ParentCondition, SleepCondition, UserEventCondition
from sdk.context import ChildSpec
from sdk.errors import NonDeterminismError
from sdk.models import SleepResult

RESIDENT_MAX = timedelta(milliseconds=600)
"""A sleep asked for with less than this left stays on its host with a local timer (no eviction)."""
SLEEP_LEAD_MAX = timedelta(seconds=5)
"""A sleep's timer fires up to this much early (half its length at most): see :func:`sleep_lead`."""
WOKEN_MAX = SLEEP_LEAD_MAX + timedelta(seconds=1)
"""A sleep whose timer was scheduled before (its turn woken early) waits out up to this much on its host."""


def sleep_lead(length: timedelta) -> timedelta:
    """How early a sleep of ``length`` has its timer fire: half its length, at most :data:`SLEEP_LEAD_MAX`.

    The host that takes the early fire reads and replays the run, then waits for the exact
    moment with its slot lent to other work (:class:`WaitBriefly`). Thousands of runs due
    in the same second are then all read and replayed ahead of it, and each wakes on time
    instead of queueing behind the others' replays. Waits keep a short lead
    (``actors.store.timers.FIRE_LEAD``): a wait waiting out its timeout on its host would not
    see an event that comes meanwhile until the timeout.
    """
    return min(SLEEP_LEAD_MAX, length / 2)


class HistoryEnded(BaseException):
    """A replay-only turn reached a checkpoint its history does not hold (see :class:`Turn`).

    A ``BaseException``, like a cancellation, so user code's ``except Exception`` does not stop it.
    """

    def __init__(self, pos: int, requested: str) -> None:
        super().__init__(f"the history ends before position {pos} ({requested})")
        self.pos = pos
        self.requested = requested


@dataclass(frozen=True)
class TimerRequest:
    """The run suspended on a sleep: schedule a wake-up at ``wake_at`` for position ``pos``."""

    pos: int
    wake_at: datetime
    lead: timedelta | None = None
    """How early the timer fires (``None``: the scheduler's default, a wait's)."""


class Turn:
    """Drives one activation of one run. Implements :class:`sdk.context.DurableRuntime`."""

    def __init__(
        self,
        *,
        history: RunHistory,
        effects: Effects,
        task: str,
        host_id: str,
        delivery: int,
        observer: TurnObserver | None = None,
        replay_only: bool = False,
    ) -> None:
        self.run_id = history.run_id
        self._replay_only = replay_only
        """Check the code against the history and nothing more (:func:`sdk.testing.replay`): a
        checkpoint past the recorded ones raises :class:`HistoryEnded` before anything runs."""
        self.task = task
        self._effects = effects
        self._observer = observer
        # Where each sleep and wait began (recorded or new), for the observer when they end.
        self._sleeps: dict[int, SleepScheduled] = {}
        self._waits: dict[int, WaitRegistered] = {}
        self._redelivered = delivery > 1
        self._history = history
        started = history.started if history.entries else None
        self.run_input: Any = started.input if started is not None else None
        generation = started.generation if started is not None else 0
        self._ids = self.run_id if not generation else f"{self.run_id}{CHILD_ID_SEPARATOR}g{generation}"
        """What this generation's wait and child ids derive from: a later generation's never meet an
        earlier one's (in the router's registrations and de-duplication, or as children that exist)."""
        self._by_pos: dict[int, dict[str, Any]] = {}
        # Signals taken from the inbox, in arrival order, and the direct ones waits have consumed.
        self._by_seq: dict[int, EventSignal] = {}
        self._direct: dict[int, EventSignal] = {}
        """Direct signals no wait has consumed yet, in arrival order."""
        self._router_hits: dict[str, list[tuple[int, EventSignal]]] = {}
        """Signals the router sent, by the wait they satisfy, in arrival order."""
        self._consumed: set[int] = set()
        self._outcomes: dict[str, dict[str, Any]] = {}
        """Children that ended: their outcome by run id (the first report wins)."""
        self.cancel_reason: str | None = None
        """Set when someone asked to cancel the run: its code is stopped where it would suspend."""
        self.began = any(isinstance(e, ActivationBegun) for e in history.entries)
        carried = history.started.carried
        self._claims_carried = bool(carried) and not self.began
        """The generation's first turn, with signals carried from the one before: it claims them
        (``signal`` entries in an append before any code runs), as a turn that took signals from the
        inbox does, so to other hosts a turn is under way."""
        self.spawned: dict[str, str] = {}
        """Every child this run spawned: run id -> task."""
        for c in carried:  # an earlier generation's direct signals no wait of it consumed: the first ones
            self._take(c.inbox_seq, c.signal)
        for e in history.entries:
            pos = e.__dict__.get("pos")  # not getattr: a model's missing attribute costs a raised error
            if pos is not None:
                self._by_pos.setdefault(pos, {})[e.k] = e
            if isinstance(e, SignalReceived):
                self._take(e.inbox_seq, e.signal)
            elif isinstance(e, ChildrenSpawned):
                self.spawned.update(dict.fromkeys(e.run_ids, e.task))
            elif isinstance(e, WaitResolved):
                self._consume(e.consumed)
        self._next = 0
        # The activation record rides on the turn's first flush; a turn that appends
        # nothing else (a stale or duplicate activation) writes nothing at all.
        self._pending: list[HistoryEntry] = [ActivationBegun(host=host_id, delivery=delivery, at=utcnow())]
        if self._claims_carried:
            self._pending += carried
        # New inbox signals become history entries with this turn's first flush: never taken twice.
        for seq, sig in history.inbox:
            self._pending.append(SignalReceived(inbox_seq=seq, signal=sig))
            self._take(seq, sig)
        self._took_upto = history.inbox[-1][0] if history.inbox else None
        self._pending_wait: WaitRegistered | None = None
        """The wait the run suspended on: its event conditions must be registered with the router."""
        self._written: list[HistoryEntry] = []
        """Every entry this turn appended, in order."""
        self._unrecorded_waits: list[WaitRegistered] = []
        """Waits the code passed that were resolved with no ``wait_registered`` in the history.

        A turn that parked at such a wait registered it with the router and died (or lost the
        append race) before recording it; the turn that then resolved it at once never knew.
        A wait resolved at once is recorded as registered too now, and tidied as any resolved
        wait; histories written before that hold such waits, and their run's end withdraws
        them (a host dying between that end and the withdrawals leaves them).
        """
        self._flush_lock = asyncio.Lock()
        self.code: asyncio.Task[Any] | None = None
        """The task running the code, while the host waits for it (the host sets it): a step's
        result is written on its own only while the code goes on (:meth:`_record_once_code_waits`)."""
        self._recording: asyncio.Task[None] | None = None
        """A write of step results started because the code went on to wait on something else."""
        self._timers: list[TimerRequest] = []
        self.suspended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.fatal: BaseException | None = None
        self._parked: asyncio.Future[None] | None = None
        """Set while the code is parked: resolved when the host lets a warm run go on."""
        self._strayed = False

    def request_cancel(self, reason: str) -> None:
        """Someone asked to stop this run now (the host's cancel broadcast): its code stops where it parks."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    # -- bookkeeping ---------------------------------------------------------------------------

    def _take(self, seq: int, sig: EventSignal) -> None:
        if sig.source == "child":
            self._outcomes.setdefault(sig.name, sig.payload)
        elif sig.source == "cancel":
            if self.cancel_reason is None:
                self.cancel_reason = sig.cancel_reason
        else:
            self._by_seq[seq] = sig
            if sig.source == "event":
                if sig.wait_id is not None:
                    self._router_hits.setdefault(sig.wait_id, []).append((seq, sig))
            elif seq not in self._consumed:
                self._direct[seq] = sig

    def _consume(self, seqs: list[int]) -> None:
        self._consumed.update(seqs)
        for seq in seqs:
            self._direct.pop(seq, None)

    async def _park(self, timer: TimerRequest | None) -> None:
        """Suspend here until the host lets the code go on (:meth:`go_on`); a run being cancelled stops here.

        The host either evicts the run (cancels the code: the next turn replays it) or keeps
        it warm and, at its next turn, lets it go on from here; callers check again what they
        wait for when this returns.
        """
        if self.cancel_reason is not None:
            raise asyncio.CancelledError(f"run {self.run_id} was cancelled: {self.cancel_reason}")
        self._suspend(timer)
        self._parked = asyncio.get_running_loop().create_future()
        await self._parked

    async def _not_parked(self) -> None:
        """A checkpoint called while the code is parked (another branch of it went on): it waits for good.

        Such a run is not kept warm (:attr:`resumable`): its next turn replays it from the history.
        """
        if self._parked is not None:
            self._strayed = True
            await asyncio.get_running_loop().create_future()

    async def _durably(self, write: Awaitable[Any]) -> Any:
        """Carry out a write the code depends on; if it fails, the code never learns of it.

        A failed write (a publish timeout in a leader election, a 503, a lost race) is not the
        user's error: the code is parked for good and the host retries or replays the turn
        (``fatal`` says why). Only a non-determinism error is the code's to see.
        """
        try:
            return await write
        except asyncio.CancelledError:
            raise
        except NonDeterminismError:
            raise
        except BaseException as e:
            if self.fatal is None:
                self.fatal = e
            self._suspend(None)
            await asyncio.get_running_loop().create_future()  # never resolves: the host evicts the run
            raise AssertionError("unreachable") from e

    async def _wait_briefly(self, until: datetime) -> None:
        """Wait on this host until ``until`` (the host lends the turn's slot meanwhile); a run being cancelled stops.

        As :meth:`_park` does: a cancel taken by this turn ends the run here, and one broadcast
        while it waits cancels the code. A sleep whose last seconds were waited out here ended
        with ``sleep_fired`` and the run completed, the cancel recorded and ignored.
        """
        if self.cancel_reason is not None:
            raise asyncio.CancelledError(f"run {self.run_id} was cancelled: {self.cancel_reason}")
        if self._replay_only:  # replaying offline: nothing is carried out
            await sleep_to(until)
            return
        await self._effects(WaitBriefly(until, self._history.size_bytes))

    def _position(self) -> int:
        pos = self.next_position
        self._next = pos + 1
        return pos

    def _new(self, pos: int, requested: str) -> None:
        """The code asks for ``requested`` at a position the history does not hold yet."""
        if self._replay_only:
            raise HistoryEnded(pos, requested)

    @property
    def recorded_positions(self) -> int:
        """How many checkpoint positions the history holds."""
        return max(self._by_pos, default=-1) + 1

    @property
    def next_position(self) -> int:
        """The position the code's next checkpoint takes.

        A patch marker the code no longer asks about (the ``patched()`` call was removed once
        every run had passed it) is stepped over: the changed path is the only one left.
        """
        pos = self._next
        while (rec := self._by_pos.get(pos)) is not None and rec.keys() == {"patched"}:
            pos += 1
        return pos

    def describe_position(self, pos: int) -> str:
        """What the history recorded at ``pos``."""
        rec = self._by_pos.get(pos)
        return self._describe(rec) if rec is not None else "nothing"

    def _mismatch(self, pos: int, recorded: str, requested: str) -> NoReturn:
        err = NonDeterminismError(self.run_id, pos, recorded, requested)
        if self.fatal is None:
            self.fatal = err
        raise err

    @staticmethod
    def _describe(rec: dict[str, Any]) -> str:
        if "memo" in rec:
            m = rec["memo"]
            return f"memo({m.name!r}, args hash {m.args_hash})"
        if "sleep_scheduled" in rec:
            return f"sleep({rec['sleep_scheduled'].duration_s:g}s)"
        if "now" in rec:
            return "now()"
        if "patched" in rec:
            return f"patched({rec['patched'].change_id!r})"
        if "children_spawned" in rec:
            c = rec["children_spawned"]
            return f"run children({c.task!r} x{len(c.run_ids)}, args hash {c.args_hash})"
        w = rec.get("wait_registered") or rec.get("wait_resolved")
        if w is not None:
            return f"wait_for({w.label!r}, args hash {w.args_hash})"
        return ", ".join(sorted(rec))

    async def flush(self, extra: list[HistoryEntry] | None = None, *, through_steps: bool = False) -> None:
        """Append pending entries (plus ``extra``) as one message, durable before the code goes on.

        With ``through_steps``, only those up to the last step's result: what follows (a wait
        being waited out here) waits for its own checkpoint.
        """
        async with self._flush_lock:
            pending = self._pending
            cut = len(pending)
            if through_steps:  # just after the last step's result (0: none pending)
                cut = next((i for i in range(len(pending), 0, -1) if isinstance(pending[i - 1], MemoRecorded)), 0)
            entries = pending[:cut] + (extra or [])
            if not entries:
                return
            self._pending = pending[cut:]
            try:
                await self._effects(Append(entries, on_durable=self._recorded))
            except asyncio.CancelledError:
                # The code was stopped (a cancel broadcast, an eviction), not the write failed: a
                # cancelled run ends cancelled. The write may be stored or not; the turn's next one
                # finds out (its guard is the last sequence this turn knows).
                raise
            except BaseException as e:
                if self.fatal is None:
                    self.fatal = e
                raise

    def _steps_unrecorded(self) -> bool:
        return any(isinstance(e, MemoRecorded) for e in self._pending)

    async def _before_step(self) -> None:
        """Before a step runs: every earlier step's result is durable (a write under way included), and
        this turn has written once, so its view of the run is the run's own. A new run's first
        turn read nothing (``start_unrecorded``: its first write records the start), so no
        replica could have been behind.

        A view read from a replica that is behind (a cluster's follower catching up after a node
        restart) can miss the latest appends, and code replayed on it would run a step another
        host had run and recorded (the likely cause of steps run twice in the long cluster chaos
        run, seed 52). Its write, guarded by the last sequence it saw, fails instead, before any
        step runs.
        """
        if (self._steps_unrecorded() or (self._recording is not None and not self._recording.done())
                or not (self._written or self._history.start_unrecorded)):
            await self._durably(self.flush())
        if self.fatal is not None:  # a write under way failed: the code never learns of it
            await asyncio.get_running_loop().create_future()

    def _record_once_code_waits(self) -> None:
        """A step's result goes with the run's next write: its next checkpoint, or its end (one
        append for a run that ends right after a step). Should the code first wait on anything
        else (a call, a lock, ``asyncio.sleep``), it is written as soon as the code gives way."""
        asyncio.get_running_loop().call_soon(self._on_code_waiting)

    def _code_going(self) -> bool:
        """Running under a host that waits for it, neither ended nor parked (the turn's conclusion
        then carries what is pending)."""
        return self.code is not None and not self.code.done() and not self.suspended.done()

    def _on_code_waiting(self) -> None:
        if self._code_going() and self._steps_unrecorded() and (self._recording is None or self._recording.done()):
            self._recording = asyncio.ensure_future(self._record_steps())

    async def _record_steps(self) -> None:
        # Again while the code finished more steps during the write and still waits.
        while self._code_going() and self._steps_unrecorded():
            try:
                await self.flush(through_steps=True)
            except asyncio.CancelledError:
                raise
            except BaseException:
                self._suspend(None)  # flush() set ``fatal``: the host drops or retries the turn
                return

    async def steps_recorded(self) -> None:
        """For the host, once the code stopped: a write of step results under way is over (never raises)."""
        if self._recording is not None:
            await asyncio.wait([self._recording])
            self._recording = None  # its context holds this turn: no cycle is left for the collector

    def _recorded(self, entries: list[HistoryEntry]) -> None:
        """``entries`` are durable: they count as written, and the observer hears of what they ended."""
        self._written += entries
        if self._observer is not None:
            self._report_ended(entries)

    async def claim_signals(self) -> None:
        """Record the signals this turn took before any code runs.

        Two activations can run a turn of one run on two hosts at once (two signals; or a
        run's first turn, whose start and a signal's activation were both redelivered after
        their hosts died): the turn that records the signals first runs the code, the other
        loses this append before running anything (its activation comes back and finds the
        signals taken), so no step runs twice (invariant 1). A first turn that took signals
        claims them too: the long chaos run found its step run twice when it did not. So does a
        generation's first turn that begins with signals carried from the one before.
        """
        if self._took_upto is not None or self._claims_carried:
            await self.flush()

    def continue_as_new(self, run_input: Any) -> list[Command]:
        """The code called ``ctx.continue_as_new``: what the host carries out (pure).

        The next generation's start is appended after this turn's entries under the same
        guard (the switch: a reader skips what came before it); then this generation is
        tidied as at a run's end, its messages are purged and its first turn is asked for.
        """
        started = self._history.started
        data = to_json_value(run_input, f"the input of continue_as_new in run {self.run_id}")
        took = max(self._history.state.taken_upto, self._took_upto or 0)
        # Direct signals this generation took and did not consume go on to the next one: they are
        # purged from the inbox with the rest, and marked taken (``inbox_taken``).
        carried = [SignalReceived(inbox_seq=seq, signal=sig) for seq, sig in self._direct.items()]
        nxt = started.model_copy(update={"input": data, "at": utcnow(), "generation": started.generation + 1,
                                         "inbox_taken": took, "carried": carried, "withdrawn": []})
        written = [*self._written, *self._pending]
        # Tidied as at a run's end (the next start ends this history): every registration this
        # generation made, and those a turn made for a wait that was then resolved at once.
        tidying = after_append(self._history.state, [*written, nxt], utcnow(), self._unrecorded_waits)
        # The next start names those of the waits this turn resolved, for a retry to redo: the
        # others were each withdrawn by the turn that resolved them, and naming every wait of a
        # long generation would make the switch, one message, as large as the generation.
        now = {e.wait_id for e in written if isinstance(e, WaitResolved)}
        withdrawn = [EndedWait(wait=c.wait, satisfied=sorted(c.satisfied, key=lambda i: -1 if i is None else i))
                     for c in tidying if isinstance(c, WithdrawWait) and c.wait.wait_id in now]
        nxt = nxt.model_copy(update={"withdrawn": withdrawn})
        pending, self._pending = [*self._pending, nxt], []
        commands: list[Command] = [Append(pending, on_durable=self._recorded), *tidying]
        if self._took_upto is not None:
            commands.append(PurgeInbox(self._took_upto))
        commands.append(NextGeneration(nxt))
        return commands

    @property
    def resumable(self) -> bool:
        """Whether the parked code can go on from where it is at this run's next turn (a warm run)."""
        return self._parked is not None and not self._parked.done() and not self._strayed and self.fatal is None

    def history_after(self, last_seq: int) -> RunHistory:
        """The run's history once this turn's appends are durable (moves this turn's state forward)."""
        before = self._history
        entries = before.entries
        entries.extend(self._written)
        state = before.state
        state.fold(self._written)
        grown = len(encode_history(self._written)) if self._written else 0
        return RunHistory(self.run_id, entries, last_seq, size_bytes=before.size_bytes + grown, folded=state)

    def resume(self, history: RunHistory, effects: Effects, host_id: str, delivery: int,
               observer: TurnObserver | None = None) -> None:
        """Take up a warm run for its next turn: ``history`` is :meth:`history_after`'s, with the new inbox.

        The code does not go on yet: the turn first claims the new signals (:meth:`claim_signals`),
        then :meth:`go_on`.
        """
        assert self.resumable, "only a parked, resumable turn is taken up again"
        self._history = history
        self._effects = effects
        self._observer = observer
        self._redelivered = delivery > 1
        self._written = []
        # This host made the previous turn and carried out all of it: the run's end need not
        # withdraw again the registrations that turn withdrew.
        self._pending = [ActivationBegun(host=host_id, delivery=delivery, at=utcnow(), tidied=True)]
        for seq, sig in history.inbox:
            self._pending.append(SignalReceived(inbox_seq=seq, signal=sig))
            self._take(seq, sig)
        self._took_upto = history.inbox[-1][0] if history.inbox else None
        self._pending_wait = None
        self._timers = []
        self.began = True
        self.suspended = asyncio.get_running_loop().create_future()

    def go_on(self) -> None:
        """Let the warm run's code go on from where it parked."""
        parked, self._parked = self._parked, None
        assert parked is not None
        parked.set_result(None)

    def conclude(self, end: Terminal | AttemptFailed | None = None, *,
                 cancels_children_on_failure: bool = False) -> list[Command]:
        """What the host carries out, in order, now that the code stopped (pure: nothing is written here).

        ``end`` is ``None`` when the code parked (at a wait, a sleep, or children): register
        the wait, append what is pending, schedule its timers. Otherwise the run ended, or an
        attempt failed and is retried. Then, either way, withdraw what the append ended and
        purge the signals it took; and wind up a run that ended.
        """
        commands: list[Command] = []
        pending, self._pending = self._pending, []
        if end is None:
            if self._pending_wait is not None:
                # Before the wait is in the history, so that a run seen waiting (history,
                # `bide runs show`) already counts every event pushed from then on. A crash or
                # a lost race in between is harmless: the wait id is the run and position, the
                # replay registers the same wait again, and a signal that came early waits in
                # the run's inbox.
                commands.append(RegisterWait(self._pending_wait, self.run_input))
            if not any(not isinstance(e, ActivationBegun) for e in pending):
                # Nothing new. A claim of signals standing alone would read as a turn under way.
                # (A turn's first append begins with its activation entry: the last turn is what it wrote.)
                claimed = claimed_signals(self._written or self._history.entries)
                pending = [*pending, TurnParked(at=utcnow())] if claimed else []
        else:
            pending = [*pending, end]
        written = self._written + pending
        if pending:
            commands.append(Append(pending, on_durable=self._recorded))
        commands += [ScheduleTimer(t.pos, t.wake_at, t.lead) for t in self._timers]
        commands += after_append(self._history.state, written, utcnow(), self._unrecorded_waits)
        ended = end is not None and not isinstance(end, AttemptFailed)
        if self._took_upto is not None and not ended:  # an end drains the whole inbox (ClearInbox)
            commands.append(PurgeInbox(self._took_upto))
        if isinstance(end, AttemptFailed):
            commands.append(ScheduleRetry(end))
        elif end is not None:
            commands += end_of_run(self._history.started, RunEnd(
                end, self.unfinished_children, cancels_children_on_failure=cancels_children_on_failure,
                inbox_upto=inbox_upto(self._history)))
        return commands

    def _report_ended(self, written: list[HistoryEntry]) -> None:
        """Spans for the sleeps and waits this append ended (only written entries: replay is silent)."""
        assert self._observer is not None
        for e in written:
            if isinstance(e, SleepFired) and e.pos in self._sleeps:
                sched = self._sleeps[e.pos]
                self._observer.sleep(e.pos, sched.duration_s,
                                  sched.wake_at - timedelta(seconds=sched.duration_s), e.at)
            elif isinstance(e, WaitResolved) and e.pos in self._waits:
                won = {eid for v in e.result.values() if isinstance(v, dict) for eid in v}
                mine = [*self._router_hits.get(e.wait_id, ()),
                        *((seq, self._by_seq[seq]) for seq in e.consumed if seq in self._by_seq)]
                signals = [sig for _, sig in sorted(mine, key=lambda hit: hit[0]) if sig.event_id in won]
                self._observer.wait(self._waits[e.pos], e, signals)

    def _suspend(self, timer: TimerRequest | None) -> None:
        if timer is not None:
            self._timers.append(timer)
        if not self.suspended.done():
            self.suspended.set_result(None)

    # -- DurableRuntime ------------------------------------------------------------------------

    async def memo(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        await self._not_parked()
        pos = self._position()
        name = getattr(fn, "__qualname__", None) or repr(fn)
        digest = args_hash(*args)
        rec = self._by_pos.get(pos)
        if rec is not None:
            m = rec.get("memo")
            if m is None or m.name != name or not args_hash_matches(m.args_hash, digest, *args):
                self._mismatch(pos, self._describe(rec), f"memo({name!r}, args hash {digest})")
            adapter = return_adapter(fn)
            return adapter.validate_python(m.result) if adapter is not None else m.result
        self._new(pos, f"memo({name!r}, args hash {digest})")
        await self._before_step()
        began = time.perf_counter()
        with self._observer.memo(name, pos) if self._observer is not None else nullcontext():
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
        ms = round((time.perf_counter() - began) * 1000, 3)
        data = to_json_value(result, f"the result of memo {name!r} in run {self.run_id}")
        # Nothing completed runs twice: the result is durable before the next step runs, before
        # any other checkpoint and before the code waits on anything else (it goes with that write).
        self._pending.append(MemoRecorded(pos=pos, name=name, args_hash=digest, result=data, ms=ms))
        self._record_once_code_waits()
        return result

    async def now(self) -> datetime:
        await self._not_parked()
        pos = self._position()
        rec = self._by_pos.get(pos)
        if rec is not None:
            n = rec.get("now")
            if n is None:
                self._mismatch(pos, self._describe(rec), "now()")
            at: datetime = n.at
            return at
        self._new(pos, "now()")
        at = utcnow()
        # Written with the next checkpoint: anything that used this value durably flushes it first.
        self._pending.append(NowRecorded(pos=pos, at=at))
        return at

    def patched(self, change_id: str) -> bool:
        if self._parked is not None:
            self._strayed = True  # asked while parked: this run is replayed next turn, not kept warm
        pos = self._next
        rec = self._by_pos.get(pos)
        if rec is not None:
            marked = rec.get("patched")
            if marked is None:
                # The run passed this point under the code before the change: the old path, and
                # the position stays for the checkpoint the old code made here.
                return False
            if marked.change_id != change_id:
                self._mismatch(pos, self._describe(rec), f"patched({change_id!r})")
            self._next += 1
            return True
        self._new(pos, f"patched({change_id!r})")
        self._next += 1
        # Written with the next checkpoint, as now() is: the path taken is what depends on it.
        self._pending.append(PatchMarked(pos=pos, change_id=change_id))
        return True

    async def sleep_until(self, wake_at: datetime | None, duration: timedelta | None) -> SleepResult:
        await self._not_parked()
        pos = self._position()
        requested = f"sleep({duration.total_seconds():g}s)" if duration is not None else "sleep_until()"
        rec = self._by_pos.get(pos)
        if rec is not None:
            sched = rec.get("sleep_scheduled")
            if sched is None or (duration is not None and abs(sched.duration_s - duration.total_seconds()) > 1e-6):
                self._mismatch(pos, self._describe(rec), requested)
            wake: datetime = sched.wake_at
            length = timedelta(seconds=sched.duration_s)
            self._sleeps[pos] = sched
            if "sleep_fired" in rec:
                return SleepResult(length)
        else:
            self._new(pos, requested)
            now = utcnow()
            if wake_at is not None:
                wake, length = wake_at, max(wake_at - now, timedelta(0))
            else:
                assert duration is not None
                wake, length = now + duration, duration
            # Sleeps keep their deadline: the wake time is recorded once, before any timer exists.
            sched = SleepScheduled(pos=pos, duration_s=length.total_seconds(), wake_at=wake)
            self._sleeps[pos] = sched
            await self._durably(self.flush([sched]))
        # A sleep asked for now parks unless it is short; one whose timer was scheduled before
        # (the timer fired early, or the run is replayed near its end) waits out the rest here.
        limit = RESIDENT_MAX if rec is None else WOKEN_MAX
        while (remaining := wake - utcnow()) > limit:
            await self._park(TimerRequest(pos, wake, sleep_lead(length)))
            limit = WOKEN_MAX
        if remaining > timedelta(0):
            await self._wait_briefly(wake)
        self._pending.append(SleepFired(pos=pos, at=utcnow()))
        return SleepResult(length)

    async def wait(self, label: str, groups: list[list[Condition]],
                   any_of: list[tuple[str, Condition]] | None = None) -> dict[str, Any]:
        await self._not_parked()
        pos = self._position()
        specs = [[self._condition(c) for c in g] for g in groups]
        extra = [self._condition(c).model_copy(update={"key": key}) for key, c in (any_of or [])]
        # The label is not hashed: Hatchet's examples use a fresh uuid4().hex as the label.
        dumped: list[Any] = [[c.model_dump(mode="json") for c in g] for g in specs]
        if extra:
            dumped.append({"any_of": [c.model_dump(mode="json") for c in extra]})
        digest = args_hash(dumped)
        requested = f"wait_for({label!r}, args hash {digest})"
        rec = self._by_pos.get(pos)
        wait_id = f"{self._ids}:{pos}"
        if rec is not None:
            done = rec.get("wait_resolved")
            reg = rec.get("wait_registered")
            recorded = done or reg
            if recorded is None or recorded.args_hash != digest:
                self._mismatch(pos, self._describe(rec), requested)
            if done is not None:
                if reg is None:  # resolved at once by a host from before waits so resolved were recorded
                    self._unrecorded_waits.append(WaitRegistered(
                        pos=pos, wait_id=wait_id, label=label, args_hash=digest, groups=specs, at=done.at,
                        any_of=extra))
                result: dict[str, Any] = done.result
                return result
            assert reg is not None
        else:
            self._new(pos, requested)
            now = utcnow()
            # Sleeps keep their deadline: every sleep condition's wake time is fixed now, once.
            def fix(c: WaitCondition) -> WaitCondition:
                if c.kind != "sleep":
                    return c
                return c.model_copy(update={"wake_at": now + timedelta(seconds=c.duration_s or 0)})

            reg = WaitRegistered(pos=pos, wait_id=wait_id, label=label, args_hash=digest,
                                 groups=[[fix(c) for c in g] for g in specs], at=now, any_of=[fix(c) for c in extra])
        self._waits[pos] = reg
        while True:
            now = utcnow()  # one moment for both questions: is it over, and when to look again
            outcome = self._try_resolve(reg, now)
            if outcome is not None:
                result, consumed = outcome
                self._consume(consumed)
                if rec is None:
                    # Recorded though it never waited: a turn that parked here and died before
                    # its append (or lost it) may have registered it, and every turn that
                    # tidies after this append (a redelivery after a crash too) withdraws it.
                    self._pending.append(reg)
                self._pending.append(WaitResolved(
                    pos=pos, wait_id=reg.wait_id, label=label, args_hash=digest, result=result,
                    consumed=consumed, at=utcnow(),
                ))
                return result
            if rec is None:
                self._pending.append(reg)
                rec = {"wait_registered": reg}
            wake = self._next_wake(reg, now)
            remaining = None if wake is None else wake - utcnow()
            if remaining is not None and remaining <= RESIDENT_MAX:
                assert wake is not None
                await self._wait_briefly(wake)
                continue
            self._pending_wait = reg
            if self._steps_unrecorded():
                # The steps before it are recorded before the wait is registered with the router:
                # a registration refused in an outage (its stream leaderless) retries the turn,
                # which would run them again.
                await self._durably(self.flush(through_steps=True))
            await self._park(TimerRequest(pos, wake) if wake is not None else None)

    def _condition(self, c: Condition) -> WaitCondition:
        if isinstance(c, SleepCondition):
            return WaitCondition(kind="sleep", key=c.readable_data_key, duration_s=c.duration.total_seconds())
        if isinstance(c, UserEventCondition):
            expression = c.expression
            if c.match is not None:
                expression = _match_expression(c.match, self.run_input, expression)
            return WaitCondition(
                kind="event",
                key=c.readable_data_key,
                event_key=c.event_key,
                expression=expression,
                scope=c.scope,
                lookback_s=None if c.lookback_window is None else c.lookback_window.total_seconds(),
            )
        if isinstance(c, ParentCondition):
            raise TypeError("ParentCondition applies to DAG tasks (wait_for=/skip_if=), not to ctx.aio_wait_for")
        raise TypeError(f"not a wait condition: {c!r}")

    def _try_resolve(self, reg: WaitRegistered, now: datetime) -> tuple[dict[str, Any], list[int]] | None:
        """The wait's result if every group has a satisfied condition at ``now`` (the earliest wins in a group)."""
        result: dict[str, Any] = {}
        consumed: list[int] = []
        taken: set[int] = set()
        flat = sum(len(g) for g in reg.groups)
        first: tuple[datetime, str, Any, int | None] | None = None
        for i, cond in enumerate(reg.any_of):
            # Any one of these ends the wait by itself (a DAG task's skip_if / cancel_if).
            hit = self._satisfied(reg.wait_id, flat + i, cond, now, taken)
            if hit is not None and (first is None or hit[0] < first[0]):
                first = (hit[0], cond.key, hit[1], hit[2])
        if first is not None:
            return {first[1]: first[2]}, [first[3]] if first[3] is not None else []
        flat = 0
        for group in reg.groups:
            best: tuple[datetime, str, Any, int | None] | None = None
            for cond in group:
                idx, flat = flat, flat + 1
                hit = self._satisfied(reg.wait_id, idx, cond, now, taken)
                if hit is not None and (best is None or hit[0] < best[0]):
                    best = (hit[0], cond.key, hit[1], hit[2])
            if best is None:
                return None
            result[best[1]] = best[2]
            if best[3] is not None:
                consumed.append(best[3])
                taken.add(best[3])
        return result, consumed

    def _satisfied(
        self, wait_id: str, idx: int, cond: WaitCondition, now: datetime, taken: set[int]
    ) -> tuple[datetime, Any, int | None] | None:
        if cond.kind == "sleep":
            assert cond.wake_at is not None
            if cond.wake_at <= now:
                return cond.wake_at, {"duration_seconds": cond.duration_s}, None
            return None
        # The earliest signal for this condition: the router's for it, or a direct one (FIFO).
        routed = next(((seq, sig) for seq, sig in self._router_hits.get(wait_id, ()) if sig.cond == idx), None)
        for seq, sig in self._direct.items():
            if routed is not None and seq > routed[0]:
                break
            if (seq not in taken and sig.name == cond.event_key
                    and _cel.evaluate(cond.expression, sig.payload, self.run_input)):
                return sig.at, {sig.event_id: sig.payload}, seq
        if routed is not None:
            sig = routed[1]
            return sig.at, {sig.event_id: sig.payload}, None
        return None

    @staticmethod
    def _next_wake(reg: WaitRegistered, now: datetime) -> datetime | None:
        """When the wait (unresolved at ``now``) must be looked at again: its next sleep condition to end.

        Only sleeps still ahead: one over at ``now`` satisfied its group, and the wait waits for
        another group's event. Counting it too, a wait for a sleep *and* an event whose sleep was
        over found that past moment, waited for it (not at all) and looked again, for ever: its
        host's event loop never ran anything else
        (``test_wait_sleep_and_event.py``).
        """
        wakes = [c.wake_at for c in reg.flat() if c.kind == "sleep" and c.wake_at is not None and c.wake_at > now]
        return min(wakes) if wakes else None

    # -- children ------------------------------------------------------------------------------

    async def spawn(self, children: list[ChildSpec], wait: bool) -> list[Any]:
        """Start ``children`` (one checkpoint); with ``wait``, return their outcomes once all have ended."""
        await self._not_parked()
        pos = self._position()
        task = children[0].task if len({c.task for c in children}) == 1 else "*"
        digest = args_hash([[c.task, c.input, c.key] for c in children])
        requested = f"run children({task!r} x{len(children)}, args hash {digest})"
        rec = self._by_pos.get(pos)
        if rec is not None:
            spawned = rec.get("children_spawned")
            if spawned is None or spawned.args_hash != digest:
                self._mismatch(pos, self._describe(rec), requested)
            ids: list[str] = list(spawned.run_ids)  # as recorded (ids derived by an older Bide stay valid)
            if self._redelivered and any(i not in self._outcomes for i in ids):
                # This activation came back: the turn that recorded the spawn may have died
                # before starting every child. Starting is idempotent.
                await self._durably(self._start(pos, ids, children, detached=not wait))
        else:
            self._new(pos, requested)
            ids = child_run_ids(self._ids, pos, [c.key for c in children], self.spawned)
            # Written before any child exists: a replay never spawns a child twice.
            await self._durably(self.flush([ChildrenSpawned(pos=pos, task=task, run_ids=ids, args_hash=digest,
                                                            at=utcnow())]))
            self.spawned.update({rid: c.task for rid, c in zip(ids, children, strict=True)})
            # A start that fails parks the code: the host retries the turn as a redelivery, which
            # starts every unreported child again, so the parent never waits for a child that
            # was recorded but never started.
            await self._durably(self._start(pos, ids, children, detached=not wait))
        if not wait:
            return ids
        return await self.outcomes(ids)

    async def _start(self, pos: int, ids: list[str], children: list[ChildSpec], detached: bool) -> None:
        link = ParentLink(run_id=self.run_id, task=self.task, pos=pos, n=len(ids))
        inherited = self._history.started.additional_metadata
        todo = [ChildStart(run_id=rid, task=c.task, durable=c.durable, input=c.input,
                           execution_timeout_s=c.execution_timeout_s, detached=detached,
                           additional_metadata={**inherited, **c.additional_metadata})
                for rid, c in zip(ids, children, strict=True) if rid not in self._outcomes]
        if todo:
            await self._effects(StartChildren(link, todo))

    @property
    def unfinished_children(self) -> list[tuple[str, str]]:
        """``(run id, task)`` of children spawned and not heard back from."""
        return [(rid, task) for rid, task in self.spawned.items() if rid not in self._outcomes]

    async def outcomes(self, ids: list[str]) -> list[Any]:
        """The outcomes of these children, suspending the run until every one has ended."""
        while any(i not in self._outcomes for i in ids):
            await self._park(None)
        return [{**self._outcomes[i], "run_id": i} for i in ids]


def _match_expression(path: str, run_input: Any, expression: str | None) -> str:
    """``match="data.userId"``: the field must be equal in the payload and the run's input.

    The run's value is written into the expression as a literal, so the router can index
    it. Bide's events carry their payload directly (no ``data`` envelope), so a leading
    ``data.`` is dropped when the run's input has no ``data`` field.
    """
    parts = path.split(".")
    if parts[0] == "data" and len(parts) > 1 and not (isinstance(run_input, dict) and "data" in run_input):
        parts = parts[1:]
    try:
        value = _cel.lookup(run_input, tuple(parts))
    except KeyError:
        raise ValueError(f"match={path!r}: the run's input has no field {'.'.join(parts)!r}") from None
    literal = _cel.cel_literal(value)
    field = "input." + ".".join(parts)
    clause = f"{field} == {literal}" if literal is not None else f"{field} == event.{'.'.join(parts)}"
    return clause if expression is None else f"({expression}) && {clause}"
