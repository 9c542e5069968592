"""Router partition rebuild time and memory per pending wait, and the cost of reading other partitions' messages.

    python -m benchmarks.router_rebuild --waits 100000 --partitions 4 --json rebuild.json
    python -m benchmarks.router_rebuild --waits 250000 --other-waits 750000 --hold-all --repeat 1 --events 1000

Starts its own nats-server, publishes ``--waits`` wait registrations (``input.id == <i>``, 100
waits per key) on keys of partition 0, and ``--other-waits`` on keys of the other partitions,
moves partition 0's checkpoint past them, and times partition 0's rebuild (what a new owner
does before routing: read every registration up to the checkpoint, keep its own). Memory per
pending wait is the index's allocations (tracemalloc) divided by the waits it holds. Then it
publishes ``--events`` events on keys of other partitions and as many on partition 0's keys
with no waiter, and times partition 0 reading each set in order (what every partition pays for
the whole stream: the fallback design has each partition read every message).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import platform
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from actors.engine.wire import HDR_TTL, Subjects, WaitRegistration, partition_of
from actors.hosting.router import EventRouter
from actors.hosting.router_effects import Effects
from actors.store.history import HistoryLog
from actors.store.jetstream import Layout, api_request, connect, ensure_streams
from actors.store.requests import Publisher
from actors.store.server import EmbeddedServer, server_version


def keys_of(partition: int, n: int, count: int) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < count:
        if partition_of(f"bench:{i}", n) == partition:
            out.append(f"bench:{i}")
        i += 1
    return out


async def publish_all(pub: Publisher, msgs: Iterable[tuple[str, bytes, dict[str, str]]], window: int = 2000) -> float:
    t = time.perf_counter()
    it = iter(msgs)
    while chunk := list(itertools.islice(it, window)):
        await asyncio.gather(*(pub.publish(*m) for m in chunk))
    return time.perf_counter() - t


def registrations(keys: list[str], count: int, s: Subjects, tag: str) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """Made as they are published: a million of them need not sit in memory at once."""
    for i in range(count):
        key = keys[i // 100 % len(keys)]
        reg = WaitRegistration(op="register", wait_id=f"{tag}-{i}", cond=0, run_id=f"run-{tag}-{i}", task="Bench",
                               event_key=key, expression=f"input.id == {i}")
        yield s.waits(key), reg.model_dump_json(exclude_none=True).encode(), {HDR_TTL: "never"}


async def checkpoint_at(nc: Any, layout: Layout, partition: int, seq: int) -> None:
    """Recreate the partition's consumer with its ack floor at ``seq`` (as if it had handled everything)."""
    s = layout.subjects
    name = s.router_consumer(partition)
    info = await api_request(nc, f"$JS.API.CONSUMER.INFO.{s.events_stream}.{name}", {})
    cfg = {**info["config"], "deliver_policy": "by_start_sequence", "opt_start_seq": seq + 1}
    await api_request(nc, f"$JS.API.CONSUMER.DELETE.{s.events_stream}.{name}", {})
    await api_request(nc, f"$JS.API.CONSUMER.CREATE.{s.events_stream}.{name}",
                      {"stream_name": s.events_stream, "config": cfg})


