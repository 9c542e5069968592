"""Reads answered by a cluster follower that is behind: nothing that one decides may be lost or doubled.

A direct get may be answered by any replica, and nats-server has no read-after-write for direct
gets (2.12 removed the ``min_last_seq`` field; a server ignores it). A follower that has not
applied the latest writes answers "no such message" for one the leader has acknowledged, and a
history without the latest appends. ``tests.support.stale_replica`` makes such a replica on one
server, answering about half of the history stream's direct gets. Each test failed before its fix.
"""

from __future__ import annotations

from typing import Any

import pytest

from actors.store.jetstream import api_request
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext
from tests.support import running_worker, stale_replica, wait_until


async def test_a_send_repeated_while_a_replica_is_behind_is_taken_once(bide: Bide) -> None:
    """A send repeated under its event id is a duplicate; whether the stored first copy is this
    signal was read from any replica, and a follower behind answers "no such message" for a
    message the leader just stored, then a history and inbox without it. The send was stored a
    second time and the run took it twice: the long cluster chaos run (seed 53) saw a
    ``continue_as_new`` run get ``[0, 0]`` for ``[0, 1]``, the copy stored 5 ms after the first."""
    @bide.durable_task(name="KeepsNotes")
    async def keeps(input: dict[str, Any], ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("never-comes")  # parked: every note is kept in order

    conn = await bide._pool.get()
    sends = 40
    async with running_worker(bide, [keeps]):
        ref = await keeps.aio_run_no_wait({})
        run_id = ref.workflow_run_id

        async def waiting() -> bool:
            return any(e.k == "wait_registered" for e in (await conn.history.read_latest(run_id)).entries)

        await wait_until(waiting, what="the run to wait")
        async with stale_replica(bide):
            for i in range(sends):
                for _ in range(2):  # a sender repeating a send whose ack it may have lost
                    await bide.event.aio_send(run_id, "note", {"i": i}, event_id=f"note-{i}")

        async def all_taken() -> bool:
            hist = await conn.history.read_latest(run_id)
            return not hist.inbox and sum(e.k == "signal" for e in hist.entries) >= sends

        await wait_until(all_taken, timeout=30, what="the run to take every note")
    hist = await conn.history.read_latest(run_id)
    taken = [e.signal.event_id for e in hist.entries if e.k == "signal"]
    assert taken == [f"note-{i}" for i in range(sends)]



async def test_a_timer_stored_late_is_kept_though_a_replica_behind_shows_an_older_history(
        bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    """A timer stored well after its sleep's append is checked against the run (another host may have
    ended the sleep meanwhile, and would have withdrawn a timer not there yet). A follower behind
    answered with an older last message and a history without the sleep: the check withdrew the
    timer the run still needed, and the run slept for ever."""
    import actors.hosting.turn_effects as turn_effects

    monkeypatch.setattr(turn_effects, "_OVERTAKEN_AFTER_S", -1.0)  # every timer is checked: "stored late"

    @bide.durable_task(name="NapsOnce")
    async def naps(input: dict[str, Any], ctx: DurableContext) -> int:
        await ctx.aio_sleep_for(1)
        return int(input["i"])

    async with running_worker(bide, [naps]):
        async with stale_replica(bide):
            refs = [await naps.aio_run_no_wait({"i": i}) for i in range(20)]

            async def all_asleep() -> bool:
                # Each start's activation leaves the queue once its turn stored (and checked) the timer.
                consumer = f"{s.queue_stream}.{s.consumer_name('NapsOnce')}"
                info = await api_request(conn.nc, f"$JS.API.CONSUMER.INFO.{consumer}", {})
                return int(info["num_pending"]) == 0 and int(info["num_ack_pending"]) == 0

            conn = await bide._pool.get()
            s = conn.layout.subjects
            await wait_until(all_asleep, timeout=20, what="every run to schedule its sleep")
        results = [await ref.aio_result(timeout=20) for ref in refs]
    assert results == list(range(20))


async def test_sleeps_waits_sends_children_and_new_generations_go_right_with_a_replica_behind(bide: Bide) -> None:
    """Every kind of turn, with half of the history stream's direct gets answered by a replica behind."""
    @bide.durable_task(name="StaleChild")
    async def child(input: dict[str, Any], ctx: DurableContext) -> int:
        return int(input["i"]) ** 2

    @bide.durable_task(name="StaleMix")
    async def mix(input: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
        gen, got = input.get("gen", 0), input.get("got", [])
        await ctx.aio_sleep_for(0.2)
        note = await ctx.aio_wait_for_event("note")
        keyed = await ctx.aio_wait_for_event(f"stale:{input['k']}")
        squares = await child.aio_run_many([{"i": i} for i in range(3)])
        got = [*got, note["n"], keyed["n"], sum(squares)]
        if gen < 1:
            ctx.continue_as_new({"k": input["k"], "gen": gen + 1, "got": got})
        return {"got": got}

    runs = 8
    async with running_worker(bide, [mix, child]), stale_replica(bide):
        refs = [await mix.aio_run_no_wait({"k": k}) for k in range(runs)]
        for gen in range(2):
            for ref in refs:
                for _ in range(2):  # each send repeated, as a sender whose ack was lost does
                    await bide.event.aio_send(ref.workflow_run_id, "note", {"n": gen}, event_id=f"note-{gen}")
        for gen in range(2):
            async def keyed_waits(gen: int = gen) -> bool:
                # A generation's keyed wait is registered once its note was taken: push then.
                for k, ref in enumerate(refs):
                    if not await _waits_for(bide, ref.workflow_run_id, f"stale:{k}", gen):
                        return False
                return True

            await wait_until(keyed_waits, timeout=30, what=f"generation {gen} of every run to wait for its key")
            for k in range(runs):
                await bide.event.aio_push(f"stale:{k}", {"n": 10 + gen})
        results = [await ref.aio_result(timeout=60) for ref in refs]
    assert results == [{"got": [0, 10, 5, 1, 11, 5]}] * runs


async def _waits_for(client: Bide, run_id: str, key: str, gen: int) -> bool:
    """Whether the run's generation ``gen`` has registered its wait for ``key`` (read until the leader's last)."""
    conn = await client._pool.get()
    hist = await conn.history.read_latest(run_id)
    if not hist.entries or hist.started.generation != gen:
        return hist.entries != [] and hist.started.generation > gen
    return any(e.k == "wait_registered" and any(c.event_key == key for g in e.groups for c in g)
               for e in hist.entries)


async def test_finished_runs_are_removed_after_the_retention_though_a_replica_behind_shows_none(
        nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper decides from the run's history whether to remove it: a follower behind showed no
    history ("gone": the removal was dropped) or one not ended yet ("live": kept), and the finished
    run stayed in the stream for good."""
    monkeypatch.setenv("BIDE_HISTORY_RETENTION", "2s")
    async with Bide(nats_server.url, ack_wait=3.0) as short:
        @short.durable_task(name="DoneSoon")
        async def done_soon(input: dict[str, Any], ctx: DurableContext) -> int:
            return int(input["i"])

        conn = await short._pool.get()
        s = conn.layout.subjects
        async with running_worker(short, [done_soon]), stale_replica(short):
            refs = [await done_soon.aio_run_no_wait({"i": i}) for i in range(16)]
            assert [await ref.aio_result(timeout=20) for ref in refs] == list(range(16))

            async def all_removed() -> bool:
                info = await api_request(conn.nc, f"$JS.API.STREAM.INFO.{s.history_stream}",
                                         {"subjects_filter": s.history_all})
                left = set((info.get("state") or {}).get("subjects") or {})
                return not left & {s.history(ref.workflow_run_id) for ref in refs}

            await wait_until(all_removed, timeout=30, interval=0.2, what="every finished run to be removed")


async def test_a_send_repeated_after_the_run_took_it_and_ended_gets_its_receipt_with_a_replica_behind(
        bide: Bide) -> None:
    """A sender that repeats a send the run took before it ended is told it was delivered, not
    that the run had finished: read from a follower behind, the run showed no such send taken."""
    @bide.durable_task(name="TakesOneNote")
    async def takes(input: dict[str, Any], ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("note")

    async with running_worker(bide, [takes]):
        ref = await takes.aio_run_no_wait({})
        await bide.event.aio_send(ref.workflow_run_id, "note", {"n": 1}, event_id="the-note")
        assert await ref.aio_result(timeout=20) == {"n": 1}
        async with stale_replica(bide):
            for _ in range(12):
                receipt = await bide.event.aio_send(ref.workflow_run_id, "note", {"n": 1}, event_id="the-note")
                assert receipt.event_id == "the-note"


async def test_a_cancel_or_a_send_to_a_run_that_ended_is_refused_with_a_replica_behind(bide: Bide) -> None:
    """Whether a run has ended was read from its last history message, by any replica: a follower
    behind showed a run still going, and a cancel of an ended run answered "cancelled" (HTTP 200, not
    409), a send was accepted for a run that would never take it."""
    from sdk import RunAlreadyFinishedError

    @bide.durable_task(name="EndsAtOnce")
    async def ends(input: dict[str, Any], ctx: DurableContext) -> int:
        return 1

    async with running_worker(bide, [ends]):
        ref = await ends.aio_run_no_wait({})
        assert await ref.aio_result(timeout=20) == 1
        async with stale_replica(bide):
            for i in range(12):
                assert await bide.runs.aio_cancel(ref.workflow_run_id) is False
                with pytest.raises(RunAlreadyFinishedError):
                    await bide.event.aio_send(ref.workflow_run_id, "late", {"i": i})


async def test_an_activation_is_not_dropped_because_a_replica_behind_shows_no_history(
        bide: Bide, monkeypatch: pytest.MonkeyPatch) -> None:
    """An activation that finds no history and no start on the queue is handed back, and dropped
    once it came back often enough (no such run). Its count also grows with a stale read's
    conflicts, so the drop could come on a replica's word: the run's wake-up was lost, and the
    run waited for ever (the mixed stale-replica test above, once in eight suite runs). Here
    every empty read is the last allowed: only the leader's word may drop it."""
    import actors.hosting.host as host

    monkeypatch.setattr(host, "_MISSING_HISTORY_RETRIES", 1)

    @bide.durable_task(name="StaleKeyed")
    async def keyed(input: dict[str, Any], ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event(f"stale-keyed:{input['k']}")

    runs = 8
    async with running_worker(bide, [keyed]):
        refs = [await keyed.aio_run_no_wait({"k": k}) for k in range(runs)]
        for k, ref in enumerate(refs):
            await wait_until(lambda ref=ref, k=k: _waits_for(bide, ref.workflow_run_id, f"stale-keyed:{k}", 0),
                             timeout=20, what=f"run {k} to wait")
        async with stale_replica(bide):
            for k in range(runs):
                await bide.event.aio_push(f"stale-keyed:{k}", {"k": k})
            assert [await ref.aio_result(timeout=20) for ref in refs] == [{"k": k} for k in range(runs)]
