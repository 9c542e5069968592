"""Reading one run's history: batch direct get (ADR-31) vs an ordered consumer.

    python -m benchmarks.history_read --messages 100 1000 --repeat 30 --json history_read.json

Fills one subject among many interleaved subjects (as histories are in a busy
stream), then times reading it back both ways. Prints medians and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import nats

from actors.store.jetstream import direct_get_subject
from actors.store.server import EmbeddedServer


async def _fill(js: Any, n: int, noise_subjects: int) -> None:
    futs = []
    for i in range(n):
        futs.append(js.publish("hb.history.target", b'{"v":1,"e":[{"k":"memo","pos":%d}]}' % i))
        for j in range(noise_subjects):
            futs.append(js.publish(f"hb.history.noise{j}", b"x" * 100))
        if len(futs) >= 500:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)


async def _ordered_consumer(js: Any, n: int) -> int:
    sub = await js.subscribe("hb.history.target", ordered_consumer=True)
    got = 0
    try:
        while got < n:
            await sub.next_msg(timeout=5)
            got += 1
    finally:
        await sub.unsubscribe()
    return got


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with EmbeddedServer() as srv:
        print(srv.durability_line())
        results["server"] = srv.durability()
        for n in args.messages:
            nc = await nats.connect(srv.url)
            js = nc.jetstream()
            try:
                await js.delete_stream("HB")
            except Exception:
                pass
            await js.add_stream(name="HB", subjects=["hb.history.>"], allow_direct=True)
            await _fill(js, n, args.noise)
            timings: dict[str, list[float]] = {"direct_batch": [], "ordered_consumer": []}
            for _ in range(args.repeat):
                t = time.perf_counter()
                msgs = await direct_get_subject(nc, "HB", "hb.history.target")
                timings["direct_batch"].append(time.perf_counter() - t)
                assert len(msgs) == n, len(msgs)
                t = time.perf_counter()
                assert await _ordered_consumer(js, n) == n
                timings["ordered_consumer"].append(time.perf_counter() - t)
            row = {k: round(statistics.median(v) * 1000, 2) for k, v in timings.items()}
            results[str(n)] = row
            print(f"{n:>6} messages: direct batch get {row['direct_batch']:.2f} ms, "
                  f"ordered consumer {row['ordered_consumer']:.2f} ms (medians of {args.repeat})")
            await nc.close()
    return results


def _write(path: str | None, results: dict[str, Any], noise: int) -> None:
    if path:
        with open(path, "w") as f:
            server = results.pop("server")
            json.dump({"median_ms": results, "noise_per_message": noise, "server": server}, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--noise", type=int, default=3, help="interleaved messages on other subjects per message")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    _write(args.json, asyncio.run(run(args)), args.noise)


if __name__ == "__main__":
    main()
