"""Carrying out a turn's commands: the one home of every write a turn makes.

The engine decides what a turn writes (``actors.engine.commands``); a :class:`RunWriter`
carries it out for one run, in order, and an error stops the list where it happened (the
activation is retried, and every command is idempotent). Each command has one way of being
carried out, used by every kind of turn: a durable run's, a regular task's, a workflow's,
a poison activation's, and the redo of a dead host's last turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from actors.engine.commands import (
    Append,
    CancelChildren,
    CancelTimer,
    ClearInbox,
    Command,
    NextGeneration,
    NotifyParent,
    PurgeInbox,
    RecordEnd,
    RegisterWait,
    ScheduleRemoval,
    ScheduleRetry,
    ScheduleTimer,
    StartChildren,
    WaitBriefly,
    WithdrawWait,
)
from actors.engine.wire import HDR_BIDE_KIND, Activation, encode_activation, sleep_to, utcnow
from actors.hosting.router_inputs import publish_registrations
from actors.observe.tracing import Tracing, observe_appended
from actors.store.children import notify_parent, request_cancel, start_children
from actors.store.jetstream import Layout, api_request, direct_get_last, retry_transient
from actors.store.protocol import publish_start_activation
from actors.store.requests import Publisher
from actors.store.runs_index import ensure_live, publish_end

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from actors.engine.run_history import RunHistory
    from actors.hosting.activation_queue import SlotPool
    from actors.hosting.retention import Reaper
    from actors.store.history import HistoryLog
    from actors.store.timers import TimerScheduler

log = logging.getLogger("bide.host")

_CHORE_RETRY_S = 60.0
"""How long a background tidy-up retries infrastructure errors (a leader election takes seconds)."""

_CONCURRENT = (StartChildren, WithdrawWait)
"""Commands independent of their neighbours of the same kind: a run of them is pipelined."""


class TurnEffects:
    """What a host's turns write with: its connection, publisher, history log, timers and reaper."""

    def __init__(self, nc: NATS, publisher: Publisher, layout: Layout, history: HistoryLog,
                 timers: TimerScheduler, reaper: Reaper, tracing: Tracing, durable_slots: SlotPool) -> None:
        self.nc = nc
        self.durable_slots = durable_slots
        """The slots durable turns run in: a turn that waits briefly lends its slot back."""
        self.publisher = publisher
        self.layout = layout
        self.history = history
        self.timers = timers
        self.reaper = reaper
        self.tracing = tracing
        self._chores: dict[str, set[asyncio.Task[None]]] = {}
        """The chores under way, by run."""

    def writer(self, hist: RunHistory, task: str) -> RunWriter:
        """Carries out one turn's commands for the run of ``hist``, appending after its last message."""
        return RunWriter(self, hist, task)

    def chore(self, run_id: str, what: str, op: Callable[[], Awaitable[Any]]) -> None:
        """An idempotent tidy-up of ``run_id`` (a purge, a timer withdrawal) in the background.

        The code does not wait for it, but the turn's activation is acked only once it is done
        (:meth:`tidied`): a host killed after that ack and before the tidy-up left it undone for
        good, since no redelivery came to redo it (a resolved wait's timer, in the cluster chaos
        run). Infrastructure errors are retried for up to ``_CHORE_RETRY_S`` (a node that dies
        under it left a cancelled run's timer behind for its hour); a chore that still fails is
        logged and left: a timer fires into the ended run and is dropped, an inbox goes with the
        run's removal.
        """

        async def _guarded() -> None:
            try:
                await retry_transient(what, op, deadline_s=_CHORE_RETRY_S)
            except Exception as e:
                log.warning("%s failed for good: %s: %s", what, type(e).__name__, e)

        t = asyncio.create_task(_guarded())
        of_run = self._chores.setdefault(run_id, set())
        of_run.add(t)

        def done(task: asyncio.Task[None]) -> None:
            of_run.discard(task)
            if not of_run and self._chores.get(run_id) is of_run:
                del self._chores[run_id]

        t.add_done_callback(done)

    async def tidied(self, run_id: str) -> None:
        """Once the chores of ``run_id`` under way are done (each ends by itself: see :meth:`chore`)."""
        of_run = self._chores.get(run_id)
        if of_run:
            await asyncio.wait(of_run)  # (it waits on a copy: chores may end or start meanwhile)

    async def stop(self, timeout: float) -> None:
        """Let the chores under way finish, for at most ``timeout``."""
        pending = {t for of_run in self._chores.values() for t in of_run}
        if pending:
            await asyncio.wait(pending, timeout=timeout)


