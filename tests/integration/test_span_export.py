"""Bide's span export process (``BIDE_SPAN_EXPORT=process``, the default) against a real OTLP receiver.

A host's spans leave it as records on a pipe to a child exporter process. These tests pin what
that buys and what it must not lose: spans already handed to the child survive a SIGKILL of the
host; an application's own spans nest under Bide's; a child that dies is replaced.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from opentelemetry.sdk.trace.sampling import DEFAULT_ON

from actors.observe.span_export import ExportPipe
from actors.observe.spans import LightTracer
from tests.support import REPO, Receiver, wait_until

SERVICE = "span-export-test"
N = 500

EMIT_THEN_DIE = f"""
import os, signal, sys, time
from opentelemetry import trace
from actors.observe.tracing import Tracing, configure_from_env

configure_from_env()
tracing = Tracing("bide")
assert tracing.enabled
for i in range({N}):
    tracing.start_run("T", f"run-{{i}}", f"bide.queue.T.run-{{i}}").end()
with tracing._tracer.start_as_current_span("bide-parent"):
    with trace.get_tracer("app").start_as_current_span("app-child"):
        pass
pipe = tracing._tracer.pipe
deadline = time.monotonic() + 20
while pipe.shipped < {N} + 2:  # every record written down the pipe
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.005)
print(pipe.child_pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_spans_handed_to_the_exporter_survive_a_sigkill_of_the_host(receiver: Receiver) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_SERVICE_NAME": SERVICE, "OTEL_BSP_SCHEDULE_DELAY": "20"}
    env.pop("BIDE_SPAN_EXPORT", None)
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", EMIT_THEN_DIE], env=env, cwd=REPO,
                                   capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    exporter_pid = int(done.stdout.strip())

    def all_received() -> bool:
        return len([s for s in receiver.spans() if s["service"] == SERVICE]) >= N + 2

    await wait_until(all_received, timeout=30, what="every span the killed host had handed over")
    await wait_until(lambda: not _alive(exporter_pid), timeout=30, what="the orphaned exporter to exit")

    spans = [s for s in receiver.spans() if s["service"] == SERVICE]
    runs = {s["attributes"]["bide.run_id"] for s in spans if s["name"] == "send bide.queue.T.{run_id}"}
    assert runs == {f"run-{i}" for i in range(N)}
    assert len(spans) == N + 2, "no span twice"
    (parent,) = [s for s in spans if s["name"] == "bide-parent"]
    (child,) = [s for s in spans if s["name"] == "app-child"]
    assert (child["trace_id"], child["parent_id"]) == (parent["trace_id"], parent["span_id"])


async def test_an_exporter_process_that_dies_is_replaced(receiver: Receiver, tmp_path: Path) -> None:
    pipe = ExportPipe(["otlp"], {"service.name": SERVICE}, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint},
                      interval_s=0.02, restart_delay_s=0)
    tracer = LightTracer(pipe, DEFAULT_ON, "bide")
    try:
        for i in range(10):
            tracer.start_span(f"before-{i}").end()
        assert await asyncio.to_thread(pipe.force_flush, 30)
        first = pipe.child_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: pipe.child_pid is None, timeout=10, what="the exporter's death to be seen")

        for i in range(10):
            tracer.start_span(f"after-{i}").end()
        assert await asyncio.to_thread(pipe.force_flush, 30)
        assert pipe.started == 2 and pipe.child_pid not in (None, first)
        names = {s["name"] for s in receiver.spans()}
        assert {f"before-{i}" for i in range(10)} | {f"after-{i}" for i in range(10)} <= names
        assert pipe.dropped == 0
    finally:
        await asyncio.to_thread(pipe.shutdown)


async def test_a_flush_that_could_not_export_everything_says_so(receiver: Receiver) -> None:
    pipe = ExportPipe(["otlp"], {"service.name": SERVICE}, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint},
                      interval_s=3600, restart_delay_s=3600)  # no restart: the next batch has nowhere to go
    tracer = LightTracer(pipe, DEFAULT_ON, "bide")
    try:
        tracer.start_span("before").end()
        assert await asyncio.to_thread(pipe.force_flush, 30)
        first = pipe.child_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: pipe.child_pid is None, timeout=10, what="the exporter's death to be seen")
        for i in range(5):
            tracer.start_span(f"lost-{i}").end()
        assert not await asyncio.to_thread(pipe.force_flush, 10)
        assert pipe.dropped == 5
    finally:
        await asyncio.to_thread(pipe.shutdown, 1)
