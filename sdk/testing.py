"""Testing durable code without waiting: a real embedded server, a worker in this process, and virtual time.

    from datetime import timedelta
    from sdk.testing import BideTestEnv

    async def test_onboarding_nudge():
        async with BideTestEnv(bide, workflows=[onboarding]) as env:
            ref = await onboarding.aio_run_no_wait(Account(user_id="u1"))
            await env.skip(timedelta(days=3))   # every sleep, wait timeout and backoff due in 3 days fires now
            assert await ref.aio_result() == {"nudged": True}

Time is virtual inside the environment: ``ctx.aio_now()``, recorded wake times and wait
timeouts read the engine's clock (:class:`actors.wire.Clock`), which :meth:`BideTestEnv.skip`
moves forward. A skip moves it to each timer due in the window in turn, fires that timer,
and lets the worker finish what it started before looking for the next, so a 1-day
sleep followed by another 1-day sleep both fire in a 3-day skip, in order, each seeing
the time it was due. Timers the skip does not reach fire on their own, at the wall-clock
moment they are due. The clock is this process's: one environment at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from actors.jetstream import api_request, direct_get_subject
from actors.server import EmbeddedServer
from actors.wire import HDR_BIDE_DUE, HDR_SCHEDULE, HDR_SCHEDULE_TARGET, Clock, utcnow
from sdk.worker import Worker

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from sdk.client import Bide
    from sdk.tasks import TaskDefinition
    from sdk.workflow import Workflow

__all__ = ["BideTestEnv"]

_SCHEDULE_HEADERS = (HDR_SCHEDULE, HDR_SCHEDULE_TARGET, HDR_BIDE_DUE, "Nats-TTL", "Nats-Schedule-TTL")


@dataclasses.dataclass(frozen=True)
class _Timer:
    due: datetime
    seq: int
    subject: str
    target: str
    data: bytes
    headers: dict[str, str]


class BideTestEnv:
    """A real ``nats-server`` on a free port with a temporary store, the client pointed at it, and a worker.

    Args:
        client: the application's :class:`sdk.Bide`; it is pointed at the environment's
            server while the environment is open, and back where it was after.
        workflows: the tasks and workflows the worker hosts.
        slots, durable_slots: the worker's concurrency, as for ``client.worker``.
        settle_timeout: how long :meth:`skip` waits for the worker to finish what a fired
            timer started before it gives up with ``TimeoutError``.

    Everything is stopped and removed on exit, even when the test fails.
    """

    def __init__(self, client: Bide, workflows: Sequence[TaskDefinition | Workflow] = (), *, slots: int = 100,
                 durable_slots: int = 1000, settle_timeout: float = 30.0) -> None:
        self.client = client
        self._workflows = list(workflows)
        self._slots = slots
        self._durable_slots = durable_slots
        self._settle_timeout = settle_timeout
        self._server: EmbeddedServer | None = None
        self._worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._saved_url: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> BideTestEnv:
        if Clock.offset:
            raise RuntimeError("another BideTestEnv is open in this process: its virtual clock is shared; "
                               "open one at a time")
        self._server = await asyncio.to_thread(EmbeddedServer().start)
        try:
            self._saved_url = self.client.config.nats_url
            await self.client._retarget(self._server.url)
            if self._workflows:
                self._worker = self.client.worker("bide-test-env", workflows=self._workflows, slots=self._slots,
                                                  durable_slots=self._durable_slots)
                ready = asyncio.Event()
                self._worker_task = asyncio.create_task(self._worker.async_start(ready=ready))
                waiting = asyncio.create_task(ready.wait())
                done, _ = await asyncio.wait([self._worker_task, waiting], return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                if self._worker_task in done:
                    self._worker_task.result()  # the worker failed to start: say why
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        try:
            if self._worker is not None and self._worker_task is not None:
                await self._worker.shutdown()
                await asyncio.wait_for(self._worker_task, 30)
        finally:
            self._worker = self._worker_task = None
            try:
                if self._saved_url is not None:
                    await self.client._retarget(self._saved_url)
            finally:
                Clock.offset = timedelta(0)
                if self._server is not None:
                    self._server.kill()
                    self._server.stop()
                    self._server = None

    # -- time --------------------------------------------------------------------------------

    def now(self) -> datetime:
        """The environment's time (what ``ctx.aio_now()`` returns in a new checkpoint)."""
        return utcnow()

    async def skip(self, duration: timedelta) -> None:
        """Move time forward by ``duration``, firing in order every timer due on the way.

        Durable sleeps, wait timeouts (``timeout=`` and ``SleepCondition``), retry backoffs
        and schedule timeouts due within the window fire now, each once the worker has
        finished what the previous one started; a timer set on the way that falls inside
        the window fires too.
        """
        if not isinstance(duration, timedelta):
            raise TypeError(f"skip() takes a datetime.timedelta, not {type(duration).__name__} ({duration!r})")
        if duration < timedelta(0):
            raise ValueError(f"skip() cannot move time backwards: {duration}")
        target = utcnow() + duration
        fired: set[int] = set()
        while True:
            await self._settle()
            due = [t for t in await self._timers() if t.due <= target and t.seq not in fired]
            if not due:
                break
            first = min(due, key=lambda t: (t.due, t.seq))
            self._advance_to(first.due)
            for t in sorted(due, key=lambda t: (t.due, t.seq)):
                if t.due <= utcnow():
                    await self._fire(t)
                    fired.add(t.seq)
        self._advance_to(target)
        await self._settle()

    def _advance_to(self, at: datetime) -> None:
        gap = at - utcnow()
        if gap > timedelta(0):
            Clock.offset += gap

    async def _timers(self) -> list[_Timer]:
        conn = await self.client._pool.get()
        s = conn.layout.subjects
        msgs: list[Msg] = await direct_get_subject(conn.nc, s.work_stream, s.timers_all, timeout=10.0)
        out = []
        for m in msgs:
            h = dict(m.headers or {})
            schedule = h.get(HDR_SCHEDULE, "")
            if not schedule.startswith("@at ") or HDR_SCHEDULE_TARGET not in h:
                continue
            due = _parse(h.get(HDR_BIDE_DUE) or schedule[4:])
            headers = {k: v for k, v in h.items() if not k.startswith("Nats-") and k not in _SCHEDULE_HEADERS}
            out.append(_Timer(due, int(h["Nats-Sequence"]), h["Nats-Subject"], h[HDR_SCHEDULE_TARGET], m.data,
                              headers))
        return out

    async def _fire(self, t: _Timer) -> None:
        """What the server would publish at the timer's moment, now; then the schedule goes (only that one)."""
        conn = await self.client._pool.get()
        s = conn.layout.subjects
        await conn.js.publish(t.target, t.data, headers=t.headers or None)
        await api_request(conn.nc, f"$JS.API.STREAM.PURGE.{s.work_stream}", {"filter": t.subject, "seq": t.seq + 1})

    async def _settle(self) -> None:
        """Until nothing is queued or in flight for the worker or the event router, twice in a row."""
        conn = await self.client._pool.get()
        s = conn.layout.subjects
        deadline = time.monotonic() + self._settle_timeout
        quiet = 0
        busy: list[str] = []
        while quiet < 2:
            busy = []
            for stream in (s.work_stream, s.events_stream):
                listing = await api_request(conn.nc, f"$JS.API.CONSUMER.LIST.{stream}", {})
                for c in listing.get("consumers") or []:
                    if c.get("num_pending", 0) or c.get("num_ack_pending", 0):
                        busy.append(f"{stream}/{c['name']}")
            quiet = 0 if busy else quiet + 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not settle within {self._settle_timeout}s: "
                                   f"{', '.join(busy)} still have work queued or in flight")
            await asyncio.sleep(0.01)


def _parse(raw: str) -> datetime:
    return datetime.fromisoformat(raw.replace("Z", "+00:00"))
