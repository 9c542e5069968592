"""Child runs: starting them, telling their parent when they end, and cancelling runs.

A parent records what it spawns (``children_spawned``) before any child exists, so a
parent that crashes and replays starts the same children again, and starting is
idempotent: a child's first append expects an empty subject, its activation carries a
de-duplication id. A child that ends puts its outcome on the parent's inbox, then adds
one to its batch's counter; only a child that brings the counter to the batch size
wakes the parent, so a fan-out of N children costs the parent one turn, not N.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from nats.aio.client import Client as NATS

from actors.engine.child_ids import ChildStart
from actors.engine.wire import (
    HDR_BIDE_KIND,
    HDR_MSG_ID,
    TERMINAL,
    Activation,
    EventSignal,
    ParentLink,
    RunCompleted,
    RunFailed,
    RunStarted,
    Subjects,
    encode_activation,
    encode_cancel_broadcast,
    utcnow,
)
from actors.observe.tracing import TRACEPARENT, Tracing
from actors.store.history import HistoryLog
from actors.store.jetstream import increment
from actors.store.protocol import deliver_signal, is_signal_of, start_not_read, start_run
from actors.store.requests import Publisher

log = logging.getLogger("bide.children")


async def start_children(history: HistoryLog, pub: Publisher, subjects: Subjects, parent: ParentLink,
                         starts: list[ChildStart], tracing: Tracing | None = None) -> None:
    """Start every child that is not started yet; safe to repeat after a crash.

    Each child's trace context is the span of its start, nested under the parent's current
    (activation) span; a repeated start after a crash emits no second span.
    """

    async def one(c: ChildStart) -> None:
        meta = dict(c.meta)
        subject = subjects.queue(c.task, c.run_id)
        span = tracing.start_run(c.task, c.run_id, subject, detached=c.detached,
                                 attributes={"bide.parent_run_id": parent.run_id}) if tracing else None
        if span is not None and span.traceparent:
            meta[TRACEPARENT] = span.traceparent
        started = RunStarted(run_id=c.run_id, task=c.task, durable=c.durable, input=c.input, at=utcnow(),
                             execution_timeout_s=c.execution_timeout_s, meta=meta, parent=parent,
                             parents=c.parents, start_id=f"spawn:{parent.run_id}:{parent.pos}",
                             additional_metadata=c.additional_metadata)
        # A replay after a crash starts the same child again: the same start id makes it a no-op
        # (and its activation is ignored by the host once the child has begun).
        if await start_run(history, pub, subjects, started) is None and span is not None:
            span.discard()
        elif span is not None:
            span.end()

    await asyncio.gather(*(one(c) for c in starts))


def outcome_of(terminal: Any) -> dict[str, Any]:
    """What a parent learns of a child's end (the payload of its ``child`` signal)."""
    if isinstance(terminal, RunCompleted):
        return {"status": "completed", "result": terminal.result, "skipped": bool(terminal.skipped)}
    if isinstance(terminal, RunFailed):
        return {"status": "failed", "error": terminal.error.model_dump()}
    return {"status": "cancelled", "reason": terminal.reason}


async def notify_parent(nc: NATS, pub: Publisher, subjects: Subjects, run_id: str, parent: ParentLink,
                        terminal: Any) -> None:
    """No signal is lost: the outcome is on the parent's inbox before the counter moves."""
    sig = EventSignal(source="child", name=run_id, payload=outcome_of(terminal), event_id=run_id,
                      wait_id=f"{parent.run_id}:{parent.pos}", at=utcnow())
    # A duplicate (a redelivered child) is acknowledged with the first copy's sequence.
    data = sig.model_dump_json().encode()
    seq = await pub.publish(subjects.inbox(parent.run_id), data, {HDR_MSG_ID: f"child:{run_id}"},
                            same=is_signal_of(pub, subjects, parent.run_id, data))
    total = await increment(nc, subjects.counter(parent.run_id, parent.pos))
    if total >= parent.n:
        act = Activation(run_id=parent.run_id, task=parent.task, kind="signal", inbox_seq=seq)
        await pub.publish(subjects.queue(parent.task, parent.run_id), encode_activation(act), {HDR_BIDE_KIND: "signal"})


async def live_run_task(nc: NATS, history: HistoryLog, subjects: Subjects, run_id: str) -> str | None:
    """The task of a run that has not finished, ``None`` if it has; ``LookupError`` if there is no such run."""
    started = await history.read_first(run_id)
    if started is None:
        found = await start_not_read(nc, subjects, run_id)  # queued (its start not recorded yet), or none
        if found is None:
            raise LookupError(run_id)
        if isinstance(found, RunStarted):
            return found.task
        hist = await history.read(run_id, history_seq=found)
        return None if hist.terminal is not None else hist.started.task
    last = await history.read_last_latest(run_id)  # not a follower's older view: a run not ended yet
    if any(isinstance(e, TERMINAL) for e in last):
        return None
    if not isinstance(started, RunStarted):
        raise ValueError(f"run {run_id}'s history does not begin with its start")
    return started.task


async def request_cancel(nc: NATS, pub: Publisher, history: HistoryLog, subjects: Subjects, run_id: str,
                         reason: str, task: str | None = None, event_id: str | None = None) -> bool:
    """Ask a run to stop: durably (its inbox, then an activation) and at once (a broadcast to hosts).

    Returns ``False`` if the run had already finished, and raises ``LookupError`` if it does not exist.
    ``event_id`` names the request, so that one made again (a parent's end redone) is stored once.
    """
    if task is None:
        task = await live_run_task(nc, history, subjects, run_id)
        if task is None:
            return False
    elif any(isinstance(e, TERMINAL) for e in await history.read_last_latest(run_id)):
        return False
    sig = EventSignal(source="cancel", name="cancel", payload={"reason": reason}, event_id=event_id or uuid.uuid4().hex,
                      at=utcnow())
    await deliver_signal(pub, subjects, run_id, task, sig, msg_id=f"cancel:{sig.event_id}")
    await nc.publish(subjects.cancel_broadcast, encode_cancel_broadcast(run_id, reason))
    return True
