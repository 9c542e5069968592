"""Liveness and readiness of a worker for probes and load balancers: ``bide worker --health-port P``.

=================  ==============================================================================
``GET /healthz``   200 while the worker's event loop answers (liveness)
``GET /readyz``    200 when every host is connected, its streams set up and its consumers bound;
                   503 with the reasons otherwise (starting, stopping, reconnecting to NATS)
=================  ==============================================================================
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from sdk.worker import Worker


def create_health_app(workers: list[Worker]) -> FastAPI:
    app = FastAPI(title="Bide worker health", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Any:
        problems = [f"{w.name}: {p}" for w in workers
                    for p in (w.host.not_ready() if w.host is not None else ["not started"])]
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return {"status": "ready"}

    return app
