"""The event router through faults: a dead owner's unacked batch, gaps, poison messages, hostile headers.

Each test here was written against the first router (acked per message, rebuilt up to the
consumer's ack floor, naked what it could not handle) and failed on it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats.js.errors
import orjson
import pytest
from nats.aio.msg import Msg

from actors.engine.wire import HDR_TTL, WaitCondition, WaitRegistered, WaitRegistration, partition_of, utcnow
from actors.hosting.router_inputs import publish_registrations
from actors.store.jetstream import ROUTER_GROUP, api_request, direct_get_last, direct_get_subject
from sdk import Bide, DurableContext
from tests.support import running_worker, wait_until


class FakeOwner:
    """A router owner that takes deliveries and dies without handling them (a SIGKILLed owner's batch)."""

    def __init__(self, conn: Any, key: str, *, ack_every: int = 0) -> None:
        self.nc = conn.nc
        self.s = conn.layout.subjects
        self.consumer = self.s.router_consumer(partition_of(key, conn.layout.router_partitions))
        self.ack_every = ack_every
        self.got: list[Msg] = []
        self.pin: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeOwner:
        inbox = self.nc.new_inbox()
        api = f"$JS.API.CONSUMER.MSG.NEXT.{self.s.events_stream}.{self.consumer}"

        async def on_msg(m: Msg) -> None:
            if m.headers and m.headers.get("Status"):
                return
            self.pin = (m.headers or {}).get("Nats-Pin-Id", self.pin)
            self.got.append(m)
            if self.ack_every and len(self.got) % self.ack_every == 0:
                await m.ack()  # acked above what it never handled: a gap below the ack

        self._sub = await self.nc.subscribe(inbox, cb=on_msg)

        async def pull() -> None:
            while True:
                req: dict[str, Any] = {"batch": 100, "expires": int(0.5e9), "group": ROUTER_GROUP}
                if self.pin is not None:
                    req["id"] = self.pin
                await self.nc.publish(api, json.dumps(req).encode(), reply=inbox)
                await asyncio.sleep(0.4)

        self._task = asyncio.create_task(pull())
        return self

    async def die(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await self._sub.unsubscribe()

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None and not self._task.done():
            await self.die()


async def _router_infos(conn: Any) -> list[dict[str, Any]]:
    s = conn.layout.subjects
    return [await api_request(conn.nc, f"$JS.API.CONSUMER.INFO.{s.events_stream}.{s.router_consumer(p)}", {})
            for p in range(conn.layout.router_partitions)]


@pytest.mark.parametrize("ack_every", [0, 2])
async def test_a_dead_owners_unacked_batch_is_matched_in_order(bide: Bide, ack_every: int) -> None:
    """The owner of the key's partition took 20 registrations and died (acking every 2nd, or none): events after
    them still match."""
    @bide.durable_task(name="DeadOwnerWait")
    async def waiter(input: dict, ctx: DurableContext) -> int:
        got = await ctx.aio_wait_for_event("dead:owner", f"input.n == {input['n']}")
        return int(got["n"])

    conn = await bide._pool.get()
    async with FakeOwner(conn, "dead:owner", ack_every=ack_every) as fake:
        async with running_worker(bide, [waiter]):
            refs = [await waiter.aio_run_no_wait({"n": n}) for n in range(20)]
            await wait_until(lambda: len(fake.got) >= 20, timeout=30, what="the fake owner to take 20 registrations")
            await fake.die()
            # The next owner is pinned by the next delivery: these events, well after the registrations.
            for n in range(20):
                await bide.event.aio_push("dead:owner", {"n": n})
            # Well inside the consumer's 30 s ack wait: the batch must not wait for its redelivery.
            results = await asyncio.gather(*(r.aio_result(timeout=20) for r in refs))
            assert results == list(range(20))


async def test_poison_messages_are_rejected_and_a_later_owner_loses_nothing(bide: Bide) -> None:
    """Invalid CEL in a raw registration, an int64 overflow in CEL, JSON too deep, an event too big to deliver."""
    @bide.durable_task(name="PoisonWait")
    async def waiter(input: dict, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event(input["key"], input.get("expr"))

    conn = await bide._pool.get()
    s = conn.layout.subjects
    nc = conn.nc
    async with running_worker(bide, [waiter], name="first"):
        overflow = await waiter.aio_run_no_wait({"key": "poison:int", "expr": "input.n > 5"})
        deep = await waiter.aio_run_no_wait({"key": "poison:deep"})
        big = await waiter.aio_run_no_wait({"key": "poison:big"})

        async def registered(n: int) -> bool:
            info = await conn.js.stream_info(s.events_stream, subjects_filter=s.waits_all)
            return sum((info.state.subjects or {}).values()) >= n

        await wait_until(lambda: registered(3), timeout=20, what="three waits registered")
        bad_cel = WaitRegistration(op="register", wait_id="raw-wait", cond=0, run_id="no-such-run", task="PoisonWait",
                                   event_key="poison:cel", expression="input.n ==")
        await conn.js.publish(s.waits("poison:cel"), bad_cel.model_dump_json().encode(), headers={HDR_TTL: "never"})
        await nc.publish(s.event("poison:int", None), b'{"n": 18446744073709551615}')
        nested: Any = 1
        for _ in range(300):
            nested = [nested]
        await nc.publish(s.event("poison:deep", None), json.dumps(nested).encode())
        await nc.publish(s.event("poison:big", None), orjson.dumps("x" * (nc.max_payload - 200)))
        await nc.flush()

        async def all_taken() -> bool:
            return all(i["num_pending"] == 0 and i["num_ack_pending"] == 0 for i in await _router_infos(conn))

        # Poison is handled once and acked: it does not pin the ack floor.
        await wait_until(all_taken, timeout=20, interval=0.1, what="the router to take every message")
        later = await waiter.aio_run_no_wait({"key": "poison:later", "expr": "input.ok == true"})
        # Four: the raw registration was rejected and deleted.
        await wait_until(lambda: registered(4), timeout=20, what="the later wait registered")
        await wait_until(all_taken, timeout=20, interval=0.1, what="the router to take the later wait")
    # A new owner rebuilds: every wait registered after the poison is still there.
    async with running_worker(bide, [waiter], name="second"):
        for key, payload in (("poison:int", {"n": 7}), ("poison:deep", {"d": 1}), ("poison:big", {"b": 1}),
                             ("poison:later", {"ok": True})):
            await bide.event.aio_push(key, payload)
        assert await overflow.aio_result(timeout=30) == {"n": 7}
        assert await deep.aio_result(timeout=30) == {"d": 1}
        assert await big.aio_result(timeout=30) == {"b": 1}
        assert await later.aio_result(timeout=30) == {"ok": True}
    rejected = await conn.js.stream_info(s.events_stream, subjects_filter=s.rejected_all)
    assert sum((rejected.state.subjects or {}).values()) == 4, rejected.state.subjects


@pytest.mark.parametrize("rollup", ["all", "sub"])
async def test_no_ingress_accepts_rollup(bide: Bide, rollup: str) -> None:
    """A plain publish with Nats-Rollup cannot wipe events, waits or a run's inbox."""
    conn = await bide._pool.get()
    s = conn.layout.subjects
    for subject in (s.event("user:update", None), s.waits("user:update"), s.inbox("some-run")):
        await conn.js.publish(subject, b"{}")
    for stream, subject in ((s.events_stream, s.event("user:update", None)), (s.events_stream, s.waits("x")),
                            (s.history_stream, s.inbox("some-run")), (s.history_stream, s.history("some-run"))):
        before = (await conn.js.stream_info(stream)).state.messages
        with pytest.raises(nats.js.errors.APIError):
            await conn.js.publish(subject, b"{}", headers={"Nats-Rollup": rollup})
        assert (await conn.js.stream_info(stream)).state.messages == before


async def test_a_delete_of_a_message_already_gone_does_not_stall_the_router(bide: Bide) -> None:
    """Two owners (or partitions) may delete the same registration: the second finds it gone, and goes on."""
    from actors.hosting.router_effects import Effects

    conn = await bide._pool.get()
    s = conn.layout.subjects
    seq = (await conn.js.publish(s.waits("gone"), b"{}")).seq
    effects = Effects(conn.nc, conn.publisher, s)
    effects.deletes.update({seq, seq + 1000})  # one there, one never was
    await asyncio.wait_for(effects.flush(), 10)
    again = Effects(conn.nc, conn.publisher, s)
    again.deletes.add(seq)  # deleted already
    await asyncio.wait_for(again.flush(), 10)


async def test_an_ack_floor_that_runs_ahead_of_what_was_handled_loses_nothing(bide: Bide) -> None:
    """The consumer's ack floor passes an event no owner handled (seen in a cluster losing nodes: the floor a
    new owner read was past a batch its dead predecessor was still retrying); the event still wakes its wait."""
    @bide.durable_task(name="FloorAheadWait")
    async def waiter(input: dict, ctx: DurableContext) -> int:
        got = await ctx.aio_wait_for_event("floor:ahead", "input.n == 1")
        return int(got["n"])

    conn = await bide._pool.get()
    s = conn.layout.subjects
    consumer = s.router_consumer(partition_of("floor:ahead", conn.layout.router_partitions))

    async def handled_everything() -> bool:
        last = (await conn.js.stream_info(s.events_stream)).state.last_seq
        info = await api_request(conn.nc, f"$JS.API.CONSUMER.INFO.{s.events_stream}.{consumer}", {})
        return int(info["ack_floor"]["stream_seq"]) >= last

    async with running_worker(bide, [waiter]):
        ref = await waiter.aio_run_no_wait({})

        async def waiting() -> bool:
            h = await bide.runs.aio_history(ref.workflow_run_id)
            return any(e.k == "wait_registered" for e in h.entries)

        await wait_until(waiting, what="the run to wait")
        await wait_until(handled_everything, what="the router to handle the registration")
    # No router runs now. Something acks the event without handling it: the floor runs ahead.
    async with FakeOwner(conn, "floor:ahead", ack_every=1) as fake:
        await bide.event.aio_push("floor:ahead", {"n": 1})
        await wait_until(lambda: bool(fake.got), timeout=20, what="the event to be delivered and acked")
        await wait_until(handled_everything, what="the ack floor to pass the event")
    async with running_worker(bide, [waiter]):
        # A partition is taken over with a delivery: the next event (one that matches nothing).
        await bide.event.aio_push("floor:ahead", {"n": 2})
        assert await ref.aio_result(timeout=20) == 1


async def test_an_event_handled_again_from_the_stream_starts_no_second_run(bide: Bide) -> None:
    """A new owner handles again what lies above a lower checkpoint (read back from the stream, not delivered):
    the same event must make the same run, not a second one (seen in the long chaos run: 3 events started 2)."""
    started: list[str] = []

    @bide.task(name="TriggeredOnce", on_events=["once:only"])
    async def triggered(input: dict, ctx: Any) -> None:
        started.append(input["tag"])

    conn = await bide._pool.get()
    s = conn.layout.subjects
    partition = partition_of("once:only", conn.layout.router_partitions)
    before = (await conn.js.stream_info(s.events_stream)).state.last_seq
    tags = [f"t{i}" for i in range(10)]
    async with running_worker(bide, [triggered]):
        for tag in tags:
            await bide.event.aio_push("once:only", {"tag": tag})
        await wait_until(lambda: sorted(started) == tags, timeout=20, what="one run per event")
    # The partition's checkpoint reads as older than the events (a lagging replica's answer, a lost write).
    await conn.js.publish(s.router_checkpoint(partition), str(before).encode())
    async with running_worker(bide, [triggered]):
        await bide.event.aio_push("once:only", {"tag": "last"})  # a delivery: the partition is taken over
        await wait_until(lambda: "last" in started, timeout=20, what="the next event's run")

        async def drained() -> bool:
            info = await conn.js.stream_info(s.queue_stream, subjects_filter=s.queue_filter("TriggeredOnce"))
            return not any((info.state.subjects or {}).values())

        await wait_until(drained, what="every queued run of the task to be taken")
    assert sorted(started) == sorted([*tags, "last"]), started


async def test_an_event_on_a_subject_spelled_another_way_is_rejected_naming_the_subject_to_use(
        bide: Bide, nats_server: Any) -> None:
    # `bide.events.app/account%2ecreated` (lower-case hex) was matched live, but lookback and
    # `bide events list --key` read the subject Bide writes and never saw it; a key decoding to
    # a newline or an escape sequence broke the events table and reached the terminal.
    from tests.e2e.test_cli_events import cli

    @bide.durable_task(name="SpelledWait")
    async def waiter(input: dict, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("app/account.created", f"input.n == {input['n']}")

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [waiter]):
        ref = await waiter.aio_run_no_wait({"n": 2})

        async def registered() -> bool:
            info = await conn.js.stream_info(s.events_stream, subjects_filter=s.waits_all)
            return sum((info.state.subjects or {}).values()) >= 1

        await wait_until(registered, timeout=15, what="the wait registered")
        for subject in ("bide.events.app/account%2ecreated", "bide.events.app%2Faccount%2Ecreated",
                        "bide.events.a%0Ab", "bide.events.ok.%1B%5B2Jscope", "bide.events.bad%C3%28utf"):
            await conn.js.publish(subject, b'{"n": 2}')

        async def rejected() -> dict[str, str]:
            info = await conn.js.stream_info(s.events_stream, subjects_filter=s.rejected_all)
            found = {}
            for subject in info.state.subjects or {}:
                m = await conn.js.get_last_msg(s.events_stream, subject)
                found[orjson.loads(m.data)["subject"]] = orjson.loads(m.data)["reason"]
            return found

        async def all_rejected() -> bool:
            return len(await rejected()) == 5

        await wait_until(all_rejected, timeout=15, what="five rejections")
        reasons = await rejected()
        assert "publish on 'bide.events.app/account%2Ecreated'" in reasons["bide.events.app/account%2ecreated"]
        assert "publish on 'bide.events.app/account%2Ecreated'" in reasons["bide.events.app%2Faccount%2Ecreated"]
        assert "control character '\\n'" in reasons["bide.events.a%0Ab"]
        assert "control character '\\x1b'" in reasons["bide.events.ok.%1B%5B2Jscope"]
        assert "publish on" in reasons["bide.events.bad%C3%28utf"]
        await conn.js.publish("bide.events.app/account%2Ecreated", b'{"n": 2, "as": "Bide writes it"}')
        assert await ref.aio_result(timeout=15) == {"n": 2, "as": "Bide writes it"}
        listed = await cli("events", "list", url=nats_server.url)
    assert listed.returncode == 0, listed.stderr
    assert "a\\nb" in listed.stdout and "\\x1b[2Jscope" in listed.stdout and "\x1b" not in listed.stdout
    assert all(line.split()[0].isdigit() for line in listed.stdout.splitlines()[1:]), listed.stdout
    # A raw publish without Nats-Msg-Id is listed under the id the router gave it.
    assert all(f"evt-{line.split()[0]}" in line for line in listed.stdout.splitlines()[1:]), listed.stdout


async def test_a_trigger_superseded_above_a_partitions_checkpoint_is_kept_for_the_event_between(bide: Bide) -> None:
    # The long cluster chaos run lost a triggered run: an owner died with the partition's ack floor
    # past an event (E) whose run it had not started, while its checkpoint stayed below E. A new
    # host registered the task's trigger again (T2, after E), and the cleanup of superseded
    # registrations, which measured "every partition has passed T2" by ack floors, deleted the
    # older T1. The next owner rebuilt to the checkpoint (below E) with no trigger, handled E
    # again, and started nothing.
    ran: list[str] = []

    @bide.task(name="KeptTrigger", on_events=["kept:trigger"])
    async def triggered(input: dict, ctx: Any) -> dict:
        ran.append(input["tag"])
        return input

    conn = await bide._pool.get()
    s = conn.layout.subjects
    async with running_worker(bide, [triggered], name="h1"):  # T1, handled by every partition
        await bide.event.aio_push("kept:trigger", {"tag": "warm"})
        await wait_until(lambda: "warm" in ran, timeout=20, what="the first triggered run")
    async with FakeOwner(conn, "kept:trigger", ack_every=1) as owner:  # acks E, handles nothing
        e = (await bide.event.aio_push("kept:trigger", {"tag": "between"})).seq
        await wait_until(lambda: any(m.metadata.sequence.stream == e for m in owner.got), timeout=20,
                         what="the dying owner to take the event")
        async with running_worker(bide, [triggered], name="h2") as worker:  # T2 after E; the other partitions
            t2 = await direct_get_last(conn.nc, s.events_stream, s.trigger("KeptTrigger"))
            assert t2 is not None
            t2_seq = int(t2.headers["Nats-Sequence"])
            assert t2_seq > e
            key_part = partition_of("kept:trigger", conn.layout.router_partitions)

            async def others_past_t2() -> bool:
                for part in range(conn.layout.router_partitions):
                    info = await api_request(conn.nc, f"$JS.API.CONSUMER.INFO.{s.events_stream}."
                                                      f"{s.router_consumer(part)}", {})
                    if part != key_part and int(info["ack_floor"]["stream_seq"]) < t2_seq:
                        return False
                return True

            await wait_until(others_past_t2, timeout=20, what="every other partition to pass T2")
            await worker.host.router._clean_triggers()  # what the owners run every few seconds
            await owner.die()
            await bide.event.aio_push("kept:trigger", {"tag": "after"})  # the partition is taken over
            await wait_until(lambda: "after" in ran, timeout=30, what="the next event's run")
            await wait_until(lambda: "between" in ran, timeout=15, what="the run of the event the dead owner acked")


def _a_task(bide: Bide) -> Any:
    @bide.durable_task(name="RouterOnly")
    async def idle(input: dict, ctx: DurableContext) -> None:
        return None

    return idle


def _a_wait(wait_id: str, key: str) -> WaitRegistered:
    return WaitRegistered(pos=0, wait_id=wait_id, label="w", args_hash="", at=utcnow(),
                          groups=[[WaitCondition(kind="event", key=key, event_key=key)]])


async def _registrations_stored(conn: Any, key: str) -> list[str]:
    """The ops of the messages stored on ``key``'s waits subject, in order."""
    s = conn.layout.subjects
    msgs = await direct_get_subject(conn.nc, s.events_stream, s.waits(key))
    return [orjson.loads(m.data)["op"] for m in msgs]


async def test_a_registration_that_lands_after_its_withdrawal_is_not_kept(bide: Bide) -> None:
    """A turn registers a wait and dies; the next resolves the wait at once and withdraws it; the dead turn's
    registration lands after the withdrawal (a publish held through a reconnect, or retried through an election).
    Seen in the long cluster chaos run: that registration stayed in the stream and the router's index for ever."""
    conn = await bide._pool.get()
    wait = _a_wait("late-run:0", "late:key")
    async with running_worker(bide, [_a_task(bide)]):
        await publish_registrations(conn.publisher, conn.layout, wait, "late-run", "LateTask", None, "cancel")
        await publish_registrations(conn.publisher, conn.layout, wait, "late-run", "LateTask", None, "register")

        async def handled_everything() -> bool:
            return all(i["num_pending"] == 0 and i["num_ack_pending"] == 0 for i in await _router_infos(conn))

        await wait_until(handled_everything, timeout=20, interval=0.1, what="the router to take both")
        await wait_until(lambda: _nothing_registered(conn, "late:key"), timeout=20,
                         what="the withdrawal to leave no registration behind")


async def _nothing_registered(conn: Any, key: str) -> bool:
    return "register" not in await _registrations_stored(conn, key)


@pytest.mark.parametrize("registered_before", [True, False])
async def test_a_withdrawal_soon_after_its_registration_removes_it(bide: Bide, registered_before: bool) -> None:
    """The usual order, within the de-duplication window: registered, then withdrawn (a wait timed out).

    A wait recorded before the append that ended it had its registration stored before: the
    withdrawal goes under its own id at once (one write). One not known to be (resolved at once)
    tries the registration's id first, and finds the registration holding it."""
    conn = await bide._pool.get()
    s = conn.layout.subjects
    key = f"soon:{registered_before}"
    wait = _a_wait(f"soon-run-{registered_before}:0", key)
    await publish_registrations(conn.publisher, conn.layout, wait, "soon-run", "SoonTask", None, "register")
    await publish_registrations(conn.publisher, conn.layout, wait, "soon-run", "SoonTask", None, "cancel",
                                registered_before=registered_before)
    # No router runs yet: what was stored, and under which ids.
    stored = await direct_get_subject(conn.nc, s.events_stream, s.waits(key))
    ids = [(orjson.loads(m.data)["op"], (m.headers or {}).get("Nats-Msg-Id")) for m in stored]
    cid = f"{wait.wait_id}/0"
    withdrawn_as = f"cancel:{cid}" if registered_before else f"register:{cid}~{s.waits(key)}"
    assert ids == [("register", f"register:{cid}"), ("cancel", withdrawn_as)]
    async with running_worker(bide, [_a_task(bide)]):
        await wait_until(lambda: _nothing_left(conn, key), timeout=20,
                         what="the registration and its withdrawal removed")
        # Withdrawn again (a redone turn): nothing comes back.
        await publish_registrations(conn.publisher, conn.layout, wait, "soon-run", "SoonTask", None, "cancel",
                                    registered_before=registered_before)
        await wait_until(lambda: _nothing_left(conn, key), timeout=20, what="the second withdrawal removed")


async def _nothing_left(conn: Any, key: str) -> bool:
    return not await _registrations_stored(conn, key)
