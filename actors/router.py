"""The event router: matches events to waits and triggers, in the events stream's order.

Events, wait registrations (and their cancellations) and trigger registrations flow
through one stream, so their order is total: an event before a registration is the
lookback's, an event after it is live (waits are race-free without locks). The
router keeps pending waits in a :class:`WaitIndex` and, for each match, delivers a
signal durably to the run's inbox and enqueues an activation; the run's host — its
single writer — records it. The router never writes a run's history, except the
first entry of a run an event starts.

One process at a time owns the router through a pinned-client priority group on
its JetStream consumer (ADR-42). A new owner rebuilds the pending waits from the
registrations still in the stream (satisfied ones are deleted) up to the consumer's
ack floor, then goes on from there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.history import HistoryConflict, HistoryLog
from actors.jetstream import ROUTER_GROUP, Layout, Publisher, api_request, direct_get_subject
from actors.tracing import TRACEPARENT, Tracing, span_context_of
from actors.wire import (
    HDR_BIDE_KIND,
    HDR_EVENT_METADATA,
    HDR_MSG_ID,
    HDR_TTL,
    NO_SCOPE,
    Activation,
    EventSignal,
    RunStarted,
    TriggerRegistration,
    WaitCondition,
    WaitRegistered,
    WaitRegistration,
    encode_activation,
    rfc3339,
    utcnow,
)
from sdk import _cel

log = logging.getLogger("bide.router")

_PULL_BATCH = 512
_PULL_EXPIRES_S = 1.0
_RUN_NAMESPACE = uuid.UUID("5b0c1f0e-7d1c-4b47-9a55-2b1de0b1de00")


class PendingWaitEntry:
    """One event condition of one wait, as the router holds it (small: it may hold millions)."""

    __slots__ = (
        "cid",
        "complete",
        "cond",
        "expression",
        "index_key",
        "key",
        "more_preds",
        "run_id",
        "run_input",
        "scope",
        "seq",
        "task",
        "wait_id",
    )

    def __init__(self, reg: WaitRegistration, seq: int) -> None:
        self.cid = f"{reg.wait_id}/{reg.cond}"
        self.wait_id = reg.wait_id
        self.cond = reg.cond
        self.run_id = reg.run_id
        self.task = sys.intern(reg.task)
        self.key = sys.intern(reg.event_key)
        self.scope = None if reg.scope is None else sys.intern(reg.scope)
        self.expression = reg.expression
        preds, self.complete = _cel.equality_predicates(reg.expression)
        self.index_key: tuple[_cel.Path, _cel.IndexValue] | None = preds[0] if preds else None
        # Kept here, not looked up again: the parse cache is bounded and waits are many.
        self.more_preds = preds[1:] or None
        self.run_input = reg.run_input
        self.seq = seq

    def matches(self, payload: Any) -> bool:
        if self.complete:
            # The expression is only equality predicates: checking them is evaluating it, ~100x cheaper.
            preds = ([self.index_key] if self.index_key is not None else []) + list(self.more_preds or ())
            for path, value in preds:
                try:
                    if _cel.index_value(_cel.lookup(payload, path)) != value:
                        return False
                except KeyError:
                    return False
            return True
        return _cel.evaluate(self.expression, payload, self.run_input)


class _Bucket:
    """The waits for one (key, scope): by one equality predicate each, or scanned."""

    __slots__ = ("by_value", "count", "scan")

    def __init__(self) -> None:
        self.by_value: dict[_cel.Path, dict[_cel.IndexValue, dict[str, PendingWaitEntry]]] = {}
        self.scan: dict[str, PendingWaitEntry] = {}
        self.count = 0

    def add(self, w: PendingWaitEntry) -> None:
        self.count += 1
        if w.index_key is None:
            self.scan[w.cid] = w
        else:
            path, value = w.index_key
            self.by_value.setdefault(path, {}).setdefault(value, {})[w.cid] = w

    def remove(self, w: PendingWaitEntry) -> None:
        self.count -= 1
        if w.index_key is None:
            self.scan.pop(w.cid, None)
            return
        path, value = w.index_key
        values = self.by_value.get(path)
        if values is None:
            return
        group = values.get(value)
        if group is not None:
            group.pop(w.cid, None)
            if not group:
                del values[value]
        if not values:
            del self.by_value[path]

    def candidates(self, payload: Any) -> Iterator[PendingWaitEntry]:
        yield from list(self.scan.values())
        for path, values in list(self.by_value.items()):
            try:
                tagged = _cel.index_value(_cel.lookup(payload, path))
            except KeyError:
                continue
            if tagged is not None and tagged in values:
                yield from list(values[tagged].values())

    def __len__(self) -> int:
        return self.count


class WaitIndex:
    """Pending waits by event key, scope and one equality predicate: an event costs O(candidates)."""

    def __init__(self) -> None:
        self.by_cid: dict[str, PendingWaitEntry] = {}
        self._buckets: dict[tuple[str, str | None], _Bucket] = {}

    def __len__(self) -> int:
        return len(self.by_cid)

    def add(self, w: PendingWaitEntry) -> None:
        if w.cid in self.by_cid:
            return
        self.by_cid[w.cid] = w
        self._buckets.setdefault((w.key, w.scope), _Bucket()).add(w)

    def remove(self, cid: str) -> PendingWaitEntry | None:
        w = self.by_cid.pop(cid, None)
        if w is not None:
            bucket = self._buckets.get((w.key, w.scope))
            if bucket is not None:
                bucket.remove(w)
                if not len(bucket):
                    del self._buckets[(w.key, w.scope)]
        return w

    def matches(self, key: str, scope: str | None, payload: Any) -> list[PendingWaitEntry]:
        """Waits satisfied by an event: same key; same scope, or a wait without scope."""
        out: list[PendingWaitEntry] = []
        for bucket_scope in (scope, None) if scope is not None else (None,):
            bucket = self._buckets.get((key, bucket_scope))
            if bucket is not None:
                out.extend(w for w in bucket.candidates(payload) if w.matches(payload))
        return out

    def clear(self) -> None:
        self.by_cid.clear()
        self._buckets.clear()


@dataclass(frozen=True)
class IncomingEvent:
    key: str
    scope: str | None
    payload: Any
    event_id: str
    seq: int
    at: datetime
    meta: dict[str, Any]


def decode_event(msg: Msg, key: str, scope: str | None, seq: int, at: datetime) -> IncomingEvent:
    """An event as published by anyone (``nats pub``, the SDK, HTTP): a JSON body, optional headers.

    A body that is not JSON (a raw ``nats pub`` of plain text) becomes a string payload.
    """
    data = msg.data
    payload: Any
    if not data:
        payload = None
    else:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = data.decode("utf-8", errors="replace")
    hdrs = msg.headers or {}
    meta: dict[str, Any] = {}
    if HDR_EVENT_METADATA in hdrs:
        try:
            meta = dict(orjson.loads(hdrs[HDR_EVENT_METADATA]))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            meta = {}
    if TRACEPARENT in hdrs:
        meta[TRACEPARENT] = hdrs[TRACEPARENT]
    event_id = hdrs.get(HDR_MSG_ID) or f"evt-{seq}"
    return IncomingEvent(key, scope, payload, event_id, seq, at, meta)


class EventRouter:
    """Consumes the events stream (when this process owns it) and delivers matches to runs."""

    def __init__(self, nc: NATS, publisher: Publisher, layout: Layout, history: HistoryLog,
                 tracing: Tracing | None = None) -> None:
        self._tracing = tracing or Tracing(layout.subjects.prefix)
        self._nc = nc
        self._pub = publisher
        self._layout = layout
        self._s = layout.subjects
        self._history = history
        self.index = WaitIndex()
        self.triggers: dict[str, TriggerRegistration] = {}
        self._pin: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[Any]] = set()
        self.events_routed = 0
        self.owner = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> EventRouter:
        self._task = asyncio.create_task(self._run(), name="bide-event-router")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)
        for t in list(self._chores):
            t.cancel()

    async def _run(self) -> None:
        api = f"$JS.API.CONSUMER.MSG.NEXT.{self._s.events_stream}.{self._s.router_consumer}"
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def _on_msg(m: Msg) -> None:
            await queue.put(m)

        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox, cb=_on_msg)
        try:
            while True:
                req: dict[str, Any] = {
                    "batch": _PULL_BATCH, "expires": int(_PULL_EXPIRES_S * 1e9), "group": ROUTER_GROUP,
                }
                if self._pin is not None:
                    req["id"] = self._pin
                await self._nc.publish(api, json.dumps(req).encode(), reply=inbox)
                received = 0
                while received < _PULL_BATCH:
                    try:
                        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel.
                        async with asyncio.timeout(_PULL_EXPIRES_S + 1.0):
                            m = await queue.get()
                    except TimeoutError:
                        break
                    status = m.headers.get("Status") if m.headers else None
                    if status is not None:
                        if status == "423":  # another process holds the pin: we are not the owner
                            self._lose_ownership()
                        if status in ("408", "409", "423", "400"):
                            break
                        continue
                    received += 1
                    try:
                        await self._on_delivery(m)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("router failed on %s; it will be redelivered", m.subject)
                        await m.nak(delay=1.0)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event router stopped")
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    def _lose_ownership(self) -> None:
        if self.owner:
            log.info("router ownership moved to another process")
        self.owner = False
        self._pin = None
        self.index.clear()
        self.triggers.clear()

    async def _on_delivery(self, m: Msg) -> None:
        pin = m.headers.get("Nats-Pin-Id") if m.headers else None
        if pin is not None and pin != self._pin:
            # Pinned: this process owns the router now. Rebuild before handling anything.
            self._pin = pin
            await self._rebuild()
            self.owner = True
            log.info("router owner: %d pending waits, %d triggers", len(self.index), len(self.triggers))
        meta = m.metadata
        seq = meta.sequence.stream
        at = meta.timestamp if isinstance(meta.timestamp, datetime) else utcnow()
        await self._apply(m, seq, at, live=True)
        await m.ack()

    async def _rebuild(self) -> None:
        """Pending waits and triggers up to the consumer's ack floor, from what the stream holds."""
        self.index.clear()
        self.triggers.clear()
        info = await api_request(
            self._nc, f"$JS.API.CONSUMER.INFO.{self._s.events_stream}.{self._s.router_consumer}", {}
        )
        floor = int(info.get("ack_floor", {}).get("stream_seq", 0))
        if floor == 0:
            return
        for subject in (self._s.triggers_all, self._s.waits_all):
            for m in await direct_get_subject(self._nc, self._s.events_stream, subject, timeout=30.0):
                seq = int((m.headers or {}).get("Nats-Sequence", "0"))
                if seq > floor:
                    break
                m.subject = (m.headers or {}).get("Nats-Subject", m.subject)
                await self._apply(m, seq, utcnow(), live=False)

    async def _apply(self, m: Msg, seq: int, at: datetime, *, live: bool) -> None:
        subject = m.subject
        if subject.startswith(f"{self._s.prefix}.waits."):
            await self._on_registration(m, seq, at, live=live)
        elif subject.startswith(f"{self._s.prefix}.triggers."):
            try:
                trig = TriggerRegistration.model_validate_json(m.data)
            except ValueError:
                log.error("ignoring malformed trigger registration on %s", subject)
                return
            self.triggers[trig.task] = trig
        else:
            parsed = self._s.parse_event_subject(subject)
            if parsed is None:
                log.warning("ignoring message on %s: not an event subject", subject)
                return
            event = decode_event(m, parsed[0], parsed[1], seq, at)
            await self._on_event(event)

    # -- waits -------------------------------------------------------------------------------

    async def _on_registration(self, m: Msg, seq: int, at: datetime, *, live: bool) -> None:
        try:
            reg = WaitRegistration.model_validate_json(m.data)
        except ValueError:
            log.error("ignoring malformed wait registration %d: %r", seq, m.data[:200])
            return
        cid = f"{reg.wait_id}/{reg.cond}"
        if reg.op == "cancel":
            gone = self.index.remove(cid)
            if gone is not None and live:
                self._delete_later(gone.seq)
            if live:
                self._delete_later(seq)
            return
        if cid in self.index.by_cid:
            if live:
                self._delete_later(seq)  # a re-published registration: the first one stands
            return
        entry = PendingWaitEntry(reg, seq)
        if live and reg.lookback_s:
            # Lookback: events before this registration (in stream order) inside the window.
            event = await self._lookback(entry, reg.lookback_s, seq, at)
            if event is not None:
                await self._deliver([entry], event)
                self._delete_later(seq)
                return
        self.index.add(entry)

    async def _lookback(
        self, w: PendingWaitEntry, window_s: float, before_seq: int, at: datetime
    ) -> IncomingEvent | None:
        start = rfc3339(at - timedelta(seconds=window_s))
        found: list[tuple[int, Msg]] = []
        for subject in self._s.event_filters(w.key, w.scope):
            for m in await direct_get_subject(
                self._nc, self._s.events_stream, subject, start_time=start, timeout=30.0
            ):
                seq = int((m.headers or {}).get("Nats-Sequence", "0"))
                if seq >= before_seq:
                    break
                found.append((seq, m))
        # The earliest matching event in the window wins, as if the wait had begun at its start.
        for seq, m in sorted(found, key=lambda x: x[0]):
            hdrs = m.headers or {}
            parsed = self._s.parse_event_subject(hdrs.get("Nats-Subject", ""))
            if parsed is None:
                continue
            ts = _parse_time(hdrs.get("Nats-Time-Stamp"))
            event = decode_event(m, parsed[0], parsed[1], seq, ts)
            if w.matches(event.payload):
                return event
        return None

    # -- events ------------------------------------------------------------------------------

    async def _on_event(self, event: IncomingEvent) -> None:
        self.events_routed += 1
        matched = self.index.matches(event.key, event.scope, event.payload)
        if matched:
            for w in matched:
                self.index.remove(w.cid)
            await self._deliver(matched, event)
            for w in matched:
                self._delete_later(w.seq)
        for trig in list(self.triggers.values()):
            if event.key in trig.on_events:
                await self._start_triggered(trig, event)

    async def _deliver(self, waits: list[PendingWaitEntry], event: IncomingEvent) -> None:
        """No signal is lost: each signal is on the run's inbox before its activation, both before the ack."""
        signals = []
        for w in waits:
            sig = EventSignal(
                source="event", name=event.key, payload=event.payload, event_id=event.event_id,
                wait_id=w.wait_id, cond=w.cond, scope=event.scope, event_seq=event.seq, at=event.at,
                meta=event.meta,
            )
            signals.append(self._pub.publish(
                self._s.inbox(w.run_id), sig.model_dump_json().encode(), {HDR_MSG_ID: f"sig:{w.cid}:{event.seq}"}
            ))
        seqs = await asyncio.gather(*signals)
        acts = []
        for w, seq in zip(waits, seqs, strict=True):
            act = Activation(run_id=w.run_id, task=w.task, kind="signal", inbox_seq=seq)
            acts.append(self._pub.publish(
                self._s.work(w.task, w.run_id), encode_activation(act), {HDR_BIDE_KIND: "signal"}
            ))
        await asyncio.gather(*acts)

    async def _start_triggered(self, trig: TriggerRegistration, event: IncomingEvent) -> None:
        """Exactly one run per (event, task): its id derives from the event, its first append expects none."""
        run_id = uuid.uuid5(_RUN_NAMESPACE, f"{trig.task}|{event.event_id}|{event.seq}|{event.at.isoformat()}").hex
        meta: dict[str, Any] = {"trigger": {"event_key": event.key, "event_id": event.event_id,
                                            "scope": event.scope}}
        subject = self._s.work(trig.task, run_id)
        # The run joins the event's trace (a `nats pub` with a traceparent header too).
        span = self._tracing.start_run(trig.task, run_id, subject, parent=span_context_of(event.meta.get(TRACEPARENT)),
                                       attributes={"bide.event.key": event.key, "bide.event.id": event.event_id})
        if span.traceparent:
            meta[TRACEPARENT] = span.traceparent
        elif TRACEPARENT in event.meta:
            meta[TRACEPARENT] = event.meta[TRACEPARENT]
        started = RunStarted(run_id=run_id, task=trig.task, durable=trig.durable, input=event.payload,
                             at=utcnow(), meta=meta)
        try:
            seq = await self._history.append(run_id, [started], expected_seq=0)
        except HistoryConflict:
            seq = None  # started before (this event was redelivered): make sure it has its activation
            span.discard()
        act = Activation(run_id=run_id, task=trig.task, kind="start", history_seq=seq,
                         started=started if seq is not None else None)
        await self._pub.publish(subject, encode_activation(act),
                                {HDR_BIDE_KIND: "start", HDR_MSG_ID: f"start:{run_id}"})
        span.end()

    # -- chores ------------------------------------------------------------------------------

    def _delete_later(self, seq: int) -> None:
        """Satisfied or cancelled registrations leave the stream, so a rebuild does not see them."""
        async def _delete() -> None:
            try:
                await api_request(
                    self._nc, f"$JS.API.STREAM.MSG.DELETE.{self._s.events_stream}", {"seq": seq, "no_erase": True}
                )
            except Exception as e:
                log.debug("could not delete registration %d: %s", seq, e)

        t = asyncio.create_task(_delete())
        self._chores.add(t)
        t.add_done_callback(self._chores.discard)


