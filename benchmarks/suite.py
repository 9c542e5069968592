"""The benchmark suite's parts: which benchmarks, at which sizes, and how each is run and recorded.

Each benchmark runs as its own process (``python -m benchmarks.NAME ... --json FILE``), one at
a time: every one starts its own nats-server and worker, and on a small machine two at once
would measure each other. The suite adds a ``suite`` block to each JSON file (the command,
the wall time, the raw JetStream publish rate the suite measured), so every number can be
read as a ratio of what the same machine's JetStream did in the same suite run.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    """One benchmark of the suite: its module and its arguments at full and at quick sizes."""

    name: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    timeout_s: float = 900.0

    def args(self, quick: bool) -> list[str]:
        return list(self.quick if quick else self.full)


BENCHMARKS: tuple[Bench, ...] = (
    Bench("throughput", ("--runs", "5000", "--sweep", "10,50,200,500,1000", "--no-progress"),
          ("--runs", "500", "--warmup", "100", "--publish-messages", "5000", "--sweep", "20,200",
           "--sweep-runs", "300", "--no-progress")),
    Bench("event_latency", ("--waiting", "1000", "--samples", "200"),
          ("--waiting", "100", "--samples", "30", "--warmup", "10")),
    Bench("router_burst", ("--waiting", "500", "--rounds", "2"), ("--waiting", "100", "--rounds", "1")),
    Bench("timers_at_scale", ("--runs", "1000,10000"), ("--runs", "500", "--lead", "3")),
    Bench("turn_cost", ("--ks", "10,100,1000", "--no-progress"), ("--ks", "10,100", "--no-progress")),
    Bench("fanout", ("--children", "1000", "--rounds", "3"),
          ("--children", "200", "--rounds", "1", "--warmup", "20", "--pause", "0.2")),
    Bench("memory_waiting", ("--runs", "20000"), ("--runs", "500", "--warmup", "50", "--steps", "2", "--idle", "5")),
    Bench("tracing_overhead", ("--runs", "3000", "--rounds", "3", "--no-progress"),
          ("--runs", "300", "--rounds", "1", "--warmup", "50", "--no-progress")),
)
NAMES = tuple(b.name for b in BENCHMARKS)


def command(bench: Bench, quick: bool, json_path: Path) -> list[str]:
    """The command line that runs ``bench`` (relative to the repository, as the README prints it)."""
    return [sys.executable, "-m", f"benchmarks.{bench.name}", *bench.args(quick), "--json", str(json_path)]


def printable(cmd: list[str]) -> str:
    """``cmd`` as one would type it in the repository: ``python -m ...`` with paths relative to it."""
    parts = ["python", *cmd[1:]]
    return " ".join(os.path.relpath(p, REPO) if p.startswith(str(REPO)) else p for p in parts)


# -- running one benchmark ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one benchmark run ended."""

    name: str
    ok: bool
    wall_s: float
    detail: str = ""


def _pump(stream: Any, log: Any, lines: queue.Queue[str | None]) -> None:
    """Copy the child's output to its log and hand each line to the suite (for its progress line)."""
    for line in stream:
        log.write(line)
        log.flush()
        lines.put(line.rstrip())
    lines.put(None)


def _stop(proc: subprocess.Popen[str]) -> None:
    """Interrupt the benchmark (its ``finally`` blocks stop its server and worker), then kill its group."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_one(bench: Bench, quick: bool, out_dir: Path, status: Any) -> Outcome:
    """Run one benchmark as a child process; its output goes to ``NAME.log``, its last line to ``status``.

    The child has its own process group, so a benchmark that must be stopped (its timeout, or
    Ctrl-C here) is interrupted first and only then killed with everything it started.
    """
    json_path = out_dir / f"{bench.name}.json"
    json_path.unlink(missing_ok=True)
    cmd = command(bench, quick, json_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with (out_dir / f"{bench.name}.log").open("w") as log:
        log.write(f"$ {printable(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines: queue.Queue[str | None] = queue.Queue()
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, lines), daemon=True)
        pump.start()
        try:
            timed_out = _follow(proc, lines, t0 + bench.timeout_s, status)
        finally:
            _stop(proc)
            pump.join(timeout=5)
    wall = time.monotonic() - t0
    if timed_out:
        return Outcome(bench.name, False, wall, f"timed out after {bench.timeout_s:.0f} s")
    if proc.returncode != 0 or not json_path.exists():
        return Outcome(bench.name, False, wall, f"exit {proc.returncode}; see {bench.name}.log")
    record(json_path, {"command": printable(cmd), "wall_s": round(wall, 1), "quick": quick,
                       "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")})
    return Outcome(bench.name, True, wall)


def _follow(proc: subprocess.Popen[str], lines: queue.Queue[str | None], deadline: float, status: Any) -> bool:
    """Pass the child's lines to ``status`` until it exits; True if ``deadline`` passed first."""
    while True:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            line = ""
        if line is None:
            proc.wait()
            return False
        if line.strip():
            status(line.strip())
        if time.monotonic() > deadline:
            return True


def record(json_path: Path, extra: dict[str, Any]) -> None:
    """Add the suite's facts to a benchmark's JSON (the ``suite`` block)."""
    data = json.loads(json_path.read_text())
    data["suite"] = {**data.get("suite", {}), **extra}
    json_path.write_text(json.dumps(data, indent=2))


# -- the machine and its raw JetStream publish rate ---------------------------------------------------


def publish_rate(messages: int) -> float:
    """Raw pipelined JetStream publishes per second on a fresh server (``benchmarks.throughput.publish_rate``)."""
    from actors.store.server import EmbeddedServer
    from benchmarks.throughput import publish_rate as measure

    with EmbeddedServer() as server:
        return asyncio.run(measure(server.url, messages))


def machine() -> dict[str, Any]:
    """CPUs and their model, Python, nats-server's version, the sync setting, the commit measured."""
    from actors.store.server import SyncSetting, find_server_binary, server_version
    from benchmarks.common import machine as basics

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    return {**basics(), "nats_server": ".".join(map(str, server_version(find_server_binary()))),
            "sync": str(SyncSetting.from_env()), "commit": commit,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
