"""Pushing events (matched by the router against waits and triggers) and sending them to one run.

An event is a JSON payload published on ``<prefix>.events.<key>[.<scope>]``. Anything
that can publish to NATS can push one — ``nats pub bide.events.user:update '{"user_id": 1}'``
is as good as :meth:`EventsClient.push`. The SDK adds an event id (JetStream
de-duplication makes a repeated push a no-op) and metadata.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel

from actors.engine.wire import (
    HDR_EVENT_METADATA,
    HDR_MSG_ID,
    EventSignal,
    random_id,
    utcnow,
)
from actors.observe.tracing import TRACEPARENT
from actors.store.protocol import deliver_signal
from sdk.errors import BideError, EventPayloadError, PayloadTooLargeError, RunNotFoundError
from sdk.limits import PayloadLimits, check_name, encode_payload, format_size

if TYPE_CHECKING:
    from sdk._connection import Connection, ConnectionPool


@dataclass(frozen=True)
class EventRef:
    """A pushed event: its id, key, scope and stream sequence."""

    event_id: str
    key: str
    scope: str | None
    seq: int

    @property
    def eventId(self) -> str:
        return self.event_id


@dataclass(frozen=True)
class BulkPushEvent:
    """One event of :meth:`EventsClient.bulk_push`."""

    key: str
    payload: Any = None
    scope: str | None = None
    event_id: str | None = None
    metadata: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class DeliveryReceipt:
    """The answer to a direct delivery (Zart's ``offer_event``)."""

    execution_id: str
    event_name: str
    event_id: str
    status: str = "delivered"

    def as_dict(self) -> dict[str, str]:
        return {"status": self.status, "execution_id": self.execution_id, "event_name": self.event_name}


class RunAlreadyFinishedError(BideError):
    """A direct delivery to a run that has already finished (it can wait for nothing more)."""


def validate_key(key: object, what: str = "event key") -> str:
    if not isinstance(key, str) or not key or key != key.strip():
        raise ValueError(f"{what} must be a non-empty string without surrounding spaces, got {key!r}")
    return check_name(key, what)


def payload_to_json(payload: Any, what: str, limits: PayloadLimits) -> bytes:
    """The event body: JSON bytes within ``limits``. A pydantic model is dumped; anything else must be JSON data."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    try:
        return encode_payload(payload, limits, f"the payload of {what}")
    except TypeError as e:
        raise EventPayloadError(f"the payload of {what} is not JSON data ({e}): {payload!r:.200}") from None


def _metadata_header(metadata: Mapping[str, Any] | None, what: str, limits: PayloadLimits,
                     body: bytes) -> dict[str, str]:
    if not metadata:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata of {what} must be a mapping, got {type(metadata).__name__}")
    try:
        data = encode_payload(dict(metadata), limits, f"the metadata of {what}")
    except TypeError as e:
        raise EventPayloadError(f"metadata of {what} is not JSON data ({e})") from None
    # The metadata travels with the payload into every signal: together they must fit the limit.
    if len(body) + len(data) > limits.max_bytes:
        raise PayloadTooLargeError(f"{what} (payload and metadata together)",
                                   f"{format_size(limits.max_bytes)} (BIDE_MAX_PAYLOAD)",
                                   f"{format_size(len(body) + len(data))} as JSON")
    return {HDR_EVENT_METADATA: data.decode()}


def merge_metadata(metadata: Mapping[str, Any] | None,
                     additional_metadata: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    # Two names for one thing: given both, they are merged (``additional_metadata`` wins a shared key).
    if metadata is not None and additional_metadata is not None:
        if not isinstance(metadata, Mapping) or not isinstance(additional_metadata, Mapping):
            raise ValueError("metadata and additional_metadata must be mappings, got "
                             f"{type(metadata).__name__} and {type(additional_metadata).__name__}")
        return {**metadata, **additional_metadata}
    return metadata if metadata is not None else additional_metadata


class EventsClient:
    """``bide.event``: push events by key (and scope), or send one straight to a run."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    # -- push --------------------------------------------------------------------------------

    def _prepare(
        self, key: str, payload: Any, scope: str | None, event_id: str | None, metadata: Mapping[str, Any] | None
    ) -> tuple[str, bytes, dict[str, str], str]:
        key = validate_key(key)
        if scope is not None:
            scope = validate_key(scope, "scope")
        what = f"event {key!r}"
        # The id travels as a header, whose value the client strips: `"dup-1 "` was stored as `"dup-1"`.
        eid = random_id() if event_id is None else validate_key(event_id, f"event_id of {what}")
        limits = self._pool.config.payload_limits
        body = payload_to_json(payload, what, limits)
        headers = {HDR_MSG_ID: eid, **_metadata_header(metadata, what, limits, body)}
        subject = self._pool.layout.subjects.event(key, scope)
        return subject, body, headers, eid

    async def aio_push(
        self,
        key: str,
        payload: Any = None,
        scope: str | None = None,
        event_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        additional_metadata: Mapping[str, Any] | None = None,
    ) -> EventRef:
        """Push one event. Every wait and every ``on_events`` task matching it sees it.

        Args:
            key: the event key, e.g. ``"user:update"``.
            payload: JSON data or a pydantic model.
            scope: narrows the event to waits with the same scope (and makes lookback cheap).
            event_id: makes the push idempotent: the same id pushed again is dropped.
            metadata: extra JSON data carried in a header; its string values become the
                ``additional_metadata`` of the runs it starts (``on_events``).
            additional_metadata: Hatchet's name for ``metadata`` (given both, they are merged).
        """
        metadata = merge_metadata(metadata, additional_metadata)
        subject, body, headers, eid = self._prepare(key, payload, scope, event_id, metadata)
        conn = await self._pool.get()
        seq = await _traced_publish(conn, key, scope, eid, subject, body, headers)
        return EventRef(eid, key, scope, seq)

    def push(
        self,
        key: str,
        payload: Any = None,
        scope: str | None = None,
        event_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        additional_metadata: Mapping[str, Any] | None = None,
    ) -> EventRef:
        """Blocking :meth:`aio_push`."""
        return self._pool.run_sync(self.aio_push(key, payload, scope, event_id, metadata,
                                                 additional_metadata=additional_metadata))

    async def aio_bulk_push(self, events: Iterable[BulkPushEvent | Mapping[str, Any]]) -> list[EventRef]:
        """Push many events, pipelined. Every event is checked before any is published."""
        prepared = []
        for i, ev in enumerate(events):
            if isinstance(ev, Mapping):
                unknown = set(ev) - {"key", "payload", "scope", "event_id", "metadata", "additional_metadata"}
                if unknown or "key" not in ev:
                    raise ValueError(f"bulk event #{i} needs 'key' (and optionally payload, scope, event_id, "
                                     f"metadata); got fields {sorted(ev)}")
                ev = BulkPushEvent(ev["key"], ev.get("payload"), ev.get("scope"), ev.get("event_id"),
                                   ev.get("metadata") or ev.get("additional_metadata"))
            prepared.append((ev, self._prepare(ev.key, ev.payload, ev.scope, ev.event_id, ev.metadata)))
        conn = await self._pool.get()
        seqs = await asyncio.gather(*(_traced_publish(conn, ev.key, ev.scope, eid, s, b, h)
                                      for ev, (s, b, h, eid) in prepared))
        return [EventRef(p[3], ev.key, ev.scope, seq) for (ev, p), seq in zip(prepared, seqs, strict=True)]

    def bulk_push(self, events: Iterable[BulkPushEvent | Mapping[str, Any]]) -> list[EventRef]:
        """Blocking :meth:`aio_bulk_push`."""
        return self._pool.run_sync(self.aio_bulk_push(list(events)))

    # -- direct delivery ---------------------------------------------------------------------

    async def aio_send(
        self, run_id: str, name: str, payload: Any = None, event_id: str | None = None
    ) -> DeliveryReceipt:
        """Deliver an event to one run (Zart's ``offer_event``).

        A wait for ``name`` in that run receives it. If the run is not waiting yet, the
        event is kept — in the order sent — until it waits.

        Raises:
            RunNotFoundError: no run has that id.
            RunAlreadyFinishedError: the run has finished. A send repeated with the same
                ``event_id``, name and payload that the run took before it finished returns
                its receipt instead: the retry of a send that was delivered.
        """
        run_id = validate_key(run_id, "run id")
        name = validate_key(name, "event name")
        body = payload_to_json(payload, f"event {name!r} for run {run_id}", self._pool.config.payload_limits)
        eid = random_id() if event_id is None else validate_key(event_id, f"event_id of event {name!r}")
        conn = await self._pool.get()
        try:
            task = await _live_run_task(conn, run_id)
        except RunAlreadyFinishedError:
            if event_id is not None and await _was_sent(conn, run_id, name, body, eid):
                return DeliveryReceipt(run_id, name, eid)  # a retry: the first send was delivered
            raise
        s = conn.layout.subjects
        span = conn.tracing.send_to_run(run_id, name, s.inbox(run_id), eid)
        meta = {TRACEPARENT: span.traceparent} if span.traceparent else {}
        signal = EventSignal(source="direct", name=name, payload=orjson.loads(body), event_id=eid, at=utcnow(),
                             meta=meta)
        try:
            # Idempotent: the same event_id sent again is stored (and wakes the run) once.
            await deliver_signal(conn.publisher, s, run_id, task, signal, msg_id=f"send:{run_id}:{eid}")
        except BaseException as e:
            span.fail(e)
            raise
        span.end()
        return DeliveryReceipt(run_id, name, eid)

    def send(self, run_id: str, name: str, payload: Any = None, event_id: str | None = None) -> DeliveryReceipt:
        """Blocking :meth:`aio_send`."""
        return self._pool.run_sync(self.aio_send(run_id, name, payload, event_id))

    # Zart's name for the same thing.
    aio_offer_event = aio_send
    offer_event = send


async def _traced_publish(conn: Connection, key: str, scope: str | None, event_id: str, subject: str, body: bytes,
                          headers: dict[str, str]) -> int:
    """Publish one event inside its PRODUCER span; the ``traceparent`` header carries the span."""
    span = conn.tracing.push_event(key, scope, subject, event_id)
    if span.traceparent:
        headers = {**headers, TRACEPARENT: span.traceparent}
    try:
        seq: int = await conn.publisher.publish(subject, body, headers)
    except BaseException as e:
        span.fail(e)
        raise
    span.end()
    return seq


async def _was_sent(conn: Connection, run_id: str, name: str, body: bytes, event_id: str) -> bool:
    """Whether the finished run took this very event (name, payload and id) from a send before.

    A sender that retries a send (its first try timed out, or it cannot know) must not be told
    the event was not delivered when the run took it and has ended since. A copy taken by an earlier
    generation of a run that continued as new is gone with that generation's history: not found.
    """
    hist = await conn.history.read_latest(run_id)  # not a follower's older view: it may not show the send taken
    payload = orjson.loads(body)
    return any(sig.source == "direct" and sig.event_id == event_id and sig.name == name and sig.payload == payload
               for _, sig in hist.taken())


async def _live_run_task(conn: Connection, run_id: str) -> str:
    """The task of a run that exists and has not finished."""
    from actors.store.children import live_run_task

    try:
        task = await live_run_task(conn.nc, conn.history, conn.layout.subjects, run_id)
    except LookupError:
        raise RunNotFoundError(f"no run with id {run_id!r}") from None
    if task is None:
        raise RunAlreadyFinishedError(f"run {run_id} has already finished; the event was not delivered")
    return task
