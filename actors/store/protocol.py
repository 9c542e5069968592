"""The protocol writes every part of Bide shares, one home each (invariant 12).

- :func:`start_run`: a client, a parent's host and the event router all start runs here
  (with the run's record in the runs index, :mod:`actors.store.runs_index`).
- :func:`deliver_signal`: a direct delivery, a cancel request and a child's outcome reach a
  run here (the router's batched form is :meth:`actors.hosting.router_effects.Effects.signal`).

Each is idempotent end to end (de-duplication ids, expected sequences, a start id), and
retries infrastructure errors itself, so a caller sees an error only when the write is
refused or the servers stay unreachable.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    HDR_BIDE_KIND,
    HDR_MSG_ID,
    Activation,
    EventSignal,
    HistoryEntry,
    RunStarted,
    Subjects,
    decode_activation,
    encode_activation,
)
from actors.store.history import HistoryConflict, HistoryLog
from actors.store.jetstream import leader_next, retry_transient
from actors.store.requests import Publisher, SameCheck
from actors.store.runs_index import publish_live
from sdk.errors import RunAlreadyExistsError

log = logging.getLogger(__name__)

CLIENT_RETRY_S = 30.0
"""How long a protocol write keeps retrying infrastructure errors before its caller sees one."""


async def start_run(history: HistoryLog, pub: Publisher, subjects: Subjects, started: RunStarted, *,
                    new_id: bool = False) -> int | None:
    """Start ``started``'s run; returns the sequence of ``run_started`` if this call wrote it.

    The first activation goes first, carrying the start entry, and is stored before
    ``run_started`` (expecting an empty subject) is written. A starter that dies between the
    two leaves an activation whose host records the start itself, so no run is ever started
    and never activated (``test_protocol.py::test_a_starter_whose_activation_is_refused_records_no_start``).
    The same start again (a retry, a replay of the parent that spawned it) is a no-op; a
    different start for a run id in use raises :class:`RunAlreadyExistsError`, and its
    activation is dropped by the host that sees the other start in the history.

    With ``new_id`` (the run id was made for this start, at random: no other start can hold
    it) the starter stops once the activation is stored, marked ``start_unrecorded``: the
    host that takes it records the start, as it does for a starter that died. That saves a
    start one acknowledged write and its host one read. Until a host takes it, the run's
    history is empty and readers find its start on the queue (:func:`read_run`).
    """
    # The activation is stored before anything else of the run: a starter that dies before it is
    # leaves nothing, one that dies after it leaves a run its host starts. Sent side by side, the
    # start entry was stored while a leaderless queue refused the activation (a node lost), and
    # a starter that died then left a run that never ran.
    await retry_transient(f"start of run {started.run_id}", lambda: publish_start_activation(
        pub, subjects, started, new_id=new_id), CLIENT_RETRY_S)
    # The runs index's record goes with the entry, unacknowledged (a view: it never fails the start, nor delays it).
    await publish_live(pub, subjects, started)
    if new_id:
        return None

    async def append() -> int | None:
        try:
            return await history.append(started.run_id, [started], expected_seq=0)
        except HistoryConflict:
            return None

    # The activation's host may have recorded the start already (it does when it finds none).
    seq: int | None = await retry_transient(f"start entry of run {started.run_id}", append, CLIENT_RETRY_S)
    if seq is not None:
        return seq
    # The append was refused, so a start is there: a replica that does not show it yet is behind.
    first = await retry_transient(f"read of run {started.run_id}",
                                  lambda: history.read_first(started.run_id, must_exist=True), CLIENT_RETRY_S)
    if not isinstance(first, RunStarted) or not first.same_start(started):
        raise RunAlreadyExistsError(
            f"a run with id {started.run_id!r} already exists"
            + (f" (task {first.task!r}, started {first.at.isoformat()})" if isinstance(first, RunStarted) else "")
            + ": choose another run id, or leave it out to get a new one", run_id=started.run_id)
    return None


async def publish_start_activation(pub: Publisher, subjects: Subjects, started: RunStarted, *,
                                   history_seq: int | None = None, new_id: bool = False) -> None:
    """The activation that begins ``started``'s run (or generation), on the queue: one home for
    this write (a start, a generation's start, the wake-up check's start of a run whose activation
    the queue lost). ``history_seq``: the message holding ``started``, when it is written already."""
    act = Activation(run_id=started.run_id, task=started.task, kind="start", started=started,
                     start_unrecorded=True if new_id else None, history_seq=history_seq)
    msg_id = f"start:{started.run_id}" + (f":{started.generation}" if started.generation else "")
    await pub.publish(subjects.queue(started.task, started.run_id), encode_activation(act),
                      {HDR_BIDE_KIND: "start", HDR_MSG_ID: msg_id}, same=is_start_of(started))


QUEUED_SCAN = 16
"""How many of a run's queued activations :func:`queued_start` looks through for its start."""


