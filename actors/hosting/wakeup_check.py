"""The wake-up check: a parked run whose timer the server lost is woken all the same.

A sleep, a wait's timeout and a retry's backoff wake their run through a scheduled message in
the work stream (:mod:`actors.store.timers`), derived from the history, which is the truth.
Whatever removed that message left the run parked for ever: an operator's ``nats stream rm``
or ``nats stream purge`` of the work stream (the hosts create it again, empty), or a
``Nats-Rollup: all`` header published on a work subject by anyone allowed to publish there
(nats-server makes a stream with schedules accept rollups; a server started without
permissions, as ``bide dev`` starts one, lets everyone).

Every ``interval_s`` (jittered) one host takes the pass (a message on ``<prefix>.runs.@wakeups``,
stored only when there is none, that expires after ``interval_s``: whichever host stores it
checks) and reads the runs index's live records and, for each run, the last message of its
history. A run whose history moved since this host last looked is read whole and its timers'
wake-ups found (:func:`actors.engine.decisions.expected_wakeups`). A wake-up more than
``interval_s`` overdue whose timer is not on its subject, with nothing queued for the run
(a fired timer's activation, a turn under way) and a history the stream's leader says has
not moved, is lost: its timer is scheduled again, to fire now, once per history state.

What it cannot see: a run whose live record is not in the index (its write is best effort),
and a run whose history is gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.js.errors
from nats.aio.client import Client as NATS

from actors.engine.decisions import Wakeup, expected_wakeups
from actors.engine.wire import HDR_SCHEDULE_TARGET, HDR_TTL, parse_time, utcnow
from actors.hosting.periodic import Periodic
from actors.hosting.retention import Reaper
from actors.store.history import HistoryLog
from actors.store.jetstream import (
    ERR_WRONG_LAST_SEQUENCE,
    MULTI_LAST_MAX,
    Layout,
    api_request,
    direct_get_last,
    direct_get_last_many,
    leader_get,
    leader_next,
)
from actors.store.protocol import publish_start_activation
from actors.store.requests import Publisher
from actors.store.runs_index import ENDED, HDR_EXPECTED_SEQ, LIVE, IndexedRun, records
from actors.store.timers import TimerScheduler, retry_key

log = logging.getLogger("bide.wakeups")


@dataclass(slots=True)
class _Known:
    """What this host last read of a live run: the sequence of its last history message and its wake-ups
    (kept small: the host holding the pass keeps one per live run)."""

    seq: int
    wakeups: tuple[Wakeup, ...]
    rearmed: bool = False
    """A lost wake-up was armed again at this state of the history (not again until it moves)."""


class WakeupCheck:
    """Arms again the timers of parked runs whose wake-ups are overdue and nowhere on their way."""

    def __init__(self, nc: NATS, publisher: Publisher, layout: Layout, history: HistoryLog,
                 timers: TimerScheduler, reaper: Reaper, interval_s: float, host_id: str) -> None:
        self._reaper = reaper
        self._nc = nc
        self._pub = publisher
        self._s = layout.subjects
        self._history = history
        self._timers = timers
        self._interval = interval_s
        self._host_id = host_id
        self._known: dict[str, _Known] = {}
        self._rounds = Periodic("bide-wakeup-check", interval_s, self._round, log, "the wake-up check")
        self.rearmed = 0
        """Wake-ups this host armed again (for tests and ``bide status``)."""
        self.removed = 0
        """Finished runs this host removed because their removal's schedule was lost."""
        self.passes = 0

    def start(self) -> WakeupCheck:
        self._rounds.start()
        return self

    async def stop(self) -> None:
        await self._rounds.stop()

    async def _round(self) -> None:
        if await self._take_the_pass():
            await self.check()
            await self.overdue_removals()

    async def overdue_removals(self) -> int:
        """Removes finished runs whose retention passed more than an interval ago (their removal's
        schedule was lost with the work stream); returns how many. Reads the ended records from
        the earliest and stops at the first not yet overdue: one small read when all is well."""
        now = utcnow()
        removed = 0
        async for rec in records(self._nc, self._s, ENDED, batch=64):  # small: usually the first is not due
            if rec.ended_at is None or (now - rec.ended_at - self._reaper.retention).total_seconds() <= self._interval:
                break
            did = await self._reaper.reap(rec.run_id)
            if did == "removed":
                log.warning("run %s (task %r): ended %s and was still kept (its removal's schedule was lost with "
                            "the work stream); removed", rec.run_id, rec.task, rec.ended_at.isoformat())
                removed += 1
            elif did == "gone":  # a record left by a write that landed after the run's removal
                await api_request(self._nc, f"$JS.API.STREAM.PURGE.{self._s.runs_stream}",
                                  {"filter": self._s.run_records(rec.task, rec.run_id)})
        self.removed += removed
        return removed

    async def _take_the_pass(self) -> bool:
        """Whether this host checks this round: it stored the round's marker, which no other host holds.

        The host that holds the marker keeps it (it replaces its own each round): its cache of
        what it read stays warm, where a new holder reads every live run's history whole once.
        Another host takes it over once it is older than two intervals (its holder stopped or
        died; it expires after three), as it does a marker someone published by hand with no
        ``Nats-TTL``, which would otherwise stop every round for ever.
        """
        s = self._s
        marker = await direct_get_last(self._nc, s.runs_stream, s.wakeup_pass)
        expected = 0
        if marker is not None:
            headers = marker.headers or {}
            stored = parse_time(headers.get("Nats-Time-Stamp"))
            mine = marker.data == self._host_id.encode()
            if not mine and (datetime.now(UTC) - stored).total_seconds() < 2 * self._interval:  # wall clocks
                return False  # another host's rounds
            expected = int(headers.get("Nats-Sequence", "0"))
        headers = {HDR_EXPECTED_SEQ: str(expected), HDR_TTL: f"{max(1, round(3 * self._interval))}s"}
        try:
            await self._pub.publish(s.wakeup_pass, self._host_id.encode(), headers)
        except nats.js.errors.APIError as e:
            if e.err_code == ERR_WRONG_LAST_SEQUENCE:
                return False  # another host has this round
            raise
        return True

    async def check(self) -> int:
        """One pass over the live runs; returns how many lost wake-ups it armed again."""
        now = utcnow()
        live: set[str] = set()
        rearmed = 0
        batch: list[IndexedRun] = []
        async for rec in records(self._nc, self._s, LIVE):
            live.add(rec.run_id)
            batch.append(rec)
            if len(batch) == MULTI_LAST_MAX:
                rearmed += await self._check_batch(batch, now)
                batch = []
        if batch:
            rearmed += await self._check_batch(batch, now)
        for run_id in self._known.keys() - live:
            del self._known[run_id]  # ended, or removed
        self.passes += 1
        self.rearmed += rearmed
        return rearmed

    async def _check_batch(self, runs: list[IndexedRun], now: datetime) -> int:
        s = self._s
        # Any replica may answer: a lost wake-up is confirmed with the leader before anything is done.
        lasts = await direct_get_last_many(self._nc, s.history_stream, [s.history(r.run_id) for r in runs])
        rearmed = 0
        for rec in runs:
            last = lasts.get(s.history(rec.run_id))
            if last is None:
                continue  # queued (its start is on the queue), or removed
            seq = int((last.headers or {}).get("Nats-Sequence", "0"))
            known = self._known.get(rec.run_id)
            if known is None or known.seq != seq:
                hist = await self._history.read(rec.run_id, history_seq=seq)
                known = self._known[rec.run_id] = _Known(hist.last_seq, tuple(expected_wakeups(hist)))
            if known.rearmed:
                continue
            for w in known.wakeups:
                if (now - w.at).total_seconds() <= self._interval:
                    break  # sorted: the rest are later
                if await self._lost(rec.run_id, rec.task, known.seq, w):
                    await self._rearm(rec.run_id, rec.task, known.seq, w)
                    known.rearmed = True
                    rearmed += 1
        return rearmed

    async def _lost(self, run_id: str, task: str, seq: int, w: Wakeup) -> bool:
        """Whether ``w`` is on its way nowhere: no timer, nothing queued, and the history as it was.

        Asked in this order, each of the stream's leader: a timer that fires between two
        questions leaves its activation queued until a turn that appends has taken it.
        """
        s = self._s
        if not w.start:
            timer = await leader_next(self._nc, s.work_stream, s.timer(run_id, _timer_key(w)))
            if timer is not None and (timer.headers or {}).get(HDR_SCHEDULE_TARGET) == s.work(task, run_id):
                return False  # late, not lost (a message there that is not its schedule, put there by hand, is not it)
        if await leader_next(self._nc, s.work_stream, s.work(task, run_id)) is not None:
            return False  # fired, waiting for a host (or its turn is under way)
        if await leader_next(self._nc, s.queue_stream, s.queue_of_run(run_id)) is not None:
            return False  # another activation will replay the run
        last = await leader_get(self._nc, s.history_stream, last_by_subj=s.history(run_id))
        return last is not None and int((last.headers or {}).get("Nats-Sequence", "0")) == seq

    async def _rearm(self, run_id: str, task: str, seq: int, w: Wakeup) -> None:
        if w.start:
            # Its start is in the history; its activation is not on the queue (purged, or deleted with it).
            log.warning("run %s (task %r): started at %s and its start activation is gone (the queue lost it: "
                        "deleted or purged); sent again", run_id, task, w.at.isoformat())
            hist = await self._history.read(run_id, history_seq=seq)
            await publish_start_activation(self._pub, self._s, hist.started, history_seq=seq)
            return
        what = f"its retry {w.retry.attempt}" if w.retry is not None else f"the timer of position {w.pos}"
        if w.certain:
            log.warning("run %s (task %r): %s was due at %s and is gone (the work stream lost it: deleted, "
                        "purged, or a rollup published there); armed again", run_id, task, what, w.at.isoformat())
        else:
            # A wait for an event besides its sleep: the timer may have fired and left nothing to record.
            log.info("run %s (task %r): %s was due at %s and may have been lost; armed again (once)",
                     run_id, task, what, w.at.isoformat())
        if w.retry is not None:
            await self._timers.schedule_retry(run_id, task, w.retry.attempt, w.at, seq)
        else:
            assert w.pos is not None
            await self._timers.schedule(run_id, task, w.pos, w.at, seq)


def _timer_key(w: Wakeup) -> int | str:
    """The token that names ``w``'s timer subject (as :class:`TimerScheduler` names it)."""
    if w.retry is not None:
        return retry_key(w.retry.attempt)
    assert w.pos is not None
    return w.pos
