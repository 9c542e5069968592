"""Heartbeats for activations being worked on, sent from a thread with its own connection.

A host tells JetStream that an activation is still being worked on (``+WPI`` on the
message's reply subject), so the ack wait can be short: a dead host's work is redelivered
within one ack wait, and a live host's long turn is not. The heartbeat must go on while user
code runs, even code that blocks the host's event loop (a synchronous memo step), so it runs
on a thread of its own, with a connection of its own: an ack is a plain publish to the reply
subject, any connection of the account may send it.

For the same reason the thread answers other hosts' question "is a turn of run R running
code here?" (:attr:`actors.engine.wire.Subjects.turn_query`): a host whose code blocks its
loop is still alive, and its turn still under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

from nats.aio.msg import Msg

from actors.hosting import event_loop
from actors.store.jetstream import connect
from sdk.config import NatsAuth

log = logging.getLogger("bide.heartbeat")

_IN_PROGRESS = b"+WPI"


class Heartbeat:
    """Sends ``in_progress`` for every tracked activation every ``interval`` seconds."""

    def __init__(self, url: str, interval: float, *, name: str = "bide-heartbeat",
                 connect_timeout: float = 2.0, auth: NatsAuth | None = None, answers: str | None = None) -> None:
        self._url = url
        self._answers = answers
        """The subject of the turn query this thread answers (none: it answers nothing)."""
        self._running: dict[str, int] = {}
        """Runs whose code runs on this host now: how many turns of each (written by the host's loop only)."""
        self._auth = auth
        self._interval = interval
        self._name = name
        self._connect_timeout = connect_timeout
        self._replies: dict[int, tuple[str, float]] = {}
        """Reply subjects of the activations in flight and when each was taken, by ``id(msg)``; written by
        the host's loop only."""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.beats = 0
        """How many rounds were sent (tests read it)."""

    def track(self, msg: Msg) -> None:
        if msg.reply:
            self._replies[id(msg)] = (msg.reply, time.monotonic())

    def untrack(self, msg: Msg) -> None:
        self._replies.pop(id(msg), None)

    @contextlib.contextmanager
    def running(self, run_id: str) -> Iterator[None]:
        """Inside, this host answers that a turn of ``run_id`` is running code here."""
        self._running[run_id] = self._running.get(run_id, 0) + 1
        try:
            yield
        finally:
            left = self._running.pop(run_id) - 1
            if left:
                self._running[run_id] = left

    async def start(self) -> None:
        """Start the thread and wait until its connection is up (raising its error if it fails)."""
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self._name, daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)

    async def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # the thread's loop just ended
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def _run(self, ready: Future[None]) -> None:
        try:
            event_loop.run(self._main(ready))
        except BaseException as e:  # the host learns of a failed start through ``ready``
            if not ready.done():
                ready.set_exception(e)
            else:
                log.exception("heartbeat thread ended")

    async def _main(self, ready: Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await connect(self._url, name=self._name, connect_timeout=self._connect_timeout, auth=self._auth)
        if self._answers is not None:
            await nc.subscribe(self._answers, cb=self._answer)
        ready.set_result(None)
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), self._interval)
                    break
                except TimeoutError:
                    pass
                # Only what was taken at least half an interval ago: its first beat then comes within
                # 1.5 intervals (half the ack wait), and the many turns that end sooner cost none.
                due = time.monotonic() - self._interval / 2
                for reply, since in self._replies.copy().values():  # a copy is atomic; the host's loop writes
                    if since > due:
                        continue
                    try:
                        await nc.publish(reply, _IN_PROGRESS)
                    except Exception:
                        log.debug("heartbeat failed for %s", reply, exc_info=True)
                self.beats += 1
        finally:
            await nc.close()

    async def _answer(self, msg: Msg) -> None:
        if msg.reply and msg.data.decode(errors="replace") in self._running:  # a lookup is atomic
            await msg.respond(b"running")