async def queued_start(nc: NATS, subjects: Subjects, run_id: str) -> RunStarted | None:
    """The start of a run no host has recorded yet: its start activation, waiting on the queue.

    Asked of the queue stream's leader, which has every activation a starter saw acknowledged
    (invariant 13). A start comes before the run's other activations, so a few are read at most.
    """
    seq = 0
    for _ in range(QUEUED_SCAN):
        msg = await leader_next(nc, subjects.queue_stream, subjects.queue_of_run(run_id), seq)
        if msg is None:
            return None
        seq = int((msg.headers or {}).get("Nats-Sequence", "0")) + 1
        try:
            act = decode_activation(msg.data)
        except ValueError:
            continue  # not an activation (a `nats pub` by hand): the host drops it too
        if act.kind == "start" and act.started is not None and act.run_id == run_id:
            return act.started
    return None


async def start_not_read(nc: NATS, subjects: Subjects, run_id: str) -> RunStarted | int | None:
    """For a run whose history a read found empty: its start while it is queued, or else the
    sequence of its first history message as the leader has it (a replica behind, or a host
    took it between the two reads), or ``None``: there is no such run.

    Its host records the start before its activation leaves the queue, so the two leader reads,
    in this order, miss no run a starter saw started (see ``new_id`` in :func:`start_run`).
    """
    started = await queued_start(nc, subjects, run_id)
    if started is not None:
        return started
    first = await leader_next(nc, subjects.history_stream, subjects.history(run_id))
    return None if first is None else int((first.headers or {}).get("Nats-Sequence", "0"))


async def read_run(history: HistoryLog, nc: NATS, subjects: Subjects, run_id: str) -> RunHistory:
    """A run's history as its readers see it: empty if there is no such run, and a queued run's
    start alone (``last_seq`` 0) while no host has recorded it (:func:`start_not_read`)."""
    hist = await history.read(run_id)
    if hist.entries:
        return hist
    found = await start_not_read(nc, subjects, run_id)
    if isinstance(found, RunStarted):
        return RunHistory(run_id, [found], 0)
    return hist if found is None else await history.read(run_id, history_seq=found)


async def read_last_of_run(history: HistoryLog, nc: NATS, subjects: Subjects, run_id: str) -> list[HistoryEntry]:
    """The entries of the run's last history message, or its start alone while it is queued (see :func:`read_run`)."""
    last = await history.read_last(run_id)
    if last:
        return last
    found = await start_not_read(nc, subjects, run_id)
    if isinstance(found, RunStarted):
        return [found]
    return [] if found is None else await history.read_last(run_id, min_seq=found)


def is_start_of(started: RunStarted) -> SameCheck:
    """Whether the stored first copy of a start activation (de-duplicated by its id) is ``started``'s.

    The queue's id ``start:<run>`` can be taken first by anyone who may publish activations, with
    anything, or the first copy can be gone (taken by a host, maybe dropped as malformed): then
    the activation is sent again, since a start activation for a run that has begun costs a
    host one read, while a run with no activation would never run. Another request's start is
    not ours either: the host that takes ours sees the other in the history and drops it.
    """
    async def same(first: Msg | None, _seq: int) -> bool:
        if first is None:
            return False
        try:
            act = decode_activation(first.data)
        except ValueError:
            return False
        return act.kind == "start" and act.started is not None and act.started.run_id == started.run_id \
            and act.started.generation == started.generation and act.started.same_start(started)

    return same


