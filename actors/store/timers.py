"""Durable timers: scheduled JetStream messages (ADR-51) that fire activations into WORK."""

from __future__ import annotations

from datetime import datetime, timedelta

from nats.js import JetStreamContext

from actors.engine.wire import (
    HDR_BIDE_DUE,
    HDR_BIDE_KIND,
    HDR_SCHEDULE,
    HDR_SCHEDULE_TARGET,
    Activation,
    Clock,
    RunRemovals,
    Subjects,
    encode_activation,
    rfc3339,
    utcnow,
)
from actors.store.jetstream import purge_subject
from actors.store.requests import Publisher

FIRE_LEAD = timedelta(milliseconds=400)
"""Timers fire this much before the deadline by default (a wait's timeout; a sleep's lead is longer:
``actors.engine.replay.sleep_lead``); the host finishes the last stretch locally.

The scheduler fires up to ~250 ms late, so firing early and sleeping the rest on the
host makes wake-ups precise instead of late.
"""
_MIN_AHEAD = timedelta(milliseconds=260)


def retry_key(retry: int) -> str:
    """What names retry number ``retry``'s timer subject in place of a position."""
    return f"retry{retry}"


class TimerScheduler:
    """Publishes and cancels a run's timers. One schedule subject per (run, position)."""

    def __init__(self, js: JetStreamContext, publisher: Publisher, subjects: Subjects) -> None:
        self._js = js
        self._pub = publisher
        self._subjects = subjects

    async def schedule(self, run_id: str, task: str, pos: int, wake_at: datetime, history_seq: int,
                       lead: timedelta | None = None) -> None:
        """(Re)publish the timer for ``pos``, firing ``lead`` (default :data:`FIRE_LEAD`) before ``wake_at``.

        A duplicate replaces the earlier schedule. ``history_seq`` is the append that recorded the
        sleep or wait: the woken host reads at least that far.
        """
        act = Activation(run_id=run_id, task=task, kind="timer", pos=pos, history_seq=history_seq or None)
        fire_at = wake_at - (FIRE_LEAD if lead is None else lead)
        await self._publish(self._subjects.timer(run_id, pos), task, run_id, act, max(fire_at, utcnow() + _MIN_AHEAD))

    async def schedule_retry(self, run_id: str, task: str, retry: int, at: datetime, history_seq: int) -> None:
        """Retry number ``retry`` of the run, at ``at`` (``history_seq``: the append that recorded the failure)."""
        act = Activation(run_id=run_id, task=task, kind="retry", history_seq=history_seq or None)
        await self._publish(self._subjects.timer(run_id, retry_key(retry)), task, run_id, act,
                            max(at, utcnow() + _MIN_AHEAD))

    async def schedule_removals(self, batch: str, run_ids: list[str], at: datetime) -> None:
        """The finished runs' removals, due at ``at`` (retention, DESIGN.md invariant 9), as one message.

        ``batch`` names it (a subject of its own: no other batch replaces it).
        """
        await self._schedule(self._subjects.removals_timer(batch), self._subjects.removals(batch),
                             RunRemovals(run_ids=run_ids).model_dump_json().encode(), "reap",
                             max(at, utcnow() + _MIN_AHEAD))

    async def _publish(self, subject: str, task: str, run_id: str, act: Activation, fire_at: datetime) -> None:
        await self._schedule(subject, self._subjects.work(task, run_id), encode_activation(act), act.kind, fire_at)

    async def _schedule(self, subject: str, target: str, data: bytes, kind: str, fire_at: datetime) -> None:
        headers = {HDR_SCHEDULE: f"@at {rfc3339(Clock.wall(fire_at))}", HDR_SCHEDULE_TARGET: target,
                   HDR_BIDE_KIND: kind}
        if Clock.offset:
            headers[HDR_BIDE_DUE] = rfc3339(fire_at)  # engine time, for a test environment's skip
        await self._pub.publish(subject, data, headers)

    async def cancel(self, run_id: str, pos: int) -> None:
        await purge_subject(self._js, self._subjects.work_stream, self._subjects.timer(run_id, pos))
