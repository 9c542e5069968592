"""The offline replayer and safe code changes (``ctx.patched``), against runs made by a real server."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from actors.engine.run_history import export_run
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, EmptyModel, NonDeterminismError
from sdk.testing import BideTestEnv, aio_replay, replay
from tests.support import running_worker, wait_until


def order_app(variant: str) -> tuple[Bide, Any]:
    """One task, ``Order``, as its code reads in each version."""
    bide = Bide("nats://127.0.0.1:1")

    def reserve(item: str) -> str:
        return f"reserved {item}"

    def charge(amount: int) -> str:
        return f"charged {amount}"

    def ship(item: str) -> str:
        return f"shipped {item}"

    @bide.durable_task(name="Order")
    async def order(input: EmptyModel, ctx: DurableContext) -> list[str]:
        done = []
        if variant == "swapped":
            done.append(await ctx.memo(charge, 10))
            done.append(await ctx.memo(reserve, "book"))
        else:
            done.append(await ctx.memo(reserve, "book"))
            done.append(await ctx.memo(charge, 10))
        await ctx.aio_sleep_for(timedelta(days=1))
        if variant == "longer":
            done.append(await ctx.memo(ship, "book"))
        return done

    return bide, order


async def finished_order_export() -> dict[str, Any]:
    bide, order = order_app("original")
    async with BideTestEnv(bide, workflows=[order]) as env:
        ref = await order.aio_run_no_wait(EmptyModel())
        await env.skip(timedelta(days=1))
        await ref.aio_result(timeout=10)
        return export_run(await bide.runs.aio_history(ref.workflow_run_id))


async def test_the_same_code_replays_a_finished_run(tmp_path: Path) -> None:
    doc = await finished_order_export()
    _, order = order_app("original")
    await aio_replay(doc, [order])
    path = tmp_path / "order.json"
    path.write_text(json.dumps(doc))
    await aio_replay(path, [order])  # a path
    await aio_replay(path.read_text(), [order])  # the text
    replay(str(path), [order])  # the sync form, from async code too


async def test_changed_order_of_steps_is_named_with_its_position() -> None:
    doc = await finished_order_export()
    _, swapped = order_app("swapped")
    with pytest.raises(NonDeterminismError) as err:
        await aio_replay(doc, [swapped])
    assert err.value.position == 0
    assert "reserve" in err.value.recorded and "charge" in err.value.requested


async def test_a_step_added_before_a_completed_end_is_a_mismatch() -> None:
    doc = await finished_order_export()
    _, longer = order_app("longer")
    with pytest.raises(NonDeterminismError) as err:
        await aio_replay(doc, [longer])
    assert "the end of the run" in err.value.recorded and "ship" in err.value.requested


async def test_a_step_added_after_where_a_live_run_waits_is_compatible() -> None:
    bide, order = order_app("original")
    async with BideTestEnv(bide, workflows=[order]) as env:
        ref = await order.aio_run_no_wait(EmptyModel())
        await env.skip(timedelta(hours=1))  # asleep, one day to go
        doc = export_run(await bide.runs.aio_history(ref.workflow_run_id))
    _, longer = order_app("longer")
    await aio_replay(doc, [longer])
    _, swapped = order_app("swapped")
    with pytest.raises(NonDeterminismError):
        await aio_replay(doc, [swapped])


async def test_bad_inputs_to_the_replayer_say_what_is_wrong(tmp_path: Path) -> None:
    _, order = order_app("original")
    with pytest.raises(FileNotFoundError, match="bide runs export"):
        await aio_replay(tmp_path / "missing.json", [order])
    with pytest.raises(ValueError, match="not a Bide run export"):
        await aio_replay({"entries": []}, [order])
    with pytest.raises(ValueError, match="not JSON"):
        await aio_replay("{oops", [order])
    doc = await finished_order_export()
    other = Bide("nats://127.0.0.1:1")

    @other.durable_task(name="Other")
    async def unrelated(input: EmptyModel, ctx: DurableContext) -> None:
        return None

    with pytest.raises(ValueError, match="'Order', which is not among the given workflows"):
        await aio_replay(doc, [unrelated])


def checkout_app(url: str, variant: str) -> tuple[Bide, Any]:
    bide = Bide(url, ack_wait=3.0)

    def card(amount: int) -> str:
        return f"card {amount}"

    def wallet(amount: int) -> str:
        return f"wallet {amount}"

    @bide.durable_task(name="Checkout")
    async def checkout(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        if variant == "v1":
            paid = await ctx.memo(card, 5)
        elif variant == "v2":
            paid = await ctx.memo(wallet, 5) if ctx.patched("pay-by-wallet") else await ctx.memo(card, 5)
        else:  # v3: every run that could take the old path has finished, the patch call is gone
            paid = await ctx.memo(wallet, 5)
        confirmed = await ctx.aio_wait_for_event("confirm", f"input.run == '{ctx.workflow_run_id}'")
        return {"paid": paid, "confirmed": confirmed["ok"]}

    return bide, checkout


async def test_patched_lets_old_and_new_runs_complete_across_a_restart_with_new_code(
    nats_server: EmbeddedServer,
) -> None:
    v1, checkout_v1 = checkout_app(nats_server.url, "v1")
    async with running_worker(v1, [checkout_v1]):
        old = await checkout_v1.aio_run_no_wait(EmptyModel())

        async def waiting() -> bool:
            return any(e.k == "wait_registered" for e in (await v1.runs.aio_history(old.workflow_run_id)).entries)

        await wait_until(waiting, timeout=15, what="the old run to wait")
    await v1.aclose()

    v2, checkout_v2 = checkout_app(nats_server.url, "v2")
    try:
        async with running_worker(v2, [checkout_v2]):
            new = await checkout_v2.aio_run_no_wait(EmptyModel())
            for ref in (old, new):
                async def waits(rid: str = ref.workflow_run_id) -> bool:
                    return any(e.k == "wait_registered" for e in (await v2.runs.aio_history(rid)).entries)

                await wait_until(waits, timeout=15, what="the run to wait")
                await v2.event.aio_push("confirm", {"run": ref.workflow_run_id, "ok": True})
            assert await v2.runs.aio_result(old.workflow_run_id, timeout=15) == {"paid": "card 5", "confirmed": True}
            assert await v2.runs.aio_result(new.workflow_run_id, timeout=15) == {"paid": "wallet 5",
                                                                                 "confirmed": True}
            old_doc = export_run(await v2.runs.aio_history(old.workflow_run_id))
            new_doc = export_run(await v2.runs.aio_history(new.workflow_run_id))
    finally:
        await v2.aclose()
    assert any(e["k"] == "patched" for e in new_doc["entries"])
    assert not any(e["k"] == "patched" for e in old_doc["entries"])
    # Both histories replay against the patched code; once the old path is gone, the new run still does.
    await aio_replay(old_doc, [checkout_v2])
    await aio_replay(new_doc, [checkout_v2])
    _, checkout_v3 = checkout_app(nats_server.url, "v3")
    await aio_replay(new_doc, [checkout_v3])
    with pytest.raises(NonDeterminismError):
        await aio_replay(old_doc, [checkout_v3])
