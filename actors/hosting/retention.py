"""Retention: a finished run is removed ``BIDE_HISTORY_RETENTION`` after it ended; a live run never is.

DESIGN.md invariant 9. The history and counter streams have no max age, so nothing of a
live run expires, however long it sleeps or waits. When a run ends, its host schedules
the run's removal: a scheduled message (ADR-51) on ``<prefix>.timers.%reaper.<batch>`` that
falls due into ``<prefix>.work.@reaper.%batch.<batch>``, holding the removals of the runs
whose ends the host carried out together (:class:`RemovalBatches`; earlier versions wrote
one per run, ``<prefix>.timers.<run>.reap`` into ``<prefix>.work.@reaper.<run>``, still
carried out). Every host pulls ``<prefix>.work.@reaper.>`` through one durable consumer.
The reaper reads the run first and removes only a finished run whose retention has
passed, so a removal that fires twice, is redelivered, or is published for a live run
changes nothing. It removes, in this order: the router registrations of waits the
run left open, the run's inbox, its children's counters, its schedules (timers, retries)
and queued activations, its records in the runs index, and last the history, so a reaper that
dies half-way finds the terminal entry again on redelivery and finishes the job.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from actors.engine.wire import RunRemoval, RunRemovals, WaitRegistered, utcnow
from actors.hosting.activation_queue import ActivationQueue, SlotPool
from actors.hosting.router import publish_registrations
from actors.store.history import HistoryLog
from actors.store.jetstream import Layout, api_request, ensure_reaper_consumer
from actors.store.requests import Publisher
from actors.store.timers import TimerScheduler

log = logging.getLogger("bide.retention")

_SLOTS = 4
"""Removals one host carries out at once (they are short: a read and a few purges)."""
_RETRY_DELAY_S = 5.0
"""A removal that failed (e.g. JetStream unavailable for a moment) is tried again after this."""
BATCH_RUNS = 100
"""The most removals one scheduled message carries (its reaper carries them out within its ack wait)."""
_REAP_AT_ONCE = 8
"""Removals of one batch carried out at once."""


class RemovalBatches:
    """Group commit of removal schedules: the ends a host carries out together share one scheduled message.

    The first removal to come is published at once; those that come while that publish is
    under way go together in the next one (at most :data:`BATCH_RUNS`), due when the last of
    them is. Each caller returns once the message holding its removal is stored, or raises
    what the publish raised, so a turn acks its activation only after its run's removal is
    durable, as when each run had a message of its own. A removal scheduled twice (a
    redelivered end) is carried out twice: the second finds the run gone.

    A scheduled message per ended run cost a trivial run's host about 14 % of its CPU and
    the server about 16 % (``python -m benchmarks.throughput``), and the server holds every
    pending schedule until it is due, a retention period later.
    """

    def __init__(self, publish: Callable[[str, list[str], datetime], Awaitable[None]]) -> None:
        self._publish = publish
        self._queue: list[tuple[str, datetime, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._names = (f"{uuid.uuid4().hex[:16]}-{n}" for n in itertools.count())
        """Batch names: unique to this process, so no batch's schedule replaces another's."""

    async def add(self, run_id: str, due: datetime) -> None:
        """Schedule ``run_id``'s removal at ``due`` (or a little later, with its batch); durable on return."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append((run_id, due, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:BATCH_RUNS], self._queue[BATCH_RUNS:]
            run_ids = list(dict.fromkeys(run_id for run_id, _, _ in batch))
            try:
                await self._publish(next(self._names), run_ids, max(due for _, due, _ in batch))
            except Exception as e:
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(e)
            else:
                for _, _, done in batch:
                    if not done.done():
                        done.set_result(None)


