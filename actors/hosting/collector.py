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
