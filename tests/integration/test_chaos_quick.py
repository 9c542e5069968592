"""The chaos harness's quick mode end to end: one server, 300 runs, 12 host SIGKILLs, one server restart.

It runs ``python -m benchmarks.chaos --quick`` as a user would (it starts and stops its own
nats-server and host processes) and requires exit 0 with no violation in its JSON report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_chaos_quick_finds_no_violation(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.chaos", "--quick", "--seed", "1", "--json", str(report_path),
         "--workdir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=230,
    )
    assert report_path.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    assert report["host_kills"] >= 10 and report["server_restarts"] == 1
    assert report["violations"] == [], proc.stdout[-6000:]
    assert proc.returncode == 0, proc.stdout[-3000:]
