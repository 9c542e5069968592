"""A host's background rounds: something done every ``interval_s``, jittered so hosts do not ask together."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from actors.store.jetstream import is_transient


class Periodic:
    """Calls ``round()`` every ``interval_s`` (±20 %) until stopped. A round that fails is logged
    (at debug level when the server is away, a warning otherwise) and the next one comes."""

    def __init__(self, name: str, interval_s: float, round: Callable[[], Awaitable[None]],
                 log: logging.Logger, what: str) -> None:
        self._name = name
        self._interval = interval_s
        self._round = round
        self._log = log
        self._what = what
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval * random.uniform(0.8, 1.2))
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the server is away, or refuses: next round
                self._log.log(logging.DEBUG if is_transient(e) else logging.WARNING, "%s failed: %s", self._what, e)
