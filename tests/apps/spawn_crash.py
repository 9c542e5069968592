"""A host that dies right after a turn's append, before its effects (for ``test_spawn_crash.py``).

``BIDE_TEST_CRASH_AT`` names the effect: ``start_children`` (the spawn is recorded in the
parent's history, no child exists), ``schedule_timer`` (the sleep is recorded, its timer is
not published) or ``withdraw_wait`` (a wait is resolved, its registration not withdrawn).
``BIDE_TEST_CRASH_MARK`` names a file: the first host about to carry out that effect while the
file does not exist creates it and SIGKILLs itself. Hosts started later find the file and go on.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import actors.hosting.turn_effects as turn_effects
from actors.store.timers import TimerScheduler
from sdk import Bide, Context, DurableContext
from tests.apps.failpoints import crash_if_first

_start_children = turn_effects.start_children
_schedule_timer = TimerScheduler.schedule
_publish_registrations = turn_effects.publish_registrations


async def _crashing_start_children(*args: Any, **kwargs: Any) -> Any:
    crash_if_first("start_children")
    return await _start_children(*args, **kwargs)


async def _crashing_schedule_timer(*args: Any, **kwargs: Any) -> Any:
    crash_if_first("schedule_timer")
    return await _schedule_timer(*args, **kwargs)


async def _crashing_publish_registrations(*args: Any, **kwargs: Any) -> Any:
    if args[6] == "cancel":  # (publisher, layout, wait, run_id, task, run_input, op)
        crash_if_first("withdraw_wait")
    return await _publish_registrations(*args, **kwargs)


turn_effects.start_children = _crashing_start_children  # type: ignore[assignment]
turn_effects.publish_registrations = _crashing_publish_registrations  # type: ignore[assignment]
TimerScheduler.schedule = _crashing_schedule_timer  # type: ignore[method-assign]

bide = Bide()


@bide.task(name="CrashSquare")
def square(input: dict[str, int], ctx: Context) -> int:
    return input["x"] ** 2


async def _fan_out() -> list[int]:
    return await square.aio_run_many([square.create_bulk_run_item({"x": i}) for i in range(3)])  # type: ignore[no-any-return]


@bide.durable_task(name="SpawnAfterEvent")
async def spawn_after_event(input: dict[str, str], ctx: DurableContext) -> list[int]:
    await ctx.aio_wait_for_event(input["key"])  # the spawning turn is a signal's activation
    return await _fan_out()


@bide.durable_task(name="SpawnAfterSleep")
async def spawn_after_sleep(input: dict[str, str], ctx: DurableContext) -> list[int]:
    await ctx.aio_sleep_for(timedelta(seconds=1))  # the spawning turn is a timer's activation
    return await _fan_out()


@bide.durable_task(name="SpawnAtStart")
async def spawn_at_start(input: dict[str, str], ctx: DurableContext) -> list[int]:
    return await _fan_out()


@bide.durable_task(name="SleepAfterEvent")
async def sleep_after_event(input: dict[str, str], ctx: DurableContext) -> list[int]:
    await ctx.aio_wait_for_event(input["key"])  # the turn that begins the sleep is a signal's activation
    await ctx.aio_sleep_for(timedelta(seconds=1))
    return [0, 1, 4]


@bide.durable_task(name="AtOnceThenEnd")
async def at_once_then_end(input: dict[str, str], ctx: DurableContext) -> Any:
    await ctx.aio_sleep_for(timedelta(seconds=2))  # a message sent meanwhile waits in the run's inbox
    return await ctx.aio_wait_for_event(input["key"])  # resolved at once from it, and the run ends


worker = bide.worker("spawn-crash", workflows=[square, spawn_after_event, spawn_after_sleep, spawn_at_start,
                                                   sleep_after_event, at_once_then_end])
