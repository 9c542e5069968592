"""Runs that sleep until an absolute moment given in their input (``tests/integration/test_sleep_on_time.py``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sdk import Bide, DurableContext

bide = Bide()


@bide.durable_task(name="SleepUntilMoment")
async def sleep_until_moment(input: dict[str, Any], ctx: DurableContext) -> str:
    await ctx.aio_sleep_until(datetime.fromisoformat(input["wake_at"]))
    return str(input["wake_at"])


worker = bide.worker("sleepers", workflows=[sleep_until_moment], durable_slots=500)
