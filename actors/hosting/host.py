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
import time
import traceback
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from actors.engine.child_ids import ChildStart
from actors.engine.dag import plan_workflow_turn
from actors.engine.decisions import claimed_signals, failed_attempts, is_suspended, needs_user_code
from actors.engine.replay import Turn, ended_registrations, last_turn
from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    HDR_BIDE_KIND,
    HDR_TTL,
    TERMINAL,
    Activation,
    ActivationBegun,
    AttemptFailed,
    ChildrenSpawned,
    ErrorInfo,
    HistoryEntry,
    ParentLink,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    SignalReceived,
    SleepFired,
    SleepScheduled,
    TriggerRegistration,
    TurnParked,
    WaitResolved,
    decode_activation,
    decode_history,
    encode_activation,
    utcnow,
)
from actors.hosting.activation_queue import ActivationQueue, SlotPool
from actors.hosting.heartbeat import Heartbeat
from actors.hosting.inbox_sweeper import InboxSweeper, ensure_inbox_sweeper_consumer
from actors.hosting.retention import Reaper
from actors.hosting.router import publish_registrations
from actors.hosting.router_partitions import RouterPartitions
from actors.observe.tracing import RunTrace, Tracing, mark_failed, mark_outcome
from actors.store.children import notify_parent, request_cancel, start_children
from actors.store.history import HistoryConflict, HistoryLog
from actors.store.jetstream import (
    Layout,
    Publisher,
    api_request,
    connect,
    direct_get_last,
    ensure_streams,
    ensure_task_consumer,
    is_transient,
    retry_transient,
)
from actors.store.timers import TimerScheduler
from sdk.context import Context, DurableContext, current_runtime
from sdk.errors import (
    DeliveryLimitExceeded,
    HistoryTooLargeError,
    InputValidationError,
    NonDeterminismError,
    NonRetryableError,
    OutputSerializationError,
    PayloadValidationError,
    ScheduleTimeoutError,
    TaskCancelledByCondition,
    TaskSkipped,
    TaskTimeoutError,
)
from sdk.limits import format_size

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from sdk.config import BideConfig
    from sdk.tasks import TaskDefinition

log = logging.getLogger("bide.host")

