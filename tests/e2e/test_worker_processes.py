"""``bide worker --processes N``: the parent hosts one, N-1 children the rest; restarted, stopped, killed with it."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.hosting.router_partitions import deployment_status
from actors.store.server import EmbeddedServer
from sdk import Bide
from tests.support import REPO, wait_until

TARGET = "examples.durable.worker:worker"


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead child waiting for whoever adopted it to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> set[int]:
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out |= {int(x) for x in f.read().split()}
        except FileNotFoundError:
            continue  # a thread that ended between the listing and the read (it had no children to report)
    return {c for c in out if alive(c)}


class Processes:
    """``bide worker TARGET --processes N`` in a child process; its stderr (with the children's lines) in a file."""

    def __init__(self, url: str, log: Path, *args: str) -> None:
        env = {**os.environ, "BIDE_NATS_URL": url, "BIDE_ACK_WAIT": "3", "PYTHONPATH": str(REPO)}
        self.log = log
        with log.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "actors.apps.cli", "worker", TARGET, *args],
                                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_ready(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("bide worker ") and " ready: " in line:
                return line
        raise AssertionError(f"not ready (exit {self.proc.poll()}):\n{self.log.read_text()}")

    def kill_all(self) -> None:
        pids = children_of(self.proc.pid) if alive(self.proc.pid) else set()
        for pid in [self.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


@pytest.fixture
def procs(nats_server: EmbeddedServer, tmp_path: Path) -> Iterator[list[Processes]]:
    started: list[Processes] = []
    try:
        yield started
    finally:
        for p in started:
            p.kill_all()


async def hosts_up(client: Bide) -> set[int]:
    """The pids of the hosts ``bide status`` shows up (a host id is name@hostname:pid)."""
    conn = await client._pool.get()
    st = await deployment_status(conn.nc, conn.layout)
    return {int(h["host"].rsplit(":", 1)[1]) for h in st["hosts"]}


async def hosts_are(client: Bide, pids: set[int]) -> bool:
    return await hosts_up(client) == pids


async def test_two_processes_serve_and_a_killed_child_is_restarted(
        nats_server: EmbeddedServer, procs: list[Processes], bide: Bide, tmp_path: Path) -> None:
    p = Processes(nats_server.url, tmp_path / "worker.log", "--processes", "2", "--name", "procs")
    procs.append(p)
    assert "(2 processes)" in p.wait_ready()
    [child] = children_of(p.proc.pid)
    await wait_until(lambda: hosts_are(bide, {p.proc.pid, child}), timeout=20, what="2 hosts up")
    conn = await bide._pool.get()
    names = {h["host"].split("@")[0] for h in (await deployment_status(conn.nc, conn.layout))["hosts"]}
    assert names == {"procs", "procs-2"}

    results = await asyncio.gather(*(bide.aio_run_by_name("Hello", {}, timeout=60) for _ in range(20)))
    assert len(results) == 20 and all("hello" in r for r in results)

    os.kill(child, signal.SIGKILL)  # a crash of the child: the supervisor starts a new one
    await wait_until(lambda: bool(children_of(p.proc.pid) - {child}), timeout=30, what="a new child")
    [again] = children_of(p.proc.pid)
    await wait_until(lambda: hosts_are(bide, {p.proc.pid, again}), timeout=30, what="2 hosts up again")
    assert "hello" in await bide.aio_run_by_name("Hello", {}, timeout=60)
    log = p.log.read_text()
    assert f"worker process {child} ended (killed by SIGKILL)" in log and "restarting it in 1 s" in log
    assert f"[{child}] bide worker 'procs-2' ready" in log  # the children's output, prefixed with their pid


async def test_sigterm_to_the_parent_stops_every_process(
        nats_server: EmbeddedServer, procs: list[Processes], tmp_path: Path) -> None:
    p = Processes(nats_server.url, tmp_path / "worker.log", "--processes", "3")
    procs.append(p)
    p.wait_ready()
    kids = children_of(p.proc.pid)
    assert len(kids) == 2
    p.proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: p.proc.poll() is not None, timeout=40, what="the parent to exit")
    assert p.proc.returncode == 0, p.log.read_text()
    assert not [k for k in kids if alive(k)]  # each drained and exited before the parent returned


async def test_a_sigkilled_parent_takes_its_children_with_it(
        nats_server: EmbeddedServer, procs: list[Processes], tmp_path: Path) -> None:
    p = Processes(nats_server.url, tmp_path / "worker.log", "--processes", "2")
    procs.append(p)
    p.wait_ready()
    [child] = children_of(p.proc.pid)
    p.proc.kill()
    p.proc.wait(10)
    await wait_until(lambda: not alive(child), timeout=30, what=f"child {child} to exit after its parent's SIGKILL")


@pytest.mark.parametrize("args", [["worker", TARGET, "--processes", "0"], ["worker", TARGET, "--processes", "x"],
                                  ["worker", TARGET, "--processes", "-1"], ["dev", "--workers", "0"]])
def test_a_bad_process_count_is_refused_naming_it(args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "actors.apps.cli", *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode != 0
    assert f"got {args[-1]!r}" in out.stderr and "from 1 to 256, or 'auto'" in out.stderr, out.stderr
