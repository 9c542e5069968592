"""What the web UI shows, built from a run's history and the events stream: plain data for the templates.

Nothing here renders HTML or answers HTTP (that is :mod:`actors.apps.web_ui`); the functions
read the store through the client's connection and fold entries into rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from actors.apps.run_graph import MAX_TREE_NODES, ChildNode, Dag, child_tree, workflow_dag
from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    HDR_EVENT_METADATA,
    ActivationBegun,
    AttemptFailed,
    ChildrenSpawned,
    HistoryEntry,
    MemoRecorded,
    NowRecorded,
    PatchMarked,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    SignalReceived,
    SleepFired,
    SleepScheduled,
    TurnParked,
    WaitCondition,
    WaitRegistered,
    WaitResolved,
    event_id_of,
    parse_time,
    rfc3339,
)
from actors.observe.tracing import trace_id_of
from actors.store.jetstream import api_request, direct_get_subject
from sdk.runs import status_of

if TYPE_CHECKING:
    from sdk import Bide

MAX_CHILDREN = MAX_TREE_NODES
"""How many of a spawn's run ids a timeline row links to."""


def to_json(value: Any, indent: bool = True) -> str:
    """``value`` as JSON text for display (anything orjson cannot encode is shown by its ``repr``)."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 if indent else 0, default=repr).decode()


def short(value: Any, limit: int = 120) -> str:
    text = to_json(value, indent=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Row:
    """One line of a run's timeline."""

    kind: str
    at: datetime | None
    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    """(label, text) pairs, shown in order."""
    detail: str | None = None
    """A longer text (a result, a traceback), shown folded."""
    links: list[tuple[str, str]] = field(default_factory=list)
    """(text, run id) pairs: links to other runs."""
    css: str = ""


def describe_condition(c: WaitCondition) -> str:
    if c.kind == "sleep":
        wake = f" until {c.wake_at:%Y-%m-%d %H:%M:%S}Z" if c.wake_at else ""
        return f"{c.key}: sleep {c.duration_s:g}s{wake}"
    parts = [f"{c.key}: event {c.event_key!r}"]
    if c.scope is not None:
        parts.append(f"scope {c.scope!r}")
    if c.expression:
        parts.append(f"if {c.expression}")
    if c.lookback_s:
        parts.append(f"lookback {c.lookback_s:g}s")
    return " ".join(parts)


