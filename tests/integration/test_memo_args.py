"""A memo's arguments are recorded by a hash that is the same in every process."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sdk import Bide, DurableContext, EmptyModel
from sdk.testing import BideTestEnv


class Order:
    """An ordinary class: its default ``repr`` names its address."""

    def __init__(self, oid: str) -> None:
        self.oid = oid


def charge(order: Order, tags: set[str]) -> str:
    return f"charged {order.oid} {sorted(tags)}"


async def test_a_memo_of_plain_objects_and_sets_replays_after_eviction(bide: Bide,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The hash used the arguments' repr: an object's address, a set's hash-seeded order. The
    # first replay (every turn, with no warm runs) failed with NonDeterminismError.
    monkeypatch.setenv("BIDE_WARM_RUNS", "0")
    client = Bide(bide.config.nats_url)

    @client.durable_task(name="MemoPlainObjects")
    async def memo_plain(input: EmptyModel, ctx: DurableContext) -> str:
        paid: str = await ctx.memo(charge, Order("42"), {"gift", "express", "fragile"})
        await ctx.aio_sleep_for(timedelta(seconds=1))
        return paid

    async with BideTestEnv(client, workflows=[memo_plain]) as env:
        ref = await memo_plain.aio_run_no_wait(EmptyModel())
        await env.skip(timedelta(seconds=2))
        assert await ref.aio_result(timeout=20) == "charged 42 ['express', 'fragile', 'gift']"
    await client.aclose()