class Reaper:
    """Schedules a finished run's removal and carries it out when it falls due."""

    def __init__(self, nc: NATS, publisher: Publisher, layout: Layout, history: HistoryLog, timers: TimerScheduler,
                 retention_s: float) -> None:
        self._nc = nc
        self._pub = publisher
        self._layout = layout
        self._history = history
        self._timers = timers
        self.retention = timedelta(seconds=retention_s)
        self._batches = RemovalBatches(timers.schedule_removals)

    async def queue(self, js: JetStreamContext) -> ActivationQueue:
        """This host's share of the removals that fall due (one durable consumer, pulled by every host)."""
        consumer = await ensure_reaper_consumer(js, self._layout)
        stream = self._layout.subjects.work_stream
        return ActivationQueue(self._nc, stream, consumer, SlotPool(_SLOTS), self.handle,
                               create=partial(ensure_reaper_consumer, js, self._layout))

    async def schedule(self, run_id: str, terminal: Any) -> None:
        """The run ended with ``terminal``: its removal falls due one retention period later.

        The due time comes from the terminal entry, so a host that schedules it again (the
        end's activation was redelivered) schedules the same thing.
        """
        await self._batches.add(run_id, terminal.at + self.retention)

    async def handle(self, msg: Msg) -> None:
        """Removals that fell due (a batch, or one run's): carry them out, then ack (a failure is retried later)."""
        try:
            if msg.subject.startswith(self._layout.subjects.removals("")):
                run_ids = RunRemovals.model_validate_json(msg.data).run_ids
            else:
                run_ids = [RunRemoval.model_validate_json(msg.data).run_id]
        except ValueError:
            log.error("dropping malformed removal on %s (%d bytes)", msg.subject, len(msg.data))
            await msg.term()
            return
        for i in range(0, len(run_ids), _REAP_AT_ONCE):
            part = run_ids[i:i + _REAP_AT_ONCE]
            outcomes = await asyncio.gather(*(self.reap(run_id) for run_id in part), return_exceptions=True)
            failed = [(run_id, e) for run_id, e in zip(part, outcomes, strict=True) if isinstance(e, BaseException)]
            if failed:
                run_id, e = failed[0]
                log.error("removing run %s failed (%s: %s); will retry its batch", run_id, type(e).__name__, e)
                await msg.nak(delay=_RETRY_DELAY_S)
                return
            if i + _REAP_AT_ONCE < len(run_ids):
                await msg.in_progress()  # a batch may take longer than the ack wait
        await msg.ack()

    async def reap(self, run_id: str) -> str:
        """Remove the run if it is finished and its retention has passed; says what it did.

        ``"removed"``, ``"gone"`` (nothing left: removed before, or never existed), ``"live"``
        (not finished: kept, DESIGN.md invariant 9) or ``"not due"`` (rescheduled for later).
        """
        hist = await self._history.read(run_id)
        if hist.terminal is None:
            # Not ended, or gone, as this replica has it: a follower behind shows no history (or one
            # not ended yet), and the removal would be dropped, the run kept for good. An end seen
            # is final; anything else is asked as far as the leader has it.
            hist = await self._history.read_latest(run_id)
        if not hist.entries:
            return "gone"
        terminal = hist.terminal
        if terminal is None:
            # A run that has not ended is never removed; its own end schedules its removal.
            log.warning("not removing run %s: it has not finished", run_id)
            return "live"
        due = terminal.at + self.retention
        if due > utcnow():
            # Early (this host keeps runs longer than the one that scheduled it): wait for our due time.
            await self.schedule(run_id, terminal)
            return "not due"
        s = self._layout.subjects
        task = hist.started.task
        for wait in hist.entries:
            if isinstance(wait, WaitRegistered):
                # Their hosts withdrew them as they ended; this covers any withdrawal that never landed.
                await publish_registrations(self._pub, self._layout, wait, run_id, task, None, "cancel")
        await self._purge(s.history_stream, s.inbox(run_id))
        await self._purge(s.counters_stream, s.run_counters(run_id))
        await self._purge(s.work_stream, s.run_timers(run_id))
        await self._purge(s.work_stream, s.run_work(run_id))
        await self._purge(s.queue_stream, s.run_queue(run_id))
        await self._purge(s.runs_stream, s.run_records(task, run_id))
        await self._purge(s.history_stream, s.history(run_id))  # last: until now a redelivery starts over
        log.info("removed run %s (ended %s, retention %s)", run_id, terminal.at.isoformat(), self.retention)
        return "removed"

    async def _purge(self, stream: str, subject: str) -> None:
        await api_request(self._nc, f"$JS.API.STREAM.PURGE.{stream}", {"filter": subject})
