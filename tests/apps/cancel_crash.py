"""A host that dies right after a parent's end is durable, as it begins cancelling the children.

``CrashParent`` is cancelled by the test; ``CrashFlow`` is a workflow whose task ``boom`` fails,
which stops its task ``hang``.

``BIDE_TEST_CRASH_MARK`` names a file: the first host about to carry out a ``CancelChildren``
(``turn_effects.request_cancel``) while the file does not exist creates it and SIGKILLs itself.
Hosts started later find the file and go on.
"""

from __future__ import annotations

from typing import Any

import actors.hosting.turn_effects as turn_effects
from sdk import Bide, Context, DurableContext
from tests.apps.failpoints import crash_if_first

_request_cancel = turn_effects.request_cancel


async def _crashing_request_cancel(*args: Any, **kwargs: Any) -> Any:
    crash_if_first("request_cancel")
    return await _request_cancel(*args, **kwargs)


turn_effects.request_cancel = _crashing_request_cancel  # type: ignore[assignment]

bide = Bide()


@bide.durable_task(name="CrashSleeper")
async def sleeper(input: dict[str, int], ctx: DurableContext) -> int:
    await ctx.aio_sleep_for(600)
    return input["i"]


@bide.durable_task(name="CrashParent")
async def parent(input: dict[str, int], ctx: DurableContext) -> list[int]:
    return await sleeper.aio_run_many([sleeper.create_bulk_run_item({"i": i}) for i in range(input["n"])])  # type: ignore[no-any-return]


flow = bide.workflow(name="CrashFlow")


@flow.durable_task()
async def hang(input: dict[str, int], ctx: DurableContext) -> int:
    await ctx.aio_sleep_for(600)
    return 0


@flow.task()
def boom(input: dict[str, int], ctx: Context) -> int:
    raise RuntimeError("boom: the workflow fails and stops its other tasks")


worker = bide.worker("cancel-crash", workflows=[sleeper, parent, flow])
