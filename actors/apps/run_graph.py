"""A run's descendants as a bounded tree, and a workflow run as its DAG with each task's state.

The tree is read level by level from the histories (at most :data:`MAX_TREE_DEPTH` levels and
:data:`MAX_TREE_NODES` runs in all, one history read each), so a page costs the same however
many descendants a run has.

A workflow run's history holds only the tasks it started (``children_spawned``, one position
per task in the workflow's order); the tasks not started yet are known only to the code. The
server (``bide serve``) imports no user code, so the shape comes from the hosts: each host
serving a workflow advertises its shape (:func:`actors.engine.dag.workflow_shape`) in the router
status stream. The page takes the advertisement of a host that is up and agrees with what the
run started (a deployment of another version may be rolling out); with none, it shows the tasks
started and says the shape is unknown.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from actors.engine.run_history import RunHistory
from actors.engine.wire import ChildrenSpawned, RunCompleted, SignalReceived
from actors.store.jetstream import direct_get_subject
from sdk.runs import status_of

if TYPE_CHECKING:
    from sdk import Bide

log = logging.getLogger("bide.ui")

MAX_TREE_DEPTH = 3
"""How many levels of descendants a run page shows (children, grandchildren, ...)."""
MAX_TREE_NODES = 200
"""How many descendants a run page reads and shows in all (one history read each)."""
MAX_SHAPE_HOSTS = 64
"""How many hosts' advertisements of one workflow a page reads at most."""

# -- the tree --------------------------------------------------------------------------------------


@dataclass
class ChildNode:
    """A descendant of a run, with its own children as far as the bounds allow."""

    run_id: str
    task: str
    status: str = "unknown"
    """As a run's, or ``unknown`` if its history is gone or unreadable."""
    after: list[str] = field(default_factory=list)
    """A workflow task's parents in the DAG (the outcomes its start entry carries)."""
    skipped: bool = False
    children: list[ChildNode] = field(default_factory=list)
    more: int = 0
    """Its children not shown (past the depth or node bound): its own page shows them."""

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "task": self.task, "status": self.status, "after": self.after,
                "children": [c.as_dict() for c in self.children], "more": self.more}


def spawned_of(hist: RunHistory) -> list[tuple[str, str]]:
    """(run id, task) of every child ``hist`` spawned, in spawn order."""
    return [(r, e.task) for e in hist.entries if isinstance(e, ChildrenSpawned) for r in e.run_ids]


async def _read(bide: Bide, node: ChildNode) -> list[tuple[str, str]]:
    """Fill in ``node``'s state from its history; its children's (run id, task)."""
    try:
        hist = await bide.runs.aio_history(node.run_id)
        node.status = status_of(hist).value
        node.after = sorted(hist.started.parents or {})
        end = hist.state.terminal
        node.skipped = isinstance(end, RunCompleted) and bool(end.skipped)
        return spawned_of(hist)
    except Exception:  # a child removed after its retention, or not started yet
        return []


async def child_tree(bide: Bide, hist: RunHistory, *, depth: int = MAX_TREE_DEPTH,
                     budget: int = MAX_TREE_NODES) -> tuple[list[ChildNode], int]:
    """The run's children, each with its descendants (breadth first: nearer levels are shown whole
    before deeper ones), and how many children were left out."""
    spawned = spawned_of(hist)
    top = [ChildNode(r, t) for r, t in spawned[:budget]]
    budget -= len(top)
    level = top
    for d in range(1, depth + 1):
        kids = await asyncio.gather(*(_read(bide, n) for n in level))
        nxt: list[ChildNode] = []
        for node, theirs in zip(level, kids, strict=True):
            take = theirs[:budget] if d < depth else []
            budget -= len(take)
            node.children = [ChildNode(r, t) for r, t in take]
            node.more = len(theirs) - len(take)
            nxt += node.children
        level = nxt
        if not level:
            break
    return top, len(spawned) - len(top)


# -- the DAG ---------------------------------------------------------------------------------------

NODE_W, NODE_H, GAP_X, GAP_Y = 168, 38, 48, 12


