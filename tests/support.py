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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson

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


async def registrations(client: Bide, key: str) -> int:
    """How many wait registrations (and withdrawals not yet applied) the router's input holds for ``key``."""
    conn = await client._pool.get()
    s = conn.layout.subjects
    info = await conn.js.stream_info(s.events_stream, subjects_filter=s.waits(key))
    return sum((info.state.subjects or {}).values())


async def push_until_stored(client: Bide, key: str, payload: Any, event_id: str, tries: int = 120) -> None:
    """A push during a cluster election may time out: retried with the same event id (a push is idempotent)."""
    for _ in range(tries):
        try:
            await client.event.aio_push(key, payload, event_id=event_id)
            return
        except Exception:
            await asyncio.sleep(0.25)
    raise AssertionError(f"event {event_id} could not be pushed")


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
            [sys.executable, "-m", "actors.apps.cli", "worker", self.target, *self.extra_args],
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


@dataclass
class Receiver:
    """The receiver process: its port and the JSON-lines file of the spans it decoded."""

    port: int
    out: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[dict[str, Any]]:
        """Every span received so far (a line still being appended is left for the next read)."""
        if not self.out.exists():
            return []
        *whole, _partial = self.out.read_bytes().split(b"\n")
        return [orjson.loads(line) for line in whole if line]


@contextlib.asynccontextmanager
async def otlp_receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    """``python -m tests.otlp_receiver`` in its own process, SIGKILLed at teardown."""
    port_file, out, log = tmp_path / "otlp.port", tmp_path / "spans.jsonl", tmp_path / "receiver.log"
    with log.open("wb") as log_f:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.otlp_receiver", "--port-file", str(port_file), "--out", str(out),
            cwd=REPO, stdout=log_f, stderr=asyncio.subprocess.STDOUT,
        )
    try:
        def listening() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"the OTLP receiver exited with {proc.returncode}:\n{log.read_text()}")
            return port_file.exists()

        await wait_until(listening, timeout=20, what="the OTLP receiver to listen")
        yield Receiver(int(port_file.read_text()), out)
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)


def free_ports_in_a_row(n: int) -> int:
    """The first of ``n`` consecutive free ports (for ``bide dev --cluster``: node i on port + i).

    Chosen below Linux's ephemeral range (32768 and up), where the servers other tests start on
    ``free_port()`` (port 0: the kernel picks an ephemeral one) can never take a neighbour.
    """
    import random
    import socket

    for _ in range(200):
        base = random.randrange(20000, 32768 - n)
        try:
            with contextlib.ExitStack() as held:
                for p in range(base, base + n):
                    s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports found")


_RELOADED = b"Reloaded server configuration"
"""What nats-server logs once a configuration reload (SIGHUP) is done."""


class DenyingServer:
    """A real nats-server whose one user, ``host``, may publish anything but ``deny`` until :meth:`allow`.

    A write the server refuses fails for sure (its permissions), and a configuration reload
    (SIGHUP) lifts the refusal while every client stays connected. Sets the
    ``BIDE_NATS_USER``/``BIDE_NATS_PASSWORD`` a client and the hosts it starts read.
    """

    def __init__(self, tmp_path: Path, deny: str, monkeypatch: Any) -> None:
        import secrets

        from actors.store.server import EmbeddedServer

        self._deny = f'"{deny}"'
        self._password = password = secrets.token_hex(12)
        self.server = EmbeddedServer(store_dir=tmp_path / "js", config=f"""
accounts {{
  BIDE {{
    jetstream: enabled
    users = [{{ user: host, password: "{password}",
               permissions: {{ publish: {{ allow: ">", deny: [{self._deny}] }}, subscribe: ">" }} }}]
  }}
}}
""")
        monkeypatch.setenv("BIDE_NATS_USER", "host")
        monkeypatch.setenv("BIDE_NATS_PASSWORD", password)

    def __enter__(self) -> DenyingServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    async def allow(self) -> None:
        """Lift the refusal (rewrite the configuration, SIGHUP), and wait until JetStream answers again.

        The reload re-registers the account's JetStream API: a request at that moment can meet no
        responders (seen once in a full suite run on two cores). The server reloads some time
        after the signal, so JetStream answering right after it proves nothing: the wait is for
        the log's line that the reload is done, then for JetStream (a test that asked before the
        reload began met no responders once, in a full suite run on two cores)."""
        path = self.server.config_file
        path.write_text(path.read_text().replace(self._deny, '"nothing.denied"'))
        assert self.server.proc is not None
        log = self.server.log_file
        reloads = log.read_bytes().count(_RELOADED)
        os.kill(self.server.proc.pid, signal.SIGHUP)
        await wait_until(lambda: log.read_bytes().count(_RELOADED) > reloads, what="the server to reload")
        nc = await nats.connect(self.server.url, user="host", password=self._password)
        try:
            async def answers() -> bool:
                try:
                    await nc.request("$JS.API.INFO", b"", timeout=1.0)
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    return False
                return True

            await wait_until(answers, what="JetStream to answer after the reload")
        finally:
            await nc.close()


@contextlib.asynccontextmanager
async def stale_replica(client: Bide) -> AsyncIterator[None]:
    """A replica of the history stream far behind, answering about half of its direct gets.

    What a cluster follower that has not applied the latest writes answers: no such message,
    no such history. nats-server has no read-after-write for direct gets (2.12 removed the
    ``min_last_seq`` it had briefly), so any such read may be answered this way. Made on one
    server as a mirror of the stream filtered to one subject nobody else uses: a mirror of a
    stream that allows direct gets serves the origin's direct gets too, once it has caught up.
    """
    from actors.store.jetstream import api_request

    conn = await client._pool.get()
    s = conn.layout.subjects
    stream = s.history_stream
    name = f"{stream}_STALE"
    quiet = s.inbox("%stale-replica")
    names = await api_request(conn.nc, "$JS.API.STREAM.NAMES", {})
    if name in (names.get("streams") or []):  # one is behind already (BIDE_TEST_STALE_REPLICA=1)
        yield
        return
    await api_request(conn.nc, f"$JS.API.STREAM.CREATE.{name}",
                      {"name": name, "mirror": {"name": stream, "filter_subject": quiet}, "storage": "memory"})
    # The mirror serves direct gets once it has taken something: one message on its subject, and a
    # probe it does not hold (the mirror answering says "not found" for it). Both leave the stream
    # at once (a mirror keeps what it took): nothing else meets them.
    seqs = [(await conn.js.publish(quiet, b"{}")).seq, (await conn.js.publish(s.inbox("%stale-probe"), b"{}")).seq]

    async def answering() -> bool:
        reply = await conn.nc.request(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps({"seq": seqs[1]}), timeout=2)
        return (reply.headers or {}).get("Status") == "404"

    try:
        await wait_until(answering, timeout=10, interval=0.01, what="the stale replica to answer direct gets")
        for seq in seqs:
            await api_request(conn.nc, f"$JS.API.STREAM.MSG.DELETE.{stream}", {"seq": seq})
        yield
    finally:
        await api_request(conn.nc, f"$JS.API.STREAM.DELETE.{name}", {})
