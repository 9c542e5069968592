"""Python's cyclic garbage collector in a process that hosts runs.

A turn allocates thousands of short-lived container objects (futures, tasks, pydantic
models, messages), most freed by reference counting at once. CPython's collector
nevertheless passes over the young ones every 700 net allocations, and each pass also
walks what survived the last ones: with the default, `python -m benchmarks.throughput`
and `python -m benchmarks.timers_at_scale` found it taking about a fifth of a host's CPU
(a trivial run 325 → 260 µs of worker CPU, a timer's fire 480 → 360 µs, at 50,000).

So a host raises that number (``BIDE_GC_THRESHOLD``, default 50,000) and keeps the
older generations' counts (each is collected after so many passes over the one before,
so they run less often too), and freezes what exists when it starts (the modules and
the user's code, which are not garbage), so that no pass walks them again. Cyclic
garbage waits longer before it is freed; ``python -m benchmarks.memory_waiting`` found
no change in a host's memory per waiting run. 0 leaves the process's collector as it
is, for a host embedded in a program that tunes its own.
"""

from __future__ import annotations

import gc
import time

_frozen = False


def tune_collector(threshold: int) -> None:
    """Collect young objects every ``threshold`` net allocations (0: leave the collector alone); freeze once."""
    global _frozen
    if threshold <= 0:
        return
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
    if not _frozen:
        gc.freeze()
        _frozen = True


class ResidentRuns:
    """Keeps the objects of turns waiting in this host for their moment out of the collector's passes.

    With thousands of sleepers read and replayed ahead of their moment (``SlotPool.lent``), each
    young pass walks objects that all survive, and a pass of the middle generation walks ten
    passes' worth: 150-210 ms with 10,000 waiting in one host, a pause every wake-up queued
    behind it waits out. Once ``at`` turns wait (and at each ``at`` more), what exists is frozen
    (``gc.freeze``: no pass walks it, reference counting still frees it); once fewer than half
    that wait, or ``most_s`` after the first freeze, it is unfrozen, so cyclic garbage among
    those objects waits at most that long. Unfreezing also returns what the host froze at its
    start to the oldest generation.
    """

    def __init__(self, at: int = 500, most_s: float = 30.0) -> None:
        self.at = at
        self.most_s = most_s
        self.frozen_at = 0
        """How many turns waited at the last freeze (0: nothing frozen by this)."""
        self._since = 0.0
        self.freezes = 0

    def changed(self, waiting: int) -> None:
        """``waiting`` turns wait for their moment now."""
        now = time.monotonic()
        if self.frozen_at and (waiting < self.at // 2 or now - self._since > self.most_s):
            gc.unfreeze()
            self.frozen_at = 0
        elif waiting >= max(self.at, self.frozen_at + self.at):
            if not self.frozen_at:
                self._since = now
            gc.freeze()
            self.frozen_at = waiting
            self.freezes += 1
