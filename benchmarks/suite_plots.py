"""One PNG per benchmark from its JSON, with matplotlib (the optional ``bench`` extra).

matplotlib is imported only here and only when plotting, so the benchmarks themselves run
without it; :func:`plot_all` says what to install when it is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install -e '.[bench]'"


def _cdf(ax: Any, values: list[float], label: str) -> None:
    """A cumulative distribution: x the value, y the share of samples at or below it."""
    if not values:
        return
    xs = sorted(values)
    ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{label} (n={len(xs):,})")
    ax.set_ylabel("share of samples at or below")
    ax.grid(True, alpha=0.3)


def _plain(axis: Any, ticks: list[float] | None = None) -> None:
    """Label a log axis in plain numbers (``1,000``, not ``10^3``), ticked at ``ticks`` if given."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    if ticks:
        axis.set_ticks(ticks)
        axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 10 else f"{v:g}"))


def throughput(d: dict[str, Any], fig: Any) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    _cdf(ax1, d.get("latencies_ms", []), f"{d['concurrency']} in flight")
    ax1.set_xlabel("run latency, start -> result (ms)")
    ax1.set_title(f"{d['runs']:,} trivial runs: {d['runs_per_s']:,.0f} runs/s")
    ax1.legend()
    points = sorted([*d.get("sweep", []), {"concurrency": d["concurrency"], "runs_per_s": d["runs_per_s"],
                                           "p50_ms": d["p50_ms"]}], key=lambda p: p["concurrency"])
    xs = [p["concurrency"] for p in points]
    ax2.plot(xs, [p["runs_per_s"] for p in points], "o-", color="tab:blue", label="runs/s")
    ax2.set_xscale("log")
    _plain(ax2.xaxis, xs)
    ax2.set_xlabel("runs in flight")
    ax2.set_ylabel("runs/s", color="tab:blue")
    ax2.grid(True, alpha=0.3)
    twin = ax2.twinx()
    twin.plot(xs, [p["p50_ms"] for p in points], "s--", color="tab:red", label="p50 latency")
    twin.set_ylabel("p50 latency (ms)", color="tab:red")
    ax2.set_title(f"throughput vs in-flight (raw publishes {d['jetstream_publish_per_s']:,.0f}/s)")


def event_latency(d: dict[str, Any], fig: Any) -> None:
    ax = fig.subplots()
    seq = d["sequential"]
    _cdf(ax, seq.get("event_to_resumed_ms", []), "event -> resumed (wait_resolved.at)")
    _cdf(ax, seq.get("end_to_end_ms", []), "event -> result at the driver")
    ax.set_xscale("log")
    _plain(ax.xaxis)
    ax.set_xlabel("ms")
    ax.set_title(f"one event at a time, {d['waiting']:,} runs waiting")
    ax.legend()


def router_burst(d: dict[str, Any], fig: Any) -> None:
    ax = fig.subplots()
    for r in d["rounds"]:
        _cdf(ax, r.get("send_to_resumed_ms", []), f"{r['mode']}, round {r['round']}: {r['resumed_per_s']:,.0f}/s")
    ax.set_xlabel("send -> resumed (ms)")
    ax.set_title(f"{d['waiting']:,} waiting runs released together")
    ax.legend()


def timers_at_scale(d: dict[str, Any], fig: Any) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    rows = d["rows"]
    for r in rows:
        _cdf(ax1, r.get("lateness_ms", []), f"{r['runs']:,} asleep")
    ax1.set_xlabel("lateness: sleep_fired.at - wake_at (ms)")
    ax1.set_title("timer lateness, all due within one second")
    ax1.legend()
    xs = [r["asleep_at_once"] for r in rows]
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s-"), ("max_ms", "^--")):
        ax2.plot(xs, [r["lateness"][key] for r in rows], style, label=f"lateness {key.removesuffix('_ms')}")
    ax2.set_xscale("log")
    _plain(ax2.xaxis, xs)
    ax2.set_xlabel("runs asleep at once")
    ax2.set_ylabel("ms")
    ax2.grid(True, alpha=0.3)
    ax2.set_title("lateness vs sleepers")
    ax2.legend()


