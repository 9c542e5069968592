"""Warm runs: parked runs whose code a host keeps suspended in memory, so their next turn needs no replay.

Replaying a run costs what it has lived: every turn re-reads the whole history and re-runs
the code through every checkpoint, so a run that waits K times costs O(K²) over its life.
A host that parks a run may keep it warm instead of evicting it: the coroutine stays
suspended where it waits, with its turn's state and the history as this host wrote it.
When the run's next activation comes to the same host, the host reads only what is new
(:meth:`actors.store.history.HistoryLog.read_since`); if nobody else wrote to the history
meanwhile, the code goes on from where it parked. Anything else (another host wrote, a
redelivery, code that went on by itself while parked, a full cache) falls back to the
replay, which is always correct: a warm run is only ever a shortcut.

The cache is bounded by a count and by the stored size of the histories it holds, and
evicts the least recently parked run first (its code is cancelled, as an evicted run's is).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from actors.engine.replay import Turn
from actors.engine.run_history import RunHistory
from actors.engine.wire import Activation
from actors.store.history import HistoryLog


@dataclass
class WarmRun:
    """A parked run kept in memory: its turn, its suspended code, its history as of its last append."""

    turn: Turn
    user: asyncio.Task[Any]
    history: RunHistory

    @property
    def usable(self) -> bool:
        """Whether its code is still parked where the turn left it (not gone on, failed or finished)."""
        return self.turn.resumable and not self.user.done()

    def discard(self) -> None:
        """Evict it: its code is cancelled, and its next turn replays the history."""
        if not self.user.done():
            self.user.cancel()


class WarmRuns:
    """At most ``max_runs`` warm runs holding at most ``max_bytes`` of history, least recently parked out first."""

    def __init__(self, max_runs: int, max_bytes: int) -> None:
        self._max_runs = max_runs
        self._max_bytes = max_bytes
        self._runs: OrderedDict[str, WarmRun] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        """Turns that went on from a warm run (for tests and benchmarks)."""

    def __len__(self) -> int:
        return len(self._runs)

    def keep(self, run_id: str, warm: WarmRun) -> bool:
        """Keep ``warm`` (replacing any earlier one of the run); False (and discarded) if it does not fit."""
        self.drop(run_id)
        size = warm.history.size_bytes
        if self._max_runs <= 0 or size > self._max_bytes or not warm.usable:
            warm.discard()
            return False
        self._runs[run_id] = warm
        self._bytes += size
        while len(self._runs) > self._max_runs or self._bytes > self._max_bytes:
            _, oldest = self._runs.popitem(last=False)
            self._bytes -= oldest.history.size_bytes
            oldest.discard()
        return True

    def take(self, run_id: str) -> WarmRun | None:
        """The run's warm state, out of the cache (a turn owns it now); ``None`` if not kept or not usable."""
        warm = self._runs.pop(run_id, None)
        if warm is None:
            return None
        self._bytes -= warm.history.size_bytes
        if not warm.usable:
            warm.discard()
            return None
        return warm

    async def take_for(self, act: Activation, delivery: int,
                       history: HistoryLog) -> tuple[WarmRun, RunHistory] | tuple[None, None]:
        """The run's warm state and its view now (what is new read), if this activation may use them.

        A redelivery trusts only the stored history, and only timers and signals wake a parked
        run; a history that another host wrote to since makes the turn replay.
        """
        warm = self.take(act.run_id)
        if warm is None:
            return None, None
        if delivery > 1 or act.kind not in ("timer", "signal"):
            warm.discard()
            return None, None
        try:
            view = await history.read_since(warm.history, history_seq=act.history_seq or 0,
                                            inbox_seq=act.inbox_seq or 0)
        except BaseException:
            warm.discard()
            raise
        if view is None:
            warm.discard()
            return None, None
        return warm, view

    def drop(self, run_id: str) -> None:
        warm = self.take(run_id)
        if warm is not None:
            warm.discard()

    def clear(self) -> None:
        for warm in self._runs.values():
            warm.discard()
        self._runs.clear()
        self._bytes = 0
