"""``bide event push|send`` and ``bide serve`` as a user runs them: real processes, a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from actors.store.server import EmbeddedServer, free_port
from sdk import Bide, DurableContext, EmptyModel, RunStatus
from tests.support import REPO, running_worker, wait_until


def bide_cli(*args: str, url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m actors.apps.cli ARGS`` with ``BIDE_NATS_URL=url``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "BIDE_NATS_URL": url}
    env.pop("BIDE_API_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "actors.apps.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


async def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    """The command in a child process, without blocking the loop the in-process worker runs on."""
    return await asyncio.to_thread(bide_cli, *args, url=url)


async def test_event_push_prints_the_event_and_resumes_a_wait(nats_server: EmbeddedServer, bide: Bide) -> None:
    @bide.durable_task(name="CliWaits")
    async def cli_waits(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        return {"got": await ctx.aio_wait_for_event("order:paid", scope="shop-1")}

    url = nats_server.url
    async with running_worker(bide, [cli_waits]):
        ref = await cli_waits.aio_run_no_wait(EmptyModel())

        async def is_waiting() -> bool:
            return (await bide.runs.aio_get(ref.workflow_run_id)).status is RunStatus.WAITING

        await wait_until(is_waiting, what="the run to wait")
        out = await cli("event", "push", "order:paid", "--data", '{"order": 42}', "--scope", "shop-1",
                        "--id", "paid-42", url=url)
        assert out.returncode == 0, out.stderr
        ref_json = json.loads(out.stdout)
        assert ref_json["event_id"] == "paid-42" and ref_json["key"] == "order:paid"
        assert ref_json["scope"] == "shop-1" and isinstance(ref_json["seq"], int) and ref_json["seq"] >= 1
        assert set(ref_json) == {"event_id", "key", "scope", "seq"}
        assert await ref.aio_result(timeout=10) == {"got": {"order": 42}}

    unscoped = await cli("event", "push", "ping", url=url)
    assert unscoped.returncode == 0, unscoped.stderr
    assert json.loads(unscoped.stdout)["scope"] is None


async def test_event_send_delivers_to_the_run(nats_server: EmbeddedServer, bide: Bide) -> None:
    @bide.durable_task(name="CliApproval")
    async def cli_approval(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        return {"approval": await ctx.aio_wait_for_event("manager-approval", timeout="30s")}

    url = nats_server.url
    async with running_worker(bide, [cli_approval]):
        ref = await cli_approval.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id
        out = await cli("event", "send", run_id, "manager-approval", "--data", '{"approved": true}', url=url)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"status": "delivered", "execution_id": run_id,
                                          "event_name": "manager-approval"}
        assert await ref.aio_result(timeout=10) == {"approval": {"approved": True}}

        finished = await cli("event", "send", run_id, "manager-approval", "--data", "1", url=url)
        assert finished.returncode == 2 and run_id in finished.stderr and "finished" in finished.stderr


def test_bad_data_and_unknown_run_exit_2(nats_server: EmbeddedServer) -> None:
    url = nats_server.url
    bad = bide_cli("event", "push", "k", "--data", "{not json", url=url)
    assert bad.returncode == 2
    assert "--data is not valid JSON: " in bad.stderr and "{not json" in bad.stderr
    assert bad.stdout == ""

    bad_send = bide_cli("event", "send", "some-run", "ev", "--data", "[1,", url=url)
    assert bad_send.returncode == 2 and "--data is not valid JSON: " in bad_send.stderr

    unknown = bide_cli("event", "send", "no-such-run", "ev", "--data", "{}", url=url)
    assert unknown.returncode == 2
    assert "no run with id 'no-such-run'" in unknown.stderr


def test_serve_answers_http_until_sigterm(nats_server: EmbeddedServer) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "BIDE_NATS_URL": nats_server.url, "BIDE_API_TOKEN": "tok"}
    proc = subprocess.Popen([sys.executable, "-m", "actors.apps.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the server listens (or the process dies)
        assert line == f"serving HTTP API on http://127.0.0.1:{port}\n", proc.stderr.read() if proc.stderr else ""
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert http.post("/api/v1/events", json={"key": "k"}).status_code == 401
            ok = http.post("/api/v1/events", json={"key": "k", "payload": [1]},
                           headers={"Authorization": "Bearer tok"})
            assert ok.status_code == 202 and ok.json()["status"] == "accepted"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    taken = subprocess.run([sys.executable, "-m", "actors.apps.cli", "serve", "--port", "0"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert taken.returncode == 2 and "--port" in taken.stderr


def test_serve_without_nats_exits_2() -> None:
    out = bide_cli("serve", "--no-auth", "--port", str(free_port()), url=f"nats://127.0.0.1:{free_port()}",
                   timeout=30)
    assert out.returncode == 2 and "cannot connect to NATS" in out.stderr
    assert "serving HTTP API" not in out.stdout


def test_serve_takes_its_token_from_the_environment_or_a_file_never_the_command_line(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    argv = bide_cli("serve", "--token", "s3cret", url=url, timeout=30)
    assert argv.returncode == 2 and "BIDE_API_TOKEN" in argv.stderr and "s3cret" not in argv.stderr
    none = bide_cli("serve", url=url, timeout=30)
    assert none.returncode == 2 and "--no-auth" in none.stderr
    empty = tmp_path / "token"
    empty.write_text("\n")
    assert "is empty" in bide_cli("serve", "--token-file", str(empty), url=url, timeout=30).stderr
    empty.write_text("tok\n")  # a good file gets as far as connecting (no server here)
    assert "cannot connect to NATS" in bide_cli("serve", "--token-file", str(empty), url=url, timeout=30).stderr
