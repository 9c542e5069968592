"""Keyed events matched by the router vs direct delivery, 500 waiting runs released together.

    python -m benchmarks.router_burst --waiting 500 --in-flight 16 --rounds 2 --hosts 1 --json burst.json

Starts its own nats-server and ``--hosts`` worker processes (each a candidate for every router
partition; ``BIDE_ROUTER_PARTITIONS``, default 4). Each round, for each mode in turn:

* ``direct``: ``--waiting`` runs wait for ``burst:direct``; then ``event.send`` to each run;
* ``keyed``: ``--waiting`` runs wait for ``burst:keyed`` with ``input.id == <id>``; then one
  ``event.push`` per run, which the router matches (all on one key: one partition does it);

sends are issued with ``--in-flight`` outstanding. Reported per mode: runs resumed per second
(``--waiting`` / last ``wait_resolved`` minus the first send) and each run's send → resumed
delay (its ``wait_resolved.at`` minus its own send time), p50 / p99. Target: keyed ≥ direct
in the same round, keyed p50 ≤ 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from actors.store.server import EmbeddedServer, server_version
from benchmarks.event_latency import Probe, WorkerProc, all_waiting, cleaned_up, gather_limited, summary_ms

TARGET = "benchmarks.router_burst_apps:worker"


async def one_mode(bide: Any, task: Any, mode: str, base: int, args: argparse.Namespace, probe: Probe,
                   workers: list[WorkerProc]) -> dict[str, Any]:
    ids = list(range(base, base + args.waiting))
    refs = await gather_limited([task.aio_run_no_wait({"mode": mode, "id": i}) for i in ids], 200)
    await all_waiting(bide, [r.workflow_run_id for r in refs], probe, workers[0], timeout=120 + len(ids) * 0.1)
    results = [asyncio.create_task(r.aio_result(timeout=300)) for r in refs]
    await asyncio.sleep(1.0)
    sent: dict[int, float] = {}

    async def send(i: int, ref: Any) -> None:
        sent[i] = time.time()
        if mode == "direct":
            await bide.event.aio_send(ref.workflow_run_id, "burst:direct", {"id": i})
        else:
            await bide.event.aio_push("burst:keyed", {"id": i})

    t0 = time.time()
    await gather_limited([send(i, r) for i, r in zip(ids, refs, strict=True)], args.in_flight)
    t_sent = time.time()
    got = await asyncio.gather(*results)
    assert sorted(g["id"] for g in got) == ids
    hists = await gather_limited([bide.runs.aio_history(r.workflow_run_id) for r in refs], 64)
    resumed: dict[int, float] = {}
    for i, h in zip(ids, hists, strict=True):
        resumed[i] = next(e.at for e in h.entries if e.k == "wait_resolved").timestamp()
    last = max(resumed.values())
    await cleaned_up(probe, workers[0], timeout=120)
    return {
        "mode": mode, "runs": len(ids), "send_s": round(t_sent - t0, 3),
        "resumed_per_s": round(len(ids) / (last - t0), 1),
        "send_to_resumed": summary_ms([resumed[i] - sent[i] for i in ids]),
        "send_to_resumed_ms": [round((resumed[i] - sent[i]) * 1000, 2) for i in ids],
    }


async def drive(args: argparse.Namespace, workers: list[WorkerProc]) -> list[dict[str, Any]]:
    import nats

    from benchmarks.router_burst_apps import bide, burst_wait

    nc = await nats.connect(os.environ["BIDE_NATS_URL"])
    probe = Probe(nc)
    out = []
    try:
        # Warm-up: one small round of each, not reported.
        warm = argparse.Namespace(**{**vars(args), "waiting": 20})
        for mode in ("direct", "keyed"):
            await one_mode(bide, burst_wait, mode, 10_000_000, warm, probe, workers)
        base = 0
        for r in range(args.rounds):
            for mode in ("direct", "keyed"):
                res = await one_mode(bide, burst_wait, mode, base, args, probe, workers)
                base += args.waiting
                res["round"] = r
                out.append(res)
                lat = res["send_to_resumed"]
                print(f"round {r} {mode:<6}: {res['resumed_per_s']:>7,.0f} resumed/s  send→resumed p50 "
                      f"{lat['p50_ms']:.0f} ms p99 {lat['p99_ms']:.0f} ms  (sends took {res['send_s']:.2f} s)",
                      flush=True)
    finally:
        await nc.close()
        await bide.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waiting", type=int, default=500)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hosts", type=int, default=1, help="worker processes (each routes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    partitions = int(os.environ.get("BIDE_ROUTER_PARTITIONS") or 4)
    server = EmbeddedServer().start()
    workers: list[WorkerProc] = []
    try:
        os.environ["BIDE_NATS_URL"] = server.url
        for _ in range(args.hosts):
            workers.append(WorkerProc(server.url, TARGET))
        for w in workers:
            w.wait_ready()
        print(f"{server.durability_line()}; replicas 1; {args.hosts} host process(es); {partitions} router "
              f"partitions; {args.waiting} runs per burst; {args.in_flight} sends in flight; {os.cpu_count()} cpus",
              flush=True)
        rounds = asyncio.run(drive(args, workers))
        version = ".".join(map(str, server_version(server.binary)))
    finally:
        for w in workers:
            w.stop()
        server.stop()
    out = {"server": server.durability(), "nats_server": version, "replicas": 1, "hosts": args.hosts,
           "partitions": partitions, "waiting": args.waiting, "in_flight": args.in_flight,
           "python": platform.python_version(), "cpus": os.cpu_count(), "rounds": rounds}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
