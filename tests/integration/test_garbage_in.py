"""Nothing anyone publishes may crash a host or corrupt a run: garbage on every subject a host reads.

While durable runs wait, a plain NATS client publishes a few hundred random messages (bytes,
JSON, envelopes with the right keys and wrong values, random ``Nats-*`` and ``Bide-*``
headers) on the events subjects, the waiting run's inbox and the work subjects. Then the
real event is pushed: the run must complete with it, and the host must still serve new runs.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
from typing import Any

import nats
import pytest

from actors.engine.wire import Subjects
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, EmptyModel, RunStatus
from tests.support import running_worker, wait_until

SEED = 16
MESSAGES = 400
S = Subjects()
KINDS = ["start", "timer", "retry", "signal", "bogus"]
HEADER_VALUES = ["", "all", "sub", "0", "1", "-1", "18446744073709551616", "never", "1s", "garbage", "\u00e9t\u00e9",
                 "[[1, 2]]", '{"a": 1}', "null", "2026-01-01T00:00:00Z", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"]
HEADER_NAMES = ["Nats-Rollup", "Nats-Expected-Stream", "Nats-Expected-Last-Sequence",
                "Nats-Expected-Last-Subject-Sequence", "Nats-Expected-Last-Msg-Id", "Nats-Msg-Id", "Nats-TTL",
                "Nats-Schedule", "Nats-Schedule-Target", "Bide-Kind", "Bide-Due", "Bide-Metadata", "traceparent"]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 4 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 2**63, -(2**64), 10**30, rng.randrange(-1000, 1000)])
    if choice == 3:
        return rng.choice([1.5, -0.0, 1e308])
    if choice == 4:
        return "".join(rng.choice(string.printable + "\u00e9\u2028\U0001f600") for _ in range(rng.randrange(12)))
    if choice in (5, 6):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_json_key(rng): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def random_json_key(rng: random.Random) -> str:
    return rng.choice(["v", "k", "e", "run_id", "task", "kind", "source", "name", "payload", "event_id", "at",
                       "started", "inbox_seq", "history_seq", "pos", "x", ""])


def envelope(rng: random.Random, run_id: str, task: str) -> dict[str, Any]:
    """Right keys, values right or wrong: an activation, a signal or a history batch, nearly."""
    kind = rng.randrange(4)
    if kind == 0:
        base = {"v": 1, "run_id": run_id, "task": task, "kind": rng.choice(KINDS)}
    elif kind == 1:
        # Not a well-formed cancel: on the inbox (a host's and the API's channel only) that cancels, by design.
        base = {"v": 1, "source": rng.choice(["event", "direct", "child", "?"]), "name": "not-the-event",
                "event_id": f"junk-{rng.random()}", "at": "2026-01-01T00:00:00Z", "payload": random_json(rng)}
    elif kind == 2:
        base = {"v": rng.choice([1, 2, 99]), "e": [{"k": rng.choice(["run_completed", "run_failed", "memo"]),
                                                   "result": random_json(rng)}]}
    else:
        base = {"v": 1, "run_id": run_id}  # a removal of a live run
    for _ in range(rng.randrange(3)):  # break it a little (or not)
        base[random_json_key(rng)] = random_json(rng)
    return base


def garbage(rng: random.Random, run_id: str, task: str) -> tuple[str, bytes, dict[str, str]]:
    if rng.random() < 0.03:
        # Well formed, but no history can hold it: this once failed every turn of the run.
        signal = {"v": 1, "source": "direct", "name": "not-the-event", "event_id": f"big-{rng.random()}",
                  "at": "2026-01-01T00:00:00Z", "payload": {"n": rng.choice([10**30, -(2**64)])}}
        return S.inbox(run_id), json.dumps(signal).encode(), {}
    subject = rng.choice([
        S.event("fuzz:go"), S.event("fuzz:go", "scope-x"), S.event(f"junk{rng.randrange(5)}"),
        S.event("fuzz:go") + ".a.b", S.inbox(run_id), S.work(task, run_id), S.work("NoSuchTask", run_id),
        S.reap(run_id), S.work(task, f"ghost-{rng.randrange(5)}"),
    ])
    body_kind = rng.randrange(4)
    if body_kind == 0:
        data = rng.randbytes(rng.randrange(64))
    elif body_kind == 1:
        data = json.dumps(random_json(rng)).encode() if rng.random() < 0.9 else b"[" * 500
    else:
        data = json.dumps(envelope(rng, run_id, task)).encode()  # not orjson: integers beyond 64 bits too
    headers = {rng.choice(HEADER_NAMES): rng.choice(HEADER_VALUES) for _ in range(rng.choice([0, 0, 1, 2, 3]))}
    return subject, data, headers


async def stored(nc: Any) -> int:
    """Every message ever stored in the events, history and work streams (work messages are taken)."""
    js = nc.jetstream()
    total = 0
    for stream in (S.events_stream, S.history_stream, S.work_stream):
        total += (await js.stream_info(stream)).state.last_seq
    return total


async def test_garbage_on_every_subject_neither_crashes_the_host_nor_corrupts_the_run(
        nats_server: EmbeddedServer, bide: Bide) -> None:
    @bide.durable_task(name="FuzzGo")
    async def fuzz_go(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        got = await ctx.aio_wait_for_event("fuzz:go", "input.secret == 'open-sesame-16'")
        return {"got": got}

    @bide.durable_task(name="FuzzAfter")
    async def fuzz_after(input: EmptyModel, ctx: DurableContext) -> str:
        return "still serving"

    rng = random.Random(SEED)
    async with running_worker(bide, [fuzz_go, fuzz_after]):
        ref = await fuzz_go.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id

        async def waiting() -> bool:
            return (await bide.runs.aio_get(run_id)).status is RunStatus.WAITING

        await wait_until(waiting, what="the run to wait")
        nc = await nats.connect(nats_server.url)
        try:
            before = await stored(nc)
            for _ in range(MESSAGES):
                subject, data, headers = garbage(rng, run_id, "FuzzGo")
                await nc.publish(subject, data, headers=headers or None)
            await nc.flush()

            # Much of it got in (the server refuses the rest: rollups, wrong expected sequences, bad TTLs).
            async def got_in() -> bool:
                return await stored(nc) - before > MESSAGES // 4

            await wait_until(got_in, what="the garbage to be stored")
        finally:
            await nc.close()

        await bide.event.aio_push("fuzz:go", {"secret": "open-sesame-16", "n": 1})
        assert await ref.aio_result(timeout=30) == {"got": {"secret": "open-sesame-16", "n": 1}}
        assert await fuzz_after.aio_run(EmptyModel(), timeout=30) == "still serving"
        info = await bide.runs.aio_get(run_id)
        assert info.status is RunStatus.COMPLETED and info.error is None


@pytest.mark.parametrize("metadata", ["[[1, 2]]", '{"a": 99999999999999999999999}', "[" * 1000 + "]" * 1000],
                         ids=["pairs", "int-over-int64", "too-deep"])
async def test_raw_event_metadata_that_is_not_an_object_is_dropped_not_fatal_to_the_event(
        nats_server: EmbeddedServer, bide: Bide, metadata: str) -> None:
    """``Bide-Metadata: [[1, 2]]`` (a JSON array of pairs) made metadata with an integer key:
    no signal could hold it, and the router rejected the event, so the wait never saw it. Metadata
    over a limit was rejected with the whole event the same way."""

    @bide.durable_task(name="MetaWaits")
    async def meta_waits(input: EmptyModel, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("fuzz:meta")

    async with running_worker(bide, [meta_waits]):
        ref = await meta_waits.aio_run_no_wait(EmptyModel())

        async def waiting() -> bool:
            return (await bide.runs.aio_get(ref.workflow_run_id)).status is RunStatus.WAITING

        await wait_until(waiting, what="the run to wait")
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().publish(S.event("fuzz:meta"), b'{"ok": 1}', headers={"Bide-Metadata": metadata})
        finally:
            await nc.close()
        assert await asyncio.wait_for(ref.aio_result(), 20) == {"ok": 1}