def rss_bytes() -> int:
    """This process's resident memory (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def hold_all(nc: Any, pub: Publisher, layout: Layout, first: EventRouter, last: int) -> dict[str, Any]:
    """Every partition rebuilt and held at once in this process, as the hosts of one machine would hold them."""
    n = layout.router_partitions
    gc.collect()
    base = rss_bytes()
    routers, seconds = [first], []
    for p in range(1, n):
        await checkpoint_at(nc, layout, p, last)
        router = EventRouter(nc, pub, layout, HistoryLog(nc, pub, layout.subjects), partition=p, partitions=n)
        t = time.perf_counter()
        await router._rebuild(last)
        seconds.append(round(time.perf_counter() - t, 2))
        routers.append(router)
    gc.collect()
    total = sum(len(r.index) for r in routers)
    added = sum(len(r.index) for r in routers[1:])
    grew = rss_bytes() - base
    print(f"held at once: {total:,} pending waits across {n} partitions in one process; partitions 1..{n - 1} "
          f"rebuilt in {seconds} s; process RSS {rss_bytes() / 1e6:,.0f} MB, "
          f"{grew / max(1, added):,.0f} bytes per wait added (RSS)", flush=True)
    return {"waits_held": total, "partitions": n, "rebuild_s": seconds, "rss_bytes": rss_bytes(),
            "rss_bytes_per_added_wait": round(grew / max(1, added), 1)}


async def drive(args: argparse.Namespace, url: str) -> dict[str, Any]:
    n = args.partitions
    layout = Layout(Subjects(), router_partitions=n)
    s = layout.subjects
    nc = await connect(url)
    await ensure_streams(nc.jetstream(), layout)
    pub = await Publisher(nc, timeout=60).start()
    out: dict[str, Any] = {}
    try:
        mine = keys_of(0, n, max(1, args.waits // 100))
        others = [k for p in range(1, n) for k in keys_of(p, n, max(1, args.other_waits // 100 // max(1, n - 1)))]
        t = await publish_all(pub, registrations(mine, args.waits, s, "mine"))
        if args.other_waits:
            t += await publish_all(pub, registrations(others, args.other_waits, s, "other"))
        out["publish_s"] = round(t, 2)
        last = int((await api_request(nc, f"$JS.API.STREAM.INFO.{s.events_stream}", {}))["state"]["last_seq"])
        await checkpoint_at(nc, layout, 0, last)
        router = EventRouter(nc, pub, layout, HistoryLog(nc, pub, s), partition=0, partitions=n)
        times = []
        for _ in range(args.repeat):
            gc.collect()
            t = time.perf_counter()
            floor = await router._rebuild(last)
            times.append(time.perf_counter() - t)
            assert floor == last and len(router.index) == args.waits, (floor, last, len(router.index))
        router.index.clear()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        await router._rebuild(last)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        out["rebuild"] = {"waits_held": args.waits, "registrations_read": args.waits + args.other_waits,
                          "seconds": [round(x, 3) for x in times], "best_s": round(min(times), 3),
                          "bytes_per_wait": round(held / max(1, args.waits), 1)}
        print(f"rebuild of partition 0/{n}: {args.waits:,} waits held, {args.waits + args.other_waits:,} "
              f"registrations read: best {min(times):.2f} s of {args.repeat}; index {held / max(1, args.waits):,.0f} "
              f"bytes per pending wait (tracemalloc)", flush=True)

        if args.hold_all:
            out["held_at_once"] = await hold_all(nc, pub, layout, router, last)

        # Reading the stream: other partitions' events vs own events with no waiter.
        router.handled_seq = last
        for label, keys in (("other_partitions", keys_of(1 % n, n, 50) if n > 1 else mine), ("own_no_waiter", mine)):
            evs: list[tuple[str, bytes, dict[str, str]]] = [
                (s.event(keys[i % len(keys)]), json.dumps({"id": -1 - i}).encode(), {}) for i in range(args.events)]
            await publish_all(pub, evs)
            first = router.handled_seq + 1
            # A gap read proves itself complete by the message after the gap (the one just delivered,
            # when an owner does it): a marker plays that message here.
            last = await pub.publish(s.router_barrier("waits"), b"", {HDR_TTL: "60s"}) - 1
            effects = Effects(nc, pub, s)
            t = time.perf_counter()
            await router._fill(first, last, effects)
            dt = time.perf_counter() - t
            router.handled_seq = last + 1
            out[f"read_{label}"] = {"events": args.events, "seconds": round(dt, 3),
                                    "us_per_event": round(dt / args.events * 1e6, 1)}
            print(f"  reading {args.events:,} events of {label.replace('_', ' ')}: {dt:.2f} s, "
                  f"{dt / args.events * 1e6:.0f} µs each", flush=True)
    finally:
        await pub.close()
        await nc.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waits", type=int, default=100_000, help="pending waits partition 0 holds")
    ap.add_argument("--other-waits", type=int, default=0, help="pending waits of the other partitions")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hold-all", action="store_true",
                    help="then rebuild every other partition too and hold them all at once (e.g. 1,000,000 waits)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    server = EmbeddedServer().start()
    try:
        print(f"{server.durability_line()}; replicas 1; {args.partitions} partitions; {os.cpu_count()} cpus",
              flush=True)
        out = asyncio.run(drive(args, server.url))
        version = ".".join(map(str, server_version(server.binary)))
    finally:
        server.stop()
    out.update({"server": server.durability(), "nats_server": version, "partitions": args.partitions,
                "python": platform.python_version(), "cpus": os.cpu_count()})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
