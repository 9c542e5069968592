"""Reads whose answer a decision depends on see every acknowledged write (invariant 13)."""

from __future__ import annotations

from typing import Any

import pytest

from actors.store import jetstream
from actors.store.jetstream import connect, direct_get_subject, read_before
from actors.store.server import EmbeddedServer


def _seqs(msgs: list[Any]) -> list[int]:
    return [int(m.headers["Nats-Sequence"]) for m in msgs]


async def _stream(nc: Any) -> list[int]:
    js = nc.jetstream()
    await js.add_stream(name="READS", subjects=["r.>"], allow_direct=True)
    seqs = []
    for i in range(6):
        seqs.append((await js.publish("r.key", f"e{i}".encode(), headers={"Bide-Event-Id": f"id-{i}"})).seq)
        await js.publish("r.other", b"x")
    return seqs


async def test_a_read_before_a_sequence_returns_exactly_the_messages_below_it(nats_server: EmbeddedServer) -> None:
    nc = await connect(nats_server.url)
    try:
        seqs = await _stream(nc)
        got = await read_before(nc, "READS", "r.key", seqs[4], "2000-01-01T00:00:00Z")
        assert _seqs(got) == seqs[:4]
        assert await read_before(nc, "READS", "r.key", seqs[0], "2000-01-01T00:00:00Z") == []
        third = (await direct_get_subject(nc, "READS", "r.key"))[2].headers["Nats-Time-Stamp"]
        assert _seqs(await read_before(nc, "READS", "r.key", seqs[4], third)) == seqs[2:4]
    finally:
        await nc.close()


async def test_a_lagging_replicas_answer_is_completed_from_the_leader(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower holds a prefix of the stream: what it lacks below the sequence comes from the leader, whole."""
    nc = await connect(nats_server.url)
    try:
        seqs = await _stream(nc)
        whole = await direct_get_subject(nc, "READS", "r.key")
        real = jetstream.direct_get_subject

        async def behind(*args: Any, **kwargs: Any) -> list[Any]:
            return (await real(*args, **kwargs))[:2]  # the replica that answered had applied only this far

        monkeypatch.setattr(jetstream, "direct_get_subject", behind)
        got = await read_before(nc, "READS", "r.key", seqs[5], "2000-01-01T00:00:00Z")
        assert _seqs(got) == seqs[:5]
        for mine, theirs in zip(got, whole, strict=False):
            assert mine.data == theirs.data
            for h in ("Nats-Subject", "Nats-Sequence", "Bide-Event-Id"):
                assert mine.headers[h] == theirs.headers[h]
            assert mine.headers["Nats-Time-Stamp"][:19] == theirs.headers["Nats-Time-Stamp"][:19]
    finally:
        await nc.close()


async def test_the_last_messages_of_many_subjects_come_in_batches_and_only_for_subjects_that_have_one(
    nats_server: EmbeddedServer,
) -> None:
    nc = await connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="LASTS", subjects=["l.>"], allow_direct=True)
        last: dict[str, int] = {}
        for i in range(2500):  # two requests' worth, and more
            subject = f"l.{i % 1200}"
            last[subject] = (await js.publish(subject, str(i).encode())).seq
        asked = [f"l.{i}" for i in range(0, 1300)]  # 100 of them have no message
        got = jetstream.direct_get_last_many
        msgs = await got(nc, "LASTS", asked)
        assert {s: int(m.headers["Nats-Sequence"]) for s, m in msgs.items()} == last
        assert await got(nc, "LASTS", ["l.none"]) == {}
    finally:
        await nc.close()
