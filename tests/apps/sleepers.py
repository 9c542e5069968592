"""Runs that sleep until a moment, and runs over their time limit (``tests/integration/test_sleep_on_time.py``)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from sdk import Bide, Context, DurableContext

bide = Bide()


@bide.durable_task(name="SleepUntilMoment")
async def sleep_until_moment(input: dict[str, Any], ctx: DurableContext) -> str:
    await ctx.aio_sleep_until(datetime.fromisoformat(input["wake_at"]))
    return str(input["wake_at"])


@bide.task(name="OverItsLimit", execution_timeout=0.05)
async def over_its_limit(input: dict[str, Any], ctx: Context) -> None:
    await asyncio.sleep(1)


@bide.durable_task(name="DurableOverItsLimit", execution_timeout=0.05)
async def durable_over_its_limit(input: dict[str, Any], ctx: DurableContext) -> None:
    await asyncio.sleep(1)


worker = bide.worker("sleepers", workflows=[sleep_until_moment, over_its_limit, durable_over_its_limit],
                     durable_slots=500, slots=500)
