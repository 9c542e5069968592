"""The failover benchmark's driver: trivial durable runs started at a steady rate, and what it saw.

Every run has an id the driver chose, so a start that failed while a stream had no leader is
retried as the same start (idempotent), and every run can be looked up at the end: the driver
records when each result arrived; the histories say when each completion was appended and
whether any run was lost or done twice.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

EXPECTED = {"value": 2}
"""What ``benchmarks.apps.BenchTrivial`` returns."""


@dataclass
class RunRecord:
    run_id: str
    started: float
    """When the driver first asked to start it (``time.monotonic``)."""
    arrived: float | None = None
    """When its result reached the driver (``time.monotonic``)."""
    result: Any = None
    retries: int = 0
    errors: list[str] = field(default_factory=list)


class Driver:
    """Starts ``bench_trivial`` runs at ``rate`` per second with at most ``in_flight`` unfinished.

    Open loop: the schedule does not slow down when results stop coming (up to ``in_flight``),
    as callers in front of a service would not. A failed start or wait is retried with the
    same run id until ``stop``; the error is kept for the report.
    """

    def __init__(self, task: Any, rate: float, in_flight: int, prefix: str, result_timeout: float = 60.0) -> None:
        self.task = task
        self.rate = rate
        self.prefix = prefix
        self.result_timeout = result_timeout
        self.runs: dict[str, RunRecord] = {}
        self.arrivals: list[float] = []
        """Result arrival times (``time.monotonic``), in order."""
        self._slots = asyncio.Semaphore(in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting = True
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._schedule(), name=f"driver-{self.prefix}")

    async def _schedule(self) -> None:
        from sdk import EmptyModel

        t0 = time.monotonic()
        i = 0
        while self._starting:
            due = t0 + i / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the schedule, not waiting for a condition
            await self._slots.acquire()
            if not self._starting:
                self._slots.release()
                return
            rec = RunRecord(f"{self.prefix}-{i:06d}", time.monotonic())
            self.runs[rec.run_id] = rec
            t = asyncio.create_task(self._one(rec, EmptyModel()), name=rec.run_id)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
            i += 1

    async def _one(self, rec: RunRecord, payload: Any) -> None:
        try:
            while True:
                try:
                    rec.result = await self.task.aio_run(payload, run_id=rec.run_id, timeout=self.result_timeout)
                    rec.arrived = time.monotonic()
                    self.arrivals.append(rec.arrived)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # kept for the report; the same start is retried
                    rec.retries += 1
                    rec.errors.append(f"{type(e).__name__}: {e}"[:200])
                    await asyncio.sleep(min(0.1 * rec.retries, 1.0))  # back off between retries
        finally:
            self._slots.release()

    def completions_between(self, a: float, b: float) -> int:
        """Results that arrived in ``(a, b]`` (``time.monotonic``)."""
        return bisect.bisect_right(self.arrivals, b) - bisect.bisect_right(self.arrivals, a)

    async def stop(self, drain_timeout: float) -> int:
        """Stop starting runs; wait up to ``drain_timeout`` for those in flight. Returns how many never finished."""
        self._starting = False
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=drain_timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)


def rate_back_at(arrivals: list[float], t_kill: float, need: int, window: float) -> float | None:
    """The first arrival ``a`` after the kill with ``need`` arrivals in ``(a - window, a]``, all after the kill."""
    start = bisect.bisect_right(arrivals, t_kill)
    j = start
    for i in range(start, len(arrivals)):
        a = arrivals[i]
        while arrivals[j] <= a - window:
            j += 1
        if a - window >= t_kill and i - j + 1 >= need:
            return a
    return None


def needed(pre_rate: float, window: float, fraction: float = 0.5) -> int:
    """How many arrivals in ``window`` make ``fraction`` of ``pre_rate``."""
    return max(1, math.ceil(fraction * pre_rate * window))


def stored_at(stamp: str) -> float:
    """A ``Nats-Time-Stamp`` (RFC 3339, nanoseconds) as a Unix time."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    whole = datetime.fromisoformat(head + "+00:00").timestamp()
    return whole + (float("0." + frac) if frac else 0.0)


async def first_completion_after(client: Any, driver: Driver, t_kill: float, kill_wall: float,
                                 limit: int = 2000) -> dict[str, Any] | None:
    """The first run whose result arrived after the kill and whose completion was appended after it.

    Results that arrive just after the kill may have been appended just before it; the
    history's stored time (the server's, on this machine's clock) tells them apart.
    """
    after = sorted((r for r in driver.runs.values() if r.arrived is not None and r.arrived > t_kill),
                   key=lambda r: r.arrived or 0.0)
    skipped = 0
    for rec in after[:limit]:
        hist = await client.runs.aio_history(rec.run_id)
        done = [t for e, t in zip(hist.entries, hist.times, strict=True) if e.k == "run_completed"]
        if done and done[0] and stored_at(done[0]) > kill_wall:
            assert rec.arrived is not None
            return {"run_id": rec.run_id, "s": round(rec.arrived - t_kill, 3),
                    "appended_after_kill_s": round(stored_at(done[0]) - kill_wall, 3),
                    "results_before_it_appended_before_kill": skipped}
        skipped += 1
    return None


TERMINAL_KINDS = ("run_completed", "run_failed", "run_cancelled")


def judge(rec: RunRecord, kinds: list[str], memo_pos: list[int], result: Any) -> str | None:
    """What is wrong with a run, from the driver's record and its history; ``None`` if nothing."""
    terminals = [k for k in kinds if k in TERMINAL_KINDS]
    if not kinds:
        return "lost: no history at all"
    if not terminals:
        return "lost: no terminal entry"
    if kinds.count("run_started") > 1 or len(terminals) > 1:
        return "doubled: more than one start or end"
    dup = [p for p, n in Counter(memo_pos).items() if n > 1]
    if dup:
        return f"doubled: memo at position(s) {dup} recorded twice"
    if terminals[0] != "run_completed" or result != EXPECTED:
        return f"wrong end: {terminals[0]} with {result!r}"
    return None


async def check_runs(client: Any, runs: list[RunRecord], concurrency: int = 32) -> dict[str, Any]:
    """Every run the driver started: read its history; lost, doubled or wrong runs are findings."""
    sem = asyncio.Semaphore(concurrency)
    findings: list[dict[str, Any]] = []
    missed = 0

    async def one(rec: RunRecord) -> None:
        nonlocal missed
        async with sem:
            try:
                hist = await client.runs.aio_history(rec.run_id)
                entries = hist.entries
            except Exception as e:  # a run with no history at all is reported, not raised
                if type(e).__name__ != "RunNotFoundError":
                    raise
                entries = []
        kinds = [e.k for e in entries]
        memo = [int(e.pos) for e in entries if e.k == "memo"]
        ended = next((e for e in entries if e.k in TERMINAL_KINDS), None)
        result = rec.result if rec.arrived is not None else getattr(ended, "result", None)
        if rec.arrived is None and ended is not None:
            missed += 1  # the history has the end the driver never heard of
        problem = judge(rec, kinds, memo, result)
        if problem:
            findings.append({"run_id": rec.run_id, "problem": problem, "history": kinds,
                             "driver_got_result": rec.arrived is not None, "driver_errors": rec.errors[-3:]})

    await asyncio.gather(*(one(r) for r in runs))
    return {"checked": len(runs), "ended_but_result_not_heard": missed, "findings": findings}
