"""A workflow task's conditions (``wait_for``, ``skip_if``, ``cancel_if``), checked in its run before its function."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdk import _cel
from sdk.conditions import Condition, OrGroup, ParentCondition
from sdk.errors import TaskCancelledByCondition, TaskSkipped

if TYPE_CHECKING:
    from sdk.tasks import TaskDefinition

SKIPPED = {"skipped": True}
"""A skipped task's entry in the workflow's result."""


async def gate(task: TaskDefinition, ctx: Any) -> None:
    """A workflow task's conditions, checked in its own run before its function.

    Parent conditions are decided at once (the parents' outputs are in the run's first
    entry). The rest become one durable wait: it ends when every ``wait_for`` item holds,
    or when any ``skip_if`` / ``cancel_if`` condition holds, whichever comes first.
    Raises :class:`TaskSkipped` or :class:`TaskCancelledByCondition` to end the run so.
    """

    def holds(c: ParentCondition) -> bool:
        key = c.parent.workflow_key
        outcome = ctx._parents.get(key) or {}
        if outcome.get("status") != "completed" or outcome.get("skipped"):
            return False
        return _cel.evaluate_output(c.expression, outcome.get("result"))

    live: dict[str, list[tuple[str, Condition]]] = {"skip_if": [], "cancel_if": []}
    for kind in ("cancel_if", "skip_if"):
        for item in getattr(task, kind):
            for c in (item.conditions if isinstance(item, OrGroup) else (item,)):
                if isinstance(c, ParentCondition):
                    if holds(c):
                        _end(task, kind, f"parent condition {c.expression!r} on {c.parent.workflow_key!r} holds")
                else:
                    live[kind].append((f"{kind.removesuffix('_if')}:{_key(c)}", c))
    groups: list[list[Condition]] = []
    for item in task.wait_for:
        conds = list(item.conditions) if isinstance(item, OrGroup) else [item]
        parent_conds = [c for c in conds if isinstance(c, ParentCondition)]
        if any(holds(c) for c in parent_conds):
            continue  # this group holds already
        rest: list[Condition] = [c for c in conds if not isinstance(c, ParentCondition)]
        if not rest:
            # Only parent conditions, none true: nothing can make them true later.
            raise TaskSkipped(f"task {task.workflow_key!r}: its wait_for parent condition does not hold")
        groups.append(rest)
    any_of = live["cancel_if"] + live["skip_if"]
    if not groups and not any_of:
        return
    result = await ctx._runtime.wait(f"conditions:{task.workflow_key}", groups, any_of)
    for key in result:
        if key.startswith("cancel:"):
            _end(task, "cancel_if", f"condition {key.removeprefix('cancel:')!r} happened")
        if key.startswith("skip:"):
            _end(task, "skip_if", f"condition {key.removeprefix('skip:')!r} happened")


def _key(c: Condition) -> str:
    return c.readable_data_key or "condition"


def _end(task: TaskDefinition, kind: str, why: str) -> None:
    if kind == "cancel_if":
        raise TaskCancelledByCondition(f"cancel_if: {why}")  # the workflow's reason names the task
    raise TaskSkipped(f"task {task.workflow_key!r} skipped by skip_if: {why}")
