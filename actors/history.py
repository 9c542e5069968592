"""The history log: one JetStream subject per run, appended by a single writer."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NATS

from actors.jetstream import ERR_WRONG_LAST_SEQUENCE, Publisher, direct_get_last, direct_get_subject
from actors.wire import (
    HDR_EXPECTED_LAST_SUBJECT_SEQ,
    TERMINAL_KINDS,
    EventSignal,
    Subjects,
    decode_history,
    encode_history,
)

log = logging.getLogger("bide.history")


MAX_MESSAGE_BYTES = 900_000
"""Below the server's default max payload (1 MiB), with room for headers."""


class HistoryConflict(Exception):
    """Another writer appended to the run first; this writer's view is stale."""

    def __init__(self, run_id: str, expected_seq: int, detail: str) -> None:
        super().__init__(f"run {run_id}: history moved past seq {expected_seq} ({detail})")
        self.run_id = run_id
        self.expected_seq = expected_seq


@dataclass
class RunHistory:
    """A run's entries in order, and the stream sequence of its last message (0 if none)."""

    run_id: str
    entries: list[Any] = field(default_factory=list)
    last_seq: int = 0
    times: list[str] = field(default_factory=list)
    inbox: list[tuple[int, EventSignal]] = field(default_factory=list)
    """Signals on the run's inbox that no history entry has taken yet, in arrival order."""

    @property
    def terminal(self) -> Any | None:
        for e in reversed(self.entries):
            if e.k in TERMINAL_KINDS:
                return e
        return None


class HistoryLog:
    """Reads and appends run histories on ``<prefix>.history.<run>``."""

    def __init__(self, nc: NATS, publisher: Publisher, subjects: Subjects) -> None:
        self._nc = nc
        self._pub = publisher
        self._subjects = subjects

    async def read(self, run_id: str) -> RunHistory:
        """The run's history and its untaken inbox signals, in one read (both subjects, stream order)."""
        # Two exact subjects, read at once: a filter with a wildcard in the middle
        # (``bide.*.<run>``) gets slower as the stream grows, exact subjects do not.
        stream = self._subjects.history_stream
        hist_msgs, inbox_msgs = await asyncio.gather(
            direct_get_subject(self._nc, stream, self._subjects.history(run_id)),
            direct_get_subject(self._nc, stream, self._subjects.inbox(run_id)),
        )
        msgs = sorted(hist_msgs + inbox_msgs, key=lambda m: int((m.headers or {}).get("Nats-Sequence", "0")))
        hist = RunHistory(run_id)
        inbox_subject = self._subjects.inbox(run_id)
        inbox: list[tuple[int, EventSignal]] = []
        taken = 0
        for m in msgs:
            hdrs = m.headers or {}
            seq = int(hdrs.get("Nats-Sequence", "0"))
            if hdrs.get("Nats-Subject") == inbox_subject:
                try:
                    inbox.append((seq, EventSignal.model_validate_json(m.data)))
                except ValueError:
                    log.error("run %s: dropping malformed inbox message %d: %r", run_id, seq, m.data[:200])
                continue
            batch = decode_history(m.data)
            hist.entries.extend(batch)
            hist.times.extend([hdrs.get("Nats-Time-Stamp", "")] * len(batch))
            hist.last_seq = seq
            for e in batch:
                if e.k == "signal":
                    taken = max(taken, e.inbox_seq)
        hist.inbox = [(seq, sig) for seq, sig in inbox if seq > taken]
        return hist

    async def read_last(self, run_id: str) -> list[Any]:
        """The entries of the run's last message only (enough to see a terminal state)."""
        msg = await direct_get_last(self._nc, self._subjects.history_stream, self._subjects.history(run_id))
        return [] if msg is None else decode_history(msg.data)

    async def append(self, run_id: str, entries: list[Any], expected_seq: int, notify: str | None = None) -> int:
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
        try:
            seq = await self._pub.publish(
                self._subjects.history(run_id), data, {HDR_EXPECTED_LAST_SUBJECT_SEQ: str(expected_seq)}
            )
        except nats.js.errors.APIError as e:
            if e.err_code == ERR_WRONG_LAST_SEQUENCE:
                raise HistoryConflict(run_id, expected_seq, str(e.description)) from e
            raise
        if notify and entries and entries[-1].k in TERMINAL_KINDS:
            await self._nc.publish(notify, data)
        return seq
