"""Starting runs, waiting for their results, and reading their state — without the runtime."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from actors.engine.child_ids import CHILD_ID_SEPARATOR
from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    TERMINAL,
    RunCompleted,
    RunFailed,
    RunStarted,
    random_id,
    utcnow,
)
from actors.observe.tracing import TRACEPARENT, trace_id_of
from actors.store.history import CorruptHistoryError
from actors.store.protocol import read_last_of_run, read_run
from actors.store.protocol import start_run as protocol_start_run
from sdk.durations import parse_duration
from sdk.errors import (
    InputValidationError,
    RunAlreadyExistsError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
)
from sdk.limits import check_name, encode_payload, validate_metadata
from sdk.models import RunStatus

if TYPE_CHECKING:
    from sdk._connection import Connection, ConnectionPool


log = logging.getLogger("bide.runs")

def new_run_id() -> str:
    return random_id()


def validate_run_id(run_id: object) -> str:
    """A run id a caller chose: it may not contain the character that marks derived child ids.

    Child ids are ``<parent>~<pos>~<i>`` or ``<parent>~k~<child_key>``; refusing
    ``~`` in chosen ids means no run a caller starts can take the id of another run's child.
    """
    if not isinstance(run_id, str) or not run_id or run_id != run_id.strip():
        raise ValueError(f"run id must be a non-empty string without surrounding spaces, got {run_id!r}")
    if CHILD_ID_SEPARATOR in run_id:
        raise ValueError(f"run id {run_id!r} contains {CHILD_ID_SEPARATOR!r}, which Bide keeps for the ids of "
                         f"child runs (<parent>{CHILD_ID_SEPARATOR}<pos>{CHILD_ID_SEPARATOR}<i>); choose another id")
    return check_name(run_id, "run id")


@dataclass(frozen=True)
class StartRequest:
    task: str
    durable: bool
    input: Any
    run_id: str
    execution_timeout_s: float | None = None
    meta: dict[str, Any] | None = None
    additional_metadata: dict[str, str] | None = None
    start_id: str = field(default_factory=lambda: random_id())
    """This request: the same request retried starts the run once; another one for its id is refused."""
    new_id: bool = False
    """``run_id`` was made for this request (:func:`new_run_id`), so no other start can hold it: the
    host that takes the run records its start (``new_id`` in ``actors.store.protocol.start_run``)."""


async def start_run(conn: Connection, req: StartRequest, notify: str | None = None) -> None:
    """Start a run: once this returns it exists durably (``actors.store.protocol.start_run``).

    Every run a client starts comes through here: its id and input are checked first.
    """
    validate_run_id(req.run_id)
    try:
        encode_payload(req.input, conn.config.payload_limits, f"the input of run {req.run_id} of task {req.task!r}")
    except TypeError as e:
        raise InputValidationError(f"the input of task {req.task!r} is not JSON data: {e}") from None
    meta = dict(req.meta or {})
    if notify is not None:
        meta["notify"] = notify
    subject = conn.layout.subjects.queue(req.task, req.run_id)
    # The run's trace: this span (under the caller's current span), restored at every activation.
    span = conn.tracing.start_run(req.task, req.run_id, subject)
    if span.traceparent:
        meta[TRACEPARENT] = span.traceparent
    started = RunStarted(
        run_id=req.run_id,
        task=req.task,
        durable=req.durable,
        input=req.input,
        at=utcnow(),
        execution_timeout_s=req.execution_timeout_s,
        meta=meta,
        start_id=req.start_id,
        additional_metadata=validate_metadata(req.additional_metadata,
                                              f"additional_metadata of run {req.run_id} of task {req.task!r}"),
    )
    try:
        await protocol_start_run(conn.history, conn.publisher, conn.layout.subjects, started, new_id=req.new_id)
    except RunAlreadyExistsError:
        span.discard()
        raise
    except BaseException as e:
        span.fail(e)
        raise
    span.end()


_TERMINAL_MARKERS = tuple(f'"k":"{t.model_fields["k"].default}"'.encode() for t in TERMINAL)


class _TerminalWatch:
    """A core-NATS subscription on the run's history subject, opened before anything can finish.

    A core subscriber also sees appends JetStream refused (a host that lost the single-writer
    race), so a terminal-looking message is only a hint: the stored last entry decides.
    """

    def __init__(self) -> None:
        self.hint = asyncio.Event()
        self.sub: Any = None

    async def open(self, conn: Connection, run_id: str) -> None:
        async def _on_msg(m: Msg) -> None:
            # Most history messages are checkpoints: only a terminal-looking one is a hint.
            if any(t in m.data for t in _TERMINAL_MARKERS):
                self.hint.set()

        # No flush needed: the server handles this SUB before anything this connection
        # sends next (the start publish or the history read), so no terminal entry is missed.
        self.sub = await conn.nc.subscribe(conn.layout.subjects.history(run_id), cb=_on_msg)

    async def close(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()


_NOT_FOUND_AFTER_S = 3.0
"""How long a waiter looks for a run's history before it says there is no such run."""

