"""A host whose inbox sweeper dies as it takes up a signal that no activation announced.

``BIDE_TEST_CRASH_MARK`` (``tests/apps/failpoints.py``): the first host whose sweeper checks a
signal old enough to act on SIGKILLs itself there, holding it unacknowledged.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg

from actors.hosting.inbox_sweeper import InboxSweeper
from sdk import Bide, DurableContext
from tests.apps.failpoints import crash_if_first

_check = InboxSweeper._check


async def _crashing_check(self: InboxSweeper, m: Msg) -> None:
    if (datetime.now(UTC) - m.metadata.timestamp).total_seconds() >= self._after:
        crash_if_first("sweep")
    await _check(self, m)


InboxSweeper._check = _crashing_check  # type: ignore[method-assign]

bide = Bide()


@bide.durable_task(name="AwaitsApproval")
async def awaits_approval(input: dict[str, Any], ctx: DurableContext) -> Any:
    return await ctx.aio_wait_for_event("approval")


worker = bide.worker("sweep-crash", workflows=[awaits_approval])
