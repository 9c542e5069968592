"""The history log: one JetStream subject per run, appended by a single writer."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from typing import Any

import nats.js.errors
import pydantic
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.engine.run_history import RunHistory, current_generation
from actors.engine.wire import (
    HDR_EXPECTED_LAST_SUBJECT_SEQ,
    TERMINAL,
    EventSignal,
    HistoryEntry,
    RunStarted,
    SignalReceived,
    Subjects,
    decode_history,
    encode_history,
)
from actors.store.jetstream import (
    ERR_EXPECTED_LAST_SEQ_NOT_READY,
    ERR_WRONG_LAST_SEQUENCE,
    ERR_WRONG_LAST_SEQUENCE_CONSTANT,
    StaleReadError,
    direct_get_first,
    direct_get_last,
    direct_get_seq,
    direct_get_subject,
    is_transient,
    leader_get,
)
from actors.store.requests import Publisher
from sdk.limits import CEILING_LIMITS, check_value

log = logging.getLogger("bide.history")


MAX_MESSAGE_BYTES = 900_000
"""Below the server's default max payload (1 MiB), with room for headers."""

_CONFLICT_CODES = (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_SEQUENCE_CONSTANT, ERR_EXPECTED_LAST_SEQ_NOT_READY)
"""Refusals of the expected-sequence guard: someone else wrote, or may be writing, the subject."""
_STALE_READ_RETRY_S = 0.02

READ_BACK_MAX = 16
"""The most history messages a cold read follows back one get at a time (see ``HistoryLog._read_back``)."""


class HistoryConflict(Exception):
    """Another writer appended to the run first (or may be appending); this writer's view is stale."""

    def __init__(self, run_id: str, expected_seq: int, detail: str) -> None:
        super().__init__(f"run {run_id}: history moved past seq {expected_seq} ({detail})")
        self.run_id = run_id
        self.expected_seq = expected_seq
        found = re.search(r"wrong last sequence: (\d+)", detail)
        self.actual_seq = int(found.group(1)) if found else 0
        """The subject's last sequence the server reported (0 if it did not say): a floor for the re-read."""


_LONG_NUMBER = re.compile(rb"\d{19}")
"""Digits enough for an integer outside int64: only then is a signal's data walked for one."""


_malformed_seen: OrderedDict[tuple[str, int], None] = OrderedDict()
"""Malformed inbox messages already logged at error level by this process (the newest ones)."""
_MALFORMED_REMEMBERED = 10_000


def _inbox_signal(run_id: str, seq: int, data: bytes) -> list[tuple[int, EventSignal]]:
    """The signal in an inbox message, or none (logged: its size, never its contents) if it is malformed.

    Anyone allowed to deliver to a run can publish on its inbox: a signal whose payload holds an
    integer beyond 64 bits would be taken into the history, which cannot encode it, and every
    turn of the run would fail on it. Such a signal is malformed here, like one that is not JSON.
    """
    try:
        signal = EventSignal.model_validate_json(data)
        if _LONG_NUMBER.search(data):
            check_value(signal.payload, CEILING_LIMITS, "the signal's payload")
            check_value(signal.meta, CEILING_LIMITS, "the signal's metadata")
        return [(seq, signal)]
    except ValueError as e:
        # Each read of the inbox meets it again until a purge removes it: said once per process.
        level = logging.DEBUG if (run_id, seq) in _malformed_seen else logging.ERROR
        _malformed_seen[(run_id, seq)] = None
        if len(_malformed_seen) > _MALFORMED_REMEMBERED:
            _malformed_seen.popitem(last=False)
        log.log(level, "run %s: dropping malformed inbox message %d (%d bytes; %d errors)", run_id, seq, len(data),
                e.error_count() if hasattr(e, "error_count") else 1)
        return []


class CorruptHistoryError(Exception):
    """A stored history message that cannot be read as one (garbage published on a history
    subject by hand): names the run and the message's sequence. Retrying cannot help."""


def decode_stored(msg: Msg, run_id: str) -> list[HistoryEntry]:
    """A stored history message's entries, or :class:`CorruptHistoryError` saying which message is bad."""
    try:
        return decode_history(msg.data)
    except pydantic.ValidationError as e:
        seq = (msg.headers or {}).get("Nats-Sequence", "?")
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptHistoryError(
            f"run {run_id}: its history message at stream sequence {seq} ({len(msg.data)} bytes) is not a Bide "
            f"history message ({first}); it was not written by Bide (only hosts may publish on history "
            "subjects): delete that message to let the run go on") from None


