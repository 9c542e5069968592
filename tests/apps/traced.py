"""A traced run for ``tests/integration/test_tracing.py``: a step, a child, a sleep and an event wait.

Hosted in-process or by ``WorkerProcess("tests.apps.traced:worker")``. In a worker process,
spans go where the environment says: ``BIDE_TEST_SPAN_FILE`` names a JSON-lines file written
as each span ends (so a SIGKILL loses none already ended); otherwise the standard ``OTEL_*``
variables configure export (the OTLP test).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import orjson
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from pydantic import BaseModel

from sdk import Bide, DurableContext, EmptyModel, TaskDefinition

EVENT_KEY = "traced:approved"


class TracedInput(BaseModel):
    n: int
    sleep_s: float
    scope: str


class ChildInput(BaseModel):
    n: int


class Approval(BaseModel):
    ok: bool


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as plain data (the same shape from a file, memory or an OTLP request)."""
    ctx = span.context
    assert ctx is not None
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "kind": span.kind.name,
        "start": span.start_time,
        "end": span.end_time,
        "attributes": dict(span.attributes or {}),
        "links": [{"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
                  for link in span.links],
        "status": span.status.status_code.name,
    }


class JsonLinesExporter(SpanExporter):
    """Appends each span to a file as it ends (with a SimpleSpanProcessor)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "ab") as f:
            for s in spans:
                f.write(orjson.dumps(span_record(s)) + b"\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def double(n: int) -> int:
    return n * 2


def define(client: Bide) -> dict[str, TaskDefinition]:
    @client.task(name="TracedChild")
    async def traced_child(input: ChildInput, ctx: Any) -> dict[str, int]:
        return {"squared": input.n * input.n}

    @client.durable_task(name="TracedRun")
    async def traced_run(input: TracedInput, ctx: DurableContext) -> dict[str, Any]:
        doubled = await ctx.memo(double, input.n)
        child = await traced_child.aio_run(ChildInput(n=doubled))
        await ctx.aio_sleep_for(input.sleep_s)
        approval = await ctx.aio_wait_for_event(EVENT_KEY, scope=input.scope, payload_validator=Approval)
        return {"doubled": doubled, "child": child, "approved": approval.ok}

    @client.durable_task(name="TracedDetached")
    async def traced_detached(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        ref = await traced_child.aio_run_no_wait(ChildInput(n=3))
        return {"child": await ref.aio_result()}

    return {"child": traced_child, "run": traced_run, "detached": traced_detached}


def _client() -> Bide:
    path = os.environ.get("BIDE_TEST_SPAN_FILE")
    if not path:
        return Bide()  # OTEL_* from the environment
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    return Bide(tracer_provider=provider)


bide = _client()
tasks = define(bide)
worker = bide.worker("traced-app", workflows=list(tasks.values()))
