"""Recovery: a dead host's run moves fast, a poison activation ends, infrastructure errors are retried.

Crashes are real: worker hosts run as child processes (``tests.apps.recovery:worker``)
and are SIGKILLed (or kill themselves). Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import IO, Any

import nats
import pytest

from actors.engine.wire import EventSignal, RunStarted, utcnow
from actors.store.jetstream import StaleReadError
from actors.store.server import EmbeddedServer
from sdk import Bide, RunFailedError
from tests.apps.recovery import GatedInput, StepInput, define
from tests.support import REPO, WorkerProcess, wait_until

APP = "tests.apps.recovery:worker"
DEFAULT_ACK_WAIT = {"BIDE_ACK_WAIT": ""}
"""An empty value leaves the worker on the default ack wait (what a deployment gets)."""


async def start_host(procs: list[WorkerProcess], url: str, env: dict[str, str] | None = None,
                     ack_wait: float = 3.0) -> WorkerProcess:
    proc = WorkerProcess(APP, url, ack_wait=ack_wait, env=env)
    procs.append(proc)
    await asyncio.to_thread(proc.start)
    return proc


def lines(log: Path) -> list[tuple[str, int]]:
    return [(step, int(pid)) for step, pid in (line.split() for line in log.read_text().splitlines())]


class Output:
    """A worker process's output, read by a thread (so the pipe never fills)."""

    def __init__(self, proc: WorkerProcess) -> None:
        assert proc.proc is not None and proc.proc.stdout is not None
        self._lines: list[str] = []
        self._thread = threading.Thread(target=self._drain, args=(proc.proc.stdout,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.append(line)

    def text(self) -> str:
        return "".join(self._lines)


def pid_of(proc: WorkerProcess) -> int:
    assert proc.proc is not None
    return proc.proc.pid


async def test_a_step_that_blocks_the_event_loop_keeps_its_activation(
    bide: Bide, nats_server: EmbeddedServer, hosts: list[WorkerProcess], tmp_path: Path
) -> None:
    """The heartbeat goes on while synchronous user code holds the host's event loop."""
    tasks = define(bide)
    log = tmp_path / "steps.log"
    log.touch()
    for _ in range(2):
        await start_host(hosts, nats_server.url)  # a live second host would take a silent activation
    ref = await tasks["step"].aio_run_no_wait(StepInput(log=str(log), seconds=8, blocking=True))
    result = await ref.aio_result(timeout=40)
    assert lines(log) == [("step", result["pid"])], "the step ran again while its host was alive"


async def test_a_dead_hosts_run_resumes_on_a_live_host_within_5s(
    bide: Bide, nats_server: EmbeddedServer, hosts: list[WorkerProcess], tmp_path: Path
) -> None:
    tasks = define(bide)
    log = tmp_path / "steps.log"
    log.touch()
    first = await start_host(hosts, nats_server.url, DEFAULT_ACK_WAIT)
    ref = await tasks["step"].aio_run_no_wait(StepInput(log=str(log), seconds=3))
    await wait_until(lambda: bool(lines(log)), timeout=20, what="the step to start")
    killed_at = utcnow()
    first.kill()
    second = await start_host(hosts, nats_server.url, DEFAULT_ACK_WAIT)  # started at once
    assert await ref.aio_result(timeout=60) == {"pid": pid_of(second)}

    hist = await bide.runs.aio_history(ref.workflow_run_id)
    resumed = [e.at for e in hist.entries if e.k == "activation" and e.host.endswith(f":{pid_of(second)}")]
    assert resumed, hist.entries
    took = (resumed[0] - killed_at).total_seconds()
    assert took < 5.0, f"the run resumed {took:.1f}s after its host was killed"


async def test_a_poison_activation_fails_its_run_after_max_deliveries(
    bide: Bide, nats_server: EmbeddedServer, hosts: list[WorkerProcess], tmp_path: Path
) -> None:
    """A task that kills its worker on every delivery: bounded deliveries, then a failed run with the reason."""
    tasks = define(bide)
    log = tmp_path / "poison.log"
    log.touch()
    env = {"BIDE_MAX_DELIVERIES": "3"}
    ref = await tasks["poison"].aio_run_no_wait(StepInput(log=str(log), seconds=0))
    info: Any = None

    async def failed() -> bool:
        nonlocal info
        if not any(h.proc is not None and h.proc.poll() is None for h in hosts):
            ran = len(lines(log))
            try:
                await start_host(hosts, nats_server.url, env, ack_wait=1.0)  # the last one killed itself
            except RuntimeError:
                # A start left to its host runs the code at once (nothing to read first), so a new
                # host may take the poison and die before it prints that it is ready.
                if len(lines(log)) == ran:
                    raise
        info = await bide.runs.aio_get(ref.workflow_run_id)
        return bool(info.status.value == "failed")

    await wait_until(failed, timeout=90, interval=0.2, what="the poison run to fail")
    assert [step for step, _ in lines(log)] == ["poison"] * 3, "user code ran more than BIDE_MAX_DELIVERIES times"
    with pytest.raises(RunFailedError) as ei:
        await ref.aio_result(timeout=5)
    assert ei.value.error_type == "DeliveryLimitExceeded"
    assert "delivered 4 times" in str(ei.value) and "BIDE_MAX_DELIVERIES=3" in str(ei.value)

    shown = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "actors.apps.cli", "runs", "show", ref.workflow_run_id],
        env={**os.environ, "BIDE_NATS_URL": nats_server.url}, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "status failed" in shown.stdout, shown.stdout + shown.stderr
    assert "delivered 4 times" in shown.stdout


async def test_a_server_outage_during_a_step_does_not_fail_the_run(
    bide: Bide, nats_server: EmbeddedServer, hosts: list[WorkerProcess], tmp_path: Path
) -> None:
    """A memo's append times out while the server is down: the host retries, the code never sees it."""
    tasks = define(bide)
    log, gate = tmp_path / "infra.log", tmp_path / "gate"
    log.touch()
    await start_host(hosts, nats_server.url)
    ref = await tasks["infra"].aio_run_no_wait(GatedInput(log=str(log), gate=str(gate)))
    await wait_until(lambda: bool(lines(log)), timeout=20, what="the gated step to start")
    nats_server.kill()
    gate.touch()  # the step returns while nothing can be written
    # Fault injection, not a wait for state: longer than a publish's ack timeout (10 s).
    await asyncio.sleep(11)
    nats_server.start()
    assert await ref.aio_result(timeout=60) == 8
    steps = [step for step, _ in lines(log)]
    assert not [s for s in steps if s.startswith("saw:")], f"user code saw an infrastructure error: {steps}"
    hist = await bide.runs.aio_history(ref.workflow_run_id)
    assert not [e for e in hist.entries if e.k == "attempt_failed"], "an infrastructure error failed an attempt"


async def test_a_child_start_refused_by_the_server_is_retried_not_seen(
    bide: Bide, nats_server: EmbeddedServer, hosts: list[WorkerProcess], tmp_path: Path
) -> None:
    """The child's activation finds no stream for a while (503): the parent neither fails nor parks."""
    tasks = define(bide)
    log, gate = tmp_path / "infra.log", tmp_path / "gate"
    log.touch()
    output = Output(await start_host(hosts, nats_server.url))
    ref = await tasks["infra"].aio_run_no_wait(GatedInput(log=str(log), gate=str(gate)))
    run_id = ref.workflow_run_id
    await wait_until(lambda: bool(lines(log)), timeout=20, what="the gated step to start")

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        work = (await js.stream_info("BIDE_QUEUE")).config
        # No stream takes the child task's activations for a while: its publish is answered 503.
        narrowed = work.evolve(subjects=["bide.queue.RecoveryInfra.>"])
        await js.update_stream(narrowed)
        gate.touch()

        def refused() -> bool:
            # The host says it retries (the child's first write, its activation, is refused); a host
            # that let the error through to the code leaves its mark.
            text = output.text()
            return ("infrastructure error" in text or "retrying" in text
                    or any(s.startswith("saw:") for s, _ in lines(log)))

        await wait_until(refused, timeout=20, what="the child's activation to be refused")
        await js.update_stream(work)
    finally:
        await nc.close()
    assert await ref.aio_result(timeout=60) == 8
    steps = [step for step, _ in lines(log)]
    assert not [s for s in steps if s.startswith("saw:")], f"user code saw an infrastructure error: {steps}"
    hist = await bide.runs.aio_history(run_id)
    assert not [e for e in hist.entries if e.k == "attempt_failed"], "an infrastructure error failed an attempt"
    assert Counter(steps)["done"] == 1


async def test_a_read_never_returns_a_view_older_than_a_known_write(bide: Bide) -> None:
    """The read floor: a read asked to see a write waits for it (here: one made while it waits), never less."""
    conn = await bide._pool.get()
    log, s = conn.history, conn.layout.subjects
    run_id = "floor-run"
    started = RunStarted(run_id=run_id, task="Floor", durable=True, at=utcnow())
    seq = await log.append(run_id, [started], expected_seq=0)
    assert (await log.read(run_id, history_seq=seq)).last_seq == seq

    with pytest.raises(StaleReadError, match="behind an acknowledged write"):
        await log.read(run_id, history_seq=seq + 10, timeout=0.3)

    sig = EventSignal(source="direct", name="ping", payload=1, event_id="e1", at=utcnow())
    reading = asyncio.create_task(log.read(run_id, inbox_seq=seq + 1, timeout=5))
    await asyncio.sleep(0.1)  # let the read begin before the write it must see exists
    assert not reading.done()
    inbox_seq = await conn.publisher.publish(s.inbox(run_id), sig.model_dump_json().encode())
    hist = await reading
    assert inbox_seq == seq + 1 and [q for q, _ in hist.inbox] == [inbox_seq]
