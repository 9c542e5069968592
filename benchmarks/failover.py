"""A 3-node cluster at R3: throughput next to a single server, and the time to recover from losing a stream leader.

    python -m benchmarks.failover --json failover.json
    python -m benchmarks.failover --hosts 1,2,4 --trials 3 --rate 50

1. Throughput: ``benchmarks.throughput`` (its worker, its driver, its raw publish rate) against
   a single server and against a 3-node cluster (``local_cluster``, streams at 3 replicas),
   one after the other in this run, each as its own process with ``--url``.
2. Failover: on the cluster, with H host processes and a driver starting trivial durable runs
   at a steady rate, SIGKILL the node that leads the queue (BIDE_QUEUE) or history stream (of those, the
   one that leads the most Bide streams). Measured from the kill: the first run whose result
   arrives and whose completion was appended after the kill, and the moment the completion
   rate over a 1 s window is back to half the rate before the kill. The node is restarted and
   the cluster is healthy again (every stream led, every replica current) before the next trial.
3. Every run the driver started is checked in its history at the end: a lost or doubled run
   is a finding, printed with its run id and what its history holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats

from actors.store.server import EmbeddedServer, SyncSetting, jetstream_answers
from benchmarks.chaos_cluster import Servers
from benchmarks.event_latency import WorkerProc
from benchmarks.failover_driver import Driver, check_runs, first_completion_after, needed, rate_back_at

REPO = Path(__file__).resolve().parent.parent
REPLICAS = 3
WORKER = "benchmarks.apps:worker"


# -- 1. throughput, single server and cluster -----------------------------------------------------------


def throughput(url: str, replicas: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``python -m benchmarks.throughput --url URL --replicas R`` in a child process: its JSON."""
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--url", url, "--replicas", str(replicas),
           "--runs", str(args.tp_runs), "--concurrency", str(args.tp_concurrency), "--warmup", str(args.tp_warmup),
           "--publish-messages", str(args.tp_publish), "--no-progress", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600)
    d: dict[str, Any] = json.loads(out.read_text())
    return {k: d[k] for k in ("runs", "concurrency", "errors", "runs_per_s", "p50_ms", "p99_ms",
                              "jetstream_publish_per_s", "nats_server")}


# -- 2. the cluster: leaders and health -----------------------------------------------------------------


async def stream_leaders(js: Any) -> dict[str, str | None]:
    """Each Bide stream's leader (``STREAM.INFO``'s ``cluster.leader``)."""
    return {i.config.name: i.cluster.leader if i.cluster else None
            for i in await js.streams_info() if i.config.name.startswith("BIDE_")}


async def work_consumer_leaders(js: Any) -> dict[str, str | None]:
    """Each task consumer's leader on the queue runs start from: a consumer is its own replicated group,
    led apart from its stream."""
    return {c.name: c.cluster.leader if c.cluster else None for c in await js.consumers_info("BIDE_QUEUE")}


async def elected_after(js: Any, streams: list[str], kill_wall: float) -> dict[str, float | None]:
    """Seconds from the kill to each stream's new leader (``cluster.leader_since``): the servers' share."""
    out: dict[str, float | None] = {}
    for name in streams:
        try:
            since = (await js.stream_info(name)).cluster.leader_since
        except Exception:
            since = None
        out[name] = round(since.timestamp() - kill_wall, 3) if since is not None else None
    return out


def choose_victim(leaders: dict[str, str | None]) -> str:
    """The node leading the queue or history stream; of those, the one that leads the most Bide streams."""
    counts: dict[str, int] = {}
    for leader in leaders.values():
        if leader:
            counts[leader] = counts.get(leader, 0) + 1
    candidates = {leaders.get("BIDE_QUEUE"), leaders.get("BIDE_HISTORY")} - {None}
    if not candidates:
        raise RuntimeError(f"neither BIDE_QUEUE nor BIDE_HISTORY has a leader: {leaders}")
    return max(sorted(c for c in candidates if c), key=lambda n: (counts.get(n, 0), n == leaders.get("BIDE_QUEUE")))


