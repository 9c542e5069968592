"""The chaos harness: a seeded mixed workload while hosts and servers are SIGKILLed, checked from outside.

    python -m benchmarks.chaos --quick                      # CI: one server, 300 runs, 12 host kills, 1 restart
    python -m benchmarks.chaos --seed 7 --json chaos.json   # long: 10,000 runs, 200 host kills, 20 node kills, R3

Starts everything itself (nats-server processes on free ports with temporary stores, host processes
``bide worker benchmarks.chaos_apps:worker``), drives the workload through the public SDK (and raw
NATS publishes for some events), kills things, stops everything, checks the invariants and exits 1
on any violation. The plan (which runs, inputs, when events are pushed, what each run must return)
follows from ``--seed``; the kill moments are drawn from it too, but where a kill lands depends on
timing. The oracle (``benchmarks.chaos_oracle``) sees only what is outside the system: results, the
side-effect file the steps append to, the kill timeline, and stream contents at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson

from actors.engine.wire import Subjects
from actors.store.jetstream import api_request
from benchmarks.chaos_cluster import Hosts, Servers
from benchmarks.chaos_oracle import Oracle, print_report
from sdk import Bide, RunCancelledError, RunFailedError

apps: Any = None  # benchmarks.chaos_apps, imported once BIDE_NATS_URL points at the harness's servers

KINDS = {  # kind: weight in the mix
    "steps": 22, "sleep": 14, "wait": 20, "direct": 10, "fanout": 8, "dag": 8, "trigger": 8, "flaky": 5, "cancel": 5,
    "forever": 5,
}


@dataclass
class Spec:
    """One planned run: what to start, when, how the harness talks to it, and what it must end with."""

    i: int
    kind: str
    at: float  # seconds after the workload starts
    input: dict[str, Any]
    expect: Any  # the result, or "cancelled"
    delay: float = 0.0  # when to push / send / cancel, after the start
    push: str = ""  # "sdk" or "raw" (events), "before" for lookback events pushed before the run starts
    run_id: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    outcome: tuple[str, Any] | None = None  # ("completed", result) | ("failed", msg) | ("cancelled", msg) | ...
    errors: list[str] = field(default_factory=list)


def plan(args: argparse.Namespace) -> list[Spec]:
    rng = random.Random(args.seed)
    kinds, weights = zip(*KINDS.items(), strict=True)
    specs: list[Spec] = []
    for i in range(args.runs):
        kind = rng.choices(kinds, weights)[0]
        at = rng.uniform(0, args.duration)
        s = Spec(i=i, kind=kind, at=at, input={}, expect=None, run_id=f"chaos{args.seed}-{i}-{kind}")
        if kind == "steps":
            n, ms = rng.randint(2, 6), rng.choice([0, 20, 100, 300])
            s.input, s.expect = {"n": n, "ms": ms}, {"sum": sum(j * j + 1 for j in range(n))}
        elif kind == "sleep":
            secs = rng.randint(args.sleep_min, args.sleep_max)
            s.input, s.expect = {"s": secs}, {"slept": secs, "steps": 3}
        elif kind == "wait":
            lookback = rng.random() < 0.5
            scope = f"sc{i % 7}" if rng.random() < 0.3 else None
            s.input = {"id": i, "lookback": lookback, "scope": scope, "timeout": args.wait_timeout}
            s.expect = {"got": {"id": i, "v": f"val{i}"}}
            s.push = rng.choice(["sdk", "raw"])
            if lookback and rng.random() < 0.4:
                s.push += "-before"
            s.delay = rng.uniform(0, 3)
        elif kind == "direct":
            s.delay = rng.uniform(0, 2)
            s.expect = {"got": [0, 1]}
        elif kind == "forever":
            gens = rng.randint(2, 4)
            s.delay = rng.uniform(0, 2)
            s.input, s.expect = {"gens": gens}, {"got": list(range(gens))}
        elif kind == "fanout":
            n = rng.randint(args.fanout_min, args.fanout_max)
            s.input, s.expect = {"n": n, "ms": rng.choice([0, 50])}, {"n": n, "sum": sum(j * j for j in range(n))}
        elif kind == "dag":
            x = rng.randint(0, 1000)
            b, c = 2 * (x + 1) + 1, x + 11
            s.input, s.expect = {"x": x}, {"a": {"v": x + 1}, "b": {"v": b}, "c": {"v": c}, "d": {"v": b + c}}
        elif kind == "trigger":
            s.input = {"tag": s.run_id}
            s.expect = {"tag": s.run_id}
            s.push = rng.choice(["sdk", "raw"])
        elif kind == "flaky":
            s.expect = {"attempt": 2, "v": 1}
        elif kind == "cancel":
            s.input, s.expect = {"id": i, "how": rng.choice(["sleep", "wait"])}, "cancelled"
            s.delay = rng.uniform(0.2, 3)
        specs.append(s)
    specs.sort(key=lambda s: s.at)
    return specs


class Driver:
    """Starts the planned runs, pushes/sends/cancels, and collects each run's end (retrying infra errors)."""

    def __init__(self, client: Bide, raw: Any, subjects: Subjects, deadline: float) -> None:
        self.client = client
        self.raw = raw  # a plain nats-py connection: events published as `nats pub`/`nats req` would
        self.s = subjects
        self.deadline = deadline  # time.time() by which every run must have ended

    async def retry(self, spec: Spec, what: str, fn: Any) -> Any:
        while True:
            try:
                return await fn()
            except (asyncio.CancelledError, RunFailedError, RunCancelledError):
                raise
            except Exception as e:  # an infrastructure error (server restarting, leader moving): again
                spec.errors.append(f"{time.time():.3f} {what}: {type(e).__name__}: {e}"[:300])
                if time.time() > self.deadline:
                    raise
                await asyncio.sleep(0.5)

    async def push_event(self, spec: Spec, key: str, payload: Any, scope: str | None, event_id: str) -> None:
        if spec.push.startswith("raw"):
            # A raw publish with a reply inbox, so the stream's ack tells it was stored (`nats req`).
            subject = self.s.event(key, scope)

            async def raw() -> None:
                msg = await self.raw.request(subject, orjson.dumps(payload), timeout=3,
                                             headers={"Nats-Msg-Id": event_id})
                if b'"error"' in msg.data:
                    raise RuntimeError(f"publish on {subject} refused: {msg.data!r}")

            await self.retry(spec, "raw publish", raw)
        else:
            await self.retry(spec, "push", lambda: self.client.event.aio_push(key, payload, scope=scope,
                                                                               event_id=event_id))

    async def start(self, spec: Spec) -> None:
        task = {"steps": apps.chaos_steps, "sleep": apps.chaos_sleep, "wait": apps.chaos_wait,
                "direct": apps.chaos_direct, "forever": apps.chaos_forever, "fanout": apps.chaos_fanout,
                "flaky": apps.chaos_flaky,
                "cancel": apps.chaos_cancel, "dag": apps.dag}[spec.kind]
        if spec.kind == "dag" or (spec.kind == "steps" and spec.i % 2 == 0):
            # A new run id, made by the client (the common start): its host writes the start with
            # the first turn's first write. A start that raised after storing its run would leave
            # a run the oracle reports as unplanned.
            ref = await self.retry(spec, "start", lambda: task.aio_run_no_wait(spec.input))
            spec.run_id = ref.workflow_run_id
            return
        tried = False

        async def once() -> None:
            nonlocal tried
            try:
                await task.aio_run_no_wait(spec.input, run_id=spec.run_id)
            except ValueError as e:  # "already exists": an earlier try wrote the run and then failed
                if not (tried and "already exists" in str(e)):
                    raise
            finally:
                tried = True

        await self.retry(spec, "start", once)

    async def registered(self, spec: Spec) -> None:
        """Until the run's history shows its wait registered (the registration is published before that)."""
        while time.time() < self.deadline:
            try:
                hist = await self.client.runs.aio_history(spec.run_id)
                if any(e.k == "wait_registered" for e in hist.entries):
                    return
            except Exception as e:
                spec.errors.append(f"{time.time():.3f} history: {type(e).__name__}: {e}"[:300])
            await asyncio.sleep(0.3)

    async def drive(self, spec: Spec, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + spec.at - time.time()))
        spec.started_at = time.time()
        try:
            if spec.kind == "trigger":
                await self.push_event(spec, apps.TRIGGER_KEY, spec.input, None, f"trig-{spec.run_id}")
                spec.outcome = ("pushed", None)  # its run is found and checked by the oracle at the end
                return
            payload = {"id": spec.i, "v": f"val{spec.i}"}
            if spec.push.endswith("-before"):
                await self.push_event(spec, apps.EVENT_KEY, payload, spec.input["scope"], f"ev-{spec.run_id}")
            await self.start(spec)
            if spec.kind == "wait" and not spec.push.endswith("-before"):
                if spec.input["lookback"]:
                    await asyncio.sleep(spec.delay)
                else:
                    await self.registered(spec)
                await self.push_event(spec, apps.EVENT_KEY, payload, spec.input["scope"], f"ev-{spec.run_id}")
            elif spec.kind == "direct":
                await asyncio.sleep(spec.delay)
                for n in (0, 1):  # a FIFO pair: the second is sent once the first is acknowledged
                    await self.retry(spec, f"send {n}", lambda n=n: self.client.event.aio_send(
                        spec.run_id, apps.DIRECT_NAME, {"n": n}, event_id=f"{spec.run_id}-{n}"))
            elif spec.kind == "forever":
                await asyncio.sleep(spec.delay)
                # One event per generation, queued on the run's inbox in order; each sent twice under
                # its id (a sender retrying), which must reach the run once, whichever generation
                # it continued to meanwhile.
                for n in range(spec.input["gens"]):
                    for again in ("", " again"):
                        await self.retry(spec, f"send {n}{again}", lambda n=n: self.client.event.aio_send(
                            spec.run_id, apps.DIRECT_NAME, {"n": n}, event_id=f"{spec.run_id}-{n}"))
            elif spec.kind == "cancel":
                await asyncio.sleep(spec.delay)
                done = await self.retry(spec, "cancel", lambda: self.client.runs.aio_cancel(spec.run_id))
                if done is False:
                    spec.errors.append("cancel: the run had already finished")
            spec.outcome = await self.result(spec)
        except Exception as e:
            spec.outcome = ("driver-error", f"{type(e).__name__}: {e}")
        finally:
            spec.ended_at = time.time()

    async def result(self, spec: Spec) -> tuple[str, Any]:
        while True:
            left = self.deadline - time.time()
            if left <= 0:
                return ("stuck", None)
            try:
                return ("completed", await self.client.runs.aio_result(spec.run_id, timeout=left))
            except RunFailedError as e:
                return ("failed", str(e))
            except RunCancelledError as e:
                return ("cancelled", str(e))
            except TimeoutError:
                if time.time() >= self.deadline:
                    return ("stuck", None)
            except Exception as e:
                spec.errors.append(f"{time.time():.3f} result: {type(e).__name__}: {e}"[:300])
                await asyncio.sleep(0.5)