def _row(e: HistoryEntry, at: datetime | None, labels: dict[str, str]) -> Row:
    if isinstance(e, RunStarted):
        facts = [("task", e.task), ("durable", str(e.durable).lower())]
        links = []
        if e.parent is not None:
            links.append((f"parent {e.parent.run_id} ({e.parent.task})", e.parent.run_id))
        if e.generation:
            facts.append(("generation", str(e.generation)))
        return Row("start", at, "started", facts, links=links)
    if isinstance(e, ActivationBegun):
        delivered = [] if e.delivery == 1 else [("delivery", str(e.delivery))]
        return Row("turn", at, f"turn on {e.host}", delivered, css="turn")
    if isinstance(e, TurnParked):
        return Row("parked", at, "parked again", css="quiet")
    if isinstance(e, MemoRecorded):
        took = [("took", f"{e.ms:,.1f} ms")] if e.ms is not None else []
        return Row("memo", at, f"step {e.name}", [("pos", str(e.pos)), *took, ("result", short(e.result))],
                   detail=to_json(e.result))
    if isinstance(e, NowRecorded):
        return Row("now", at, "read the time", [("pos", str(e.pos)), ("now", f"{e.at:%Y-%m-%d %H:%M:%S.%f}Z")],
                   css="quiet")
    if isinstance(e, PatchMarked):
        return Row("patched", at, f"patched {e.change_id}", [("pos", str(e.pos))], css="quiet")
    if isinstance(e, SleepScheduled):
        return Row("sleep", at, f"sleep {e.duration_s:g}s", [("pos", str(e.pos)),
                                                             ("wakes at", f"{e.wake_at:%Y-%m-%d %H:%M:%S}Z")])
    if isinstance(e, SleepFired):
        return Row("woke", at, "sleep ended", [("pos", str(e.pos))])
    if isinstance(e, WaitRegistered):
        labels[e.wait_id] = e.label
        facts = [("wait", e.label), ("pos", str(e.pos))]
        facts += [("all of" if len(g) == 1 else "any of", "; ".join(map(describe_condition, g))) for g in e.groups]
        if e.any_of:
            facts.append(("ends on", "; ".join(map(describe_condition, e.any_of))))
        return Row("wait", at, f"waits: {e.label}", facts, css="wait")
    if isinstance(e, SignalReceived):
        s = e.signal
        facts = [("from", s.source), ("name", s.name)]
        if s.scope is not None:
            facts.append(("scope", s.scope))
        facts.append(("event id", s.event_id))
        if s.event_seq is not None:
            facts.append(("event seq", str(s.event_seq)))
        if s.wait_id is not None:
            facts.append(("for wait", labels.get(s.wait_id, s.wait_id)))
        facts.append(("payload", short(s.payload)))
        return Row("signal", at, f"received {s.source} {s.name!r}", facts, detail=to_json(s.payload), css="signal")
    if isinstance(e, WaitResolved):
        return Row("resolved", at, f"wait resolved: {e.label}", [("pos", str(e.pos)), ("result", short(e.result))],
                   detail=to_json(e.result), css="resolved")
    if isinstance(e, ChildrenSpawned):
        return Row("children", at, f"spawned {len(e.run_ids)} runs of {e.task}", [("pos", str(e.pos))],
                   links=[(r, r) for r in e.run_ids[:MAX_CHILDREN]])
    if isinstance(e, AttemptFailed):
        return Row("retry", at, f"attempt {e.attempt} failed, retry at {e.retry_at:%Y-%m-%d %H:%M:%S}Z",
                   [("error", f"{e.error.type}: {e.error.message}")], detail=e.error.traceback or None, css="bad")
    if isinstance(e, RunCompleted):
        return Row("end", at, "completed" + (" (skipped)" if e.skipped else ""), [("result", short(e.result))],
                   css="good")
    if isinstance(e, RunFailed):
        return Row("end", at, "failed", [("error", f"{e.error.type}: {e.error.message}")],
                   detail=e.error.traceback or None, css="bad")
    if isinstance(e, RunCancelled):
        return Row("end", at, "cancelled", [("reason", e.reason or "no reason given")], css="bad")
    return Row(getattr(e, "k", "?"), at, getattr(e, "k", "?"), css="quiet")


def stored_at(hist: RunHistory, i: int) -> datetime | None:
    """When entry ``i``'s batch was stored (``None`` if unknown, e.g. an imported history)."""
    return parse_time(hist.times[i]) if i < len(hist.times) and hist.times[i] else None


def timeline(hist: RunHistory) -> list[Row]:
    """The run's entries as rows, each with the time its batch was stored."""
    labels: dict[str, str] = {}
    return [_row(e, stored_at(hist, i), labels) for i, e in enumerate(hist.entries)]


@dataclass
class RunPage:
    """Everything the run page shows."""

    run_id: str
    task: str
    status: str
    started_at: datetime
    ended_at: datetime | None
    input_json: str
    result_json: str | None
    error: str | None
    traceback: str | None
    cancel_reason: str | None
    trace_id: str
    additional_metadata: dict[str, Any]
    parent: tuple[str, str] | None
    rows: list[Row]
    pending_waits: list[tuple[str, list[str]]]
    pending_sleeps: list[str]
    untaken: list[str]
    children: list[ChildNode]
    """Its children in spawn order, each with its descendants (bounded: :func:`child_tree`)."""
    children_more: int
    """Its children left out (past :data:`~actors.apps.run_graph.MAX_TREE_NODES`)."""
    dag: Dag | None
    """A workflow run's tasks, their parents and states (``None`` for other runs)."""
    entries: int
    history: RunHistory = field(repr=False)
    """What the page was built from (:func:`run_document` reads its entries, input and result)."""
    waits: list[WaitRegistered] = field(default_factory=list)
    """The pending waits (none once the run has ended)."""

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")


