"""The event router on a real 3-node cluster at R3 while the leader of the stream it writes to dies."""

from __future__ import annotations

import asyncio
from typing import Any

from actors.store.server import EmbeddedServer, jetstream_answers
from sdk import Bide, DurableContext
from tests.integration.test_cluster import cluster  # noqa: F401  (the cluster fixture)
from tests.support import push_until_stored, running_worker, wait_until


async def test_events_matched_while_the_history_leader_is_killed(cluster: list[EmbeddedServer]) -> None:  # noqa: F811
    for node in cluster:
        await wait_until(lambda node=node: jetstream_answers(node.url), timeout=30, what=f"JetStream on {node.url}")
    client = Bide(",".join(n.url for n in cluster), replicas=3, ack_wait=3.0)

    @client.durable_task(name="ClusterWait")
    async def waiter(input: dict, ctx: DurableContext) -> int:
        got = await ctx.aio_wait_for_event("cluster:event", f"input.n == {input['n']}")
        return int(got["n"])

    try:
        async with running_worker(client, [waiter]):
            conn = await client._pool.get()
            s = conn.layout.subjects
            refs = [await waiter.aio_run_no_wait({"n": n}) for n in range(40)]

            async def all_routed() -> bool:
                waits = await conn.js.stream_info(s.events_stream, subjects_filter=s.waits_all)
                routers = [await conn.js.consumer_info(s.events_stream, s.router_consumer(p))
                           for p in range(conn.layout.router_partitions)]
                registered = sum((waits.state.subjects or {}).values())
                return registered >= 40 and all(r.num_pending == 0 and r.num_ack_pending == 0 for r in routers)

            await wait_until(all_routed, timeout=60, interval=0.2, what="40 waits taken in by the router")
            # The router's writes (inbox signals) go to the history stream: kill its leader's node
            # (SIGKILL) in the middle of the pushes, so some deliveries fail and must be retried.
            info = await conn.js.stream_info(s.history_stream)
            assert info.cluster is not None
            leader = next(n for n in cluster if n.server_name == info.cluster.leader)
            def push(n: int) -> Any:
                return push_until_stored(client, "cluster:event", {"n": n}, f"cluster-{n}")

            await asyncio.gather(*(push(n) for n in range(10)))
            leader.kill()
            await asyncio.gather(*(push(n) for n in range(10, 40)))
            results = await asyncio.gather(*(r.aio_result(timeout=90) for r in refs))
            assert results == list(range(40))
    finally:
        await client.aclose()
