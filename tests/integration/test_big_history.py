"""Large histories: read whole or refused with a clear error, never cut short."""

from __future__ import annotations

from typing import Any

import nats
import pytest

from actors.store.jetstream import direct_get_subject
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext
from sdk.errors import RunFailedError
from tests.support import running_worker


async def test_a_read_larger_than_one_batch_is_read_whole(nats_server: EmbeddedServer) -> None:
    """The server sends at most 64 MiB per batch request: 80 MiB on one subject is still read whole."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="BIG", subjects=["big.>"], allow_direct=True, max_msg_size=2 * 1024 * 1024)
        body = b"x" * (1000 * 1024)
        for _ in range(80):
            await js.publish("big.run", body)
        msgs = await direct_get_subject(nc, "BIG", "big.run", timeout=30)
        assert len(msgs) == 80
    finally:
        await nc.close()


async def test_a_run_past_the_history_limit_fails_naming_it(nats_server: EmbeddedServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDE_MAX_HISTORY", "64KiB")
    bide = Bide(nats_server.url, ack_wait=3.0)

    @bide.durable_task(name="Hoarder")
    async def hoarder(input: dict, ctx: DurableContext) -> Any:
        for i in range(10):
            await ctx.memo(lambda i=i: f"{i}" * 10_000)  # 100 kB of results in the history
        await ctx.aio_sleep_for(1)  # the next turn reads it all
        return "never"

    try:
        async with running_worker(bide, [hoarder]):
            ref = await hoarder.aio_run_no_wait({})
            with pytest.raises(RunFailedError) as failed:
                await ref.aio_result(timeout=30)
        assert failed.value.error_type == "HistoryTooLargeError"
        assert "BIDE_MAX_HISTORY=65,536 bytes (64 KiB)" in str(failed.value), str(failed.value)
    finally:
        await bide.aclose()
