"""What the event router writes for a batch of messages, made durable before the batch is acked.

The router decides in memory, in stream order; :class:`Effects` collects the writes
those decisions need and :meth:`Effects.flush` carries them out in an order that
keeps every crash safe:

1. signals on the runs' inboxes and rejection records, then runs started by triggers;
2. the activations that wake those runs (each names its signal's inbox sequence);
3. deletes of satisfied or cancelled registrations and of superseded triggers;
4. outcome records (which run each event resumed or started), unacknowledged: a view for
   ``bide events list``, never read by the engine, so losing one changes no run.

Only then does the router ack (the consumer acks cumulatively), so the stream still
holds everything a new owner needs to redo the batch. Every write is idempotent
(de-duplication ids, expected sequences, "no such message" on a delete), so redoing
it is harmless. Infrastructure errors (no ack, 503, a leader election) are retried
with backoff, never turned into a lost wake-up; a write the server refuses for good
is recorded as a rejection and the router goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from actors.engine.wire import HDR_MSG_ID, Activation, Subjects, encode_activation
from actors.store.jetstream import delete_message, retry_transient
from actors.store.protocol import is_signal_of
from actors.store.requests import Publisher, SameCheck

log = logging.getLogger("bide.router")

class Effects:
    """The durable writes one batch of router decisions needs."""

    def __init__(self, nc: NATS, pub: Publisher, subjects: Subjects) -> None:
        self._nc = nc
        self._pub = pub
        self._s = subjects
        self.first: list[tuple[str, bytes, dict[str, str]]] = []
        """Rejection records."""
        self.signals: list[tuple[str, bytes, dict[str, str], str, Activation, dict[str, str]]] = []
        """Inbox signals, each with the activation that announces it (and carries its sequence)."""
        self.starts: list[Callable[[], Awaitable[None]]] = []
        """Runs started by triggers (each appends ``run_started`` and publishes its activation)."""
        self.activations: list[tuple[str, bytes, dict[str, str]]] = []
        self.deletes: set[int] = set()
        self.outcomes: list[tuple[str, bytes, dict[str, str]]] = []
        """Outcome records: a run an event resumed or started (see :meth:`outcome`)."""
        self._signal_outcomes: list[tuple[str, bytes, dict[str, str]] | None] = []
        self.rejected = 0

    def __bool__(self) -> bool:
        return bool(self.first or self.signals or self.starts or self.activations or self.deletes or self.outcomes)

    def signal(self, inbox: str, data: bytes, headers: dict[str, str], work: str, act: Activation,
               act_headers: dict[str, str], event_seq: int | None = None, wait_id: str | None = None) -> None:
        """A signal for a run's inbox, then its activation (which names the signal's sequence).

        With ``event_seq``, the run is recorded as resumed by that event once its signal is stored.
        """
        self.signals.append((inbox, data, headers, work, act, act_headers))
        self._signal_outcomes.append(
            None if event_seq is None else self.outcome(event_seq, act.run_id, act.task, "resumed", wait_id))

    def outcome(self, event_seq: int, run_id: str, task: str, how: str,
                wait_id: str | None = None) -> tuple[str, bytes, dict[str, str]]:
        """The record that event ``event_seq`` resumed (``how="resumed"``) or started a run."""
        record: dict[str, str] = {"run_id": run_id, "task": task, "how": how}
        if wait_id is not None:
            record["wait_id"] = wait_id
        # The id makes a redone batch's record a duplicate the stream drops.
        return (self._s.outcome(event_seq), orjson.dumps(record),
                {HDR_MSG_ID: f"outcome:{event_seq}:{run_id}:{wait_id or ''}"})

    def reject(self, seq: int, subject: str, reason: str, detail: dict[str, Any] | None = None) -> None:
        """A message the router cannot handle: recorded (kept with the events), logged, and passed.

        The log names the message and the kind of failure only: ``reason`` may quote the payload
        (a value over a limit, a validation error), which stays in the record on ``rejected.<seq>``.
        """
        self.rejected += 1
        log.error("router rejected message %d on %s (%s); the reason is on %s", seq, subject,
                  reason.split(":", 1)[0], self._s.rejected(seq))
        body = orjson.dumps({"seq": seq, "subject": subject, "reason": reason, **(detail or {})})
        self.first.append((self._s.rejected(seq), body, {HDR_MSG_ID: f"rejected:{seq}:{self.rejected}"}))

    async def flush(self) -> None:
        """Carry out every write, in the crash-safe order; returns once all are durable."""
        seqs = await asyncio.gather(*(self._publish(*w) for w in self.first),
                                    *(self._publish(inbox, data, hdrs, is_signal_of(self._pub, self._s, a.run_id, data))
                                      for inbox, data, hdrs, _work, a, _ in self.signals))
        await asyncio.gather(*(start() for start in self.starts))
        for (_, _, _, work, act, hdrs), seq, outcome in zip(self.signals, seqs[len(self.first):],
                                                            self._signal_outcomes, strict=True):
            if seq is not None:
                # The host reads until it sees this sequence (read-after-write, invariant 13).
                self.activations.append((work, encode_activation(act.model_copy(update={"inbox_seq": seq})), hdrs))
                if outcome is not None:
                    self.outcomes.append(outcome)
        await asyncio.gather(*(self._publish(*w) for w in self.activations))
        await asyncio.gather(*(self._delete(seq) for seq in sorted(self.deletes)))
        for subject, data, hdrs in self.outcomes:
            try:
                await self._pub.publish_unacked(subject, data, hdrs)
            except Exception as e:  # a view: a lost record is a gap in `bide events list`, nothing more
                log.warning("router: outcome record on %s not published (%s)", subject, type(e).__name__)

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str],
                       same: SameCheck | None = None) -> int | None:
        try:
            seq: int = await retry_transient(f"publish to {subject}",
                                             lambda: self._pub.publish(subject, data, headers, same=same))
            return seq
        except Exception as e:
            # Sizes are checked when the router decides, so this is a refusal nobody foresaw:
            # retrying it forever would wedge every run behind it.
            log.error("router: publish to %s refused for good (%s: %s); skipped", subject, type(e).__name__, e)
            return None

    async def _delete(self, seq: int) -> None:
        try:
            await retry_transient(f"delete of message {seq}",
                                  lambda: delete_message(self._nc, self._s.events_stream, seq))
        except Exception as e:
            log.error("router: could not delete message %d (%s); a rebuild will see it again", seq, e)