_POLL_FIRST_S = 0.25
_POLL_MAX_S = 15.0
"""A waiter re-reads the run's last entry (one direct get) at most this far apart, and soon again
after each hint: the fallback when a hint came before its append was stored, or not at all."""


async def wait_terminal(conn: Connection, run_id: str, timeout: float | None = None) -> Any:
    """The run's terminal entry, waiting for it if the run is still going."""
    watch = _TerminalWatch()
    await watch.open(conn, run_id)
    try:
        loop = asyncio.get_running_loop()

        async def read_last() -> list[Any]:
            return await read_last_of_run(conn.history, conn.nc, conn.layout.subjects, run_id)

        last = await read_last()
        # A run started a moment ago may not be on the replica that answers yet (a cluster's direct
        # gets are answered by any replica): look again for a while before saying there is none.
        give_up = loop.time() + _NOT_FOUND_AFTER_S
        while not last and loop.time() < give_up:
            await asyncio.sleep(0.1)
            last = await read_last()
        if not last:
            raise RunNotFoundError(f"no run with id {run_id!r}")
        deadline = None if timeout is None else loop.time() + timeout
        # The watch can miss an entry routed before its SUB took effect and stored after the
        # read above, and a hint can come before its append is stored (a core subscriber gets
        # the message as JetStream does): re-read now and then too, soon again after a hint.
        interval = _POLL_FIRST_S
        while True:
            for e in last:
                if isinstance(e, TERMINAL):
                    return e
            wait = interval if deadline is None else min(interval, deadline - loop.time())
            if wait <= 0:
                raise TimeoutError(f"run {run_id} did not finish within {timeout}s")
            try:
                await asyncio.wait_for(watch.hint.wait(), wait)
            except TimeoutError:
                interval = min(interval * 2, _POLL_MAX_S)
            else:
                # Cleared only when it was heard: one that comes after a timeout is not lost.
                watch.hint.clear()
                interval = _POLL_FIRST_S
            last = await read_last()
            if not last:
                raise RunNotFoundError(
                    f"run {run_id!r} was removed while its result was awaited: it finished and its "
                    "history retention period (BIDE_HISTORY_RETENTION) passed", run_id)
    finally:
        await watch.close()


async def start_and_wait(conn: Connection, req: StartRequest, timeout: float | None = None) -> Any:
    """Start a run and return its terminal entry, delivered to this connection's result inbox.

    A bad ``timeout`` is refused before the run starts (a caller who fixes it and retries
    would otherwise leave a run behind each time).
    """
    check_timeout(timeout)
    fut = conn.results.expect(req.run_id)
    try:
        await start_run(conn, req, notify=conn.results.subject(req.run_id))
        return await _await_terminal(conn, req.run_id, fut, timeout)
    finally:
        conn.results.forget(req.run_id)


