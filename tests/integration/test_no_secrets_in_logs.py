"""No payload reaches the logs: inputs, results, event bodies and refused data stay out of INFO and above.

A host and a client in this process run tasks whose input, events and results hold a
secret-looking marker, including the paths that log a refusal (an event over a limit, a
CEL expression failing on an event, a malformed inbox message) and a failing step; every
record at INFO or above, from every logger, and everything printed, must be without it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import nats
import pytest

from actors.engine.wire import Subjects
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, RunFailedError, RunStatus
from tests.support import running_worker, wait_until

MARKER = "sk_live_MARKER_9d1e7b"
S = Subjects()


async def test_inputs_results_events_and_failures_are_not_logged(
        nats_server: EmbeddedServer, bide: Bide, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO)

    @bide.durable_task(name="KeepsSecrets")
    async def keeps_secrets(input: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
        counted = await ctx.aio_wait_for_event("secret:count", "input.count > 1")
        got = await ctx.aio_wait_for_event("secret:go", lookback_window="1m")
        return {"input": input, "got": got, "counted": counted}

    @bide.durable_task(name="FailsQuietly", retries=1, backoff_factor=1)
    async def fails_quietly(input: dict[str, Any], ctx: DurableContext) -> None:
        raise RuntimeError("the step failed (no data in this message)")

    async with running_worker(bide, [keeps_secrets, fails_quietly]):
        ref = await keeps_secrets.aio_run_no_wait({"api_key": MARKER})
        run_id = ref.workflow_run_id

        async def waiting() -> bool:
            return (await bide.runs.aio_get(run_id)).status is RunStatus.WAITING

        await wait_until(waiting, what="the run to wait")
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            # Refused by the router: over the int64 limit (the error names the path, the marker is a key) ...
            await js.publish(S.event("secret:go"), json.dumps({MARKER: 2**64}).encode())
            # ... the expression fails on a string (CEL's error may show the value) ...
            await js.publish(S.event("secret:count"), json.dumps({"count": MARKER}).encode())
            # ... and a malformed inbox message.
            await js.publish(S.inbox(run_id), json.dumps({"source": "direct", "payload": MARKER}).encode())
        finally:
            await nc.close()
        await bide.event.aio_push("secret:count", {"count": 2, "note": MARKER})
        await bide.event.aio_push("secret:go", {"token": MARKER})
        result = await ref.aio_result(timeout=20)
        assert result["input"] == {"api_key": MARKER} and result["got"] == {"token": MARKER}
        with pytest.raises(RunFailedError):
            await fails_quietly.aio_run({"password": MARKER}, timeout=20)

    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert any(r.name.startswith("bide") for r in records), "no log record was captured at all"
    leaked = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in records
              if MARKER in r.getMessage() or (r.exc_text and MARKER in r.exc_text)
              or (r.exc_info and MARKER in logging.Formatter().formatException(r.exc_info))]
    assert not leaked, "\n".join(leaked)
    printed = capsys.readouterr()
    assert MARKER not in printed.out and MARKER not in printed.err