async def run_page(bide: Bide, run_id: str) -> RunPage:
    """The run page's data; :class:`~sdk.RunNotFoundError` if there is no such run."""
    hist = await bide.runs.aio_history(run_id)
    first = hist.started
    state = hist.state
    end = state.terminal
    ended_at = end.at if end is not None else None
    children, more = await child_tree(bide, hist)
    waits = list(state.open_waits.values()) if end is None else []
    return RunPage(
        run_id=run_id,
        task=first.task,
        status=status_of(hist).value,
        started_at=first.at,
        ended_at=ended_at,
        input_json=to_json(first.input),
        result_json=to_json(end.result) if isinstance(end, RunCompleted) else None,
        error=f"{end.error.type}: {end.error.message}" if isinstance(end, RunFailed) else None,
        traceback=(end.error.traceback or None) if isinstance(end, RunFailed) else None,
        cancel_reason=(end.reason or "no reason given") if isinstance(end, RunCancelled) else None,
        trace_id=trace_id_of(first),
        additional_metadata=dict(getattr(first, "additional_metadata", None) or {}),
        parent=(first.parent.run_id, first.parent.task) if first.parent is not None else None,
        rows=timeline(hist),
        pending_waits=[(w.label, [describe_condition(c) for c in w.flat()]) for w in waits],
        pending_sleeps=[f"sleep {s.duration_s:g}s until {s.wake_at:%Y-%m-%d %H:%M:%S}Z"
                        for s in state.sleeping.values()] if end is None else [],
        untaken=[f"#{seq} {s.source} {s.name!r} {short(s.payload, 80)}" for seq, s in hist.inbox],
        children=children,
        children_more=more,
        dag=await workflow_dag(bide, hist, children),
        entries=len(hist.entries),
        history=hist,
        waits=waits,
    )


def run_document(view: RunPage) -> dict[str, Any]:
    """The whole run as JSON data: ``GET /api/v1/runs/{id}?detail=full`` and ``bide runs show --json``.

    The same :class:`RunPage` the web UI shows, so the three never disagree.
    """
    hist = view.history
    end = hist.state.terminal
    return {
        "run_id": view.run_id,
        "task": view.task,
        "status": view.status,
        "started_at": view.started_at.isoformat(),
        "ended_at": view.ended_at.isoformat() if view.ended_at is not None else None,
        "input": hist.started.input,
        "additional_metadata": view.additional_metadata,
        "parent": {"run_id": view.parent[0], "task": view.parent[1]} if view.parent is not None else None,
        "result": end.result if isinstance(end, RunCompleted) else None,
        "error": view.error,
        "traceback": view.traceback,
        "cancel_reason": view.cancel_reason,
        "entries": view.entries,
        "trace_id": view.trace_id,
        "history": [{"stored_at": at.isoformat() if (at := stored_at(hist, i)) else None,
                     "entry": e.model_dump(mode="json")} for i, e in enumerate(hist.entries)],
        "pending_waits": [_wait_document(w) for w in view.waits],
        "children": [c.as_dict() for c in view.children],
        "children_more": view.children_more,
        "dag": view.dag.as_dict() if view.dag is not None else None,
    }


def _wait_document(w: WaitRegistered) -> dict[str, Any]:
    conds = w.flat()
    wakes = [c.wake_at for c in conds if c.kind == "sleep" and c.wake_at is not None]
    return {
        "wait_id": w.wait_id,
        "label": w.label,
        "conditions": [{"kind": c.kind, "name": c.key, "event_key": c.event_key, "scope": c.scope,
                        "expression": c.expression, "wake_at": c.wake_at.isoformat() if c.wake_at else None}
                       for c in conds],
        "timeout_at": min(wakes).isoformat() if wakes else None,
    }


# -- events ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """A run an event resumed (a wait of it matched) or started (an ``on_events`` trigger)."""

    run_id: str
    task: str
    how: str
    wait_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "task": self.task, "how": self.how, "wait_id": self.wait_id}


@dataclass
class EventRow:
    seq: int
    at: datetime
    key: str
    scope: str | None
    event_id: str
    payload: str
    """The payload as short JSON text, for display."""
    metadata: str
    """The metadata header as stored (JSON text), for display."""
    size: int = 0
    """The payload's size in bytes, as stored."""
    value: Any = None
    """The payload itself (``None`` if it is not valid JSON: :attr:`payload` then shows its bytes)."""
    meta: dict[str, Any] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    """The runs it resumed or started, as the router recorded them."""

    def as_dict(self) -> dict[str, Any]:
        """The event as JSON data: ``GET /api/v1/events`` and ``bide events list --json``."""
        return {"seq": self.seq, "at": self.at.isoformat(), "key": self.key, "scope": self.scope,
                "event_id": self.event_id, "size": self.size, "payload": self.value, "metadata": self.meta,
                "outcomes": [o.as_dict() for o in self.outcomes]}