_OVERTAKEN_AFTER_S = 0.01
"""A timer stored later than this after the append that parked the code is checked
(:meth:`RunWriter._unless_overtaken`)."""


class RunWriter:
    """Carries out the commands of one turn of one run (the engine's :class:`actors.engine.commands.Effects`)."""

    def __init__(self, effects: TurnEffects, hist: RunHistory, task: str) -> None:
        self._fx = effects
        self.run_id = hist.run_id
        self.task = task
        self.last_seq = hist.last_seq
        """The history's last sequence as this turn knows it: the guard of its next append."""
        self._notify: str | None = hist.started.meta.get("notify") if hist.entries else None
        self._started = hist.started if hist.entries else None
        self._unrecorded = hist if hist.start_unrecorded else None
        """A first turn's history whose start is not in the stream yet: the first append writes it."""
        self._appended_at = 0.0
        """When this writer's last append was acknowledged (``time.monotonic``)."""

    async def __call__(self, command: Command) -> None:
        fx, run_id = self._fx, self.run_id
        s = fx.layout.subjects
        match command:
            case Append(entries=entries, on_durable=on_durable):
                unrecorded = self._unrecorded
                if unrecorded is None:
                    self.last_seq = await fx.history.append(run_id, entries, self.last_seq, self._notify)
                else:
                    # The start in the same message as the turn's first entries, under the guard of an
                    # empty history: one acknowledged write fewer per run, and the same crash states
                    # (a host that dies before it leaves the start on the queue, as before).
                    self.last_seq = await fx.history.append(run_id, [unrecorded.started, *entries], 0,
                                                            self._notify)
                    unrecorded.start_unrecorded = False
                    self._unrecorded = None
                self._appended_at = time.monotonic()
                if on_durable is not None:
                    on_durable(entries)
                if fx.tracing.enabled:
                    observe_appended(entries)
            case StartChildren(parent=parent, starts=starts):
                await start_children(fx.history, fx.publisher, s, parent, starts, fx.tracing)
            case RegisterWait(wait=wait, run_input=run_input):
                await publish_registrations(fx.publisher, fx.layout, wait, run_id, self.task, run_input, "register")
            case WithdrawWait(wait=wait, satisfied=satisfied, registered_before=before):
                await publish_registrations(fx.publisher, fx.layout, wait, run_id, self.task, None, "cancel",
                                            skip=set(satisfied), registered_before=before)
            case WaitBriefly(until=until, history_bytes=held):
                async with fx.durable_slots.lent(held):
                    await sleep_to(until)
            case ScheduleTimer(pos=pos, wake_at=wake_at, lead=lead):
                await fx.timers.schedule(run_id, self.task, pos, wake_at, self.last_seq, lead)
                self._indexed()
                if time.monotonic() - self._appended_at > _OVERTAKEN_AFTER_S:
                    await self._unless_overtaken(pos)
            case CancelTimer(pos=pos):
                fx.chore(run_id, f"run {run_id}: withdrawing timer {pos}", lambda: fx.timers.cancel(run_id, pos))
            case ScheduleRetry(retry=retry):
                await self._schedule_retry(retry.attempt, retry.retry_at)
                self._indexed()
            case PurgeInbox(upto_seq=upto):
                # Best effort: the next turn, or the end, redoes it.
                fx.chore(run_id, f"run {run_id}: purging its inbox", lambda: self._purge_inbox(upto))
            case ClearInbox(upto_seq=upto):
                await self._purge_inbox(upto)
            case RecordEnd(started=started, end=end):
                await publish_end(fx.publisher, s, started, end)  # no ack awaited: never a round trip
            case ScheduleRemoval(end=end):
                await fx.reaper.schedule(run_id, end)
            case NotifyParent(parent=parent, end=end):
                await notify_parent(fx.nc, fx.publisher, s, run_id, parent, end)
            case NextGeneration(started=started):
                # The earlier generation's messages (readers skip them already), then its first turn.
                await api_request(fx.nc, f"$JS.API.STREAM.PURGE.{s.history_stream}",
                                  {"filter": s.history(run_id), "seq": self.last_seq})
                await publish_start_activation(fx.publisher, s, started, history_seq=self.last_seq)
            case CancelChildren(children=children, reason=reason):
                # Awaited, not left in the background: the parent's activation is acked only once
                # every child's cancel is stored, so a host that dies before that leaves a
                # redelivery that does it again (ActorHost._ended), under the same ids.
                await asyncio.gather(*(request_cancel(fx.nc, fx.publisher, fx.history, s, child, reason, task,
                                                      event_id=f"parent-end:{run_id}:{child}")
                                       for child, task in children))

    async def carry_out(self, commands: Sequence[Command]) -> None:
        """Every command in order; a run of independent ones (child starts, withdrawals) at once."""
        i = 0
        while i < len(commands):
            kind = type(commands[i])
            j = i + 1
            if kind in _CONCURRENT:
                while j < len(commands) and type(commands[j]) is kind:
                    j += 1
            if j - i == 1:
                await self(commands[i])
            else:
                await asyncio.gather(*(self(c) for c in commands[i:j]))
            i = j

    async def _unless_overtaken(self, pos: int) -> None:
        """Withdraw the timer just stored for ``pos`` if the run went on without it meanwhile.

        The code is parked at the sleep or wait once its append is durable, before its timer is
        stored: another host may then resolve the wait, or end the run, and withdraw a timer that
        is not there yet. A publish held up by an election (the long chaos run saw one stored 650 ms
        late) then left it behind until it fired or the run was removed. One small read of the
        run's last message tells whether anyone wrote since this turn; only then is it read whole.
        Only a timer stored more than :data:`_OVERTAKEN_AFTER_S` after the append is checked, so the
        common case pays no read (it cost 50-90 us per sleep). Left behind still: a timer stored
        sooner, when another host read the run, took the event and withdrew the timer within that
        time; it fires into the run and is dropped, as a withdrawal that failed leaves one.
        """
        fx, s = self._fx, self._fx.layout.subjects
        last = await direct_get_last(fx.nc, s.history_stream, s.history(self.run_id))
        seq = int((last.headers or {}).get("Nats-Sequence", "0")) if last is not None else 0
        if seq == self.last_seq:
            return
        # Not below this turn's own append: a follower behind answers an older last message, and a
        # history read without this turn's sleep (or wait) would withdraw the timer it still needs.
        hist = await fx.history.read(self.run_id, history_seq=max(seq, self.last_seq))
        state = hist.state
        if (hist.terminal is None and hist.entries
                and (pos in state.sleeping or any(w.pos == pos for w in state.open_waits.values()))):
            return
        await fx.timers.cancel(self.run_id, pos)

    async def _purge_inbox(self, upto: int) -> None:
        """The run's inbox messages up to sequence ``upto`` (signals taken, or dropped as malformed) go."""
        s = self._fx.layout.subjects
        await api_request(self._fx.nc, f"$JS.API.STREAM.PURGE.{s.history_stream}",
                          {"filter": s.inbox(self.run_id), "seq": upto + 1})

    def _indexed(self) -> None:
        """The run's live record in the runs index, if it has none (refused at the server when it has).

        A run that waits on a timer is found by the hosts' wake-up check through that record, should
        the timer be lost; its starter's write of it is best effort, and a node lost at that moment
        (the chaos run with node kills and work stream purges) left runs the check never saw. So
        this one is acknowledged, retried as a chore (the activation is acked once it is stored).
        """
        started, fx = self._started, self._fx
        if started is not None:
            fx.chore(self.run_id, f"run {self.run_id}: its runs-index record",
                     lambda: ensure_live(fx.publisher, fx.layout.subjects, started))

    async def _schedule_retry(self, attempt: int, at: datetime) -> None:
        fx = self._fx
        if (at - utcnow()).total_seconds() >= 1.0:
            await fx.timers.schedule_retry(self.run_id, self.task, attempt, at, self.last_seq)
            return
        # A short backoff waits here (the activation is not acked yet, so a crash loses nothing).
        await sleep_to(at)
        act = Activation(run_id=self.run_id, task=self.task, kind="retry", history_seq=self.last_seq)
        await fx.publisher.publish(fx.layout.subjects.queue(self.task, self.run_id), encode_activation(act),
                                   {HDR_BIDE_KIND: "retry"})
