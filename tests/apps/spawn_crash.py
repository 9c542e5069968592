"""A host that dies right after recording a spawn, before starting any child (for ``test_spawn_crash.py``).

``BIDE_TEST_CRASH_MARK`` names a file: the first host that is about to start children while it
does not exist creates it and SIGKILLs itself, exactly where a crash leaves the spawn recorded in
the parent's history and no child in existence. Hosts started later find the file and go on.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from typing import Any

import actors.hosting.turn_effects as turn_effects
from sdk import Bide, Context, DurableContext

_start_children = turn_effects.start_children


def _first_to_crash() -> bool:
    """Whether this host is the first to get here (it then leaves the mark for the others)."""
    mark = os.environ.get("BIDE_TEST_CRASH_MARK")
    if not mark:
        return False
    try:
        with open(mark, "x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        return False
    return True


async def _crash_once(*args: Any, **kwargs: Any) -> Any:
    if _first_to_crash():
        os.kill(os.getpid(), signal.SIGKILL)
    return await _start_children(*args, **kwargs)


turn_effects.start_children = _crash_once  # type: ignore[assignment]

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


worker = bide.worker("spawn-crash", workflows=[square, spawn_after_event, spawn_after_sleep, spawn_at_start])