def _parse_time(raw: str | None) -> datetime:
    if not raw:
        return utcnow()
    try:
        # Nanosecond RFC 3339 from the server: keep microseconds.
        head, _, frac = raw.rstrip("Z").partition(".")
        return datetime.fromisoformat(head + ("." + frac[:6] if frac else "")).replace(tzinfo=UTC)
    except ValueError:
        return utcnow()


# -- what hosts publish -------------------------------------------------------------------------


def registrations(
    wait: WaitRegistered, run_id: str, task: str, run_input: Any, op: str = "register"
) -> list[tuple[str, WaitRegistration]]:
    """The router messages for a wait's event conditions (index = position in the flattened groups)."""
    out = []
    for idx, cond in enumerate(wait.flat()):
        if cond.kind == "event":
            out.append((cond.event_key or "", _registration(wait, idx, cond, run_id, task, run_input, op)))
    return out


def _registration(
    wait: WaitRegistered, idx: int, cond: WaitCondition, run_id: str, task: str, run_input: Any, op: str
) -> WaitRegistration:
    assert cond.event_key is not None
    return WaitRegistration(
        op="register" if op == "register" else "cancel",
        wait_id=wait.wait_id,
        cond=idx,
        run_id=run_id,
        task=task,
        event_key=cond.event_key,
        scope=cond.scope,
        expression=cond.expression if op == "register" else None,
        lookback_s=cond.lookback_s if op == "register" else None,
        run_input=run_input if op == "register" and _cel.reads_run_input(cond.expression) else None,
    )


async def publish_registrations(
    pub: Publisher,
    layout: Layout,
    wait: WaitRegistered,
    run_id: str,
    task: str,
    run_input: Any,
    op: str,
    skip: set[int | None] | None = None,
) -> None:
    """Register (or cancel) a wait's event conditions with the router. Safe to repeat."""
    s = layout.subjects
    sends = []
    for key, reg in registrations(wait, run_id, task, run_input, op):
        if skip and reg.cond in skip:
            continue
        headers = {HDR_MSG_ID: f"{op}:{wait.wait_id}/{reg.cond}"}
        if op == "register":
            # Waits outlive the events' max age (a wait may last a week).
            headers[HDR_TTL] = "never"
        sends.append(pub.publish(s.waits(key), reg.model_dump_json(exclude_none=True).encode(), headers))
    await asyncio.gather(*sends)


__all__ = ["NO_SCOPE", "EventRouter", "WaitIndex", "publish_registrations", "registrations"]
