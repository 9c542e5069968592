"""The stream guard: settings Bide's guarantees rest on, put back when they are changed by hand.

Every host creates the streams at start with the settings that keep runs safe (no max age on
histories, no rollup headers on what outsiders publish to, ...). An operator's
``nats stream edit BIDE_HISTORY --max-age 30d`` would otherwise expire every run that lives
longer, from then until some host restarts. Each host checks every ``interval_s`` (jittered,
so hosts do not ask together) and puts back what was changed
(:func:`actors.store.jetstream.restore_streams`), with a warning naming the setting. What the
server already removed under the changed setting is gone: the guard bounds the damage to one
interval. Settings no guarantee rests on (replicas, placement, compression) stay as set.
It also removes events a publisher's ``Nats-TTL`` header kept past the events' max age
(:func:`actors.store.jetstream.remove_overdue_events`).
"""

from __future__ import annotations

import logging

from nats.aio.client import Client as NATS

from actors.hosting.periodic import Periodic
from actors.store.jetstream import Layout, remove_overdue_events, restore_streams

log = logging.getLogger("bide.streams")


class StreamGuard:
    """Checks the streams' guarded settings every ``interval_s`` and restores any changed by hand."""

    def __init__(self, nc: NATS, layout: Layout, interval_s: float) -> None:
        self._nc = nc
        self._layout = layout
        self._rounds = Periodic("bide-stream-guard", interval_s, self._round, log, "checking the streams' settings")
        self.restored: list[str] = []
        """Everything this host put back, in order (for tests and ``bide status``)."""
        self.removed_events = 0
        """Events this host removed for outliving the events' max age (their own ``Nats-TTL``)."""

    def start(self) -> StreamGuard:
        self._rounds.start()
        return self

    async def stop(self) -> None:
        await self._rounds.stop()

    async def _round(self) -> None:
        restored = await restore_streams(self._nc, self._layout)
        self.removed_events += await remove_overdue_events(self._nc, self._layout)
        for line in restored:
            log.warning("%s: Bide's guarantees rest on this setting; change it through Bide's "
                        "configuration, not on the stream", line)
        self.restored += restored
