"""Memory per waiting run: worker and nats-server RSS growth per run parked on an event that never comes.

    python -m benchmarks.memory_waiting --runs 5000 --json memory_waiting.json

Starts its own nats-server and one worker process (``bide worker benchmarks.scale_apps:worker``,
which also owns the event router). First parks ``--warmup`` runs and reads both processes'
RSS (``VmRSS`` in ``/proc/PID/status``): the baseline. Then starts N ``BenchParked`` runs in
``--steps`` equal batches; each waits for ``bench:never`` with ``input.n == <n>`` (an indexable
expression, so the router keeps one index entry per run) and is evicted. After each batch the
driver polls until every run is parked (the task's activations all delivered and acked, the
router holding every registration with nothing left to read) and both RSS readings are steady,
then reads RSS, the server's live Go heap after a forced collection (``HeapAlloc`` from its
profiling port: RSS also holds garbage the Go runtime has not collected or returned yet) and
the JetStream streams' stored bytes. After ``--idle`` seconds of waiting (the write caches of
the streams' last blocks expire), RSS and heap again, then RSS once more after that heap read's
collections: Go collects by itself at least every two minutes, and RSS before a collection
still holds the expired caches.

Reported: KiB per waiting run for the worker (the router's index is part of it) and for the
server, over all N runs and after the first batch (the marginal cost: the first burst of
turns grows the allocators' arenas once, and Python keeps them), plus stored bytes per run.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from actors.engine.wire import Subjects
from actors.store.jetstream import api_request
from benchmarks.common import Stack, machine, poll_until, rss_kib, stack, write_json
from benchmarks.event_latency import Probe, gather_limited

TASK = "BenchParked"
START_CONCURRENCY = 200


async def parked(nc: Any, probe: Probe, total: int) -> bool:
    """Every started run is parked: its activation acked, its registration held by an idle router."""
    s = Subjects()
    info = await api_request(nc, f"$JS.API.CONSUMER.INFO.{s.queue_stream}.{s.consumer_name(TASK)}", {})
    if int(info.get("num_pending", 1)) or int(info.get("num_ack_pending", 1)):
        return False
    return await probe.registrations() >= total and await probe.router_idle()


def all_parked(nc: Any, probe: Probe, total: int) -> Callable[[], Awaitable[bool]]:
    """A condition for :func:`poll_until`: ``total`` runs parked."""
    return lambda: parked(nc, probe, total)


async def steady_rss(st: Stack, timeout: float = 30.0, tolerance_kib: int = 256) -> dict[str, int]:
    """Both processes' RSS once two readings half a second apart differ by at most ``tolerance_kib``.

    Work finishing after the last ack (purges, a GC pass, the router's checkpoint) can still move
    RSS for a moment; the last reading is returned if it never settles within ``timeout``.
    """
    last = {"worker": rss_kib(st.worker.proc.pid), "server": rss_kib(st.server_pid)}

    async def settled() -> bool:
        nonlocal last
        now = {"worker": rss_kib(st.worker.proc.pid), "server": rss_kib(st.server_pid)}
        ok = all(abs(now[k] - last[k]) <= tolerance_kib for k in now)
        last = now
        return ok

    try:
        await poll_until(settled, "RSS to settle", timeout, st.worker, interval=0.5)
    except TimeoutError:
        print(f"  note: RSS still moving after {timeout:.0f} s; using the last reading", flush=True)
    return {**last, "server_heap": await asyncio.to_thread(st.server_heap_kib)}


async def stored_bytes(nc: Any) -> int:
    """Bytes JetStream stores in Bide's history, queue, work and events streams."""
    s = Subjects()
    total = 0
    for stream in (s.history_stream, s.queue_stream, s.work_stream, s.events_stream):
        info = await api_request(nc, f"$JS.API.STREAM.INFO.{stream}", {})
        total += int(info.get("state", {}).get("bytes", 0))
    return total


async def park(task: Any, ns: range) -> float:
    """Start one run per ``n`` (200 starts in flight); seconds it took."""
    t0 = time.perf_counter()
    await gather_limited([task.aio_run_no_wait({"n": n}) for n in ns], START_CONCURRENCY)
    return time.perf_counter() - t0


async def measure(st: Stack, runs: int, steps: int, warmup: int, idle_s: float) -> dict[str, Any]:
    """Baseline after the warm-up runs park, then a reading after each batch of parked runs."""
    import nats

    from benchmarks.scale_apps import bench_parked, bide

    nc = await nats.connect(st.server.url)
    probe = Probe(nc)
    points: list[dict[str, Any]] = []
    timeout = 120 + runs * 0.05
    try:
        await park(bench_parked, range(10**9, 10**9 + warmup))
        await poll_until(all_parked(nc, probe, warmup), "the warm-up runs to park", timeout, st.worker)
        points.append({"parked": 0, **await steady_rss(st), "stored_bytes": await stored_bytes(nc)})
        edges = [round(runs * (i + 1) / steps) for i in range(steps)]
        done = 0
        for edge in edges:
            start_s = await park(bench_parked, range(done, edge))
            park_s = await poll_until(all_parked(nc, probe, warmup + edge), "the runs to park", timeout, st.worker)
            done = edge
            point = {"parked": done, **await steady_rss(st), "stored_bytes": await stored_bytes(nc),
                     "start_s": round(start_s, 2), "then_parked_s": round(park_s, 2)}
            points.append(point)
            print(f"  {done:,} parked: worker {point['worker'] / 1024:.1f} MiB, server {point['server'] / 1024:.1f} "
                  f"MiB (live heap {point['server_heap'] / 1024:.1f} MiB), "
                  f"stored {point['stored_bytes'] / 2**20:.1f} MiB", flush=True)
        # The runs wait on: what the server still holds once its write caches of the streams'
        # last blocks have expired (nothing is written to those streams meanwhile).
        await asyncio.sleep(idle_s)
        idle = await steady_rss(st)
        # The heap reading above collected: what the server keeps once its runtime has collected
        # (Go does so at least every two minutes by itself) and returned the freed pages.
        collected = await steady_rss(st)
        print(f"  {idle_s:.0f} s later: server {idle['server'] / 1024:.1f} MiB (live heap "
              f"{idle['server_heap'] / 1024:.1f} MiB), {collected['server'] / 1024:.1f} MiB once collected",
              flush=True)
    finally:
        await nc.close()
        await bide.aclose()
    base, n = points[0], points[-1]["parked"] - points[0]["parked"]
    return {"points": points, **per_run(points), "idle_s": idle_s, "idle": idle,
            "server_heap_kib_per_run_idle": round((idle["server_heap"] - base["server_heap"]) / n, 2),
            "server_kib_per_run_idle": round((idle["server"] - base["server"]) / n, 2),
            "server_kib_per_run_idle_collected": round((collected["server"] - base["server"]) / n, 2)}


def per_run(points: list[dict[str, Any]]) -> dict[str, Any]:
    """KiB per parked run: over all runs, and after the first batch (its one-off growth left out)."""
    base, first, last = points[0], points[1], points[-1]
    n, m = last["parked"] - base["parked"], last["parked"] - first["parked"]
    out = {
        "worker_kib_per_run": round((last["worker"] - base["worker"]) / n, 2),
        "server_kib_per_run": round((last["server"] - base["server"]) / n, 2),
        "server_heap_kib_per_run": round((last["server_heap"] - base["server_heap"]) / n, 2),
        "stored_bytes_per_run": round((last["stored_bytes"] - base["stored_bytes"]) / n, 1),
    }
    if m:
        out["worker_kib_per_run_after_first_batch"] = round((last["worker"] - first["worker"]) / m, 2)
        out["server_kib_per_run_after_first_batch"] = round((last["server"] - first["server"]) / m, 2)
        out["server_heap_kib_per_run_after_first_batch"] = round(
            (last["server_heap"] - first["server_heap"]) / m, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5000, help="runs left waiting (N)")
    ap.add_argument("--steps", type=int, default=4, help="batches N is started in (a reading after each)")
    ap.add_argument("--warmup", type=int, default=200, help="runs parked before the baseline reading")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--idle", type=float, default=30.0,
                    help="seconds the runs then wait before the last reading (the server's write caches expire)")
    args = ap.parse_args()
    if args.runs < args.steps or args.steps < 1:
        ap.error("--runs must be at least --steps, and --steps at least 1")

    info = machine()
    with stack("--durable-slots", "2000", profile=True) as st:
        out = asyncio.run(measure(st, args.runs, args.steps, args.warmup, args.idle))
        described = st.describe()
        print(st.server.durability_line())
    after = (f" (after the first batch: worker {out['worker_kib_per_run_after_first_batch']:.2f}, "
             f"server {out['server_kib_per_run_after_first_batch']:.2f})" if args.steps > 1 else "")
    print(f"{args.runs:,} runs waiting: worker +{out['worker_kib_per_run']:.2f} KiB/run, nats-server "
          f"+{out['server_kib_per_run']:.2f} KiB/run{after}; the server's live heap "
          f"+{out['server_heap_kib_per_run']:.2f} KiB/run ({out['server_heap_kib_per_run_idle']:.2f} after "
          f"{args.idle:.0f} s of waiting; RSS {out['server_kib_per_run_idle']:.2f}, "
          f"{out['server_kib_per_run_idle_collected']:.2f} once collected); JetStream stores "
          f"{out['stored_bytes_per_run']:,.0f} bytes/run")
    write_json(args.json, {"benchmark": "memory_waiting", "machine": info, **described, "runs": args.runs,
                           "warmup": args.warmup, **out})


if __name__ == "__main__":
    main()
