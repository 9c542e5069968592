"""Tracing overhead: trivial-run throughput with tracing on (batch exporter) divided by off; target ≥ 0.85.

    python -m benchmarks.tracing_overhead --runs 3000 --rounds 3 --json tracing.json

Starts one OTLP/HTTP receiver (``python -m tests.otlp_receiver``, which decodes every
protobuf body it is sent and counts the spans) for the whole benchmark, then runs rounds of
two modes in the order ``off, on, on, off, off, on, ...`` (``--rounds`` of each), so that a
drift of the machine's speed hits both alike. Every round has a fresh nats-server with an
empty store (a server whose streams earlier rounds filled is slower), a fresh worker process
(``bide worker benchmarks.apps:worker``) and a fresh driver client, warms up, then starts
``--runs`` trivial durable runs with up to ``--concurrency`` in flight and awaits every result.
``--task BenchNoop`` (the default) returns at once: two spans per run. ``--task BenchTrivial``
makes one memoised step first, as in ``benchmarks.throughput``: three spans per run.

* off: no ``OTEL_*`` variable in the driver or the worker: tracing is disabled.
* on: the driver and the worker are both set up by ``OTEL_EXPORTER_OTLP_ENDPOINT=<receiver>``
  (and ``OTEL_SERVICE_NAME``), as a deployment would be: the worker through its environment,
  the driver through ``Bide(url, tracer_provider=provider_from_env(...))`` (a global provider
  could not be switched off for the next off round). ``--export process`` (the default) is
  Bide's default: light spans, encoded and sent by a child exporter process;
  ``--export thread`` is ``BIDE_SPAN_EXPORT=thread``: the SDK's spans and its
  ``BatchSpanProcessor`` inside each process. After the round the driver's provider is flushed,
  the worker is stopped with SIGTERM (the host flushes on stop) and the receiver's count says
  how many spans per run really arrived (a producer span, an activation span and a memo span
  are expected; fewer means some were dropped). Zero is an error.

Reports runs/s per round, the median of each mode and their ratio (on / off), plus the CPU
time per run of each process (driver, worker, nats-server, receiver, and the span exporter
processes of both) over the measured part.
``--otel-env KEY=VALUE`` (repeatable) sets extra ``OTEL_*`` variables (e.g. ``OTEL_BSP_*``)
for the driver's and the worker's batch processors in on rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

from tqdm import tqdm

from actors.store.server import EmbeddedServer, server_version
from benchmarks.common import machine as common_machine
from benchmarks.event_latency import WorkerProc
from benchmarks.throughput import REPO, pct, run_many

TARGET = 0.85
WORKER_TARGET = "benchmarks.apps:worker"
SPANS_PER_RUN = {"BenchNoop": 2, "BenchTrivial": 3}  # send (driver), process (worker) [, memo (worker)]
_TICK = os.sysconf("SC_CLK_TCK")


# -- processes ---------------------------------------------------------------------------------------


def _stat_cpu(path: str) -> float:
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15 of proc(5) stat)


def cpu_seconds(pid: int | None = None) -> tuple[float, float]:
    """User + system CPU seconds of a process: (main thread, all other threads); this process if ``pid`` is None.

    In the driver and the worker the other threads are mostly the batch span processor's
    export thread (encoding protobuf and POSTing it), so on - off of each shows where tracing costs.
    """
    pid = os.getpid() if pid is None else pid
    main = _stat_cpu(f"/proc/{pid}/task/{pid}/stat")
    return main, _stat_cpu(f"/proc/{pid}/stat") - main  # the process's total counts threads that have ended


class Receiver:
    """``python -m tests.otlp_receiver`` in a child process: a real OTLP/HTTP endpoint that counts spans."""

    def __init__(self, tmp: Path) -> None:
        port_file = tmp / "otlp.port"
        self.log = (tmp / "otlp-receiver.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.otlp_receiver", "--port-file", str(port_file)],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"OTLP receiver did not start (exit {self.proc.poll()}), see {self.log.name}")
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{int(port_file.read_text())}"
        self.endpoint = f"{self.base}/v1/traces"

    def count(self) -> int:
        with urllib.request.urlopen(f"{self.base}/count", timeout=10) as r:
            return int(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@contextmanager
def env_vars(extra: dict[str, str]) -> Iterator[None]:
    """``os.environ`` plus ``extra`` for the duration (``WorkerProc`` and the SDK both read it)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_provider(env: dict[str, str]) -> Any:
    """The driver's provider, as ``OTEL_*`` in ``env`` ask (set in ``os.environ`` while it is made)."""
    from actors.observe.tracing import provider_from_env

    with env_vars({**env, "OTEL_SERVICE_NAME": "bench-driver"}):
        return provider_from_env()


