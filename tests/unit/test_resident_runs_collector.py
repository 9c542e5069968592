"""The host keeps waiting turns' objects out of the collector's passes, and gives them back."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from actors.hosting.collector import ResidentRuns


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_what_exists_when_enough_turns_wait_is_frozen_and_each_step_more_freezes_again() -> None:
    runs = ResidentRuns(at=4)
    for waiting in range(1, 4):
        runs.changed(waiting)
    assert gc.get_freeze_count() == 0
    runs.changed(4)
    assert gc.get_freeze_count() > 0 and runs.frozen_at == 4
    runs.changed(7)
    assert runs.freezes == 1  # not a step more yet
    runs.changed(8)
    assert (runs.freezes, runs.frozen_at) == (2, 8)


def test_cyclic_garbage_frozen_with_them_is_collected_once_fewer_wait() -> None:
    runs = ResidentRuns(at=4)
    ref = _cycle()
    runs.changed(4)
    gc.collect()
    assert ref() is not None  # frozen: no pass walks it
    runs.changed(3)
    gc.collect()
    assert ref() is not None  # still half or more of the step
    runs.changed(1)
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None


def test_nothing_stays_frozen_longer_than_its_bound_while_turns_keep_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("actors.hosting.collector.time.monotonic", lambda: clock[0])
    runs = ResidentRuns(at=4, most_s=30.0)
    ref = _cycle()
    runs.changed(4)
    clock[0] += 31.0
    runs.changed(5)  # many still wait, but the bound has passed
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None
    runs.changed(6)  # and a new freeze begins
    assert gc.get_freeze_count() > 0
