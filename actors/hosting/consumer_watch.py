"""A pull consumer that may have been deleted by hand: noticed from a pull's answer, made again.

A pull on a consumer removed with ``nats consumer rm`` is answered ``409 Consumer Deleted``, then
``503`` (nothing answers for it) for ever. The task queues and the event router share this: each
pauses its pulls for a moment, checks that the consumer exists and, if it does not, creates it with
the configuration every host gives it at start. A 503 while the consumer exists (a cluster
electing a leader) only pauses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.store.jetstream import recreate_if_missing
from actors.store.requests import server_status

log = logging.getLogger("bide.consumers")

_GONE_PAUSE_S = 1.0
"""How long pulls pause after one found the consumer gone (or unanswered)."""


def consumer_gone(msg: Msg) -> bool | None:
    """``True`` if a pull's status answer says the consumer was deleted, ``False`` if nothing answered
    for it (503), ``None`` for any other answer."""
    status = server_status(msg)
    if status == "503":
        return False
    if status == "409" and "deleted" in (msg.headers or {}).get("Description", "").lower():
        return True
    return None


class ConsumerWatch:
    """Makes ``consumer`` of ``stream`` again (with ``create``) when pulls find it gone."""

    def __init__(self, nc: NATS, stream: str, consumer: str, create: Callable[[], Awaitable[object]], *,
                 on_recreated: Callable[[], None] | None = None) -> None:
        self._nc = nc
        self._stream = stream
        self._consumer = consumer
        self._create = create
        self._on_recreated = on_recreated
        self._quiet_until = 0.0
        self._checking: asyncio.Task[None] | None = None

    def gone(self) -> None:
        """A pull found no consumer: pause the pulls, and check (once at a time) whether it exists."""
        self._quiet_until = time.monotonic() + _GONE_PAUSE_S
        if self._checking is not None and not self._checking.done():
            return
        self._checking = asyncio.create_task(self._check(), name=f"check:{self._stream}.{self._consumer}")

    async def pause(self) -> None:
        """Before a pull: wait out the pause a missing consumer began."""
        if (wait := self._quiet_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)

    async def _check(self) -> None:
        try:
            if await recreate_if_missing(self._nc, self._stream, self._consumer, self._create):
                log.warning("consumer %s of %s had been deleted; it was created again", self._consumer, self._stream)
                if self._on_recreated is not None:
                    self._on_recreated()
        except Exception as e:  # the server is away or electing: the next pull that finds it gone tries again
            log.debug("checking consumer %s of %s failed: %s", self._consumer, self._stream, e)
