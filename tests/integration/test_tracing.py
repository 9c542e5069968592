"""Tracing against a real nats-server: one trace per run across a SIGKILLed host, replay silent.

Host 1 is a worker process writing each span to a file as it ends (a SIGKILL loses none it
ended); host 2 and the starter run in this process with an in-memory exporter.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, EmptyModel, RunStatus
from tests.apps.traced import EVENT_KEY, Approval, TracedInput, define, span_record
from tests.support import REPO, WorkerProcess, running_worker, wait_until

APP = "tests.apps.traced:worker"
SLEEP_S = 4.0


@pytest.fixture
def memory() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
async def traced(nats_server: EmbeddedServer, memory: tuple[TracerProvider, InMemorySpanExporter]
                 ) -> AsyncIterator[Bide]:
    client = Bide(nats_server.url, ack_wait=3.0, tracer_provider=memory[0])
    try:
        yield client
    finally:
        await client.aclose()


async def _has(client: Bide, run_id: str, kind: str) -> bool:
    return any(e.k == kind for e in (await client.runs.aio_history(run_id)).entries)


def _one(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, f"{len(found)} spans named {name!r}: {found}"
    return found[0]


async def test_one_trace_across_a_host_killed_mid_sleep(
    traced: Bide, nats_server: EmbeddedServer, memory: tuple[TracerProvider, InMemorySpanExporter],
    hosts: list[WorkerProcess], tmp_path: Path,
) -> None:
    span_file = tmp_path / "host1-spans.jsonl"
    tasks = define(traced)
    first = WorkerProcess(APP, nats_server.url, env={"BIDE_TEST_SPAN_FILE": str(span_file)})
    hosts.append(first)
    await asyncio.to_thread(first.start)

    ref = await tasks["run"].aio_run_no_wait(TracedInput(n=4, sleep_s=SLEEP_S, scope="order-7"))
    run_id = ref.workflow_run_id

    async def sleeping() -> bool:
        return await _has(traced, run_id, "sleep_scheduled") and (
            await traced.runs.aio_get(run_id)).status is RunStatus.WAITING

    await wait_until(sleeping, timeout=20, what="the run to sleep, evicted")
    first.kill()  # SIGKILL in the middle of the sleep
    assert not await _has(traced, run_id, "sleep_fired")

    async with running_worker(traced, list(tasks.values())):
        await wait_until(lambda: _has(traced, run_id, "wait_registered"), timeout=20, what="the event wait")
        await traced.event.aio_push(EVENT_KEY, {"ok": True}, scope="order-7")
        assert await ref.aio_result(timeout=20) == {"doubled": 8, "child": {"squared": 64}, "approved": True}

    host1 = [orjson.loads(line) for line in span_file.read_bytes().splitlines()]
    here = [span_record(s) for s in memory[1].get_finished_spans()]
    spans = host1 + here
    child_id = f"{run_id}~1~0"
    ours = [s for s in spans if s["attributes"].get("bide.run_id") in (run_id, child_id)]

    # Exactly one trace, and no span twice (replay on host 2 emitted nothing it had already).
    assert {s["trace_id"] for s in ours} == {ours[0]["trace_id"]}
    assert len({s["span_id"] for s in spans}) == len(spans)

    root = _one(ours, "send bide.queue.TracedRun.{run_id}")
    assert root["kind"] == "PRODUCER" and root["parent_id"] is None and root in here
    assert root["attributes"]["messaging.system"] == "nats"
    assert root["attributes"]["messaging.destination.name"] == f"bide.queue.TracedRun.{run_id}"

    activations = [s for s in ours if s["kind"] == "CONSUMER" and s["attributes"]["bide.run_id"] == run_id]
    assert all(a["parent_id"] == root["span_id"] for a in activations)
    assert any(a in host1 for a in activations) and any(a in here for a in activations)
    assert all(a["attributes"]["bide.task"] == "TracedRun" and a["attributes"]["bide.attempt"] == 1
               for a in activations)
    activation_ids = {a["span_id"] for a in activations}

    memo = _one(spans, "memo double")  # under its activation, it carries only its position
    assert memo in host1 and memo["parent_id"] in activation_ids and memo["trace_id"] == root["trace_id"]

    child_send = _one(ours, "send bide.queue.TracedChild.{run_id}")
    assert child_send in host1 and child_send["parent_id"] in activation_ids
    child_acts = [s for s in ours if s["kind"] == "CONSUMER" and s["attributes"]["bide.run_id"] == child_id]
    assert child_acts and all(a["parent_id"] == child_send["span_id"] for a in child_acts)

    sleep = _one(ours, "sleep")
    assert sleep in here and sleep["parent_id"] == root["span_id"]
    assert sleep["end"] - sleep["start"] >= SLEEP_S * 1e9 - 5e7, "the sleep span covers the real sleep"

    push = _one(spans, "send bide.events.traced:approved.{scope}")
    assert push["kind"] == "PRODUCER" and push["trace_id"] != root["trace_id"]
    wait = _one(ours, "wait_for traced:approved")
    assert wait["parent_id"] == root["span_id"]
    assert {"trace_id": push["trace_id"], "span_id": push["span_id"]} in wait["links"]
    assert wait["attributes"]["bide.event.key"] == EVENT_KEY
    assert wait["attributes"]["bide.event.scope"] == "order-7"
    assert wait["attributes"]["bide.wait.label"]
    resumed = [a for a in activations if a["attributes"]["bide.activation"] == "signal" and a["links"]]
    assert [lk["span_id"] for a in resumed for lk in a["links"]] == [push["span_id"]]

    # Replay is silent: each checkpoint has its one span although host 2 replayed them all.
    names = Counter(s["name"] for s in spans)
    assert names["memo double"] == names["sleep"] == names["wait_for traced:approved"] == 1


async def test_nats_pub_with_traceparent_joins_the_trace(
    traced: Bide, nats_server: EmbeddedServer, memory: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """An event from the stock `nats pub` with a W3C header: the wait links to it, a trigger joins it."""
    @traced.durable_task(name="WaitsForRawEvent")
    async def waits(input: EmptyModel, ctx: DurableContext) -> bool:
        got = await ctx.aio_wait_for_event("raw:ping", payload_validator=Approval)
        return got.ok

    @traced.task(name="StartedByRawEvent", on_events=["raw:start"])
    async def started(input: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return input

    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    header = {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"}
    async with running_worker(traced, [waits, started]):
        ref = await waits.aio_run_no_wait()
        await wait_until(lambda: _has(traced, ref.workflow_run_id, "wait_registered"), timeout=20,
                         what="the wait")
        nc = (await traced._pool.get()).nc
        await nc.publish("bide.events.raw:ping", b'{"ok": true}', headers=header)
        assert await ref.aio_result(timeout=20) is True

        await nc.publish("bide.events.raw:start", b'{"n": 1}', headers=header)

        def triggered() -> list[dict[str, Any]]:
            return [r for r in map(span_record, memory[1].get_finished_spans())
                    if r["kind"] == "CONSUMER" and r["attributes"].get("bide.task") == "StartedByRawEvent"]

        await wait_until(lambda: bool(triggered()), timeout=20, what="the triggered run's activation")

    spans = [span_record(s) for s in memory[1].get_finished_spans()]
    wait = _one(spans, "wait_for raw:ping")
    assert {"trace_id": f"{trace_id:032x}", "span_id": f"{span_id:016x}"} in wait["links"]
    start = _one(spans, "send bide.queue.StartedByRawEvent.{run_id}")
    assert start["trace_id"] == f"{trace_id:032x}" and start["parent_id"] == f"{span_id:016x}"
    assert triggered()[0]["trace_id"] == f"{trace_id:032x}"
    assert triggered()[0]["parent_id"] == start["span_id"]


async def test_fire_and_forget_child_has_its_own_linked_trace(
    traced: Bide, memory: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tasks = define(traced)
    async with running_worker(traced, list(tasks.values())):
        assert await tasks["detached"].aio_run(timeout=20) == {"child": {"squared": 9}}
    spans = [span_record(s) for s in memory[1].get_finished_spans()]
    parent_acts = {s["span_id"]: s for s in spans
                   if s["kind"] == "CONSUMER" and s["attributes"]["bide.task"] == "TracedDetached"}
    child_send = _one(spans, "send bide.queue.TracedChild.{run_id}")
    assert child_send["parent_id"] is None
    assert child_send["trace_id"] not in {s["trace_id"] for s in parent_acts.values()}
    assert [lk["span_id"] for lk in child_send["links"]] and all(
        lk["span_id"] in parent_acts for lk in child_send["links"])


async def test_run_started_untraced_still_has_one_trace(
    nats_server: EmbeddedServer, memory: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A starter with tracing off: the hosts derive the run's trace id from its id."""
    plain = Bide(nats_server.url, ack_wait=3.0)
    host_side = Bide(nats_server.url, ack_wait=3.0, tracer_provider=memory[0])
    try:
        assert not plain.tracing.enabled
        tasks = define(host_side)
        starter = define(plain)
        async with running_worker(host_side, list(tasks.values())):
            ref = await starter["detached"].aio_run_no_wait()
            await ref.aio_result(timeout=20)
        spans = [span_record(s) for s in memory[1].get_finished_spans()]
        acts = [s for s in spans if s["attributes"].get("bide.run_id") == ref.workflow_run_id]
        assert len(acts) >= 2 and len({s["trace_id"] for s in acts}) == 1
        from actors.observe.tracing import derived_context
        assert acts[0]["trace_id"] == f"{derived_context(ref.workflow_run_id).trace_id:032x}"
    finally:
        await plain.aclose()
        await host_side.aclose()