# -- faults -----------------------------------------------------------------------------------------


class Faults:
    """The kill timeline: host SIGKILLs, server restarts (single mode), node kills (cluster mode)."""

    def __init__(self, args: argparse.Namespace, servers: Servers, hosts: Hosts, raw: Any, s: Subjects) -> None:
        self.args = args
        self.servers = servers
        self.hosts = hosts
        self.raw = raw
        self.s = s
        self.rng = random.Random(args.seed * 7919 + 1)
        self.timeline: list[dict[str, Any]] = []
        self.outages: list[tuple[float, float]] = []  # (down, up) of a server or node

    async def host_kills(self, t0: float) -> None:
        moments = sorted(self.rng.uniform(1, self.args.duration) for _ in range(self.args.host_kills))
        for n, at in enumerate(moments):
            await asyncio.sleep(max(0.0, t0 + at - time.time()))
            self.reap()
            owner = self.hosts.router_owner()
            ready = [h for h in self.hosts.live if h.ready.is_set()] or self.hosts.live
            victim = owner if (owner is not None and n % 3 == 0) else self.rng.choice(ready)
            was_owner = victim is owner
            self.hosts.kill(victim)
            self.timeline.append({"t": time.time(), "what": "host-kill", "pid": victim.pid, "name": victim.name,
                                  "router_owner": was_owner})

    def reap(self) -> None:
        for h in self.hosts.reap_dead():
            self.timeline.append({"t": time.time(), "what": "host-died-by-itself", "pid": h.pid,
                                  "name": h.name, "tail": "".join(h.tail)[-2000:]})

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart a host that exits on its own at once, as a process supervisor would (it is still reported)."""
        while not stop.is_set():
            self.reap()
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass

    async def server_restarts(self, t0: float) -> None:
        for k in range(self.args.server_restarts):
            at = self.args.duration * (k + 1) / (self.args.server_restarts + 1)
            await asyncio.sleep(max(0.0, t0 + at - time.time()))
            down = time.time()
            await asyncio.to_thread(self.servers.kill, 0)
            self.timeline.append({"t": down, "what": "server-kill", "node": "n0"})
            await asyncio.sleep(self.rng.uniform(1, 3))
            await asyncio.to_thread(self.servers.restart, 0)
            up = time.time()
            self.outages.append((down, up))
            self.timeline.append({"t": up, "what": "server-restarted", "node": "n0"})

    async def work_purges(self, t0: float) -> None:
        """Every timer and fired activation in the work stream gone, as an operator's mistake would leave it."""
        for k in range(self.args.work_purges):
            await asyncio.sleep(max(0.0, t0 + self.args.duration * (k + 0.5) / self.args.work_purges - time.time()))
            how = "rollup" if k % 2 == 0 else "purge"
            try:
                if how == "rollup":  # what `nats pub bide.work.x.y -H 'Nats-Rollup: all'` sends
                    subject = self.s.work("chaos-nobody", "rollup")
                    await self.raw.request(subject, b"", timeout=5, headers={"Nats-Rollup": "all"})
                    # The rollup message itself stays (no host serves that task): the harness's own, not left behind.
                    await api_request(self.raw, f"$JS.API.STREAM.PURGE.{self.s.work_stream}", {"filter": subject},
                                      timeout=5)
                else:
                    await api_request(self.raw, f"$JS.API.STREAM.PURGE.{self.s.work_stream}", {}, timeout=5)
            except Exception as e:  # a node down at that moment: this one did not happen
                self.timeline.append({"t": time.time(), "what": f"work-{how}-failed", "error": str(e)})
                continue
            self.timeline.append({"t": time.time(), "what": f"work-{how}"})

    async def leader_of(self, target: str) -> str | None:
        if target == "meta":
            return await asyncio.to_thread(self.servers.meta_leader)
        try:
            info = await api_request(self.raw, f"$JS.API.STREAM.INFO.{target}", {}, timeout=3)
        except Exception:
            return None
        leader = (info.get("cluster") or {}).get("leader")
        return str(leader) if leader else None

    async def node_kills(self, t0: float) -> None:
        targets = ["meta", self.s.events_stream, self.s.history_stream, self.s.queue_stream, self.s.work_stream]
        gap = self.args.duration / max(1, self.args.node_kills)
        for n in range(self.args.node_kills):
            await asyncio.sleep(max(0.0, t0 + (n + 0.5) * gap - time.time()))
            target = targets[n % len(targets)]
            name = await self.leader_of(target)
            i = self.servers.index_of(name) if name else None
            if i is None:
                i = self.rng.randrange(len(self.servers.nodes))
            down = time.time()
            await asyncio.to_thread(self.servers.kill, i)
            self.timeline.append({"t": down, "what": "node-kill", "node": f"n{i}", "leader_of": target if name else
                                  "none found (random node)"})
            await asyncio.sleep(self.rng.uniform(3, 6))
            await asyncio.to_thread(self.servers.restart, i)
            self.outages.append((down, time.time()))
            self.timeline.append({"t": time.time(), "what": "node-restarted", "node": f"n{i}"})


