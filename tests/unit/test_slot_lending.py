"""A durable slot lent back while its turn only waits (``SlotPool.lent``): the counts stay true."""

from __future__ import annotations

import asyncio

import pytest

from actors.hosting.activation_queue import LEND_FACTOR, SlotPool


async def _working(pool: SlotPool) -> None:
    """What ``ActivationQueue._handle`` does around a turn: a slot taken, the turn counted busy."""
    await pool.acquire_some(1)
    pool.busy += 1


def _done(pool: SlotPool) -> None:
    pool.busy -= 1
    pool.release(1)


async def test_a_lent_slot_serves_another_turn_and_comes_back_even_to_a_busy_pool() -> None:
    pool = SlotPool(1)
    await _working(pool)
    async with pool.lent():
        assert (pool.free, pool.busy, pool.lent_out) == (1, 0, 1)
        await asyncio.wait_for(_working(pool), 1)  # another turn gets the slot at once
        assert (pool.free, pool.busy) == (0, 1)
    # The waiting turn takes its slot back without waiting: the pool is over budget until a turn ends.
    assert (pool.free, pool.busy, pool.lent_out) == (-1, 2, 0)
    _done(pool)
    _done(pool)
    assert (pool.free, pool.busy) == (1, 0)


async def test_a_cancelled_wait_gives_the_slot_back_to_its_turn() -> None:
    pool = SlotPool(2)
    await _working(pool)

    async def waits() -> None:
        async with pool.lent():
            await asyncio.sleep(60)

    task = asyncio.create_task(waits())
    await asyncio.sleep(0)
    assert pool.lent_out == 1 and pool.free == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (pool.free, pool.busy, pool.lent_out) == (1, 1, 0)
    _done(pool)
    assert (pool.free, pool.busy) == (2, 0)


async def test_no_more_than_lend_factor_times_the_pool_is_lent_at_once() -> None:
    pool = SlotPool(1)
    cap = LEND_FACTOR * pool.size
    held = []
    for _ in range(cap + 1):  # as many turns waiting at once, each having begun with a slot
        pool.free -= 1
        pool.busy += 1
        cm = pool.lent()
        await cm.__aenter__()
        held.append(cm)
    assert pool.lent_out == cap and pool.busy == 1  # the last one kept its slot
    for cm in reversed(held):
        await cm.__aexit__(None, None, None)
    assert (pool.lent_out, pool.busy, pool.free) == (0, cap + 1, 1 - (cap + 1))


async def test_lent_turns_hold_at_most_lend_bytes_of_history_together() -> None:
    pool = SlotPool(4, lend_bytes=1000)
    for _ in range(3):
        pool.free -= 1
        pool.busy += 1
    first, second, third = pool.lent(600), pool.lent(600), pool.lent(400)
    await first.__aenter__()
    await second.__aenter__()  # 1,200 bytes would be over: this one keeps its slot
    await third.__aenter__()
    assert (pool.lent_out, pool.lent_bytes, pool.busy) == (2, 1000, 1)
    for cm in (third, second, first):
        await cm.__aexit__(None, None, None)
    assert (pool.lent_out, pool.lent_bytes, pool.busy, pool.free) == (0, 0, 3, 1)
