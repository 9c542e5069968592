"""Trivial durable runs end to end, next to the raw JetStream publish rate of the same machine.

    python -m benchmarks.throughput --runs 5000 --json throughput.json

Starts its own nats-server and one worker (``bide worker benchmarks.apps:worker``; with
``--worker-processes N``, ``--processes N``: N host processes), measures pipelined JetStream
publishes, then starts N trivial durable runs (one memo each) from this process with up to C in
flight and awaits every result, then measures the publishes again: the ratio of runs/s to raw
publishes/s is taken to the mean of the two, since a shared machine's rate drifts. Each of
those two is the median of ``--raw-samples`` (3) measurements taken back to back. That is done
``--rounds`` times (3), and the round with the median ratio is reported (each round is printed
and written too). ``--sweep 10,50,500`` then
measures ``--sweep-runs`` runs at each of those in-flight counts (throughput vs in-flight).
``--url URL[,URL...] --replicas 3`` measures against servers already running (a cluster from
``actors.store.server.local_cluster``, as ``benchmarks.failover`` does) with streams at that many
replicas, instead of starting a server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import nats
from tqdm import tqdm

from actors.store.server import EmbeddedServer, server_version
from benchmarks.common import child_pids, cpu_seconds, worker_cpu
from benchmarks.event_latency import WorkerProc

REPO = Path(__file__).resolve().parent.parent


async def publish_rate(url: str, messages: int, window: int = 2000, replicas: int = 1) -> float:
    """Raw pipelined JetStream publishes: up to ``window`` unacked, acks counted on one inbox.

    ``url`` may list several servers, comma-separated; the stream has ``replicas`` replicas.
    """
    nc = await nats.connect([u.strip() for u in url.split(",") if u.strip()])
    js = nc.jetstream()
    await js.add_stream(name="BENCH_RAW", subjects=["benchraw.>"], num_replicas=replicas)
    inbox = nc.new_inbox()
    acked = 0
    progress = asyncio.Event()

    async def on_ack(msg: Any) -> None:
        nonlocal acked
        acked += 1
        progress.set()

    await nc.subscribe(inbox + ".*", cb=on_ack)
    payload = b"x" * 64
    t0 = time.perf_counter()
    for i in range(messages):
        while i - acked >= window:
            progress.clear()
            await progress.wait()
        await nc.publish(f"benchraw.{i % 16}", payload, reply=f"{inbox}.{i}")
    while acked < messages:
        progress.clear()
        await progress.wait()
    rate = messages / (time.perf_counter() - t0)
    await js.delete_stream("BENCH_RAW")
    await nc.close()
    return rate


def raw_rate(url: str, args: argparse.Namespace) -> float:
    """The raw publish rate at one point: the median of ``--raw-samples`` measurements.

    One measurement of 20,000 publishes moved by a tenth either way on an idle 2-core machine
    (six in a row: 72,052 to 101,887/s), so each point is the median of a few, taken back to back.
    """
    rates = [asyncio.run(publish_rate(url, args.publish_messages, replicas=args.replicas))
             for _ in range(args.raw_samples)]
    return statistics.median(rates)


def start_worker(url: str, processes: int) -> tuple[WorkerProc, list[int]]:
    """``bide worker benchmarks.apps:worker --processes N``, ready; with the pids of its N processes."""
    worker = WorkerProc(url, "benchmarks.apps:worker", "--processes", str(processes))
    try:
        worker.wait_ready()
        pids = [worker.proc.pid, *child_pids(worker.proc.pid)]
        if len(pids) != processes:
            raise RuntimeError(f"asked for {processes} worker processes, found {len(pids)}: {pids}")
    except BaseException:
        worker.stop()
        raise
    return worker, pids


async def run_many(task: Any, runs: int, concurrency: int, bar: Any) -> tuple[list[float], int]:
    """``runs`` runs of a benchmark task, up to ``concurrency`` in flight: (latencies of the good ones, errors)."""
    from sdk import EmptyModel

    latencies: list[float] = []
    errors = 0
    left = runs

    async def caller() -> None:
        # One of ``concurrency`` callers, each starting a run as soon as its last one ended. Not a
        # task per run made up front: 20,000 pending coroutines made every full collection of
        # this process's garbage collector walk them all (a quarter of its CPU, before).
        nonlocal errors, left
        while left > 0:
            left -= 1
            t = time.perf_counter()
            try:
                result = await task.aio_run(EmptyModel(), timeout=120)
                assert result == {"value": 2}, result
                latencies.append(time.perf_counter() - t)
            except Exception as e:  # counted and reported, never hidden
                errors += 1
                if errors <= 3:
                    print(f"run failed: {type(e).__name__}: {e}", file=sys.stderr)
            bar.update(1)

    await asyncio.gather(*(caller() for _ in range(min(concurrency, runs))))
    return latencies, errors


async def drive(runs: int, concurrency: int, progress: bool) -> tuple[list[float], float, int]:
    from benchmarks.apps import bench_trivial, bide

    with tqdm(total=runs, unit="run", disable=not progress, file=sys.stderr, smoothing=0.1) as bar:
        t0 = time.perf_counter()
        latencies, errors = await run_many(bench_trivial, runs, concurrency, bar)
        wall = time.perf_counter() - t0
    await bide.aclose()
    return latencies, wall, errors


def sweep_point(concurrency: int, runs: int) -> dict[str, Any]:
    """``runs`` trivial runs at ``concurrency`` in flight (same server and worker): runs/s and latency."""
    lat, wall, errors = asyncio.run(drive(runs, concurrency, progress=False))
    return {"concurrency": concurrency, "runs": runs, "errors": errors, "runs_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(pct(lat, 0.50) * 1000, 2), "p99_ms": round(pct(lat, 0.99) * 1000, 2)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure(url: str, args: argparse.Namespace, sweep: list[int], server_pid: int | None = None
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Raw publishes, then ``args.rounds`` times the main run and raw publishes again, then the sweep.

    A shared machine's rates move by a fifth within a minute, the raw rate and the runs' alike,
    so each round's runs/s is taken to the mean of the raw rates measured just before and just
    after it, and the report is the round with the median ratio. Each round also has the CPU
    each process spent per run, in microseconds: the worker (the hosts: with
    ``--worker-processes`` above 1 the sum, and each as ``worker_I``), this driver (starting
    runs and awaiting results) and, when it is known, the server. Returns the rounds and the
    sweep's points.
    """
    os.environ["BIDE_NATS_URL"] = url
    pubs = [raw_rate(url, args)]
    worker, worker_pids = start_worker(url, args.worker_processes)

    def cpu_now() -> dict[str, float]:
        server = {"server": cpu_seconds(server_pid)} if server_pid else {}
        return {**worker_cpu(worker_pids), **server, "driver": time.process_time()}

    rounds: list[dict[str, Any]] = []
    try:
        asyncio.run(drive(args.warmup, args.concurrency, progress=False))
        for _ in range(args.rounds):
            before = cpu_now()
            lat, wall, errors = asyncio.run(drive(args.runs, args.concurrency, not args.no_progress))
            after = cpu_now()
            pubs.append(raw_rate(url, args))
            cpu = {name: round((after[name] - before[name]) / max(1, args.runs) * 1e6, 1) for name in after}
            rate = len(lat) / wall
            pub_pair = (pubs[-2], pubs[-1])
            rounds.append({"latencies": lat, "wall": wall, "errors": errors, "cpu": cpu, "runs_per_s": rate,
                           "publish_before_after": pub_pair, "ratio": rate / statistics.fmean(pub_pair)})
        swept = [sweep_point(c, max(args.sweep_runs, 3 * c)) for c in sweep]
    finally:
        worker.stop()
    return rounds, swept


