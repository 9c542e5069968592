"""What one round of the hosts' wake-up check costs, per parked run.

    python -m benchmarks.wakeup_check --runs 10000 --json wakeup_check.json

Starts its own nats-server and an in-process worker whose own check never runs on its own
(``BIDE_WAKEUP_CHECK_INTERVAL`` one day), parks N durable runs on an event wait with a one-hour
timeout (a timer each), then runs ``--rounds`` rounds of the check by hand and times each: the
first reads every run's history whole, the later ones only the last message of each
(batched). Nothing is overdue, so nothing is armed again: this is the cost the check adds
when all is well. Prints the wall and CPU time of each round and per parked run, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from datetime import timedelta
from typing import Any

from tqdm import tqdm

from actors.engine.wire import Subjects
from actors.store.jetstream import api_request
from actors.store.server import EmbeddedServer
from benchmarks.common import poll_until


async def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["BIDE_WAKEUP_CHECK_INTERVAL"] = "86400"
    from sdk import Bide, DurableContext  # after the setting: the client reads it at creation
    from tests.support import running_worker

    out: dict[str, Any] = {"runs": args.runs, "rounds": []}
    with EmbeddedServer() as srv:
        print(srv.durability_line())
        out["server"] = srv.durability()
        client = Bide(srv.url, ack_wait=3.0)

        @client.durable_task(name="BenchTimedWait")
        async def timed_wait(input: dict[str, Any], ctx: DurableContext) -> int:
            await ctx.aio_wait_for_event("bench:never", f"input.n == {int(input['n'])}", timeout=timedelta(hours=1))
            return 1

        async with running_worker(client, [timed_wait], durable_slots=2000) as worker:
            gate = asyncio.Semaphore(300)
            bar = tqdm(total=args.runs, desc="parking", disable=args.no_progress)

            async def start(n: int) -> None:
                async with gate:
                    await timed_wait.aio_run_no_wait({"n": n})
                    bar.update()

            await asyncio.gather(*(start(n) for n in range(args.runs)))
            bar.close()
            s = Subjects()

            async def parked() -> bool:  # every start taken and acked: each run has parked on its wait
                info = await api_request(worker.host._nc_, f"$JS.API.CONSUMER.INFO.{s.queue_stream}."
                                         f"{s.consumer_name('BenchTimedWait')}", {})
                return not int(info.get("num_pending", 1)) and not int(info.get("num_ack_pending", 1))

            await poll_until(parked, "every run parked", timeout=max(60.0, args.runs / 100))
            check = worker.host.wakeups
            for i in range(args.rounds):
                cpu, wall = time.process_time(), time.perf_counter()
                rearmed = await check.check()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                row = {"round": i + 1, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                       "cpu_us_per_run": round(cpu / args.runs * 1e6, 1), "rearmed": rearmed,
                       "runs_known": len(check._known)}
                out["rounds"].append(row)
                print(f"round {i + 1}: {wall:.2f} s wall, {cpu:.2f} s CPU ({row['cpu_us_per_run']} us per parked run), "
                      f"{rearmed} armed again")
        await client.aclose()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    res = asyncio.run(run(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
