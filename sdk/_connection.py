"""One NATS connection per event loop, and a private loop thread for the sync API.

A nats-py connection is bound to the loop that created it. Users mix sync calls
(``task.run_no_wait(...)``) with async ones in later ``asyncio.run(...)`` calls,
so a connection is looked up by the *running* loop and never reused on another.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from actors.engine.wire import decode_terminal, decode_token, encode_token
from actors.observe.tracing import Tracing
from actors.store.history import HistoryLog
from actors.store.jetstream import Layout, connect, ensure_streams, missing_streams
from actors.store.requests import Publisher
from sdk.config import BideConfig

T = TypeVar("T")


class ResultInbox:
    """One subscription per connection for the results of the runs it started and awaits.

    The starter names ``<inbox>.<run>`` in the run's first entry; the host that ends the
    run sends the terminal entry there too. One wildcard subscription replaces a
    subscription per run. Delivery is best effort: waiters also check the history.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._waiters: dict[str, asyncio.Future[Any]] = {}
        self._sub: Any = None

    async def open(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + ".*", cb=self._on_msg)

    def subject(self, run_id: str) -> str:
        return f"{self._prefix}.{encode_token(run_id)}"

    def expect(self, run_id: str) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[run_id] = fut
        return fut

    def forget(self, run_id: str) -> None:
        self._waiters.pop(run_id, None)

    async def _on_msg(self, msg: Msg) -> None:
        fut = self._waiters.pop(decode_token(msg.subject.rsplit(".", 1)[-1]), None)
        if fut is None or fut.done():
            return
        end = decode_terminal(msg.data)
        if end is not None:
            fut.set_result(end)


@dataclass
class Connection:
    nc: NATS
    js: JetStreamContext
    history: HistoryLog
    layout: Layout
    results: ResultInbox
    publisher: Publisher
    tracing: Tracing
    config: BideConfig


class ConnectionPool:
    """Lazily connects once per event loop; closes everything on :meth:`close`."""

    def __init__(self, config: BideConfig, name: str = "bide-client", tracing: Tracing | None = None) -> None:
        self.config = config
        self.layout = Layout.from_config(config)
        self.tracing = tracing or Tracing(config.prefix)
        self._name = name
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[Connection]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._portal: _Portal | None = None
        self._streams_ready = False

    async def get(self) -> Connection:
        loop = asyncio.get_running_loop()
        with self._lock:
            fut = self._by_loop.get(loop)
            if fut is None or (fut.done() and (fut.exception() is not None or fut.result().nc.is_closed)):
                fut = loop.create_future()
                self._by_loop[loop] = fut
                owner = True
            else:
                owner = False
        if not owner:
            return await asyncio.shield(fut)
        try:
            conn = await self._open()
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: the next call retries
            with self._lock:
                self._by_loop.pop(loop, None)
            raise
        fut.set_result(conn)
        return conn

    async def _open(self) -> Connection:
        nc = await connect(self.config.nats_url, name=self._name, connect_timeout=self.config.connect_timeout_s,
                           auth=self.config.nats_auth)
        js = nc.jetstream(timeout=10.0)
        if not self._streams_ready:
            await _streams_in_place(nc, js, self.layout)
            self._streams_ready = True
        results = ResultInbox(nc)
        await results.open()
        publisher = await Publisher(nc).start()
        return Connection(nc, js, HistoryLog(nc, publisher, self.layout.subjects), self.layout, results, publisher,
                          self.tracing, self.config)

    async def retarget(self, config: BideConfig) -> None:
        """Close every connection and connect to ``config`` from now on (a test environment's server)."""
        await self.aclose()  # this loop's connection
        await asyncio.to_thread(self.close)  # the sync API's
        with self._lock:
            self._by_loop.clear()
            self.config = config
            self.layout = Layout.from_config(config)
            self._streams_ready = False

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to completion from plain (non-async) code on the private loop thread.

        Refused inside an async task, on its worker's event loop: waiting there would stop the
        worker, the very one that may have to run what is waited for. A synchronous task runs in a
        thread of its own and may call it.
        """
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and task_loop.get() is loop:
            name = getattr(coro, "__qualname__", "this call")
            coro.close()
            raise RuntimeError(f"{name.replace('aio_', '')}() is synchronous: inside an async task it would block "
                               f"the worker's event loop; use `await ...{name.rpartition('.')[2]}(...)` there")
        with self._lock:
            if self._portal is None:
                self._portal = _Portal()
            portal = self._portal
        return portal.run(coro)

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            fut = self._by_loop.pop(loop, None)
        if fut is not None and fut.done() and fut.exception() is None:
            conn = fut.result()
            await conn.publisher.close()
            await conn.nc.close()

    def close(self) -> None:
        with self._lock:
            portal, self._portal = self._portal, None
        if portal is not None:
            portal.run(self.aclose())
            portal.stop()


task_loop: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "bide_task_loop", default=None)
"""Set while a task's code runs (``TaskDefinition.entry``): the event loop of the worker running it."""


class _Portal:
    """A daemon thread running an event loop, for the synchronous API."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bide-sync", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("the synchronous Bide API cannot be called from its own loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


class StreamsMissingError(ConnectionError):
    """Bide's streams do not exist and this connection's NATS user may not create them."""


async def _streams_in_place(nc: NATS, js: JetStreamContext, layout: Layout) -> None:
    """Create Bide's streams if they are missing; a client never changes streams that exist.

    Hosts own the streams' configuration (each ``bide worker`` creates or updates them at start).
    A client only needs them to exist, so a client's NATS user (the HTTP API's, a service that
    starts runs) needs no right to create, update or delete streams: see deploy/nats/accounts.conf.
    """
    missing: list[str] | None
    try:
        missing = await missing_streams(nc, layout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError):
        missing = None  # not allowed to list them: create or update them, as a host would
    if missing == []:
        return
    try:
        await ensure_streams(js, layout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
        which = f"streams {', '.join(missing)} do not exist" if missing else "streams could not be listed"
        raise StreamsMissingError(
            f"Bide's {which} and creating them got no answer "
            f"({type(e).__name__}): start a host first (`bide worker`), or connect as a NATS user "
            "allowed to create streams") from None