async def reported_version(url: str) -> str:
    """The version the server answering at ``url`` reports."""
    nc = await nats.connect([u.strip() for u in url.split(",") if u.strip()])
    try:
        return str(nc.connected_server_version)
    finally:
        await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3,
                    help="main runs, each between two raw publish measurements; the median ratio is reported")
    ap.add_argument("--publish-messages", type=int, default=20000)
    ap.add_argument("--raw-samples", type=int, default=3,
                    help="raw publish measurements at each point, before and after each round; the median is taken")
    ap.add_argument("--sweep", default="", help="comma-separated in-flight counts to measure after the main run")
    ap.add_argument("--sweep-runs", type=int, default=1000, help="runs per in-flight count of --sweep")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--url", default=None,
                    help="measure against these running servers (comma-separated URLs) instead of starting one")
    ap.add_argument("--replicas", type=int, default=1, help="stream replicas (BIDE_REPLICAS) with --url")
    ap.add_argument("--worker-processes", type=int, default=1, metavar="N",
                    help="host processes (bide worker --processes N; default 1)")
    args = ap.parse_args()
    if args.worker_processes < 1:
        ap.error(f"--worker-processes must be at least 1, got {args.worker_processes}")
    if args.raw_samples < 1:
        ap.error(f"--raw-samples must be at least 1, got {args.raw_samples}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    sweep = [int(x) for x in args.sweep.split(",") if x]
    if args.replicas != 1 and not args.url:
        ap.error(f"--replicas {args.replicas} needs --url (the server this benchmark starts is a single node)")

    if args.url:
        os.environ["BIDE_REPLICAS"] = str(args.replicas)  # the worker and this driver make the streams with it
        rounds, swept = measure(args.url, args, sweep)
        version = asyncio.run(reported_version(args.url))
        # The servers were started elsewhere: their sync setting is theirs to state.
        durability = {"url": args.url, "replicas": args.replicas, "sync": "as the servers were started"}
        durability_line = f"servers: {args.url}, replicas {args.replicas} (sync as the servers were started)"
    else:
        with EmbeddedServer() as server:
            assert server.proc is not None
            rounds, swept = measure(server.url, args, sweep, server.proc.pid)
            version = ".".join(map(str, server_version(server.binary)))
            durability = server.durability()
            durability_line = server.durability_line()

    median = sorted(rounds, key=lambda r: r["ratio"])[(len(rounds) - 1) // 2]
    lat, wall, errors, cpu, pubs = (median["latencies"], median["wall"], median["errors"], median["cpu"],
                                    median["publish_before_after"])
    rate = len(lat) / wall
    pub = statistics.fmean(pubs)
    out: dict[str, Any] = {
        "runs": args.runs,
        "concurrency": args.concurrency,
        "worker_processes": args.worker_processes,
        "wall_s": round(wall, 3),
        "errors": errors,
        "runs_per_s": round(rate, 1),
        "p50_ms": round(pct(lat, 0.50) * 1000, 2),
        "p99_ms": round(pct(lat, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else None,
        "jetstream_publish_per_s": round(pub, 1),
        "jetstream_publish_per_s_before_after": [round(p, 1) for p in pubs],
        "sweep": swept,
        "latencies_ms": [round(x * 1000, 2) for x in lat],
        "runs_per_publish_ratio": round(median["ratio"], 4),
        "raw_samples_per_point": args.raw_samples,
        "cpu_us_per_run": cpu,
        "rounds": [{"runs_per_s": round(r["runs_per_s"], 1), "errors": r["errors"],
                    "jetstream_publish_per_s_before_after": [round(p, 1) for p in r["publish_before_after"]],
                    "runs_per_publish_ratio": round(r["ratio"], 4), "cpu_us_per_run": r["cpu"]} for r in rounds],
        "nats_server": version,
        "server": durability,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    print(durability_line)
    for i, r in enumerate(rounds, 1):
        print(f"round {i}: {r['runs_per_s']:,.0f} runs/s, raw {r['publish_before_after'][0]:,.0f} before and "
              f"{r['publish_before_after'][1]:,.0f} after, ratio {r['ratio']:.4f}; CPU per run: "
              + ", ".join(f"{name} {us:,.0f} us" for name, us in r["cpu"].items()))
    print(f"the round with the median ratio, of {len(rounds)}:")
    print(f"{len(lat)} trivial durable runs ({args.worker_processes} worker process(es)) in {wall:.2f} s: "
          f"{rate:,.0f} runs/s, p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms, errors {errors}")
    print(f"raw JetStream pipelined publish: {pub:,.0f} msg/s, the mean of {pubs[0]:,.0f} before the runs and "
          f"{pubs[1]:,.0f} after, each the median of {args.raw_samples} (runs/s / publish/s = "
          f"{out['runs_per_publish_ratio']})")
    print("CPU per run: " + ", ".join(f"{name} {us:,.0f} us" for name, us in cpu.items()))
    for p in swept:
        print(f"  {p['concurrency']:>5} in flight: {p['runs_per_s']:>7,.0f} runs/s, p50 {p['p50_ms']} ms, "
              f"p99 {p['p99_ms']} ms ({p['runs']} runs, errors {p['errors']})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