_WITHOUT_EXPORTER = """
import asyncio, importlib.abc, sys

class NoExporter(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry.exporter" or name.startswith("opentelemetry.exporter."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoExporter())
from sdk import Bide, DurableContext, EmptyModel
from tests.support import running_worker

async def main() -> None:
    bide = Bide(sys.argv[1])

    @bide.durable_task(name="Untraced")
    async def untraced(input: EmptyModel, ctx: DurableContext) -> str:
        await ctx.aio_sleep_for(0.1)
        return "ran"

    async with running_worker(bide, [untraced]):
        print(await untraced.aio_run(timeout=20), bide.tracing.enabled)
    await bide.aclose()

asyncio.run(main())
"""


def _python(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([sys.executable, "-c", code, *args], env={**clean, "PYTHONPATH": str(REPO), **env},
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_runs_without_the_exporter_installed(nats_server: EmbeddedServer) -> None:
    done = _python(_WITHOUT_EXPORTER, nats_server.url, env={})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ran", "False"]
    # Asking for OTLP without the extra is a clear error at start-up, naming the fix.
    failed = _python(_WITHOUT_EXPORTER, nats_server.url, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert failed.returncode != 0
    assert "TracingConfigError" in failed.stderr and "pip install 'bide[otlp]'" in failed.stderr


async def test_webhook_caller_trace_parents_the_push_span(
    traced: Bide, memory: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    from tests.integration.test_http_api import client_for

    trace_id, span_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    async with client_for(traced) as http:
        resp = await http.post("/api/v1/webhooks/order:paid", params={"scope": "o-1"}, content=b'{"total": 3}',
                               headers={"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"})
        assert resp.status_code == 202, resp.text
    push = _one([span_record(s) for s in memory[1].get_finished_spans()], "send bide.events.order:paid.{scope}")
    assert (push["trace_id"], push["parent_id"]) == (f"{trace_id:032x}", f"{span_id:016x}")
    assert push["attributes"]["bide.event.scope"] == "o-1"
