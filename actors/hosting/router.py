"""The event router: matches events to waits and triggers, in the events stream's order.

Events, wait registrations (and their cancellations) and trigger registrations flow
through one stream, so their order is total: an event before a registration is the
lookback's, an event after it is live (waits are race-free without locks). The
router keeps pending waits in a :class:`WaitIndex` and, for each match, delivers a
signal durably to the run's inbox and enqueues an activation; the run's host — its
single writer — records it. The router never writes a run's history, except the
first entry of a run an event starts.

Invariant 11 (the router sees the stream in order, through any crash) holds by
construction:

- One process at a time owns the router: a pinned-client priority group on its
  JetStream consumer (ADR-42). Ownership is JetStream's decision, never ours.
- The consumer acks cumulatively (``ack_policy: all``), and the owner acks a batch
  only after every write it caused is durable (:mod:`actors.hosting.router_effects`); it
  records the same sequence on its own checkpoint subject. F, the lower of the two (the
  ack floor alone once ran ahead of what was handled), is a checkpoint: every message up
  to F has been fully handled.
- A new owner rebuilds its index from the registrations still in the stream up to F
  (satisfied and cancelled ones are deleted, after their delivery was durable), then
  handles the stream strictly in order from F+1: a delivery above the next expected
  sequence first has the gap read from the stream (what a dead owner took and never
  acked, or what sits above a gap), a delivery at or below it was handled already.
  Deliveries' own order (redeliveries come late) therefore never matters.
- A message that cannot be handled (malformed, invalid CEL, a payload CEL cannot
  hold, a signal too big to deliver) is a recorded rejection on
  ``<prefix>.rejected.<seq>``, acked like any other: it never blocks or pins anything.

Partitions: one :class:`EventRouter` is one partition (of N, by the FNV-1a hash of the
event key), with its own consumer, pin and checkpoint. It reads the whole stream in
order as above but acts only on its keys' registrations and events; every partition
keeps the triggers, and a triggered run is started by the event's partition. Which
host asks for which partition is :mod:`actors.hosting.router_partitions`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.engine.wait_index import IncomingEvent, PendingWaitEntry, WaitIndex, decode_event
from actors.engine.wire import (
    NO_SCOPE,
    TriggerRegistration,
    WaitRegistration,
    parse_time,
    partition_of,
    rfc3339,
    utcnow,
)
from actors.hosting.consumer_watch import ConsumerWatch, consumer_gone
from actors.hosting.router_deliveries import Deliveries
from actors.hosting.router_effects import Effects
from actors.hosting.router_inputs import publish_registrations, registrations
from actors.hosting.router_reads import StreamReads, seq_of, stored_at
from actors.observe.tracing import Tracing
from actors.store.history import HistoryLog
from actors.store.jetstream import (
    ROUTER_GROUP,
    Layout,
    api_request,
    direct_get_last,
    ensure_router_consumers,
    is_transient,
    read_before,
    retry_transient,
)
from actors.store.requests import Publisher, server_status
from sdk.limits import DEFAULT_LIMITS, PayloadLimits

log = logging.getLogger("bide.router")

_PULL_BATCH = 512
_PULL_EXPIRES_S = 1.0
_MAX_QUEUED = 4096
"""Deliveries taken but not yet handled; above this the owner pulls one at a time (it keeps its pin)."""
_HANDLE_BATCH = 512
_ACK_TIMEOUT_S = 2.0
_HOLD_BACK_S = 0.5
"""How long a candidate that should leave a partition to another host waits before asking again."""
_LOST = object()
"""Queued by the puller when JetStream says another process holds the pin."""


class EventRouter:
    """Consumes the events stream (when this process owns it) and delivers matches to runs."""

    def __init__(self, nc: NATS, publisher: Publisher, layout: Layout, history: HistoryLog,
                 tracing: Tracing | None = None, limits: PayloadLimits = DEFAULT_LIMITS, *,
                 partition: int = 0, partitions: int = 1,
                 may_pull: Callable[[EventRouter], Awaitable[bool]] | None = None) -> None:
        self._limits = limits
        self._nc = nc
        self._pub = publisher
        self._layout = layout
        self._s = layout.subjects
        self.partition = partition
        self.partitions = partitions
        self.consumer = self._s.router_consumer(partition)
        self._may_pull = may_pull
        self.index = WaitIndex()
        self.triggers: dict[str, tuple[int, TriggerRegistration]] = {}
        self.superseded: dict[int, int] = {}
        """Older trigger registration -> the sequence of the one that replaced it (deleted later, see
        :meth:`delete_superseded`)."""
        self._pin: str | None = None
        """The pin this process handles under (set once its rebuild is done)."""
        self._pull_pin: str | None = None
        """The pin deliveries carry: pull requests send it at once, so a long rebuild keeps the pin."""
        self._released: str | None = None
        """A pin given up (:meth:`release`): late deliveries under it are left unacked for the next owner."""
        self._lock = asyncio.Lock()
        self.handled_seq = 0
        """The stream sequence up to which every message has been handled, in order."""
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._reads = StreamReads(nc, publisher, self._s)
        self._deliveries = Deliveries(nc, self._s, publisher, history, tracing or Tracing(layout.subjects.prefix))
        self.events_routed = 0
        self.rejected = 0
        self.rebuild_s = 0.0
        self.owner = False
        self._watch = ConsumerWatch(nc, self._s.events_stream, self.consumer,
                                    partial(ensure_router_consumers, nc, layout), on_recreated=self._lose_pin)
        """A partition's consumer made again reads from the start of the stream; whoever it pins
        rebuilds the index as any new owner does, and what this process held as owner is dropped."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> EventRouter:
        self._tasks = [
            asyncio.create_task(self._pull_loop(), name="bide-router-pull"),
            asyncio.create_task(self._handle_loop(), name="bide-router-handle"),
        ]
        return self

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        await self._reads.close()
        if self.owner:
            # Hand over at once: the next candidate is pinned without waiting out the timeout.
            try:
                await self._unpin()
            except Exception as e:
                log.debug("router: unpin on stop failed: %s", e)
            self._drop_state()

    async def release(self) -> None:
        """Give this partition up (between batches) so another host takes it at once."""
        async with self._lock:
            if not self.owner:
                return
            self._released = self._pin
            self._drop_state()
            await self._unpin()

    async def _unpin(self) -> None:
        await api_request(self._nc, f"$JS.API.CONSUMER.UNPIN.{self._s.events_stream}.{self.consumer}",
                          {"group": ROUTER_GROUP}, timeout=2.0)

    @property
    def pin(self) -> str | None:
        """The pin id this process owns the partition under (``None`` when it does not)."""
        return self._pin if self.owner else None

    def mine(self, key: str) -> bool:
        """Whether events and waits of ``key`` belong to this partition."""
        return self.partitions == 1 or partition_of(key, self.partitions) == self.partition

    # -- taking deliveries -------------------------------------------------------------------

    async def _pull_loop(self) -> None:
        """Keeps one pull request open at all times (that is what keeps the pin), queueing deliveries."""
        api = f"$JS.API.CONSUMER.MSG.NEXT.{self._s.events_stream}.{self.consumer}"
        done = asyncio.Event()
        outstanding = 0

        async def _on_msg(m: Msg) -> None:
            nonlocal outstanding
            status = server_status(m)
            if status is None:
                outstanding -= 1
                pin = m.headers.get("Nats-Pin-Id") if m.headers else None
                if pin is not None and pin != self._released:
                    self._pull_pin = pin
                self._queue.put_nowait(m)
                if outstanding <= 0:
                    done.set()
                return
            if status == "423":  # another process holds the pin: we are not the owner
                self._pull_pin = None
                self._queue.put_nowait(_LOST)
            deleted = consumer_gone(m)
            if deleted is not None:
                if deleted:
                    self._lose_pin()
                self._watch.gone()
            if status in ("408", "409", "423", "400", "404", "503"):
                done.set()

        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox, cb=_on_msg)
        try:
            while True:
                if self._pull_pin is None and self._may_pull is not None and not await self._may_pull(self):
                    await asyncio.sleep(_HOLD_BACK_S)  # another host should take this partition
                    continue
                batch = max(1, min(_PULL_BATCH, _MAX_QUEUED - self._queue.qsize()))
                req: dict[str, Any] = {"batch": batch, "expires": int(_PULL_EXPIRES_S * 1e9), "group": ROUTER_GROUP}
                if self._pull_pin is not None:
                    req["id"] = self._pull_pin
                await self._watch.pause()
                done.clear()
                outstanding = batch
                try:
                    await self._nc.publish(api, json.dumps(req).encode(), reply=inbox)
                    async with asyncio.timeout(_PULL_EXPIRES_S + 1.0):
                        await done.wait()
                except TimeoutError:
                    pass
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.debug("router pull failed: %s", e)
                    await asyncio.sleep(0.5)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    def _lose_pin(self) -> None:
        """Give up what this process holds as owner (its consumer was deleted)."""
        if self._pull_pin is not None or self.owner:
            self._pull_pin = None
            self._queue.put_nowait(_LOST)

    async def _handle_loop(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < _HANDLE_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                async with self._lock:
                    await self._handle_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Nothing was acked: the deliveries come back, and this process starts over as owner.
                log.exception("router batch failed; state dropped, the batch will be handled again")
                self._drop_state()
                await asyncio.sleep(0.5)

    def _drop_state(self) -> None:
        if self.owner:
            log.info("router ownership left this process")
        self.owner = False
        self._pin = None
        self._pull_pin = None
        self.handled_seq = 0
        self.index.clear()
        self.triggers.clear()
        self.superseded.clear()

    async def _handle_batch(self, batch: list[Any]) -> None:
        effects = Effects(self._nc, self._pub, self._s)
        last: Msg | None = None
        for m in batch:
            if m is _LOST:
                await self._finish(effects, last)
                effects, last = Effects(self._nc, self._pub, self._s), None
                self._drop_state()
                continue
            pin = m.headers.get("Nats-Pin-Id") if m.headers else None
            if pin is not None and pin == self._released:
                continue  # given up: unacked, the next owner handles it (its gap read, or redelivery)
            if pin is not None and pin != self._pin:
                await self._finish(effects, last)
                effects, last = Effects(self._nc, self._pub, self._s), None
                await self._take_over(pin)
            seq = m.metadata.sequence.stream
            if seq > self.handled_seq:
                if seq > self.handled_seq + 1:
                    await self._fill(self.handled_seq + 1, seq - 1, effects)
                at = stored_at(m)
                await self._apply(m.subject, m, seq, at, effects, live=True)
                self.handled_seq = seq
            last = m
        await self._finish(effects, last)

    async def _finish(self, effects: Effects, last: Msg | None) -> None:
        """Make the batch's writes durable, then ack it (cumulatively: every delivery up to ``last``)."""
        if effects:
            await effects.flush()
        self.rejected += effects.rejected
        if last is not None:
            # Acks and checkpoints are cumulative and the batch is durable already: one lost in an
            # election is covered by the next, or redone by the next owner (idempotently).
            upto = last.metadata.sequence.stream
            checkpoint = self.handled_seq if self.owner else 0
            acked, noted = await asyncio.gather(last.ack_sync(timeout=_ACK_TIMEOUT_S),
                                                self._checkpoint(checkpoint), return_exceptions=True)
            for what, outcome in (("ack", acked), ("checkpoint", noted)):
                if isinstance(outcome, BaseException):
                    log.info("router: %s up to %d not confirmed (%s); the next one covers it", what, upto, outcome)

    async def _checkpoint(self, seq: int) -> None:
        """Record that every message up to ``seq`` was handled with its effects durable."""
        if seq:
            await asyncio.wait_for(self._pub.publish(self._s.router_checkpoint(self.partition), str(seq).encode()),
                                   _ACK_TIMEOUT_S)

    async def _take_over(self, pin: str) -> None:
        """Pinned: rebuild exactly up to the start point, catch up to the ack floor, then handle deliveries."""
        self._drop_state()
        self._pull_pin = pin
        started = asyncio.get_running_loop().time()
        start, acked = await retry_transient("router checkpoint", partial(self.start_point, warn=True))
        self.handled_seq = await retry_transient("router rebuild", partial(self._rebuild, start))
        if self.handled_seq < acked:
            await retry_transient("router catch-up", self._catch_up)
        self._pin = pin
        self._released = None
        self.owner = True
        self.rebuild_s = asyncio.get_running_loop().time() - started
        log.info("router partition %d/%d owned from sequence %d: %d pending waits, %d triggers (rebuilt in %.3fs)",
                 self.partition, self.partitions, self.handled_seq, len(self.index), len(self.triggers),
                 self.rebuild_s)

    async def start_point(self, *, warn: bool = False) -> tuple[int, int]:
        """Where a new owner starts (the lower of the partition's checkpoint and its ack floor), and the ack floor.

        What lies above it may be handled again, so nothing it needs may leave the stream: the
        cleanup of superseded trigger registrations measures against it too, not the ack floor.
        """
        info = await api_request(self._nc, f"$JS.API.CONSUMER.INFO.{self._s.events_stream}.{self.consumer}", {})
        acked = int(info.get("ack_floor", {}).get("stream_seq", 0))
        noted = await direct_get_last(self._nc, self._s.checkpoints_stream, self._s.router_checkpoint(self.partition))
        if noted is None or int(noted.data or 0) >= acked:
            return acked, acked
        # The consumer's ack floor ran ahead of what any owner handled (a replica's stale read of
        # the checkpoint only lowers it, which is safe): start from the lower one; what lies
        # between is read from the stream and handled again, idempotently.
        if warn:
            log.warning("router partition %d: ack floor %d is past the checkpoint %s; rebuilding to the checkpoint",
                        self.partition, acked, noted.data.decode())
        return int(noted.data), acked

    async def _rebuild(self, floor: int) -> int:
        """Pending waits and triggers up to ``floor``, from what the stream holds; returns ``floor``.

        Read a page at a time and applied as read: a new owner holds its index and one page,
        not every registration of every partition.
        """
        self.index.clear()
        self.triggers.clear()
        if floor == 0:
            return 0
        scratch = Effects(self._nc, self._pub, self._s)  # nothing is written during a rebuild
        for family, subject in (("triggers", self._s.triggers_all), ("waits", self._s.waits_all)):
            msgs = self._reads.through_marker(family, subject)
            async with contextlib.aclosing(msgs):
                async for m in msgs:
                    seq = seq_of(m)
                    if seq > floor:
                        break
                    await self._apply((m.headers or {}).get("Nats-Subject", m.subject), m, seq, utcnow(), scratch,
                                      live=False)
        return floor

    async def _catch_up(self) -> None:
        """Handle what lies between the checkpoint and the ack floor now, not when the next message comes.

        A marker published now bounds the read, and finding it proves the read complete.
        """
        mark = await self._reads.publish_marker("waits")
        effects = Effects(self._nc, self._pub, self._s)
        await self._fill(self.handled_seq + 1, mark - 1, effects)
        await effects.flush()
        self._reads.forget_marker(mark)

    async def _fill(self, first: int, last: int, effects: Effects) -> None:
        """Handle stream messages ``first..last`` that were not delivered here (a dead owner's batch, a gap)."""
        for m in await self._reads.between(first, last):
            hdrs = m.headers or {}
            mseq = seq_of(m)
            if mseq > last:
                return
            if mseq > self.handled_seq:
                await self._apply(hdrs.get("Nats-Subject", m.subject), m, mseq,
                                  parse_time(hdrs.get("Nats-Time-Stamp")), effects, live=True)
                self.handled_seq = mseq

    async def _apply(self, subject: str, m: Msg, seq: int, at: datetime, effects: Effects, *, live: bool) -> None:
        """One message, in stream order. Anything but an infrastructure error is a recorded rejection."""
        try:
            if subject.endswith(".%00barrier"):
                return  # a rebuild's marker (it expires by itself)
            if subject.startswith(f"{self._s.prefix}.waits."):
                key = self._s.parse_waits_subject(subject)
                if key is not None and not self.mine(key):
                    return  # another partition's wait (a malformed subject is rejected by one: partition 0)
                if key is None and self.partition != 0:
                    return
                await self._on_registration(subject, m, seq, at, effects, live=live)
            elif subject.startswith(f"{self._s.prefix}.triggers."):
                self._on_trigger(subject, m, seq, effects, live=live)
            elif subject.startswith(f"{self._s.prefix}.events."):
                parsed = self._s.parse_event_subject(subject)
                if parsed is None:
                    if self.partition != 0:
                        return
                    raise ValueError("not an event subject")
                if live and self.mine(parsed[0]):
                    self._s.check_event_subject(subject, *parsed)
                    await self._on_event(decode_event(m, parsed[0], parsed[1], seq, at, self._limits), subject,
                                         effects)
            # Anything else in the stream (rejection records) is not the router's input.
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if is_transient(e):
                raise
            if live:
                effects.reject(seq, subject, f"{type(e).__name__}: {e}")
            else:
                # The type only: the message may quote the payload (never logged).
                log.error("router rebuild skipped message %d on %s (%s)", seq, subject, type(e).__name__)

    # -- waits -------------------------------------------------------------------------------

    async def _on_registration(self, subject: str, m: Msg, seq: int, at: datetime, effects: Effects, *,
                               live: bool) -> None:
        try:
            reg = WaitRegistration.model_validate_json(m.data)
            cid = f"{reg.wait_id}/{reg.cond}"
            entry = PendingWaitEntry(reg, seq) if reg.op == "register" else None  # parses the CEL
        except Exception:
            if live:
                effects.deletes.add(seq)  # rejected once, recorded; a rebuild need not trip over it again
            raise
        if reg.op == "cancel":
            gone = self.index.remove(cid)
            if live:
                if gone is not None:
                    effects.deletes.add(gone.seq)
                effects.deletes.add(seq)
            return
        assert entry is not None
        held = self.index.by_cid.get(cid)
        if held is not None:
            if live and held.seq != seq:
                effects.deletes.add(seq)  # a re-published registration: the first one stands
            return
        if live and reg.lookback_s:
            # Lookback: events before this registration (in stream order) inside the window.
            event = await self._lookback(entry, reg.lookback_s, seq, at, effects)
            if event is not None and self._deliveries.signals([entry], event, effects):
                effects.deletes.add(seq)
                return
        self.index.add(entry)

    async def _lookback(self, w: PendingWaitEntry, window_s: float, before_seq: int, at: datetime,
                        effects: Effects) -> IncomingEvent | None:
        start = rfc3339(at - timedelta(seconds=window_s))
        found: list[tuple[int, Msg]] = []
        for subject in self._s.event_filters(w.key, w.scope):
            async def read(subject: str = subject) -> list[Msg]:
                return await read_before(self._nc, self._s.events_stream, subject, before_seq, start)

            msgs: list[Msg] = await retry_transient("lookback read", read)
            found += ((int((m.headers or {}).get("Nats-Sequence", "0")), m) for m in msgs)
        # The earliest matching event in the window wins, as if the wait had begun at its start.
        for seq, m in sorted(found, key=lambda x: x[0]):
            hdrs = m.headers or {}
            parsed = self._s.parse_event_subject(hdrs.get("Nats-Subject", ""))
            if parsed is None:
                continue
            try:
                # An event over a limit was rejected when it was routed: it satisfies nothing now either.
                event = decode_event(m, parsed[0], parsed[1], seq, parse_time(hdrs.get("Nats-Time-Stamp")),
                                     self._limits)
                if w.matches(event.payload):
                    return event
            except Exception as e:
                log.warning("lookback of wait %s: event %d passed over (%s)", w.cid, seq, type(e).__name__)
        return None

    # -- triggers ----------------------------------------------------------------------------

    def _on_trigger(self, subject: str, m: Msg, seq: int, effects: Effects, *, live: bool) -> None:
        try:
            trig = TriggerRegistration.model_validate_json(m.data)
        except Exception:
            if self.partition != 0:
                return  # every partition reads triggers; one records the rejection
            raise
        held = self.triggers.get(trig.task)
        if held is not None and held[0] > seq:
            self.superseded[seq] = held[0]
            return
        if held is not None:
            # Latest wins. The older registration leaves the stream only once every partition
            # has passed this one: a partition rebuilding below it still needs the older one.
            self.superseded[held[0]] = seq
        self.triggers[trig.task] = (seq, trig)

    async def delete_superseded(self, every_floor: int) -> int:
        """Delete the older trigger registrations whose replacement every partition has passed."""
        async with self._lock:
            if not self.owner:
                return 0
            gone = [old for old, newer in self.superseded.items() if newer <= every_floor]
            effects = Effects(self._nc, self._pub, self._s)
            effects.deletes.update(gone)
            await effects.flush()
            for old in gone:
                del self.superseded[old]
            return len(gone)

    # -- events ------------------------------------------------------------------------------

    async def _on_event(self, event: IncomingEvent, subject: str, effects: Effects) -> None:
        self.events_routed += 1

        def failed(w: PendingWaitEntry, e: Exception) -> None:
            effects.reject(event.seq, subject, f"expression of wait {w.cid} failed: {type(e).__name__}: {e}",
                           {"wait": w.cid, "run_id": w.run_id})

        matched = self.index.matches(event.key, event.scope, event.payload, on_error=failed)
        if matched and self._deliveries.signals(matched, event, effects, subject):
            for w in matched:
                self.index.remove(w.cid)  # in memory now; the stream keeps it until delivery is durable
                effects.deletes.add(w.seq)
        for _, trig in list(self.triggers.values()):
            if event.key in trig.on_events:
                self._deliveries.start(trig, event, subject, effects)


__all__ = ["NO_SCOPE", "EventRouter", "IncomingEvent", "PendingWaitEntry", "WaitIndex", "publish_registrations",
           "registrations"]
