"""Cold reads of a run's history follow its appends back by sequence, on a real nats-server.

Every append carries its expected-last-subject-sequence guard, which the server stores with
the message, so a history is a chain from its last message back to its start. A read that
follows the chain gets each message by sequence instead of walking every other run's
message between two of its own. These tests pin that the chain is what is read, and that
every case the chain cannot serve (too long, a link missing, a message written by someone
else) still reads the whole history, exactly as a read by subject does.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from actors.engine.wire import HistoryEntry, MemoRecorded, RunStarted, utcnow
from actors.store.history import READ_BACK_MAX
from actors.store.jetstream import api_request, direct_get_subject
from sdk import Bide
from sdk._connection import Connection


@pytest.fixture
async def conn(bide: Bide) -> AsyncIterator[Connection]:
    yield await bide._pool.get()


def _start(run_id: str, generation: int = 0) -> RunStarted:
    return RunStarted(run_id=run_id, task="t", durable=True, input={"g": generation}, at=utcnow(),
                      generation=generation)


def _memo(pos: int) -> MemoRecorded:
    return MemoRecorded(pos=pos, name=f"step{pos}", args_hash="h", result=pos)


_others = itertools.count()


async def _noise(conn: Connection, n: int) -> None:
    """``n`` starts of other runs: what lies between two of a run's messages in a busy stream."""
    ids = [f"other{next(_others)}" for _ in range(n)]
    await asyncio.gather(*(conn.history.append(rid, [_start(rid)], 0) for rid in ids))


async def _write(conn: Connection, run_id: str, batches: list[list[HistoryEntry]], noise: int = 50) -> list[int]:
    """Append ``batches`` in order with other runs' appends between them; their sequences."""
    seqs: list[int] = []
    for batch in batches:
        seqs.append(await conn.history.append(run_id, batch, seqs[-1] if seqs else 0))
        await _noise(conn, noise)
    return seqs


async def _by_subject(conn: Connection, run_id: str) -> list[str]:
    s = conn.layout.subjects
    msgs = await direct_get_subject(conn.nc, s.history_stream, s.history(run_id))
    return [m.data.decode() for m in msgs]


def _kinds(entries: list[HistoryEntry]) -> list[str]:
    return [f"{e.k}:{getattr(e, 'pos', '')}" for e in entries]


async def test_a_cold_read_follows_the_chain_of_appends_and_reads_what_a_read_by_subject_reads(
        conn: Connection) -> None:
    run_id = "chain-five"
    seqs = await _write(conn, run_id, [[_start(run_id)], [_memo(0)], [_memo(1), _memo(2)], [_memo(3)], [_memo(4)]])
    chain = await conn.history._read_back(run_id, 0)
    assert chain is not None, "a history of five messages is read back by sequence"
    assert [int((m.headers or {})["Nats-Sequence"]) for m, _ in chain] == seqs
    assert [m.data.decode() for m, _ in chain] == await _by_subject(conn, run_id)
    hist = await conn.history.read(run_id, history_seq=seqs[-1])
    assert _kinds(hist.entries) == ["run_started:", "memo:0", "memo:1", "memo:2", "memo:3", "memo:4"]
    assert hist.last_seq == seqs[-1]


async def test_a_history_longer_than_the_chain_limit_is_read_whole_by_subject(conn: Connection) -> None:
    run_id = "chain-long"
    batches: list[list[HistoryEntry]] = [[_start(run_id)]] + [[_memo(i)] for i in range(READ_BACK_MAX + 4)]
    seqs = await _write(conn, run_id, batches, noise=5)
    assert await conn.history._read_back(run_id, 0) is None
    hist = await conn.history.read(run_id, history_seq=seqs[-1])
    assert _kinds(hist.entries) == ["run_started:"] + [f"memo:{i}" for i in range(READ_BACK_MAX + 4)]


async def test_a_missing_link_falls_back_to_a_read_by_subject(conn: Connection) -> None:
    run_id = "chain-hole"
    seqs = await _write(conn, run_id, [[_start(run_id)], [_memo(0)], [_memo(1)]])
    s = conn.layout.subjects
    await api_request(conn.nc, f"$JS.API.STREAM.MSG.DELETE.{s.history_stream}", {"seq": seqs[1], "no_erase": True})
    assert await conn.history._read_back(run_id, 0) is None
    hist = await conn.history.read(run_id)
    assert _kinds(hist.entries) == ["run_started:", "memo:1"]


async def test_a_message_written_without_the_guard_falls_back_to_a_read_by_subject(conn: Connection) -> None:
    """Someone with write access publishes on a history subject directly (``nats pub``): no chain."""
    run_id = "chain-outsider"
    await _write(conn, run_id, [[_start(run_id)], [_memo(0)]])
    s = conn.layout.subjects
    ack = await conn.nc.jetstream().publish(s.history(run_id), b'{"v":1,"e":[{"k":"memo","pos":1,"name":"x",'
                                                               b'"args_hash":"h","result":1}]}')
    assert await conn.history._read_back(run_id, 0) is None
    hist = await conn.history.read(run_id, history_seq=ack.seq)
    assert _kinds(hist.entries) == ["run_started:", "memo:0", "memo:1"]


async def test_the_chain_stops_at_the_current_generations_start_after_the_earlier_one_is_purged(
        conn: Connection) -> None:
    """``continue_as_new``: the next start is appended after this turn's entries, then the earlier
    messages are purged; the chain ends at the message holding the start, whose link is gone."""
    run_id = "chain-generations"
    seqs = await _write(conn, run_id, [[_start(run_id)], [_memo(0)], [_memo(1), _start(run_id, generation=1)],
                                       [_memo(0)]])
    s = conn.layout.subjects
    await api_request(conn.nc, f"$JS.API.STREAM.PURGE.{s.history_stream}",
                      {"filter": s.history(run_id), "seq": seqs[2]})
    chain = await conn.history._read_back(run_id, 0)
    assert chain is not None
    assert [int((m.headers or {})["Nats-Sequence"]) for m, _ in chain] == seqs[2:]
    hist = await conn.history.read(run_id, history_seq=seqs[-1])
    assert _kinds(hist.entries) == ["run_started:", "memo:0"]
    assert hist.started.generation == 1


async def test_a_run_with_no_history_reads_empty(conn: Connection) -> None:
    assert await conn.history._read_back("never-started", 0) == []
    assert (await conn.history.read("never-started")).entries == []


async def test_a_warm_read_goes_on_from_the_hosts_view_only_while_the_history_ends_where_it_wrote(
        conn: Connection) -> None:
    """``read_since`` checks the history's last message (one get, however busy the stream) against the host's view."""
    run_id = "warm-view"
    seqs = await _write(conn, run_id, [[_start(run_id)], [_memo(0)]])
    base = await conn.history.read(run_id, history_seq=seqs[-1])
    view = await conn.history.read_since(base)
    assert view is not None and view.last_seq == seqs[-1] and _kinds(view.entries) == _kinds(base.entries)
    # Another writer appended after the view: the turn must replay.
    await conn.history.append(run_id, [_memo(1)], seqs[-1])
    assert await conn.history.read_since(base) is None
    # The view's last message was removed, nothing after it: not the history this host wrote either.
    run_id = "warm-removed"
    seqs = await _write(conn, run_id, [[_start(run_id)], [_memo(0)]])
    base = await conn.history.read(run_id, history_seq=seqs[-1])
    s = conn.layout.subjects
    await api_request(conn.nc, f"$JS.API.STREAM.MSG.DELETE.{s.history_stream}", {"seq": seqs[-1]})
    assert await conn.history.read_since(base) is None
