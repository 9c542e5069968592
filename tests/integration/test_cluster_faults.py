"""A 3-node cluster at R3 loses the node that leads the streams while runs sleep, wait and fan out."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from actors.store.server import EmbeddedServer, jetstream_answers
from sdk import Bide, Context, DurableContext
from tests.integration.test_cluster import cluster  # noqa: F401  (the cluster fixture)
from tests.support import WorkerProcess, push_until_stored, running_worker, wait_until


async def test_runs_complete_when_the_stream_leaders_node_is_killed(cluster: list[EmbeddedServer]) -> None:  # noqa: F811
    for node in cluster:
        await wait_until(lambda node=node: jetstream_answers(node.url), timeout=30, what=f"JetStream on {node.url}")
    client = Bide(",".join(n.url for n in cluster), replicas=3, ack_wait=3.0)

    @client.task(name="ClusterSquare")
    def square(input: dict, ctx: Context) -> int:
        return int(input["x"]) ** 2

    @client.durable_task(name="ClusterMixed")
    async def mixed(input: dict, ctx: DurableContext) -> dict:
        n = int(input["n"])
        base = await ctx.memo(lambda: n * 10)
        await ctx.aio_sleep_for(timedelta(seconds=2))
        got = await ctx.aio_wait_for_event("cluster:go", f"input.n == {n}")
        squares = await square.aio_run_many([square.create_bulk_run_item({"x": n + i}) for i in range(3)])
        return {"base": base, "got": got["n"], "squares": squares}

    try:
        async with running_worker(client, [mixed, square]):
            conn = await client._pool.get()
            s = conn.layout.subjects
            refs = [await mixed.aio_run_no_wait({"n": n}) for n in range(10)]

            async def all_waiting() -> bool:
                waits = await conn.js.stream_info(s.events_stream, subjects_filter=s.waits_all)
                return sum((waits.state.subjects or {}).values()) >= 10

            await wait_until(all_waiting, timeout=60, interval=0.2, what="10 runs slept and began to wait")
            info = await conn.js.stream_info(s.history_stream)
            assert info.cluster is not None
            leader = next(n for n in cluster if n.server_name == info.cluster.leader)
            leader.kill()  # SIGKILL the node that leads the history stream

            await asyncio.gather(*(push_until_stored(client, "cluster:go", {"n": n}, f"go-{n}") for n in range(10)))
            results = await asyncio.gather(*(r.aio_result(timeout=120) for r in refs))
            assert results == [{"base": n * 10, "got": n, "squares": [(n + i) ** 2 for i in range(3)]}
                               for n in range(10)]
    finally:
        await client.aclose()


async def test_a_host_started_while_the_cluster_has_no_quorum_waits_for_it(
    cluster: list[EmbeddedServer], hosts: list[WorkerProcess]  # noqa: F811
) -> None:
    """`bide worker` started while two of three nodes are down: it retries the set-up, it does not exit."""
    for node in cluster:
        await wait_until(lambda node=node: jetstream_answers(node.url), timeout=30, what=f"JetStream on {node.url}")
    urls = ",".join(n.url for n in cluster)
    first = Bide(urls, replicas=3, ack_wait=3.0)
    await first._pool.get()  # the streams exist (at R3)
    await first.aclose()
    cluster[1].kill()
    cluster[2].kill()
    worker = WorkerProcess("tests.apps.events:worker", urls, env={"BIDE_REPLICAS": "3"})
    hosts.append(worker)
    starting = asyncio.create_task(asyncio.to_thread(worker.start, 90.0))
    await asyncio.sleep(0)
    await wait_until(lambda: worker.proc is not None, what="the worker process")
    await asyncio.to_thread(_still_running_after, worker, 5.0)  # no quorum for 5 s: it waits, it does not exit
    cluster[1].start()
    cluster[2].start()
    await starting  # ready once the cluster has its quorum back


def _still_running_after(worker: WorkerProcess, seconds: float) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert worker.proc is not None and worker.proc.poll() is None, "the worker exited without a quorum"
        time.sleep(0.1)
