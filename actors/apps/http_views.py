"""What the HTTP API's read routes answer: a whole run, recent events (the response models and their data).

The data comes from :mod:`actors.apps.web_views`, the one place that folds a run's history and
reads the events stream, so the API, ``bide runs show --json``, ``bide events list`` and the web
UI agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from actors.apps.web_views import recent_events, run_document, run_page
from sdk import Bide
from sdk.events import validate_key
from sdk.runs import _moment as moment_of

MAX_EVENTS = 1000
"""The most events one listing returns."""
SINCE_AGO_PATTERN = r"^([0-9]{1,5}(ms|s|m|h)|[0-9]{1,4}d)$"
"""A ``since`` of the API given as a duration ago (``10m``), within the 100 years a duration may span;
the CLI takes any duration :mod:`sdk.durations` reads."""
DURATION_AGO = r"^[0-9]+(ms|s|m|h|d)$"
"""Any ``since`` spelled as a duration: refused with the duration's own reason when out of range."""


class RunState(BaseModel):
    """A run's state, as `bide runs show` prints it (its first line)."""

    run_id: str
    task: str
    status: str = Field(description="queued, running, waiting, completed, failed or cancelled")
    started_at: str
    result: Any = Field(default=None, description="the result of a completed run")
    error: str | None = Field(default=None, description="`Type: message` of a failed run")
    entries: int = Field(description="how many entries its history holds")
    trace_id: str


class RunParent(BaseModel):
    run_id: str
    task: str


class HistoryItem(BaseModel):
    """One history entry, in order: as stored (`entry.k` names its kind), with the time its batch was stored."""

    stored_at: str | None
    entry: dict[str, Any]


class WaitConditionView(BaseModel):
    """One condition of a pending wait: an event (key, scope, CEL expression) or a sleep (its timeout)."""

    kind: Literal["event", "sleep"]
    name: str = Field(description="the condition's name in the wait's result")
    event_key: str | None = None
    scope: str | None = None
    expression: str | None = None
    wake_at: str | None = Field(default=None, description="when a sleep condition ends the wait")


class PendingWait(BaseModel):
    wait_id: str
    label: str
    conditions: list[WaitConditionView]
    timeout_at: str | None = Field(default=None, description="the earliest sleep condition's end: the wait's timeout")


class RunChild(BaseModel):
    run_id: str
    task: str
    status: str = Field(description="as a run's, or `unknown` if its history is gone")
    after: list[str] = Field(default_factory=list, description="a workflow task's parents in the DAG")
    children: list[RunChild] = Field(default_factory=list, description="its own children (3 levels and 200 "
                                                                       "descendants at most in all)")
    more: int = Field(default=0, description="its children left out by those bounds")


class DagTaskView(BaseModel):
    key: str = Field(description="the task's name in the workflow")
    task: str
    parents: list[str] = Field(description="the keys of its parents")
    state: str = Field(description="pending (not started), queued, running, waiting, completed, failed, cancelled, "
                                   "skipped, or unknown (its history is gone)")
    run_id: str | None = Field(default=None, description="its run, once started")


class RunDag(BaseModel):
    """A workflow run's tasks, their parents and states."""

    workflow: str
    shape: Literal["advertised", "unknown", "mismatch", "too_big"] = Field(
        description="advertised: every task (the shape a host up advertises); otherwise only the tasks started: "
                    "no host up serves the workflow (unknown), they serve another version (mismatch), or it is "
                    "too large to advertise (too_big)")
    host: str | None = Field(default=None, description="the host whose advertisement gave the shape")
    tasks: list[DagTaskView]


class RunDetail(RunState):
    """The whole run (`?detail=full`): its state, input, metadata, history, pending waits, children and outcome."""

    ended_at: str | None = None
    input: Any = None
    additional_metadata: dict[str, Any] = Field(default_factory=dict)
    parent: RunParent | None = None
    traceback: str | None = Field(default=None, description="the traceback of a failed run")
    cancel_reason: str | None = Field(default=None, description="why a cancelled run was cancelled")
    history: list[HistoryItem]
    pending_waits: list[PendingWait] = Field(description="empty once the run has ended")
    children: list[RunChild] = Field(description="in spawn order, with their descendants (at most 200 in all)")
    children_more: int = Field(default=0, description="children left out past that bound")
    dag: RunDag | None = Field(default=None, description="a workflow run's DAG; null for other runs")


async def run_detail(bide: Bide, run_id: str) -> RunDetail:
    """The whole run (:class:`~sdk.RunNotFoundError` if there is no such run)."""
    return RunDetail.model_validate(run_document(await run_page(bide, run_id)))


class Outcome(BaseModel):
    """A run an event resumed (one of its waits matched) or started (an `on_events` task)."""

    run_id: str
    task: str
    how: Literal["resumed", "started"]
    wait_id: str | None = Field(default=None, description="the wait it satisfied (`resumed` only)")


class EventListed(BaseModel):
    """An event in the events stream, with the runs it resumed or started (as the router recorded them)."""

    seq: int = Field(description="its sequence number in the events stream")
    at: str = Field(description="when it was stored")
    key: str
    scope: str | None
    event_id: str
    size: int = Field(description="the payload's size in bytes")
    payload: Any = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    outcomes: list[Outcome]


class EventList(BaseModel):
    """Recent events, newest first."""

    events: list[EventListed]


def since_of(text: str | datetime | None) -> datetime | None:
    """A time (ISO 8601) or a duration ago (``10m``); ``ValueError`` naming the value otherwise."""
    if text is None or isinstance(text, datetime):
        return text
    try:
        return moment_of(text, "since")
    except OverflowError:
        raise ValueError(f"since {text!r:.100} is too far back; give a time (ISO 8601) or a duration such "
                         "as '10m'") from None


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_EVENTS:
        raise ValueError(f"limit must be between 1 and {MAX_EVENTS}, got {limit}")
    return limit


async def event_list(bide: Bide, key: str | None, since: str | datetime | None, limit: int) -> EventList:
    """Recent events (``ValueError`` naming a bad ``key``, ``since`` or ``limit``)."""
    rows = await recent_events(bide, check_limit(limit), validate_key(key) if key is not None else None,
                               since_of(since))
    return EventList.model_validate({"events": [r.as_dict() for r in rows]})