async def _await_terminal(conn: Connection, run_id: str, fut: asyncio.Future[Any], timeout: float | None,
                          first_interval: float = 2.0) -> Any:
    # The inbox message is best effort (lost if this client was reconnecting at that
    # moment), so a waiter that hears nothing for a while reads the history itself.
    poll = _ResultPoll(conn, run_id, fut, timeout, first_interval)
    try:
        return await fut
    finally:
        poll.stop()


class _ResultPoll:
    """Reads the run's last entry if its result has not come ``interval`` seconds after the start,
    then twice as far apart (at most 15 s), and ends ``fut`` with the terminal entry it finds, or
    with ``TimeoutError`` at the deadline.

    One timer per waiter, armed while the result is awaited: the ``asyncio.wait_for`` of a
    shielded future that did this before cost about 8 µs of CPU more per awaited result
    (14 against 6 µs, timed alone), on a path that costs a starter about 110 µs per run
    (``python -m benchmarks.throughput``).
    """

    def __init__(self, conn: Connection, run_id: str, fut: asyncio.Future[Any], timeout: float | None,
                 interval: float) -> None:
        self._conn = conn
        self._run_id = run_id
        self._fut = fut
        self._timeout = timeout
        self._loop = fut.get_loop()
        self._deadline = None if timeout is None else self._loop.time() + timeout
        self._interval = interval
        self._timer: asyncio.TimerHandle | None = None
        self._read: asyncio.Task[None] | None = None
        self._arm()

    def _arm(self) -> None:
        wait = self._interval if self._deadline is None else min(self._interval, self._deadline - self._loop.time())
        if wait <= 0:
            self._end(exc=TimeoutError(f"run {self._run_id} did not finish within {self._timeout}s"))
        else:
            self._timer = self._loop.call_later(wait, self._due)

    def _due(self) -> None:
        self._timer = None
        if not self._fut.done():
            self._read = self._loop.create_task(self._read_last())

    async def _read_last(self) -> None:
        try:
            last = await self._conn.history.read_last(self._run_id)
        except Exception as exc:
            self._end(exc=exc)
            return
        for entry in last:
            if isinstance(entry, TERMINAL):
                self._end(entry)
                return
        self._interval = min(self._interval * 2, 15.0)
        self._arm()

    def _end(self, result: Any = None, exc: BaseException | None = None) -> None:
        if self._fut.done():
            return
        if exc is not None:
            self._fut.set_exception(exc)
        else:
            self._fut.set_result(result)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._read is not None and not self._read.done():
            self._read.cancel()


def unwrap_terminal(run_id: str, entry: Any) -> Any:
    """The run's JSON result, or the matching exception."""
    if isinstance(entry, RunCompleted):
        return entry.result
    if isinstance(entry, RunFailed):
        raise RunFailedError(run_id, entry.error.type, entry.error.message, entry.error.traceback)
    raise RunCancelledError(f"run {run_id} was cancelled: {entry.reason or 'no reason given'}")


def outcome_of_terminal(run_id: str, entry: Any) -> dict[str, Any]:
    """A terminal entry in the form a parent's child signal carries it (plus the run id)."""
    from actors.store.children import outcome_of

    return {**outcome_of(entry), "run_id": run_id}


def unwrap_outcome(outcome: dict[str, Any], load_output: Any = None) -> Any:
    """A child's result (``None`` if it was skipped), or its ``RunFailedError`` / ``RunCancelledError``."""
    run_id = outcome.get("run_id", "?")
    status = outcome.get("status")
    if status == "completed":
        if outcome.get("skipped"):
            return None
        result = outcome.get("result")
        return load_output(result) if load_output is not None else result
    if status == "failed":
        err = outcome.get("error") or {}
        raise RunFailedError(run_id, err.get("type", "Error"), err.get("message", ""), err.get("traceback", ""))
    raise RunCancelledError(f"run {run_id} was cancelled: {outcome.get('reason') or 'no reason given'}")


