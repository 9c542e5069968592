"""Pulling activations from a task's work consumer, never more than the free slots.

A continuous pull: free slots are turned into pull credit (a pull request with
``batch`` = slots acquired), topped up once half of what a queue holds is used. Each
request has its own reply subject so its unused credit can be handed back when it
expires. Slots are shared by all tasks of a kind on a host, so each queue adapts its
request size to what it actually receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.hosting.consumer_watch import ConsumerWatch, consumer_gone
from actors.store.requests import server_status

log = logging.getLogger("bide.activations")

_PULL_EXPIRES_S = 10.0


LEND_FACTOR = 10
"""A pool lends at most this many times its size to turns that only wait (:meth:`SlotPool.lent`)."""


class SlotPool:
    """A counting pool of worker slots (``slots`` or ``durable_slots``), shared by a host's queues."""

    def __init__(self, size: int, lend_bytes: int = 64 * 1024 * 1024) -> None:
        self.size = size
        self.free = size
        self.lent_out = 0
        """Slots whose turns only wait now (a sleep's last stretch), lent back to the pool."""
        self.lend_bytes = lend_bytes
        """The most history the turns holding lent slots may keep in memory together (``BIDE_WARM_BYTES``)."""
        self.lent_bytes = 0
        self.queues = 0
        """How many queues share this pool (each registers when it starts)."""
        self.busy = 0
        """Slots running a turn now (the rest of those not free are pull credit: reserved, idle)."""
        self._waiters: list[asyncio.Future[None]] = []
        self.on_lent: Callable[[int], None] | None = None
        """Told ``lent_out`` each time it changes (``collector.ResidentRuns.changed``)."""

    @property
    def scarce(self) -> bool:
        """Fewer slots than queues: reserving slots as pull credit would starve some queues."""
        return self.size < self.queues

    async def acquire_some(self, most: int) -> int:
        """Wait for at least one free slot, then take up to ``most``."""
        while self.free <= 0:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
        n = min(self.free, most)
        self.free -= n
        return n

    def release(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.free += n
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    @property
    def in_use(self) -> int:
        return self.size - self.free

    @contextlib.asynccontextmanager
    async def lent(self, held_bytes: int = 0) -> AsyncIterator[None]:
        """The caller's turn only waits inside this block: its slot goes back to the pool meanwhile.

        A sleep's timer fires seconds early (``actors.engine.replay.sleep_lead``) and its run
        waits the rest on its host, so that thousands of runs due at once are all read and
        replayed before their moment. Slots bound the turns that work, not those waiting for
        their moment: holding slots, they would starve the host's other work. At most
        ``LEND_FACTOR`` times the pool's size are lent at once, holding at most ``lend_bytes``
        of history in all (``held_bytes`` each: a waiting turn keeps its run in memory); past
        either, a waiting turn keeps its slot. A turn admitted once never waits for a
        slot again: leaving the block takes its slot back at once, even from a busy pool (whose
        free count then goes below zero and new work waits until turns end).
        """
        if self.lent_out >= self.size * LEND_FACTOR or self.lent_bytes + held_bytes > self.lend_bytes:
            yield
            return
        self.lent_out += 1
        self.lent_bytes += held_bytes
        self.busy -= 1
        self.release(1)
        if self.on_lent is not None:
            self.on_lent(self.lent_out)
        try:
            yield
        finally:
            self.lent_out -= 1
            self.lent_bytes -= held_bytes
            self.free -= 1
            self.busy += 1
            if self.on_lent is not None:
                self.on_lent(self.lent_out)


@dataclass
class _Pull:
    remaining: int
    deadline: float
    pooled: bool = True
    """Its credit is slots taken from the pool (not in scarce mode, where a message waits for a slot)."""


Handler = Callable[[Msg], Awaitable[None]]


class ActivationQueue:
    """Delivers a task's activations to ``handler``, each holding one slot until it returns."""

    def __init__(
        self, nc: NATS, stream: str, consumer: str, slots: SlotPool, handler: Handler, *, max_batch: int = 256,
        create: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._watch = ConsumerWatch(nc, stream, consumer, create) if create is not None else None
        """Makes the consumer again (with ``create``) if pulls find it deleted."""
        self._slots = slots
        self._handler = handler
        self._max_batch = max_batch
        slots.queues += 1  # counted before any queue starts pulling (see SlotPool.scarce)
        self._want = 1  # grows as pulls come back full; a queue that gets nothing keeps 1 credit
        self._credit = asyncio.Event()  # set when this queue's unused pull credit shrinks
        self._pulls: dict[str, _Pull] = {}
        self._ids = itertools.count()
        self._inbox = ""
        self._sub: object | None = None
        self._stopping = False
        self.in_flight: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._on_msg)
        self._runner = asyncio.create_task(self._pull_loop(), name=f"pull:{self._api}")
        self._reaper = asyncio.create_task(self._reap_loop(), name=f"reap:{self._api}")

    async def _pull_loop(self) -> None:
        while not self._stopping:
            # Hold at most ``_want`` unused credit, so a pool shared by several queues is not all
            # reserved by the first one until its pulls expire (the others would starve). Top it
            # up once half of it is used, not after each delivery: run one at a time, a host sent
            # a pull request per activation (9 messages a run instead of 8, and the server parses
            # and queues each; ``tests/integration/test_pull_credit.py``).
            scarce = self._slots.scarce
            while self._outstanding() > (0 if scarce else self._want // 2):
                self._credit.clear()
                await self._credit.wait()
            if scarce:
                # More queues than slots: every queue keeps one pull open without a slot, and a
                # message that arrives waits for a free slot (see _handle), so none starves.
                n = 1
            else:
                n = await self._slots.acquire_some(min(self._want - self._outstanding(), self._max_batch))
                await asyncio.sleep(0)  # let slots freed in the same tick join this request
            if self._stopping:
                if not scarce:
                    self._slots.release(n)
                return
            if self._watch is not None:
                await self._watch.pause()
            req_id = str(next(self._ids))
            self._pulls[req_id] = _Pull(n, time.monotonic() + _PULL_EXPIRES_S + 2.0, pooled=not scarce)
            body = {"batch": n, "expires": int(_PULL_EXPIRES_S * 1e9)}
            try:
                await self._nc.publish(self._api, orjson.dumps(body), reply=f"{self._inbox}.{req_id}")
            except Exception:
                log.exception("pull request failed")
                self._end_pull(req_id)
                await asyncio.sleep(0.5)

    def _outstanding(self) -> int:
        return sum(p.remaining for p in self._pulls.values())

    def _end_pull(self, req_id: str) -> None:
        pull = self._pulls.pop(req_id, None)
        if pull is not None:
            self._credit.set()
            if pull.pooled:
                self._slots.release(pull.remaining)
            # Adapt: ask for less after a pull that came back mostly unused.
            if pull.remaining > 0:
                self._want = max(1, self._want // 2)

    async def _on_msg(self, msg: Msg) -> None:
        req_id = msg.subject.rsplit(".", 1)[-1]
        status = server_status(msg)
        if status is not None and not msg.data:
            gone = consumer_gone(msg) is not None
            if gone and self._watch is not None and not self._stopping:
                self._watch.gone()
            if gone or status in ("408", "409", "404"):
                self._end_pull(req_id)
            return
        # A delivered message has its own subject (bide.work...), not the request's inbox, so it
        # cannot name its request: charge the oldest open one (exact with one request open; the
        # 408s and the reaper settle the credit of the others).
        req_id = next(iter(self._pulls), req_id)
        pull = self._pulls.get(req_id)
        if self._stopping:
            # Hand it straight back: another host takes it without waiting for ack_wait.
            if pull is not None:
                pull.remaining -= 1
            await msg.nak()
            return
        needs_slot = False
        if pull is not None:
            pull.remaining -= 1
            self._credit.set()
            needs_slot = not pull.pooled
            if pull.remaining <= 0:
                del self._pulls[req_id]
                self._want = min(self._max_batch, self._want * 2)
        else:
            # Delivered after we gave the credit back: take a slot anyway (briefly over budget).
            self._slots.free -= 1
        task = asyncio.create_task(self._wait_for_slot(msg) if needs_slot else self._handle(msg))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def _handle(self, msg: Msg) -> None:
        self._slots.busy += 1
        try:
            await self._handler(msg)
        except Exception:
            log.exception("activation handler failed on %s", msg.subject)
        finally:
            self._slots.busy -= 1
            self._slots.release(1)

    async def _wait_for_slot(self, msg: Msg) -> None:
        """Scarce mode: hold the message (telling JetStream it is being worked on) until a slot frees."""
        acquire = asyncio.ensure_future(self._slots.acquire_some(1))
        try:
            while not acquire.done():
                done, _ = await asyncio.wait({acquire}, timeout=1.0)
                if not done:
                    await msg.in_progress()
        except BaseException:
            acquire.cancel()
            raise
        await self._handle(msg)

    async def _reap_loop(self) -> None:
        # Pull requests lost with a connection never report back: reclaim their credit.
        while not self._stopping:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for req_id in [r for r, p in self._pulls.items() if p.deadline < now]:
                self._end_pull(req_id)

    async def stop(self) -> None:
        """Stop asking for work; in-flight handlers keep running (see ``ActorHost.stop``)."""
        self._stopping = True
        for t in (self._runner, self._reaper):
            if t is not None:
                t.cancel()

    async def close(self) -> None:
        """Unsubscribe; call after :meth:`stop` once the host no longer wants late deliveries."""
        if self._sub is not None:
            await self._sub.unsubscribe()  # type: ignore[attr-defined]
            self._sub = None
        for req_id in list(self._pulls):
            self._end_pull(req_id)
