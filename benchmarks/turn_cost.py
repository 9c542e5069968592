"""Turn cost vs history length: one durable run taking K turns, each resumed from its whole history.

    python -m benchmarks.turn_cost --ks 10,100,1000 --json turn_cost.json

Starts its own nats-server and one worker process (``bide worker benchmarks.scale_apps:worker``).
For each K, one ``BenchTurns`` run waits K times for a direct-delivery event; every wait
evicts the run, so every turn reads the run's history, replays the code through every earlier
wait and appends. The driver sends one event at a time (``bide.event.aio_send``) and times

* turn: the send's start -> the append that parks the run at its next wait (or ends it), seen
  on a core subscription to the run's history subject (driver clock);
* wake: the send's start -> the turn's ``activation`` entry (the host has read and decoded the
  history); replay: ``activation`` -> the next ``wait_registered`` entry (the claim of the
  signal appended, the code replayed); host and driver clocks are this machine's one clock.

Reported per K: the K-th turn, the mean of the last 10 turns, the total, and the history's
size; plus (K-th turn at the largest K) / (10th turn of that run), and the same for the
means of the last 10 and first 10 turns. Every turn's time is in the JSON (``turn_ms``).
This is the cost a per-run history cache would remove: without one it grows with K, so the
total grows with K². K=1000 takes about a minute on a 2-core machine; 10,000 about 100 times that.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from actors.engine.run_history import RunHistory
from actors.engine.wire import ActivationBegun, HistoryEntry, WaitRegistered, WaitResolved
from benchmarks.common import HistoryWatch, machine, ms_list, stack, summary_ms, write_json

WARMUP_TURNS = 20


def turn_done(next_pos: int, last: bool) -> Callable[[HistoryEntry], bool]:
    """The entry that ends a turn: the next wait registered, or the run's end after the last turn."""
    if last:
        return lambda e: e.k == "run_completed"
    return lambda e: isinstance(e, WaitRegistered) and e.pos == next_pos


