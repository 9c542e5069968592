"""Testing durable code without waiting: a real embedded server, a worker in this process, and virtual time.

    from datetime import timedelta
    from sdk.testing import BideTestEnv

    async def test_onboarding_nudge():
        async with BideTestEnv(bide, workflows=[onboarding]) as env:
            ref = await onboarding.aio_run_no_wait(Account(user_id="u1"))
            await env.skip(timedelta(days=3))   # every sleep, wait timeout and backoff due in 3 days fires now
            assert await ref.aio_result() == {"nudged": True}

Time is virtual inside the environment: ``ctx.aio_now()``, recorded wake times and wait
timeouts read the engine's clock (:class:`actors.engine.wire.Clock`), which :meth:`BideTestEnv.skip`
moves forward. A skip moves it to each timer due in the window in turn, fires that timer,
and lets the worker finish what it started before looking for the next, so a 1-day
sleep followed by another 1-day sleep both fire in a 3-day skip, in order, each seeing
the time it was due. Timers the skip does not reach fire on their own, at the wall-clock
moment they are due. The clock is this process's: one environment at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from actors.engine.run_history import RunHistory, import_run
from actors.engine.wire import (
    HDR_BIDE_DUE,
    HDR_SCHEDULE,
    HDR_SCHEDULE_TARGET,
    ChildrenSpawned,
    Clock,
    RunCompleted,
    parse_time,
    utcnow,
)
from actors.store.jetstream import api_request, direct_get_subject
from actors.store.server import EmbeddedServer
from sdk.errors import NonDeterminismError
from sdk.tasks import TaskDefinition
from sdk.worker import Worker
from sdk.workflow import Workflow

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from sdk.client import Bide

__all__ = ["BideTestEnv", "aio_replay", "replay"]

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

    _open: ClassVar[BideTestEnv | None] = None
    """The environment open in this process (one at a time: the clock is the process's)."""

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
        if BideTestEnv._open is not None:
            raise RuntimeError("another BideTestEnv is open in this process; the virtual clock is the process's, "
                               "so open one at a time")
        BideTestEnv._open = self
        try:
            self._server = await asyncio.to_thread(EmbeddedServer().start)
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
                BideTestEnv._open = None
                if self._server is not None:
                    self._server.kill()
                    self._server.stop()
                    self._server = None

    @property
    def worker(self) -> Worker:
        """The worker hosting the environment's tasks (``RuntimeError`` if none were given)."""
        if self._worker is None:
            raise RuntimeError("this BideTestEnv hosts no tasks: pass workflows=[...]")
        return self._worker

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
            due = parse_time(h.get(HDR_BIDE_DUE) or schedule[4:])
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
            for stream in (s.queue_stream, s.work_stream, s.events_stream):
                listing = await api_request(conn.nc, f"$JS.API.CONSUMER.LIST.{stream}", {})
                for c in listing.get("consumers") or []:
                    if c.get("num_pending", 0) or c.get("num_ack_pending", 0):
                        busy.append(f"{stream}/{c['name']}")
            quiet = 0 if busy else quiet + 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not settle within {self._settle_timeout}s: "
                                   f"{', '.join(busy)} still have work queued or in flight")
            await asyncio.sleep(0.01)


# -- the replayer -----------------------------------------------------------------------------