_MISSING_HISTORY_RETRIES = 20
_SUSPENSION_WAIT_S = 10.0
"""How long a signal waits for a turn under way elsewhere to park the code before running it itself."""
_SUSPENSION_POLL_S = 0.1
_STOP_STEP_S = 5.0
_START_RETRY_S = 60.0
"""How long a starting host retries JetStream set-up through infrastructure errors before it gives up."""
_APPEND_RETRY_S = 15.0
"""An append that times out or meets a 503 is repeated this long before the turn is retried."""
_INFRA_RETRY_FIRST_S = 0.1
_INFRA_RETRY_MAX_S = 5.0
_INFRA_RETRY_BUDGET_S = 60.0
"""How long a host retries a turn that hits infrastructure errors before handing it back (a nak)."""


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
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.tracing = tracing or Tracing(config.prefix)
        self.host_id = f"{name}@{socket.gethostname()}:{os.getpid()}"
        self.layout = Layout.from_config(config)
        self._tasks = {t.name: t for t in tasks}
        if len(self._tasks) != len(tasks):
            raise ValueError("a worker cannot host two tasks with the same name")
        self._workflows = {t.name for t in tasks if t.workflow is not None and t is t.workflow.runner}
        self._running: dict[str, tuple[asyncio.Task[Any], Turn | None]] = {}
        """Runs whose code is running here now (what the cancel broadcast stops)."""
        self._cancelled_here: set[str] = set()
        self.slots = SlotPool(slots)
        self.durable_slots = SlotPool(durable_slots)
        self._grace = shutdown_grace_s
        self._nc: NATS | None = None
        self._queues: list[ActivationQueue] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._heartbeat: Heartbeat | None = None
        self._publisher: Publisher | None = None
        self._route_events = route_events
        self._sweeper: InboxSweeper | None = None
        self.router: RouterPartitions | None = None
        self._chores: set[asyncio.Task[Any]] = set()
        self.turns = 0

    async def start(self) -> None:
        self._nc = nc = await connect(self.config.nats_url, name=self.host_id,
                                      connect_timeout=self.config.connect_timeout_s)
        js = nc.jetstream(timeout=10.0)
        # A cluster that is still electing leaders (or lost a node) answers with timeouts and 503s
        # for a while: every set-up step below is idempotent, so it is retried, not fatal.
        await retry_transient("setting up the streams", lambda: ensure_streams(js, self.layout), _START_RETRY_S)
        self._publisher = await Publisher(nc).start()
        self._history = HistoryLog(nc, self._publisher, self.layout.subjects, retry_s=_APPEND_RETRY_S)
        # Long turns tell JetStream they are alive, so only a dead host's work is redelivered.
        self._heartbeat = Heartbeat(self.config.nats_url, max(0.2, self.layout.ack_wait_s / 3),
                                    name=f"{self.host_id}/heartbeat", connect_timeout=self.config.connect_timeout_s)
        await self._heartbeat.start()
        self._timers = TimerScheduler(js, self.layout.subjects)
        await nc.subscribe(self.layout.subjects.cancel_broadcast, cb=self._on_cancel_msg)
        for t in self._tasks.values():
            if t.on_events:
                # Triggers travel in the events stream: every event after this one sees them.
                trig = TriggerRegistration(task=t.name, durable=t.durable, on_events=list(t.on_events))
                await retry_transient(f"registering the triggers of {t.name}", partial(
                    self._publisher_.publish, self.layout.subjects.trigger(trig.task), trig.model_dump_json().encode(),
                    {HDR_TTL: "never"},  # the router keeps the latest per task and deletes the rest
                ), _START_RETRY_S)
        if self._route_events:
            router = RouterPartitions(nc, self._publisher, self.layout, self._history, self.tracing,
                                      self.config.payload_limits, host_id=self.host_id)
            self.router = await retry_transient("starting the event router", router.start, _START_RETRY_S)
        for t in self._tasks.values():
            consumer: str = await retry_transient(f"the consumer of {t.name}", partial(
                ensure_task_consumer, js, self.layout, t.name, t.durable), _START_RETRY_S)
            pool = self.durable_slots if t.runs_durably else self.slots
            self._queues.append(ActivationQueue(nc, self.layout.subjects.work_stream, consumer, pool, self._handle))
        self._reaper = Reaper(nc, self._publisher, self.layout, self._history, self._timers,
                              self.config.history_retention_s)
        self._queues.append(await retry_transient("the reaper's consumer", lambda: self._reaper.queue(js),
                                                  _START_RETRY_S))
        await retry_transient("the inbox sweeper's consumer", lambda: ensure_inbox_sweeper_consumer(nc, self.layout),
                              _START_RETRY_S)
        self._sweeper = await InboxSweeper(nc, self._publisher, self._history, self.layout,
                                           self.config.sweep_after_s).start()
        for q in self._queues:  # every queue is counted before any pulls (scarce slots)
            await q.start()
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
        # Each step is bounded: a host stopping while its server is down must still stop.
        for q in self._queues:
            await _bounded(q.close(), "closing a queue")
        if self.router is not None:
            await _bounded(self.router.stop(), "stopping the router")
        if self._sweeper is not None:
            await _bounded(self._sweeper.stop(), "stopping the inbox sweeper")
        if self._chores:
            await asyncio.wait(self._chores, timeout=5)
        if self._heartbeat is not None:
            await _bounded(self._heartbeat.stop(), "stopping the heartbeat")
        if self._publisher is not None:
            await _bounded(self._publisher.close(), "closing the publisher")
        if self._nc is not None and not await _bounded(self._nc.drain(), "draining the connection"):
            await _bounded(self._nc.close(), "closing the connection")
        await asyncio.to_thread(self.tracing.force_flush)  # a stopped host's last spans are exported

    async def _handle(self, msg: Msg) -> None:
        heartbeat = self._heartbeat
        assert heartbeat is not None
        heartbeat.track(msg)
        delivered = msg.metadata.num_delivered or 1
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
                    if delivered > self.config.max_deliveries:
                        await self._give_up(msg, act, defn, delivered)
                    else:
                        await self._turn_retrying(msg, act, defn, delivered)
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
            log.exception("turn failed on %s (delivery %d); will retry", msg.subject, delivered)
            await msg.nak(delay=min(_INFRA_RETRY_MAX_S, 0.5 * delivered))
        finally:
            heartbeat.untrack(msg)

    async def _turn_retrying(self, msg: Msg, act: Activation, defn: TaskDefinition, delivered: int) -> None:
        """A turn; an infrastructure error (a timeout, a 503, a lost connection) is retried here.

        Only the user's own errors fail a run. A turn that hit an infrastructure error is
        replayed from the history with backoff while the activation stays with this host
        (heartbeats keep it), so its delivery count measures crashes, not outages. Each
        retry counts as a redelivery, so children recorded but maybe not started are started.
        """
        loop = asyncio.get_running_loop()
        give_back = loop.time() + _INFRA_RETRY_BUDGET_S
        delay = _INFRA_RETRY_FIRST_S
        retries = 0
        while True:
            try:
                await self._turn(msg, act, defn, delivered + retries)
                return
            except HistoryConflict:
                raise
            except Exception as e:
                if not is_transient(e) or loop.time() + delay > give_back:
                    raise
                log.warning("run %s: infrastructure error in a turn (%s: %s); retrying in %.1fs",
                            act.run_id, type(e).__name__, e, delay)
            await asyncio.sleep(delay)
            delay = min(_INFRA_RETRY_MAX_S, delay * 2)
            retries += 1

    async def _read(self, act: Activation) -> RunHistory:
        """The run as of every write this activation announces (invariant 13)."""
        return await self._history.read(act.run_id, history_seq=act.history_seq or 0, inbox_seq=act.inbox_seq or 0)

    async def _give_up(self, msg: Msg, act: Activation, defn: TaskDefinition, delivered: int,
                       err: Exception | None = None, hist: RunHistory | None = None) -> None:
        """A poison activation (it came back too often) or a run over a limit: it fails without running its code."""
        if hist is None:
            hist = await self._read(act)
        if not hist.entries or hist.terminal is not None:
            if hist.terminal is not None and hist.started.parent is not None:
                await notify_parent(self._nc_, self._publisher_, self.layout.subjects, hist.run_id,
                                    hist.started.parent, hist.terminal)
            await msg.ack()
            return
        if err is None:
            err = DeliveryLimitExceeded(
                f"run {act.run_id} of task {defn.name!r}: its {act.kind} activation was delivered {delivered} "
                f"times, more than BIDE_MAX_DELIVERIES={self.config.max_deliveries}; each host that took it died "
                "or failed before finishing the turn, so the run failed without running its code again")
        log.error("%s", err)
        end = RunFailed(error=error_info(err), at=utcnow())
        started = hist.started
        unfinished: list[tuple[str, str]] = []
        if defn.runs_durably and not (defn.workflow is not None and defn is defn.workflow.runner):
            turn = Turn(history=hist, log=self._history, task=defn.name, host_id=self.host_id, delivery=delivered)
            await turn.flush([end])
            await self._after_turn(turn, defn, hist)
            unfinished = turn.unfinished_children
        else:
            begun = ActivationBegun(host=self.host_id, delivery=delivered, at=utcnow())
            await self._history.append(hist.run_id, [begun, end], hist.last_seq, started.meta.get("notify"))
            if defn.workflow is not None:
                unfinished = [(rid, e.task) for e in hist.entries if isinstance(e, ChildrenSpawned)
                              for rid in e.run_ids]
        await self._finished(hist.run_id, started, end, unfinished)
        await msg.ack()

    async def _fresh_start(self, act: Activation, started: RunStarted) -> RunHistory | None:
        """The history of a run that has only its start entry (the common first turn), in one small read.

        ``None`` when that is not known for sure: the caller reads the whole history instead.
        """
        if act.history_seq:
            return RunHistory(act.run_id, [started], act.history_seq)  # a start written before its activation
        s = self.layout.subjects
        last = await direct_get_last(self._nc_, s.history_stream, s.history(act.run_id))
        if last is None:
            try:  # the starter died before its append (or it is on its way): record the start here
                seq = await self._history.append(act.run_id, [started], expected_seq=0)
            except HistoryConflict:
                return None
            return RunHistory(act.run_id, [started], seq)
        entries = decode_history(last.data)
        first = entries[0] if len(entries) == 1 else None
        if isinstance(first, RunStarted) and first.same_start(started):
            return RunHistory(act.run_id, [first], int((last.headers or {}).get("Nats-Sequence", "0")))
        return None

    async def _begin(self, msg: Msg, act: Activation, started: RunStarted, hist: RunHistory,
                     delivery: int) -> RunHistory | None:
        """A start activation: the run's history with its start recorded, or ``None`` (acked) if not to run.

        The starter publishes the activation before ``run_started`` (actors.store.protocol.start_run),
        so a starter that died in between left the start here only: record it (invariant 12).
        """
        if not hist.entries:
            try:
                seq = await self._history.append(act.run_id, [started], expected_seq=0)
                return RunHistory(act.run_id, [started], seq)
            except HistoryConflict as conflict:
                # The starter's own append came first: read at least that far (a replica may lag).
                hist = await self._history.read(act.run_id, history_seq=max(1, conflict.actual_seq),
                                                inbox_seq=act.inbox_seq or 0)
        first = hist.entries[0]
        if not isinstance(first, RunStarted) or not first.same_start(started):
            log.error("dropping a start of run %s: another start (task %r) owns that run id", act.run_id,
                      getattr(first, "task", None))
            await msg.ack()
            return None
        if delivery == 1 and any(isinstance(e, ActivationBegun) for e in hist.entries):
            # A start sent again (a parent's replay, a retried request): the run has begun already,
            # and its own activation, if its host died, comes back by itself.
            await msg.ack()
            return None
        return hist

    async def _until_suspended(self, act: Activation, hist: RunHistory) -> RunHistory:
        """The run re-read until its code is parked (or it ended), for at most ``_SUSPENSION_WAIT_S``."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _SUSPENSION_WAIT_S
        while not is_suspended(hist) and hist.terminal is None and loop.time() < give_up:
            await asyncio.sleep(_SUSPENSION_POLL_S)
            hist = await self._read(act)
        return hist

    async def _turn(self, msg: Msg, act: Activation, defn: TaskDefinition, delivery: int) -> None:
        began_ns = time.time_ns()
        fresh = None
        if act.kind == "start" and delivery == 1 and act.started is not None:
            fresh = await self._fresh_start(act, act.started)
        if fresh is not None:
            hist = fresh  # first delivery of a start: the history is exactly the start entry
        else:
            hist = await self._read(act)
        if hist.size_bytes > self.config.max_history_bytes and hist.terminal is None:
            await self._give_up(msg, act, defn, delivery, HistoryTooLargeError(
                f"run {act.run_id} of task {defn.name!r}: its history holds {format_size(hist.size_bytes)}, more "
                f"than BIDE_MAX_HISTORY={format_size(self.config.max_history_bytes)}; the run failed rather than "
                "grow further (raise the limit, or keep large data outside the run and pass references)"), hist)
            return
        if delivery > 1 and hist.entries:
            await self._redo_last_turn(hist, defn.name)
        if act.kind == "start" and act.started is not None:
            began = await self._begin(msg, act, act.started, hist, delivery)
            if began is None:
                return
            hist = began
        if not hist.entries:
            if delivery < _MISSING_HISTORY_RETRIES:
                await msg.nak(delay=0.2)
            else:
                log.warning("dropping activation for run %s: the run has no history", act.run_id)
                await msg.ack()
            return
        started = hist.started
        terminal = hist.terminal
        if terminal is not None:
            # The host that ended it may have died before scheduling its removal (idempotent).
            await self._reaper.schedule(hist.run_id, terminal)
            if delivery > 1 and started.parent is not None:
                # The host that ended it may have died before telling the parent (idempotent).
                await notify_parent(self._nc_, self._publisher_, self.layout.subjects, hist.run_id, started.parent,
                                    terminal)
            await msg.ack()
            return
        run_trace = self.tracing.run(started)
        span: Any = nullcontext()
        if run_trace is not None:
            span = run_trace.activation(kind=act.kind, subject=msg.subject, delivery=delivery,
                                        attempt=failed_attempts(hist) + 1, signals=[sig for _, sig in hist.inbox],
                                        began_ns=began_ns)
        if defn.workflow is not None and defn is defn.workflow.runner:
            self.turns += 1
            with span:
                await self._workflow_turn(hist, defn, delivery)
            await msg.ack()
            return
        skip_code = False
        if defn.runs_durably and act.kind in ("timer", "signal"):
            if not is_suspended(hist) and delivery == 1:
                # The code is not parked at a wait or a sleep: a turn is under way on another host
                # (it may have claimed signals and be running steps now), or one died before it
                # parked. Running the code now would run those steps twice, so wait for it to
                # park (its activation comes back if it died), then decide; running the code is
                # the last resort.
                hist = await self._until_suspended(act, hist)
                if hist.terminal is not None:
                    await msg.ack()
                    return
            skip_code = is_suspended(hist) and not needs_user_code(act, hist)
        if skip_code:
            # Nothing for the code to do (a loser of an or-group, a signal taken already, an
            # event for a wait not made yet): record any new signals, never resume the code.
            if hist.inbox:
                entries: list[HistoryEntry] = [SignalReceived(inbox_seq=q, signal=sig) for q, sig in hist.inbox]
                await self._history.append(act.run_id, entries, hist.last_seq)
                self._purge_inbox(act.run_id, hist.inbox[-1][0])
            await msg.ack()
            return
        self.turns += 1
        with span:
            if defn.runs_durably:
                await self._durable_turn(hist, defn, delivery, run_trace)
            else:
                await self._regular_turn(hist, defn, delivery)
        await msg.ack()

    def _late(self, hist: RunHistory, defn: TaskDefinition) -> RunFailed | None:
        """``schedule_timeout``: a run that waited too long for its first turn fails without running."""
        if defn.schedule_timeout is None or any(isinstance(e, ActivationBegun) for e in hist.entries):
            return None
        waited = utcnow() - hist.started.at
        if waited <= defn.schedule_timeout:
            return None
        err = ScheduleTimeoutError(
            f"run {hist.run_id} of task {defn.name!r} waited {waited.total_seconds():.1f}s for a worker, longer than "
            f"its schedule_timeout of {defn.schedule_timeout.total_seconds():g}s")
        return RunFailed(error=error_info(err), at=utcnow())

    async def _durable_turn(self, hist: RunHistory, defn: TaskDefinition, delivery: int,
                            run_trace: RunTrace | None) -> None:
        started = hist.started
        turn = Turn(history=hist, log=self._history, task=defn.name, host_id=self.host_id, delivery=delivery,
                    start_children=self._start_children, trace=run_trace)
        late = self._late(hist, defn)
        if late is not None or (turn.cancel_reason is not None and not turn.began):
            # Never ran: end it without running any code.
            never: Any = late or RunCancelled(reason=turn.cancel_reason or "", at=utcnow())
            await turn.flush([never])
            await self._after_turn(turn, defn, hist)
            await self._finished(hist.run_id, started, never, turn.unfinished_children)
            return
        try:
            value = defn.signature.load_input(started.input)
        except Exception as e:
            failed = RunFailed(error=error_info(e), at=utcnow())
            await turn.flush([failed])
            await self._finished(hist.run_id, started, failed, [])
            return
        retry_count = failed_attempts(hist)
        ctx = DurableContext(hist.run_id, defn.name, delivery, started.input, turn, retry_count=retry_count,
                             parents=started.parents)

        async def drive() -> Any:
            current_runtime.set(turn)  # task.aio_run() in this code spawns children of this run
            return await defn.entry(value, ctx)

        if turn.began and turn.took_signals:
            # Two signals can wake a run on two hosts at once: the turn that records them first
            # runs the code, the other loses this append before running anything (its activation
            # comes back and finds the signals taken), so no step runs twice (invariant 1).
            await turn.flush()
        user = asyncio.create_task(drive(), name=f"bide-run:{hist.run_id}")
        self._running[hist.run_id] = (user, turn)
        timeout = _time_limit(started, defn)
        try:
            done, _ = await asyncio.wait({user, turn.suspended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await _cancel(user)
            raise
        finally:
            self._running.pop(hist.run_id, None)
        finished = user in done
        # Evict (the slot and the coroutine's memory are freed now); a finished task's
        # exception is marked retrieved either way.
        await _cancel(user)
        end: Any = None
        if turn.fatal is not None:
            if isinstance(turn.fatal, HistoryConflict) or is_transient(turn.fatal):
                # Another host wrote first (drop this stale turn), or the infrastructure failed
                # (retry it): neither is the user's error, and the code never saw it.
                raise turn.fatal
            end = RunFailed(error=error_info(turn.fatal), at=utcnow())
        elif finished:
            if turn.cancel_reason is not None and (user.cancelled() or _cancelled_error(user)):
                end = RunCancelled(reason=turn.cancel_reason, at=utcnow())
            else:
                end = self._outcome(user, defn)
        elif turn.suspended in done:
            if turn.pending_wait is not None:
                # Before the wait is in the history, so that a run seen waiting (history,
                # `bide runs show`) already counts every event pushed from then on. A crash or
                # a lost race in between is harmless: the wait id is the run and position, the
                # replay registers the same wait again, and a signal that came early waits in
                # the run's inbox.
                await publish_registrations(self._publisher_, self.layout, turn.pending_wait, hist.run_id,
                                            defn.name, turn.run_input, "register")
            if turn.has_new_facts:
                await turn.flush()
            elif claimed_signals(hist.entries + turn.written):
                await turn.flush([TurnParked(at=utcnow())])  # the claim alone would read as a turn under way
            for t in turn.timers:
                await self._timers.schedule(hist.run_id, defn.name, t.pos, t.wake_at, turn.last_seq)
        else:
            end = _timed_out(defn, hist.run_id, timeout or 0)
        if end is not None:
            # A fatal error (non-determinism, a write the server can never accept) is not retried:
            # a retry would replay into the same error.
            if isinstance(end, RunFailed) and turn.fatal is None:
                retry = self._retry(defn, hist, end, user if finished else None)
                if retry is not None:
                    await turn.flush([retry])
                    await self._after_turn(turn, defn, hist)
                    await self._schedule_retry(hist.run_id, defn, retry, turn.last_seq)
                    return
            await turn.flush([end])
        await self._after_turn(turn, defn, hist)
        if end is not None:
            await self._finished(hist.run_id, started, end, turn.unfinished_children)

    def _retry(self, defn: TaskDefinition, hist: RunHistory, failed: RunFailed,
               user: asyncio.Task[Any] | None) -> AttemptFailed | None:
        """The failed attempt, if the task has retries left and the error may be retried."""
        failures = failed_attempts(hist)
        if failures >= defn.retries:
            return None
        exc = user.exception() if user is not None and user.done() and not user.cancelled() else None
        if isinstance(exc, _NEVER_RETRIED) or (user is not None and user.done() and exc is None):
            return None  # (no exception: the code returned, but its result cannot be stored)
        delay = defn.retry_delay(failures + 1)
        now = utcnow()
        return AttemptFailed(attempt=failures + 1, error=failed.error, retry_at=now + timedelta(seconds=delay), at=now)

    async def _schedule_retry(self, run_id: str, defn: TaskDefinition, retry: AttemptFailed, history_seq: int) -> None:
        mark_outcome("retry")
        mark_failed(f"{retry.error.type}: {retry.error.message}")
        delay = (retry.retry_at - utcnow()).total_seconds()
        if delay >= 1.0:
            await self._timers.schedule_retry(run_id, defn.name, retry.attempt, retry.retry_at, history_seq)
            return
        # A short backoff waits here (the activation is not acked yet, so a crash loses nothing).
        if delay > 0:
            await asyncio.sleep(delay)
        act = Activation(run_id=run_id, task=defn.name, kind="retry", history_seq=history_seq)
        await self._publisher_.publish(self.layout.subjects.work(defn.name, run_id), encode_activation(act),
                                       {HDR_BIDE_KIND: "retry"})

    async def _start_children(self, parent: ParentLink, starts: list[ChildStart]) -> None:
        await start_children(self._history, self._publisher_, self.layout.subjects, parent, starts, self.tracing)

    async def _finished(self, run_id: str, started: Any, end: Any, unfinished: list[tuple[str, str]]) -> None:
        """A run ended: tell its parent; a cancelled run cancels the children it still has running."""
        mark_outcome(end.k.removeprefix("run_"))
        await self._reaper.schedule(run_id, end)  # retention starts now (DESIGN.md invariant 9)
        if isinstance(end, RunFailed):
            mark_failed(f"{end.error.type}: {end.error.message}")
        if started.parent is not None:
            await notify_parent(self._nc_, self._publisher_, self.layout.subjects, run_id, started.parent, end)
        if isinstance(end, RunCancelled) or (isinstance(end, RunFailed) and started.task in self._workflows):
            for child, task in unfinished:
                self._chore(request_cancel(self._nc_, self._publisher_, self._history, self.layout.subjects, child,
                                           f"parent run {run_id} ended: {end.k.removeprefix('run_')}", task))

    async def _on_cancel_msg(self, msg: Msg) -> None:
        self._on_cancel(msg.data.decode(errors="replace"))

    def _on_cancel(self, run_id: str) -> None:
        """The cancel broadcast: stop the run now if it is running here (its inbox has the durable request)."""
        running = self._running.get(run_id)
        if running is None:
            return
        user, turn = running
        if turn is None:
            self._cancelled_here.add(run_id)  # a regular task: its turn records the cancellation
        else:
            turn.request_cancel("cancelled")
        user.cancel()

    async def _after_turn(self, turn: Turn, defn: TaskDefinition, hist: RunHistory) -> None:
        """Tidy up what the turn left behind: registrations of waits that ended, their timers, the inbox."""
        await self._withdraw(hist.run_id, defn.name, hist.entries, turn.written, turn.unrecorded_waits)
        if turn.took_signals:
            self._purge_inbox(hist.run_id, hist.inbox[-1][0])

    async def _withdraw(self, run_id: str, task: str, before: list[HistoryEntry], written: list[HistoryEntry],
                        unrecorded: Sequence[Any] = ()) -> None:
        """Withdraw the registrations (and sleep timers) of the waits that ``written`` ended; safe to repeat.

        ``unrecorded``: waits the turn resolved with none recorded (``Turn.unrecorded_waits``),
        withdrawn too when the run ends.
        """
        now = utcnow()
        ended = ended_registrations(before, written, unrecorded)
        # Pipelined: a run that ends withdraws every wait it ever registered (maybe thousands).
        # A condition the router satisfied is gone from the router already.
        await asyncio.gather(*(publish_registrations(self._publisher_, self.layout, w, run_id, task, None, "cancel",
                                                     skip=done) for w, done in ended))
        resolved_before = {e.wait_id for e in before if isinstance(e, WaitResolved)}
        for w, _ in ended:
            if w.wait_id not in resolved_before and any(
                    c.kind == "sleep" and c.wake_at is not None and c.wake_at > now for c in w.flat()):
                # The loser of an or-group never resumes the run: its timer is withdrawn (once,
                # by the turn that resolved it; a late firing of it only replays to nothing new).
                self._chore(self._timers.cancel(run_id, w.pos))
        if any(isinstance(e, TERMINAL) for e in written):
            # A run that ended mid-sleep (cancelled, failed) withdraws that sleep's timer too.
            entries = before + written
            fired = {e.pos for e in entries if isinstance(e, SleepFired)}
            for e in entries:
                if isinstance(e, SleepScheduled) and e.pos not in fired and e.wake_at > now:
                    self._chore(self._timers.cancel(run_id, e.pos))

    async def _redo_last_turn(self, hist: RunHistory, task: str) -> None:
        """A redelivered activation first redoes what its last turn did after its append (all idempotent).

        The host that made that turn may have died, or failed to reach the server, between its
        append and the withdrawals that follow from it: a registration left live would never be
        withdrawn, and a signal left in the inbox never purged.
        """
        before, written = last_turn(hist.entries)
        if written:
            await self._withdraw(hist.run_id, task, before, written)
        taken = [e.inbox_seq for e in hist.entries if isinstance(e, SignalReceived)]
        if taken:
            self._purge_inbox(hist.run_id, max(taken))

    @property
    def _publisher_(self) -> Publisher:
        assert self._publisher is not None
        return self._publisher

    @property
    def _nc_(self) -> NATS:
        assert self._nc is not None
        return self._nc

    def _purge_inbox(self, run_id: str, upto_seq: int) -> None:
        """Signals recorded in the history leave the inbox (the history keeps the taken seq)."""
        s = self.layout.subjects
        nc = self._nc_

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

    async def _regular_turn(self, hist: RunHistory, defn: TaskDefinition, delivery: int) -> None:
        started = hist.started
        notify = started.meta.get("notify")
        begun = ActivationBegun(host=self.host_id, delivery=delivery, at=utcnow())
        cancel = next((sig for _, sig in hist.inbox if sig.source == "cancel"), None)
        end: Any = self._late(hist, defn)
        if end is None and cancel is not None:
            end = RunCancelled(reason=(cancel.payload or {}).get("reason") or "cancelled", at=utcnow())
        if end is None:
            try:
                value = defn.signature.load_input(started.input)
            except Exception as e:
                end = RunFailed(error=error_info(e), at=utcnow())
        if end is not None:
            await self._history.append(hist.run_id, [begun, end], hist.last_seq, notify)
            await self._finished(hist.run_id, started, end, [])
            return
        retry_count = failed_attempts(hist)
        ctx = Context(hist.run_id, defn.name, delivery, started.input, retry_count=retry_count,
                      parents=started.parents)
        user: asyncio.Task[Any] = asyncio.create_task(defn.entry(value, ctx))
        self._running[hist.run_id] = (user, None)
        timeout = _time_limit(started, defn)
        try:
            done, _ = await asyncio.wait({user}, timeout=timeout)
        finally:
            self._running.pop(hist.run_id, None)
        if hist.run_id in self._cancelled_here:
            self._cancelled_here.discard(hist.run_id)
            await _cancel(user)
            end = RunCancelled(reason="cancelled", at=utcnow())
        elif user in done:
            end = self._outcome(user, defn)
        else:
            await _cancel(user)
            end = _timed_out(defn, hist.run_id, timeout or 0)
        if isinstance(end, RunFailed):
            retry = self._retry(defn, hist, end, user if user in done else None)
            if retry is not None:
                seq = await self._history.append(hist.run_id, [begun, retry], hist.last_seq)
                await self._schedule_retry(hist.run_id, defn, retry, seq)
                return
        await self._history.append(hist.run_id, [begun, end], hist.last_seq, notify)
        await self._finished(hist.run_id, started, end, [])

    async def _workflow_turn(self, hist: RunHistory, defn: TaskDefinition, delivery: int) -> None:
        """A DAG run's turn: append what :func:`plan_workflow_turn` decided, then start its tasks."""
        wf = defn.workflow
        assert wf is not None
        started = hist.started
        steps = wf.order()
        plan = plan_workflow_turn(hist, steps, self.host_id, delivery, utcnow(), self._late(hist, defn))
        await self._history.append(hist.run_id, plan.new, hist.last_seq, started.meta.get("notify"))
        if hist.inbox:
            self._purge_inbox(hist.run_id, hist.inbox[-1][0])
        await asyncio.gather(*(
            self._start_children(
                ParentLink(run_id=hist.run_id, task=defn.name, pos=idx, n=1),
                [ChildStart(run_id=plan.spawned[steps[idx].name], task=steps[idx].name,
                            durable=steps[idx].runs_durably, input=started.input,
                            parents={p.workflow_key: plan.done[p.workflow_key] for p in steps[idx].parents})])
            for idx in plan.to_start))
        if plan.end is not None:
            await self._finished(hist.run_id, started, plan.end, plan.unfinished)

    @staticmethod
    def _outcome(user: asyncio.Task[Any], defn: TaskDefinition) -> RunCompleted | RunFailed | RunCancelled:
        if user.cancelled():
            return RunCancelled(reason="cancelled", at=utcnow())
        exc = user.exception()
        if isinstance(exc, TaskSkipped):
            return RunCompleted(result=None, skipped=True, at=utcnow())
        if isinstance(exc, TaskCancelledByCondition):
            return RunCancelled(reason=str(exc), at=utcnow())
        if exc is not None:
            return RunFailed(error=error_info(exc), at=utcnow())
        try:
            return RunCompleted(result=defn.signature.dump_output(user.result()), at=utcnow())
        except OutputSerializationError as e:
            return RunFailed(error=error_info(e), at=utcnow())


async def _bounded(step: Any, what: str, timeout: float = _STOP_STEP_S) -> bool:
    """Run one step of a shutdown for at most ``timeout``; False (logged) if it did not finish."""
    try:
        await asyncio.wait_for(step, timeout)
        return True
    except Exception as e:
        log.warning("shutdown: %s did not finish (%s)", what, type(e).__name__ if isinstance(e, TimeoutError) else e)
        return False


_NEVER_RETRIED = (NonRetryableError, NonDeterminismError, InputValidationError, PayloadValidationError,
                  OutputSerializationError)
"""Errors a retry cannot fix: the same input, history or payload would fail the same way."""


def _cancelled_error(task: asyncio.Task[Any]) -> bool:
    return task.done() and (task.cancelled() or isinstance(task.exception(), asyncio.CancelledError))


def _time_limit(started: Any, defn: TaskDefinition) -> float | None:
    """``execution_timeout`` of a turn: the starter's, else the task's."""
    if started.execution_timeout_s:
        limit: float = started.execution_timeout_s
        return limit
    return defn.execution_timeout.total_seconds() if defn.execution_timeout else None


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
