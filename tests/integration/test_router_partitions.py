"""Router partitions across host processes: spread, moved when an owner dies, handed over when one stops."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from actors.engine.wire import Subjects, partition_of
from actors.hosting.router_partitions import deployment_status
from actors.store.jetstream import Layout, RouterPartitionsError, connect, ensure_streams
from actors.store.server import EmbeddedServer
from sdk import Bide
from tests.apps.partitions import partition_wait
from tests.support import WorkerProcess, running_worker, wait_until

N = 4


def keys_by_partition() -> dict[int, str]:
    """One event key per partition."""
    out: dict[int, str] = {}
    i = 0
    while len(out) < N:
        out.setdefault(partition_of(f"part:{i}", N), f"part:{i}")
        i += 1
    return out


KEYS = keys_by_partition()


def host_of(proc: WorkerProcess) -> str:
    assert proc.proc is not None
    return f":{proc.proc.pid}"


class Owners:
    """Reads ``bide status``'s view; pushes a no-op event on each key so free partitions get pinned."""

    def __init__(self, client: Bide) -> None:
        self.client = client

    async def get(self) -> dict[int, str | None]:
        conn = await self.client._pool.get()
        st = await deployment_status(conn.nc, conn.layout)
        return {r["partition"]: r["owner"] for r in st["router"]}

    async def nudge(self) -> None:
        # JetStream pins a partition's next owner when it next has a message to deliver.
        for key in KEYS.values():
            await self.client.event.aio_push(key, {"n": -1})

    async def until(self, cond: Any, what: str, timeout: float = 30.0) -> dict[int, str | None]:
        last: dict[int, str | None] = {}

        async def check() -> bool:
            nonlocal last
            await self.nudge()
            last = await self.get()
            return bool(cond(last))

        try:
            await wait_until(check, timeout=timeout, interval=0.3, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}; owners {last}") from None
        return last


async def _wait_all(client: Bide, refs: list[tuple[str, int, Any]]) -> None:
    results = await asyncio.gather(*(ref.aio_result(timeout=60) for _, _, ref in refs))
    assert results == [n for _, n, _ in refs]


async def _waiting_runs(client: Bide, per_key: int, base: int) -> list[tuple[str, int, Any]]:
    task = client.durable_task(name="PartitionWait")(partition_wait.fn)
    out = []
    for key in KEYS.values():
        for n in range(base, base + per_key):
            out.append((key, n, await task.aio_run_no_wait({"key": key, "n": n})))
    conn = await client._pool.get()
    s = conn.layout.subjects

    async def registered() -> bool:
        info = await conn.js.stream_info(s.events_stream, subjects_filter=s.waits_all)
        return sum((info.state.subjects or {}).values()) >= len(out)

    await wait_until(registered, timeout=60, interval=0.2, what=f"{len(out)} waits registered")
    return out


async def _push(client: Bide, runs: list[tuple[str, int, Any]]) -> None:
    for key, n, _ in runs:
        await client.event.aio_push(key, {"n": n})


async def test_partitions_spread_over_two_hosts_and_move_when_an_owner_is_killed(
        nats_server: EmbeddedServer, hosts: list[WorkerProcess]) -> None:
    client = Bide(nats_server.url, ack_wait=3.0)
    owners = Owners(client)
    try:
        a = WorkerProcess("tests.apps.partitions:worker", nats_server.url).start()
        hosts.append(a)
        await owners.until(lambda o: all(v and v.endswith(host_of(a)) for v in o.values()), "host A owning all")
        b = WorkerProcess("tests.apps.partitions:worker", nats_server.url).start()
        hosts.append(b)
        spread = await owners.until(
            lambda o: sum(1 for v in o.values() if v and v.endswith(host_of(a))) == N // 2
            and sum(1 for v in o.values() if v and v.endswith(host_of(b))) == N // 2,
            "the partitions spread two and two")
        # Waits on keys of every partition, owned by two different hosts, all matched.
        first = await _waiting_runs(client, 3, 0)
        await _push(client, first)
        await _wait_all(client, first)

        # Waits registered, then the owner of two partitions SIGKILLed: they move, nothing is lost.
        second = await _waiting_runs(client, 3, 100)
        a.kill()
        killed_at = time.monotonic()
        await _push(client, second)
        moved = await owners.until(lambda o: all(v and v.endswith(host_of(b)) for v in o.values()),
                                   "host B owning every partition")
        print(f"partitions of the killed host owned again after {time.monotonic() - killed_at:.2f}s")
        await _wait_all(client, second)
        assert spread != moved
    finally:
        await client.aclose()


async def test_a_host_that_stops_hands_its_partitions_over_at_once(
        nats_server: EmbeddedServer, hosts: list[WorkerProcess]) -> None:
    """With a 120 s failover, only an unpin at stop can move the partitions within the test's 30 s."""
    client = Bide(nats_server.url, ack_wait=3.0)
    owners = Owners(client)
    try:
        nc = await connect(nats_server.url)
        try:
            await ensure_streams(nc.jetstream(), Layout(Subjects(), router_failover_s=120.0, router_partitions=N))
        finally:
            await nc.close()
        a = WorkerProcess("tests.apps.partitions:worker", nats_server.url).start()
        hosts.append(a)
        b = WorkerProcess("tests.apps.partitions:worker", nats_server.url).start()
        hosts.append(b)
        await owners.until(
            lambda o: {v.rsplit(":", 1)[1] for v in o.values() if v} == {host_of(a)[1:], host_of(b)[1:]}
            and all(o.values()), "both hosts owning partitions", timeout=60)
        runs = await _waiting_runs(client, 2, 0)
        assert b.terminate() == 0
        await owners.until(lambda o: all(v and v.endswith(host_of(a)) for v in o.values()),
                           "host A owning every partition")
        await _push(client, runs)
        await _wait_all(client, runs)
    finally:
        await client.aclose()


async def test_another_partition_count_is_refused(bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    await bide._pool.get()  # the store is made with the default count
    monkeypatch.setenv("BIDE_ROUTER_PARTITIONS", "2")
    other = Bide(bide.config.nats_url, ack_wait=3.0)
    try:
        task = other.durable_task(name="PartitionWait")(partition_wait.fn)
        with pytest.raises(RouterPartitionsError, match=r"BIDE_ROUTER_PARTITIONS=2.*has 4 partitions"):
            async with running_worker(other, [task]):
                pass
    finally:
        await other.aclose()