@dataclass
class DagTask:
    key: str
    """The task's name in the workflow."""
    task: str
    """The task's name (``<workflow>:<key>``)."""
    parents: list[str]
    state: str
    """``pending`` (not started), ``queued``, ``running``, ``waiting``, ``completed``, ``failed``,
    ``cancelled``, ``skipped`` or ``unknown`` (started, its history gone)."""
    run_id: str | None = None
    depth: int = 0
    row: int = 0

    @property
    def x(self) -> int:
        return 1 + self.depth * (NODE_W + GAP_X)

    @property
    def y(self) -> int:
        return 1 + self.row * (NODE_H + GAP_Y)


@dataclass
class Dag:
    workflow: str
    shape: str
    """``advertised`` (every task, from a host up), ``unknown`` (no host up advertises it),
    ``mismatch`` (the hosts up serve another version) or ``too_big`` (only the tasks started)."""
    tasks: list[DagTask]
    host: str | None = None
    """The host whose advertisement gave the shape."""
    node_w: ClassVar[int] = NODE_W
    node_h: ClassVar[int] = NODE_H

    @property
    def note(self) -> str:
        return {
            "advertised": "",
            "unknown": "The workflow's shape is unknown: no host that is up serves it. Only the tasks "
                       "started so far are shown.",
            "mismatch": "The workflow's shape is unknown: the hosts up serve another version of it. "
                        "Only the tasks started so far are shown.",
            "too_big": "The workflow is too large to advertise its shape. Only the tasks started so far are shown.",
        }[self.shape]

    # The drawing (an inline SVG, server-rendered): a column per depth level, a box per task.

    @property
    def width(self) -> int:
        return (1 + max((t.depth for t in self.tasks), default=0)) * (NODE_W + GAP_X) - GAP_X + 2

    @property
    def height(self) -> int:
        return (1 + max((t.row for t in self.tasks), default=0)) * (NODE_H + GAP_Y) - GAP_Y + 2

    @property
    def edges(self) -> list[tuple[int, int, int, int]]:
        """(x1, y1, x2, y2): from the right side of a parent's box to the left side of its child's."""
        at = {t.key: t for t in self.tasks}
        return [(p.x + NODE_W, p.y + NODE_H // 2, t.x, t.y + NODE_H // 2)
                for t in self.tasks for p in (at[k] for k in t.parents if k in at)]

    def as_dict(self) -> dict[str, Any]:
        return {"workflow": self.workflow, "shape": self.shape, "host": self.host,
                "tasks": [{"key": t.key, "task": t.task, "parents": t.parents, "state": t.state, "run_id": t.run_id}
                          for t in self.tasks]}


async def advertised_shapes(bide: Bide, workflow: str) -> list[dict[str, Any]]:
    """The shapes of ``workflow`` that hosts up advertise (sorted by host; empty if none or unreadable)."""
    from actors.hosting.router_partitions import HOST_FRESH_S, read_status

    conn = await bide._pool.get()
    s = conn.layout.subjects
    try:
        hosts = await read_status(conn.nc, conn.layout, "host")
        newest = max((r["_ts"] for r in hosts), default=0.0)
        up = {r["host"] for r in hosts if r.get("up", True) and newest - r["_ts"] <= HOST_FRESH_S
              and workflow in (r.get("workflows") or [])}
        if not up:
            return []
        msgs = await direct_get_subject(conn.nc, s.router_status_stream, s.router_workflow_shape(workflow),
                                        batch=MAX_SHAPE_HOSTS, limit=MAX_SHAPE_HOSTS, timeout=3.0)
    except Exception as e:  # the status stream unreadable (a user without the right): the shape is unknown
        log.debug("reading the shape of workflow %r: %s", workflow, e)
        return []
    out = []
    for m in msgs:
        try:
            rec = orjson.loads(m.data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("workflow") == workflow and rec.get("host") in up:
            out.append(rec)
    return sorted(out, key=lambda r: str(r["host"]))


def _valid_shape(rec: dict[str, Any]) -> tuple[list[str], list[list[int]]] | None:
    """(keys, parent positions) of an advertisement, or ``None`` if it is not one this code wrote."""
    keys, parents = rec.get("keys"), rec.get("parents")
    if not (isinstance(keys, list) and isinstance(parents, list) and len(keys) == len(parents)
            and all(isinstance(k, str) for k in keys)):
        return None
    for i, ps in enumerate(parents):
        if not (isinstance(ps, list) and all(isinstance(p, int) and 0 <= p < i for p in ps)):
            return None
    return keys, parents


def pick_shape(workflow: str, started: dict[int, str], candidates: list[dict[str, Any]]
               ) -> tuple[str, str | None, tuple[list[str], list[list[int]]] | None]:
    """(shape, host, (keys, parent positions)) of the first advertisement that agrees with the tasks
    the run started (``started``: task name by position); ``(why not, None, None)`` without one."""
    why = "unknown" if not candidates else "mismatch"
    for rec in candidates:
        if rec.get("too_big"):
            why = "too_big"
            continue
        valid = _valid_shape(rec)
        # Another version of the workflow (a rolling deployment) may number its tasks otherwise.
        if valid is not None and all(pos < len(valid[0]) and f"{workflow}:{valid[0][pos]}" == task
                                     for pos, task in started.items()):
            return "advertised", str(rec.get("host")), valid
    return why, None, None


def _is_workflow_spawn(e: ChildrenSpawned, workflow: str) -> bool:
    # A workflow run records one run per task, with no arguments hash (see actors.engine.dag).
    return e.args_hash == "" and len(e.run_ids) == 1 and e.task.startswith(f"{workflow}:")


def _outcomes(hist: RunHistory) -> dict[str, dict[str, Any]]:
    """Each child's outcome the run has heard (in its history or its inbox), by run id."""
    sigs = [e.signal for e in hist.entries if isinstance(e, SignalReceived)] + [sig for _, sig in hist.inbox]
    return {sig.name: sig.payload for sig in sigs if sig.source == "child" and isinstance(sig.payload, dict)}


def _state(run_id: str | None, heard: dict[str, dict[str, Any]], live: dict[str, ChildNode]) -> str:
    if run_id is None:
        return "pending"
    node = live.get(run_id)
    if node is not None and node.status != "unknown":
        return "skipped" if node.skipped else node.status
    o = heard.get(run_id)
    if o is not None:
        return "skipped" if o.get("skipped") else str(o.get("status", "unknown"))
    return "unknown" if node is not None else "running"


async def workflow_dag(bide: Bide, hist: RunHistory, children: list[ChildNode]) -> Dag | None:
    """The DAG of a workflow run with each task's state (``None`` if the run is not a workflow's)."""
    workflow = hist.started.task
    spawns = [e for e in hist.entries if isinstance(e, ChildrenSpawned)]
    if spawns and not all(_is_workflow_spawn(e, workflow) for e in spawns):
        return None  # a task that starts children from its code: its tree says it all
    started = {e.pos: (e.task, e.run_ids[0]) for e in spawns}
    heard = _outcomes(hist)
    live = {c.run_id: c for c in children}
    candidates = await advertised_shapes(bide, workflow)
    if not candidates and not spawns:
        return None
    shape, host, picked = pick_shape(workflow, {pos: task for pos, (task, _) in started.items()}, candidates)
    tasks: list[DagTask] = []
    if picked is not None:
        keys, parents = picked
        run_ids = [started[i][1] if i in started else None for i in range(len(keys))]
        tasks = [DagTask(key=k, task=f"{workflow}:{k}", parents=[keys[p] for p in parents[i]],
                         state=_state(run_ids[i], heard, live), run_id=run_ids[i]) for i, k in enumerate(keys)]
    else:
        prefix = len(workflow) + 1
        tasks = [DagTask(key=task[prefix:], task=task, parents=list(live[rid].after) if rid in live else [],
                         state=_state(rid, heard, live), run_id=rid) for _, (task, rid) in sorted(started.items())]
    _lay_out(tasks)
    return Dag(workflow=workflow, shape=shape, tasks=tasks, host=host)


def _lay_out(tasks: list[DagTask]) -> None:
    """A column per depth (the longest path from a root), tasks in their order down each column."""
    depth: dict[str, int] = {}
    rows: dict[int, int] = {}
    for t in tasks:
        t.depth = 1 + max((depth[p] for p in t.parents if p in depth), default=-1)
        depth[t.key] = t.depth
        t.row = rows.get(t.depth, 0)
        rows[t.depth] = t.row + 1