async def healthy(js: Any, nodes: int) -> bool:
    """Every Bide stream and work consumer has a leader and all its other replicas current."""
    try:
        infos = [i for i in await js.streams_info() if i.config.name.startswith("BIDE_")]
        groups = [i.cluster for i in infos]
        for stream in ("BIDE_QUEUE", "BIDE_WORK"):
            if any(i.config.name == stream for i in infos):
                groups += [c.cluster for c in await js.consumers_info(stream)]
    except Exception:
        return False
    for c in groups:
        if c is None or not c.leader:
            return False
        peers = c.replicas or []
        if len(peers) != nodes - 1 or any(p.offline or not p.current for p in peers):
            return False
    return bool(infos)


async def cluster_up(servers: Servers) -> float:
    async def every_node() -> bool:
        return all([await jetstream_answers(n.url) for n in servers.nodes])

    return await wait_for(every_node, 60, "JetStream on every node of the cluster")


async def wait_for(cond: Any, timeout: float, what: str, every: float = 0.1) -> float:
    """Poll ``cond`` (async, no arguments) until true; seconds it took. ``TimeoutError`` names ``what``."""
    t0 = time.monotonic()
    while not await cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(every)
    return time.monotonic() - t0


# -- 2. trials ------------------------------------------------------------------------------------------


async def trial(servers: Servers, js: Any, driver: Driver, args: argparse.Namespace) -> dict[str, Any]:
    """Steady flow, SIGKILL the chosen leader's node, wait for the rate to come back, restart, wait healthy."""
    w: float = args.steady_window
    since = time.monotonic()

    async def steady() -> bool:
        now = time.monotonic()
        return now - since >= w and driver.completions_between(now - w, now) >= 0.8 * driver.rate * w

    await wait_for(steady, 120, "a steady completion rate before the kill")
    leaders = await stream_leaders(js)
    consumers = await work_consumer_leaders(js)
    victim = choose_victim(leaders)
    i = servers.index_of(victim)
    assert i is not None, victim
    t_kill, kill_wall = time.monotonic(), time.time()
    servers.kill(i)
    pre_rate = driver.completions_between(t_kill - w, t_kill) / w
    need = needed(pre_rate, args.recovery_window)

    async def back() -> bool:
        return rate_back_at(driver.arrivals, t_kill, need, args.recovery_window) is not None

    recovered = True
    try:
        await wait_for(back, args.trial_timeout, f"half the completion rate after killing {victim}")
    except TimeoutError:
        recovered = False
    back_at = rate_back_at(driver.arrivals, t_kill, need, args.recovery_window)
    led = sorted(s for s, n in leaders.items() if n == victim)
    elected = await elected_after(js, led, kill_wall)
    await asyncio.to_thread(servers.restart, i)
    t_restart = time.monotonic()
    health_s = await wait_for(lambda: healthy(js, len(servers.nodes)), 120,
                              f"the cluster healthy after {victim} restarted")
    return {"victim": victim, "victim_led": led, "leaders": leaders, "new_leader_elected_after_s": elected,
            "victim_led_work_consumers": sorted(c for c, n in consumers.items() if n == victim),
            "leaders_after": await stream_leaders(js), "pre_kill_rate_per_s": round(pre_rate, 1),
            "rate_back_50pct_s": round(back_at - t_kill, 3) if back_at is not None else None, "recovered": recovered,
            "killed_for_s": round(t_restart - t_kill, 2), "healthy_after_restart_s": round(health_s, 2),
            "_t_kill": t_kill, "_kill_wall": kill_wall}


