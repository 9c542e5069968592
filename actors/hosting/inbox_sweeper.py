"""The inbox sweeper: a signal whose sender died before the activation still wakes its run.

Delivering a signal is two writes (``actors.store.protocol.deliver_signal``): the inbox message,
then the activation. A sender that dies between them leaves a signal no activation
announces; a run that waits for nothing else would wait for ever (invariant 12).

Every host pulls a shared durable consumer on ``<prefix>.inbox.>``, a few seconds behind.
A run's host takes every inbox message into the history at its next turn and purges the
inbox, so by the time the sweeper looks, a delivered signal has usually left the stream and
is never delivered to it at all: in the common case the sweeper costs nothing. What is
still there and older than ``sweep_after_s`` is checked against the run's history, and if
no turn has taken it, the sweeper publishes the activation its sender did not.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from functools import partial
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.engine.wire import HDR_BIDE_KIND, HDR_MSG_ID, Activation, decode_token, encode_activation
from actors.store.history import HistoryLog
from actors.store.jetstream import Layout, api_request, is_transient, recreate_if_missing
from actors.store.requests import Publisher

log = logging.getLogger("bide.sweeper")

_BATCH = 256

SWEEP_ACK_WAIT_S = 10.0
"""How long a fetched signal stays with a sweeper before another host's may take it up: a sweeper
killed mid-batch held its signals 30 s (``tests/integration/test_sweeper_crash.py``). A batch
takes a history read per signal old enough, well under this; a slower one is checked twice,
and its activation is stored once (its id is ``sweep:<run>:<seq>``)."""


async def ensure_inbox_sweeper_consumer(nc: NATS, layout: Layout) -> None:
    """The shared consumer (created idempotently by every process that starts)."""
    s = layout.subjects
    config: dict[str, Any] = {
        "durable_name": s.inbox_sweeper_consumer,
        "filter_subject": s.inbox_all,
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": int(SWEEP_ACK_WAIT_S * 1e9),
        "max_deliver": -1,
        "max_ack_pending": 10_000,
        "num_replicas": layout.replicas,
    }
    await api_request(nc, f"$JS.API.CONSUMER.CREATE.{s.history_stream}.{s.inbox_sweeper_consumer}",
                      {"stream_name": s.history_stream, "config": config})


class InboxSweeper:
    """Finds inbox signals no turn took after ``sweep_after_s`` and publishes their activation."""

    def __init__(self, nc: NATS, publisher: Publisher, history: HistoryLog, layout: Layout,
                 sweep_after_s: float) -> None:
        self._nc = nc
        self._pub = publisher
        self._history = history
        self._layout = layout
        self._s = layout.subjects
        self._after = sweep_after_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.swept = 0

    async def start(self) -> InboxSweeper:
        self._task = asyncio.create_task(self._loop(), name="bide-inbox-sweeper")
        return self

    async def stop(self) -> None:
        # A flag as well as the cancel: nats-py's fetch can swallow a cancellation (it then fails
        # with "connection closed" once the host closes its connection), and the loop went on for ever.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)

    async def _loop(self) -> None:
        js = self._nc.jetstream()
        sub = await js.pull_subscribe_bind(durable=self._s.inbox_sweeper_consumer, stream=self._s.history_stream)
        # Look a little less often than signals become old enough: most are taken and gone by then.
        interval = max(0.5, self._after / 2)
        while not self._stopping:
            try:
                msgs = await sub.fetch(_BATCH, timeout=interval)
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("inbox sweeper fetch failed: %s", e)
                await self._recreate_consumer()
                await asyncio.sleep(interval)
                continue
            for m in msgs:
                try:
                    await self._check(m)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    if not is_transient(e):
                        log.exception("inbox sweeper: message on %s skipped", m.subject)
                        await m.ack()
                        continue
                    await m.nak(delay=interval)
            if len(msgs) < _BATCH:
                await asyncio.sleep(interval)

    async def _recreate_consumer(self) -> None:
        """A fetch failed: if the shared consumer was deleted (``nats consumer rm``), make it again."""
        try:
            if await recreate_if_missing(self._nc, self._s.history_stream, self._s.inbox_sweeper_consumer,
                                         partial(ensure_inbox_sweeper_consumer, self._nc, self._layout)):
                log.warning("the inbox sweeper's consumer had been deleted; it was created again")
        except Exception as e:  # the server is away: the next failed fetch tries again
            log.debug("inbox sweeper: checking its consumer failed: %s", e)

    async def _check(self, m: Msg) -> None:
        meta = m.metadata
        stamp = meta.timestamp if isinstance(meta.timestamp, datetime) else datetime.now(UTC)
        age = (datetime.now(UTC) - stamp).total_seconds()
        if age < self._after:
            await m.nak(delay=self._after - age)
            return
        run_id = decode_token(m.subject.rsplit(".", 1)[-1])
        seq = meta.sequence.stream
        hist = await self._history.read(run_id, inbox_seq=seq)
        untaken = {q for q, _ in hist.inbox}
        if hist.entries and hist.terminal is None and seq in untaken:
            task = hist.started.task
            act = Activation(run_id=run_id, task=task, kind="signal", inbox_seq=seq)
            await self._pub.publish(self._s.queue(task, run_id), encode_activation(act),
                                    {HDR_BIDE_KIND: "signal", HDR_MSG_ID: f"sweep:{run_id}:{seq}"})
            self.swept += 1
            log.warning("run %s: a signal (inbox %d) had no activation after %.0fs; woke the run", run_id, seq, age)
        await m.ack()
