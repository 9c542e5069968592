"""Events pushed over HTTP: what ``bide serve`` spends per ``POST /api/v1/events``.

    python -m benchmarks.http_events --events 6000 --json http_events.json

Starts its own nats-server, one worker (so the streams exist; ``examples.durable.worker``) and
``bide serve --no-auth`` on a free loopback port, then pushes ``--events`` events (each
``{"key": "bench:http", "payload": {"i": N}}``) from this process with ``--in-flight`` requests
at once (httpx, one connection per request in flight), after 500 to warm up. It prints and
records events/s and the CPU the serve process spent per event (user and system time from
/proc). The driver is Python too and shares the machine's cores, so events/s is mostly the
driver's limit; the serve process's CPU per event is the number that says what it costs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from actors.store.server import EmbeddedServer, free_port
from benchmarks.common import cpu_seconds, machine, write_json
from benchmarks.event_latency import WorkerProc

REPO = Path(__file__).resolve().parent.parent


def start_serve(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    """``bide serve --no-auth`` on ``port``, once it serves; its later output is drained (a full pipe blocks it)."""
    proc = subprocess.Popen([sys.executable, "-m", "actors.apps.cli", "serve", "--host", "127.0.0.1", "--port",
                             str(port), "--no-auth"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("serving HTTP"):
            threading.Thread(target=collections.deque, args=(proc.stdout, 0), daemon=True).start()
            return proc
    raise RuntimeError("bide serve did not start:\n" + "".join(seen[-20:]))


async def push(url: str, events: int, in_flight: int, serve_pid: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        gate = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with gate:
                resp = await http.post("/api/v1/events", json={"key": "bench:http", "payload": {"i": i}})
                if resp.status_code != 202:
                    raise RuntimeError(f"push {i}: HTTP {resp.status_code}: {resp.text}")

        await asyncio.gather(*(one(i) for i in range(500)))
        cpu0, t0 = cpu_seconds(serve_pid), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(events)))
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(serve_pid) - cpu0
    return {"events": events, "in_flight": in_flight, "events_per_s": round(events / wall, 1),
            "serve_cpu_us_per_event": round(cpu / events * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.events < 1 or args.in_flight < 1:
        parser.error(f"--events and --in-flight must be at least 1, got {args.events} and {args.in_flight}")
    server = EmbeddedServer().start()
    port = free_port()
    env = {**os.environ, "BIDE_NATS_URL": server.url, "PYTHONPATH": str(REPO)}
    worker: WorkerProc | None = None
    serve: subprocess.Popen[str] | None = None
    try:
        worker = WorkerProc(server.url, "examples.durable.worker")  # a host's start creates the streams
        worker.wait_ready()
        serve = start_serve(env, port)
        result = asyncio.run(push(f"http://127.0.0.1:{port}", args.events, args.in_flight, serve.pid))
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(timeout=30)
        if worker is not None:
            worker.stop()
        server.stop()
    print(f"{result['events']:,} events pushed over HTTP, {result['in_flight']} in flight: "
          f"{result['events_per_s']:,.0f} events/s; bide serve spent {result['serve_cpu_us_per_event']:,.0f} µs "
          "of CPU per event")
    try:
        import httptools  # noqa: F401  (uvicorn parses HTTP with it when it is installed, else with h11)
        parser_name = "httptools"
    except ImportError:
        parser_name = "h11"
    print(f"uvicorn's HTTP parser: {parser_name}")
    write_json(args.json, {"benchmark": "http_events", "machine": machine(), "http_parser": parser_name, **result})


if __name__ == "__main__":
    main()