async def with_hosts(servers: Servers, js: Any, client: Any, task: Any, hosts: int,
                     args: argparse.Namespace) -> tuple[dict[str, Any], Driver]:
    """H host processes, a driver, ``--trials`` kills; then the first completion after each kill."""
    procs = [WorkerProc(servers.url, WORKER) for _ in range(hosts)]
    try:
        for p in procs:
            await asyncio.to_thread(p.wait_ready)
        driver = Driver(task, args.rate, args.in_flight, prefix=f"fo-h{hosts}")
        driver.start()
        trials = []
        for n in range(args.trials):
            t = await trial(servers, js, driver, args)
            print(f"  H={hosts} trial {n + 1}: killed {t['victim']} (led {', '.join(t['victim_led'])}; work "
                  f"consumers {', '.join(t['victim_led_work_consumers']) or 'none'}); "
                  f"rate back to 50 % after {t['rate_back_50pct_s']} s; healthy {t['healthy_after_restart_s']} s "
                  "after the restart", flush=True)
            trials.append(t)
        unfinished = await driver.stop(args.drain_timeout)
    finally:
        for p in procs:
            await asyncio.to_thread(p.stop)
    for t in trials:
        t["first_completion"] = await first_completion_after(client, driver, t.pop("_t_kill"), t.pop("_kill_wall"))
    firsts = [t["first_completion"]["s"] for t in trials if t["first_completion"]]
    backs = [t["rate_back_50pct_s"] for t in trials if t["rate_back_50pct_s"] is not None]
    # Split by whether the node killed also led the driven task's work consumer (its own group).
    consumer = f"task_{task.name}"
    split = {key: [t["first_completion"]["s"] for t in trials if t["first_completion"]
                   and (consumer in t["victim_led_work_consumers"]) == led]
             for key, led in (("consumer_leader_killed", True), ("consumer_leader_kept", False))}
    row = {"hosts": hosts, "runs_started": len(driver.runs), "unfinished_at_drain": unfinished,
           "start_or_wait_retries": sum(r.retries for r in driver.runs.values()),
           "first_completion_s": summary(firsts, len(trials)), "rate_back_50pct_s": summary(backs, len(trials)),
           "first_completion_by_work_consumer_s": {k: summary(v, len(v)) for k, v in split.items()},
           "trials": trials}
    return row, driver


def summary(values: list[float], trials: int) -> dict[str, Any]:
    return {"p50": round(statistics.median(values), 3) if values else None,
            "max": round(max(values), 3) if values else None, "of_trials": trials, "measured": len(values)}