class HistoryLog:
    """Reads and appends run histories on ``<prefix>.history.<run>``."""

    def __init__(self, nc: NATS, publisher: Publisher, subjects: Subjects, *, retry_s: float = 0.0) -> None:
        self._nc = nc
        self._pub = publisher
        self._subjects = subjects
        self._retry_s = retry_s
        """How long an append that fails for the infrastructure's sake (timeout, 503) is retried."""

    async def read(self, run_id: str, *, history_seq: int = 0, inbox_seq: int = 0,
                   timeout: float = 5.0) -> RunHistory:
        """The run's history and its untaken inbox signals, in one read (both subjects, stream order).

        Reads that decide see every acknowledged write (invariant 13): ``history_seq`` is the
        stream sequence of a history append and ``inbox_seq`` of an inbox message that the
        caller knows were acknowledged. Direct gets may be answered by a follower that is
        behind, so the read checks that it saw them (the history reaching ``history_seq``;
        the inbox message, or a history entry that took it) and reads again until it does,
        raising :class:`StaleReadError` after ``timeout``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            hist = await self._read_once(run_id, max(history_seq, inbox_seq))
            # An ended run's inbox is purged (a signal after the end is never taken): the history
            # reaching its end is enough. Waiting for a purged message kept late signals' activations
            # (a child's end reported again after its parent ended) retrying for ever.
            if hist.last_seq >= history_seq and (hist.inbox_seen >= inbox_seq or hist.terminal is not None):
                return hist
            if loop.time() >= deadline:
                raise StaleReadError(
                    f"run {run_id}: every read for {timeout:g}s was behind an acknowledged write (history at "
                    f"{hist.last_seq}, expected >= {history_seq}; inbox at {hist.inbox_seen}, expected >= {inbox_seq})")
            await asyncio.sleep(_STALE_READ_RETRY_S)

    async def read_latest(self, run_id: str, *, history_seq: int = 0, inbox_seq: int = 0,
                          timeout: float = 5.0) -> RunHistory:
        """The run's history at least as far as the stream's leader has it now, and its untaken inbox.

        For a read whose answer decides something with no acknowledged write to check it against
        (whether a run took a signal, whether it has ended and may be removed): one get from the
        leader (``STREAM.MSG.GET``, which no follower answers) says how far the history goes, and
        the read is checked to reach that far (and ``history_seq``, ``inbox_seq`` as :meth:`read`
        checks them). A follower behind could show an older history, or none.
        """
        last = await self._leader_last(run_id, timeout)
        upto = int((last.headers or {}).get("Nats-Sequence", "0")) if last is not None else 0
        return await self.read(run_id, history_seq=max(upto, history_seq), inbox_seq=inbox_seq, timeout=timeout)

    async def _read_once(self, run_id: str, min_last_seq: int) -> RunHistory:
        # Two exact subjects, read at once: a filter with a wildcard in the middle
        # (``bide.*.<run>``) gets slower as the stream grows, exact subjects do not.
        stream = self._subjects.history_stream
        chain, inbox_msgs = await asyncio.gather(
            self._read_back(run_id, min_last_seq),
            direct_get_subject(self._nc, stream, self._subjects.inbox(run_id), min_last_seq=min_last_seq),
        )
        if chain is None:
            msgs = await direct_get_subject(self._nc, stream, self._subjects.history(run_id),
                                            min_last_seq=min_last_seq)
            chain = [(m, decode_stored(m, run_id)) for m in msgs]
        hist = RunHistory(run_id, size_bytes=sum(len(m.data) for m, _ in chain) + sum(len(m.data) for m in inbox_msgs))
        taken = 0
        for m, batch in chain:
            hdrs = m.headers or {}
            hist.entries.extend(batch)
            hist.times.extend([hdrs.get("Nats-Time-Stamp", "")] * len(batch))
            hist.last_seq = int(hdrs.get("Nats-Sequence", "0"))
            for e in batch:
                if isinstance(e, SignalReceived):
                    taken = max(taken, e.inbox_seq)
                elif isinstance(e, RunStarted) and e.generation:
                    taken = max(taken, e.inbox_taken)
        inbox: list[tuple[int, EventSignal]] = []
        for m in inbox_msgs:
            seq = int((m.headers or {}).get("Nats-Sequence", "0"))
            hist.inbox_seen = max(hist.inbox_seen, seq)
            inbox += _inbox_signal(run_id, seq, m.data)
        current_generation(hist)
        hist.inbox = [(seq, sig) for seq, sig in inbox if seq > taken]
        hist.inbox_seen = max(hist.inbox_seen, taken)
        return hist

    async def _read_back(self, run_id: str, min_last_seq: int) -> list[tuple[Msg, list[HistoryEntry]]] | None:
        """The run's history messages (of its current generation), decoded, read from the last back
        to its start by sequence; ``None`` when the caller should read by subject instead.

        Every append names the subject's previous sequence (its expected-last-subject-sequence
        guard, which the server stores with the message), so the history is a chain from its
        last message back. A get by sequence costs the server the same however busy the
        stream is, while a read by subject walks every other run's message stored between two
        of this run's in a block (thousands, when many runs turn at once). A history longer
        than :data:`READ_BACK_MAX` messages, or a link not found (a replica behind, a message
        removed), is read by subject: the same messages, found the slower way.
        """
        s = self._subjects
        subject = s.history(run_id)
        last = await direct_get_last(self._nc, s.history_stream, subject, min_last_seq=min_last_seq)
        if last is None:
            return []
        chain = [(last, decode_stored(last, run_id))]
        while True:
            msg, entries = chain[-1]
            if any(isinstance(e, RunStarted) for e in entries):  # the run's start, or its generation's
                chain.reverse()
                return chain
            prev = (msg.headers or {}).get(HDR_EXPECTED_LAST_SUBJECT_SEQ, "")
            if not prev.isdigit() or prev == "0" or len(chain) >= READ_BACK_MAX:
                return None
            found = await direct_get_seq(self._nc, s.history_stream, int(prev))
            if found is None or (found.headers or {}).get("Nats-Subject") != subject:
                return None
            chain.append((found, decode_stored(found, run_id)))

    async def read_since(self, base: RunHistory, *, history_seq: int = 0, inbox_seq: int = 0,
                         timeout: float = 5.0) -> RunHistory | None:
        """``base`` (this host's own view of the run) and the signals that arrived since; ``None`` if the
        history moved past ``base`` (another host wrote) or an announced append is not in it.

        Reads the history's last message, which must be ``base``'s own (anything else: another
        writer, or a removal), and the untaken inbox, asking the replica to be at least as far
        as ``base`` and the announced inbox message (invariant 13), and again until the inbox
        message is seen.
        """
        if history_seq > base.last_seq:
            return None
        s = self._subjects
        run_id = base.run_id
        taken = base.state.taken_upto
        floor = max(base.last_seq, inbox_seq)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # The history's last message, not the messages after ``base``: a get of a subject's last
            # costs the server the same however busy the stream is, while a read from a sequence
            # walks every other run's message stored after it (see ``_read_back``).
            last, inbox_msgs = await asyncio.gather(
                direct_get_last(self._nc, s.history_stream, s.history(run_id), min_last_seq=floor),
                direct_get_subject(self._nc, s.history_stream, s.inbox(run_id), start_seq=taken + 1,
                                   min_last_seq=floor),
            )
            if last is None or int((last.headers or {}).get("Nats-Sequence", "0")) != base.last_seq:
                return None  # another writer appended (or the history is not what this host wrote): replay
            inbox: list[tuple[int, EventSignal]] = []
            seen = taken
            for m in inbox_msgs:
                seq = int((m.headers or {}).get("Nats-Sequence", "0"))
                seen = max(seen, seq)
                inbox += _inbox_signal(run_id, seq, m.data)
            if seen >= inbox_seq:
                return RunHistory(run_id, base.entries, base.last_seq, inbox=inbox, inbox_seen=seen,
                                  size_bytes=base.size_bytes + sum(len(m.data) for m in inbox_msgs),
                                  folded=base.state)
            if loop.time() >= deadline:
                raise StaleReadError(f"run {run_id}: every read for {timeout:g}s was behind inbox message {inbox_seq}")
            await asyncio.sleep(_STALE_READ_RETRY_S)

    async def read_first(self, run_id: str, *, must_exist: bool = False) -> Any | None:
        """The run's start (its first entry; the latest generation's start, if its first message
        holds one), or ``None`` if it has none yet.

        A run that continued as new keeps its history from the switch on: the message that ended
        the earlier generation's entries with the next start. So the start is the last
        ``run_started`` in the first message, and that message may not begin with it.
        With ``must_exist`` (the caller knows one was written) an answer without it came from
        a replica that is behind (invariant 13): :class:`StaleReadError`, an infrastructure
        error the caller retries.
        """
        msg = await direct_get_first(self._nc, self._subjects.history_stream, self._subjects.history(run_id))
        if msg is None:
            if must_exist:
                raise StaleReadError(f"run {run_id}: its start was written but the replica read shows none")
            return None
        entries = decode_stored(msg, run_id)
        return next((e for e in reversed(entries) if isinstance(e, RunStarted)), entries[0])

    async def read_last_latest(self, run_id: str, timeout: float = 5.0) -> list[HistoryEntry]:
        """The entries of the run's last history message as the stream's leader has it (empty: none).

        For "has the run ended?" where the answer decides (a send or a cancel refused as too
        late): a follower behind shows an older last message, a run not ended yet.
        """
        msg = await self._leader_last(run_id, timeout)
        return [] if msg is None else decode_stored(msg, run_id)

    async def _leader_last(self, run_id: str, timeout: float) -> Msg | None:
        """The run's last history message as the stream's leader has it (``None``: no history)."""
        return await leader_get(self._nc, self._subjects.history_stream, last_by_subj=self._subjects.history(run_id),
                                timeout=timeout)

    async def read_last(self, run_id: str, min_seq: int = 0) -> list[HistoryEntry]:
        """The entries of the run's last message only (enough to see a terminal state).

        With ``min_seq`` (a history append known to be acknowledged), a reply older than it
        is read again until one is not (invariant 13).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while True:
            msg = await direct_get_last(self._nc, self._subjects.history_stream, self._subjects.history(run_id),
                                        min_last_seq=min_seq)
            seen = int((msg.headers or {}).get("Nats-Sequence", "0")) if msg is not None else 0
            if seen >= min_seq:
                break
            if loop.time() >= deadline:
                raise StaleReadError(f"run {run_id}: the last history message read was {seen}, expected >= {min_seq}")
            await asyncio.sleep(_STALE_READ_RETRY_S)
        return [] if msg is None else decode_stored(msg, run_id)

    async def append(self, run_id: str, entries: list[HistoryEntry], expected_seq: int,
                     notify: str | None = None) -> int:
        """Append ``entries`` as one message; returns its stream sequence.

        Single writer: the expected-last-subject-sequence header makes the append fail
        with :class:`HistoryConflict` if anyone else wrote since ``expected_seq``.
        If the batch ends the run and the starter left a ``notify`` inbox, the same bytes
        are also sent there (core NATS, best effort: the history stays the source of truth).
        """
        data = encode_history(entries)
        if len(data) > MAX_MESSAGE_BYTES and len(entries) > 1:
            # Too big for one message (a fan-out's results): append in order, in parts. Each part
            # is a prefix of the batch, so a crash between parts leaves a consistent history.
            half = len(entries) // 2
            seq = await self.append(run_id, entries[:half], expected_seq)
            return await self.append(run_id, entries[half:], seq, notify)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._retry_s
        delay = 0.05
        while True:
            try:
                seq = await self._pub.publish(
                    self._subjects.history(run_id), data, {HDR_EXPECTED_LAST_SUBJECT_SEQ: str(expected_seq)}
                )
                break
            except nats.js.errors.APIError as e:
                if e.err_code in _CONFLICT_CODES:
                    raise HistoryConflict(run_id, expected_seq, str(e.description)) from e
                if not is_transient(e) or loop.time() + delay > give_up:
                    raise
            except Exception as e:
                if not is_transient(e) or loop.time() + delay > give_up:
                    raise
            # Safe to repeat: if an append that timed out was written after all, the guard refuses
            # the repeat (HistoryConflict) and the caller replays from the history that has it.
            log.warning("run %s: history append failed for the infrastructure's sake; retrying in %.2fs", run_id, delay)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)
        if notify and entries and isinstance(entries[-1], TERMINAL):
            await self._nc.publish(notify, data)
        return seq
