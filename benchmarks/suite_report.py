"""The suite's report: each benchmark's headline numbers from its JSON, and ``benchmarks/README.md``.

Every number is also shown as a ratio of the raw JetStream publish rate the suite measured
in the same run (``suite.publish_per_s`` in each JSON): a rate divided by it, or a time
multiplied by it (how many raw publishes fit in that time). On another machine the raw
numbers move with its speed; the ratios should move much less.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["rate", "time", "size", "number"]


@dataclass(frozen=True)
class Headline:
    """One number of the table: ``value`` in ``unit``; ``kind`` decides how it becomes a ratio."""

    label: str
    value: float
    unit: str
    kind: Kind

    def shown(self) -> str:
        if self.unit == "ms":
            return f"{self.value:,.2f} ms" if self.value < 10 else f"{self.value:,.0f} ms"
        if self.unit == "s":
            return f"{self.value:,.2f} s"
        if self.unit in ("/s", ""):
            return f"{self.value:,.0f}{self.unit}" if self.value >= 100 else f"{self.value:,.2f}{self.unit}"
        return f"{self.value:,.2f} {self.unit}" if self.value < 100 else f"{self.value:,.0f} {self.unit}"

    def ratio(self, publish_per_s: float | None) -> str:
        """Rate / raw publish rate, or time x raw publish rate (in raw publishes); '-' for the rest."""
        if not publish_per_s:
            return "-"
        if self.kind == "rate":
            return f"{self.value / publish_per_s:.4f}"
        if self.kind == "time":
            seconds = self.value / 1000 if self.unit == "ms" else self.value
            return f"{seconds * publish_per_s:,.0f} publishes"
        return "-"


def _rate(label: str, v: float) -> Headline:
    return Headline(label, v, "/s", "rate")


def _ms(label: str, v: float) -> Headline:
    return Headline(label, v, "ms", "time")


# -- headline numbers, one function per benchmark ------------------------------------------------------


def throughput(d: dict[str, Any]) -> list[Headline]:
    c = d["concurrency"]
    out = [_rate(f"trivial durable runs/s, {c} in flight", d["runs_per_s"]),
           _ms(f"run latency p50, {c} in flight", d["p50_ms"]), _ms(f"run latency p99, {c} in flight", d["p99_ms"]),
           _rate("raw JetStream publishes/s (measured by the benchmark)", d["jetstream_publish_per_s"])]
    for p in d.get("sweep", []):
        out += [_rate(f"runs/s, {p['concurrency']} in flight", p["runs_per_s"]),
                _ms(f"run latency p50, {p['concurrency']} in flight", p["p50_ms"])]
    return out


def event_latency(d: dict[str, Any]) -> list[Headline]:
    seq, n = d["sequential"], d["waiting"]
    out = [_ms(f"event -> resumed p50 ({n} waiting)", seq["event_to_resumed"]["p50_ms"]),
           _ms(f"event -> resumed p99 ({n} waiting)", seq["event_to_resumed"]["p99_ms"]),
           _ms("event -> result at the driver p50", seq["end_to_end"]["p50_ms"])]
    if d.get("bulk"):
        out.append(_rate(f"runs resumed/s ({d['bulk']['events']} events at once)", d["bulk"]["resumed_per_s"]))
    out.append(Headline("worker RSS per waiting run", d["memory"]["bytes_per_waiting_run"] / 1024, "KiB", "size"))
    return out


def router_burst(d: dict[str, Any]) -> list[Headline]:
    out = []
    for mode in ("keyed", "direct"):
        rows = [r for r in d["rounds"] if r["mode"] == mode]
        out += [_rate(f"{mode}: runs resumed/s ({d['waiting']} released together)",
                      statistics.median(r["resumed_per_s"] for r in rows)),
                _ms(f"{mode}: send -> resumed p50", statistics.median(r["send_to_resumed"]["p50_ms"] for r in rows))]
    return out


def timers_at_scale(d: dict[str, Any]) -> list[Headline]:
    out = []
    for r in d["rows"]:
        n = f"{r['runs']:,} due within {r['spread_s']:g} s"
        out += [_ms(f"timer lateness p50, {n}", r["lateness"]["p50_ms"]),
                _ms(f"timer lateness p99, {n}", r["lateness"]["p99_ms"]),
                _ms(f"timer lateness max, {n}", r["lateness"]["max_ms"]),
                _ms(f"result at the driver - due, p99, {n}", r["result_seen"].get("p99_ms", float("nan"))),
                Headline(f"runs asleep at once, {n}", r["asleep_at_once"], "", "number")]
    return out


def turn_cost(d: dict[str, Any]) -> list[Headline]:
    out = []
    for r in d["rows"]:
        out += [_ms(f"K={r['k']:,}: the K-th turn", r["kth_turn_ms"]),
                _ms(f"K={r['k']:,}: mean of the last 10 turns", r["last10_mean_ms"]),
                Headline(f"K={r['k']:,}: all K turns", r["total_s"], "s", "time")]
    if d.get("ratio"):
        out.append(Headline(f"K={d['ratio']['k']:,}: K-th turn / 10th turn", d["ratio"]["kth_over_10th"], "",
                            "number"))
    return out


def fanout(d: dict[str, Any]) -> list[Headline]:
    med = d["median"]
    n = d["settings"]["children"]
    return [_rate(f"fan-out children/s (1 parent, {n} children)", med["fanout"]["children_per_s"]),
            _ms("parent resume after the last child", med["fanout"]["resume_ms"]),
            _rate(f"the same {n} runs started from the driver, runs/s", med["toplevel"]["runs_per_s"]),
            Headline("fan-out / top-level", med["fanout_to_toplevel_ratio"], "", "number")]


def memory_waiting(d: dict[str, Any]) -> list[Headline]:
    n = d["runs"]
    out = [Headline(f"worker RSS per waiting run ({n:,} waiting)", d["worker_kib_per_run"], "KiB", "size"),
           Headline(f"nats-server RSS per waiting run ({n:,} waiting)", d["server_kib_per_run"], "KiB", "size")]
    if "worker_kib_per_run_after_first_batch" in d:
        out += [Headline("worker RSS per waiting run, after the first batch",
                         d["worker_kib_per_run_after_first_batch"], "KiB", "size"),
                Headline("nats-server RSS per waiting run, after the first batch",
                         d["server_kib_per_run_after_first_batch"], "KiB", "size")]
    if "server_kib_per_run_idle_collected" in d:
        out += [Headline(f"nats-server RSS per waiting run, {d['idle_s']:.0f} s later",
                         d["server_kib_per_run_idle"], "KiB", "size"),
                Headline(f"nats-server RSS per waiting run, {d['idle_s']:.0f} s later and collected",
                         d["server_kib_per_run_idle_collected"], "KiB", "size")]
    out.append(Headline("JetStream bytes stored per waiting run", d["stored_bytes_per_run"], "B", "size"))
    return out


def tracing_overhead(d: dict[str, Any]) -> list[Headline]:
    return [_rate("trivial runs/s, tracing off (median of rounds)", d["off"]["median_runs_per_s"]),
            _rate("trivial runs/s, tracing on (median of rounds)", d["on"]["median_runs_per_s"]),
            Headline("tracing on / off", d["ratio_on_off"], "", "number")]


HEADLINES: dict[str, Callable[[dict[str, Any]], list[Headline]]] = {
    "throughput": throughput, "event_latency": event_latency, "router_burst": router_burst,
    "timers_at_scale": timers_at_scale, "turn_cost": turn_cost, "fanout": fanout,
    "memory_waiting": memory_waiting, "tracing_overhead": tracing_overhead,
}

TITLES = {
    "throughput": "Throughput (trivial durable runs end to end)",
    "event_latency": "Event latency (one event at a time, runs waiting)",
    "router_burst": "Router burst (keyed events vs direct delivery)",
    "timers_at_scale": "Timers at scale (sleepers all due within one second)",
    "turn_cost": "Turn cost vs history length (one run, K turns)",
    "fanout": "Fan-out (one durable parent, N children)",
    "memory_waiting": "Memory per waiting run",
    "tracing_overhead": "Tracing overhead (on / off)",
}


# -- the README ---------------------------------------------------------------------------------------

OUTSIDE_THE_SUITE = [
    "## Outside the suite",
    "",
    "### Failover on a 3-node cluster",
    "",
    "`python -m benchmarks.failover --json failover.json` (defaults `--hosts 1,2,4 --trials 3 --rate 50`; about "
    "5 minutes on 2 cores). Starts a 3-node cluster on loopback (streams at 3 replicas) and a single server, and "
    "runs `benchmarks.throughput --url ... --replicas R` against each: runs/s and raw publishes/s side by side, "
    "and their ratio. Then, with 1, 2 and 4 host processes and a driver starting trivial durable runs at a steady "
    "rate, it SIGKILLs the node that leads the queue or history stream (of those, the one leading the most Bide "
    "streams) and reports per host count the p50 and max seconds from the kill to the first run completed after "
    "it (its result received, its completion appended after the kill) and until the completion rate over 1 s is "
    "back to half the rate before the kill, with when the servers elected new leaders and whether the node also "
    "led the task's queue consumer. The node is restarted and the cluster healthy again (every stream and task "
    "consumer led, every replica current) before the next kill. Every run started is checked in its history at "
    "the end: a lost or doubled run is printed with its run id and its history. Not in the suite: it kills "
    "servers and takes minutes.",
]
"""Benchmarks the suite does not run, and how to run them (the same text in every README it writes)."""


def load(out_dir: Path, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Every benchmark's JSON present in ``out_dir`` (this run's, or an earlier run's)."""
    found = {}
    for name in names:
        path = out_dir / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| benchmark | number | value | ratio |", "|---|---|---|---|"]
    for name, data in results.items():
        pub = data.get("suite", {}).get("publish_per_s")
        try:
            heads = HEADLINES[name](data)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            lines.append(f"| {name} | (no headline numbers: {type(e).__name__} {e}) | | |")
            continue
        for h in heads:
            lines.append(f"| {name} | {h.label} | {h.shown()} | {h.ratio(pub)} |")
    return lines