async def failover(servers: Servers, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from benchmarks.apps import bench_trivial, bide  # made at import from BIDE_NATS_URL / BIDE_REPLICAS

    nc = await nats.connect(servers.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.25)
    js = nc.jetstream()
    rows, runs = [], []
    try:
        for h in args.hosts:
            print(f"failover: {h} host process(es), {args.rate:g} runs/s, {args.trials} trial(s)", flush=True)
            row, driver = await with_hosts(servers, js, bide, bench_trivial, h, args)
            rows.append(row)
            runs += list(driver.runs.values())
        checked = await check_runs(bide, runs)
    finally:
        await bide.aclose()
        await nc.close()
    return rows, checked


class CountedWarnings(logging.Handler):
    """The driver's client warnings (retried starts while a stream has no leader): counted, a few kept."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.name] += 1
        if len(self.samples) < 5:
            self.samples.append(record.getMessage()[:200])


# -- main -----------------------------------------------------------------------------------------------


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", default="1,2,4", help="host process counts to measure failover with (default 1,2,4)")
    ap.add_argument("--trials", type=int, default=3, help="kills per host count (default 3)")
    ap.add_argument("--rate", type=float, default=50.0, help="runs the driver starts per second (default 50)")
    ap.add_argument("--in-flight", type=int, default=2000, help="most runs started and not finished (default 2000)")
    ap.add_argument("--ack-wait", type=float, default=3.0, help="hosts' ack wait, seconds (BIDE_ACK_WAIT, default 3)")
    ap.add_argument("--steady-window", type=float, default=3.0, help="seconds of steady flow before each kill")
    ap.add_argument("--recovery-window", type=float, default=1.0, help="window of the completion rate after a kill")
    ap.add_argument("--trial-timeout", type=float, default=90.0, help="most seconds to wait for the rate to come back")
    ap.add_argument("--drain-timeout", type=float, default=120.0, help="most seconds to wait for runs in flight")
    ap.add_argument("--tp-runs", type=int, default=3000, help="throughput: runs per side (default 3000)")
    ap.add_argument("--tp-concurrency", type=int, default=500, help="throughput: runs in flight (default 500)")
    ap.add_argument("--tp-warmup", type=int, default=300)
    ap.add_argument("--tp-publish", type=int, default=20000, help="throughput: raw publishes per side")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()
    try:
        args.hosts = [int(x) for x in args.hosts.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--hosts {args.hosts!r}: expected comma-separated host counts such as 1,2,4")
    if not args.hosts or min(args.hosts) < 1:
        ap.error(f"--hosts {args.hosts!r}: expected host counts of at least 1")
    for name in ("trials", "rate", "in_flight"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive number")
    return args


def main() -> None:
    args = parse()
    sync = SyncSetting.from_env()
    os.environ.update({"BIDE_REPLICAS": str(REPLICAS), "BIDE_ACK_WAIT": str(args.ack_wait)})
    t0 = time.monotonic()
    out: dict[str, Any] = {"settings": {
        "nodes": 3, "replicas": REPLICAS, "sync": str(sync), "ack_wait_s": args.ack_wait, "hosts": args.hosts,
        "trials": args.trials, "rate_per_s": args.rate, "in_flight": args.in_flight,
        "steady_window_s": args.steady_window, "recovery_window_s": args.recovery_window,
        "throughput": {"runs": args.tp_runs, "in_flight": args.tp_concurrency, "hosts": 1}},
        "python": platform.python_version(), "cpus": os.cpu_count(), "loadavg_at_start": list(os.getloadavg())}
    warnings = CountedWarnings()
    logging.getLogger().addHandler(warnings)  # the driver's retries would flood the output
    print(f"servers: sync {sync}; cluster: 3 nodes, streams at R{REPLICAS}; ack wait {args.ack_wait:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bide-failover-") as tmp:
        work = Path(tmp)
        servers = Servers(work, cluster=True)
        servers.start()
        try:
            asyncio.run(cluster_up(servers))
            if not args.skip_throughput:
                with EmbeddedServer(store_dir=work / "single") as single:
                    one = throughput(single.url, 1, args, work / "single.json")
                many = throughput(servers.url, REPLICAS, args, work / "cluster.json")
                out["throughput"] = {"single": one, "cluster_r3": many,
                                     "cluster_over_single": round(many["runs_per_s"] / one["runs_per_s"], 3)}
            os.environ["BIDE_NATS_URL"] = servers.url
            out["failover"], out["runs"] = asyncio.run(failover(servers, args))
        finally:
            servers.stop()
    out["driver_warnings"] = {"by_logger": dict(warnings.counts), "first": warnings.samples}
    out["wall_s"] = round(time.monotonic() - t0, 1)
    report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


def report(out: dict[str, Any]) -> None:
    s = out["settings"]
    print(f"settings: {s['nodes']} nodes, R{s['replicas']}, sync {s['sync']}, ack wait {s['ack_wait_s']:g} s, "
          f"driver {s['rate_per_s']:g} runs/s with at most {s['in_flight']} in flight")
    if "throughput" in out:
        tp, one, many = out["throughput"], out["throughput"]["single"], out["throughput"]["cluster_r3"]
        print(f"throughput ({s['throughput']['runs']} trivial runs, {s['throughput']['in_flight']} in flight, 1 host):")
        for label, d in (("single server, R1", one), ("3-node cluster, R3", many)):
            print(f"  {label}: {d['runs_per_s']:,.0f} runs/s (p50 {d['p50_ms']} ms, errors {d['errors']}), "
                  f"raw publish {d['jetstream_publish_per_s']:,.0f}/s")
        print(f"  cluster / single: {tp['cluster_over_single']}")
    print("failover (SIGKILL of the node leading the work/history stream), seconds from the kill:")
    for r in out["failover"]:
        f, b = r["first_completion_s"], r["rate_back_50pct_s"]
        print(f"  H={r['hosts']}: first completion p50 {f['p50']} max {f['max']}; rate back to 50 % p50 {b['p50']} "
              f"max {b['max']} ({f['measured']}/{f['of_trials']} trials; {r['runs_started']} runs, "
              f"{r['start_or_wait_retries']} retried starts/waits)")
        for key, v in r["first_completion_by_work_consumer_s"].items():
            if v["measured"]:
                print(f"      {key.replace('_', ' ')} ({v['measured']}): first completion p50 {v['p50']} "
                      f"max {v['max']}")
    runs = out["runs"]
    print(f"runs checked: {runs['checked']}, ended but the result never reached the driver: "
          f"{runs['ended_but_result_not_heard']}, findings: {len(runs['findings'])}")
    for x in runs["findings"][:20]:
        print(f"  {x['run_id']}: {x['problem']}; history {x['history']}; driver errors {x['driver_errors']}")
    print(f"driver client warnings (retried starts and waits): {sum(out['driver_warnings']['by_logger'].values())}")
    print(f"took {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
