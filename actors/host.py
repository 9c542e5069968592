"""The actor host: pulls activations, runs one turn per activation, appends, acks.

A turn rebuilds the run from its history, drives the user coroutine to its next
suspension (or its end), appends what happened under the single-writer guard,
publishes any timers, and only then acks the activation (no signal is lost).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import traceback
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from actors.activation_queue import ActivationQueue, SlotPool
from actors.history import HistoryConflict, HistoryLog, RunHistory
from actors.jetstream import Layout, Publisher, api_request, connect, ensure_streams, ensure_task_consumer
from actors.replay import Turn, open_waits
from actors.router import EventRouter, publish_registrations
from actors.timers import TimerScheduler
from actors.wire import (
    HDR_ROLLUP,
    HDR_TTL,
    Activation,
    ActivationBegun,
    ErrorInfo,
    RunCompleted,
    RunFailed,
    SignalReceived,
    TriggerRegistration,
    decode_activation,
    utcnow,
)
from sdk.context import Context, DurableContext
from sdk.errors import OutputSerializationError, TaskTimeoutError

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from sdk.config import BideConfig
    from sdk.tasks import TaskDefinition

log = logging.getLogger("bide.host")

_MISSING_HISTORY_RETRIES = 20


def error_info(exc: BaseException) -> ErrorInfo:
    return ErrorInfo(
        type=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc))[-8000:],
    )


class ActorHost:
    """Hosts a set of tasks on one NATS connection with ``slots`` and ``durable_slots`` limits."""

    def __init__(
        self,
        config: BideConfig,
        name: str,
        tasks: list[TaskDefinition],
        slots: int,
        durable_slots: int,
        *,
        shutdown_grace_s: float = 20.0,
        route_events: bool = True,
    ) -> None:
        self.config = config
        self.host_id = f"{name}@{socket.gethostname()}:{os.getpid()}"
        self.layout = Layout.from_config(config)
        self._tasks = {t.name: t for t in tasks}
        if len(self._tasks) != len(tasks):
            raise ValueError("a worker cannot host two tasks with the same name")
        self.slots = SlotPool(slots)
        self.durable_slots = SlotPool(durable_slots)
        self._grace = shutdown_grace_s
        self._nc: NATS | None = None
        self._queues: list[ActivationQueue] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._in_flight: dict[int, Msg] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._publisher: Publisher | None = None
        self._route_events = route_events
        self.router: EventRouter | None = None
        self._chores: set[asyncio.Task[Any]] = set()
        self.turns = 0

    async def start(self) -> None:
        self._nc = nc = await connect(self.config.nats_url, name=self.host_id,
                                      connect_timeout=self.config.connect_timeout_s)
        js = nc.jetstream(timeout=10.0)
        await ensure_streams(js, self.layout)
        self._publisher = await Publisher(nc).start()
        self._history = HistoryLog(nc, self._publisher, self.layout.subjects)
        self._timers = TimerScheduler(js, self.layout.subjects)
        for t in self._tasks.values():
            if t.on_events:
                # Triggers travel in the events stream: every event after this one sees them.
                trig = TriggerRegistration(task=t.name, durable=t.durable, on_events=list(t.on_events))
                await self._publisher.publish(
                    self.layout.subjects.trigger(t.name), trig.model_dump_json().encode(),
                    {HDR_ROLLUP: "sub", HDR_TTL: "never"},
                )
        if self._route_events:
            self.router = await EventRouter(nc, self._publisher, self.layout, self._history).start()
        for t in self._tasks.values():
            consumer = await ensure_task_consumer(js, self.layout, t.name, t.durable)
            pool = self.durable_slots if t.durable else self.slots
            q = ActivationQueue(nc, self.layout.subjects.work_stream, consumer, pool, self._handle)
            await q.start()
            self._queues.append(q)
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="bide-heartbeat")
        log.info("host %s serving %s", self.host_id, ", ".join(sorted(self._tasks)))

    async def stop(self) -> None:
        """Graceful: stop pulling, let in-flight turns finish within the grace period, hand back the rest."""
        for q in self._queues:
            await q.stop()
        pending = set().union(*(q.in_flight for q in self._queues)) if self._queues else set()
        if pending:
            _, still = await asyncio.wait(pending, timeout=self._grace)
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
        for q in self._queues:
            await q.close()
        if self.router is not None:
            await self.router.stop()
        if self._chores:
            await asyncio.wait(self._chores, timeout=5)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._publisher is not None:
            await self._publisher.close()
        if self._nc is not None:
            await self._nc.drain()

    async def _heartbeat_loop(self) -> None:
        # Long turns tell JetStream they are alive, so only a dead host's work is redelivered.
        interval = max(0.5, self.layout.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            for msg in list(self._in_flight.values()):
                try:
                    await msg.in_progress()
                except Exception:
                    log.debug("heartbeat failed for %s", msg.subject, exc_info=True)

    async def _handle(self, msg: Msg) -> None:
        self._in_flight[id(msg)] = msg
        try:
            try:
                act = decode_activation(msg.data)
            except Exception:
                log.error("dropping malformed activation on %s: %r", msg.subject, msg.data[:200])
                await msg.term()
                return
            defn = self._tasks.get(act.task)
            if defn is None:
                await msg.nak(delay=5)
                return
            lock = self._locks.setdefault(act.run_id, asyncio.Lock())
            try:
                async with lock:
                    await self._turn(msg, act, defn)
            finally:
                if not lock.locked() and self._locks.get(act.run_id) is lock:
                    del self._locks[act.run_id]
        except HistoryConflict as e:
            # Single writer: another host appended first. Drop this stale view; the
            # activation comes back and is replayed from the newer history.
            log.debug("%s", e)
            await msg.nak(delay=0.05)
        except asyncio.CancelledError:
            await msg.nak()
            raise
        except Exception:
            log.exception("turn failed on %s; will retry", msg.subject)
            await msg.nak(delay=1.0)
        finally:
            self._in_flight.pop(id(msg), None)

    async def _turn(self, msg: Msg, act: Activation, defn: TaskDefinition) -> None:
        attempt = msg.metadata.num_delivered or 1
        if act.kind == "start" and attempt == 1 and act.started is not None and act.history_seq:
            # First delivery of a start: the history is exactly the start entry.
            hist = RunHistory(act.run_id, [act.started], act.history_seq)
        else:
            hist = await self._history.read(act.run_id)
        if not hist.entries:
            if attempt < _MISSING_HISTORY_RETRIES:
                await msg.nak(delay=0.2)
            else:
                log.warning("dropping activation for run %s: the run has no history", act.run_id)
                await msg.ack()
            return
        if hist.terminal is not None:
            await msg.ack()
            return
        if defn.durable and act.kind in ("timer", "signal") and not _needs_user_code(act, hist):
            # Nothing for the code to do (a loser of an or-group, a signal taken already, an
            # event for a wait not made yet): record any new signals, never resume the code.
            if hist.inbox:
                entries: list[Any] = [SignalReceived(inbox_seq=q, signal=sig) for q, sig in hist.inbox]
                await self._history.append(act.run_id, entries, hist.last_seq)
                self._purge_inbox(act.run_id, hist.inbox[-1][0])
            await msg.ack()
            return
        self.turns += 1
        if defn.durable:
            await self._durable_turn(hist, defn, attempt)
        else:
            await self._regular_turn(hist, defn, attempt)
        await msg.ack()

    async def _durable_turn(self, hist: RunHistory, defn: TaskDefinition, attempt: int) -> None:
        started = hist.entries[0]
        turn = Turn(history=hist, log=self._history, task=defn.name, host_id=self.host_id, attempt=attempt)
        try:
            value = defn.signature.load_input(started.input)
        except Exception as e:
            await turn.flush([RunFailed(error=error_info(e), at=utcnow())])
            return
        ctx = DurableContext(hist.run_id, defn.name, attempt, started.input, turn)
        user = asyncio.create_task(defn.fn(value, ctx), name=f"bide-run:{hist.run_id}")
        try:
            done, _ = await asyncio.wait(
                {user, turn.suspended}, timeout=started.execution_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            await _cancel(user)
            raise
        finished = user in done
        # Evict (the slot and the coroutine's memory are freed now); a finished task's
        # exception is marked retrieved either way.
        await _cancel(user)
        if turn.fatal is not None:
            if isinstance(turn.fatal, HistoryConflict):
                raise turn.fatal  # another host wrote first: drop this stale turn
            turn.finished_or_failed = True
            await turn.flush([RunFailed(error=error_info(turn.fatal), at=utcnow())])
        elif finished:
            turn.finished_or_failed = True
            await turn.flush([self._outcome(user, defn)])
        elif turn.suspended in done:
            if turn.has_new_facts:
                await turn.flush()
            for t in turn.timers:
                await self._timers.schedule(hist.run_id, defn.name, t.pos, t.wake_at)
            if turn.pending_wait is not None:
                # After the wait is in the history: a crash in between re-registers on replay.
                await publish_registrations(self._publisher_, self.layout, turn.pending_wait, hist.run_id,
                                            defn.name, turn.run_input, "register")
        else:
            await turn.flush([_timed_out(defn, hist.run_id, started.execution_timeout_s)])
        await self._after_turn(turn, defn, hist)

    async def _after_turn(self, turn: Turn, defn: TaskDefinition, hist: RunHistory) -> None:
        """Tidy up what the turn left behind: registrations of waits that ended, their timers, the inbox."""
        ended = list(turn.resolved)
        if turn.finished_or_failed:
            ended += list(turn.open_waits.values())  # the run ended while they were open
        now = utcnow()
        for w in ended:
            # A condition the router satisfied is gone from the router already.
            done = {sig.cond for _, sig in turn.signals if sig.source == "event" and sig.wait_id == w.wait_id}
            await publish_registrations(self._publisher_, self.layout, w, hist.run_id, defn.name, None, "cancel",
                                        skip=done)
            if any(c.kind == "sleep" and c.wake_at is not None and c.wake_at > now for g in w.groups for c in g):
                # The loser of an or-group never resumes the run: its timer is withdrawn.
                self._chore(self._timers.cancel(hist.run_id, w.pos))
        if turn.took_signals:
            self._purge_inbox(hist.run_id, hist.inbox[-1][0])

    @property
    def _publisher_(self) -> Publisher:
        assert self._publisher is not None
        return self._publisher

    def _purge_inbox(self, run_id: str, upto_seq: int) -> None:
        """Signals recorded in the history leave the inbox (the history keeps the taken seq)."""
        s = self.layout.subjects
        nc = self._nc
        assert nc is not None

        async def _purge() -> None:
            await api_request(nc, f"$JS.API.STREAM.PURGE.{s.history_stream}",
                              {"filter": s.inbox(run_id), "seq": upto_seq + 1})

        self._chore(_purge())

    def _chore(self, coro: Any) -> None:
        async def _guarded() -> None:
            try:
                await coro
            except Exception as e:
                log.debug("background chore failed: %s", e)

        t = asyncio.create_task(_guarded())
        self._chores.add(t)
        t.add_done_callback(self._chores.discard)

    async def _regular_turn(self, hist: RunHistory, defn: TaskDefinition, attempt: int) -> None:
        started = hist.entries[0]
        begun = ActivationBegun(host=self.host_id, attempt=attempt, at=utcnow())
        try:
            value = defn.signature.load_input(started.input)
        except Exception as e:
            await self._history.append(hist.run_id, [begun, RunFailed(error=error_info(e), at=utcnow())],
                                       hist.last_seq, started.meta.get("notify"))
            return
        ctx = Context(hist.run_id, defn.name, attempt, started.input)
        if asyncio.iscoroutinefunction(defn.fn):
            user: asyncio.Task[Any] = asyncio.create_task(defn.fn(value, ctx))
        else:
            user = asyncio.create_task(asyncio.to_thread(defn.fn, value, ctx))
        done, _ = await asyncio.wait({user}, timeout=started.execution_timeout_s)
        if user in done:
            outcome: Any = self._outcome(user, defn)
        else:
            await _cancel(user)
            outcome = _timed_out(defn, hist.run_id, started.execution_timeout_s)
        await self._history.append(hist.run_id, [begun, outcome], hist.last_seq, started.meta.get("notify"))

    @staticmethod
    def _outcome(user: asyncio.Task[Any], defn: TaskDefinition) -> RunCompleted | RunFailed:
        exc = user.exception()
        if exc is not None:
            return RunFailed(error=error_info(exc), at=utcnow())
        try:
            return RunCompleted(result=defn.signature.dump_output(user.result()), at=utcnow())
        except OutputSerializationError as e:
            return RunFailed(error=error_info(e), at=utcnow())


def _needs_user_code(act: Activation, hist: RunHistory) -> bool:
    """Whether a timer or signal activation can change what the run's code does next."""
    if act.kind == "timer" and act.pos is not None:
        fired = {e.pos for e in hist.entries if e.k in ("wait_resolved", "sleep_fired")}
        if act.pos not in fired:
            return True
    waits = open_waits(hist.entries)
    waited_names = {c.event_key for w in waits.values() for g in w.groups for c in g if c.kind == "event"}
    return any(
        sig.wait_id in waits if sig.source == "event" else sig.name in waited_names for _, sig in hist.inbox
    )


def _timed_out(defn: TaskDefinition, run_id: str, limit_s: float) -> RunFailed:
    err = TaskTimeoutError(f"task {defn.name!r} (run {run_id}) exceeded its execution_timeout of {limit_s:g}s")
    return RunFailed(error=error_info(err), at=utcnow())


async def _cancel(task: asyncio.Task[Any]) -> None:
    if task.done():
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" noise
        return
    task.cancel()
    try:
        await task
    except BaseException:
        pass