def machine_table(m: dict[str, Any], publish: list[float]) -> list[str]:
    pub = " / ".join(f"{p:,.0f}" for p in publish) or "-"
    return ["| CPUs | CPU model | Python | nats-server | JetStream sync | raw publishes/s (suite start / end) "
            "| load at start |", "|---|---|---|---|---|---|---|",
            f"| {m.get('cpus')} | {m.get('cpu_model') or '-'} | {m.get('python')} | {m.get('nats_server')} | "
            f"{m.get('sync')} | {pub} | {' '.join(str(x) for x in m.get('loadavg_at_start', []))} |"]


def ran(suite: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """Which benchmarks the last suite run ran, when it left some results from earlier runs."""
    earlier = [n for n in results if n not in suite["ran"]]
    if not earlier:
        return "the suite"
    return f"it ran {', '.join(suite['ran'])} (the others are from earlier runs, dated below) and"


def readme(results: dict[str, dict[str, Any]], suite: dict[str, Any], readme_path: Path, out_dir: Path) -> str:
    """The README text: how it was made, the machine, the table, then each benchmark's command and plot."""
    m = suite["machine"]
    sizes = "quick sizes (`--quick`, a smoke test: not numbers to quote)" if suite["quick"] else "full sizes"
    rel = Path(out_dir.resolve().relative_to(readme_path.parent.resolve())) if out_dir.resolve().is_relative_to(
        readme_path.parent.resolve()) else out_dir.resolve()
    lines = [
        "# Benchmark results",
        "",
        f"Written by `python -m benchmarks{' --quick' if suite['quick'] else ''}` on {m['date']} at commit "
        f"`{m.get('commit') or '?'}`, {sizes}; {ran(suite, results)} took {suite['wall_s'] / 60:.1f} min. Do not "
        "edit by hand: run the suite again (`--only NAME[,NAME]` re-runs some and keeps the others' last results).",
        "",
        "## Machine",
        "",
        *machine_table(m, suite["publish_per_s"]),
        "",
        "Every benchmark starts its own nats-server (sync as above, replicas 1) and worker process "
        "on this machine, one benchmark at a time; the driver, the server and the worker share the CPUs.",
        "",
        "## Headline numbers",
        "",
        "ratio: a rate divided by the raw JetStream publish rate the suite measured in the same run "
        "(pipelined 64-byte publishes to a fresh server), or a time multiplied by it (how many raw "
        "publishes fit in that time).",
        "",
        *table(results),
        "",
        "## Each benchmark",
    ]
    for name, data in results.items():
        s = data.get("suite", {})
        lines += ["", f"### {TITLES.get(name, name)}", "", f"`{s.get('command', '?')}` ({s.get('wall_s', '?')} s, "
                  f"{s.get('date', 'undated')}" + (", quick sizes" if s.get("quick") else "") + ")"]
        if (out_dir / f"{name}.png").exists():
            lines += ["", f"![{name}]({rel / (name + '.png')})"]
    lines += ["", *OUTSIDE_THE_SUITE]
    if suite.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in suite["notes"]]
    if suite.get("failed"):
        lines += ["", "## Failed in this run", ""] + [f"- {f}" for f in suite["failed"]]
    return "\n".join(lines) + "\n"
