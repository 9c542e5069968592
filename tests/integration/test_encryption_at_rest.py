"""JetStream's encryption at rest (deploy/README.md): with a cipher, no input or result is readable on disk.

The control (no cipher) finds the same marker in the store's files, so the check can see it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext
from tests.support import running_worker

MARKER = "MARKER-at-rest-7f3a9c"
KEY = "a-test-key-for-jetstream-at-rest-0123456789"


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.parametrize("cipher", ["chachapoly", "aes", None])
async def test_inputs_and_results_are_readable_on_disk_only_without_a_cipher(tmp_path: Path,
                                                                             cipher: str | None) -> None:
    store = tmp_path / "js"
    settings = f'cipher: {cipher}, key: "{KEY}"' if cipher else ""
    server = EmbeddedServer(store_dir=store, jetstream=settings, log_file=tmp_path / "nats.log").start()
    try:
        bide = Bide(server.url, ack_wait=3.0)

        @bide.durable_task(name="AtRest")
        async def at_rest(input: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
            return {"echo": input["secret"] + "-result"}

        try:
            async with running_worker(bide, [at_rest]):
                assert await at_rest.aio_run({"secret": MARKER}, timeout=20) == {"echo": f"{MARKER}-result"}
        finally:
            await bide.aclose()
    finally:
        server.stop()  # a clean stop: everything the server holds is in its files
    log = (tmp_path / "nats.log").read_text()
    assert KEY not in log
    assert list(store.rglob("*.blk")), "the store has no message blocks"
    found = files_holding(store, MARKER.encode())
    if cipher:
        assert "encryption" in log.lower() and found == []
    else:
        assert found, "without a cipher the marker should be in the store's files"
