"""Kill-to-resume time: how long a run whose host is SIGKILLed waits for a live host.

Each trial starts a durable run whose memo step takes ``--step`` seconds, SIGKILLs its host
while the step runs, starts a new host at once, and measures from the kill to the new host's
turn (its ``activation`` entry in the run's history). Hosts use the default ack wait unless
``--ack-wait`` is given. Prints p50/p99/max over the trials.

    python -m benchmarks.recovery --trials 20
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import tempfile
import time
from pathlib import Path

from actors.engine.wire import utcnow
from actors.store.server import EmbeddedServer
from sdk import Bide, TaskDefinition
from sdk.config import DEFAULT_ACK_WAIT_S
from tests.support import WorkerProcess

# Imported by name, so that type-checking the benchmarks does not type-check the tests' app.
_apps = importlib.import_module("tests.apps.recovery")
StepInput, define = _apps.StepInput, _apps.define


def _percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def _trial(bide: Bide, step: TaskDefinition, url: str, host: WorkerProcess, ack_wait: str, step_s: float,
                 log: Path) -> tuple[float, WorkerProcess]:
    log.write_text("")
    ref = await step.aio_run_no_wait(StepInput(log=str(log), seconds=step_s))
    deadline = time.monotonic() + 30
    while not log.read_text():
        if time.monotonic() > deadline:
            raise RuntimeError("the step never started")
        await asyncio.sleep(0.01)
    killed_at = utcnow()
    host.kill()
    nxt = WorkerProcess("tests.apps.recovery:worker", url, env={"BIDE_ACK_WAIT": ack_wait})
    await asyncio.to_thread(nxt.start)
    await ref.aio_result(timeout=120)
    hist = await bide.runs.aio_history(ref.workflow_run_id)
    assert nxt.proc is not None
    resumed = next(e.at for e in hist.entries if e.k == "activation" and e.host.endswith(f":{nxt.proc.pid}"))
    return (resumed - killed_at).total_seconds(), nxt


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--step", type=float, default=3.0, help="seconds the memo step takes")
    ap.add_argument("--ack-wait", type=str, default="",
                    help=f"BIDE_ACK_WAIT for hosts (default {DEFAULT_ACK_WAIT_S:g})")
    args = ap.parse_args()
    if args.trials < 1:
        ap.error(f"--trials must be at least 1, got {args.trials}")
    with EmbeddedServer() as server, tempfile.TemporaryDirectory() as tmp:
        bide = Bide(server.url)
        step = define(bide)["step"]
        host = WorkerProcess("tests.apps.recovery:worker", server.url, env={"BIDE_ACK_WAIT": args.ack_wait})
        await asyncio.to_thread(host.start)
        times: list[float] = []
        try:
            for i in range(args.trials):
                took, host = await _trial(bide, step, server.url, host, args.ack_wait, args.step,
                                          Path(tmp) / "steps.log")
                times.append(took)
                print(f"trial {i + 1}: resumed {took:.2f}s after the kill", flush=True)
        finally:
            host.kill()
            await bide.aclose()
    print(f"kill-to-resume over {len(times)} trials (ack wait {args.ack_wait or DEFAULT_ACK_WAIT_S:}s, "
          f"step {args.step:g}s, the new host started at the kill): p50 {statistics.median(times):.2f}s  "
          f"p99 {_percentile(times, 99):.2f}s  max {max(times):.2f}s")


if __name__ == "__main__":
    asyncio.run(main())
