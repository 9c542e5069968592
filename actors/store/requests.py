"""Core NATS requests and JetStream publishes over one reply subscription per connection.

nats-py's ``request`` (and ``js.publish``, built on it) draws a random reply token from the
operating system and arms a ``wait_for`` per call; on a host's hot path (a history read, an
append, a timer per turn) that cost more than the message itself. Here every request of a
connection shares one wildcard reply subscription, replies are matched by a counter token,
and the timeouts of all its requests share one timer (:class:`_Deadlines`). A batch direct get,
whose answer is many messages closed by a status message, uses the same subscription instead
of subscribing and unsubscribing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

_MSG_ID = "Nats-Msg-Id"

log = logging.getLogger("bide.publish")


def times_delivered(msg: Msg) -> int:
    """How many times JetStream has delivered ``msg`` (this time included), read from its ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.…`` (9 tokens) or, from servers that name a domain,
    ``$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.…`` (11 or more): nats-py's
    ``msg.metadata`` parses the whole subject into objects (a datetime among them), a host's
    per-activation cost that this count alone does not need.
    """
    reply = msg.reply or ""
    tokens = reply.split(".", 7)
    if len(tokens) == 8 and tokens[0] == "$JS" and tokens[1] == "ACK":
        count = tokens[4] if reply.count(".") == 8 else tokens[6]
        if count.isdigit():
            return max(1, int(count))
    return msg.metadata.num_delivered or 1  # not an ack subject this knows: nats-py's answer, or its error


def server_status(msg: Msg) -> str | None:
    """The server's status code (``"408"``, ``"404"``, ...) if ``msg`` is a status answer, else ``None``.

    nats-py files a status line's code (``NATS/1.0 408 Request Timeout``) under the header
    ``Status``, where a publisher's own header of that name lands too (``nats pub -H
    'Status:408'``): read as a status, such an event was skipped by the router and ended a
    batch read. A stored message carries what a status answer never has: an ack subject when
    a consumer delivers it, and the ``Nats-Sequence`` the server sets on a direct get's answer.
    """
    headers = msg.headers
    if not headers or "Status" not in headers:
        return None
    if msg.reply.startswith("$JS.ACK.") or "Nats-Sequence" in headers:
        return None
    return headers["Status"]


SameCheck = Callable[[Msg | None, int], Awaitable[bool]]
"""Whether a de-duplicated publish's first copy (``None``: no longer stored; and its sequence) is this message."""


class _Batch:
    """The replies to one request that answers with many messages, closed by a status message."""

    __slots__ = ("done", "got")

    def __init__(self, done: asyncio.Future[int]) -> None:
        self.got: list[Msg] = []
        self.done = done


