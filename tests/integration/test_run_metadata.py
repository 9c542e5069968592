"""A run's ``additional_metadata`` against a real nats-server: set at start, inherited, readable in code."""

from __future__ import annotations

from typing import Any

import pytest

from actors.engine.wire import RunStarted, decode_history, encode_history, utcnow
from sdk import Bide, Context, DurableContext
from tests.integration.test_http_api import client_for
from tests.support import running_worker, wait_until


async def test_metadata_is_set_at_start_inherited_by_children_and_readable(bide: Bide) -> None:
    @bide.task(name="md_leaf")
    def leaf(input: Any, ctx: Context) -> dict[str, str]:
        return ctx.additional_metadata

    @bide.durable_task(name="md_parent")
    async def parent(input: Any, ctx: DurableContext) -> dict[str, Any]:
        own = ctx.additional_metadata
        child = await leaf.aio_run(None, additional_metadata={"step": "one", "tenant": "child-wins"})
        ref = await leaf.aio_run_no_wait(None)
        return {"own": own, "child": child, "plain_child": await ref.aio_result()}

    async with running_worker(bide, [leaf, parent]):
        out = await parent.aio_run(None, additional_metadata={"tenant": "acme", "env": "test"}, timeout=30)
        assert out == {"own": {"tenant": "acme", "env": "test"},
                       "child": {"tenant": "child-wins", "env": "test", "step": "one"},
                       "plain_child": {"tenant": "acme", "env": "test"}}
        ref = await leaf.aio_run_no_wait(None, additional_metadata={"a": "1"})
        assert await ref.aio_result(timeout=30) == {"a": "1"}
        hist = await bide.runs.aio_history(ref.workflow_run_id)
        assert hist.started.additional_metadata == {"a": "1"}
        # A run without metadata reads an empty mapping.
        assert await leaf.aio_run(None, timeout=30) == {}


async def test_runs_started_by_an_event_inherit_its_string_metadata(bide: Bide) -> None:
    seen: list[dict[str, str]] = []

    @bide.task(name="md_on_event", on_events=["md:created"])
    def on_created(input: Any, ctx: Context) -> None:
        seen.append(ctx.additional_metadata)

    async with running_worker(bide, [on_created]):
        await bide.event.aio_push("md:created", {"n": 1}, additional_metadata={"source": "sdk", "n": 3})
        await wait_until(lambda: len(seen) == 1, timeout=15, what="the event's run")
        # Only string values carry over (the event's metadata may be any JSON).
        assert seen == [{"source": "sdk"}]
        async with client_for(bide) as api:
            resp = await api.post("/api/v1/events", json={"key": "md:created", "additional_metadata": {"via": "http"}})
            assert resp.status_code == 202, resp.text
            both = await api.post("/api/v1/events", json={"key": "md:created", "metadata": {"a": "b", "c": "d"},
                                                         "additional_metadata": {"a": "B"}})
            assert both.status_code == 202, both.text
        await wait_until(lambda: len(seen) == 3, timeout=15, what="the HTTP events' runs")
        assert sorted(seen[1:], key=len) == [{"via": "http"}, {"a": "B", "c": "d"}]


@pytest.mark.parametrize(("metadata", "named"), [
    ({"n": 1}, "'n'"),
    ({1: "x"}, "1"),
    ({"": "x"}, "''"),
    ("tenant=acme", "str"),
    ({f"k{i}": "v" for i in range(65)}, "65 keys"),
    ({"big": "x" * 5000}, "4,096 bytes"),
])
async def test_bad_metadata_is_refused_naming_the_value(bide: Bide, metadata: Any, named: str) -> None:
    @bide.task(name="md_never")
    def never(input: Any, ctx: Context) -> None:
        return None

    with pytest.raises(ValueError) as err:
        await never.aio_run_no_wait(None, additional_metadata=metadata)
    assert "additional_metadata" in str(err.value) and named in str(err.value)


def test_a_start_without_metadata_is_written_as_before() -> None:
    plain = RunStarted(run_id="r", task="t", durable=False, at=utcnow())
    assert b"additional_metadata" not in encode_history([plain])
    tagged = plain.model_copy(update={"additional_metadata": {"a": "b"}})
    back = decode_history(encode_history([tagged]))[0]
    assert isinstance(back, RunStarted) and back.additional_metadata == {"a": "b"}
    assert decode_history(encode_history([plain]))[0] == plain