def is_signal_of(pub: Publisher, subjects: Subjects, run_id: str, data: bytes) -> SameCheck:
    """Whether the first copy of a de-duplicated inbox write is this signal (``data``, an ``EventSignal``).

    Inbox ids can be known in advance (``sig:<wait>/<cond>:<event seq>``, ``child:<run>``, a
    sender's event id) and whoever may deliver to runs may publish on any inbox: a message
    stored first under our id, on the same subject, would otherwise stand for ours, and the
    activation would name it (a wait that never resumed). The same signal again (a redone
    router batch, a redelivered child's end, a retried send) differs at most in its ``at``.
    A first copy the get did not find was taken by the run, or removed with it: the run's read
    says which signal is at that sequence. One it never took (a malformed message, dropped) is
    not ours either, and sending ours again to an ended run costs a host one read. One taken by
    an earlier generation of a run that continued as new cannot be read any more: it is trusted.
    """
    async def same(first: Msg | None, seq: int) -> bool:
        ours = _signal_identity(data)  # here, not when the write is made: only a duplicate is checked
        if first is not None:
            if _signal_identity(first.data) == ours:
                return True
            log.info("run %s: the message at %d holding this send's id is another (%d bytes, subject %s)", run_id,
                     seq, len(first.data), (first.headers or {}).get("Nats-Subject"))
            return False
        # Gone, as the stream's leader has it: taken by the run and purged, or removed with it, or
        # dropped as malformed. The run's history says which signal the run took at that sequence,
        # read at least as far as the leader has it: a follower behind can show a history that has
        # not taken it yet (then the send would be stored again and taken twice). Not
        # `inbox_seq=seq`: a message removed with its run, or dropped as malformed, would keep that
        # read (and the router) waiting.
        hist = await HistoryLog(pub.nc, pub, subjects).read_latest(run_id)
        # Taken by this generation (or carried into it from the one before).
        there = [sig for at, sig in hist.taken() if at == seq]
        if not there and hist.entries and seq <= hist.started.inbox_taken:
            # Taken by an earlier generation (the run continued as new since) and gone with its
            # history: trusted as ours (sent again, the new generation would receive it a second time).
            return True
        if there and _signal_identity(there[0].model_dump_json().encode()) == ours:
            return True
        # Rare: say what the read showed (never payloads), to tell why a second copy is stored.
        log.info("run %s: the first copy at %d of this send is gone, and the run's history (read up to %d) shows "
                 "%s taken there", run_id, seq, hist.last_seq, "another signal" if there else "nothing")
        return False

    return same


def _signal_identity(data: bytes) -> Any:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    doc.pop("at", None)
    return doc


async def deliver_signal(pub: Publisher, subjects: Subjects, run_id: str, task: str, signal: EventSignal,
                         msg_id: str | None = None) -> int:
    """Put ``signal`` on the run's inbox, then the activation that names its sequence; returns that sequence.

    With ``msg_id`` the inbox write is de-duplicated (a retried send is stored once) and so is
    the activation. The inbox goes first: an activation always finds its signal.
    """
    headers = {HDR_MSG_ID: msg_id} if msg_id else None
    data = signal.model_dump_json().encode()
    seq: int = await retry_transient(f"signal to run {run_id}", lambda: pub.publish(
        subjects.inbox(run_id), data, headers, same=is_signal_of(pub, subjects, run_id, data)), CLIENT_RETRY_S)
    act = Activation(run_id=run_id, task=task, kind="signal", inbox_seq=seq)
    act_headers = {HDR_BIDE_KIND: "signal"}
    if msg_id:
        act_headers[HDR_MSG_ID] = f"act:{msg_id}"
    await retry_transient(f"activation of run {run_id}", lambda: pub.publish(
        subjects.queue(task, run_id), encode_activation(act), act_headers), CLIENT_RETRY_S)
    return seq
