"""Durable event waits end to end: host memory per waiting run, event → resumed latency, bulk resume rate.

    python -m benchmarks.event_latency --waiting 1000 --samples 200 --json event_latency.json

Starts its own nats-server and one worker process (``bide worker benchmarks.event_apps:worker``,
which also owns the event router). Warms up with a few runs taken to completion, then starts
``--waiting`` runs of ``WaitForMe`` that each wait for ``bench:go`` with ``input.n == <n>``
(evicted while they wait), and reads the worker's RSS before and after. Then, one at a time
for ``--samples`` of them, pushes the matching event and times

* event → resumed: the ``wait_resolved`` history entry's time minus the push time, and
* end to end: the result arriving here minus the push time;

then pushes the events of all the other waiting runs at once and reports how many are resumed
(and finished) per second. Targets: event → resumed p50 ≤ 5 ms, p99 ≤ 25 ms; RSS per evicted
waiting run ≈ 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from actors.engine.wire import Subjects
from actors.store.jetstream import api_request
from actors.store.server import EmbeddedServer, server_version

REPO = Path(__file__).resolve().parent.parent
KEY = "bench:go"
WARMUP_BASE = 1_000_000  # warm-up runs wait for n values the measured runs never use


# -- the worker process ----------------------------------------------------------------------------


class WorkerProc:
    """``bide worker TARGET [ARGS]`` in a child process; its output drained in a thread."""

    def __init__(self, url: str, target: str = "benchmarks.event_apps:worker", *args: str) -> None:
        env = {**os.environ, "BIDE_NATS_URL": url, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors.apps.cli", "worker", target, *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.tail: collections.deque[str] = collections.deque(maxlen=50)
        self._ready = threading.Event()
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        # Always read: a worker that logs into a full pipe would block.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line)
            # The command's own line (with --processes, printed once every process serves), not a
            # child's, which reaches its stderr prefixed with the child's pid.
            if line.startswith("bide worker ") and " ready: " in line:
                self._ready.set()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready (exit {self.proc.poll()}):\n" + "".join(self.tail))

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n" + "".join(self.tail))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain.join(timeout=5)


# -- helpers ---------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "p50_ms": round(pct(values, 0.50) * 1000, 2),
        "p90_ms": round(pct(values, 0.90) * 1000, 2),
        "p99_ms": round(pct(values, 0.99) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2),
        "mean_ms": round(statistics.fmean(values) * 1000, 2),
    }


async def gather_limited(coros: list[Any], limit: int) -> list[Any]:
    """Each of ``coros`` awaited, at most ``limit`` at once; their results in order.

    ``limit`` callers take the next one as each ends: a task per coroutine made up front would
    leave thousands of pending tasks for this process's garbage collector to walk.
    """
    results: list[Any] = [None] * len(coros)
    todo = iter(enumerate(coros))

    async def caller() -> None:
        for i, c in todo:
            results[i] = await c

    try:
        await asyncio.gather(*(caller() for _ in range(min(limit, len(coros)))))
    finally:
        for _, c in todo:  # left unawaited by a failure: closed, not warned about
            c.close()
    return results


class Probe:
    """Reads the events stream and the router's consumer (a plain NATS connection of the driver)."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.s = Subjects()

    async def registrations(self) -> int:
        """Messages on ``bide.waits.>`` still in the stream (satisfied ones are deleted by the router)."""
        info = await api_request(
            self.nc, f"$JS.API.STREAM.INFO.{self.s.events_stream}", {"subjects_filter": self.s.waits_all}
        )
        return int(sum((info.get("state", {}).get("subjects") or {}).values()))

    async def router_idle(self) -> bool:
        """Every router partition has handled everything in the stream."""
        p = 0
        while True:
            try:
                info = await api_request(
                    self.nc, f"$JS.API.CONSUMER.INFO.{self.s.events_stream}.{self.s.router_consumer(p)}", {})
            except Exception:
                return p > 0
            if int(info.get("num_pending", 1)) or int(info.get("num_ack_pending", 1)):
                return False
            p += 1


async def poll(cond: Any, what: str, timeout: float, interval: float = 0.1, worker: WorkerProc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if worker is not None:
            worker.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def all_waiting(bide: Any, run_ids: list[str], probe: Probe, worker: WorkerProc, timeout: float) -> float:
    """Until every run has a ``wait_registered`` entry and the router holds its registration."""
    from sdk import RunStatus
    from sdk.runs import status_of

    t0 = time.perf_counter()
    pending = set(run_ids)
    deadline = time.monotonic() + timeout

    async def check(run_id: str) -> None:
        hist = await bide.runs.aio_history(run_id)  # what runs.aio_get reads, in one read
        if status_of(hist) is RunStatus.WAITING and any(e.k == "wait_registered" for e in hist.entries):
            pending.discard(run_id)

    while pending:
        worker.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(run_ids)} runs not waiting after {timeout:.0f}s")
        await gather_limited([check(r) for r in list(pending)], 64)
        if pending:
            await asyncio.sleep(0.2)
    left = max(1.0, deadline - time.monotonic())

    async def router_has_them() -> bool:
        return await probe.registrations() >= len(run_ids) and await probe.router_idle()

    await poll(router_has_them, "the router to index every registration", left, worker=worker)
    return time.perf_counter() - t0


