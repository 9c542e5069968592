"""Child runs and fan-out against a real nats-server: results, failures, eviction, crashes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from actors.store.jetstream import api_request
from actors.store.server import EmbeddedServer
from sdk import Bide, RunFailedError, RunStatus
from tests.apps.children import ChildInput, FanOutInput, define
from tests.support import WorkerProcess, running_worker, wait_until


def _lines(log: Path, prefix: str) -> list[str]:
    if not log.exists():
        return []
    return [line.rsplit(" ", 1)[0] for line in log.read_text().splitlines() if line.startswith(prefix)]


async def _child_runs(client: Bide, parent: str) -> set[str]:
    """Every run whose history subject names ``parent`` as the prefix of its id (its children)."""
    conn = await client._pool.get()
    s = conn.layout.subjects
    info = await api_request(conn.nc, f"$JS.API.STREAM.INFO.{s.history_stream}",
                             {"subjects_filter": s.history_all})
    prefix = s.history(parent) + "~"
    return {subj for subj in (info.get("state", {}).get("subjects") or {}) if subj.startswith(prefix)}


async def test_child_results_no_wait_handles_and_child_keys(bide: Bide) -> None:
    d = define(bide)
    async with running_worker(bide, list(bide.tasks.values())):
        ref = await d["one_child"].aio_run_no_wait(ChildInput(n=3))
        assert await ref.aio_result(timeout=30) == {"a": 9, "b": 16, "slept": 1}
        hist = await bide.runs.aio_history(ref.workflow_run_id)
        spawned = [e for e in hist.entries if e.k == "children_spawned"]
        rid = ref.workflow_run_id
        # Ids follow the parent's position, or the child_key the code gave.
        assert [e.run_ids for e in spawned] == [[f"{rid}~0~0"], [f"{rid}~1~0"], [f"{rid}~k~second"]]
        child = await bide.runs.aio_get(f"{rid}~k~second")
        assert child.status == RunStatus.COMPLETED and child.result == {"square": 16}


async def test_child_failure_is_an_exception_the_parent_can_catch(bide: Bide) -> None:
    d = define(bide)
    async with running_worker(bide, list(bide.tasks.values())):
        out = await d["fan_out_catch"].aio_run(FanOutInput(count=5, fail_at=2), timeout=30)
        assert out == {"failed": [2], "caught": "child 99 was told to fail"}
        # Uncaught, the child's failure fails the parent, naming the child's error.
        with pytest.raises(RunFailedError) as err:
            await d["fan_out"].aio_run(FanOutInput(count=3, fail_at=1), timeout=30)
        assert err.value.error_type == "RunFailedError"
        assert "child 1 was told to fail" in err.value.error_message


async def test_fan_out_wakes_the_parent_once(bide: Bide) -> None:
    d = define(bide)
    async with running_worker(bide, list(bide.tasks.values())):
        ref = await d["fan_out"].aio_run_no_wait(FanOutInput(count=50))
        assert await ref.aio_result(timeout=30) == {"total": sum(i * i for i in range(50)), "count": 50}
        hist = await bide.runs.aio_history(ref.workflow_run_id)
        # Start, spawn and suspend; then one turn when the last child ended (a JetStream counter
        # decides which child wakes the parent), not one turn per child.
        assert sum(1 for e in hist.entries if e.k == "activation") == 2
        assert sum(1 for e in hist.entries if e.k == "signal" and e.signal.source == "child") == 50


async def test_fan_out_of_100_survives_sigkill_of_the_parents_host(nats_server: EmbeddedServer,
                                                                    tmp_path: Path) -> None:
    log = tmp_path / "children.log"
    client = Bide(nats_server.url, ack_wait=3.0)
    d = define(client)
    first = WorkerProcess("tests.apps.children:worker", nats_server.url).start()
    second: WorkerProcess | None = None
    try:
        ref = await d["fan_out"].aio_run_no_wait(FanOutInput(count=100, log=str(log), delay=1.0))
        # Children are running (the parent is evicted, waiting for them): crash the host.
        await wait_until(lambda: len(_lines(log, "child")) >= 20, timeout=30, what="children running")
        first.kill()
        second = WorkerProcess("tests.apps.children:worker", nats_server.url).start()
        result = await ref.aio_result(timeout=60)
        assert result == {"total": sum(i * i for i in range(100)), "count": 100}
        # Exactly 100 child runs ever existed (a replayed parent spawned none again) and each
        # child number ran; a child killed mid-run is run again, as a regular task is.
        assert len(await _child_runs(client, ref.workflow_run_id)) == 100
        assert {line.split()[1] for line in _lines(log, "child")} == {str(i) for i in range(100)}
    finally:
        first.kill()
        if second is not None:
            second.kill()
        await client.aclose()


async def test_parent_killed_between_recording_and_starting_children(nats_server: EmbeddedServer,
                                                                      tmp_path: Path) -> None:
    """The spawn is recorded, the host dies at once: the replay starts the same children, once."""
    log = tmp_path / "children.log"
    client = Bide(nats_server.url, ack_wait=2.0)
    d = define(client)
    first = WorkerProcess("tests.apps.children:worker", nats_server.url, ack_wait=2.0,
                          env={"BIDE_TEST_DIE_AFTER_SPAWN": "1"}).start()
    second: WorkerProcess | None = None
    try:
        ref = await d["fan_out"].aio_run_no_wait(FanOutInput(count=20, log=str(log)))
        assert first.proc is not None

        async def spawned() -> bool:
            hist = await client.runs.aio_history(ref.workflow_run_id)
            return any(e.k == "children_spawned" for e in hist.entries)

        await wait_until(spawned, timeout=30, what="the spawn recorded")
        await wait_until(lambda: first.proc is not None and first.proc.poll() is not None, timeout=30,
                         what="the worker to die after recording the spawn")
        assert _lines(log, "child") == []  # it died before starting any child
        second = WorkerProcess("tests.apps.children:worker", nats_server.url, ack_wait=2.0).start()
        result = await ref.aio_result(timeout=60)
        assert result["count"] == 20
        assert len(await _child_runs(client, ref.workflow_run_id)) == 20
        assert sorted(_lines(log, "child")) == sorted(f"child {i}" for i in range(20))
    finally:
        first.kill()
        if second is not None:
            second.kill()
        await client.aclose()


async def test_child_end_reaches_the_parent_after_a_crash_before_notifying(nats_server: EmbeddedServer,
                                                                         tmp_path: Path) -> None:
    """No signal is lost: the child's end is recorded, its host dies before telling the parent."""
    log = tmp_path / "children.log"
    client = Bide(nats_server.url, ack_wait=2.0)
    d = define(client)
    first = WorkerProcess("tests.apps.children:worker", nats_server.url, ack_wait=2.0,
                          env={"BIDE_TEST_DIE_BEFORE_NOTIFY": "1"}).start()
    second: WorkerProcess | None = None
    try:
        ref = await d["fan_out"].aio_run_no_wait(FanOutInput(count=1, log=str(log)))
        child = f"{ref.workflow_run_id}~0~0"
        await wait_until(lambda: first.proc is not None and first.proc.poll() is not None, timeout=30,
                         what="the worker to die before notifying the parent")
        assert (await client.runs.aio_get(child)).status == RunStatus.COMPLETED
        assert (await client.runs.aio_get(ref.workflow_run_id)).status == RunStatus.WAITING
        second = WorkerProcess("tests.apps.children:worker", nats_server.url, ack_wait=2.0).start()
        assert await ref.aio_result(timeout=60) == {"total": 0, "count": 1}
        assert _lines(log, "child") == ["child 0"]  # the child did not run again
    finally:
        first.kill()
        if second is not None:
            second.kill()
        await client.aclose()


async def test_twenty_parents_with_one_durable_slot_all_complete(bide: Bide) -> None:
    d = define(bide)
    async with running_worker(bide, list(bide.tasks.values()), durable_slots=1):
        # Had a parent kept the only durable slot while its children ran, no other parent
        # could start and this would time out.
        refs = [await d["fan_out"].aio_run_no_wait(FanOutInput(count=10, delay=0.2)) for _ in range(20)]
        results: list[Any] = await asyncio.gather(*(r.aio_result(timeout=60) for r in refs))
        assert results == [{"total": sum(i * i for i in range(10)), "count": 10}] * 20