class _Deadlines:
    """The timeouts of one connection's pending requests, behind one timer.

    A timer per request (``call_later`` and its cancel, or ``wait_for``) cost the SDK about a
    tenth of its CPU per run. Requests of the same timeout expire in the order they were made,
    so each timeout keeps its waiters in insertion order and the one timer is armed for the
    earliest head: with every reply on time, it fires about once per timeout, finds those
    requests answered and re-arms for the oldest one still waiting. A timeout is never
    reported before its deadline.
    """

    __slots__ = ("_armed_at", "_loop", "_queues", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queues: dict[float, OrderedDict[str, tuple[float, asyncio.Future[Any]]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def add(self, token: str, timeout: float, fut: asyncio.Future[Any]) -> None:
        """``fut`` fails with ``nats.errors.TimeoutError`` unless done (or dropped) within ``timeout``."""
        deadline = self._loop.time() + timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = OrderedDict()
        queue[token] = (deadline, fut)
        if self._timer is None or deadline < self._armed_at:
            self._arm(deadline)

    def drop(self, token: str, timeout: float) -> None:
        queue = self._queues.get(timeout)
        if queue is not None:
            queue.pop(token, None)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = at
        # The slack keeps a loop that rounds timers to the millisecond (uvloop) from waking a
        # hair early and arming again.
        self._timer = self._loop.call_at(at + 0.001, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        earliest: float | None = None
        for timeout, queue in list(self._queues.items()):
            while queue:
                token, (deadline, fut) = next(iter(queue.items()))
                if deadline > now:
                    earliest = deadline if earliest is None else min(earliest, deadline)
                    break
                del queue[token]
                if not fut.done():
                    fut.set_exception(nats.errors.TimeoutError())
            if not queue:
                del self._queues[timeout]
        if earliest is not None:
            self._arm(earliest)


class Requests:
    """Requests of one connection, answered on one wildcard reply subscription."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._ids = itertools.count()
        self._pending: dict[str, asyncio.Future[Msg] | _Batch] = {}
        self._sub: Any = None
        self._deadlines: _Deadlines | None = None

    def _deadlines_of(self, loop: asyncio.AbstractEventLoop) -> _Deadlines:
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = _Deadlines(loop)
        return deadlines

    async def start(self) -> Requests:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        return self

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5, old_style: bool = False,
                      headers: dict[str, str] | None = None) -> Msg:
        """One reply to ``payload`` on ``subject`` (the signature of nats-py's ``Client.request``).

        Raises ``nats.errors.TimeoutError`` without a reply in ``timeout`` seconds and
        ``nats.errors.NoRespondersError`` when nobody listens on ``subject``.
        """
        loop = asyncio.get_running_loop()
        token = str(next(self._ids))
        fut: asyncio.Future[Msg] = loop.create_future()
        self._pending[token] = fut
        deadlines = self._deadlines_of(loop)
        deadlines.add(token, timeout, fut)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            msg = await fut
        finally:
            deadlines.drop(token, timeout)
            self._pending.pop(token, None)
        if not msg.data and server_status(msg) == "503":
            raise nats.errors.NoRespondersError
        return msg

    async def batch(self, subject: str, payload: bytes, timeout: float) -> tuple[list[Msg], int]:
        """The messages answering ``payload`` up to the closing status message, and that status.

        Raises ``TimeoutError`` if the closing status does not come within ``timeout``.
        """
        loop = asyncio.get_running_loop()
        token = str(next(self._ids))
        entry = _Batch(loop.create_future())
        self._pending[token] = entry
        deadlines = self._deadlines_of(loop)
        deadlines.add(token, timeout, entry.done)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token)
            status = await entry.done
        finally:
            deadlines.drop(token, timeout)
            self._pending.pop(token, None)
        return entry.got, status

    async def _on_reply(self, msg: Msg) -> None:
        waiter = self._pending.get(msg.subject[len(self._prefix):])
        if waiter is None:
            return
        if isinstance(waiter, _Batch):
            status = server_status(msg)
            if status is None:
                waiter.got.append(msg)
            elif not waiter.done.done():
                waiter.done.set_result(int(status))
        elif not waiter.done():
            waiter.set_result(msg)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None


_of_connection: weakref.WeakKeyDictionary[NATS, asyncio.Future[Requests]] = weakref.WeakKeyDictionary()


async def requests_of(nc: NATS) -> Requests:
    """The connection's shared :class:`Requests` (its reply subscription made on first use)."""
    made = _of_connection.get(nc)
    if made is not None and made.done() and made.exception() is None:
        return made.result()
    if made is None or made.done():
        made = asyncio.ensure_future(Requests(nc).start())
        _of_connection[nc] = made
    return await asyncio.shield(made)


class Publisher:
    """JetStream publishes awaiting their acks, over the connection's shared reply subscription."""

    def __init__(self, nc: NATS, timeout: float = 10.0) -> None:
        self._nc = nc
        self._timeout = timeout
        self._requests: Requests | None = None

    async def start(self) -> Publisher:
        self._requests = await requests_of(self._nc)
        return self

    @property
    def requests(self) -> Requests:
        assert self._requests is not None, "Publisher.start() first"
        return self._requests

    @property
    def nc(self) -> NATS:
        return self._nc

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None, *,
                      same: SameCheck | None = None) -> int:
        """Publish and return the stream sequence; raises the JetStream API error on refusal.

        A publish with a ``Nats-Msg-Id`` that the stream calls a duplicate returns the first
        copy's sequence, but only if that copy is this message again: the server de-duplicates
        by id across the whole stream, so anyone who may publish to any of its subjects could
        otherwise take an id first (a ``nats pub -H Nats-Msg-Id:register:…`` on an event subject
        made a run's wait registration vanish). The first copy is read back; if it is on another
        subject (or ``same`` rejects it: ``same(first, seq)``, ``first`` being ``None`` when it is
        no longer stored), the message is published again under an id of its own.
        """
        resp = await self._publish_once(subject, data, headers)
        msg_id = (headers or {}).get(_MSG_ID)
        for attempt in range(2):
            if not resp.get("duplicate") or msg_id is None:
                break
            if await self._is_first_copy(resp, subject, same):
                break
            # A foreign message holds the id: ours goes again under one nobody else could have used.
            own = f"{msg_id}~{subject}" if attempt == 0 else f"{msg_id}~{os.urandom(8).hex()}"
            log.debug("publish on %s: the message holding id %s (sequence %s) is not this one; "
                     "storing this one under %s", subject, msg_id, resp.get("seq"), own)
            resp = await self._publish_once(subject, data, {**(headers or {}), _MSG_ID: own})
        return int(resp["seq"])

    async def _publish_once(self, subject: str, data: bytes, headers: dict[str, str] | None) -> dict[str, Any]:
        try:
            msg = await self.requests.request(subject, data, timeout=self._timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise nats.js.errors.NoStreamResponseError from None
        except nats.errors.TimeoutError:
            raise TimeoutError(f"no JetStream ack within {self._timeout}s") from None
        resp: dict[str, Any] = orjson.loads(msg.data)
        err = resp.get("error")
        if err is not None:
            nats.js.errors.APIError.from_error(err)  # raises the typed error
        return resp

    async def _is_first_copy(self, resp: dict[str, Any], subject: str, same: SameCheck | None) -> bool:
        from actors.store.jetstream import leader_get  # jetstream imports this module

        # From the leader: a follower behind answers "no such message" for one the leader has just
        # acknowledged, and a copy judged gone would be stored again (a signal taken twice).
        first = await leader_get(self._nc, resp["stream"], seq=int(resp["seq"]), timeout=self._timeout)
        if same is not None:
            return await same(first, int(resp["seq"]))
        # Gone (taken, or purged) is trusted: our own earlier copy, most likely, and sending it twice
        # would deliver it twice.
        return first is None or (first.headers or {}).get("Nats-Subject") == subject

    async def publish_unacked(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish without waiting for (or asking for) the ack: for writes nothing depends on (the runs index)."""
        await self._nc.publish(subject, data, headers=headers)

    async def close(self) -> None:
        """Nothing of its own to release: the reply subscription lives as long as the connection."""
