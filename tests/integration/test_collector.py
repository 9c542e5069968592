"""``BIDE_GC_THRESHOLD``: what a host process does to Python's garbage collector, seen from a task it runs."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import subprocess
import sys
from typing import Any

import pytest

from actors.store.server import EmbeddedServer
from sdk import Bide, EmptyModel
from sdk.config import DEFAULT_GC_THRESHOLD, BideConfig
from tests.apps.collector import define
from tests.support import WorkerProcess


async def settings_in_a_host(bide: Bide, nats_server: EmbeddedServer, hosts: list[WorkerProcess],
                             setting: str | None) -> Any:
    """The collector's settings inside a ``bide worker`` process started with ``BIDE_GC_THRESHOLD=setting``."""
    env = {"BIDE_GC_THRESHOLD": setting} if setting is not None else {}
    hosts.append(WorkerProcess("tests.apps.collector:worker", nats_server.url, env=env).start())
    return await define(bide).aio_run(EmptyModel(), timeout=30)


@pytest.mark.parametrize(("setting", "young"), [(None, DEFAULT_GC_THRESHOLD), ("12345", 12345)])
async def test_a_host_collects_young_objects_less_often_and_freezes_what_it_started_with(
        bide: Bide, nats_server: EmbeddedServer, hosts: list[WorkerProcess], setting: str | None,
        young: int) -> None:
    got = await settings_in_a_host(bide, nats_server, hosts, setting)
    assert got["threshold"] == [young, *gc.get_threshold()[1:]]  # the older generations keep Python's counts
    assert got["frozen"] > 1000  # the modules and the user's code, never walked again


async def test_zero_leaves_the_collector_as_python_set_it(bide: Bide, nats_server: EmbeddedServer,
                                                          hosts: list[WorkerProcess]) -> None:
    fresh = json.loads(await asyncio.to_thread(
        subprocess.check_output, [sys.executable, "-c", "import gc; print(list(gc.get_threshold()))"]))
    assert await settings_in_a_host(bide, nats_server, hosts, "0") == {"threshold": fresh, "frozen": 0}


@pytest.mark.parametrize(("raw", "message"), [
    ("-1", "BIDE_GC_THRESHOLD=-1 must be 0 (leave Python's collector as it is) or a number of allocations up to "
           "100000000"),
    ("10000000000", "BIDE_GC_THRESHOLD=10000000000 must be 0"),
    ("lots", "BIDE_GC_THRESHOLD='lots' is not a whole number"),
])
def test_a_bad_threshold_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, raw: str, message: str) -> None:
    monkeypatch.setenv("BIDE_GC_THRESHOLD", raw)
    with pytest.raises(ValueError, match=re.escape(message)):
        BideConfig.from_env()


async def test_a_finished_turn_is_freed_without_the_collector(bide: Bide) -> None:
    """Reference counting frees a run's turn once it ends: no cycle is left for the collector to
    walk. (The code's task holds its turn in its context; a turn that kept its code's task made
    a cycle per run, and the young passes that found them cost a fifth of a host's CPU.)"""
    from actors.engine.replay import Turn
    from sdk import DurableContext
    from tests.support import running_worker

    @bide.durable_task(name="FreedTurn")
    async def freed(input: EmptyModel, ctx: DurableContext) -> int:
        return int(await ctx.memo(lambda: 1))

    def turns() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is Turn)

    async with running_worker(bide, [freed]):
        await freed.aio_run(EmptyModel(), timeout=20)  # connections, consumers, the code paths
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            before = turns()
            for _ in range(20):
                assert await freed.aio_run(EmptyModel(), timeout=20) == 1
            left = turns() - before
        finally:
            if was_enabled:
                gc.enable()
    assert left <= 1, f"{left} turns of ended runs wait for the collector"
