from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from actors.store.server import EmbeddedServer
from sdk import Bide
from tests.support import Receiver, WorkerProcess, otlp_receiver, stale_replica


@pytest.fixture
def nats_server() -> Iterator[EmbeddedServer]:
    """A real nats-server with JetStream on a free port and a temporary store, killed at teardown."""
    server = EmbeddedServer().start()
    try:
        yield server
    finally:
        server.kill()
        server.stop()


@pytest.fixture
def hosts(nats_server: EmbeddedServer) -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts (``WorkerProcess``); any still alive are SIGKILLed at teardown."""
    procs: list[WorkerProcess] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()


@pytest.fixture
async def bide(nats_server: EmbeddedServer) -> AsyncIterator[Bide]:
    client = Bide(nats_server.url, ack_wait=3.0)
    try:
        if os.environ.get("BIDE_TEST_STALE_REPLICA") == "1":
            # Every test of this fixture with a history replica behind (tests.support.stale_replica).
            async with stale_replica(client):
                yield client
        else:
            yield client
    finally:
        await client.aclose()


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    """A real OTLP/HTTP receiver process (``tests.otlp_receiver``), SIGKILLed at teardown."""
    async with otlp_receiver(tmp_path) as rx:
        yield rx
