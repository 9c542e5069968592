"""The runs index: one small record per run in ``<PREFIX>_RUNS``, for listing and filtering runs.

Subjects are ``<prefix>.runs.<live|ended>.<task>.<run>``, one message per subject
(``max_msgs_per_subject=1``), so the server narrows a listing by state and task with a
subject filter, and every message read is a run's current record:

- the starter writes the ``live`` record with the start (:func:`publish_live`, from
  :func:`actors.store.protocol.start_run`, between the activation and the start entry),
  only if neither record of the run exists (an expected-last-sequence check over both
  subjects), so a start repeated after the run ended never makes it look live again;
- the host that ends the run writes the ``ended`` record, and a marker on the ``live``
  subject that replaces the live record and expires a second later (``Nats-TTL``)
  (:func:`publish_end`, the ``RecordEnd`` command after the terminal append);
- the reaper purges both subjects when it removes the run.

The index is a view: each write is a publish whose ack nobody waits for (no round trip on
a run's path, and the server's work only), and a lost one never affects a run (its history
is the truth); at worst a run is missing from a listing or listed with a stale state.
A run that continues as new keeps its record (one per run id). Listings are newest first in
the order of the index's writes (a live run by its start, an ended run by its end), read
backwards in windows of stream sequences, so a page costs about what it returns.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import nats.js.errors
import orjson
from nats.aio.client import Client as NATS

from actors.engine.wire import (
    HDR_TTL,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    Subjects,
    Terminal,
    parse_time,
    rfc3339,
)
from actors.store.jetstream import ERR_WRONG_LAST_SEQUENCE, api_request, direct_get_pages
from actors.store.requests import Publisher

log = logging.getLogger("bide.runs_index")

HDR_EXPECTED_SEQ = "Nats-Expected-Last-Subject-Sequence"
HDR_EXPECTED_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
"""Which subjects (a wildcard) the expected-last-sequence check is about (nats-server >= 2.11)."""
LIVE, ENDED = "live", "ended"
STATUSES = ("queued", "running", "waiting", "completed", "failed", "cancelled")
"""What ``bide.runs.list(status=...)`` takes: ``queued``, ``running`` and ``waiting`` are live runs."""
_LIVE_STATUSES = frozenset(STATUSES[:3])
MAX_LIMIT = 1000
_FIRST_WINDOW = 256
_MAX_WINDOW = 65536
_PAGE = 1000
_PARKED = frozenset({"sleep_scheduled", "wait_registered", "signal", "children_spawned"})
"""A live run whose last entry is one of these is parked (``sdk.runs.status_of``'s waiting)."""


def _end_status(end: Terminal) -> str:
    if isinstance(end, RunCompleted):
        return "completed"
    if isinstance(end, RunFailed):
        return "failed"
    assert isinstance(end, RunCancelled)
    return "cancelled"


def record(started: RunStarted, end: Terminal | None = None) -> bytes:
    """A run's index record: compact JSON, empty fields left out."""
    rec: dict[str, Any] = {"run_id": started.run_id, "task": started.task,
                           "status": "running" if end is None else _end_status(end),
                           "started_at": rfc3339(started.at)}
    if end is not None:
        rec["ended_at"] = rfc3339(end.at)
    if started.parent is not None:
        rec["parent_run_id"] = started.parent.run_id
    if started.additional_metadata:
        rec["additional_metadata"] = started.additional_metadata
    return orjson.dumps(rec)


async def publish_live(pub: Publisher, subjects: Subjects, started: RunStarted) -> None:
    """The run's ``live`` record, unless the run has one already or has ended. Never raises."""
    headers = {HDR_EXPECTED_SEQ: "0", HDR_EXPECTED_SEQ_SUBJECT: subjects.run_records(started.task, started.run_id)}
    try:
        await pub.publish_unacked(subjects.run_record(LIVE, started.task, started.run_id), record(started), headers)
    except Exception as e:  # unreachable: the index is a view
        log.debug("run %s: live index record not written: %s", started.run_id, e)


async def ensure_live(pub: Publisher, subjects: Subjects, started: RunStarted) -> None:
    """The run's ``live`` record, unless it has one or has ended, awaiting the server's answer (a
    refusal means a record is there). Raises what the publish raised otherwise (to retry it)."""
    headers = {HDR_EXPECTED_SEQ: "0", HDR_EXPECTED_SEQ_SUBJECT: subjects.run_records(started.task, started.run_id)}
    try:
        await pub.publish(subjects.run_record(LIVE, started.task, started.run_id), record(started), headers)
    except nats.js.errors.APIError as e:
        if e.err_code != ERR_WRONG_LAST_SEQUENCE:
            raise


async def publish_end(pub: Publisher, subjects: Subjects, started: RunStarted, end: Terminal) -> None:
    """The run's ``ended`` record, and the expiring marker that replaces its ``live`` one. Never raises."""
    try:
        await pub.publish_unacked(subjects.run_record(ENDED, started.task, started.run_id), record(started, end))
        await pub.publish_unacked(subjects.run_record(LIVE, started.task, started.run_id), b"", {HDR_TTL: "1s"})
    except Exception as e:
        log.debug("run %s: ended index record not written: %s", started.run_id, e)


# -- listing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunQuery:
    """A validated listing request (what ``bide.runs.list``, the CLI and the HTTP API take)."""

    status: str | None = None
    task: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    limit: int = 50
    before_seq: int | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
        if self.task is not None and (not isinstance(self.task, str) or not self.task):
            raise ValueError(f"task must be a task name, got {self.task!r}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 1 <= self.limit <= MAX_LIMIT:
            raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {self.limit!r}")

    @property
    def state(self) -> str | None:
        if self.status is None:
            return None
        return LIVE if self.status in _LIVE_STATUSES else ENDED


CURSOR_PATTERN = r"^[1-9][0-9]{0,17}$"
"""A cursor: where a listing goes on (opaque to callers; a stream sequence, so any such token is valid)."""


def encode_cursor(seq: int) -> str:
    return str(seq)


def decode_cursor(cursor: str) -> int:
    """The sequence a cursor continues below; ``ValueError`` naming the cursor if it is not one."""
    if isinstance(cursor, str) and re.fullmatch(CURSOR_PATTERN, cursor):
        return int(cursor)
    raise ValueError(f"cursor {cursor!r} is not a cursor from an earlier listing")


@dataclass(frozen=True)
class IndexedRun:
    """One run as the index has it."""

    run_id: str
    task: str
    status: str
    started_at: datetime
    ended_at: datetime | None
    parent_run_id: str | None
    additional_metadata: dict[str, str]
    seq: int


def _decode(data: bytes, seq: int) -> IndexedRun | None:
    try:
        r = orjson.loads(data)
        md = r.get("additional_metadata") or {}
        return IndexedRun(run_id=str(r["run_id"]), task=str(r["task"]), status=str(r["status"]),
                          started_at=parse_time(r["started_at"]),
                          ended_at=parse_time(r["ended_at"]) if r.get("ended_at") else None,
                          parent_run_id=r.get("parent_run_id"),
                          additional_metadata={str(k): str(v) for k, v in md.items()}, seq=seq)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None  # a marker (empty), or not ours: the index is a view, skip it


def _matches(run: IndexedRun, q: RunQuery) -> bool:
    if q.status is not None and q.state == ENDED and run.status != q.status:
        return False
    if q.since is not None and run.started_at < q.since:
        return False
    if q.until is not None and run.started_at > q.until:
        return False
    return all(run.additional_metadata.get(k) == v for k, v in q.metadata.items())


async def last_seq(nc: NATS, subjects: Subjects) -> int:
    info = await api_request(nc, f"$JS.API.STREAM.INFO.{subjects.runs_stream}", {})
    return int(info.get("state", {}).get("last_seq", 0))


async def _window(nc: NATS, stream: str, subject: str, lo: int, hi: int) -> list[IndexedRun]:
    """The records on ``subject`` with sequences in ``[lo, hi)``, oldest first."""
    out: list[IndexedRun] = []
    pages = direct_get_pages(nc, stream, subject, start_seq=lo, batch=min(_PAGE, hi - lo))
    async with contextlib.aclosing(pages):
        async for page in pages:
            for m in page:
                seq = int((m.headers or {}).get("Nats-Sequence", "0"))
                if seq >= hi:
                    return out
                run = _decode(m.data, seq)
                if run is not None:
                    out.append(run)
    return out


async def records(nc: NATS, subjects: Subjects, state: str, batch: int = _PAGE) -> AsyncIterator[IndexedRun]:
    """Every record of runs in ``state`` (``live``/``ended``), in the order they were written (a live
    run's at its start, an ended run's at its end): for the hosts' wake-up check."""
    pages = direct_get_pages(nc, subjects.runs_stream, subjects.runs_filter(state), start_seq=1, batch=batch)
    async with contextlib.aclosing(pages):
        async for page in pages:
            for m in page:
                run = _decode(m.data, int((m.headers or {}).get("Nats-Sequence", "0")))
                if run is not None:
                    yield run


async def find(nc: NATS, subjects: Subjects, q: RunQuery,
               live_status: Any = None) -> tuple[list[IndexedRun], int | None]:
    """The newest runs matching ``q`` (at most ``q.limit``) and the sequence to continue below, if any.

    ``live_status(runs)`` says the status (``running``/``waiting``/...) of live runs; it is
    asked for the candidates only when ``q.status`` needs it, else for the page's live runs.
    """
    stream = subjects.runs_stream
    subject = subjects.runs_filter(q.state, q.task)
    # A cursor past the end (the stream was purged, or the cursor made up) reads from the end.
    hi = await last_seq(nc, subjects) + 1
    if q.before_seq is not None:
        hi = min(hi, q.before_seq)
    window = max(_FIRST_WINDOW, q.limit * 4)
    found: list[IndexedRun] = []
    while hi > 1 and len(found) < q.limit:
        lo = max(1, hi - window)
        got = await _window(nc, stream, subject, lo, hi)
        got = [r for r in reversed(got) if _matches(r, q)]
        if q.status in _LIVE_STATUSES and got and live_status is not None:
            statuses = await live_status(got)
            got = [r for r, st in zip(got, statuses, strict=True) if st == q.status]
        found.extend(got)
        hi = lo
        window = min(window * 4, _MAX_WINDOW)
        # Records are written in time order, each after its run's start: once the window begins
        # before ``since``, no older record is of a run started since.
        if q.since is not None and lo > 1 and len(found) < q.limit and await _written_before(nc, stream, lo, q.since):
            hi = 1
    page = found[: q.limit]
    more = len(found) > q.limit or hi > 1
    cursor = page[-1].seq if page and more else None
    return page, cursor


async def _written_before(nc: NATS, stream: str, seq: int, when: datetime) -> bool:
    """Whether the stream's message at ``seq`` (or the next one) was written before ``when``."""
    pages = direct_get_pages(nc, stream, ">", start_seq=seq, batch=1)
    async with contextlib.aclosing(pages):
        async for page in pages:
            return bool(page) and parse_time((page[0].headers or {}).get("Nats-Time-Stamp")) < when
    return False


def metadata_filter(pairs: Mapping[str, str] | None) -> dict[str, str]:
    if pairs is None:
        return {}
    if not isinstance(pairs, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()):
        raise ValueError(f"metadata filter must map strings to strings, got {pairs!r:.200}")
    return dict(pairs)