async def one_run(bide: Any, nc: Any, k: int, timeout: float, progress: bool) -> dict[str, Any]:
    """K turns of one run, one event at a time; per-turn times from the driver and the history."""
    from benchmarks.scale_apps import TURN_EVENT, bench_turns
    from sdk.runs import new_run_id

    rid = new_run_id()
    watch = await HistoryWatch().open(nc, rid)
    try:
        ref = await bench_turns.aio_run_no_wait({"k": k}, run_id=rid)
        await watch.until(turn_done(0, last=False), timeout)
        turns: list[float] = []
        sends: list[float] = []
        sent_wall: list[float] = []
        t_run = time.perf_counter()
        for i in range(k):
            sent_wall.append(time.time())
            t0 = time.perf_counter()
            await bide.event.aio_send(rid, TURN_EVENT, {"i": i})
            sends.append(time.perf_counter() - t0)
            turns.append(await watch.until(turn_done(i + 1, i + 1 == k), timeout) - t0)
            if progress and (i + 1) % max(1, k // 10) == 0:
                print(f"    turn {i + 1}/{k}: {turns[-1] * 1000:.1f} ms", flush=True)
        total = time.perf_counter() - t_run
        assert await ref.aio_result(timeout=timeout) == {"turns": k}
    finally:
        await watch.close()
    hist = await bide.runs.aio_history(rid)
    return summarize(k, turns, sends, total, hist_split(hist, sent_wall), hist)


def hist_split(hist: RunHistory, sent_wall: list[float]) -> dict[str, list[float]]:
    """Per turn, from the history: send -> ``activation`` (wake) and ``activation`` -> next wait (replay).

    Turn i resolves the wait at position i - 1; its ``activation`` entry is the last one before that
    ``wait_resolved`` (a turn that lost a race and was retried leaves an extra ``activation``).
    """
    assert hist.terminal is not None
    regs = {e.pos: e.at.timestamp() for e in hist.entries if isinstance(e, WaitRegistered)}
    end = hist.terminal.at.timestamp()
    wake, replay = [], []
    act = 0.0
    for e in hist.entries:
        if isinstance(e, ActivationBegun):
            act = e.at.timestamp()
        elif isinstance(e, WaitResolved):
            wake.append(act - sent_wall[e.pos])
            replay.append(regs.get(e.pos + 1, end) - act)
    return {"wake": wake, "replay": replay}


def messages(hist: RunHistory) -> int:
    """How many history messages (appends) the run has: its entries' stored times change at each."""
    return sum(1 for i, t in enumerate(hist.times) if i == 0 or t != hist.times[i - 1])


def summarize(k: int, turns: list[float], sends: list[float], total: float, split: dict[str, list[float]],
              hist: RunHistory) -> dict[str, Any]:
    last10 = turns[-10:]
    return {
        "k": k,
        "kth_turn_ms": round(turns[-1] * 1000, 2),
        "tenth_turn_ms": round(turns[9] * 1000, 2) if k >= 10 else None,
        "last10_mean_ms": round(statistics.fmean(last10) * 1000, 2),
        "first10_mean_ms": round(statistics.fmean(turns[:10]) * 1000, 2),
        "last10_wake_mean_ms": round(statistics.fmean(split["wake"][-10:]) * 1000, 2),
        "last10_replay_mean_ms": round(statistics.fmean(split["replay"][-10:]) * 1000, 2),
        "total_s": round(total, 3),
        "turns": summary_ms(turns),
        "send_call": summary_ms(sends),
        "history": {"entries": len(hist.entries), "messages": messages(hist), "bytes": hist.size_bytes},
        "turn_ms": ms_list(turns),
        "wake_ms": ms_list(split["wake"]),
        "replay_ms": ms_list(split["replay"]),
    }


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How much dearer the last turns of the longest run are than its first ones."""
    big = rows[-1]
    if big["k"] < 10:
        return {}
    turns = big["turn_ms"]
    return {
        "k": big["k"],
        "kth_over_10th": round(turns[-1] / turns[9], 2),
        "last10_over_first10_mean": round(big["last10_mean_ms"] / big["first10_mean_ms"], 2),
    }


async def drive(ks: list[int], timeout: float, progress: bool) -> list[dict[str, Any]]:
    import nats

    from benchmarks.scale_apps import bide

    nc = await nats.connect(bide.config.nats_url)
    rows = []
    try:
        await one_run(bide, nc, WARMUP_TURNS, timeout, progress=False)
        for k in ks:
            print(f"K={k}: one run, {k} turns", flush=True)
            row = await one_run(bide, nc, k, timeout, progress and k >= 1000)
            rows.append(row)
            print(f"  K-th turn {row['kth_turn_ms']:.1f} ms, mean of the last 10 {row['last10_mean_ms']:.1f} ms "
                  f"(wake {row['last10_wake_mean_ms']:.1f}, replay {row['last10_replay_mean_ms']:.1f}), "
                  f"total {row['total_s']:.2f} s, history {row['history']['entries']} entries / "
                  f"{row['history']['bytes'] / 1024:.0f} KiB", flush=True)
    finally:
        await nc.close()
        await bide.aclose()
    return rows


def report(rows: list[dict[str, Any]], rat: dict[str, Any]) -> None:
    print()
    print(f"{'K':>7} {'K-th turn':>10} {'last 10':>9} {'wake':>8} {'replay':>8} {'p50':>8} {'total':>9} "
          f"{'history':>10}")
    for r in rows:
        print(f"{r['k']:>7,} {r['kth_turn_ms']:>8.1f}ms {r['last10_mean_ms']:>7.1f}ms "
              f"{r['last10_wake_mean_ms']:>6.1f}ms {r['last10_replay_mean_ms']:>6.1f}ms "
              f"{r['turns']['p50_ms']:>6.1f}ms {r['total_s']:>8.2f}s {r['history']['bytes'] / 1024:>7.0f}KiB")
    if rat:
        print(f"K={rat['k']:,}: K-th turn / 10th turn = {rat['kth_over_10th']:.2f}; mean of the last 10 / "
              f"first 10 turns = {rat['last10_over_first10_mean']:.2f}")
    print("turn: send -> the append parking the run again (driver); wake: send -> activation entry; "
          "replay: activation -> next wait_registered (the last two are means of the last 10 turns)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="10,100,1000", help="comma-separated turn counts, one run each")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds one turn may take before giving up")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    ks = sorted(int(x) for x in args.ks.split(","))
    if not ks or ks[0] < 1:
        ap.error("--ks: positive turn counts")

    info = machine()
    with stack() as st:
        rows = asyncio.run(drive(ks, args.timeout, not args.no_progress))
        described = st.describe()
        print(st.server.durability_line())
    rat = ratios(rows)
    report(rows, rat)
    write_json(args.json, {"benchmark": "turn_cost", "machine": info, **described, "ks": ks, "rows": rows,
                           "ratio": rat})


if __name__ == "__main__":
    main()
