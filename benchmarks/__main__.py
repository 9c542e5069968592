"""Run every benchmark, one after another; write their JSON and plots, and regenerate benchmarks/README.md.

    python -m benchmarks                      # full sizes (about 6 minutes on a 2-core machine)
    python -m benchmarks --quick              # small sizes, under two minutes: a smoke test for CI
    python -m benchmarks --only turn_cost,timers_at_scale

Measures the raw JetStream publish rate on a fresh server before and after the benchmarks,
then runs each benchmark as its own process with ``--json benchmarks/results/NAME.json`` (its
output in ``NAME.log``), plots each (``NAME.png``, needs matplotlib: ``pip install -e '.[bench]'``)
and writes a README with the machine, every headline number and its ratio to the raw publish
rate. ``--quick`` writes to ``benchmarks/results/quick/`` (README included) and leaves the
full results alone. Exits 1 if any benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks import suite, suite_plots, suite_report

HERE = Path(__file__).resolve().parent


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (CI smoke test, under two minutes)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(suite.NAMES)}")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results, or benchmarks/results/quick with --quick)")
    args = ap.parse_args()
    wanted = [n for n in args.only.split(",") if n]
    unknown = sorted(set(wanted) - set(suite.NAMES))
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(suite.NAMES)}")
    args.names = [n for n in suite.NAMES if not wanted or n in wanted]
    return args


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def run_all(names: list[str], quick: bool, out_dir: Path) -> list[suite.Outcome]:
    """Each benchmark in turn, under one progress bar (its postfix: the benchmark's last output line)."""
    outcomes = []
    benches = [b for b in suite.BENCHMARKS if b.name in names]
    live = sys.stderr.isatty()  # a log (CI) gets one line per benchmark, not every output line redrawn
    with tqdm(total=len(benches), unit="benchmark", file=sys.stderr, dynamic_ncols=True) as bar:

        def status(line: str) -> None:
            if live:
                bar.set_postfix_str(line[:70])

        for bench in benches:
            bar.set_description(bench.name)
            outcome = suite.run_one(bench, quick, out_dir, status)
            outcomes.append(outcome)
            state = "ok" if outcome.ok else f"FAILED ({outcome.detail})"
            bar.write(f"{bench.name}: {state} in {outcome.wall_s:.0f} s", file=sys.stderr)
            bar.update(1)
    return outcomes


def main() -> int:
    args = parse()
    quick: bool = args.quick
    default_out = HERE / "results" / "quick" if quick else HERE / "results"
    out_dir: Path = args.out or default_out
    out_dir.mkdir(parents=True, exist_ok=True)
    readme_path = HERE / "README.md" if out_dir.resolve() == (HERE / "results").resolve() else out_dir / "README.md"
    plots = has_matplotlib()
    if not plots:
        print(f"matplotlib is not installed: the benchmarks run, the plots are skipped "
              f"(install it with `{suite_plots.INSTALL_HINT}`)", file=sys.stderr)

    t0 = time.monotonic()
    messages = 5000 if quick else 20000
    machine = suite.machine()
    publish = [suite.publish_rate(messages)]
    print(f"raw JetStream publishes: {publish[0]:,.0f}/s; running {', '.join(args.names)}", file=sys.stderr)
    outcomes = run_all(args.names, quick, out_dir)
    publish.append(suite.publish_rate(messages))
    mean_publish = round(sum(publish) / len(publish), 1)
    for o in outcomes:
        if o.ok:
            suite.record(out_dir / f"{o.name}.json", {"publish_per_s": mean_publish})

    failed = [f"{o.name}: {o.detail}" for o in outcomes if not o.ok]
    summary: dict[str, Any] = {"machine": machine, "publish_per_s": [round(p, 1) for p in publish], "quick": quick,
                               "wall_s": round(time.monotonic() - t0, 1), "ran": args.names, "failed": failed}
    (out_dir / "suite.json").write_text(json.dumps(summary, indent=2))
    results = suite_report.load(out_dir, suite.NAMES)
    problems = suite_plots.plot_all(results, out_dir) if plots else [
        f"plots skipped: matplotlib is not installed (install it with `{suite_plots.INSTALL_HINT}`)"]
    summary["notes"] = problems
    readme_path.write_text(suite_report.readme(results, summary, readme_path, out_dir))

    print("\n".join(suite_report.table(results)))
    for p in problems:
        print(p, file=sys.stderr)
    print(f"suite: {len(outcomes) - len(failed)} of {len(outcomes)} benchmarks ok in {summary['wall_s']:.0f} s; "
          f"wrote {readme_path}", file=sys.stderr)
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