def exporter_cpu() -> dict[int, float]:
    """CPU seconds of every span exporter process (``python -m actors.observe.span_export``) now alive."""
    out: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"actors.observe.span_export" not in f.read():
                    continue
            out[int(entry)] = _stat_cpu(f"/proc/{entry}/stat")
        except OSError:
            continue
    return out


# -- one round ---------------------------------------------------------------------------------------


async def drive(url: str, task_name: str, provider: Any, warmup: int, runs: int, concurrency: int,
                progress: bool, pids: dict[str, int | None], warm: Any = None,
                received: Any = None) -> dict[str, Any]:
    """Warm up, then ``runs`` trivial runs from a fresh client; CPU seconds of ``pids`` over the measured part."""
    from benchmarks import apps
    from sdk import Bide

    client = Bide(url, tracer_provider=provider)
    defined = {t.name: t for t in (apps.bench_trivial, apps.bench_noop)}[task_name]
    task = client.durable_task(name=defined.name)(defined.fn)
    try:
        with tqdm(disable=True) as quiet:
            _, warm_errors = await run_many(task, warmup, concurrency, quiet)
        if warm is not None:
            await asyncio.to_thread(warm)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        exp0 = exporter_cpu()
        with tqdm(total=runs, unit="run", disable=not progress, file=sys.stderr, smoothing=0.1, leave=False) as bar:
            t0 = time.perf_counter()
            latencies, errors = await run_many(task, runs, concurrency, bar)
            wall = time.perf_counter() - t0
        exp1 = exporter_cpu()
        cpu: dict[str, float] = {"exporters": sum(v - exp0.get(pid, 0.0) for pid, v in exp1.items())}
        for name, pid in pids.items():
            (main1, other1), (main0, other0) = cpu_seconds(pid), cpu0[name]
            if name in ("driver", "worker"):
                cpu[name] = main1 - main0
                cpu[f"{name}_bg"] = max(0.0, other1 - other0)  # two reads of 10 ms ticks can cross
            else:
                cpu[name] = main1 + other1 - main0 - other0
        # After the CPU readings: asking the receiver makes it decode what it holds.
        received_at_end = await asyncio.to_thread(received) if received is not None else None
    finally:
        await client.aclose()
    return {"latencies": latencies, "wall": wall, "errors": errors, "warmup_errors": warm_errors, "cpu": cpu,
            "received_at_end": received_at_end}


def one_round(index: int, mode: str, url: str, server_pid: int, receiver: Receiver, args: argparse.Namespace,
              otel_env: dict[str, str]) -> dict[str, Any]:
    on = mode == "on" and not args.control
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.base, "BIDE_SPAN_EXPORT": args.export, **otel_env} if on else {}
    with env_vars({**env, "OTEL_SERVICE_NAME": "bench-worker"} if on else {}):  # WorkerProc copies os.environ
        worker = WorkerProc(url, WORKER_TARGET)
    provider = make_provider(env) if on else None
    try:
        worker.wait_ready()
        spans0 = receiver.count()
        pids = {"driver": None, "worker": worker.proc.pid, "nats_server": server_pid, "receiver": receiver.proc.pid}
        expected = SPANS_PER_RUN[args.task] * args.warmup

        def warm() -> None:
            # Measure only once both exporters are up: the warm-up's spans have all arrived.
            deadline = time.monotonic() + 60
            while receiver.count() - spans0 < expected:
                if time.monotonic() > deadline:
                    raise SystemExit(f"round {index}: the warm-up's spans did not all arrive "
                                     f"({receiver.count() - spans0} of {expected})")
                time.sleep(0.05)

        res = asyncio.run(drive(url, args.task, provider, args.warmup, args.runs, args.concurrency,
                                not args.no_progress, pids, warm if on else None,
                                (lambda: receiver.count() - spans0) if on else None))
        worker.check_alive()
        flushed = None
        if provider is not None:
            t = time.perf_counter()
            provider.force_flush()
            provider.shutdown()
            flushed = time.perf_counter() - t
    finally:
        worker.stop()
    lat, wall = res["latencies"], res["wall"]
    done = len(lat)
    row: dict[str, Any] = {
        "round": index,
        "mode": mode,
        "runs": args.runs,
        "errors": res["errors"] + res["warmup_errors"],
        "wall_s": round(wall, 3),
        "runs_per_s": round(done / wall, 1),
        "p50_ms": round(pct(lat, 0.50) * 1000, 2),
        "p99_ms": round(pct(lat, 0.99) * 1000, 2),
        "cpu_us_per_run": {k: round(v * 1e6 / max(done, 1), 1) for k, v in res["cpu"].items()},
        "worker_exit": worker.proc.returncode,
    }
    if mode == "on" and args.control:
        row["spans_per_run"] = 0.0
    if on:
        spans = receiver.count() - spans0
        total_runs = args.warmup + args.runs
        row["spans_received"] = spans
        row["spans_per_run"] = round(spans / total_runs, 3)
        row["driver_flush_s"] = round(flushed or 0.0, 3)
        # Spans made but not yet at the receiver when the last run's result came back: an
        # exporter that cannot keep up shows here (at most about one 200 ms interval's worth is normal).
        row["export_backlog_at_end"] = SPANS_PER_RUN[args.task] * total_runs - res["received_at_end"]
        if spans == 0:
            raise SystemExit(f"round {index} (on): the OTLP receiver got 0 spans for {total_runs} runs; "
                             f"worker output:\n{''.join(worker.tail)}")
        dropped = [line for line in worker.tail if "dropping" in line.lower()]
        if dropped:
            row["worker_drop_warnings"] = len(dropped)
    return row


