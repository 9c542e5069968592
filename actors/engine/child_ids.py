"""Child runs' ids and what starting one takes: derived from the parent's history, so a replay never spawns twice."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdk.limits import MAX_NAME_BYTES, check_name


@dataclass(frozen=True)
class ChildStart:
    """One child run to start (its id is already fixed by the parent's history)."""

    run_id: str
    task: str
    durable: bool
    input: Any
    execution_timeout_s: float | None = None
    parents: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    additional_metadata: dict[str, str] = field(default_factory=dict)
    """The parent's metadata merged with the child's own (the child's keys win)."""
    detached: bool = False
    """Fire-and-forget (``aio_run_no_wait``): its trace is its own, linked to the parent's."""


CHILD_ID_SEPARATOR = "~"
"""Marks a derived child id. Run ids a caller chooses and child keys may not contain it, so a
derived id can be neither taken by another run nor read two ways (``P~k~a~1~0`` is the
child at ``1, 0`` of ``P``'s child ``a``, never ``P``'s child keyed ``a~1~0``)."""


def validate_child_key(key: object) -> str:
    if not isinstance(key, str) or not key or CHILD_ID_SEPARATOR in key:
        raise ValueError(f"child_key must be a non-empty string without {CHILD_ID_SEPARATOR!r}, got {key!r}")
    return check_name(key, "child_key")


MAX_DERIVED_ID_BYTES = MAX_NAME_BYTES + 35
"""The longest id :func:`child_run_id` gives: a root run's id (at most ``MAX_NAME_BYTES``),
``~h~`` and a 32-digit digest. Ids grow with nesting (each keyed level adds its key), and a run's
id is a token of its subjects: twenty levels of long keys named a subject past nats-server's
4 KiB protocol line, and the server closed the host's connection at the deepest start."""


def child_run_id(parent_run_id: str, pos: int, index: int, key: str | None) -> str:
    """Deterministic: the same parent position (or ``child_key``) always names the same child.

    ``<parent>~<pos>~<index>``, or ``<parent>~k~<key>``; one longer than ``MAX_NAME_BYTES`` is
    ``<root>~h~<digest of that id>``, the root being the id of the run at the top of the tree.
    A parent reads its children's ids from its history, so a replay never derives them again.
    """
    sep = CHILD_ID_SEPARATOR
    if key is not None:
        rid = f"{parent_run_id}{sep}k{sep}{validate_child_key(key)}"
    else:
        rid = f"{parent_run_id}{sep}{pos}{sep}{index}"
    if len(rid.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES:
        return rid
    digest = hashlib.sha256(rid.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{rid.split(sep, 1)[0]}{sep}h{sep}{digest}"


def child_run_ids(parent_run_id: str, pos: int, keys: list[str | None], spawned: Mapping[str, object]) -> list[str]:
    """The ids of one spawn's children; ``ValueError`` if two would be the same run.

    Two equal child keys in one spawn, or a key this parent already used in an earlier
    spawn, would name one child twice: it would run once and report once, and the parent
    would wait for the second report forever. ``spawned`` is every child the parent has.
    """
    ids = [child_run_id(parent_run_id, pos, i, k) for i, k in enumerate(keys)]
    seen: set[str] = set()
    for rid, key in zip(ids, keys, strict=True):
        if rid in seen:
            raise ValueError(f"child_key {key!r} is given twice in one spawn of run {parent_run_id}; "
                             "each child needs its own key")
        if rid in spawned:
            raise ValueError(f"child_key {key!r} was already used by run {parent_run_id} for an earlier child "
                             f"({rid}); a key names one child per parent")
        seen.add(rid)
    return ids
