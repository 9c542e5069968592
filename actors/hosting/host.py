"""The actor host: pulls activations, runs one turn per activation, appends, acks.

A turn rebuilds the run from its history, drives the user coroutine to its next
suspension (or its end), appends what happened under the single-writer guard,
publishes any timers, and only then acks the activation (no signal is lost).
This module decides which turn an activation is (a start, a redelivery, a run that
ended, a signal the code need not see); ``turns.py`` runs the code, and
``turn_effects.py`` carries out what the engine decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.msg import Msg

from actors.engine.commands import (
    Append,
    NotifyParent,
    PurgeInbox,
    RunEnd,
    end_of_run,
    inbox_upto,
    redo_last_turn,
    unfinished_children,
)
from actors.engine.dag import workflow_shape
from actors.engine.decisions import claim_under_way, failed_attempts, is_suspended, needs_user_code
from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    HDR_TTL,
    Activation,
    ActivationBegun,
    RunFailed,
    RunStarted,
    SignalReceived,
    TriggerRegistration,
    decode_activation,
    decode_cancel_broadcast,
    utcnow,
)
from actors.hosting.activation_queue import ActivationQueue, SlotPool
from actors.hosting.collector import ResidentRuns, tune_collector
from actors.hosting.heartbeat import Heartbeat
from actors.hosting.inbox_sweeper import InboxSweeper, ensure_inbox_sweeper_consumer
from actors.hosting.retention import Reaper
from actors.hosting.router_partitions import RouterPartitions
from actors.hosting.stream_guard import StreamGuard
from actors.hosting.turn_effects import RunWriter, TurnEffects
from actors.hosting.turns import TurnRunner, error_info
from actors.hosting.wakeup_check import WakeupCheck
from actors.hosting.warm_runs import WarmRun, WarmRuns
from actors.observe.tracing import Tracing
from actors.store.history import CorruptHistoryError, HistoryConflict, HistoryLog, decode_stored
from actors.store.jetstream import (
    Layout,
    NatsUnavailableError,
    connect,
    direct_get_last,
    ensure_streams,
    ensure_task_consumers,
    is_transient,
    retry_transient,
    task_consumer_config,
)
from actors.store.protocol import queued_start
from actors.store.requests import Publisher, times_delivered
from actors.store.timers import TimerScheduler
from sdk.errors import (
    DeliveryLimitExceeded,
    HistoryTooLargeError,
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
_TURN_QUERY_S = 1.0
"""How long a host waits for an answer to "is a turn of this run running code?" (none: no turn is)."""
_STOP_STEP_S = 5.0
_START_RETRY_S = 60.0
"""How long a starting host retries JetStream set-up through infrastructure errors before it gives up."""
_APPEND_RETRY_S = 15.0
"""An append that times out or meets a 503 is repeated this long before the turn is retried."""
_INFRA_RETRY_FIRST_S = 0.1
_INFRA_RETRY_MAX_S = 5.0
_INFRA_RETRY_BUDGET_S = 60.0
"""How long a host retries a turn that hits infrastructure errors before handing it back (a nak)."""


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
        self._shapes = {t.name: workflow_shape(t.name, t.workflow.order()) for t in tasks
                        if t.workflow is not None and t is t.workflow.runner}
        """What this host advertises of each workflow it serves (the web UI draws a run's DAG from it)."""
        self.slots = SlotPool(slots)
        self.durable_slots = SlotPool(durable_slots, lend_bytes=config.warm_bytes)
        self._grace = shutdown_grace_s
        self._nc: NATS | None = None
        self._queues: list[ActivationQueue] = []
        self._locks: dict[str, asyncio.Lock] = {}
        """One per run with activations here: its turns on this host go one at a time."""
        self._lock_users: dict[str, int] = {}
        """How many activations of each run hold or wait for its lock (the lock goes with the last)."""
        self._heartbeat: Heartbeat | None = None
        self._publisher: Publisher | None = None
        self._route_events = route_events
        self._sweeper: InboxSweeper | None = None
        self.stream_guard: StreamGuard | None = None
        self.wakeups: WakeupCheck | None = None
        self.router: RouterPartitions | None = None
        self._effects: TurnEffects | None = None
        self._warm = WarmRuns(config.warm_runs, config.warm_bytes)
        self._runner: TurnRunner | None = None
        self.turns = 0
        self._serving = False
        """Set once every consumer is bound and pulling; cleared when a stop begins."""
        self.lost: NatsUnavailableError | None = None
        """Why the server closed this host's connection for good, if it did (the host then stops)."""
        self.connection_lost = asyncio.Event()

    async def start(self) -> None:
        tune_collector(self.config.gc_threshold)
        if self.config.gc_threshold > 0:
            self.durable_slots.on_lent = ResidentRuns().changed
        self._nc = nc = await connect(self.config.nats_url, name=self.host_id,
                                      connect_timeout=self.config.connect_timeout_s, auth=self.config.nats_auth,
                                      closed_cb=self._on_closed)
        js = nc.jetstream(timeout=10.0)
        # A cluster that is still electing leaders (or lost a node) answers with timeouts and 503s
        # for a while: every set-up step below is idempotent, so it is retried, not fatal.
        await retry_transient("setting up the streams", lambda: ensure_streams(js, self.layout), _START_RETRY_S)
        self._publisher = await Publisher(nc).start()
        self._history = HistoryLog(nc, self._publisher, self.layout.subjects, retry_s=_APPEND_RETRY_S)
        # Long turns tell JetStream they are alive, so only a dead host's work is redelivered.
        self._heartbeat = Heartbeat(self.config.nats_url, max(0.2, self.layout.ack_wait_s / 3),
                                    name=f"{self.host_id}/heartbeat", connect_timeout=self.config.connect_timeout_s,
                                    auth=self.config.nats_auth, answers=self.layout.subjects.turn_query)
        await self._heartbeat.start()
        self._timers = TimerScheduler(js, self._publisher, self.layout.subjects)
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
                                      self.config.payload_limits, host_id=self.host_id, describe=self.describe,
                                      shapes=self._shapes)
            self.router = await retry_transient("starting the event router", router.start, _START_RETRY_S)
        for t in self._tasks.values():
            consumer: str = await retry_transient(f"the consumers of {t.name}", partial(
                ensure_task_consumers, js, self.layout, t.name, t.durable), _START_RETRY_S)
            pool = self.durable_slots if t.runs_durably else self.slots
            for stream in self.layout.subjects.activation_streams:  # one pool: the slots bound both
                create = partial(js.add_consumer, stream, task_consumer_config(self.layout, t.name, t.durable, stream))
                self._queues.append(ActivationQueue(nc, stream, consumer, pool, self._handle, create=create))
        self._reaper = Reaper(nc, self._publisher, self.layout, self._history, self._timers,
                              self.config.history_retention_s)
        self._effects = TurnEffects(nc, self._publisher, self.layout, self._history, self._timers, self._reaper,
                                    self.tracing, self.durable_slots)
        self._runner = TurnRunner(self._effects, self.host_id, self._workflows, self._warm)
        self._queues.append(await retry_transient("the reaper's consumer", lambda: self._reaper.queue(js),
                                                  _START_RETRY_S))
        await retry_transient("the inbox sweeper's consumer", lambda: ensure_inbox_sweeper_consumer(nc, self.layout),
                              _START_RETRY_S)
        self._sweeper = await InboxSweeper(nc, self._publisher, self._history, self.layout,
                                           self.config.sweep_after_s).start()
        self.stream_guard = StreamGuard(nc, self.layout, self.config.stream_check_s).start()
        self.wakeups = WakeupCheck(nc, self._publisher, self.layout, self._history, self._timers, self._reaper,
                                   self.config.wakeup_check_s, self.host_id).start()
        for q in self._queues:  # every queue is counted before any pulls (scarce slots)
            await q.start()
        self._serving = True
        log.info("host %s serving %s", self.host_id, ", ".join(sorted(self._tasks)))

    async def _on_closed(self) -> None:
        """The connection is closed for good: by :meth:`stop`, or by the server (then this host stops).

        nats-py reconnects after a lost socket but gives up after a protocol error from the server
        (a line past its limit, an account's subscription limit, an expired credential). A host
        that lived on without a connection would hold its activations for ever: its heartbeat has
        a connection of its own. Stopping ends the heartbeat, and its work moves to other hosts.
        """
        if not self._serving:
            return
        why = str(self._nc.last_error) if self._nc is not None and self._nc.last_error else "no reason given"
        self.lost = NatsUnavailableError(
            f"host {self.host_id}: its NATS connection was closed by the server ({why}); the host stopped so "
            "that its work moves to other hosts. Start it again (`bide worker --processes N` restarts its "
            "children itself)")
        log.error("%s", self.lost)
        self.connection_lost.set()

    async def stop(self) -> None:
        """Graceful: stop pulling, let in-flight turns finish within the grace period, hand back the rest."""
        self._serving = False
        for q in self._queues:
            await q.stop()
        pending = set().union(*(q.in_flight for q in self._queues)) if self._queues else set()
        if pending:
            # Turns on a closed connection cannot finish: cancel them now, and their activations go
            # to other hosts once the heartbeat stops.
            _, still = await asyncio.wait(pending, timeout=0 if self.lost is not None else self._grace)
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
        self._warm.clear()  # their code is cancelled; their next turns replay, on whichever host
        # Each step is bounded: a host stopping while its server is down must still stop.
        for q in self._queues:
            await _bounded(q.close(), "closing a queue")
        if self.router is not None:
            await _bounded(self.router.stop(), "stopping the router")
        if self._sweeper is not None:
            await _bounded(self._sweeper.stop(), "stopping the inbox sweeper")
        if self.stream_guard is not None:
            await _bounded(self.stream_guard.stop(), "stopping the stream guard")
        if self.wakeups is not None:
            await _bounded(self.wakeups.stop(), "stopping the wake-up check")
        if self._effects is not None:
            await self._effects.stop(timeout=5)
        if self._heartbeat is not None:
            await _bounded(self._heartbeat.stop(), "stopping the heartbeat")
        if self._publisher is not None:
            await _bounded(self._publisher.close(), "closing the publisher")
        if self._nc is not None:
            # Not drain(): every queue, the router and the sweeper are closed and the turns are over, so
            # nothing is left to hand over, and a drain waited for any subscription still holding a
            # message (up to this step's bound, then an asyncio "exception was never retrieved"
            # traceback at the end of `bide dev --run`). A flush sends what was published.
            await _bounded(self._nc.flush(), "flushing the connection")
            await _bounded(self._nc.close(), "closing the connection")
        await asyncio.to_thread(self.tracing.force_flush)  # a stopped host's last spans are exported

    def describe(self) -> dict[str, Any]:
        """What ``bide status`` shows of this host: what it hosts and how busy it is."""
        return {"tasks": sorted(self._tasks), "workflows": sorted(self._workflows), "turns": self.turns,
                "warm_runs": len(self._warm),
                # Turns running now: a pull's reserved credit is not use (it read 272 of 500 with
                # nothing running).
                "slots": {"used": self.slots.busy, "of": self.slots.size},
                "durable_slots": {"used": self.durable_slots.busy,
                                  "of": self.durable_slots.size}}

    def not_ready(self) -> list[str]:
        """Why this host cannot take work now (empty when it can): for a readiness probe."""
        if self._nc is None or not self._serving:
            return ["not serving: starting (streams, consumers) or stopping"]
        if not self._nc.is_connected:
            return ["not connected to NATS (reconnecting)"]
        return []

    async def _handle(self, msg: Msg) -> None:
        heartbeat = self._heartbeat
        assert heartbeat is not None
        heartbeat.track(msg)
        delivered = times_delivered(msg)
        try:
            try:
                act = decode_activation(msg.data)
            except Exception:
                log.error("dropping malformed activation on %s (%d bytes)", msg.subject, len(msg.data))
                await msg.term()
                return
            defn = self._tasks.get(act.task)
            if defn is None:
                await msg.nak(delay=5)
                return
            lock = self._locks.setdefault(act.run_id, asyncio.Lock())
            self._lock_users[act.run_id] = self._lock_users.get(act.run_id, 0) + 1
            try:
                async with lock:
                    if delivered > self.config.max_deliveries:
                        self._warm.drop(act.run_id)  # it fails without its code
                        await self._give_up(msg, act, defn, delivered)
                    else:
                        await self._turn_retrying(msg, act, defn, delivered)
            finally:
                left = self._lock_users.pop(act.run_id) - 1
                if left:
                    self._lock_users[act.run_id] = left
                elif self._locks.get(act.run_id) is lock:
                    del self._locks[act.run_id]
        except HistoryConflict as e:
            # Single writer: another host appended first. Drop this stale view; the
            # activation comes back and is replayed from the newer history.
            log.debug("%s", e)
            await msg.nak(delay=0.05)
        except asyncio.CancelledError:
            await msg.nak()
            raise
        except CorruptHistoryError as e:
            # No redelivery can read it either: retrying forever only floods the log.
            log.error("%s. Its activation is dropped; once the message is gone, any later activation "
                      "(a signal, a cancel) resumes the run", e)
            await msg.term()
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
            # As far as the leader has it: a follower behind shows no history, and the activation
            # would be dropped with the run never failed.
            hist = await self._history.read_latest(act.run_id, history_seq=act.history_seq or 0,
                                                   inbox_seq=act.inbox_seq or 0)
        if not hist.entries or hist.terminal is not None:
            if not hist.entries:
                log.warning("dropping %s activation for run %s: delivered %d times, more than "
                            "BIDE_MAX_DELIVERIES=%d, and the run has no history", act.kind, act.run_id, delivered,
                            self.config.max_deliveries)
            if hist.terminal is not None and hist.started.parent is not None:
                await self._writer(hist, defn).carry_out([NotifyParent(hist.started.parent, hist.terminal)])
            await self._done(msg, act.run_id)
            return
        if err is None:
            err = DeliveryLimitExceeded(
                f"run {act.run_id} of task {defn.name!r}: its {act.kind} activation was delivered {delivered} "
                f"times, more than BIDE_MAX_DELIVERIES={self.config.max_deliveries}; each host that took it died "
                "or failed before finishing the turn, so the run failed without running its code again")
        log.error("%s", err)
        await self._runner_.fail_without_code(hist, defn, delivered, RunFailed(error=error_info(err), at=utcnow()))
        await self._done(msg, act.run_id)

    async def _fresh_start(self, act: Activation, started: RunStarted) -> RunHistory | None:
        """The history of a run that has only its start entry (the common first turn), in one small read.

        ``None`` when that is not known for sure: the caller reads the whole history instead.
        """
        s = self.layout.subjects
        if act.history_seq:
            # A generation's start (continue_as_new), written before its activation: fresh while the
            # switch is still the run's last message. Another activation (a signal's) may have run
            # the generation since; its code run again from here would register a wait of that
            # generation after the run went on (a registration nobody withdraws), or worse.
            last = await direct_get_last(self._nc_, s.history_stream, s.history(act.run_id))
            if last is not None and int((last.headers or {}).get("Nats-Sequence", "0")) == act.history_seq:
                return RunHistory(act.run_id, [started], act.history_seq)
            return None
        if act.start_unrecorded:
            # A start its starter left to the host (a new run id): nothing to read, nothing written
            # yet. The turn's first append writes the start ahead of its own entries, expecting an
            # empty history (RunWriter), and the activation stays on the queue until then.
            return RunHistory(act.run_id, [started], 0, start_unrecorded=True)
        last = await direct_get_last(self._nc_, s.history_stream, s.history(act.run_id))
        if last is None:
            try:  # the starter left it here, died before its append, or it is on its way: record the start
                seq = await self._history.append(act.run_id, [started], expected_seq=0)
            except HistoryConflict:
                return None
            return RunHistory(act.run_id, [started], seq)
        entries = decode_stored(last, act.run_id)
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
            await self._done(msg, act.run_id)
            return None
        if delivery == 1 and any(isinstance(e, ActivationBegun) for e in hist.entries):
            # A start sent again (a parent's replay, a retried request): the run has begun already,
            # and its own activation, if its host died, comes back by itself.
            await self._done(msg, act.run_id)
            return None
        return hist

    async def _after_first_append(self, act: Activation) -> RunHistory:
        """For an activation that found the run's history empty: the history once its first turn wrote it.

        A run started with a new id has no history until its first turn's first append, which
        writes its start (RunWriter); its start activation stays on the queue until then. While
        it is there, wait for that append as for a turn under way (:meth:`_until_settled`)
        instead of handing the activation back at once: each hand-back counts as a delivery.
        Empty if there is no such run, or the first turn has not written yet.
        """
        if await queued_start(self._nc_, self.layout.subjects, act.run_id) is None:
            # No start waits on the queue: the first append is stored, or there is no such run. A
            # replica behind shows no history for a run that has one, and an activation that came
            # back often enough (a stale read's conflicts count too) was dropped on its word: the
            # run's wake-up was lost (the stale-replica test, once in eight suite runs). The
            # leader says which.
            return await self._history.read_latest(act.run_id, history_seq=act.history_seq or 0,
                                                   inbox_seq=act.inbox_seq or 0)
        return await self._until_settled(act, RunHistory(act.run_id), _SUSPENSION_WAIT_S,
                                         lambda hist: bool(hist.entries))

    async def _until_suspended(self, act: Activation, hist: RunHistory, wait_s: float) -> RunHistory:
        """The run re-read until its code is parked (or it ended), as :meth:`_until_settled` waits."""
        return await self._until_settled(act, hist, wait_s,
                                         lambda hist: is_suspended(hist) or hist.terminal is not None)

    async def _until_settled(self, act: Activation, hist: RunHistory, wait_s: float,
                             settled: Callable[[RunHistory], bool]) -> RunHistory:
        """The run re-read until ``settled`` (a turn under way wrote what the caller waits for), for at
        most ``wait_s`` unless that turn is alive.

        What is returned was read with this host's lock of the run held. The wait lends the
        lock, and the read that saw the run settled is stale once the lock is back: a turn (here
        or on another host) may have claimed signals in between, and a history that shows its
        claim is waited for again. Returning it ran that turn's steps a second time.

        When ``wait_s`` is over and the run is still not settled, the hosts are asked whether a
        turn of the run is running its code now (:meth:`_turn_running`): if one is (a step that
        takes longer than the wait), this waits on; only a turn nobody runs (its host died) is
        left to the caller. Giving up on a live turn ran its step a second time beside it.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait_s
        while True:
            while not (settled(hist) or loop.time() >= give_up):
                async with self._lock_lent(act.run_id):
                    while not settled(hist) and loop.time() < give_up:
                        await asyncio.sleep(_SUSPENSION_POLL_S)
                        hist = await self._read(act)
                hist = await self._read(act)  # the lock again: a turn may have written meanwhile
            if settled(hist) or not await self._turn_running(act.run_id):
                return hist
            give_up = loop.time() + _SUSPENSION_WAIT_S

    async def _turn_running(self, run_id: str) -> bool:
        """Whether a turn of ``run_id`` is running its code on a live host (this one included).

        Each host's heartbeat thread answers for the turns of its host (:class:`Heartbeat`), even
        while user code blocks that host's loop. A host cut off from NATS cannot answer, and its
        activations go to other hosts after one ack wait, as a dead host's do.
        """
        try:
            await self._nc_.request(self.layout.subjects.turn_query, run_id.encode(), timeout=_TURN_QUERY_S)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return False
        return True

    @contextlib.asynccontextmanager
    async def _lock_lent(self, run_id: str) -> AsyncIterator[None]:
        """Inside, this host's lock of the run is free for another of its activations.

        An activation that waits for a turn under way (its first write, or its code to park)
        would otherwise hold the lock that turn's own activation waits for when both came to
        this host: a generation's start after a signal sent to it, each waiting out the other's
        ten seconds. The lock is taken back on the way out, even when cancelled (the caller's
        ``async with`` releases it).
        """
        lock = self._locks[run_id]
        lock.release()
        try:
            yield
        finally:
            again = asyncio.ensure_future(lock.acquire())
            try:
                await asyncio.shield(again)
            except asyncio.CancelledError:
                await again
                raise

    async def _turn(self, msg: Msg, act: Activation, defn: TaskDefinition, delivery: int) -> None:
        # A warm run of this run belongs to this turn now: its code goes on, or it is discarded.
        warm, read = await self._warm.take_for(act, delivery, self._history)
        try:
            if await self._turn_on(msg, act, defn, delivery, read, warm):
                warm = None
        finally:
            if warm is not None:
                warm.discard()

    async def _turn_on(self, msg: Msg, act: Activation, defn: TaskDefinition, delivery: int,
                       read: RunHistory | None, warm: WarmRun | None) -> bool:
        """The turn, from ``read`` if given (a warm run's view); True if ``warm`` was handed to the code."""
        began_ns = time.time_ns()
        fresh = None
        if read is None and act.kind == "start" and delivery == 1 and act.started is not None:
            fresh = await self._fresh_start(act, act.started)
        if read is not None:
            hist = read
        elif fresh is not None:
            hist = fresh  # first delivery of a start: the history is exactly the start entry
        else:
            hist = await self._read(act)
            if not hist.entries and act.kind != "start":
                hist = await self._after_first_append(act)
        if hist.size_bytes > self.config.max_history_bytes and hist.terminal is None:
            await self._give_up(msg, act, defn, delivery, HistoryTooLargeError(
                f"run {act.run_id} of task {defn.name!r}: its history holds {format_size(hist.size_bytes)}, more "
                f"than BIDE_MAX_HISTORY={format_size(self.config.max_history_bytes)}; the run failed rather than "
                "grow further (raise the limit, or keep large data outside the run and pass references)"), hist)
            return False
        if delivery > 1 and hist.entries:
            # The host of the last turn may have died between its append and the tidying after it.
            await self._writer(hist, defn).carry_out(redo_last_turn(hist, utcnow()))
        if act.kind == "start" and act.started is not None:
            began = await self._begin(msg, act, act.started, hist, delivery)
            if began is None:
                return False
            hist = began
        if not hist.entries:
            if delivery < _MISSING_HISTORY_RETRIES:
                await msg.nak(delay=0.2)
            else:
                log.warning("dropping activation for run %s: the run has no history", act.run_id)
                await self._done(msg, act.run_id)
            return False
        started = hist.started
        if hist.terminal is not None:
            await self._ended(msg, hist, defn, delivery)
            return False
        run_trace = self.tracing.run(started)
        span: Any = nullcontext()
        if run_trace is not None:
            span = run_trace.activation(kind=act.kind, subject=msg.subject, delivery=delivery,
                                        attempt=failed_attempts(hist) + 1, signals=[sig for _, sig in hist.inbox],
                                        began_ns=began_ns)
        if defn.workflow is not None and defn is defn.workflow.runner:
            self.turns += 1
            with span:
                await self._runner_.workflow(hist, defn, delivery)
            await self._ack_turn(msg, hist)
            return False
        skip_code = False
        if defn.runs_durably:
            wait_s: float | None = None
            if act.kind in ("timer", "signal") and not is_suspended(hist) and delivery == 1:
                # The code is not parked at a wait or a sleep: a turn is under way on another host
                # (it may have claimed signals and be running steps now), or one died before it
                # parked. Running the code now would run those steps twice, so wait for it to
                # park (its activation comes back if it died), then decide; running the code is
                # the last resort.
                wait_s = _SUSPENSION_WAIT_S
            else:
                # Any other activation (a redelivery, a start, a retry) that finds a fresh claim
                # standing alone waits for that turn too: the long chaos run found a redelivered
                # signal running a first turn's step again while the start's turn ran it.
                wait_s = claim_under_way(hist, utcnow(), self.layout.ack_wait_s + 1.0)
            if wait_s:
                hist = await self._until_suspended(act, hist, wait_s)
                if hist.terminal is not None:
                    await self._ended(msg, hist, defn, delivery)
                    return False
            if act.kind in ("timer", "signal"):
                skip_code = is_suspended(hist) and not needs_user_code(act, hist, delivery)
        if skip_code:
            # Nothing for the code to do (a loser of an or-group, a signal taken already, an
            # event for a wait not made yet): record any new signals, never resume the code.
            if hist.inbox:
                await self._writer(hist, defn).carry_out([
                    Append([SignalReceived(inbox_seq=q, signal=sig) for q, sig in hist.inbox]),
                    PurgeInbox(hist.inbox[-1][0])])
            await self._done(msg, act.run_id)
            return False
        self.turns += 1
        handed = False
        with span:
            if defn.runs_durably:
                handed = warm is not None and hist is read
                with self._heartbeat_.running(act.run_id):  # other hosts' activations wait for this turn
                    await self._runner_.durable(hist, defn, delivery, run_trace, warm if handed else None)
            else:
                await self._runner_.regular(hist, defn, delivery)
        await self._ack_turn(msg, hist)
        return handed

    async def _ack_turn(self, msg: Msg, hist: RunHistory) -> None:
        """The turn's activation done. Its start is in the stream before the activation leaves the
        queue (readers of a queued run rely on it): a first turn that appended nothing writes it."""
        if hist.start_unrecorded:
            await self._history.append(hist.run_id, [hist.started], expected_seq=0)
            hist.start_unrecorded = False
        await self._done(msg, hist.run_id)

    async def _done(self, msg: Msg, run_id: str) -> None:
        """The activation leaves the queue, once the tidy-ups its turn left in the background are
        done (``TurnEffects.chore``): a host killed before this ack leaves a redelivery that redoes
        them (``redo_last_turn``), one killed after it has nothing left undone."""
        await self._effects_.tidied(run_id)
        await msg.ack()

    async def _ended(self, msg: Msg, hist: RunHistory, defn: TaskDefinition, delivery: int) -> None:
        """An activation for a run that has ended: redo its wind-up (idempotent), drop what its inbox still holds."""
        terminal = hist.terminal
        assert terminal is not None
        # The host that ended it may have died before scheduling its removal, or (a redelivery)
        # before telling the parent or draining the inbox. A signal that came after the end is
        # never taken: it goes, with any taken one whose purge failed.
        # The parent's report and the children's cancels only on a redelivery: the host that ended the
        # run sent them before it acked (each is stored once, under a fixed id).
        redelivered = delivery > 1
        wind_up = end_of_run(hist.started, RunEnd(
            terminal, unfinished_children(hist.entries) if redelivered else [],
            cancels_children_on_failure=hist.started.task in self._workflows, inbox_upto=inbox_upto(hist)))
        if not redelivered:
            wind_up = [c for c in wind_up if not isinstance(c, NotifyParent)]
        await self._writer(hist, defn).carry_out(wind_up)
        await self._done(msg, hist.run_id)

    async def _on_cancel_msg(self, msg: Msg) -> None:
        if self._runner is not None:
            self._runner.cancel(*decode_cancel_broadcast(msg.data))

    def _writer(self, hist: RunHistory, defn: TaskDefinition) -> RunWriter:
        return self._effects_.writer(hist, defn.name)

    @property
    def _effects_(self) -> TurnEffects:
        assert self._effects is not None
        return self._effects

    @property
    def _heartbeat_(self) -> Heartbeat:
        assert self._heartbeat is not None
        return self._heartbeat

    @property
    def _runner_(self) -> TurnRunner:
        assert self._runner is not None
        return self._runner

    @property
    def _publisher_(self) -> Publisher:
        assert self._publisher is not None
        return self._publisher

    @property
    def _nc_(self) -> NATS:
        assert self._nc is not None
        return self._nc

async def _bounded(step: Any, what: str, timeout: float = _STOP_STEP_S) -> bool:
    """Run one step of a shutdown for at most ``timeout``; False (logged) if it did not finish."""
    try:
        await asyncio.wait_for(step, timeout)
        return True
    except Exception as e:
        log.warning("shutdown: %s did not finish (%s)", what, type(e).__name__ if isinstance(e, TimeoutError) else e)
        return False
