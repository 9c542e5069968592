"""Listing runs from the runs index (``bide.runs.list``) with many runs indexed.

    python -m benchmarks.runs_list --runs 100000 --json runs_list.json

Writes ``--runs`` index records the way the starter and the hosts do (the same subjects,
records and headers: a ``live`` record per run, then for the runs that ended an ``ended``
record and the expiring marker on the ``live`` subject), published directly rather than by
running that many runs: the listing reads only the index (and the histories of the live runs
on a page, which do not exist here, so those read as running). Then times ``bide.runs.aio_list``
(limit 50) for several filters and prints p50 and max per query. The target is under one
second per query at 100,000 runs.

Mix: 50 tasks, one common (40% of runs), one rare (0.1%); 90% of runs ended (80% completed,
8% failed, 2% cancelled), 10% live; every run has ``tenant`` metadata (one of 20), 1% have
``vip=yes``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from datetime import timedelta
from typing import Any

from actors.engine.wire import ErrorInfo, RunCancelled, RunCompleted, RunFailed, RunStarted, Terminal, utcnow
from actors.store.runs_index import ENDED, HDR_EXPECTED_SEQ, HDR_EXPECTED_SEQ_SUBJECT, LIVE, record
from actors.store.server import EmbeddedServer
from sdk import Bide

TASKS = 50


def _task(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.40:
        return "common"
    if r < 0.401:
        return "rare"
    return f"task{rng.randrange(TASKS - 2)}"


def _end(rng: random.Random, started: RunStarted) -> Terminal | None:
    r = rng.random()
    at = started.at + timedelta(seconds=rng.random())
    if r < 0.80:
        return RunCompleted(result=None, at=at)
    if r < 0.88:
        return RunFailed(error=ErrorInfo(type="Boom", message="boom"), at=at)
    if r < 0.90:
        return RunCancelled(reason="stop", at=at)
    return None


async def _write(bide: Bide, runs: int, seed: int) -> dict[str, int]:
    conn = await bide._pool.get()
    nc, s = conn.nc, conn.layout.subjects
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    for i in range(runs):
        md = {"tenant": f"t{rng.randrange(20)}", **({"vip": "yes"} if rng.random() < 0.01 else {})}
        started = RunStarted(run_id=f"{i:08d}{rng.getrandbits(64):016x}", task=_task(rng), durable=False,
                             at=utcnow(), additional_metadata=md)
        await nc.publish(s.run_record(LIVE, started.task, started.run_id), record(started), headers={
            HDR_EXPECTED_SEQ: "0", HDR_EXPECTED_SEQ_SUBJECT: s.run_records(started.task, started.run_id)})
        end = _end(rng, started)
        key = f"{started.task}:{'live' if end is None else end.k}"
        counts[key] = counts.get(key, 0) + 1
        if end is not None:
            await nc.publish(s.run_record(ENDED, started.task, started.run_id), record(started, end))
            await nc.publish(s.run_record(LIVE, started.task, started.run_id), b"", headers={"Nats-TTL": "1s"})
        if i % 5000 == 4999:
            await nc.flush()
    await nc.flush()
    return counts


QUERIES: list[tuple[str, dict[str, Any]]] = [
    ("all, newest 50", {}),
    ("completed, common task", {"status": "completed", "task": "common"}),
    ("completed, rare task", {"status": "completed", "task": "rare"}),
    ("failed, any task", {"status": "failed"}),
    ("cancelled, rare task", {"status": "cancelled", "task": "rare"}),
    ("running, rare task", {"status": "running", "task": "rare"}),
    ("running, common task", {"status": "running", "task": "common"}),
    ("live (running), any task", {"status": "running"}),
    ("completed, common task, since 10m", {"status": "completed", "task": "common", "since": "10m"}),
    ("metadata vip=yes, any (client-side filter)", {"metadata": {"vip": "yes"}}),
]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"runs": args.runs, "limit": args.limit, "repeat": args.repeat, "queries": {}}
    with EmbeddedServer() as srv:
        print(srv.durability_line())
        results["server"] = srv.durability()
        bide = Bide(srv.url)
        try:
            t0 = time.perf_counter()
            counts = await _write(bide, args.runs, args.seed)
            results["write_s"] = round(time.perf_counter() - t0, 2)
            results["mix"] = {k: counts[k] for k in sorted(counts) if k.startswith(("common", "rare"))}
            print(f"wrote {args.runs:,} index records in {results['write_s']}s; rare task: "
                  + ", ".join(f"{k.split(':')[1]} {v}" for k, v in sorted(counts.items()) if k.startswith("rare:")))
            await asyncio.sleep(1.5)  # the ended runs' markers expire (Nats-TTL 1s)
            for name, filters in QUERIES:
                times: list[float] = []
                found = 0
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    page = await bide.runs.aio_list(limit=args.limit, **filters)
                    times.append(time.perf_counter() - t)
                    found = len(page.runs)
                p50, worst = statistics.median(times) * 1000, max(times) * 1000
                results["queries"][name] = {"filters": filters, "returned": found, "p50_ms": round(p50, 1),
                                            "max_ms": round(worst, 1)}
                print(f"{name:45s} returned {found:4d}  p50 {p50:8.1f} ms  max {worst:8.1f} ms")
            # Paging through every completed run of the common task, 1000 a page.
            t = time.perf_counter()
            cursor, total, pages = None, 0, 0
            while True:
                page = await bide.runs.aio_list(status="completed", task="common", limit=1000, cursor=cursor)
                total, pages, cursor = total + len(page.runs), pages + 1, page.cursor
                if cursor is None:
                    break
            took = time.perf_counter() - t
            results["page_through_common_completed"] = {"runs": total, "pages": pages, "s": round(took, 2)}
            print(f"paging through {total:,} completed runs of the common task: {pages} pages in {took:.2f}s")
        finally:
            await bide.aclose()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args()
    results = asyncio.run(run(args))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
