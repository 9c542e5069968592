"""The router's wait index with no server: what matches, what a removal leaves, what an entry keeps."""

from __future__ import annotations

from typing import Any

from actors.engine.wait_index import PendingWaitEntry, WaitIndex
from actors.engine.wire import WaitRegistration


def entry(run: str, expression: str | None, *, cond: int = 0, scope: str | None = None,
          run_input: Any = None, seq: int = 1) -> PendingWaitEntry:
    reg = WaitRegistration(op="register", wait_id=f"{run}:0", cond=cond, run_id=run, task="T", event_key="order",
                           scope=scope, expression=expression, run_input=run_input)
    return PendingWaitEntry(reg, seq)


def matched(index: WaitIndex, payload: Any, scope: str | None = None) -> list[str]:
    return sorted(w.run_id for w in index.matches("order", scope, payload))


def test_waits_sharing_an_indexed_value_all_match_and_each_removal_leaves_the_others() -> None:
    index = WaitIndex()
    a, b, c = entry("a", "input.id == 7"), entry("b", "input.id == 7"), entry("c", "input.id == 8")
    for w in (a, b, c):
        index.add(w)
    index.add(entry("a", "input.id == 7"))  # the same registration read again: held once
    assert len(index) == 3
    assert matched(index, {"id": 7}) == ["a", "b"]
    index.remove(a.cid)
    assert matched(index, {"id": 7}) == ["b"]
    index.remove(b.cid)
    assert matched(index, {"id": 7}) == []
    assert matched(index, {"id": 8}) == ["c"]
    index.remove(c.cid)
    assert len(index) == 0 and not index._buckets


def test_unindexable_and_scoped_waits_are_scanned_and_matched_by_their_expression() -> None:
    index = WaitIndex()
    index.add(entry("any", None))
    index.add(entry("big", "input.total > 100"))
    index.add(entry("mine", "input.user == event.user", run_input={"user": "u1"}))
    index.add(entry("scoped", "input.id == 1", scope="eu"))
    assert matched(index, {"total": 500, "user": "u1", "id": 1}) == ["any", "big", "mine"]
    assert matched(index, {"total": 5, "user": "u2", "id": 1}, scope="eu") == ["any", "scoped"]


def test_an_entry_of_equality_predicates_keeps_neither_its_text_nor_the_runs_input() -> None:
    w = entry("r1", "input.id == 7 && input.kind == 'x'", cond=2, run_input={"big": "x" * 1000})
    assert w.complete and w.expression is None and w.run_input is None
    assert w.wait_id == "r1:0" and w.cid == "r1:0/2"
    assert w.matches({"id": 7, "kind": "x"}) and not w.matches({"id": 7, "kind": "y"})
    other = entry("r2", "input.id == 9")
    assert w.index_key is not None and other.index_key is not None
    assert w.index_key[0] is other.index_key[0]  # one path object for every wait on that field
