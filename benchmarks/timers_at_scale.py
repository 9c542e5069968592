"""Timers at scale: N durable runs asleep at once, all due within the same second; how late do they wake?

    python -m benchmarks.timers_at_scale --runs 10000 --json timers.json
    python -m benchmarks.timers_at_scale --runs 1000,10000,100000   # one fresh server per N

Starts its own nats-server and one worker (``bide worker benchmarks.scale_apps:worker
--durable-slots S --processes P``: P from ``--worker-processes``, default 1, each process with S
durable slots; the CPU per run reported as ``worker`` is the sum over the P processes, each also
as ``worker_I``). For each N, picks a due second T (``--lead`` seconds ahead, enough to start
every run first) and starts N ``BenchSleepUntil`` runs as fast as the driver can (200 starts in
flight), run i sleeping until T + i/N * ``--spread`` s with ``ctx.aio_sleep_until`` (the
absolute time is in its input). Every run is asleep (its timer published, its activation
acked) long before T; then the driver waits for every result and reads every history:

* lateness: ``sleep_fired.at`` (the time the turn recorded the fire) - ``sleep_scheduled.wake_at``;
* completed: the JetStream time of the run's final append - ``wake_at``;
* result seen: the result arriving on the driver's result inbox - ``wake_at``.

Each result is awaited as ``task.aio_run`` awaits it (the starter's result inbox, filled by the
host that ends the run), without ``aio_run``'s fallback that re-reads each history every few
seconds: with N runs asleep that would be N reads every few seconds while they sleep. A result
the inbox lost is read from the history at the end (and counted).
"Asleep at once" is the most runs between their ``sleep_scheduled`` append and their fire at
any moment (from the histories). A sleep's timer fires up to 5 s early
(``actors.engine.replay.sleep_lead``) and its host waits out the last stretch with its durable
slot lent back, at most ten times ``--durable-slots`` of them at once. On the 2-core development machine N=10,000
takes under a minute and N=100,000 took 4 minutes: 52 s to start and park them all, 105 s of
lead in all, 77 s of firing, 42 s to read the histories.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from actors.engine.wire import Subjects, parse_time
from actors.store.jetstream import api_request
from benchmarks.common import Stack, machine, ms_list, poll_until, stack, summary_ms, write_json
from benchmarks.event_latency import gather_limited

START_CONCURRENCY = 200
TASK = "BenchSleepUntil"


class Sleepers:
    """N runs started with the SDK's start path and a result-inbox future each (see the module docstring)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.wake_at: dict[str, datetime] = {}
        self.results: dict[str, asyncio.Future[Any]] = {}
        self.arrived: dict[str, float] = {}

    async def start(self, wake_at: datetime) -> None:
        from sdk.runs import StartRequest, new_run_id, start_run

        rid = new_run_id()
        self.wake_at[rid] = wake_at
        fut = self.conn.results.expect(rid)
        fut.add_done_callback(lambda _f: self.arrived.setdefault(rid, time.time()))
        self.results[rid] = fut
        req = StartRequest(task=TASK, durable=True, input={"wake_at": wake_at.isoformat()}, run_id=rid, new_id=True)
        await start_run(self.conn, req, notify=self.conn.results.subject(rid))

    async def results_in(self, timeout: float) -> int:
        """Wait for every result on the inbox; how many never came (those are read from the history)."""
        pending = [f for f in self.results.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        missing = [rid for rid, f in self.results.items() if not f.done()]
        for rid in missing:
            self.conn.results.forget(rid)
        return len(missing)


async def work_idle(nc: Any) -> bool:
    """Every activation of the task has been delivered and acked (each acked start = a run asleep)."""
    s = Subjects()
    info = await api_request(nc, f"$JS.API.CONSUMER.INFO.{s.queue_stream}.{s.consumer_name(TASK)}", {})
    return int(info.get("num_pending", 1)) == 0 and int(info.get("num_ack_pending", 1)) == 0


def asleep_at_once(spans: list[tuple[float, float]]) -> int:
    """The most intervals (asleep from, fired at) open at one moment: a sweep over their ends."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def lateness(hists: list[Any], arrived: dict[str, float]) -> dict[str, Any]:
    """Per run, from its history: fired - due, completed (stored) - due, result seen - due, asleep span."""
    fired, stored, seen, spans, early_start = [], [], [], [], 0
    for h in hists:
        sched = next(e for e in h.entries if e.k == "sleep_scheduled")
        fire = next(e for e in h.entries if e.k == "sleep_fired")
        due = sched.wake_at.timestamp()
        i_sched = next(i for i, e in enumerate(h.entries) if e.k == "sleep_scheduled")
        asleep_from = parse_time(h.times[i_sched]).timestamp()
        early_start += asleep_from < due
        fired.append(fire.at.timestamp() - due)
        stored.append(parse_time(h.times[-1]).timestamp() - due)
        if h.run_id in arrived:
            seen.append(arrived[h.run_id] - due)
        spans.append((asleep_from, fire.at.timestamp()))
    return {"fired": fired, "stored": stored, "seen": seen, "spans": spans, "asleep_before_due": early_start}


async def one_size(bide: Any, st: Stack, n: int, lead: float, spread: float) -> dict[str, Any]:
    """Start N sleepers due within one second of T, wait for all, read every history."""
    conn = await bide._pool.get()
    sleepers = Sleepers(conn)
    t_due = datetime.now(UTC) + timedelta(seconds=lead)
    t0 = time.perf_counter()
    await gather_limited([sleepers.start(t_due + timedelta(seconds=spread * i / n)) for i in range(n)],
                         START_CONCURRENCY)
    started_s = time.perf_counter() - t0
    await poll_until(lambda: work_idle(conn.nc), "every run to be asleep", lead + 600, st.worker, interval=0.2)
    asleep_s = time.perf_counter() - t0
    margin = (t_due - datetime.now(UTC)).total_seconds()
    print(f"  {n:,} runs started in {started_s:.1f} s ({n / started_s:,.0f}/s), all asleep after {asleep_s:.1f} s, "
          f"{margin:.1f} s before the first is due", flush=True)
    if margin < 0.5:
        print(f"  warning: the runs were not all asleep before they were due: raise --lead above {lead:g}", flush=True)
    wait_s = max(0.0, margin) + spread + 60 + n / 200
    cpu0 = st.cpu()
    missing = await sleepers.results_in(wait_s)
    done_s = time.perf_counter() - t0
    cpu = {k: round((v - cpu0[k]) * 1e6 / n) for k, v in st.cpu().items()}
    hists = await gather_limited([bide.runs.aio_history(r) for r in sleepers.results], 64)
    read_s = time.perf_counter() - t0 - done_s
    bad = [h.run_id for h in hists if h.terminal is None or h.terminal.k != "run_completed"]
    assert not bad, f"{len(bad)} runs did not complete, e.g. {bad[:3]}"
    late = lateness(hists, sleepers.arrived)
    return {
        "runs": n, "lead_s": lead, "spread_s": spread,
        "start_s": round(started_s, 2), "starts_per_s": round(n / started_s, 1),
        "all_asleep_s": round(asleep_s, 2), "margin_before_due_s": round(margin, 2),
        "asleep_at_once": asleep_at_once(late["spans"]), "asleep_before_due": late["asleep_before_due"],
        "results_missing_on_inbox": missing, "history_read_s": round(read_s, 1),
        "cpu_us_per_run_asleep_to_done": cpu,
        "lateness": summary_ms(late["fired"]), "completed": summary_ms(late["stored"]),
        "result_seen": summary_ms(late["seen"]),
        "lateness_ms": ms_list(late["fired"], 1), "result_seen_ms": ms_list(late["seen"], 1),
    }


async def warm_up(bide: Any, st: Stack) -> None:
    """A few sleepers to completion first (connections, consumers, the code paths), not reported."""
    await one_size(bide, st, 50, lead=2.0, spread=0.2)


async def drive(st: Stack, n: int, lead: float, spread: float) -> dict[str, Any]:
    from sdk import Bide

    bide = Bide(st.server.url)  # a client of this N's server (each N has a fresh one)
    try:
        await warm_up(bide, st)
        print(f"N={n:,}: due in {lead:g} s, spread over {spread:g} s, {len(st.worker_pids)} worker process(es)",
              flush=True)
        return await one_size(bide, st, n, lead, spread)
    finally:
        await bide.aclose()


def auto_lead(n: int) -> float:
    """Seconds ahead to set the due time: room to start and park N runs at 1,000/s (2,800/s measured on 2 cores)."""
    return round(5 + n / 1000, 1)


def report(rows: list[dict[str, Any]]) -> None:
    print()
    print(f"{'N':>8} {'asleep':>8} {'starts/s':>9} {'late p50':>9} {'p99':>8} {'max':>8} "
          f"{'result p50':>11} {'p99':>8} {'max':>8}")
    for r in rows:
        lt, rs = r["lateness"], r["result_seen"]
        print(f"{r['runs']:>8,} {r['asleep_at_once']:>8,} {r['starts_per_s']:>9,.0f} {lt['p50_ms']:>7.0f}ms "
              f"{lt['p99_ms']:>6.0f}ms {lt['max_ms']:>6.0f}ms {rs.get('p50_ms', float('nan')):>9.0f}ms "
              f"{rs.get('p99_ms', float('nan')):>6.0f}ms {rs.get('max_ms', float('nan')):>6.0f}ms")
    print("late: sleep_fired.at - wake_at (the turn resumed the code); result: the result on the driver's "
          "result inbox - wake_at; asleep: most runs asleep at one moment")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="10000", help="N, or comma-separated Ns (a fresh server for each)")
    ap.add_argument("--spread", type=float, default=1.0, help="due times spread evenly over this many seconds")
    ap.add_argument("--lead", type=float, default=None, help="seconds from the first start to the first due "
                    "time (default: 5 + N/1000)")
    ap.add_argument("--durable-slots", type=int, default=1000, help="the worker's durable slots (SDK default 1000)")
    ap.add_argument("--worker-processes", type=int, default=1, metavar="N",
                    help="host processes (bide worker --processes N; default 1); each has --durable-slots")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()
    if args.worker_processes < 1:
        ap.error(f"--worker-processes must be at least 1, got {args.worker_processes}")
    sizes = [int(x) for x in args.runs.split(",")]
    if not sizes or min(sizes) < 1:
        ap.error("--runs: positive run counts")

    info = machine()
    rows: list[dict[str, Any]] = []
    described: dict[str, Any] = {}
    for n in sizes:
        with stack("--durable-slots", str(args.durable_slots), processes=args.worker_processes) as st:
            lead = args.lead if args.lead is not None else auto_lead(n)
            rows.append(asyncio.run(drive(st, n, lead, args.spread)))
            described = st.describe()
            durability = st.server.durability_line()
        r = rows[-1]
        print(f"  lateness p50 {r['lateness']['p50_ms']:.0f} ms, p99 {r['lateness']['p99_ms']:.0f} ms, "
              f"max {r['lateness']['max_ms']:.0f} ms; {r['asleep_at_once']:,} asleep at once", flush=True)
    print(durability)
    report(rows)
    write_json(args.json, {"benchmark": "timers_at_scale", "machine": info, **described,
                           "durable_slots": args.durable_slots, "worker_processes": args.worker_processes,
                           "rows": rows})


if __name__ == "__main__":
    main()
