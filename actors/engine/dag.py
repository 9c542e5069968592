"""A workflow run's turn, decided from its history: which tasks to start, and whether the run ends.

The state is the history: which tasks were spawned (``children_spawned``, one position
per task, in the workflow's order) and which have reported back (``child`` signals). A
task is recorded before it is started, and starting is idempotent, so a crash anywhere
neither loses nor doubles a task. The host appends ``new``, then starts ``to_start``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson

from actors.engine.child_ids import ChildStart, child_run_id
from actors.engine.commands import Append, Command, PurgeInbox, RunEnd, StartChildren, end_of_run, inbox_upto
from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    ActivationBegun,
    ChildrenSpawned,
    ErrorInfo,
    HistoryEntry,
    ParentLink,
    RunCancelled,
    RunCompleted,
    RunFailed,
    SignalReceived,
    Terminal,
)
from sdk.gates import SKIPPED


class DagTask(Protocol):
    """What the plan reads of a workflow's task (:class:`sdk.tasks.TaskDefinition`)."""

    @property
    def name(self) -> str: ...

    @property
    def workflow_key(self) -> str: ...

    @property
    def parents(self) -> Sequence[DagTask]: ...

    @property
    def runs_durably(self) -> bool: ...


@dataclass
class WorkflowTurn:
    new: list[HistoryEntry]
    """Entries to append, in one message (the activation, new signals, spawns, the end)."""
    to_start: list[int] = field(default_factory=list)
    """Positions (in the workflow's order) of the tasks to start after the append."""
    spawned: dict[str, str] = field(default_factory=dict)
    """Every task recorded, by name: its run id."""
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The outcome of every task that ended, by workflow key."""
    end: Terminal | None = None
    unfinished: list[tuple[str, str]] = field(default_factory=list)
    """``(run id, task)`` of tasks started and not ended, when the run ends."""


def plan_workflow_turn(hist: RunHistory, steps: Sequence[DagTask], host_id: str, delivery: int, now: datetime,
                       late: RunFailed | None) -> WorkflowTurn:
    """The turn of a workflow run: start every task whose parents have all ended; end when all have.

    ``late`` is the run's end if it missed its schedule timeout. A redelivered activation
    (``delivery`` > 1) starts again every task recorded and not heard from: the turn that
    recorded it may have died before starting it.
    """
    new: list[HistoryEntry] = [ActivationBegun(host=host_id, delivery=delivery, at=now)]
    new += [SignalReceived(inbox_seq=q, signal=sig) for q, sig in hist.inbox]
    spawned: dict[str, str] = {}
    outcomes: dict[str, dict[str, Any]] = {}
    cancel: str | None = None
    for e in [*hist.entries, *new]:
        if isinstance(e, ChildrenSpawned):
            spawned[e.task] = e.run_ids[0]
        elif isinstance(e, SignalReceived) and e.signal.source == "child":
            outcomes.setdefault(e.signal.name, e.signal.payload)
        elif isinstance(e, SignalReceived) and e.signal.source == "cancel" and cancel is None:
            cancel = e.signal.cancel_reason
    done = {t.workflow_key: outcomes[spawned[t.name]] for t in steps
            if t.name in spawned and spawned[t.name] in outcomes}
    end: Terminal | None = late
    if end is None and cancel is not None:
        end = RunCancelled(reason=cancel, at=now)
    for t in steps:
        o = done.get(t.workflow_key)
        if end is not None or o is None:
            continue
        if o["status"] == "failed":
            err = o.get("error") or {}
            end = RunFailed(error=ErrorInfo(
                type=err.get("type", "Error"),
                message=f"task {t.workflow_key!r} failed: {err.get('type')}: {err.get('message')}",
                traceback=err.get("traceback", "")), at=now)
        elif o["status"] == "cancelled":
            end = RunCancelled(reason=f"task {t.workflow_key!r} was cancelled: {o.get('reason')}", at=now)
    to_start: list[int] = []
    if end is None:
        for idx, t in enumerate(steps):
            if t.name not in spawned and all(p.workflow_key in done for p in t.parents):
                rid = child_run_id(hist.run_id, idx, 0, None)
                new.append(ChildrenSpawned(pos=idx, task=t.name, run_ids=[rid], args_hash="", at=now))
                spawned[t.name] = rid
                to_start.append(idx)
        if len(done) == len(steps):
            end = RunCompleted(result={k: SKIPPED if o.get("skipped") else o.get("result")
                                       for k, o in done.items()}, at=now)
    if end is not None:
        new.append(end)
    elif delivery > 1:
        to_start += [idx for idx, t in enumerate(steps)
                     if t.name in spawned and spawned[t.name] not in outcomes and idx not in to_start]
    unfinished = [(rid, task) for task, rid in spawned.items() if rid not in outcomes] if end is not None else []
    return WorkflowTurn(new=new, to_start=to_start, spawned=spawned, done=done, end=end, unfinished=unfinished)


def workflow_commands(hist: RunHistory, steps: Sequence[DagTask], plan: WorkflowTurn) -> list[Command]:
    """What the host carries out for ``plan``: append, purge the taken signals, start the tasks, wind up."""
    started = hist.started
    commands: list[Command] = [Append(plan.new)]
    if hist.inbox and plan.end is None:  # an end drains the whole inbox (ClearInbox)
        commands.append(PurgeInbox(hist.inbox[-1][0]))
    commands += [StartChildren(ParentLink(run_id=hist.run_id, task=started.task, pos=idx, n=1), [ChildStart(
        run_id=plan.spawned[steps[idx].name], task=steps[idx].name, durable=steps[idx].runs_durably,
        input=started.input, parents={p.workflow_key: plan.done[p.workflow_key] for p in steps[idx].parents},
        additional_metadata=started.additional_metadata)])
        for idx in plan.to_start]
    if plan.end is not None:
        # A workflow that fails or is cancelled stops the tasks it still has running.
        commands += end_of_run(started, RunEnd(plan.end, plan.unfinished, cancels_children_on_failure=True,
                                               inbox_upto=inbox_upto(hist)))
    return commands


MAX_SHAPE_BYTES = 64 * 1024
"""The largest shape a host advertises (a workflow of 200 tasks takes a few KiB); a larger
workflow is advertised by its task count alone, and the web UI says its shape is too large."""


def workflow_shape(name: str, steps: Sequence[DagTask]) -> dict[str, Any]:
    """What a host serving workflow ``name`` advertises of it (see :mod:`actors.apps.run_graph`).

    ``keys`` are the tasks' names in the workflow, in ``steps``' order, the order a run's
    ``children_spawned`` positions count in; ``parents[i]`` are the positions of task ``i``'s
    parents, each before ``i`` (``steps`` is a topological order), which keeps the record small.
    """
    keys = [t.workflow_key for t in steps]
    at = {k: i for i, k in enumerate(keys)}
    shape: dict[str, Any] = {"workflow": name, "keys": keys,
                             "parents": [[at[p.workflow_key] for p in t.parents] for t in steps]}
    if len(orjson.dumps(shape)) > MAX_SHAPE_BYTES:
        return {"workflow": name, "tasks": len(keys), "too_big": True}
    return shape
