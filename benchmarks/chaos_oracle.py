"""The chaos harness's oracle: every invariant checked from outside the system, and the report.

Invariants (each broken one is a violation, with the run's history tail and the kills around it):

* every planned run ends with the expected status and result (``wrong-result``, ``failed``,
  ``cancelled``, ``not-cancelled``); a wait whose event was pushed never times out (``timeout-fired``);
  nothing is left running at the deadline (``stuck``);
* every ``on_events`` trigger event started exactly one run, which completed (``trigger-lost``,
  ``trigger-twice``); no run exists that nobody asked for (``unplanned-run``);
* a step or child ran more than once only if its host was SIGKILLed (or its server was down) within
  ``--dup-window`` seconds after it ran (``ran-twice``);
* at the end nothing is left behind: the work stream (activations and timers), the runs' inboxes and
  the wait registrations are drained (``left-behind``); no host died unless the harness killed it;
* every run that ended has its removal scheduled, in a batch or on its own (``removal-lost``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import orjson

from actors.engine.child_ids import CHILD_ID_SEPARATOR
from actors.engine.wire import Subjects, decode_token, parse_time
from actors.store.jetstream import api_request, direct_get_last, direct_get_subject

_OWN_TASKS = ("ChaosChild", "ChaosDag:")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


class Oracle:
    def __init__(self, args: argparse.Namespace, specs: list[Any], faults: Any, client: Any, raw: Any,
                 s: Subjects, steps_file: Path, t_begin: float, deadline: float) -> None:
        self.deadline = deadline  # by then every run, trigger runs included, must have ended
        self.args = args
        self.specs = specs
        self.faults = faults
        self.client = client
        self.raw = raw
        self.s = s
        self.steps_file = steps_file
        self.t_begin = t_begin
        self.violations: list[dict[str, Any]] = []
        self.removals_lost_to_purges = 0
        self.by_id = {sp.run_id: sp for sp in specs if sp.kind != "trigger"}
        self.resume: list[float] = []  # seconds from a host kill to its interrupted step running again

    def violation(self, kind: str, run_id: str | None, detail: str, spec: Any = None) -> None:
        self.violations.append({"kind": kind, "run_id": run_id, "run_kind": spec.kind if spec else None,
                                "detail": detail[:600], "spec": spec})

    # -- results ------------------------------------------------------------------------------------

    def check_results(self) -> None:
        for sp in self.specs:
            if sp.kind == "trigger":
                continue
            status, value = sp.outcome or ("no-outcome", None)
            if sp.expect == "cancelled":
                if status != "cancelled":
                    self.violation("not-cancelled", sp.run_id, f"ended {status}: {value!r}", sp)
            elif status == "completed" and value != sp.expect:
                if sp.kind == "wait" and isinstance(value, dict) and value.get("got") is None:
                    self.violation("timeout-fired", sp.run_id,
                                   f"the wait timed out though its event was pushed ({sp.push})", sp)
                else:
                    self.violation("wrong-result", sp.run_id, f"expected {sp.expect!r}, got {value!r}", sp)
            elif status != "completed":
                self.violation(status, sp.run_id, f"{value!r}; driver errors: {sp.errors[-3:]}", sp)

    async def all_runs(self) -> dict[str, int]:
        """Every run that has a history subject, with its message count (paged ``subjects_filter``)."""
        runs: dict[str, int] = {}
        offset = 0
        prefix = f"{self.s.prefix}.history."
        while True:
            info = await api_request(self.raw, f"$JS.API.STREAM.INFO.{self.s.history_stream}",
                                     {"subjects_filter": self.s.history_all, "offset": offset}, timeout=30)
            subjects = (info.get("state") or {}).get("subjects") or {}
            for subj, n in subjects.items():
                runs[decode_token(subj[len(prefix):])] = n
            offset += len(subjects)
            if not subjects or offset >= int(info.get("total", 0) or 0):
                return runs

    async def check_unplanned(self) -> dict[str, int]:
        """Runs the harness did not start itself: children and workflow steps, trigger runs, strays."""
        base = len(self.violations)
        while True:  # a trigger's run may still be on its way (a router failover): wait up to the deadline
            counts = await self.scan_unplanned()
            if len(self.violations) == base or time.time() > self.deadline:
                return counts
            del self.violations[base:]
            await asyncio.sleep(2.0)

    async def scan_unplanned(self) -> dict[str, int]:
        runs = await self.all_runs()
        ok_parents = {sp.run_id for sp in self.specs if sp.outcome and sp.outcome[0] in ("completed", "cancelled")}
        by_tag: dict[str, list[tuple[str, Any]]] = collections.defaultdict(list)
        counts: collections.Counter[str] = collections.Counter()
        for rid in runs:
            if rid in self.by_id:
                continue
            # Child ids are ``<parent>~<pos>~<i>`` or ``<parent>~k~<key>`` (actors/store/children.py).
            sep = CHILD_ID_SEPARATOR
            owner = next((p for p in (rid.rsplit(sep, 2)[0], rid.rsplit(f"{sep}k{sep}", 1)[0]) if p in self.by_id),
                         None)
            if owner in ok_parents:
                counts["children"] += 1
                continue
            try:
                hist = await self.client.runs.aio_history(rid)
            except Exception as e:
                self.violation("unreadable", rid, f"{type(e).__name__}: {e}")
                continue
            task = hist.entries[0].task if hist.entries else "?"
            term = hist.terminal
            if task == "ChaosTriggered":
                counts["triggered"] += 1
                by_tag[(hist.entries[0].input or {}).get("tag", "?")].append((rid, term))
            elif task.startswith(_OWN_TASKS) and owner in self.by_id:
                counts["children"] += 1
                if term is None:
                    self.violation("stuck", rid, f"a {task} run of {owner} never ended", self.by_id[owner])
            else:
                self.violation("unplanned-run", rid, f"a {task} run nobody started on purpose (a start retried "
                               f"after an error?); it {'ended ' + term.k if term else 'never ended'}")
        for sp in self.specs:
            if sp.kind != "trigger":
                continue
            found = by_tag.get(sp.input["tag"], [])
            if not found:
                self.violation("trigger-lost", None, f"the trigger event trig-{sp.run_id} ({sp.push}, "
                               f"pushed at {sp.started_at - self.t_begin:.2f}s) started no run", sp)
            elif len(found) > 1:
                self.violation("trigger-twice", found[1][0], f"the trigger event started {len(found)} runs: "
                               f"{[r for r, _ in found]}", sp)
            for rid, term in found[:1]:
                if term is None:
                    self.violation("stuck", rid, "the triggered run never ended", sp)
                elif term.k != "run_completed" or term.result != sp.expect:
                    self.violation("wrong-result", rid, f"triggered run ended {term.k}: {term!r:.300}", sp)
        return dict(counts)

    # -- side effects -------------------------------------------------------------------------------

    def read_steps(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.steps_file.read_bytes().splitlines() if line.strip()]

    def excused(self, pid: int, t: float, rerun_pid: int, rerun_t: float) -> str | None:
        w = self.args.dup_window
        for k in self.faults.timeline:
            # A run again on the same host (a turn retried in an outage) is not its kill's doing.
            if (k["what"] == "host-kill" and k["pid"] == pid and rerun_pid != pid
                    and t - 0.05 <= k["t"] <= t + w):
                self.resume.append(rerun_t - k["t"])  # the killed turn's step, run again elsewhere
                return f"host {pid} killed {k['t'] - t:.2f}s after"
        for down, up in self.faults.outages:
            if down <= t + w and up >= t - 1:
                return "server/node down"
        return None

    def check_steps(self, lines: list[dict[str, Any]]) -> int:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
        for ln in lines:
            groups[(ln["r"], ln["s"])].append(ln)
        excused = 0
        for (rid, step), runs in groups.items():
            runs.sort(key=lambda x: x["t"])
            for ln, nxt in itertools.pairwise(runs):
                why = self.excused(ln["p"], ln["t"], nxt["p"], nxt["t"])
                if why:
                    excused += 1
                    continue
                owner = next((sp for r, sp in self.by_id.items() if rid == r or rid.startswith(r + CHILD_ID_SEPARATOR)),
                             None)
                self.violation("ran-twice", rid, f"{step} ran {len(runs)} times (pid@t: " + ", ".join(
                    f"{x['p']}@{x['t'] - self.t_begin:.2f}" for x in runs) + "), with no kill of the first host "
                    "right after it", owner)
        return excused

    # -- what is left at the end --------------------------------------------------------------------

    async def leftovers(self) -> dict[str, dict[str, int]]:
        async def subjects(stream: str, filt: str) -> dict[str, int]:
            info = await api_request(self.raw, f"$JS.API.STREAM.INFO.{stream}", {"subjects_filter": filt}, timeout=30)
            return {k: v for k, v in ((info.get("state") or {}).get("subjects") or {}).items() if v}

        deadline = time.time() + (20 if self.args.quick else 60)
        while True:
            left = {
                "work": {**await subjects(self.s.queue_stream, self.s.queue_all),
                         **await subjects(self.s.work_stream, self.s.work_all)},
                # A finished run's removal after the history retention is a schedule by design (a
                # batch's, or one run's as earlier versions wrote them).
                "timers": {k: v for k, v in (await subjects(self.s.work_stream, self.s.timers_all)).items()
                           if not k.endswith(".reap") and not k.startswith(self.s.removals_timer(""))},
                "inboxes": await subjects(self.s.history_stream, self.s.inbox_all),
                # The router's markers are deleted once found and expire after an hour: one an owner
                # was killed before deleting stays until then, by design (actors/hosting/router_reads.py).
                "waits": {k: v for k, v in (await subjects(self.s.events_stream, self.s.waits_all)).items()
                          if not k.endswith(".%00barrier")},
            }
            if not any(left.values()) or time.time() > deadline:
                return left
            await asyncio.sleep(1.0)

    async def _shown(self, what: str, subjects: dict[str, int]) -> str:
        """What the first few messages left behind say (for a wait registration: its op, wait and run)."""
        stream = {"work": self.s.queue_stream, "timers": self.s.work_stream, "inboxes": self.s.history_stream,
                  "waits": self.s.events_stream}[what]
        shown = []
        for subject in list(subjects)[:3]:
            try:
                msgs = await direct_get_subject(self.raw, stream, subject, timeout=10)
            except Exception as e:  # a report, not a check: say why it is missing
                shown.append(f"{subject}: not read ({e})")
                continue
            if what == "work" and stream == self.s.queue_stream and not msgs:
                msgs = await direct_get_subject(self.raw, self.s.work_stream, subject, timeout=10)
            for m in msgs[:4]:
                headers = m.headers or {}
                shown.append(f"seq {headers.get('Nats-Sequence')} at {headers.get('Nats-Time-Stamp')}: "
                             f"{m.data[:200].decode(errors='replace')}")
        return ("; " + " | ".join(shown)) if shown else ""

    async def unscheduled_removals(self) -> list[str]:
        """Runs with a history whose removal no pending schedule names (a batch's, or one run's own)."""
        deadline = time.time() + 30  # a run's removal is scheduled just after its result is sent
        while True:
            named: set[str] = set()
            for m in await direct_get_subject(self.raw, self.s.work_stream, self.s.removals_timer("*"), timeout=30):
                named.update(orjson.loads(m.data).get("run_ids") or [])
            info = await api_request(self.raw, f"$JS.API.STREAM.INFO.{self.s.work_stream}",
                                     {"subjects_filter": f"{self.s.prefix}.timers.*.reap"}, timeout=30)
            prefix = f"{self.s.prefix}.timers."
            named.update(decode_token(k[len(prefix):].rsplit(".", 1)[0])
                         for k in ((info.get("state") or {}).get("subjects") or {}))
            missing = sorted(set(await self.all_runs()) - named)
            if not missing or time.time() > deadline:
                return missing
            await asyncio.sleep(1.0)

    async def lost_removals_not_excused(self, missing: list[str]) -> list[str]:
        """``missing`` less the runs that ended before the last work stream purge (``--work-purges``): their
        removal's schedule went with it, and the hosts remove such a run once its retention is overdue
        (``test_timers_lost.py``), long after this run. Counted in ``removals_lost_to_work_purges``."""
        purges = [k["t"] for k in self.faults.timeline if k["what"] in ("work-rollup", "work-purge")]
        if not purges or not missing:
            return missing
        last_purge = max(purges)
        still = []
        for rid in missing:
            last = await direct_get_last(self.raw, self.s.history_stream, self.s.history(rid), timeout=30)
            ended = parse_time((last.headers or {}).get("Nats-Time-Stamp")).timestamp() if last else 0.0
            if ended > last_purge + 5:  # scheduled within moments of the end, before its activation's ack
                still.append(rid)
        self.removals_lost_to_purges = len(missing) - len(still)
        return still

    # -- all of it ----------------------------------------------------------------------------------

    async def check(self) -> dict[str, Any]:
        self.check_results()
        counts = await self.check_unplanned()
        lines = self.read_steps()
        excused = self.check_steps(lines)
        left = await self.leftovers()
        for what, subj in left.items():
            if subj:
                self.violation("left-behind", None, f"{sum(subj.values())} {what} message(s) on {len(subj)} "
                               f"subject(s), e.g. {dict(list(subj.items())[:5])}{await self._shown(what, subj)}")
        missing = await self.lost_removals_not_excused(await self.unscheduled_removals())
        for rid in missing[:20]:
            self.violation("removal-lost", rid, f"the run ended and no removal of it is scheduled ({len(missing)} such "
                           "runs in all)", self.by_id.get(rid))
        crashes: dict[str, list[str]] = collections.defaultdict(list)
        for k in self.faults.timeline:
            if k["what"] == "host-died-by-itself":
                last = next((ln for ln in reversed(k["tail"].splitlines()) if ln.strip()), "no output")
                crashes[last.strip()[:200]].append(f"{k['name']}@{k['t'] - self.t_begin:.1f}s")
        for why, who in crashes.items():
            self.violation("host-crashed", None, f"{len(who)} host(s) exited on their own ({', '.join(who[:8])}): "
                           f"{why}")
        resume = self.resume
        kinds: dict[str, dict[str, int]] = {}
        bad = {v["spec"].i for v in self.violations if v["spec"] is not None}
        for sp in self.specs:
            row = kinds.setdefault(sp.kind, {"runs": 0, "ok": 0})
            row["runs"] += 1
            row["ok"] += sp.i not in bad
        tl = self.faults.timeline
        violations = [await self.describe(v) for v in self.violations]
        return {
            "seed": self.args.seed, "mode": "quick" if self.args.quick else "long",
            "cluster": self.args.cluster, "hosts": self.args.hosts, "ack_wait_s": self.args.ack_wait,
            "runs": len(self.specs), "runs_by_kind": kinds, "other_runs": counts,
            "host_kills": sum(k["what"] == "host-kill" for k in tl),
            "router_owner_kills": sum(bool(k.get("router_owner")) for k in tl),
            "server_restarts": sum(k["what"] == "server-kill" for k in tl),
            "node_kills": sum(k["what"] == "node-kill" for k in tl),
            "work_purges": sum(k["what"] in ("work-rollup", "work-purge") for k in tl),
            "removals_lost_to_work_purges": self.removals_lost_to_purges,
            "step_lines": len(lines), "reruns_excused_by_kills": excused,
            "kill_to_resume_s": {"n": len(resume), "p50": _pct(resume, 0.5), "p99": _pct(resume, 0.99),
                                 "mean": round(statistics.fmean(resume), 3) if resume else None},
            "driver_infra_retries": sum(len(sp.errors) for sp in self.specs),
            "elapsed_s": round(time.time() - self.t_begin, 1),
            "violations": violations,
            "timeline": [{**{k: v for k, v in e.items() if k != "tail"}, "t": round(e["t"] - self.t_begin, 2)}
                         for e in tl],
        }

    async def describe(self, v: dict[str, Any]) -> dict[str, Any]:
        sp = v.pop("spec")
        out = dict(v)
        if sp is not None:
            out["input"] = sp.input
            out["push"] = sp.push or None
            t1 = (sp.started_at or self.t_begin) - 5
            t2 = min(sp.ended_at or time.time(), t1 + 65) + 5
            out["started_s"] = round((sp.started_at or 0) - self.t_begin, 2)
            out["kills_around"] = [f"{e['t'] - self.t_begin:.2f}s {e['what']} {e.get('name') or e.get('node')}"
                                   + (" (router owner)" if e.get("router_owner") else "")
                                   for e in self.faults.timeline if t1 <= e["t"] <= t2]
        rid = v.get("run_id")
        if rid:
            try:
                hist = await self.client.runs.aio_history(rid)
                out["history_tail"] = [f"{t[11:23] if t else ''} {orjson.dumps(e.model_dump(mode='json')).decode()}"
                                       [:260] for e, t in list(zip(hist.entries, hist.times or [""] * 9999,
                                                                   strict=False))[-8:]]
                out["inbox_pending"] = len(hist.inbox)
            except Exception as e:
                out["history_tail"] = [f"unreadable: {type(e).__name__}: {e}"]
        return out


def print_report(r: dict[str, Any]) -> None:
    print(f"\n## Chaos report (seed {r['seed']}, {r['mode']}, {'R3 cluster' if r['cluster'] else 'one server'}, "
          f"{r['hosts']} hosts, ack wait {r['ack_wait_s']}s, {r['elapsed_s']}s)\n")
    print("| kind | runs | ok |\n|---|---:|---:|")
    for kind, row in sorted(r["runs_by_kind"].items()):
        print(f"| {kind} | {row['runs']} | {row['ok']} |")
    other = ", ".join(f"{k} {v}" for k, v in r["other_runs"].items())
    k2r = r["kill_to_resume_s"]
    print(f"\nother runs checked: {other or 'none'}; step lines {r['step_lines']}, "
          f"re-runs excused by kills {r['reruns_excused_by_kills']}")
    print(f"host kills {r['host_kills']} (router owner {r['router_owner_kills']}), server restarts "
          f"{r['server_restarts']}, node kills {r['node_kills']}, work stream purges {r['work_purges']} "
          f"(removal schedules lost with them {r['removals_lost_to_work_purges']}); "
          f"kill → resume p50 {k2r['p50']}s p99 {k2r['p99']}s "
          f"(n={k2r['n']}); driver infra retries {r['driver_infra_retries']}")
    vs = r["violations"]
    print(f"\n**{len(vs)} violation(s)**")
    if vs:
        print("\n| kind | run | run kind | detail |\n|---|---|---|---|")
        for v in vs[:40]:
            print(f"| {v['kind']} | {v['run_id']} | {v['run_kind']} | {v['detail'][:160]} |")
        for v in vs[:10]:
            if v.get("history_tail") or v.get("kills_around"):
                print(f"\n{v['kind']} {v['run_id']} ({v['run_kind']}, started {v.get('started_s')}s):")
                for line in v.get("history_tail", []):
                    print(f"    {line}")
                print(f"    kills around: {v.get('kills_around')}")
    print(flush=True)
