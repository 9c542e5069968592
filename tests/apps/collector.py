"""A task reporting its host process's garbage collector, hosted by ``WorkerProcess("tests.apps.collector:worker")``."""

from __future__ import annotations

import gc

from sdk import Bide, Context, EmptyModel, TaskDefinition


def define(client: Bide) -> TaskDefinition:
    @client.task(name="CollectorSettings")
    def collector_settings(input: EmptyModel, ctx: Context) -> dict[str, object]:
        return {"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count()}

    return collector_settings


bide = Bide()
collector_settings = define(bide)
worker = bide.worker("collector", workflows=[collector_settings])
