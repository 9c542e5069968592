"""``bide.worker(...)``: the user's handle on an actor host. The runtime loads only on start."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdk.client import Bide
    from sdk.tasks import TaskDefinition


class Worker:
    """Hosts tasks: pulls their activations, runs turns, honours ``slots`` and ``durable_slots``."""

    def __init__(
        self, client: Bide, name: str, tasks: list[TaskDefinition], *, slots: int = 100, durable_slots: int = 1000
    ) -> None:
        for what, value in (("slots", slots), ("durable_slots", durable_slots)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"worker {name!r}: {what} must be a whole number of at least 1, got {value!r}")
        if not tasks:
            raise ValueError(f"worker {name!r} has no tasks to host: pass workflows=[...]")
        self.client = client
        self.name = name
        self.tasks = tasks
        self.slots = slots
        self.durable_slots = durable_slots
        self._host: Any = None
        self._stop: asyncio.Event | None = None

    async def async_start(self, *, ready: asyncio.Event | None = None) -> None:
        """Run the host until :meth:`shutdown` (or SIGTERM/SIGINT when started with :meth:`start`).

        Raises ``NatsUnavailableError`` if the server closes the host's connection for good (a
        protocol error, an expired credential): the host has stopped, its work goes to other hosts.
        """
        from actors.hosting.host import ActorHost  # the one seam into the runtime

        self._stop = asyncio.Event()
        self._host = ActorHost(self.client.config, self.name, self.tasks, self.slots, self.durable_slots,
                               tracing=self.client.tracing)
        await self._host.start()
        if ready is not None:
            ready.set()
        stopped = asyncio.ensure_future(self._stop.wait())
        lost = asyncio.ensure_future(self._host.connection_lost.wait())
        try:
            await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            lost.cancel()
            await self._host.stop()
        if self._host.lost is not None:
            raise self._host.lost  # the server closed the connection: the process should end (and be restarted)

    def start(self) -> None:
        """Run the host in the foreground; SIGTERM or Ctrl-C shuts it down gracefully."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._request_stop)
            await self.async_start()

        from actors.hosting import event_loop

        event_loop.run(main())

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def shutdown(self) -> None:
        """Stop pulling work, finish or hand back what is in flight, and return when done."""
        self._request_stop()

    @property
    def host(self) -> Any:
        return self._host