# -- report ------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The suite's machine description, with the platform and the tracing packages' versions."""
    return {
        **common_machine(),
        "platform": platform.platform(),
        "opentelemetry_sdk": dist_version("opentelemetry-sdk"),
        "otlp_http_exporter": dist_version("opentelemetry-exporter-otlp-proto-http"),
        "nats_py": dist_version("nats-py"),
    }


CPU_KEYS = ["driver", "driver_bg", "worker", "worker_bg", "exporters", "nats_server", "receiver"]


def print_table(rows: list[dict[str, Any]]) -> None:
    print("CPU columns: CPU microseconds per run over the measured part; *_bg = the process's other threads")
    print("(the span export thread), driver/worker = their main (event loop) thread, exporters = the span")
    print("exporter processes of both (--export process)")
    head = (f"{'round':>5} {'mode':>4} {'runs/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'err':>3} "
            + " ".join(f"{k.replace('_server', '').replace('receiver', 'otlp_rx'):>9}" for k in CPU_KEYS)
            + f" {'spans/run':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        cpu = r["cpu_us_per_run"]
        spr = f"{r['spans_per_run']:.2f}" if "spans_per_run" in r else "-"
        print(f"{r['round']:>5} {r['mode']:>4} {r['runs_per_s']:>7,.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
              f"{r['errors']:>3} " + " ".join(f"{cpu[k]:>9.0f}" for k in CPU_KEYS) + f" {spr:>9}")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("off", "on"):
        mine = [r for r in rows if r["mode"] == mode]
        out[mode] = {
            "runs_per_s": [r["runs_per_s"] for r in mine],
            "median_runs_per_s": round(statistics.median(r["runs_per_s"] for r in mine), 1),
            "median_p50_ms": round(statistics.median(r["p50_ms"] for r in mine), 2),
            "median_cpu_us_per_run": {k: round(statistics.median(r["cpu_us_per_run"][k] for r in mine))
                                      for k in CPU_KEYS},
        }
    out["on"]["spans_per_run"] = [r["spans_per_run"] for r in rows if r["mode"] == "on"]
    off_cpu, on_cpu = out["off"]["median_cpu_us_per_run"], out["on"]["median_cpu_us_per_run"]
    out["added_cpu_us_per_run"] = {k: on_cpu[k] - off_cpu[k] for k in CPU_KEYS}
    # Each on round over the off round next to it: the noise of the moment mostly cancels.
    pairs = []
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        off, on = (a, b) if a["mode"] == "off" else (b, a)
        pairs.append(on["runs_per_s"] / off["runs_per_s"])
    out["pair_ratios"] = [round(x, 3) for x in pairs]
    out["median_pair_ratio"] = round(statistics.median(pairs), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=4000, help="measured runs per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each mode (off and on alternate)")
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=300, help="runs per round before measuring")
    ap.add_argument("--otel-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra OTEL_* variable for on rounds (driver and worker), e.g. OTEL_BSP_SCHEDULE_DELAY=500")
    ap.add_argument("--task", choices=sorted(SPANS_PER_RUN), default="BenchNoop",
                    help="BenchNoop returns at once; BenchTrivial makes one memoised step first")
    ap.add_argument("--export", choices=["process", "thread"], default="process",
                    help="BIDE_SPAN_EXPORT in on rounds: a child exporter process (default) or the SDK in-process")
    ap.add_argument("--control", action="store_true",
                    help="A/A check: 'on' rounds run untraced too; on/off then shows the noise between rounds")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    otel_env = dict(kv.split("=", 1) for kv in args.otel_env)
    for k in otel_env:
        if not k.startswith("OTEL_"):
            ap.error(f"--otel-env {k}: only OTEL_* variables")

    # "off" means no OTEL_* anywhere: not inherited by the worker, not read by Bide() in this process.
    stripped = sorted(k for k in os.environ if k.startswith("OTEL_"))
    for k in stripped:
        del os.environ[k]
    if stripped:
        print(f"ignoring {', '.join(stripped)} from the environment", file=sys.stderr)
    info = machine()

    rows: list[dict[str, Any]] = []
    version = ""
    durability: dict[str, Any] = {}
    durability_line = ""
    with tempfile.TemporaryDirectory(prefix="bide-tracing-") as tmp:
        receiver = Receiver(Path(tmp))
        try:
            for i in range(2 * args.rounds):
                # off, on, on, off, off, on, ...: a drift over the benchmark (the machine's other
                # load) hits both modes alike; each pair is still one off and one on round.
                mode = "off" if i % 4 in (0, 3) else "on"
                # A fresh, empty server per round: no round runs against the streams an earlier
                # round filled.
                with EmbeddedServer() as server:
                    os.environ["BIDE_NATS_URL"] = server.url  # benchmarks.apps makes its Bide() at import
                    assert server.proc is not None
                    row = one_round(i + 1, mode, server.url, server.proc.pid, receiver, args, otel_env)
                    version = ".".join(map(str, server_version(server.binary)))
                    durability, durability_line = server.durability(), server.durability_line()
                rows.append(row)
                extra = (f", {row['spans_per_run']:.2f} spans/run, export backlog at end {row['export_backlog_at_end']}"
                         if "export_backlog_at_end" in row else "")
                print(f"round {i + 1}/{2 * args.rounds} ({mode}): {row['runs_per_s']:,.0f} runs/s, "
                      f"errors {row['errors']}{extra}", flush=True)
        finally:
            receiver.stop()

    summary = summarize(rows)
    expected = SPANS_PER_RUN[args.task]
    ratio = summary["on"]["median_runs_per_s"] / summary["off"]["median_runs_per_s"]
    spans = summary["on"]["spans_per_run"]
    errors = sum(r["errors"] for r in rows)
    out: dict[str, Any] = {
        "benchmark": "tracing_overhead",
        "machine": info,
        "nats_server": version,
        "server": durability,
        "parameters": {
            "runs": args.runs, "rounds_per_mode": args.rounds, "concurrency": args.concurrency,
            "warmup": args.warmup, "worker": WORKER_TARGET, "otel_env": otel_env,
            "task": args.task, "expected_spans_per_run": expected, "export": args.export,
            "control": args.control,
        },
        "rounds": rows,
        "off": summary["off"],
        "on": summary["on"],
        "added_cpu_us_per_run": summary["added_cpu_us_per_run"],
        "ratio_on_off": round(ratio, 4),
        "pair_ratios": summary["pair_ratios"],
        "median_pair_ratio": summary["median_pair_ratio"],
        "target": TARGET,
        "target_met": ratio >= TARGET,
        "errors": errors,
    }

    print()
    print(durability_line)
    print_table(rows)
    print()
    print(f"median runs/s: off {summary['off']['median_runs_per_s']:,.0f}, on {summary['on']['median_runs_per_s']:,.0f}"
          f"  ->  on/off = {ratio:.3f} (target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})")
    print(f"on/off of each (off, on) pair: {', '.join(f'{x:.3f}' for x in summary['pair_ratios'])} "
          f"(median {summary['median_pair_ratio']:.3f})")
    print("median CPU us/run:  " + "  ".join(f"{k:>11}" for k in CPU_KEYS))
    for mode in ("off", "on"):
        cpu = summary[mode]["median_cpu_us_per_run"]
        print(f"  {mode:>15}: " + "  ".join(f"{cpu[k]:>11}" for k in CPU_KEYS))
    added = summary["added_cpu_us_per_run"]
    print(f"  {'added (on-off)':>15}: " + "  ".join(f"{added[k]:>11}" for k in CPU_KEYS)
          + f"   total {sum(added.values())} us/run")
    print(f"spans received per run (on rounds, incl. warm-up runs): {', '.join(f'{s:.2f}' for s in spans)} "
          f"(expected {expected})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    if errors:
        raise SystemExit(f"{errors} runs failed")
    if min(spans) < expected and not args.control:
        print(f"warning: fewer than {expected} spans per run arrived in some round "
              "(dropped by a full batch queue?)", file=sys.stderr)


if __name__ == "__main__":
    main()