def turn_cost(d: dict[str, Any], fig: Any) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    big = d["rows"][-1]
    turns = range(1, len(big["turn_ms"]) + 1)
    ax1.plot(turns, big["turn_ms"], ".", ms=2, label="turn (send -> parked again)")
    ax1.plot(turns, big["wake_ms"], ".", ms=2, label="wake (send -> activation entry)")
    ax1.plot(turns, big["replay_ms"], ".", ms=2, label="replay (activation -> next wait)")
    ax1.set_xlabel("turn number (history grows ~4 entries per turn)")
    ax1.set_ylabel("ms")
    ax1.set_title(f"every turn of the K={big['k']:,} run")
    ax1.grid(True, alpha=0.3)
    ax1.legend(markerscale=4)
    ks = [r["k"] for r in d["rows"]]
    ax2.plot(ks, [r["kth_turn_ms"] for r in d["rows"]], "o-", label="K-th turn")
    ax2.plot(ks, [r["last10_mean_ms"] for r in d["rows"]], "s--", label="mean of the last 10 turns")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    _plain(ax2.xaxis, ks)
    _plain(ax2.yaxis)
    ax2.set_xlabel("K (turns so far)")
    ax2.set_ylabel("ms")
    ax2.grid(True, alpha=0.3)
    ax2.set_title("turn cost vs K")
    ax2.legend()


FANOUT_BARS = (("start_to_first_turn_ms", "start -> first turn"), ("spawn_ms", "spawn checkpoint"),
               ("spawn_to_first_child_result_ms", "spawn -> first child result"),
               ("spawn_to_last_child_result_ms", "spawn -> last child result"),
               ("resume_ms", "resume after the last child"))


def fanout(d: dict[str, Any], fig: Any) -> None:
    ax = fig.subplots()
    med = d["median"]["fanout"]
    bars = [(label, med[key]) for key, label in FANOUT_BARS if key in med]
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("ms (median of rounds)")
    ax.set_title(f"1 parent -> {d['settings']['children']:,} children: {med['children_per_s']:,.0f} children/s; "
                 f"top-level {d['median']['toplevel']['runs_per_s']:,.0f} runs/s")
    ax.grid(True, axis="x", alpha=0.3)


def memory_waiting(d: dict[str, Any], fig: Any) -> None:
    ax = fig.subplots()
    pts = d["points"]
    xs = [p["parked"] for p in pts]
    ax.plot(xs, [p["worker"] / 1024 for p in pts], "o-", label=f"worker RSS ({d['worker_kib_per_run']:.2f} KiB/run)")
    ax.plot(xs, [p["server"] / 1024 for p in pts], "s-",
            label=f"nats-server RSS ({d['server_kib_per_run']:.2f} KiB/run)")
    ax.plot(xs, [p["stored_bytes"] / 2**20 for p in pts], "^--",
            label=f"JetStream stored ({d['stored_bytes_per_run']:,.0f} B/run)")
    ax.set_xlabel(f"runs parked on a wait (after {d['warmup']} warm-up runs)")
    ax.set_ylabel("MiB")
    ax.grid(True, alpha=0.3)
    ax.set_title("memory vs waiting runs")
    ax.legend()


def tracing_overhead(d: dict[str, Any], fig: Any) -> None:
    ax = fig.subplots()
    for mode, color in (("off", "tab:blue"), ("on", "tab:orange")):
        rows = [r for r in d["rounds"] if r["mode"] == mode]
        ax.bar([r["round"] for r in rows], [r["runs_per_s"] for r in rows], color=color, label=f"tracing {mode}")
    ax.set_xlabel("round (off and on alternate; a fresh server each)")
    ax.set_ylabel("runs/s")
    ax.set_title(f"tracing on / off = {d['ratio_on_off']:.3f}")
    ax.legend()


PLOTS: dict[str, Callable[[dict[str, Any], Any], None]] = {
    "throughput": throughput, "event_latency": event_latency, "router_burst": router_burst,
    "timers_at_scale": timers_at_scale, "turn_cost": turn_cost, "fanout": fanout,
    "memory_waiting": memory_waiting, "tracing_overhead": tracing_overhead,
}
WIDE = {"throughput", "timers_at_scale", "turn_cost"}


def plot_all(results: dict[str, dict[str, Any]], out_dir: Path) -> list[str]:
    """``NAME.png`` in ``out_dir`` for each result; returns problems to report (nothing raised)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [f"plots skipped: matplotlib is not installed (install it with `{INSTALL_HINT}`)"]
    problems = []
    for name, data in results.items():
        fig = plt.figure(figsize=(12, 4.5) if name in WIDE else (8, 4.5))
        try:
            PLOTS[name](data, fig)
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}.png", dpi=90)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            problems.append(f"no plot for {name}: {type(e).__name__}: {e}")
        finally:
            plt.close(fig)
    return problems
