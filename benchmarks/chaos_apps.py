"""The tasks the chaos harness runs (``bide worker benchmarks.chaos_apps:worker``).

Every side effect the oracle checks is a line appended to ``CHAOS_STEPS`` (a file outside
any Bide process): ``{"r": run id, "s": step, "p": pid, "t": unix time}``. One ``os.write``
on an ``O_APPEND`` descriptor per line, so lines of concurrent processes never interleave and a
SIGKILL leaves either the whole line or none. Every result is a pure function of the input, so
the harness knows what each run must return.
"""
# mypy: disable-error-code="untyped-decorator,arg-type,var-annotated"
# (The SDK's decorators return ``Any``, and ``DurableContext.memo`` infers ``Never`` for an async step.)

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from typing import Any

import orjson

from sdk import Bide, Context, DurableContext

bide = Bide()  # BIDE_NATS_URL (and BIDE_REPLICAS, BIDE_ACK_WAIT) are set by the harness

EVENT_KEY = "chaos:ev"
TRIGGER_KEY = "chaos:trigger"
NEVER_KEY = "chaos:never"
DIRECT_NAME = "chaos-msg"

_fd: int | None = None


def record(run_id: str, step: str) -> None:
    """Append one side-effect line for (run, step) from this process."""
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["CHAOS_STEPS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    line = orjson.dumps({"r": run_id, "s": step, "p": os.getpid(), "t": time.time()}) + b"\n"
    os.write(_fd, line)


async def step(run_id: str, i: int, ms: int) -> int:
    """A step with a side effect that takes ``ms`` milliseconds (a window for a kill to land in)."""
    record(run_id, f"step{i}")
    if ms:
        await asyncio.sleep(ms / 1000)
    return i * i + 1


# -- durable runs with memo steps ------------------------------------------------------------------


@bide.durable_task(name="ChaosSteps")
async def chaos_steps(input: dict[str, Any], ctx: DurableContext) -> dict[str, int]:
    total = 0
    for i in range(input["n"]):
        total += await ctx.memo(step, ctx.run_id, i, input["ms"])
    return {"sum": total}


@bide.durable_task(name="ChaosSleep")
async def chaos_sleep(input: dict[str, Any], ctx: DurableContext) -> dict[str, int]:
    a = await ctx.memo(step, ctx.run_id, 0, 0)
    res = await ctx.aio_sleep_for(timedelta(seconds=input["s"]))
    b = await ctx.memo(step, ctx.run_id, 1, 0)
    return {"slept": res.duration.seconds, "steps": a + b}


@bide.durable_task(name="ChaosWait")
async def chaos_wait(input: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
    await ctx.memo(step, ctx.run_id, 0, 0)
    got = await ctx.aio_wait_for_event(
        EVENT_KEY, f"input.id == {input['id']}", scope=input.get("scope"),
        lookback_window=timedelta(hours=1) if input["lookback"] else None,
        timeout=timedelta(seconds=input["timeout"]),
    )
    await ctx.memo(step, ctx.run_id, 1, 0)
    return {"got": got}


@bide.durable_task(name="ChaosDirect")
async def chaos_direct(input: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
    first = await ctx.aio_wait_for_event(DIRECT_NAME)
    await ctx.memo(step, ctx.run_id, 0, 0)
    second = await ctx.aio_wait_for_event(DIRECT_NAME)
    return {"got": [first["n"], second["n"]]}


@bide.durable_task(name="ChaosForever")
async def chaos_forever(input: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
    """One direct event per generation, then ``continue_as_new`` until ``gens`` generations took one each."""
    gen, got = input.get("gen", 0), input.get("got", [])
    msg = await ctx.aio_wait_for_event(DIRECT_NAME)
    await ctx.memo(step, ctx.run_id, gen, 0)
    got = [*got, msg["n"]]
    if gen + 1 < input["gens"]:
        ctx.continue_as_new({"gens": input["gens"], "gen": gen + 1, "got": got})
    return {"got": got}


@bide.durable_task(name="ChaosFlaky", retries=2)
async def chaos_flaky(input: dict[str, Any], ctx: DurableContext) -> dict[str, int]:
    v = await ctx.memo(step, ctx.run_id, 0, 0)
    if ctx.attempt_number == 1:
        raise RuntimeError("planned failure of the first attempt")
    return {"attempt": ctx.attempt_number, "v": v}


@bide.durable_task(name="ChaosCancel")
async def chaos_cancel(input: dict[str, Any], ctx: DurableContext) -> dict[str, str]:
    await ctx.memo(step, ctx.run_id, 0, 0)
    if input["how"] == "sleep":
        await ctx.aio_sleep_for(timedelta(hours=1))
    else:
        await ctx.aio_wait_for_event(NEVER_KEY, f"input.id == {input['id']}")
    return {"not": "cancelled"}


# -- children ---------------------------------------------------------------------------------------


@bide.task(name="ChaosChild")
async def chaos_child(input: dict[str, Any], ctx: Context) -> dict[str, int]:
    record(ctx.run_id, "child")
    await asyncio.sleep(input["ms"] / 1000)
    return {"sq": input["i"] * input["i"]}


@bide.durable_task(name="ChaosFanout")
async def chaos_fanout(input: dict[str, Any], ctx: DurableContext) -> dict[str, int]:
    results = await chaos_child.aio_run_many([{"i": i, "ms": input["ms"]} for i in range(input["n"])])
    return {"n": len(results), "sum": sum(r["sq"] for r in results)}


# -- a DAG workflow ---------------------------------------------------------------------------------

dag = bide.workflow(name="ChaosDag")


@dag.task(name="a")
async def dag_a(input: dict[str, Any], ctx: Context) -> dict[str, int]:
    record(ctx.run_id, "dag-a")
    return {"v": input["x"] + 1}


@dag.durable_task(name="b", parents=[dag_a])
async def dag_b(input: dict[str, Any], ctx: DurableContext) -> dict[str, int]:
    v = await ctx.memo(step, ctx.run_id, 0, 50)
    return {"v": ctx.task_output(dag_a)["v"] * 2 + v}


@dag.task(name="c", parents=[dag_a])
async def dag_c(input: dict[str, Any], ctx: Context) -> dict[str, int]:
    record(ctx.run_id, "dag-c")
    return {"v": ctx.task_output(dag_a)["v"] + 10}


@dag.task(name="d", parents=[dag_b, dag_c])
async def dag_d(input: dict[str, Any], ctx: Context) -> dict[str, int]:
    record(ctx.run_id, "dag-d")
    return {"v": ctx.task_output(dag_b)["v"] + ctx.task_output(dag_c)["v"]}


# -- on_events triggers -----------------------------------------------------------------------------


@bide.task(name="ChaosTriggered", on_events=[TRIGGER_KEY])
async def chaos_triggered(input: dict[str, Any], ctx: Context) -> dict[str, str]:
    record(ctx.run_id, f"trig:{input['tag']}")
    return {"tag": input["tag"]}


worker = bide.worker(
    "chaos",
    workflows=[chaos_steps, chaos_sleep, chaos_wait, chaos_direct, chaos_forever, chaos_flaky, chaos_cancel,
               chaos_child, chaos_fanout, dag, chaos_triggered],
    slots=200, durable_slots=5000,
)
