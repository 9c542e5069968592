"""What a match becomes: signals to the waiting runs (with their activations), or a run an event starts.

Each is prepared here and written by :class:`actors.hosting.router_effects.Effects` in its order,
after the batch: nothing here writes by itself. What cannot be written (a signal over the
server's max payload, a payload that cannot be encoded) is a recorded rejection.
"""

from __future__ import annotations

import uuid
from typing import Any

from nats.aio.client import Client as NATS

from actors.engine.wait_index import IncomingEvent, PendingWaitEntry
from actors.engine.wire import (
    HDR_BIDE_KIND,
    HDR_MSG_ID,
    Activation,
    EventSignal,
    RunStarted,
    Subjects,
    TriggerRegistration,
    utcnow,
)
from actors.hosting.router_effects import Effects
from actors.observe.tracing import TRACEPARENT, Tracing, span_context_of
from actors.store.history import HistoryLog
from actors.store.protocol import start_run
from actors.store.requests import Publisher
from sdk.limits import string_metadata

SIGNAL_HEADROOM = 1024
"""Bytes kept free under the server's max payload for headers (a signal is rejected above it)."""
_RUN_NAMESPACE = uuid.UUID("5b0c1f0e-7d1c-4b47-9a55-2b1de0b1de00")
_NOT_METADATA = frozenset({TRACEPARENT})
"""Event metadata a started run does not inherit: the trace context travels on its own."""


class Deliveries:
    """Turns the router's matches into effects."""

    def __init__(self, nc: NATS, subjects: Subjects, publisher: Publisher, history: HistoryLog,
                 tracing: Tracing) -> None:
        self._nc = nc
        self._s = subjects
        self._pub = publisher
        self._history = history
        self._tracing = tracing

    @property
    def _limit(self) -> int:
        """The most a signal or a start may hold: the server's max payload (read at each use), less headroom."""
        return int(self._nc.max_payload) - SIGNAL_HEADROOM

    def signals(self, waits: list[PendingWaitEntry], event: IncomingEvent, effects: Effects,
                subject: str = "") -> bool:
        """Signals to the runs' inboxes, then their activations; False (recorded) if they cannot be written."""
        prepared: list[tuple[PendingWaitEntry, bytes]] = []
        for w in waits:
            sig = EventSignal(
                source="event", name=event.key, payload=event.payload, event_id=event.event_id,
                wait_id=w.wait_id, cond=w.cond, scope=event.scope, event_seq=event.seq, at=event.at,
                meta=event.meta,
            )
            try:
                data = sig.model_dump_json().encode()
            except Exception as e:
                effects.reject(event.seq, subject or self._s.event(event.key, event.scope),
                               f"the event cannot be delivered: {type(e).__name__}: {e}")
                return False
            if len(data) > self._limit:
                effects.reject(event.seq, subject or self._s.event(event.key, event.scope),
                               f"the event's signal is {len(data)} bytes, over the {self._limit} a delivery may hold")
                return False
            prepared.append((w, data))
        for w, data in prepared:
            # De-duplication ids make a redone batch harmless.
            effects.signal(self._s.inbox(w.run_id), data, {HDR_MSG_ID: f"sig:{w.cid}:{event.seq}"},
                           self._s.queue(w.task, w.run_id), Activation(run_id=w.run_id, task=w.task, kind="signal"),
                           {HDR_BIDE_KIND: "signal", HDR_MSG_ID: f"act:{w.cid}:{event.seq}"},
                           event_seq=event.seq, wait_id=w.wait_id)
        return True

    def start(self, trig: TriggerRegistration, event: IncomingEvent, subject: str, effects: Effects) -> None:
        """Exactly one run per (event, task): its id derives from the event, its first append expects none."""
        run_id = uuid.uuid5(_RUN_NAMESPACE, f"{trig.task}|{event.event_id}|{event.seq}").hex
        meta: dict[str, Any] = {"trigger": {"event_key": event.key, "event_id": event.event_id,
                                            "scope": event.scope}}
        if TRACEPARENT in event.meta:
            meta[TRACEPARENT] = event.meta[TRACEPARENT]
        # The run inherits the event's metadata: its string values only (an event's may be any JSON).
        started = RunStarted(run_id=run_id, task=trig.task, durable=trig.durable, input=event.payload,
                             at=utcnow(), meta=meta, start_id=f"trigger:{event.event_id}:{event.seq}",
                             additional_metadata=string_metadata(event.meta, _NOT_METADATA))
        try:
            size = len(started.model_dump_json())
        except Exception as e:
            effects.reject(event.seq, subject, f"cannot start {trig.task!r}: {type(e).__name__}: {e}")
            return
        if size > self._limit:
            effects.reject(event.seq, subject, f"cannot start {trig.task!r}: its input is {size} bytes")
            return
        effects.starts.append(lambda: self._start_run(trig, event, run_id, started))
        # Published after the start is durable (a failed start fails the flush before it).
        effects.outcomes.append(effects.outcome(event.seq, run_id, trig.task, "started"))

    async def _start_run(self, trig: TriggerRegistration, event: IncomingEvent, run_id: str,
                         started: RunStarted) -> None:
        subject = self._s.queue(trig.task, run_id)
        # The run joins the event's trace (a `nats pub` with a traceparent header too).
        span = self._tracing.start_run(trig.task, run_id, subject, parent=span_context_of(event.meta.get(TRACEPARENT)),
                                       attributes={"bide.event.key": event.key, "bide.event.id": event.event_id})
        if span.traceparent:
            started = started.model_copy(update={"meta": {**started.meta, TRACEPARENT: span.traceparent}})

        # One start per (event, task): a batch redone after a crash starts the same run, a no-op.
        if await start_run(self._history, self._pub, self._s, started) is None:
            span.discard()
        else:
            span.end()