# -- the whole thing --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI size: one server, 300 runs, 12 host kills, 1 restart")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int)
    p.add_argument("--duration", type=float, help="seconds over which runs start and faults happen")
    p.add_argument("--host-kills", type=int)
    p.add_argument("--node-kills", type=int, help="cluster mode: NATS node SIGKILLs (rotating over leaders)")
    p.add_argument("--server-restarts", type=int, help="single-server mode: SIGKILL + restart of the server")
    p.add_argument("--cluster", action=argparse.BooleanOptionalAction, default=None,
                   help="3-node R3 cluster (default: on unless --quick)")
    p.add_argument("--work-purges", type=int, default=0,
                   help="empty BIDE_WORK this many times (a plain publish with Nats-Rollup: all, or a purge), "
                        "losing every timer: the hosts' wake-up check (BIDE_WAKEUP_CHECK_INTERVAL=10 then) must "
                        "arm them again")
    p.add_argument("--hosts", type=int, help="host processes kept alive")
    p.add_argument("--ack-wait", type=float, default=5.0, help="BIDE_ACK_WAIT of the hosts (seconds)")
    p.add_argument("--drain", type=float, help="seconds after the workload for every run to end")
    p.add_argument("--dup-window", type=float, default=15.0,
                   help="a step re-run is excused if its host was killed within this many seconds after it ran")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--workdir", type=Path, help="keep stores and logs here (default: a temporary dir, removed)")
    a = p.parse_args(argv)
    quick = a.quick
    defaults: dict[str, Any] = {
        "runs": 300 if quick else 10_000, "duration": 50.0 if quick else 600.0,
        "host_kills": 12 if quick else 200, "node_kills": 0 if quick else 20,
        "server_restarts": 1 if quick else 0, "cluster": not quick, "hosts": 2 if quick else 3,
        "drain": 60.0 if quick else 300.0,
    }
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.cluster:
        a.server_restarts = 0
    else:
        a.node_kills = 0
    a.sleep_min, a.sleep_max = (1, 5) if quick else (1, 40)
    a.fanout_min, a.fanout_max = (3, 8) if quick else (10, 40)
    a.wait_timeout = int(a.duration + a.drain * 0.75)  # fires only for an event that was lost
    return a