def replay(history: str | os.PathLike[str] | dict[str, Any] | RunHistory,
           workflows: Sequence[TaskDefinition | Workflow]) -> None:
    """Replay a run's history against the code in ``workflows``, with no server.

    ``history`` is what ``bide runs export`` wrote: its text, its parsed JSON, or the path
    of the file. Returns normally when the code is compatible with the history (it asks for
    the same checkpoints in the same order, as far as the history goes); raises
    :class:`sdk.NonDeterminismError` naming the position and both calls when it does not.
    Nothing the code would do past the history runs: no step, no child, no write.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(aio_replay(history, workflows))
        return
    # Called from async code (an async test): replay on a loop of its own, in a thread.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bide-replay") as pool:
        pool.submit(asyncio.run, aio_replay(history, workflows)).result()


async def aio_replay(history: str | os.PathLike[str] | dict[str, Any] | RunHistory,
                     workflows: Sequence[TaskDefinition | Workflow]) -> None:
    """:func:`replay`, from async code."""
    hist = _load_history(history)
    task = hist.started.task
    by_name: dict[str, TaskDefinition] = {}
    for w in workflows:
        if isinstance(w, Workflow):
            by_name[w.runner.name] = w.runner
            by_name.update({t.name: t for t in w.tasks})
        elif isinstance(w, TaskDefinition):
            by_name[w.name] = w
        else:
            raise TypeError(f"replay: workflows= takes tasks and workflows, got {w!r}")
    defn = by_name.get(task)
    if defn is None:
        raise ValueError(f"run {hist.run_id} is a run of task {task!r}, which is not among the given workflows "
                         f"({', '.join(sorted(by_name)) or 'none'})")
    if defn.workflow is not None:
        _replay_dag(hist, defn.workflow)
    elif not defn.runs_durably:
        raise ValueError(f"task {task!r} is not durable: a regular task runs again from the top on a retry, "
                         "so it has no checkpoints to replay")
    else:
        await _replay_durable(hist, defn)


def _load_history(history: Any) -> RunHistory:
    if isinstance(history, RunHistory):
        return history
    if isinstance(history, dict):
        return import_run(history)
    if isinstance(history, os.PathLike) or (isinstance(history, str) and not history.lstrip().startswith("{")):
        path = Path(history)
        if not path.is_file():
            raise FileNotFoundError(f"no run export at {str(path)!r} (write one with `bide runs export RUN_ID`)")
        history = path.read_text()
    if not isinstance(history, str):
        raise TypeError(f"replay takes an export's text, its parsed JSON or a path, got {type(history).__name__}")
    try:
        doc = json.loads(history)
    except json.JSONDecodeError as e:
        raise ValueError(f"the run export is not JSON: {e}") from e
    return import_run(doc)


async def _no_writes(command: Any) -> None:
    """A replay writes nothing: a turn that tries is a bug in the replayer, not in the user's code."""
    raise AssertionError(f"a replay-only turn tried to carry out {type(command).__name__}")


async def _replay_durable(hist: RunHistory, defn: TaskDefinition) -> None:
    from actors.engine.decisions import failed_attempts
    from actors.engine.replay import HistoryEnded, Turn
    from sdk.context import DurableContext, current_runtime

    started = hist.started
    turn = Turn(history=hist, effects=_no_writes, task=defn.name, host_id="replay", delivery=1,
                replay_only=True)
    value = defn.signature.load_input(started.input)
    retry_count = failed_attempts(hist)
    ctx = DurableContext(hist.run_id, defn.name, 1, started.input, turn, retry_count=retry_count,
                         parents=started.parents, additional_metadata=started.additional_metadata)

    async def drive() -> Any:
        current_runtime.set(turn)
        return await defn.entry(value, ctx)

    user = asyncio.create_task(drive(), name=f"bide-replay:{hist.run_id}")
    try:
        await asyncio.wait({user, turn.suspended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        parked = not user.done()
        user.cancel()
        with contextlib.suppress(BaseException):
            await user
    if isinstance(turn.fatal, NonDeterminismError):
        raise turn.fatal
    if turn.fatal is not None:
        raise RuntimeError(f"the replay of run {hist.run_id} failed: {turn.fatal!r}") from turn.fatal
    if parked:
        return  # the code waits where the run waited: compatible as far as the history goes
    exc = user.exception() if not user.cancelled() else None
    terminal = hist.terminal
    if isinstance(exc, HistoryEnded):
        if terminal is not None and isinstance(terminal, RunCompleted):
            raise NonDeterminismError(hist.run_id, exc.pos, "the end of the run (it completed there)", exc.requested)
        return
    if isinstance(exc, NonDeterminismError):
        raise exc
    left = turn.recorded_positions
    if turn.next_position < left:
        recorded = turn.describe_position(turn.next_position)
        ending = "an end (it returned)" if exc is None else f"an end (it raised {type(exc).__name__}: {exc})"
        raise NonDeterminismError(hist.run_id, turn.next_position, recorded, ending)


def _replay_dag(hist: RunHistory, wf: Workflow) -> None:
    """A workflow run's recorded tasks must be the tasks the workflow now has at the same places."""
    steps = wf.order()
    for e in hist.entries:
        if not isinstance(e, ChildrenSpawned):
            continue
        now = steps[e.pos].name if e.pos < len(steps) else None
        if now != e.task:
            raise NonDeterminismError(hist.run_id, e.pos, f"task {e.task!r} started",
                                      f"task {now!r}" if now is not None else "no task there (the DAG is smaller)")
