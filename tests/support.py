"""Test support: real nats-server processes, in-process workers, worker subprocesses, polling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from sdk import Bide, TaskDefinition

REPO = Path(__file__).resolve().parent.parent


async def wait_until(
    cond: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> None:
    """Poll ``cond`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        res = cond()
        if not isinstance(res, bool):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running_worker(
    client: Bide, tasks: list[TaskDefinition], *, name: str = "test-worker", slots: int = 100,
    durable_slots: int = 1000,
) -> AsyncIterator[Any]:
    """An in-process worker (actor host) on the current loop, shut down on exit."""
    worker = client.worker(name, workflows=tasks, slots=slots, durable_slots=durable_slots)
    ready = asyncio.Event()
    task = asyncio.create_task(worker.async_start(ready=ready))
    done, _ = await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield worker
    finally:
        await worker.shutdown()
        await asyncio.wait_for(task, 30)


class WorkerProcess:
    """``bide worker TARGET`` in a child process, so a test can SIGKILL it like a crash."""

    def __init__(self, target: str, nats_url: str, *, ack_wait: float = 3.0, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.target = target
        self.env = {
            **os.environ,
            "BIDE_NATS_URL": nats_url,
            "BIDE_ACK_WAIT": str(ack_wait),
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **(env or {}),
        }
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors.cli", "worker", self.target, *self.extra_args],
            env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "ready" in line:
                return self
        self.kill()
        raise RuntimeError("worker process did not become ready:\n" + "".join(lines))

    def kill(self) -> None:
        """SIGKILL: no cleanup, no acks, exactly as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)