async def cleaned_up(probe: Probe, worker: WorkerProc, timeout: float = 60.0) -> None:
    """Until the router has processed everything and deleted every registration (of finished runs)."""

    async def clean() -> bool:
        return await probe.router_idle() and await probe.registrations() == 0

    await poll(clean, "the router to delete the registrations of finished runs", timeout, worker=worker)


def resolved_at(hist: Any) -> tuple[datetime | None, datetime | None]:
    """The ``wait_resolved`` entry's time, and the time the event was stored (from the taken signal)."""
    resolved = stored = None
    for e in hist.entries:
        if e.k == "wait_resolved" and resolved is None:
            resolved = e.at
        elif e.k == "signal" and stored is None and e.signal.source == "event":
            stored = e.signal.at
    return resolved, stored


# -- phases ----------------------------------------------------------------------------------------


async def start_runs(task: Any, ns: list[int]) -> dict[int, Any]:
    refs = await gather_limited([task.aio_run_no_wait({"n": n}) for n in ns], 200)
    return dict(zip(ns, refs, strict=True))


async def warm_up(bide: Any, task: Any, probe: Probe, worker: WorkerProc, runs: int) -> None:
    ns = [WARMUP_BASE + i for i in range(runs)]
    refs = await start_runs(task, ns)
    await all_waiting(bide, [r.workflow_run_id for r in refs.values()], probe, worker, timeout=120)
    results = [asyncio.create_task(r.aio_result(timeout=60)) for r in refs.values()]
    await asyncio.sleep(0.2)
    for n in ns:
        await bide.event.aio_push(KEY, {"n": n, "sent_at": time.time()})
    got = await asyncio.gather(*results)
    assert sorted(g["n"] for g in got) == ns
    await cleaned_up(probe, worker)


async def one_sample(bide: Any, n: int, ref: Any) -> dict[str, float]:
    result = asyncio.create_task(ref.aio_result(timeout=60))
    await asyncio.sleep(0.005)  # let the result watch subscribe before the event goes out
    t0 = time.time()
    await bide.event.aio_push(KEY, {"n": n, "sent_at": t0})
    got = await result
    t_result = time.time()
    assert got == {"n": n, "sent_at": t0}, got
    hist = await bide.runs.aio_history(ref.workflow_run_id)
    resolved, stored = resolved_at(hist)
    assert resolved is not None, f"run {ref.workflow_run_id} has no wait_resolved entry"
    out = {"e2e": t_result - t0, "resumed": resolved.timestamp() - t0}
    if stored is not None:
        out["stored"] = stored.timestamp() - t0
    return out


async def bulk(bide: Any, refs: dict[int, Any], probe: Probe, worker: WorkerProc, timeout: float) -> dict[str, Any]:
    if not refs:
        return {}
    results = [asyncio.create_task(r.aio_result(timeout=timeout)) for r in refs.values()]
    await asyncio.sleep(min(5.0, 0.5 + len(refs) / 500))  # every watch subscribed before the first push
    t0 = time.time()
    await bide.event.aio_bulk_push([{"key": KEY, "payload": {"n": n, "sent_at": t0}} for n in refs])
    t_pushed = time.time()
    got = await asyncio.gather(*results)
    t_done = time.time()
    assert sorted(g["n"] for g in got) == sorted(refs), "bulk results do not match"
    hists = await gather_limited([bide.runs.aio_history(r.workflow_run_id) for r in refs.values()], 64)
    resolved = [resolved_at(h)[0] for h in hists]
    assert all(r is not None for r in resolved)
    last_resumed = max(r.timestamp() for r in resolved if r is not None)
    m = len(refs)
    return {
        "events": m,
        "push_s": round(t_pushed - t0, 3),
        "all_resumed_s": round(last_resumed - t0, 3),
        "all_finished_s": round(t_done - t0, 3),
        "resumed_per_s": round(m / (last_resumed - t0), 1),
        "finished_per_s": round(m / (t_done - t0), 1),
        "resumed_latency": summary_ms([r.timestamp() - t0 for r in resolved if r is not None]),
    }


