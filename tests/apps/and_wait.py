"""Tasks for the test of a wait whose sleep is over while its event has not come, hosted by
``WorkerProcess("tests.apps.and_wait:worker")``: a host that wedges must not wedge the test."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sdk import Bide, Context, DurableContext, SleepCondition, TaskDefinition, UserEventCondition

EVENT_KEY = "and-wait:go"


def define(client: Bide) -> tuple[TaskDefinition, TaskDefinition]:
    @client.durable_task(name="SleepAndEvent")
    async def sleep_and_event(input: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
        # Both conditions: the sleep is satisfied a second in, the event whenever it comes.
        return await ctx.aio_wait_for("both", SleepCondition(timedelta(seconds=1)),
                                      UserEventCondition(event_key=EVENT_KEY))

    @client.task(name="Echo")
    async def echo(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return input

    return sleep_and_event, echo


bide = Bide()
worker = bide.worker("and-wait", workflows=list(define(bide)))
