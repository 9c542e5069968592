"""``bide worker --health-port``: liveness and readiness as a probe sees them, with NATS going away."""

from __future__ import annotations

from pathlib import Path

import httpx

from actors.store.server import EmbeddedServer, free_port
from tests.support import WorkerProcess, wait_until


async def test_readyz_follows_the_connection_and_healthz_the_process(tmp_path: Path) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "js").start()
    port = free_port()
    worker = WorkerProcess("tests.apps.children:worker", server.url,
                           extra_args=["--health-port", str(port), "--health-host", "127.0.0.1"])
    try:
        worker.start()  # "ready" is printed once every consumer is bound
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as probe:
            assert (await probe.get("/healthz")).json() == {"status": "ok"}
            ready = await probe.get("/readyz")
            assert ready.status_code == 200 and ready.json() == {"status": "ready"}

            server.kill()  # NATS goes away: the worker is alive, and not ready

            async def not_ready() -> bool:
                resp = await probe.get("/readyz")
                return resp.status_code == 503 and "not connected to NATS" in " ".join(resp.json()["problems"])

            await wait_until(not_ready, timeout=20, what="/readyz to say 503")
            assert (await probe.get("/healthz")).status_code == 200

            server.start()  # back (same store, same port): ready again

            async def ready_again() -> bool:
                return (await probe.get("/readyz")).status_code == 200

            await wait_until(ready_again, timeout=30, what="/readyz to be 200 again")
        assert worker.terminate() == 0
    finally:
        worker.kill()
        server.stop()
