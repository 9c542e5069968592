"""The command line as a user runs it: real processes, real servers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from actors.store.server import EmbeddedServer, free_port
from tests.support import REPO, WorkerProcess, free_ports_in_a_row


def bide(*args: str, url: str | None = None, timeout: float = 60,
         extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    if url:
        env["BIDE_NATS_URL"] = url
    return subprocess.run([sys.executable, "-m", "actors.apps.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_readme_first_command_runs_the_durable_example(tmp_path: Path) -> None:
    out = bide("dev", "examples.durable.worker", "--run", "SimpleDurable", "--port", str(free_port()),
               "--store", str(tmp_path / "js"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"result": "slept", "seconds": 5}


def test_run_and_show_against_a_worker(nats_server: EmbeddedServer) -> None:
    worker = WorkerProcess("examples.durable.worker:worker", nats_server.url).start()
    url = nats_server.url
    try:
        ok = bide("run", "Hello", "--input", "{}", url=url)
        assert ok.returncode == 0, ok.stderr
        assert "hello" in json.loads(ok.stdout)

        bad = bide("run", "Hello", "--input", "not json", url=url)
        assert bad.returncode == 2 and "not json" in bad.stderr and "JSON" in bad.stderr

        unknown = bide("run", "NoSuchTask", url=url)
        assert unknown.returncode == 2 and "NoSuchTask" in unknown.stderr and "Hello" in unknown.stderr

        started = bide("run", "StepsThenSleep", "--no-wait", url=url)
        assert started.returncode == 0, started.stderr
        run_id = started.stdout.strip()
        deadline = time.monotonic() + 30
        while True:
            shown = bide("runs", "show", run_id, url=url)
            assert shown.returncode == 0, shown.stderr
            if "status completed" in shown.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for kind in ("run_started", "memo", "now", "sleep_scheduled", "sleep_fired", "run_completed"):
            assert kind in shown.stdout, shown.stdout
        assert "status completed" in shown.stdout

        missing = bide("runs", "show", "nosuchrun", url=url)
        assert missing.returncode == 2 and "no run with id" in missing.stderr

        # Traced, `bide run` says where the run's trace is; the spans (console exporter) carry that id.
        traced = bide("run", "Hello", url=url, extra_env={"OTEL_TRACES_EXPORTER": "console"})
        assert traced.returncode == 0, traced.stderr
        found = re.search(r"^run (\S+)  trace ([0-9a-f]{32})$", traced.stderr, re.MULTILINE)
        assert found, traced.stderr
        assert f'"trace_id": "0x{found[2]}"' in traced.stdout, traced.stdout
        shown = bide("runs", "show", found[1], url=url)
        assert f"trace {found[2]}" in shown.stdout
    finally:
        worker.kill()


def test_worker_without_a_server_says_so() -> None:
    t0 = time.monotonic()
    out = bide("worker", "examples.durable.worker:worker", url=f"nats://127.0.0.1:{free_port()}", timeout=30)
    assert out.returncode != 0
    assert "cannot connect to NATS" in out.stderr + out.stdout
    assert time.monotonic() - t0 < 15


CHANGED_EXAMPLE = '''
from sdk import Bide, DurableContext, EmptyModel

bide = Bide()


@bide.durable_task(name="StepsThenSleep")
async def steps_then_sleep(input: EmptyModel, ctx: DurableContext) -> dict[str, int | str]:
    started = await ctx.aio_now()  # moved before the step: runs already recorded cannot resume
    await ctx.aio_sleep_for("2s")
    return {"started": started.isoformat()}
'''


def test_export_a_run_and_replay_it_against_old_and_changed_code(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    worker = WorkerProcess("examples.durable.worker:worker", nats_server.url).start()
    url = nats_server.url
    try:
        started = bide("run", "StepsThenSleep", url=url)
        assert started.returncode == 0, started.stderr
        run_id = re.search(r"^run (\S+)", started.stderr, re.MULTILINE)
        assert run_id, started.stderr
        out = tmp_path / "run.json"
        exported = bide("runs", "export", run_id[1], "--output", str(out), url=url)
        assert exported.returncode == 0, exported.stderr
        doc = json.loads(out.read_text())
        assert doc["format"] == "bide.run-history/1" and doc["task"] == "StepsThenSleep"
        printed = bide("runs", "export", run_id[1], url=url)
        assert json.loads(printed.stdout)["entries"] == doc["entries"]
    finally:
        worker.kill()

    same = bide("replay", "examples.durable.worker:worker", str(out))
    assert same.returncode == 0 and "compatible" in same.stdout, same.stdout + same.stderr
    (tmp_path / "changed_example.py").write_text(CHANGED_EXAMPLE)
    changed = bide("replay", "changed_example", str(out), extra_env={"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"})
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert "NOT compatible" in changed.stdout and "position 0" in changed.stdout and "fetch_order" in changed.stdout
    missing = bide("replay", "examples.durable.worker:worker", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "no run export at" in missing.stderr


def test_dev_cluster_runs_three_nodes_at_three_replicas_and_more_workers_then_stops_them_all(tmp_path: Path) -> None:
    port = free_ports_in_a_row(3)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "actors.apps.cli", "dev", "examples.durable.worker",
                             "--cluster", "3", "--workers", "2", "--port", str(port), "--store", str(tmp_path / "js"),
                             "--http-port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while not any("worker(s) up" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "bide dev exited:\n" + "".join(lines)
            lines.append(line)
        url = next(m.group(1) for line in lines if (m := re.search(r"BIDE_NATS_URL=(\S+)", line)))
        assert url.count(",") == 2
        extra = [int(m.group(1)) for line in lines if (m := re.search(r"worker process (\d+)", line))]
        assert len(extra) == 1
        status = bide("status", "--json", url=url, extra_env={"BIDE_REPLICAS": "3"})
        assert status.returncode == 0, status.stderr
        streams = json.loads(status.stdout)["streams"]
        assert streams and all(s["replicas"] == 3 for s in streams), streams
        assert {s["name"] for s in streams} >= {"BIDE_HISTORY", "BIDE_WORK", "BIDE_EVENTS", "BIDE_RUNS",
                                                "BIDE_OUTCOMES"}, streams
        ran = bide("run", "Hello", "--input", "{}", url=url, extra_env={"BIDE_REPLICAS": "3"})
        assert ran.returncode == 0, ran.stderr
        # `bide status` names both hosts (this process and the extra worker) and what each hosts.
        deadline = time.monotonic() + 30
        while True:
            hosts = json.loads(bide("status", "--json", url=url, extra_env={"BIDE_REPLICAS": "3"}).stdout)["hosts"]
            if len(hosts) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(hosts) == 2, hosts
        assert all("Hello" in h["tasks"] and h["durable_slots"]["of"] > 0 for h in hosts), hosts
        assert any(f":{extra[0]}" in h["host"] for h in hosts)
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        for pid in extra:  # the extra worker was stopped with dev
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        for p in (port, port + 1, port + 2):  # and every node
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", p)) != 0, f"a node still listens on {p}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
