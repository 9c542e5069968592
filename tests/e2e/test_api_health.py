"""``bide serve``'s ``/readyz`` as a probe sees it, with NATS going away (SIGKILL) and coming back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from actors.apps.http_api import create_app
from actors.store.server import EmbeddedServer, free_port
from sdk import Bide
from tests.support import REPO, wait_until

NATS_PASSWORD = "nats-pw-d0-not-echo"
API_TOKEN = "api-token-d0-not-echo"


def start_api(nats_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``bide serve`` in a child process; returns once it says it is serving."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "BIDE_NATS_URL": nats_url, "BIDE_API_TOKEN": API_TOKEN}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "actors.apps.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while b"serving HTTP API" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"bide serve did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


async def test_readyz_follows_nats_and_never_needs_the_token_nor_echoes_credentials(tmp_path: Path) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "js",
                            config=f'authorization {{ user: api, password: "{NATS_PASSWORD}" }}').start()
    port = free_port()
    api = start_api(f"nats://api:{NATS_PASSWORD}@127.0.0.1:{server.port}", port, tmp_path / "api.log")
    bodies: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as probe:
            ready = await probe.get("/readyz")  # no Authorization header: probes carry no token
            assert ready.status_code == 200 and ready.json() == {"status": "ready"}
            assert (await probe.get("/api/v1/runs/x")).status_code == 401  # the API itself still needs it

            server.kill()  # NATS dies: the API is alive, and not ready

            async def not_ready() -> bool:
                resp = await probe.get("/readyz")
                bodies.append(resp.text)
                return resp.status_code == 503 and resp.json()["status"] == "not ready" and \
                    "not connected to NATS" in " ".join(resp.json()["problems"])

            await wait_until(not_ready, timeout=20, what="/readyz to say 503")
            assert (await probe.get("/healthz")).status_code == 200

            server.start()  # back on the same port with the same store: ready again

            async def ready_again() -> bool:
                resp = await probe.get("/readyz")
                bodies.append(resp.text)
                return resp.status_code == 200

            await wait_until(ready_again, timeout=30, what="/readyz to be 200 again")
        for body in bodies:
            assert NATS_PASSWORD not in body and API_TOKEN not in body
    finally:
        if api.poll() is None:
            api.send_signal(signal.SIGTERM)
            try:
                api.wait(timeout=15)
            except subprocess.TimeoutExpired:
                api.kill()
        server.stop()
    log = (tmp_path / "api.log").read_text()
    assert NATS_PASSWORD not in log and API_TOKEN not in log, log


async def test_readyz_names_a_missing_stream(tmp_path: Path) -> None:
    """Connected, but the store lost a stream (deleted by hand, a wiped store): 503 naming it."""
    with EmbeddedServer(store_dir=tmp_path / "js") as server:
        bide = Bide(server.url)
        try:
            app = create_app(bide, token="t")
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as probe:
                assert (await probe.get("/readyz")).status_code == 200
                conn = await bide._pool.get()
                await conn.js.delete_stream(conn.layout.subjects.events_stream)
                resp = await probe.get("/readyz")
                assert resp.status_code == 503
                assert resp.json() == {"status": "not ready",
                                       "problems": [f"stream {conn.layout.subjects.events_stream} is missing"]}
        finally:
            await bide.aclose()
