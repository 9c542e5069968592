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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS

from actors.history import HistoryLog
from actors.jetstream import Publisher, direct_get_first, increment
from actors.protocol import deliver_signal, start_run
from actors.tracing import TRACEPARENT, Tracing
from actors.wire import (
    HDR_BIDE_KIND,
    HDR_MSG_ID,
    TERMINAL_KINDS,
    Activation,
    EventSignal,
    ParentLink,
    RunStarted,
    Subjects,
    decode_history,
    encode_activation,
    utcnow,
)

log = logging.getLogger("bide.children")


@dataclass(frozen=True)
class ChildStart:
    """One child run to start (its id is already fixed by the parent's history)."""

    run_id: str
    task: str
    durable: bool
    input: Any
    execution_timeout_s: float | None = None
    parents: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    detached: bool = False
    """Fire-and-forget (``aio_run_no_wait``): its trace is its own, linked to the parent's."""


CHILD_ID_SEPARATOR = "~"
"""Marks a derived child id. Run ids a caller chooses and child keys may not contain it, so a
derived id can be neither taken by another run nor read two ways (``P~k~a~1~0`` is the
child at ``1, 0`` of ``P``'s child ``a``, never ``P``'s child keyed ``a~1~0``)."""


def validate_child_key(key: object) -> str:
    if not isinstance(key, str) or not key or CHILD_ID_SEPARATOR in key:
        raise ValueError(f"child_key must be a non-empty string without {CHILD_ID_SEPARATOR!r}, got {key!r}")
    return key


def child_run_id(parent_run_id: str, pos: int, index: int, key: str | None) -> str:
    """Deterministic: the same parent position (or ``child_key``) always names the same child."""
    sep = CHILD_ID_SEPARATOR
    if key is not None:
        return f"{parent_run_id}{sep}k{sep}{validate_child_key(key)}"
    return f"{parent_run_id}{sep}{pos}{sep}{index}"


def child_run_ids(parent_run_id: str, pos: int, keys: list[str | None], spawned: Mapping[str, object]) -> list[str]:
    """The ids of one spawn's children; ``ValueError`` if two would be the same run.

    Two equal child keys in one spawn, or a key this parent already used in an earlier
    spawn, would name one child twice: it would run once and report once, and the parent
    would wait for the second report forever. ``spawned`` is every child the parent has.
    """
    ids = [child_run_id(parent_run_id, pos, i, k) for i, k in enumerate(keys)]
    seen: set[str] = set()
    for rid, key in zip(ids, keys, strict=True):
        if rid in seen:
            raise ValueError(f"child_key {key!r} is given twice in one spawn of run {parent_run_id}; "
                             "each child needs its own key")
        if rid in spawned:
            raise ValueError(f"child_key {key!r} was already used by run {parent_run_id} for an earlier child "
                             f"({rid}); a key names one child per parent")
        seen.add(rid)
    return ids


async def start_children(history: HistoryLog, pub: Publisher, subjects: Subjects, parent: ParentLink,
                         starts: list[ChildStart], tracing: Tracing | None = None) -> None:
    """Start every child that is not started yet; safe to repeat after a crash.

    Each child's trace context is the span of its start, nested under the parent's current
    (activation) span; a repeated start after a crash emits no second span.
    """

    async def one(c: ChildStart) -> None:
        meta = dict(c.meta)
        subject = subjects.work(c.task, c.run_id)
        span = tracing.start_run(c.task, c.run_id, subject, detached=c.detached,
                                 attributes={"bide.parent_run_id": parent.run_id}) if tracing else None
        if span is not None and span.traceparent:
            meta[TRACEPARENT] = span.traceparent
        started = RunStarted(run_id=c.run_id, task=c.task, durable=c.durable, input=c.input, at=utcnow(),
                             execution_timeout_s=c.execution_timeout_s, meta=meta, parent=parent,
                             parents=c.parents, start_id=f"spawn:{parent.run_id}:{parent.pos}")
        # A replay after a crash starts the same child again: the same start id makes it a no-op
        # (and its activation is ignored by the host once the child has begun).
        if await start_run(history, pub, subjects, started) is None and span is not None:
            span.discard()
        elif span is not None:
            span.end()

    await asyncio.gather(*(one(c) for c in starts))


def outcome_of(terminal: Any) -> dict[str, Any]:
    """What a parent learns of a child's end (the payload of its ``child`` signal)."""
    if terminal.k == "run_completed":
        return {"status": "completed", "result": terminal.result, "skipped": bool(terminal.skipped)}
    if terminal.k == "run_failed":
        return {"status": "failed", "error": terminal.error.model_dump()}
    return {"status": "cancelled", "reason": terminal.reason}


async def notify_parent(nc: NATS, pub: Publisher, subjects: Subjects, run_id: str, parent: ParentLink,
                        terminal: Any) -> None:
    """No signal is lost: the outcome is on the parent's inbox before the counter moves."""
    sig = EventSignal(source="child", name=run_id, payload=outcome_of(terminal), event_id=run_id,
                      wait_id=f"{parent.run_id}:{parent.pos}", at=utcnow())
    # A duplicate (a redelivered child) is acknowledged with the first copy's sequence.
    seq = await pub.publish(subjects.inbox(parent.run_id), sig.model_dump_json().encode(),
                            {HDR_MSG_ID: f"child:{run_id}"})
    total = await increment(nc, subjects.counter(parent.run_id, parent.pos))
    if total >= parent.n:
        act = Activation(run_id=parent.run_id, task=parent.task, kind="signal", inbox_seq=seq)
        await pub.publish(subjects.work(parent.task, parent.run_id), encode_activation(act), {HDR_BIDE_KIND: "signal"})


async def live_run_task(nc: NATS, history: HistoryLog, subjects: Subjects, run_id: str) -> str | None:
    """The task of a run that has not finished, ``None`` if it has; ``LookupError`` if there is no such run."""
    first = await direct_get_first(nc, subjects.history_stream, subjects.history(run_id))
    if first is None:
        raise LookupError(run_id)
    last = await history.read_last(run_id)
    if any(e.k in TERMINAL_KINDS for e in last):
        return None
    task: str = decode_history(first.data)[0].task
    return task


async def request_cancel(nc: NATS, pub: Publisher, history: HistoryLog, subjects: Subjects, run_id: str,
                         reason: str, task: str | None = None) -> bool:
    """Ask a run to stop: durably (its inbox, then an activation) and at once (a broadcast to hosts).

    Returns ``False`` if the run had already finished, and raises ``LookupError`` if it does not exist.
    """
    if task is None:
        task = await live_run_task(nc, history, subjects, run_id)
        if task is None:
            return False
    elif any(e.k in TERMINAL_KINDS for e in await history.read_last(run_id)):
        return False
    sig = EventSignal(source="cancel", name="cancel", payload={"reason": reason}, event_id=uuid.uuid4().hex,
                      at=utcnow())
    await deliver_signal(pub, subjects, run_id, task, sig, msg_id=f"cancel:{sig.event_id}")
    await nc.publish(subjects.cancel_broadcast, run_id.encode())
    return True
