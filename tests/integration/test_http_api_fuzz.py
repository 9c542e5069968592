"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis), served by uvicorn on a real nats-server.

Every operation gets generated requests, valid and invalid; each answer must be documented
(status code, content type, body schema), a request the schema allows must be accepted and
one it forbids refused, and none may be a server error: NATS is up throughout, so even the
documented 503 would be a finding here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from actors.apps.http_api import create_app, serve_http
from actors.store.server import EmbeddedServer, free_port
from sdk import Bide, DurableContext, EmptyModel
from tests.support import running_worker

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# The schema the server publishes: the same app, over a client that never connects.
schema = schemathesis.openapi.from_dict(create_app(Bide("nats://127.0.0.1:1"), TOKEN).openapi())


class ApiInThread:
    """``serve_http`` (uvicorn) and a worker with one waiting run, on their own loop in a thread."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.port = free_port()
        self.run_id = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="fuzzed-api", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiInThread:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise AssertionError(f"the API did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        bide = Bide(self.nats_url, ack_wait=3.0)

        @bide.durable_task(name="FuzzWaits")
        async def fuzz_waits(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
            return {"got": await ctx.aio_wait_for_event("fuzz:never", timeout="1h")}

        listening = asyncio.Event()
        server = asyncio.create_task(serve_http(bide, "127.0.0.1", self.port, TOKEN, listening))
        try:
            async with running_worker(bide, [fuzz_waits]):
                self.run_id = (await fuzz_waits.aio_run_no_wait(EmptyModel())).workflow_run_id
                await asyncio.wait_for(listening.wait(), 10)
                self._ready.set()
                await self._stop.wait()
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
            await bide.aclose()


@pytest.fixture(scope="module")
def api() -> Iterator[ApiInThread]:
    server = EmbeddedServer().start()
    running = ApiInThread(server.url)
    try:
        yield running.start()
    finally:
        running.stop()
        server.kill()
        server.stop()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_documented_and_none_is_a_server_error(case: Any, api: ApiInThread) -> None:
    run_id = (case.path_parameters or {}).get("run_id")
    positive = case.meta is not None and case.meta.generation.mode is schemathesis.GenerationMode.POSITIVE
    if positive and isinstance(run_id, str) and hash(run_id) % 2:
        case.path_parameters["run_id"] = api.run_id  # half the valid ids name a run that exists (and waits)
    response = case.call(base_url=api.base_url, headers=AUTH, timeout=10)
    # The payload limits (sdk.limits: integers within int64, nesting depth) are documented in words:
    # JSON Schema cannot tell the integer 10**30 from the float 1e30. Such a 400 is no finding.
    over_a_limit = response.status_code == 400 and "over Bide's limit of" in response.text
    # Only the headers made invalid: the call replaces Authorization with the real token, and any
    # other header (the extra ones it invents) is ignored, as HTTP allows. Accepting it is no finding.
    negative = {where for where, c in (case.meta.components if case.meta is not None else {}).items()
                if c.mode is schemathesis.GenerationMode.NEGATIVE}
    # Likewise a query made invalid only in a way a URL cannot carry: a null left out, a number, a
    # boolean or a one-item array sent as its text. Every query value on the wire is a string (the
    # API checks its meaning and answers 400); a name it does not know, or one given twice that is
    # not a list (`meta` is), is what the schema's shape can still catch on the wire, so only those
    # count. A repeated `meta` read as invalid once failed the suite on a query that was valid as sent.
    sent = [name for name, _ in parse_qsl(urlsplit(str(response.request.url)).query, keep_blank_values=True)]
    query_params = [p for p in case.operation.definition.raw.get("parameters", []) if p.get("in") == "query"]
    known = {p["name"] for p in query_params}
    repeatable = {p["name"] for p in query_params if _is_array(p.get("schema", {}))}  # `meta=a=1&meta=b=2`
    twice = {name for name in sent if sent.count(name) > 1}
    query_as_sent_is_valid = set(sent) <= known and twice <= repeatable
    ineffective = {ParameterLocation.HEADER} | ({ParameterLocation.QUERY} if query_as_sent_is_valid else set())
    excluded = [positive_data_acceptance] if over_a_limit else []
    if negative and negative <= ineffective:
        excluded.append(negative_data_rejection)
    case.validate_response(response, headers=AUTH, excluded_checks=excluded or None)


def _is_array(schema: dict[str, Any]) -> bool:
    """Whether a query parameter's schema takes a list (the name may then be given more than once)."""
    return schema.get("type") == "array" or any(_is_array(alt) for alt in schema.get("anyOf", []))