def status_of(hist: RunHistory) -> RunStatus:
    kinds = [e.k for e in hist.entries]
    if not kinds:
        raise RunNotFoundError(f"no run with id {hist.run_id!r}")
    last = kinds[-1]
    if last == "run_completed":
        return RunStatus.COMPLETED
    if last == "run_failed":
        return RunStatus.FAILED
    if last == "run_cancelled":
        return RunStatus.CANCELLED
    if last == "run_started":
        return RunStatus.QUEUED
    if last in ("sleep_scheduled", "wait_registered", "signal", "children_spawned"):
        return RunStatus.WAITING
    return RunStatus.RUNNING


@dataclass(frozen=True)
class RunInfo:
    """A run's state as read from its history."""

    run_id: str
    task: str
    status: RunStatus
    started_at: datetime
    input: Any
    result: Any = None
    error: str | None = None
    entries: int = 0
    trace_id: str = ""
    """The run's OpenTelemetry trace id (hex): every span of the run, on any host, is in this trace."""


@dataclass(frozen=True)
class RunSummary:
    """A run as :meth:`RunsClient.list` finds it (from the runs index; a live run's status from its history)."""

    run_id: str
    task: str
    status: RunStatus
    started_at: datetime
    ended_at: datetime | None = None
    parent_run_id: str | None = None
    additional_metadata: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "task": self.task, "status": self.status.value,
                "started_at": self.started_at.isoformat(),
                "ended_at": self.ended_at.isoformat() if self.ended_at else None,
                "parent_run_id": self.parent_run_id, "additional_metadata": self.additional_metadata}


@dataclass(frozen=True)
class RunList:
    """One page of :meth:`RunsClient.list`: newest first; ``cursor`` continues it (``None`` at the end)."""

    runs: list[RunSummary]
    cursor: str | None = None

    def __iter__(self) -> Iterator[RunSummary]:
        """This page's runs (``for run in bide.runs.list(...)``); the next page is ``list(cursor=page.cursor)``."""
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)


def _moment(value: datetime | timedelta | float | str | None, what: str) -> datetime | None:
    """A datetime as given, or a duration (``"1h"``, seconds, a timedelta) meaning that long ago."""
    if value is None or isinstance(value, datetime):
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError(f"{what} {value.isoformat()!r} has no time zone; give an aware datetime")
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
        except ValueError:
            pass
    try:
        return utcnow() - parse_duration(value, what)
    except (TypeError, ValueError) as e:
        why = "" if "is not a duration like" in str(e) else f" ({e})"
        raise ValueError(f"{what} must be a time (ISO 8601) or a duration ago such as '1h' or '30m', "
                         f"got {value!r}{why}") from None


def _live_status(last: list[Any]) -> RunStatus:
    if not last:
        return RunStatus.QUEUED  # its index record is written with its start, before its history
    for e in last:
        if isinstance(e, TERMINAL):
            return {"run_completed": RunStatus.COMPLETED, "run_failed": RunStatus.FAILED}.get(
                e.k, RunStatus.CANCELLED)
    kind = last[-1].k
    if kind == "run_started":
        return RunStatus.QUEUED
    return RunStatus.WAITING if kind in ("sleep_scheduled", "wait_registered", "signal", "children_spawned") \
        else RunStatus.RUNNING


