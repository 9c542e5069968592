"""The router's wait index in process: cost of one event against N pending waits, and bytes per wait.

    python -m benchmarks.router_matching --sizes 100 10000 --json router_matching.json

No server. Fills a :class:`actors.hosting.router.WaitIndex` with N waits on one event key, each
``input.user_id == '<i>'`` (indexable), and times ``matches()`` for an event that matches
none of them: with the index it should not depend on N (target: cost(max N) / cost(min N) ≤ 2).
Then the same with expressions the index cannot read (``... || input.x == 1``), so every
wait is a candidate evaluated with CEL (µs per evaluated wait), an event that matches one
indexed wait (a lookup plus a check of the candidate), the same followed by the
removal of the matched wait (what the router does), and the memory the index retains
per pending wait (tracemalloc; target ≤ 1024 bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Any

from actors.engine.wire import WaitRegistration
from actors.hosting.router import PendingWaitEntry, WaitIndex
from sdk import _cel

KEY = "user:update"
MISS = {"user_id": "nobody"}


def registration(i: int, expression: str) -> WaitRegistration:
    return WaitRegistration(
        op="register", wait_id=f"w{i}", cond=0, run_id=f"r{i}", task="T", event_key=KEY, expression=expression,
    )


def indexable(i: int) -> str:
    return f"input.user_id == '{i}'"


def not_indexable(i: int) -> str:
    return f"input.user_id == '{i}' || input.x == 1"


def build(n: int, expr: Any) -> WaitIndex:
    index = WaitIndex()
    for i in range(n):
        index.add(PendingWaitEntry(registration(i, expr(i)), seq=i))
    assert len(index) == n
    return index


def clear_cel_caches() -> None:
    for fn in (_cel.parsed_equality_predicates, _cel._tree, _cel._compiled):
        fn.cache_clear()


def time_per_call(fn: Any, repeat: int, inner: int) -> list[float]:
    """``repeat`` samples, each the mean seconds of ``inner`` back-to-back calls."""
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t) / inner)
    return samples


def inner_for(budget_s: float, fn: Any) -> int:
    """How many calls make one sample last about ``budget_s``."""
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-7)
    return max(1, int(budget_s / one))


def bench_indexed_miss(n: int, repeat: int) -> dict[str, Any]:
    index = build(n, indexable)

    def one() -> None:
        assert not index.matches(KEY, None, MISS)

    samples = time_per_call(one, repeat, inner_for(0.01, one))
    return {"n": n, "median_us": statistics.median(samples) * 1e6, "min_us": min(samples) * 1e6}


def bench_indexed_hit(n: int, repeat: int) -> dict[str, Any]:
    """Events that each match one wait, cycling over all N ids (so a cache smaller than N misses).

    ``matches()`` does not remove what it finds, so the same waits are matched again
    and again; what is timed is the lookup plus the check of the one candidate.
    """
    index = build(n, indexable)
    payloads = [{"user_id": str(i)} for i in range(n)]
    samples = []
    pos = 0
    per_sample = max(1, min(n, 200))
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(per_sample):
            found = index.matches(KEY, None, payloads[pos])
            pos = (pos + 1) % n
        samples.append((time.perf_counter() - t) / per_sample)
        assert len(found) == 1
    info = _cel.parsed_equality_predicates.cache_info()
    return {
        "n": n, "median_us": statistics.median(samples) * 1e6, "min_us": min(samples) * 1e6,
        "predicate_cache_hits": info.hits, "predicate_cache_misses": info.misses,
        "predicate_cache_max": info.maxsize,
    }


def bench_match_remove(n: int, repeat: int) -> dict[str, Any]:
    """What the router does per matched event: find the wait, remove it; a new wait keeps N steady."""
    per_sample = 100
    fresh = [PendingWaitEntry(registration(n + j, indexable(n + j)), seq=n + j) for j in range(repeat * per_sample)]
    index = build(n, indexable)
    payloads = [{"user_id": str(j)} for j in range(repeat * per_sample)]
    samples = []
    op = 0
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(per_sample):
            for w in index.matches(KEY, None, payloads[op]):
                index.remove(w.cid)
            index.add(fresh[op])
            op += 1
        samples.append((time.perf_counter() - t) / per_sample)
    assert len(index) == n
    return {"n": n, "median_us": statistics.median(samples) * 1e6, "min_us": min(samples) * 1e6}


def bench_scan(n: int, repeat: int) -> dict[str, Any]:
    index = build(n, not_indexable)
    # Compile every expression once (the cache holds up to 1024 programs).
    assert not index.matches(KEY, None, MISS)

    def one() -> None:
        assert not index.matches(KEY, None, MISS)

    samples = time_per_call(one, repeat, inner_for(0.05, one))
    med = statistics.median(samples)
    return {"n": n, "median_us": med * 1e6, "per_wait_us": med * 1e6 / n, "min_us": min(samples) * 1e6}


def bench_memory(n: int) -> dict[str, Any]:
    """Bytes the index retains per wait, registrations (as parsed from messages) dropped."""
    clear_cel_caches()
    gc.collect()
    tracemalloc.start()
    try:
        base0 = tracemalloc.get_traced_memory()[0]
        regs = [registration(i, indexable(i)) for i in range(n)]
        gc.collect()
        base1 = tracemalloc.get_traced_memory()[0]
        index = WaitIndex()
        for i, reg in enumerate(regs):
            index.add(PendingWaitEntry(reg, seq=i))
        del regs, reg
        gc.collect()
        with_caches = tracemalloc.get_traced_memory()[0]
        # The CEL caches are bounded (1024 parse trees, 4096 predicate tuples): not per wait.
        clear_cel_caches()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        assert len(index) == n
    finally:
        tracemalloc.stop()
    del index
    gc.collect()
    return {
        "n": n,
        "bytes_per_wait": (after - base0) / n,
        "bytes_per_wait_incl_cel_caches": (with_caches - base0) / n,
        "bytes_per_wait_brief_method": (after - base1) / n,
        "registration_bytes_each": (base1 - base0) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 10000], help="N for the indexed waits")
    ap.add_argument("--scan-sizes", type=int, nargs="+", default=[100, 1000], help="N for non-indexable waits")
    ap.add_argument("--memory-waits", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=200, help="timing samples per case (median reported)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()

    bench_indexed_miss(args.sizes[0], 20)  # warm-up, discarded
    miss = [bench_indexed_miss(n, args.repeat) for n in args.sizes]
    hit = []
    for n in args.sizes:
        _cel.parsed_equality_predicates.cache_clear()
        hit.append(bench_indexed_hit(n, max(10, args.repeat // 10)))
    removal = [bench_match_remove(n, 20) for n in args.sizes]
    scan = [bench_scan(n, max(5, args.repeat // 20)) for n in args.scan_sizes]
    mem = bench_memory(args.memory_waits)

    lo, hi = miss[0], miss[-1]
    ratio = hi["median_us"] / lo["median_us"]
    hit_ratio = hit[-1]["median_us"] / hit[0]["median_us"]

    print("indexed waits, event matching none (median µs per event):")
    for r in miss:
        print(f"  N={r['n']:>7,}: {r['median_us']:8.3f} µs   (min {r['min_us']:.3f})")
    print(f"  cost(N={hi['n']:,}) / cost(N={lo['n']:,}) = {ratio:.2f}   (target ≤ 2)")
    print("indexed waits, event matching one, cycling over all ids (median µs per event):")
    for r in hit:
        print(f"  N={r['n']:>7,}: {r['median_us']:8.3f} µs   (min {r['min_us']:.3f}); "
              f"predicate cache hits {r['predicate_cache_hits']:,} misses {r['predicate_cache_misses']:,} "
              f"(max size {r['predicate_cache_max']:,})")
    print(f"  cost(N={hit[-1]['n']:,}) / cost(N={hit[0]['n']:,}) = {hit_ratio:.2f}")
    print("indexed waits, event matching one, then the wait removed and a new one added (the router's work):")
    for r in removal:
        print(f"  N={r['n']:>7,}: {r['median_us']:8.3f} µs   (min {r['min_us']:.3f})")
    removal_ratio = removal[-1]["median_us"] / removal[0]["median_us"]
    print(f"  cost(N={removal[-1]['n']:,}) / cost(N={removal[0]['n']:,}) = {removal_ratio:.2f}")
    print("non-indexable waits (every wait a candidate, CEL evaluated), event matching none:")
    for r in scan:
        print(f"  N={r['n']:>7,}: {r['median_us'] / 1000:8.3f} ms per event, "
              f"{r['per_wait_us']:.2f} µs per evaluated wait")
    print(f"memory, {mem['n']:,} indexed waits: {mem['bytes_per_wait']:.0f} bytes per wait retained "
          f"(target ≤ 1024)")
    print(f"  incl. CEL caches still full: {mem['bytes_per_wait_incl_cel_caches']:.0f} B/wait; "
          f"baseline taken after building the registrations (their release offsets it): "
          f"{mem['bytes_per_wait_brief_method']:.0f} B/wait; "
          f"one parsed WaitRegistration: {mem['registration_bytes_each']:.0f} B")

    out: dict[str, Any] = {
        "indexed_miss": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in miss],
        "indexed_miss_ratio": round(ratio, 3),
        "indexed_hit": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in hit],
        "indexed_hit_ratio": round(hit_ratio, 3),
        "match_remove": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in removal],
        "match_remove_ratio": round(removal_ratio, 3),
        "scan": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in scan],
        "memory": {k: round(v, 1) if isinstance(v, float) else v for k, v in mem.items()},
        "targets": {"indexed_miss_ratio_max": 2, "bytes_per_wait_max": 1024},
        "python": platform.python_version(),
        "server": None,  # in-process matching only: no server, so no sync setting or replicas
    }
    print("server: none (in-process matching; no sync setting or replicas apply)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
