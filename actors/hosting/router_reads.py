"""How the event router reads the events stream outside its consumer, completely (invariant 13).

Direct gets are answered by any replica, and a follower may lag; a replica holds a prefix
of the stream, so a read is complete up to its last message. Each read here proves it
reached far enough: a rebuild's read finds a marker published before it, a gap's read
finds the message just delivered after the gap, a lookback asks the leader
(:func:`actors.store.jetstream.read_before`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from functools import partial

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.engine.wire import HDR_TTL, Subjects, utcnow
from actors.store.jetstream import delete_message, direct_get_pages, direct_get_subject, retry_transient
from actors.store.requests import Publisher

log = logging.getLogger("bide.router")

_TRIES = 100
"""Reads tried (50 ms apart) before a replica is expected to hold what was just written."""
_MARKER_TTL = "1h"
"""A marker's backstop expiry (it is deleted once found): longer than any rebuild's read, which it ends."""


def seq_of(m: Msg) -> int:
    """The stream sequence of a message read by a get."""
    return int((m.headers or {}).get("Nats-Sequence", "0"))


class StreamReads:
    """The router's reads of the events stream, each proven complete."""

    def __init__(self, nc: NATS, publisher: Publisher, subjects: Subjects) -> None:
        self._nc = nc
        self._pub = publisher
        self._s = subjects
        self._chores: set[asyncio.Task[None]] = set()

    async def through_marker(self, family: str, subject: str) -> AsyncGenerator[Msg]:
        """Every message on ``subject`` up to a marker published now, a page at a time.

        Each page holds a prefix of the stream, so a page that ends before the marker (a
        lagging replica) is read on from its last message, not from the start. The caller
        may stop early (a rebuild stops past its floor).
        """
        mark = await self.publish_marker(family)
        start = 0
        try:
            for _ in range(_TRIES):
                pages = direct_get_pages(self._nc, self._s.events_stream, subject, start_seq=start, timeout=30.0)
                async with contextlib.aclosing(pages):
                    async for page in pages:
                        for m in page:
                            seq = seq_of(m)
                            yield m
                            if seq >= mark:
                                return
                            start = seq + 1
                await asyncio.sleep(0.05)
            raise TimeoutError(f"no replica answered with the router's marker {mark} on {subject}")
        finally:
            self.forget_marker(mark)

    async def between(self, first: int, last: int) -> list[Msg]:
        """Every stream message ``first..last`` and at least one more (the message after a gap).

        The read goes one past ``last``: that message was delivered already, so finding it
        proves the replica that answered holds the whole range.
        """
        async def read() -> list[Msg]:
            for _ in range(_TRIES):
                msgs = await direct_get_subject(
                    self._nc, self._s.events_stream, f"{self._s.prefix}.>", start_seq=first,
                    batch=min(256, last - first + 2), limit=last - first + 2, timeout=30.0)
                if msgs and seq_of(msgs[-1]) > last:
                    return msgs
                await asyncio.sleep(0.05)
            log.warning("router: message %d not found after the gap %d..%d; going on with what was read",
                        last + 1, first, last)
            return msgs

        msgs: list[Msg] = await retry_transient("router gap read", read)
        return msgs

    async def publish_marker(self, family: str) -> int:
        """A marker on the family's subjects; its sequence bounds a read that must be complete."""
        seq: int = await self._pub.publish(self._s.router_barrier(family), b"", {HDR_TTL: _MARKER_TTL})
        return seq

    def forget_marker(self, seq: int) -> None:
        """The marker has done its work: delete it now (its TTL is the backstop)."""
        async def delete() -> None:
            try:
                # Retried through an election for a while; an owner killed before this leaves it to its TTL.
                await retry_transient(f"delete of router marker {seq}", partial(
                    delete_message, self._nc, self._s.events_stream, seq, timeout=2.0), deadline_s=60.0)
            except Exception as e:
                log.debug("router: marker %d not deleted (%s); it expires", seq, e)

        task = asyncio.create_task(delete())
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def close(self) -> None:
        """Stop deleting markers (a stopping host's are left to their TTL)."""
        for task in list(self._chores):
            task.cancel()
        if self._chores:
            await asyncio.wait(self._chores, timeout=2.0)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def stored_at(m: Msg) -> datetime:
    """When a delivered message was stored, to the microsecond, exactly as :func:`parse_time` reads it from a get.

    An event handled live and the same event read back from the stream (a gap, a catch-up)
    must give the same time: a triggered run's id and a signal's content depend on it.
    """
    try:
        tokens = Msg.Metadata._get_metadata_fields(m.reply)
        ns = int(tokens[7] if len(tokens) == 9 else tokens[Msg.Ack.Timestamp])
    except Exception:
        return utcnow()
    return _EPOCH + timedelta(microseconds=ns // 1000)