def _duration(seconds: float) -> str:
    """``30d``, ``2h``, ``90m`` or ``5s``: the largest unit that divides it exactly."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def lookup_id(run_id: object) -> str:
    """A run id to look up (a child's, with ``~``, too): a non-empty string, or a ``ValueError`` naming it."""
    if not isinstance(run_id, str) or not run_id.strip():
        raise ValueError(f"run id must be a non-empty string, got {run_id!r}")
    return check_name(run_id, "run id")


MAX_REASON_BYTES = 4 * 1024
"""The longest cancel reason (UTF-8): it is recorded in the run's history and named by ``RunCancelledError``."""


def check_reason(reason: object) -> str:
    """A cancel's ``reason``: a string of at most :data:`MAX_REASON_BYTES`, or a ``ValueError`` naming it."""
    if not isinstance(reason, str):
        raise ValueError(f"cancel reason must be a string, got {type(reason).__name__}: {reason!r:.200}")
    try:
        size = len(reason.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"cancel reason is not valid UTF-8 ({e.reason} at character {e.start}): "
                         f"{reason[:80]!r}") from None
    if size > MAX_REASON_BYTES:
        raise ValueError(f"cancel reason is {size:,} bytes, more than the {MAX_REASON_BYTES:,} allowed: "
                         f"{reason[:80]!r}...")
    return reason


def check_timeout(timeout: object) -> None:
    """A result's ``timeout``: ``None`` (wait for ever) or a finite number of seconds, at least 0."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout < math.inf:
        raise ValueError(f"timeout must be a number of seconds (at least 0) or None, got {timeout!r}")


class RunsClient:
    """``bide.runs``: read a run's state and history, or wait for its result."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    async def aio_history(self, run_id: str) -> RunHistory:
        lookup_id(run_id)
        conn = await self._pool.get()
        hist = await read_run(conn.history, conn.nc, conn.layout.subjects, run_id)
        if not hist.entries:
            raise RunNotFoundError(f"no run with id {run_id!r}")
        return hist

    async def aio_get(self, run_id: str) -> RunInfo:
        """The run's state; :class:`RunNotFoundError` if it never existed or was removed after its retention."""
        lookup_id(run_id)
        conn = await self._pool.get()
        hist = await read_run(conn.history, conn.nc, conn.layout.subjects, run_id)
        if not hist.entries:
            retention = _duration(self._pool.config.history_retention_s)
            raise RunNotFoundError(
                f"no run with id {run_id!r}: it never existed, or it finished and was removed after the "
                f"history retention period (BIDE_HISTORY_RETENTION: {retention})", run_id)
        first = hist.started
        term = hist.terminal
        return RunInfo(
            run_id=run_id,
            task=first.task,
            status=status_of(hist),
            started_at=first.at,
            input=first.input,
            result=term.result if isinstance(term, RunCompleted) else None,
            error=f"{term.error.type}: {term.error.message}" if isinstance(term, RunFailed) else None,
            entries=len(hist.entries),
            trace_id=trace_id_of(first),
        )

    def get(self, run_id: str) -> RunInfo:
        lookup_id(run_id)  # before the coroutine exists: a refused id leaves none un-awaited
        return self._pool.run_sync(self.aio_get(run_id))

    async def aio_list(self, status: str | RunStatus | None = None, task: str | None = None,
                       since: datetime | timedelta | float | str | None = None,
                       until: datetime | timedelta | float | str | None = None,
                       metadata: Mapping[str, str] | None = None, limit: int = 50,
                       cursor: str | None = None) -> RunList:
        """Runs, newest first, from the runs index; pass ``cursor`` from one page to get the next.

        ``status`` is ``queued`` (started, no host has taken it yet), ``running``, ``waiting`` (a
        live run parked at a sleep, a wait or its children), ``completed``, ``failed`` or
        ``cancelled``; ``since`` and ``until`` bound the start time (a datetime, or a duration
        ago such as ``"1h"``); ``metadata`` keeps runs
        whose ``additional_metadata`` has every given key with that value. Order is that of
        the index's last write of each run: a live run by its start, an ended one by its end.
        """
        from actors.store.runs_index import RunQuery, decode_cursor, encode_cursor, find, metadata_filter

        q = RunQuery(status=str(status) if status is not None else None, task=task,
                     since=_moment(since, "since"), until=_moment(until, "until"),
                     metadata=metadata_filter(metadata), limit=limit,
                     before_seq=decode_cursor(cursor) if cursor is not None else None)
        conn = await self._pool.get()
        known: dict[str, RunStatus] = {}

        async def last_of(run_id: str) -> list[Any] | None:
            try:
                return await conn.history.read_last(run_id)
            except CorruptHistoryError as e:  # one unreadable run never hides the others
                log.warning("%s; listed by its index record", e)
                return None

        async def live_status(runs: list[Any]) -> list[str]:
            lasts = await asyncio.gather(*(last_of(r.run_id) for r in runs))
            for r, last in zip(runs, lasts, strict=True):
                if last is not None:
                    known[r.run_id] = _live_status(last)
            # A live record whose history has ended (its end record was lost with a host) is
            # listed with the history's status, and never as running or waiting.
            return [known[r.run_id].value if r.run_id in known else r.status for r in runs]

        page, next_seq = await find(conn.nc, conn.layout.subjects, q, live_status)
        unknown = [r for r in page if r.status == "running" and r.run_id not in known]
        if unknown:
            await live_status(unknown)
        return RunList(runs=[RunSummary(
            run_id=r.run_id, task=r.task,
            status=known.get(r.run_id) or RunStatus(r.status),
            started_at=r.started_at, ended_at=r.ended_at, parent_run_id=r.parent_run_id,
            additional_metadata=r.additional_metadata) for r in page],
            cursor=encode_cursor(next_seq) if next_seq is not None else None)

    def list(self, status: str | RunStatus | None = None, task: str | None = None,
             since: datetime | timedelta | float | str | None = None,
             until: datetime | timedelta | float | str | None = None,
             metadata: Mapping[str, str] | None = None, limit: int = 50, cursor: str | None = None) -> RunList:
        """Blocking :meth:`aio_list`."""
        return self._pool.run_sync(self.aio_list(status, task, since, until, metadata, limit, cursor))

    async def aio_result(self, run_id: str, timeout: float | None = None) -> Any:
        lookup_id(run_id)
        check_timeout(timeout)
        conn = await self._pool.get()
        return unwrap_terminal(run_id, await wait_terminal(conn, run_id, timeout))

    def result(self, run_id: str, timeout: float | None = None) -> Any:
        return self._pool.run_sync(self.aio_result(run_id, timeout))

    async def aio_cancel(self, run_id: str, reason: str = "cancelled by request") -> bool:
        """Cancel a run, its children (transitively) and its pending waits.

        A run that is queued never starts; a regular task that is running is interrupted;
        a durable task gets ``asyncio.CancelledError`` where it waits, and can clean up.
        Returns ``False`` if the run had already finished.
        """
        from actors.store.children import request_cancel

        lookup_id(run_id)
        check_reason(reason)
        conn = await self._pool.get()
        try:
            return await request_cancel(conn.nc, conn.publisher, conn.history, conn.layout.subjects, run_id, reason)
        except LookupError:
            raise RunNotFoundError(f"no run with id {run_id!r}") from None

    def cancel(self, run_id: str, reason: str = "cancelled by request") -> bool:
        """Blocking :meth:`aio_cancel`."""
        lookup_id(run_id)
        check_reason(reason)
        return self._pool.run_sync(self.aio_cancel(run_id, reason))


class RunRef:
    """A handle on a started run: ``workflow_run_id``, then ``result()`` or ``await aio_result()``."""

    def __init__(self, pool: ConnectionPool, run_id: str, load_output: Any = None) -> None:
        self._pool = pool
        self.workflow_run_id = run_id
        self._load_output = load_output

    @property
    def run_id(self) -> str:
        return self.workflow_run_id

    async def aio_result(self, timeout: float | None = None) -> Any:
        check_timeout(timeout)
        conn = await self._pool.get()
        value = unwrap_terminal(self.workflow_run_id, await wait_terminal(conn, self.workflow_run_id, timeout))
        return self._load_output(value) if self._load_output is not None else value

    def result(self, timeout: float | None = None) -> Any:
        return self._pool.run_sync(self.aio_result(timeout))

    async def aio_status(self) -> RunStatus:
        return (await RunsClient(self._pool).aio_get(self.workflow_run_id)).status

    def __repr__(self) -> str:
        return f"RunRef(workflow_run_id={self.workflow_run_id!r})"
