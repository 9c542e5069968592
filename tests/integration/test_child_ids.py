"""Child ids name one run each: equal child keys, reused keys and chosen ids that could collide are refused."""

from __future__ import annotations

from typing import Any

import pytest

from actors.engine.child_ids import MAX_DERIVED_ID_BYTES
from sdk import Bide, Context, DurableContext, EmptyModel, RunFailedError
from tests.support import running_worker


def define(bide: Bide) -> dict[str, Any]:
    @bide.task(name="KeyedChild")
    def keyed_child(input: int, ctx: Context) -> int:
        return input * 10

    @bide.durable_task(name="SameKeyTwiceInOneBatch")
    async def same_key_twice(input: EmptyModel, ctx: DurableContext) -> list[int]:
        items = [keyed_child.create_bulk_run_item(i, child_key="same") for i in range(2)]
        results: list[int] = await keyed_child.aio_run_many(items)
        return results

    @bide.durable_task(name="KeyReused")
    async def key_reused(input: EmptyModel, ctx: DurableContext) -> list[int]:
        first = await keyed_child.aio_run(1, child_key="k1")
        try:
            second = await keyed_child.aio_run(2, child_key="k1")
        except ValueError as e:
            return [first, -1] if "already used" in str(e) else [first, -2]
        return [first, second]

    @bide.durable_task(name="DistinctKeys")
    async def distinct_keys(input: EmptyModel, ctx: DurableContext) -> list[int]:
        items = [keyed_child.create_bulk_run_item(i, child_key=f"key-{i}") for i in range(3)]
        results: list[int] = await keyed_child.aio_run_many(items)
        return results

    @bide.durable_task(name="TildeKey")
    async def tilde_key(input: EmptyModel, ctx: DurableContext) -> int:
        result: int = await keyed_child.aio_run(1, child_key="a~1~0")
        return result

    return {"child": keyed_child, "twice": same_key_twice, "reused": key_reused, "distinct": distinct_keys,
            "tilde": tilde_key}


async def test_two_equal_child_keys_in_one_batch_fail_at_the_call_instead_of_hanging(bide: Bide) -> None:
    d = define(bide)
    async with running_worker(bide, list(d.values())):
        with pytest.raises(RunFailedError, match=r"ValueError: child_key 'same' is given twice in one spawn of run "):
            await d["twice"].aio_run(EmptyModel(), timeout=15)
        # The same key again later in the same parent would name the same child: refused too.
        assert await d["reused"].aio_run(EmptyModel(), timeout=15) == [10, -1]
        ref = await d["distinct"].aio_run_no_wait(EmptyModel())
        assert await ref.aio_result(timeout=15) == [0, 10, 20]
        assert (await bide.runs.aio_get(f"{ref.workflow_run_id}~k~key-1")).result == 10


async def test_chosen_run_ids_cannot_take_a_derived_child_id(bide: Bide) -> None:
    d = define(bide)
    async with running_worker(bide, list(d.values())):
        parent = await d["distinct"].aio_run_no_wait(EmptyModel(), run_id="order-2024-01")
        assert await parent.aio_result(timeout=15) == [0, 10, 20]
        # What used to be a child's id shape (<parent>-<pos>-<i>) is an ordinary id now ...
        assert await d["child"].aio_run(7, run_id="order-2024-01-0-0", timeout=15) == 70
        # ... and the character that marks derived ids is not allowed in a chosen one.
        for taken in (f"{parent.workflow_run_id}~k~key-0", "a~b"):
            with pytest.raises(ValueError, match=rf"run id '{taken}' contains '~', which Bide keeps for the ids "
                                                 r"of child runs"):
                await d["child"].aio_run_no_wait(1, run_id=taken)
        with pytest.raises(RunFailedError, match="child_key must be a non-empty string without '~', got 'a~1~0'"):
            await d["tilde"].aio_run(EmptyModel(), timeout=15)


async def test_children_nested_deeper_than_a_subject_can_name_still_run(bide: Bide) -> None:
    # Each keyed level used to add its key to the id: twenty levels of 250-byte keys named a
    # subject past nats-server's 4 KiB protocol line, and the server closed the host's
    # connection at the deepest start, over and over.
    @bide.durable_task(name="NestedChild")
    async def nested(input: int, ctx: DurableContext) -> dict[str, int]:
        own = len(ctx.workflow_run_id.encode())
        if input == 0:
            return {"depth": 0, "longest_id": own}
        below: dict[str, int] = await nested.aio_run(input - 1, child_key=f"{input:03d}" + "k" * 247)
        return {"depth": below["depth"] + 1, "longest_id": max(own, below["longest_id"])}

    async with running_worker(bide, [nested]):
        result = await nested.aio_run(20, timeout=60)
    assert result["depth"] == 20
    assert result["longest_id"] <= MAX_DERIVED_ID_BYTES