async def drive(args: argparse.Namespace, url: str, worker: WorkerProc) -> dict[str, Any]:
    import nats

    from benchmarks.event_apps import bide, wait_for_me

    nc = await nats.connect(url)
    probe = Probe(nc)
    out: dict[str, Any] = {}
    try:
        print(f"warm-up: {args.warmup} runs to completion", flush=True)
        t = time.perf_counter()
        await warm_up(bide, wait_for_me, probe, worker, args.warmup)
        out["warmup_s"] = round(time.perf_counter() - t, 2)
        await asyncio.sleep(1.0)
        rss_before = worker.rss_bytes()

        print(f"starting {args.waiting} waiting runs", flush=True)
        t = time.perf_counter()
        refs = await start_runs(wait_for_me, list(range(args.waiting)))
        started_s = time.perf_counter() - t
        waited_s = await all_waiting(bide, [r.workflow_run_id for r in refs.values()], probe, worker,
                                     timeout=120 + args.waiting * 0.1)
        await asyncio.sleep(1.0)
        rss_waiting = worker.rss_bytes()
        per_run = (rss_waiting - rss_before) / max(1, args.waiting)
        out["start"] = {"started_s": round(started_s, 2), "all_waiting_s": round(started_s + waited_s, 2)}
        out["memory"] = {
            "rss_before_bytes": rss_before, "rss_waiting_bytes": rss_waiting,
            "bytes_per_waiting_run": round(per_run, 1),
        }
        print(f"  {args.waiting} runs started in {started_s:.2f} s, all waiting (router indexed) after "
              f"{started_s + waited_s:.2f} s", flush=True)

        samples = min(args.samples, args.waiting)
        print(f"{samples} events one at a time", flush=True)
        lat: dict[str, list[float]] = {"resumed": [], "e2e": [], "stored": []}
        for n in range(samples):
            one = await one_sample(bide, n, refs[n])
            for k, v in one.items():
                lat[k].append(v)
            if n and n % 50 == 0:
                worker.check_alive()
        out["sequential"] = {
            "samples": samples,
            "event_to_resumed": summary_ms(lat["resumed"]),
            "end_to_end": summary_ms(lat["e2e"]),
            "push_to_stored": summary_ms(lat["stored"]),
            "event_to_resumed_ms": [round(x * 1000, 2) for x in lat["resumed"]],
            "end_to_end_ms": [round(x * 1000, 2) for x in lat["e2e"]],
        }

        rest = {n: refs[n] for n in range(samples, args.waiting)}
        print(f"{len(rest)} events pushed at once", flush=True)
        out["bulk"] = await bulk(bide, rest, probe, worker, timeout=120 + len(rest) * 0.1)
        await cleaned_up(probe, worker)
        await asyncio.sleep(1.0)
        out["memory"]["rss_after_all_finished_bytes"] = worker.rss_bytes()
    finally:
        await nc.close()
        await bide.aclose()
    return out


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    mem = out["memory"]
    seq = out["sequential"]
    mb = 1024 * 1024
    print()
    print(f"worker RSS: {mem['rss_before_bytes'] / mb:.1f} MiB after warm-up, "
          f"{mem['rss_waiting_bytes'] / mb:.1f} MiB with {args.waiting} runs waiting (evicted), "
          f"{mem['rss_after_all_finished_bytes'] / mb:.1f} MiB after all finished")
    print(f"  → {mem['bytes_per_waiting_run']:,.0f} bytes per waiting run (target ≈ 0; includes the router's index)")
    print(f"{'latency over ' + str(seq['samples']) + ' sequential events':<44} {'p50':>8} {'p90':>8} {'p99':>8} "
          f"{'max':>8} {'mean':>8}")
    for label, key in (("push → event stored (stream timestamp)", "push_to_stored"),
                       ("event → resumed (wait_resolved.at)", "event_to_resumed"),
                       ("end to end (result received)", "end_to_end")):
        r = seq[key]
        if r:
            print(f"  {label:<42} {r['p50_ms']:>6.2f}ms {r['p90_ms']:>6.2f}ms {r['p99_ms']:>6.2f}ms "
                  f"{r['max_ms']:>6.2f}ms {r['mean_ms']:>6.2f}ms")
    r = seq["event_to_resumed"]
    print(f"  targets: event → resumed p50 ≤ 5 ms ({'met' if r['p50_ms'] <= 5 else 'MISSED'}), "
          f"p99 ≤ 25 ms ({'met' if r['p99_ms'] <= 25 else 'MISSED'})")
    b = out.get("bulk")
    if b:
        lr = b["resumed_latency"]
        print(f"bulk: {b['events']} events pushed in {b['push_s']:.2f} s; all resumed after {b['all_resumed_s']:.2f} s "
              f"({b['resumed_per_s']:,.0f} resumed/s), all finished after {b['all_finished_s']:.2f} s "
              f"({b['finished_per_s']:,.0f}/s); resume delay p50 {lr['p50_ms']:.0f} ms, p99 {lr['p99_ms']:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waiting", type=int, default=1000, help="runs left waiting at once")
    ap.add_argument("--samples", type=int, default=200, help="of those, resumed one at a time and timed")
    ap.add_argument("--warmup", type=int, default=50, help="runs taken to completion before measuring")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()

    server = EmbeddedServer().start()
    worker: WorkerProc | None = None
    try:
        os.environ["BIDE_NATS_URL"] = server.url
        worker = WorkerProc(server.url)
        worker.wait_ready()
        out = asyncio.run(drive(args, server.url, worker))
        version = ".".join(map(str, server_version(server.binary)))
    finally:
        if worker is not None:
            worker.stop()
        server.stop()

    print(server.durability_line())
    out.update({
        "server": server.durability(),
        "waiting": args.waiting, "warmup_runs": args.warmup, "nats_server": version,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "targets": {"event_to_resumed_p50_ms": 5, "event_to_resumed_p99_ms": 25, "bytes_per_waiting_run": 0},
    })
    report(out, args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
