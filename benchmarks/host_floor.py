"""How much of a host's CPU per trivial run is the engine, and how much the writes every run needs.

    python -m benchmarks.host_floor --runs 20000 --rounds 2 --json host_floor.json

Starts its own nats-server and, in alternating rounds, two hosts for the trivial durable task of
``python -m benchmarks.throughput`` (``BenchTrivial``, one memo):

- ``bide``: the real worker (``bide worker benchmarks.apps:worker``);
- ``floor``: a process that takes the same activations from the same consumer and makes the
  same writes through the same store layer, with nothing else: the run's history in one append
  (its start, the activation, the memo, the end; the starter is notified with the same bytes),
  the runs index's end records, the ack. No engine: no turn, no replay, no user code, no
  retries, no heartbeats, no tidy-ups, no removal schedule. It is **not** durable in Bide's
  sense and is only a yardstick: the CPU per run any host in Python on nats-py needs at least.

This process drives both with the SDK (``aio_run``, ``--concurrency`` in flight) and prints the
runs/s and the CPU per run of the host, the server and the driver for each round. The host's
figure for ``bide`` less the ``floor``'s is what the engine costs per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from actors.store.server import EmbeddedServer
from benchmarks.common import cpu_seconds

REPO = Path(__file__).resolve().parent.parent
TASK = "BenchTrivial"


async def floor_host(url: str) -> None:
    """The floor: BenchTrivial's activations, each answered with a run's writes and nothing else."""
    import nats

    from actors.engine.wire import (
        ActivationBegun,
        MemoRecorded,
        RunCompleted,
        Subjects,
        args_hash,
        decode_activation,
        utcnow,
    )
    from actors.store.history import HistoryLog
    from actors.store.requests import Publisher
    from actors.store.runs_index import publish_end

    nc = await nats.connect(url)
    subjects = Subjects()
    pub = await Publisher(nc).start()
    history = HistoryLog(nc, pub, subjects)
    sub = await nc.jetstream().pull_subscribe_bind(durable=subjects.consumer_name(TASK),
                                                   stream=subjects.queue_stream)
    handling: set[asyncio.Task[None]] = set()

    async def handle(msg: Any) -> None:
        act = decode_activation(msg.data)
        started = act.started
        assert started is not None, "the floor takes fresh starts only"
        end = RunCompleted(result={"value": 2}, at=utcnow())
        entries = [started, ActivationBegun(host="floor", delivery=1, at=utcnow()),
                   MemoRecorded(pos=0, name="_step", args_hash=args_hash([1], {}), result=2), end]
        await history.append(act.run_id, entries, expected_seq=0, notify=started.meta.get("notify"))
        await publish_end(pub, subjects, started, end)
        await msg.ack()

    while True:
        try:
            msgs = await sub.fetch(500, timeout=1)
        except (nats.errors.TimeoutError, TimeoutError):
            continue
        for m in msgs:
            task = asyncio.ensure_future(handle(m))
            handling.add(task)
            task.add_done_callback(handling.discard)


def start_host(kind: str, url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BIDE_NATS_URL": url, "PYTHONPATH": str(REPO)}
    cmd = ([sys.executable, "-m", "actors.apps.cli", "worker", "benchmarks.apps:worker"] if kind == "bide"
           else [sys.executable, "-m", "benchmarks.host_floor", "--serve", url])
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_host(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def host_ready(url: str, timeout: float = 30.0) -> None:
    """Once a host pulls from BenchTrivial's consumer (the real worker makes the streams first)."""
    import nats

    from actors.engine.wire import Subjects

    s = Subjects()
    nc = await nats.connect(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = await nc.jetstream().consumer_info(s.queue_stream, s.consumer_name(TASK))
                if info.num_waiting:
                    return
            except Exception:  # not made yet
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"no host pulled from {s.consumer_name(TASK)} within {timeout}s")
    finally:
        await nc.close()


def measure(url: str, server_pid: int, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.throughput import drive

    host = start_host(kind, url)
    try:
        asyncio.run(host_ready(url))
        asyncio.run(drive(args.warmup, args.concurrency, progress=False))
        before = (cpu_seconds(host.pid), cpu_seconds(server_pid), time.process_time())
        lat, wall, errors = asyncio.run(drive(args.runs, args.concurrency, progress=False))
        after = (cpu_seconds(host.pid), cpu_seconds(server_pid), time.process_time())
    finally:
        stop_host(host)
    host_us, server_us, driver_us = (round((b - a) / args.runs * 1e6, 1) for a, b in zip(before, after, strict=True))
    return {"host": kind, "runs_per_s": round(len(lat) / wall, 1), "errors": errors,
            "cpu_us_per_run": {"host": host_us, "server": server_us, "driver": driver_us,
                               "total": round(host_us + server_us + driver_us, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2, help="pairs of rounds, bide then floor")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)  # the floor host itself
    args = ap.parse_args()
    if args.serve:
        from actors.hosting.event_loop import run

        run(floor_host(args.serve))
        return
    for name in ("runs", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    rounds: list[dict[str, Any]] = []
    with EmbeddedServer() as server:
        assert server.proc is not None
        durability = server.durability_line()
        os.environ["BIDE_NATS_URL"] = server.url  # the driver's client (benchmarks.apps) reads it
        # The real worker first: it makes the streams and the consumer the floor binds to.
        for _ in range(args.rounds):
            for kind in ("bide", "floor"):
                r = measure(server.url, server.proc.pid, kind, args)
                rounds.append(r)
                cpu = r["cpu_us_per_run"]
                print(f"{kind:>5}: {r['runs_per_s']:>7,.0f} runs/s, errors {r['errors']}; CPU per run: host "
                      f"{cpu['host']:,.0f} us, server {cpu['server']:,.0f} us, driver {cpu['driver']:,.0f} us, "
                      f"total {cpu['total']:,.0f} us", flush=True)
    print(durability)

    def rate(kind: str) -> float:
        return statistics.median(r["runs_per_s"] for r in rounds if r["host"] == kind)

    def host_us(kind: str) -> float:
        return statistics.median(r["cpu_us_per_run"]["host"] for r in rounds if r["host"] == kind)

    engine = host_us("bide") - host_us("floor")
    print(f"medians: bide {rate('bide'):,.0f} runs/s with the host at {host_us('bide'):,.0f} us per run; "
          f"floor {rate('floor'):,.0f} runs/s at {host_us('floor'):,.0f} us; "
          f"the engine costs the host about {engine:,.0f} us per run ({args.concurrency} in flight)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "runs": args.runs, "concurrency": args.concurrency, "rounds": rounds,
            "engine_us_per_run": round(engine, 1), "server": server.durability(),
            "python": platform.python_version(), "cpus": os.cpu_count(),
        }, indent=2))


if __name__ == "__main__":
    main()
