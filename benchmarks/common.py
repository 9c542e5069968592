"""Helpers shared by the scale benchmarks (turn cost, timers at scale, memory per waiting run).

Each benchmark starts its own nats-server and one worker process, as ``benchmarks.throughput``
does; these helpers keep that set-up, the machine description and the statistics in one place.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.engine.wire import HistoryEntry, Subjects, decode_history
from actors.store.server import EmbeddedServer, free_port, server_version
from benchmarks.event_latency import WorkerProc

SCALE_WORKER = "benchmarks.scale_apps:worker"


# -- processes ---------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """A process's resident set (``VmRSS`` in ``/proc/PID/status``), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (``/proc/PID/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """A process's children (``/proc/PID/task/*/children``): a ``bide worker --processes N``'s N-1 hosts."""
    out: list[int] = []
    for task in sorted(os.listdir(f"/proc/{pid}/task")):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def worker_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds of a worker's processes: ``worker`` their sum and, for more than one, each (``worker_1``...)."""
    each = [cpu_seconds(p) for p in pids]
    return {"worker": sum(each), **({f"worker_{i}": c for i, c in enumerate(each, 1)} if len(each) > 1 else {})}


@dataclass
class Stack:
    """A running nats-server and one ``bide worker`` of ``SCALE_WORKER`` (one or more processes)."""

    server: EmbeddedServer
    worker: WorkerProc
    profile_port: int = 0
    worker_pids: list[int] = field(default_factory=list)
    """The worker command's process, then its children (``--processes``), as they were once all were ready."""
    """The server's Go profiling port (``nats-server -profile``), when the stack was asked for it."""

    def server_heap_kib(self) -> int:
        """The server's live Go heap (``HeapAlloc``) after forced garbage collections, in KiB.

        RSS holds garbage the Go runtime has not collected or returned yet (with the default
        GOGC the heap grows to twice the live data before a collection) and buffers parked in
        ``sync.Pool``s (a pool is emptied over two collections): each read of the heap profile
        with ``gc=1`` collects once, so the third read shows what stays.
        """
        import urllib.request

        url = f"http://127.0.0.1:{self.profile_port}/debug/pprof/heap?gc=1&debug=1"
        for _ in range(3):
            with urllib.request.urlopen(url, timeout=30) as resp:
                text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith("# HeapAlloc = "):
                return int(line.split("=")[1]) // 1024
        raise RuntimeError("no HeapAlloc in the server's heap profile")

    @property
    def server_pid(self) -> int:
        assert self.server.proc is not None
        return int(self.server.proc.pid)

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the worker (all its processes; each too when more than one) and the server."""
        return {**worker_cpu(self.worker_pids or [self.worker.proc.pid]), "server": cpu_seconds(self.server_pid)}

    def describe(self) -> dict[str, Any]:
        """The server's version and durability setting, for the JSON report."""
        return {"nats_server": ".".join(map(str, server_version(self.server.binary))),
                "server": self.server.durability()}


@contextmanager
def stack(*worker_args: str, profile: bool = False, processes: int = 1) -> Iterator[Stack]:
    """A fresh server (empty store) and a ready worker; both stopped on exit, whatever happens.

    With ``profile`` the server also serves Go's profiles on a free loopback port (its heap).
    With ``processes`` > 1 the worker is ``bide worker --processes N``: N hosts, N-1 of them children.
    """
    profile_port = free_port() if profile else 0
    server = EmbeddedServer(extra_args=["-profile", str(profile_port)] if profile else None).start()
    worker: WorkerProc | None = None
    try:
        os.environ["BIDE_NATS_URL"] = server.url  # the apps module makes its Bide() at import
        worker = WorkerProc(server.url, SCALE_WORKER, *worker_args, "--processes", str(processes))
        worker.wait_ready()
        pids = [worker.proc.pid, *child_pids(worker.proc.pid)]
        if len(pids) != processes:
            raise RuntimeError(f"asked for {processes} worker processes, found {len(pids)}: {pids}")
        yield Stack(server, worker, profile_port, pids)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


# -- waiting for conditions ----------------------------------------------------------------------------


async def poll_until(cond: Callable[[], Awaitable[bool]], what: str, timeout: float,
                     worker: WorkerProc | None = None, interval: float = 0.1) -> float:
    """Await ``cond()`` until it holds; seconds it took. ``TimeoutError`` naming ``what`` after ``timeout``."""
    t0 = time.monotonic()
    while not await cond():
        if worker is not None:
            worker.check_alive()
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - t0


class HistoryWatch:
    """A core NATS subscription on one run's history subject: every append, decoded, with its arrival time.

    Opened before the run starts, so no append is missed. A core subscriber also sees an append
    JetStream refused (a lost single-writer race); with one host there is none.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[float, list[HistoryEntry]]] = []
        self._new = asyncio.Event()
        self._sub: Any = None
        self._seen = 0

    async def open(self, nc: Any, run_id: str) -> HistoryWatch:
        async def on_msg(msg: Any) -> None:
            self.messages.append((time.perf_counter(), decode_history(msg.data)))
            self._new.set()

        self._sub = await nc.subscribe(Subjects().history(run_id), cb=on_msg)
        await nc.flush()
        return self

    async def until(self, pred: Callable[[HistoryEntry], bool], timeout: float) -> float:
        """The arrival time (``perf_counter``) of the next message holding an entry ``pred`` accepts."""
        deadline = time.monotonic() + timeout
        while True:
            while self._seen < len(self.messages):
                at, entries = self.messages[self._seen]
                self._seen += 1
                if any(pred(e) for e in entries):
                    return at
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching history entry within {timeout:.0f} s")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except TimeoutError:
                pass

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


# -- statistics and reports ------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank below) of ``values``; NaN for none."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / max / mean of durations given in seconds, in milliseconds."""
    if not seconds:
        return {}
    return {
        "p50_ms": round(pct(seconds, 0.50) * 1000, 2),
        "p90_ms": round(pct(seconds, 0.90) * 1000, 2),
        "p99_ms": round(pct(seconds, 0.99) * 1000, 2),
        "max_ms": round(max(seconds) * 1000, 2),
        "mean_ms": round(statistics.fmean(seconds) * 1000, 2),
    }


def ms_list(seconds: list[float], digits: int = 2) -> list[float]:
    """Durations in seconds as rounded milliseconds (the per-sample arrays the JSON keeps for plots)."""
    return [round(s * 1000, digits) for s in seconds]


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPUs, their model, Python, the load when the benchmark began."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def write_json(path: str | None, out: dict[str, Any]) -> None:
    """Write the report (if a path was given) and say where."""
    if path:
        Path(path).write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")