MAX_EVENT_WINDOW = 1 << 20
"""How far back (in stream sequences) the events page looks for events at most: the events
stream holds wait and trigger registrations too, so a window may hold few events."""


async def recent_events(bide: Bide, limit: int, key: str | None = None,
                        since: datetime | None = None) -> list[EventRow]:
    """The newest ``limit`` events (of ``key``, stored at or after ``since``, if given), newest first,
    each with the runs it resumed or started.

    Read backwards in doubling windows of stream sequences with a subject filter, so a page
    costs about what it shows, however long the stream (the direct gets of
    :mod:`actors.store.jetstream`); then one read of the outcome records from the oldest
    event shown on.
    """
    conn = await bide._pool.get()
    s = conn.layout.subjects
    info = await api_request(conn.nc, f"$JS.API.STREAM.INFO.{s.events_stream}", {})
    state = info.get("state") or {}
    first, last = int(state.get("first_seq") or 0), int(state.get("last_seq") or 0)
    if last == 0:
        return []
    subjects = s.event_filters(key, None) if key is not None else [s.events_all]
    window = max(64, limit * 4)
    found: dict[int, Any] = {}
    while True:
        start = max(first, last - window + 1, 1)
        reached_since = False
        for subj in subjects:
            for m in await direct_get_subject(conn.nc, s.events_stream, subj, start_seq=start, limit=None):
                headers = m.headers or {}
                seq = int(headers.get("Nats-Sequence", "0"))
                if seq > last:
                    continue
                if since is not None and parse_time(headers.get("Nats-Time-Stamp")) < since:
                    reached_since = True  # older ones are older still: no need to look further back
                    continue
                found[seq] = m
        if len(found) >= limit or reached_since or start <= first or window >= MAX_EVENT_WINDOW:
            break
        window *= 4
    rows = []
    for seq in sorted(found, reverse=True)[:limit]:
        m = found[seq]
        headers = m.headers or {}
        parsed = s.parse_event_subject(headers.get("Nats-Subject", ""))  # (a direct get's reply subject is an inbox)
        if parsed is None:
            continue
        value: Any = None
        try:
            value = orjson.loads(m.data) if m.data else None
            payload = short(value, 300)
        except orjson.JSONDecodeError:
            payload = repr(m.data[:200])
        metadata = headers.get(HDR_EVENT_METADATA, "")
        try:
            meta = orjson.loads(metadata) if metadata else {}
        except orjson.JSONDecodeError:
            meta = {}
        rows.append(EventRow(seq=seq, at=parse_time(headers.get("Nats-Time-Stamp")), key=parsed[0], scope=parsed[1],
                             event_id=event_id_of(headers, seq), payload=payload, metadata=metadata,
                             size=len(m.data or b""), value=value, meta=meta if isinstance(meta, dict) else {}))
    if rows:
        await _add_outcomes(bide, rows)
    return rows


async def _add_outcomes(bide: Bide, rows: list[EventRow]) -> None:
    """Attach the router's outcome records (``<prefix>.outcomes.<seq>``, their own stream) to ``rows``.

    A record is written after its event, so reading from the oldest row's time finds them all
    (those still within the events stream's retention).
    """
    conn = await bide._pool.get()
    s = conn.layout.subjects
    by_seq = {r.seq: r for r in rows}
    oldest = min(r.at for r in rows)
    for m in await direct_get_subject(conn.nc, s.outcomes_stream, s.outcomes_all, start_time=rfc3339(oldest)):
        seq = s.parse_outcome_subject((m.headers or {}).get("Nats-Subject", ""))
        row = by_seq.get(seq) if seq is not None else None
        if row is None:
            continue
        try:
            rec = orjson.loads(m.data)
            row.outcomes.append(Outcome(run_id=str(rec["run_id"]), task=str(rec["task"]), how=str(rec["how"]),
                                        wait_id=rec.get("wait_id")))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue  # not a record the router wrote: passed over