async def amain(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bide-chaos-"))
    if workdir.exists() and any(workdir.iterdir()):
        # An earlier run's stores would be reused: the same seed makes the same run ids, whose
        # finished histories the oracle would then judge as this run's (false violations).
        print(f"--workdir {workdir} is not empty (an earlier run's stores and logs?): give a new or empty "
              "directory", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    steps_file = workdir / "steps.jsonl"
    steps_file.touch()
    specs = plan(args)
    servers = Servers(workdir, args.cluster)
    replicas = 3 if args.cluster else 1
    env = {"CHAOS_STEPS": str(steps_file), "BIDE_ACK_WAIT": str(args.ack_wait), "BIDE_REPLICAS": str(replicas)}
    if args.work_purges:
        env["BIDE_WAKEUP_CHECK_INTERVAL"] = "10"  # lost timers found within the drain
    hosts = Hosts(args.hosts, "", env, workdir)
    client: Bide | None = None
    raw: Any = None
    t_begin = time.time()
    try:
        await asyncio.to_thread(servers.start)
        hosts.url = servers.url
        async def quiet(e: Exception) -> None:  # a restarting server is expected here: no tracebacks
            pass

        raw = await nats.connect(servers.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                 error_cb=quiet)
        # The driver uses the app module's own client and task handles, as a user's code would.
        os.environ.update({"BIDE_NATS_URL": servers.url, "BIDE_REPLICAS": str(replicas),
                           "BIDE_ACK_WAIT": str(args.ack_wait)})
        global apps
        apps = importlib.import_module("benchmarks.chaos_apps")
        client = apps.bide
        await asyncio.to_thread(hosts.start)
        s = Subjects()
        faults = Faults(args, servers, hosts, raw, s)
        t0 = time.time() + 1.0
        deadline = t0 + args.duration + args.drain
        driver = Driver(client, raw, s, deadline)
        print(f"chaos: seed {args.seed}, {len(specs)} runs over {args.duration:.0f}s, "
              f"{'3-node R3 cluster' if args.cluster else 'one server'}, {args.hosts} hosts, workdir {workdir}"
              + (f", {args.work_purges} work stream purges (BIDE_WAKEUP_CHECK_INTERVAL=10)"
                 if args.work_purges else ""),
              flush=True)
        fault_tasks = [asyncio.create_task(faults.host_kills(t0)), asyncio.create_task(faults.work_purges(t0))]
        if args.cluster:
            fault_tasks.append(asyncio.create_task(faults.node_kills(t0)))
        else:
            fault_tasks.append(asyncio.create_task(faults.server_restarts(t0)))
        stop = asyncio.Event()
        supervisor = asyncio.create_task(faults.supervise(stop))
        await asyncio.gather(*(driver.drive(sp, t0) for sp in specs), *fault_tasks)
        oracle = Oracle(args, specs, faults, client, raw, s, steps_file, t_begin, deadline)
        report = await oracle.check()
        stop.set()
        await supervisor
        report["workdir"] = str(workdir)
    finally:
        if client is not None:
            await client.aclose()
        if raw is not None:
            await raw.close()
        await asyncio.to_thread(hosts.stop)
        await asyncio.to_thread(servers.stop)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    if args.workdir is None and not report["violations"]:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if report["violations"] else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
