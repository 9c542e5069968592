"""The wire format: subjects, header names and persisted envelopes, defined once.

Every persisted envelope carries a version field ``v`` so the format can evolve.
A history message holds a *batch* of entries: one JetStream message per
checkpoint flush, so one expected-sequence guard covers several facts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import unquote

import orjson
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter

from sdk.limits import check_name

WIRE_VERSION = 1

HDR_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
"""Single-writer guard: the stream sequence the writer last saw on the subject."""
HDR_SCHEDULE = "Nats-Schedule"
"""Message-scheduling header (ADR-51): ``@at <RFC3339>``."""
HDR_SCHEDULE_TARGET = "Nats-Schedule-Target"
"""Subject (in the same stream) a schedule publishes into when it fires."""
HDR_MSG_ID = "Nats-Msg-Id"
"""JetStream de-duplication id."""
TRACEPARENT = "traceparent"
"""The W3C trace-context header (and ``RunStarted.meta`` key) that carries a span's context."""
HDR_BIDE_KIND = "Bide-Kind"
HDR_BIDE_DUE = "Bide-Due"
"""On a timer: when it is due in engine time (:class:`Clock`), which the test environment's skip reads."""
"""What an activation is for (start, timer, ...), readable with ``nats sub``."""
HDR_TTL = "Nats-TTL"
"""Per-message TTL (ADR-43); ``never`` keeps a wait registration past the events' max age."""
HDR_EVENT_METADATA = "Bide-Metadata"
"""An event's metadata, as a JSON object."""
HDR_TRACEPARENT = "traceparent"
"""W3C trace context of whoever published the message."""
NO_SCOPE = "_"
"""Not a real scope: what the router reports for an event pushed without one."""

_NEEDS_ESCAPE = re.compile(r"[.*>%\s]")


def _escape(match: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in match.group(0).encode())


def encode_token(value: str) -> str:
    """Encode any string as one subject token; plain names such as ``user:update`` stay readable.

    ``.``, ``*``, ``>``, ``%`` and whitespace are percent-escaped (as UTF-8 bytes).
    """
    if not value:
        raise ValueError("subject token must not be empty")
    if _NEEDS_ESCAPE.search(value) is None:
        return value
    return _NEEDS_ESCAPE.sub(_escape, value)


def decode_token(token: str) -> str:
    """Inverse of :func:`encode_token` (every ``%`` in a token was written by it)."""
    return token if "%" not in token else unquote(token)


def event_id_of(headers: dict[str, str] | None, seq: int) -> str:
    """An event's id: its ``Nats-Msg-Id``, or ``evt-<seq>`` for a raw publish without one."""
    return (headers or {}).get(HDR_MSG_ID) or f"evt-{seq}"


def partition_of(key: str, partitions: int) -> int:
    """The router partition of an event key: 32-bit FNV-1a of its UTF-8 bytes, modulo ``partitions``.

    Stable across processes, versions and platforms (unlike ``hash()``): every host and
    client must agree on it for as long as a store lives.
    """
    h = 0x811C9DC5
    for b in key.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


@dataclass(frozen=True)
class Subjects:
    """Subject and stream names under one prefix (default ``bide``)."""

    prefix: str = "bide"

    @property
    def history_stream(self) -> str:
        return f"{self.prefix.upper()}_HISTORY"

    @property
    def work_stream(self) -> str:
        """Timers (scheduled messages), the activations they fire, and the reaper's removals: hosts only.

        A stream that schedules messages always accepts ``Nats-Rollup`` headers (nats-server turns
        them on with ``allow_msg_schedules``), and a rollup of ``all`` purges the whole stream, so
        nothing but hosts publishes here (invariant 10); every other activation goes to :attr:`queue_stream`.
        """
        return f"{self.prefix.upper()}_WORK"

    @property
    def queue_stream(self) -> str:
        """Every activation that is not a timer's: starts, signals, retries. Refuses rollup headers."""
        return f"{self.prefix.upper()}_QUEUE"

    @property
    def activation_streams(self) -> tuple[str, str]:
        """The streams a task's activations come from: each has a consumer ``consumer_name(task)``."""
        return (self.queue_stream, self.work_stream)

    def history(self, run_id: str) -> str:
        return f"{self.prefix}.history.{encode_token(run_id)}"

    @property
    def history_all(self) -> str:
        return f"{self.prefix}.history.>"

    def queue(self, task: str, run_id: str) -> str:
        """Where an activation of the run is published (any but a timer's: see :meth:`work`)."""
        return f"{self.prefix}.queue.{encode_token(task)}.{encode_token(run_id)}"

    def queue_of_run(self, run_id: str) -> str:
        """Every activation of the run on the queue, whatever its task."""
        return f"{self.prefix}.queue.*.{encode_token(run_id)}"

    def queue_filter(self, task: str) -> str:
        return f"{self.prefix}.queue.{encode_token(task)}.>"

    @property
    def queue_all(self) -> str:
        return f"{self.prefix}.queue.>"

    def work(self, task: str, run_id: str) -> str:
        """Where a timer of the run fires (its schedule's target, in :attr:`work_stream`)."""
        return f"{self.prefix}.work.{encode_token(task)}.{encode_token(run_id)}"

    def work_filter(self, task: str) -> str:
        return f"{self.prefix}.work.{encode_token(task)}.>"

    def activation_filter(self, stream: str, task: str) -> str:
        """The subjects of ``task``'s activations in ``stream`` (one of :attr:`activation_streams`)."""
        return self.queue_filter(task) if stream == self.queue_stream else self.work_filter(task)

    @property
    def work_all(self) -> str:
        return f"{self.prefix}.work.>"

    def timer(self, run_id: str, pos: int | str) -> str:
        # One schedule per subject: a new schedule for the same (run, pos) replaces the old one.
        return f"{self.prefix}.timers.{encode_token(run_id)}.{pos}"

    @property
    def timers_all(self) -> str:
        return f"{self.prefix}.timers.>"

    # -- events (one stream: user events, wait registrations and trigger registrations) --------

    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper()}_EVENTS"

    def event(self, key: str, scope: str | None = None) -> str:
        """``<prefix>.events.<key>`` or ``<prefix>.events.<key>.<scope>``: where events are pushed."""
        base = f"{self.prefix}.events.{encode_token(key)}"
        return base if scope is None else f"{base}.{encode_token(scope)}"

    def event_filters(self, key: str, scope: str | None) -> list[str]:
        """The subjects a wait for ``key`` reads: its scope's, or (unscoped) every scope of the key."""
        if scope is not None:
            return [self.event(key, scope)]
        return [self.event(key), f"{self.event(key)}.*"]

    @property
    def events_all(self) -> str:
        return f"{self.prefix}.events.>"

    def parse_event_subject(self, subject: str) -> tuple[str, str | None] | None:
        """``(key, scope)`` of an event subject, or ``None`` if it is not one."""
        parts = subject.split(".")
        head = f"{self.prefix}.events".split(".")
        if parts[: len(head)] != head:
            return None
        rest = parts[len(head):]
        if len(rest) == 1:
            return decode_token(rest[0]), None
        if len(rest) == 2:
            return decode_token(rest[0]), decode_token(rest[1])
        return None

    def check_event_subject(self, subject: str, key: str, scope: str | None) -> None:
        """Raise ``ValueError`` unless ``subject`` is exactly where Bide puts event ``key`` (``scope``).

        A raw publish may spell a token another way (``%2e`` for ``%2E``, an escape of a
        character that needs none, bytes that are not UTF-8). Matched live, such an event
        would be invisible to lookback and to listing by key, which read the subject Bide
        writes; so it is refused, naming that subject. So is a key or scope holding a control
        character, as the SDK and the HTTP API refuse it.
        """
        check_name(key, "event key")
        if scope is not None:
            check_name(scope, "event scope")
        canonical = self.event(key, scope)
        if subject != canonical:
            raise ValueError(f"subject {subject!r} spells event key {key!r}" + (f" scope {scope!r}" if scope else "")
                             + f" another way than Bide does: publish on {canonical!r} (only '.', '*', '>', '%' "
                             "and whitespace are escaped, as %XX with upper-case hex of their UTF-8 bytes)")

    def waits(self, key: str) -> str:
        return f"{self.prefix}.waits.{encode_token(key)}"

    def parse_waits_subject(self, subject: str) -> str | None:
        """The event key of a ``<prefix>.waits.<key>`` subject, or ``None`` if it is not one."""
        head = f"{self.prefix}.waits."
        if not subject.startswith(head) or "." in subject[len(head):]:
            return None
        return decode_token(subject[len(head):])

    @property
    def waits_all(self) -> str:
        return f"{self.prefix}.waits.>"

    def trigger(self, task: str) -> str:
        return f"{self.prefix}.triggers.{encode_token(task)}"

    @property
    def triggers_all(self) -> str:
        return f"{self.prefix}.triggers.>"

    def router_consumer(self, partition: int) -> str:
        """The durable consumer of router partition ``partition`` (each reads the whole events stream)."""
        return f"event_router_p{partition}"

    @property
    def checkpoints_stream(self) -> str:
        return f"{self.prefix.upper()}_CHECKPOINTS"

    def router_checkpoint(self, partition: int) -> str:
        """The last stream sequence router partition ``partition`` handled with every effect durable."""
        return f"{self.prefix}.checkpoint.router.p{partition}"

    @property
    def checkpoints_all(self) -> str:
        return f"{self.prefix}.checkpoint.>"

    @property
    def router_status_stream(self) -> str:
        return f"{self.prefix.upper()}_ROUTER"

    def router_host_status(self, host_id: str) -> str:
        """Where a routing host says it is up and which partitions it owns (the last message per subject)."""
        return f"{self.prefix}.router.host.{encode_token(host_id)}"

    def router_partition_status(self, partition: int) -> str:
        """Where a partition's owner publishes its host id, pin and pending wait count."""
        return f"{self.prefix}.router.partition.{partition}"

    def router_workflow_shape(self, workflow: str, host_id: str = "*") -> str:
        """Where a host advertises the shape of a workflow it serves (its tasks and their parents).

        ``host_id="*"`` is the filter over every host's advertisement of ``workflow``.
        """
        host = host_id if host_id == "*" else encode_token(host_id)
        return f"{self.prefix}.router.shape.{encode_token(workflow)}.{host}"

    @property
    def router_status_all(self) -> str:
        return f"{self.prefix}.router.>"

    def router_barrier(self, family: str) -> str:
        """A marker the router publishes under ``waits`` or ``triggers`` before reading them back.

        Seeing it in a read proves the replica that answered holds everything before it
        (invariant 13). ``%00`` is never written by :func:`encode_token`, so no key is named so.
        """
        return f"{self.prefix}.{family}.%00barrier"

    def rejected(self, seq: int) -> str:
        """Where the router records a message it could not handle (by the message's stream sequence)."""
        return f"{self.prefix}.rejected.{seq}"

    @property
    def rejected_all(self) -> str:
        return f"{self.prefix}.rejected.>"

    @property
    def outcomes_stream(self) -> str:
        return f"{self.prefix.upper()}_OUTCOMES"

    def outcome(self, seq: int) -> str:
        """Where the router records a run event ``seq`` resumed or started (a view for ``bide events list``).

        In a stream of its own: in the events stream, each record would be a gap in what the
        router partitions' consumers deliver, and every partition would read the stream to fill it.
        """
        return f"{self.prefix}.outcomes.{seq}"

    @property
    def outcomes_all(self) -> str:
        return f"{self.prefix}.outcomes.>"

    def parse_outcome_subject(self, subject: str) -> int | None:
        """The event sequence of an ``outcomes.<seq>`` subject, or ``None`` if it is not one."""
        head = f"{self.prefix}.outcomes."
        rest = subject[len(head):] if subject.startswith(head) else ""
        return int(rest) if rest.isdigit() else None

    # -- a run's inbox (in the history stream, read together with the history) ---------------

    def inbox(self, run_id: str) -> str:
        return f"{self.prefix}.inbox.{encode_token(run_id)}"

    @property
    def inbox_all(self) -> str:
        return f"{self.prefix}.inbox.>"

    def run_all(self, run_id: str) -> str:
        """History and inbox of one run, in stream order, in one read."""
        return f"{self.prefix}.*.{encode_token(run_id)}"

    # -- children: how many of a spawn batch have reported back (a JetStream counter) -----------

    @property
    def counters_stream(self) -> str:
        return f"{self.prefix.upper()}_COUNTERS"

    def counter(self, run_id: str, pos: int) -> str:
        return f"{self.prefix}.count.{encode_token(run_id)}.{pos}"

    @property
    def counters_all(self) -> str:
        return f"{self.prefix}.count.>"

    # -- retention: a finished run's removal, due BIDE_HISTORY_RETENTION after it ended ---------

    def reap(self, run_id: str) -> str:
        """Where a run's removal falls due: a work subject no task can own (``@`` is never in a task name)."""
        return f"{self.prefix}.work.@reaper.{encode_token(run_id)}"

    def reap_timer(self, run_id: str) -> str:
        """The schedule of one run's removal (as earlier versions wrote them; still carried out)."""
        return self.timer(run_id, "reap")

    def removals_timer(self, batch: str) -> str:
        """The schedule of a batch of removals (:class:`RunRemovals`), one subject per batch.

        ``%reaper`` is a token no run id encodes to (:func:`encode_token` escapes every ``%``),
        so no run's ``run_timers`` filter (which a removal purges) ever covers it.
        """
        return f"{self.prefix}.timers.%reaper.{batch}"

    def removals(self, batch: str) -> str:
        """Where a batch of removals falls due, on the reaper's consumer (``reap_all``)."""
        return f"{self.prefix}.work.@reaper.%batch.{batch}"

    @property
    def reap_all(self) -> str:
        return f"{self.prefix}.work.@reaper.>"

    @property
    def reaper_consumer(self) -> str:
        return "reaper"

    @property
    def inbox_sweeper_consumer(self) -> str:
        """Every host's shared look at inbox signals no turn took (``actors.hosting.inbox_sweeper``)."""
        return "inbox_sweeper"

    def run_timers(self, run_id: str) -> str:
        """Every schedule of one run (its sleeps, retries and its removal)."""
        return f"{self.prefix}.timers.{encode_token(run_id)}.>"

    def run_counters(self, run_id: str) -> str:
        return f"{self.prefix}.count.{encode_token(run_id)}.>"

    def run_work(self, run_id: str) -> str:
        """Every timer-fired activation of one run, whatever its task (in :attr:`work_stream`)."""
        return f"{self.prefix}.work.*.{encode_token(run_id)}"

    def run_queue(self, run_id: str) -> str:
        """Every other activation of one run, whatever its task (in :attr:`queue_stream`)."""
        return f"{self.prefix}.queue.*.{encode_token(run_id)}"

    # -- the runs index: one record per run, for listing (``actors.store.runs_index``) -----------

    @property
    def runs_stream(self) -> str:
        return f"{self.prefix.upper()}_RUNS"

    def run_record(self, state: str, task: str, run_id: str) -> str:
        """``<prefix>.runs.<live|ended>.<task>.<run>``: the run's index record while it runs, or once it ended."""
        return f"{self.prefix}.runs.{state}.{encode_token(task)}.{encode_token(run_id)}"

    def run_records(self, task: str, run_id: str) -> str:
        """Both index subjects of one run."""
        return f"{self.prefix}.runs.*.{encode_token(task)}.{encode_token(run_id)}"

    def runs_filter(self, state: str | None = None, task: str | None = None) -> str:
        """The index records of runs in ``state`` (``live``/``ended``) of ``task``; ``None`` is any."""
        return f"{self.prefix}.runs.{state or '*'}.{encode_token(task) if task else '*'}.*"

    @property
    def runs_all(self) -> str:
        return f"{self.prefix}.runs.>"

    @property
    def wakeup_pass(self) -> str:
        """Which host runs this round of the wake-up check (``actors.hosting.wakeup_check``); no index record."""
        return f"{self.prefix}.runs.@wakeups"

    @property
    def cancel_broadcast(self) -> str:
        """Core NATS: "stop run R now if you are running it" (the durable request is on the inbox)."""
        return f"{self.prefix}.control.cancel"

    @property
    def turn_query(self) -> str:
        """Core NATS request, a run id as its body: "is a turn of this run running code on your host?".

        Only a host running one answers (``actors.hosting.heartbeat``); no answer means none is.
        """
        return f"{self.prefix}.control.turn"

    def consumer_name(self, task: str) -> str:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in task)
        if safe != task:
            safe = f"{safe}_{hashlib.sha1(task.encode()).hexdigest()[:8]}"
        return f"task_{safe}"


class Clock:
    """The engine's one source of "now": wall time, moved forward by a virtual offset in tests.

    Every recorded time (a sleep's wake time, a wait's timeout, a retry's backoff,
    ``ctx.aio_now()``) is read here. :class:`sdk.testing.BideTestEnv` moves ``offset`` forward
    to skip time; the offset is this process's, so one test environment runs at a time.
    Timers are scheduled at wall time (:meth:`wall`), so a timer a skip did not reach still
    fires when its real moment comes.
    """

    offset = timedelta(0)

    @classmethod
    def wall(cls, at: datetime) -> datetime:
        """The wall-clock moment of engine time ``at``."""
        return at - cls.offset


def random_id() -> str:
    """A random version-4 UUID as 32 hex digits (``uuid.uuid4().hex``, in a fifth of its time)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return b.hex()


def utcnow() -> datetime:
    """Now, in engine time (:class:`Clock`)."""
    return datetime.now(UTC) + Clock.offset


async def sleep_to(moment: datetime) -> None:
    """Return once engine time has reached ``moment``, never before.

    ``asyncio.sleep`` alone can end early: uvloop keeps timers to the millisecond and counts
    them from the time it read when the loop's iteration began, so 1,000 runs due within one
    second recorded ``sleep_fired`` up to 1.2 ms before their moment, 572 of them early.
    """
    # A millisecond more than what is left, so the timer rarely ends early and a busy loop is
    # not asked for another pass; what is still left then (rare) is slept again.
    while (left := (moment - utcnow()).total_seconds()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(left + SLEEP_SLACK_S)


SLEEP_SLACK_S = 0.001
"""How much longer :func:`sleep_to` and :func:`first_done` ask their loop to wait than what is
left (uvloop's timers are kept to the millisecond)."""


async def first_done(aws: set[asyncio.Future[Any]], timeout: float | None) -> set[asyncio.Future[Any]]:
    """Those of ``aws`` done once one is, or none once ``timeout`` seconds have passed, never sooner.

    ``asyncio.wait``'s timeout can end early as ``asyncio.sleep`` can (see :func:`sleep_to`): a
    task over a 50 ms ``execution_timeout`` failed after 49.4 ms.
    """
    if timeout is None:
        done, _ = await asyncio.wait(aws, return_when=asyncio.FIRST_COMPLETED)
        return done
    deadline = time.monotonic() + timeout
    while True:
        left = max(deadline - time.monotonic(), 0.0)
        done, _ = await asyncio.wait(aws, timeout=left + SLEEP_SLACK_S, return_when=asyncio.FIRST_COMPLETED)
        if done or time.monotonic() >= deadline:
            return done


def args_hash(*values: Any) -> str:
    """A hash of a call's arguments, the same in every process, recorded so replays can detect changed calls.

    JSON values, dataclasses, datetimes, UUIDs and enums hash as orjson writes them, pydantic
    models as their JSON dump, sets by their sorted elements, an object with the default
    ``repr`` (which names its address, different in every process) by its type and
    attributes, and anything else by its ``repr``.
    """
    try:
        data = orjson.dumps(values, option=orjson.OPT_SORT_KEYS, default=_canonical)
    except (TypeError, orjson.JSONEncodeError) as e:
        raise TypeError(f"the arguments {values!r:.200} have no stable form to record ({e}); pass JSON values, "
                        "pydantic models or dataclasses") from None
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def args_hash_matches(recorded: str, digest: str, *values: Any) -> bool:
    """Whether ``recorded`` hashes ``values``: as :func:`args_hash` does (``digest``, already computed),
    or as Bide did before sets and plain objects had a stable form (runs recorded then replay
    without a false mismatch). The older form is computed only when the two differ."""
    if recorded == digest:
        return True
    try:
        legacy = orjson.dumps(values, option=orjson.OPT_SORT_KEYS, default=_legacy_fallback)
    except (TypeError, orjson.JSONEncodeError):
        return False
    return recorded == hashlib.blake2b(legacy, digest_size=8).hexdigest()


_DEFAULT_REPR: Any = object.__repr__
"""``<module.Class object at 0x...>``: an address, different in every process."""


def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset):
        # Iteration order follows the hash seed (strings differ in every process): sort.
        return sorted(orjson.dumps(v, option=orjson.OPT_SORT_KEYS, default=_canonical).decode() for v in value)
    if type(value).__repr__ is _DEFAULT_REPR:
        state = getattr(value, "__dict__", None)
        if state is None:
            slots = (name for cls in type(value).__mro__ for name in getattr(cls, "__slots__", ()))
            state = {name: getattr(value, name) for name in slots if hasattr(value, name)}
        return {"type": f"{type(value).__module__}.{type(value).__qualname__}", "attributes": state}
    return repr(value)


def _legacy_fallback(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return repr(value)


# --- history entries -------------------------------------------------------------------------------

class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ParentLink(BaseModel):
    """Who spawned a child run: its result goes to ``run_id``'s inbox, batch ``pos`` of ``n`` children."""

    model_config = ConfigDict(extra="allow", frozen=True)

    run_id: str
    task: str
    pos: int
    n: int = 1


class RunStarted(_Entry):
    """The run exists: written by whoever started it, first on the run's subject."""

    k: Literal["run_started"] = "run_started"
    run_id: str
    task: str
    durable: bool
    input: Any = None
    at: datetime
    execution_timeout_s: float | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    parent: ParentLink | None = None
    parents: dict[str, Any] | None = None
    """A workflow step's parent outcomes by task key (what ``ctx.task_output`` reads)."""
    start_id: str | None = None
    """Which start request wrote this entry: the same request repeated is recognised (idempotent
    starts), another request for the same run id is refused. ``None`` in entries written before."""
    generation: int = 0
    """How many times the run continued as new (``ctx.continue_as_new``). A later generation's
    start is appended after the earlier one's entries, which readers skip and the host purges."""
    inbox_taken: int = 0
    """A later generation's start: the inbox signals up to this sequence were taken before it."""
    carried: list[SignalReceived] = Field(default_factory=list)
    """A later generation's start: direct signals the earlier generation took but no wait of it
    consumed, in arrival order; this generation's waits receive them first."""
    additional_metadata: dict[str, str] = Field(default_factory=dict)
    """The run's flat string metadata (``ctx.additional_metadata``); left off the wire when empty."""
    withdrawn: list[EndedWait] = Field(default_factory=list)
    """A later generation's start: the waits the earlier generation's last turn ended, whose router
    registrations are withdrawn after the switch. The earlier entries are skipped by readers, so a
    turn that redoes the switch's tidying (a retry, a redelivery) finds them here."""

    def same_start(self, other: RunStarted) -> bool:
        """Whether ``other`` is this start again (a retry, or the host completing it)."""
        if self.start_id is None or other.start_id is None:
            return self.task == other.task
        return self.start_id == other.start_id


class ActivationBegun(_Entry):
    """A host took a turn of the run (piggybacked on the turn's first flush)."""

    k: Literal["activation"] = "activation"
    host: str
    delivery: int = Field(validation_alias=AliasChoices("delivery", "attempt"))
    """How many times the activation was delivered (1, or more after a host died); not the retry
    number, which ``attempt_failed`` entries count. Read from ``attempt`` in histories written before."""
    at: datetime
    tidied: bool = False
    """The host knows the run's previous turn withdrew the registrations of the waits it resolved
    (it made that turn itself, and kept the run warm). A run's end need not withdraw those again."""


class TurnParked(_Entry):
    """A turn that claimed signals ran its code, which parked again with nothing new to record.

    Without it such a turn would end on its claim alone, which is also how a turn whose code
    is still running (or whose host died) looks to another host (``actors.hosting.host._claim``).
    """

    k: Literal["parked"] = "parked"
    at: datetime


class MemoRecorded(_Entry):
    """A memoised step finished; its result is returned on every replay."""

    k: Literal["memo"] = "memo"
    pos: int
    name: str
    args_hash: str
    result: Any = None
    ms: float | None = None
    """How long the step ran, in milliseconds (``None`` in entries written before it was recorded)."""


class NowRecorded(_Entry):
    k: Literal["now"] = "now"
    pos: int
    at: datetime


class PatchMarked(_Entry):
    """``ctx.patched(change_id)`` returned True here: the run took the changed code's path."""

    k: Literal["patched"] = "patched"
    pos: int
    change_id: str


class SleepScheduled(_Entry):
    """A sleep's wake time, recorded once (sleeps keep their deadline across crashes)."""

    k: Literal["sleep_scheduled"] = "sleep_scheduled"
    pos: int
    duration_s: float
    wake_at: datetime


class SleepFired(_Entry):
    k: Literal["sleep_fired"] = "sleep_fired"
    pos: int
    at: datetime


class WaitCondition(BaseModel):
    """One condition of a durable wait, as recorded: an event (by key, scope, CEL) or a sleep."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Literal["event", "sleep"]
    key: str
    """The condition's name in the wait's result."""
    event_key: str | None = None
    expression: str | None = None
    scope: str | None = None
    lookback_s: float | None = None
    duration_s: float | None = None
    wake_at: datetime | None = None


class EndedWait(BaseModel):
    """A wait whose registrations are to be withdrawn (:attr:`RunStarted.withdrawn`); ``satisfied``: the
    conditions the router removed itself."""

    model_config = ConfigDict(extra="allow", frozen=True)

    wait: WaitRegistered
    satisfied: list[int | None] = Field(default_factory=list)


class WaitRegistered(_Entry):
    """A wait began: an AND of or-groups of conditions, with every sleep's wake time fixed.

    ``any_of`` conditions end the wait on their own (a DAG task's ``skip_if`` / ``cancel_if``).
    """

    k: Literal["wait_registered"] = "wait_registered"
    pos: int
    wait_id: str
    label: str
    args_hash: str
    groups: list[list[WaitCondition]]
    at: datetime
    any_of: list[WaitCondition] = Field(default_factory=list)

    def flat(self) -> list[WaitCondition]:
        """Every condition, in the order their indexes count (groups first, then ``any_of``)."""
        return [c for g in self.groups for c in g] + list(self.any_of)


class EventSignal(BaseModel):
    """An event delivered to one run: matched by the router, or sent directly (on the run's inbox)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    v: int = WIRE_VERSION
    source: Literal["event", "direct", "child", "cancel"]
    name: str
    """The event's key (router) or name (direct delivery)."""
    payload: Any = None
    event_id: str
    wait_id: str | None = None
    cond: int | None = None
    """Index of the satisfied condition in the wait's flattened condition list (router signals)."""
    scope: str | None = None
    event_seq: int | None = None
    at: datetime
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def cancel_reason(self) -> str:
        """A cancel signal's reason: its payload's ``reason`` if that is a non-empty string, else ``cancelled``.

        Whoever may publish on a run's inbox can send a cancel with any payload: a number or a
        list there failed every turn of the run (the end it recorded must hold a string).
        """
        return _reason_or_default(self.payload.get("reason") if isinstance(self.payload, dict) else None)


def _reason_or_default(reason: Any) -> str:
    """A cancel's reason as given, if it is a non-empty string; ``cancelled`` for anything else."""
    return reason if isinstance(reason, str) and reason else "cancelled"


class SignalReceived(_Entry):
    """The host took a signal from the run's inbox (``inbox_seq``); it is never taken twice."""

    k: Literal["signal"] = "signal"
    inbox_seq: int
    signal: EventSignal


class WaitResolved(_Entry):
    """A wait finished: its result, and the direct signals it consumed. Replays return ``result``."""

    k: Literal["wait_resolved"] = "wait_resolved"
    pos: int
    wait_id: str
    label: str
    args_hash: str
    result: dict[str, Any]
    consumed: list[int] = Field(default_factory=list)
    at: datetime


class ErrorInfo(BaseModel):
    type: str
    message: str
    traceback: str = ""


class ChildrenSpawned(_Entry):
    """The run spawns ``run_ids`` of ``task`` at ``pos``; written before any of them is started."""

    k: Literal["children_spawned"] = "children_spawned"
    pos: int
    task: str
    run_ids: list[str]
    args_hash: str
    at: datetime


class AttemptFailed(_Entry):
    """An attempt raised and will be retried at ``retry_at`` (the attempt number is their count + 1)."""

    k: Literal["attempt_failed"] = "attempt_failed"
    attempt: int
    error: ErrorInfo
    retry_at: datetime
    at: datetime


class RunCompleted(_Entry):
    k: Literal["run_completed"] = "run_completed"
    result: Any = None
    at: datetime
    skipped: bool = False
    """A workflow task whose ``skip_if`` (or an unmet parent condition) skipped it."""


class RunFailed(_Entry):
    k: Literal["run_failed"] = "run_failed"
    error: ErrorInfo
    at: datetime


class RunCancelled(_Entry):
    k: Literal["run_cancelled"] = "run_cancelled"
    reason: str = ""
    at: datetime


HistoryEntry = (
    RunStarted
    | ActivationBegun
    | TurnParked
    | MemoRecorded
    | NowRecorded
    | PatchMarked
    | SleepScheduled
    | SleepFired
    | WaitRegistered
    | SignalReceived
    | WaitResolved
    | ChildrenSpawned
    | AttemptFailed
    | RunCompleted
    | RunFailed
    | RunCancelled
)
"""One fact of a run's history; code matches on the type (``isinstance(e, MemoRecorded)``)."""

Terminal = RunCompleted | RunFailed | RunCancelled
"""How a run ended."""

TERMINAL = (RunCompleted, RunFailed, RunCancelled)
"""The terminal entry types, for ``isinstance``."""

Entry = Annotated[
    RunStarted
    | ActivationBegun
    | TurnParked
    | MemoRecorded
    | NowRecorded
    | PatchMarked
    | SleepScheduled
    | SleepFired
    | WaitRegistered
    | SignalReceived
    | WaitResolved
    | ChildrenSpawned
    | AttemptFailed
    | RunCompleted
    | RunFailed
    | RunCancelled,
    Field(discriminator="k"),
]



class HistoryMessage(BaseModel):
    """One message on ``<prefix>.history.<run>``: a batch of entries appended atomically."""

    v: int = WIRE_VERSION
    e: list[Entry]


_history_adapter = TypeAdapter(HistoryMessage)


_MISSING = object()
_defaults: dict[type[BaseModel], dict[str, Any]] = {}


def _defaults_of(cls: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``cls`` that have a default, with it (never ``k``: it tells the entries apart)."""
    found = _defaults.get(cls)
    if found is None:
        found = {}
        for name, info in cls.model_fields.items():
            if name in ("k", "v") or info.is_required():
                continue
            found[name] = info.get_default(call_default_factory=True)
        _defaults[cls] = found
    return found


def _fields(value: BaseModel) -> dict[str, Any]:
    # A field at its default is left out: the reader fills it in (every field that has a default
    # has had it since it was added), so a waiting run stores its start and its wait compactly.
    fields = value.__dict__
    out = None
    for k, d in (_defaults.get(type(value)) or _defaults_of(type(value))).items():
        v = fields.get(k, _MISSING)
        if v is d or (type(v) is type(d) and v == d):
            if out is None:
                out = dict(fields)
            del out[k]
    return fields if out is None else out


def _model_fields(value: Any) -> Any:
    # Entries hold only JSON data, datetimes and nested models: orjson serialises their
    # fields directly, ~4x faster than model_dump on the hot path.
    if isinstance(value, BaseModel):
        return _fields(value)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def encode_history(entries: Sequence[HistoryEntry]) -> bytes:
    return orjson.dumps({"v": WIRE_VERSION, "e": [_fields(e) for e in entries]}, default=_model_fields,
                        option=orjson.OPT_UTC_Z)


def decode_history(data: bytes) -> list[HistoryEntry]:
    msg = _history_adapter.validate_json(data)
    if msg.v > WIRE_VERSION:
        raise ValueError(f"history message version {msg.v} is newer than this Bide ({WIRE_VERSION})")
    return list(msg.e)


_terminal_adapter: TypeAdapter[Terminal] = TypeAdapter(Annotated[Terminal, Field(discriminator="k")])
_TERMINAL_KINDS = frozenset(t.model_fields["k"].default for t in TERMINAL)


def decode_terminal(data: bytes) -> Terminal | None:
    """The run's end, if it is the last entry of this history message, without decoding the others.

    What a starter's result inbox receives (``HistoryLog.append``'s ``notify``): the message that
    ends the run, often with the run's start and its steps in front of its end.
    """
    doc = orjson.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("e"), list) or not doc["e"]:
        raise ValueError("not a history message")
    if doc.get("v", WIRE_VERSION) > WIRE_VERSION:
        raise ValueError(f"history message version {doc['v']} is newer than this Bide ({WIRE_VERSION})")
    last = doc["e"][-1]
    if not isinstance(last, dict) or last.get("k") not in _TERMINAL_KINDS:
        return None
    return _terminal_adapter.validate_python(last)


# --- activations -----------------------------------------------------------------------------------

ActivationKind = Literal["start", "timer", "retry", "signal"]
"""Why a run needs a turn: it was started, a timer fired, an attempt is retried, or its inbox has mail."""


class Activation(BaseModel):
    """A message on ``<prefix>.work.<task>.<run>``: "run R needs a turn", with why."""

    model_config = ConfigDict(extra="allow")

    v: int = WIRE_VERSION
    run_id: str
    task: str
    kind: ActivationKind
    pos: int | None = None
    history_seq: int | None = None
    """The stream sequence of the history append this activation follows (the start entry, the
    checkpoint before a timer or a retry): the host's read must see it (invariant 13)."""
    inbox_seq: int | None = None
    """The stream sequence of the inbox message this activation announces (a signal): the host's
    read must see it, or a history entry that took it (invariant 13)."""
    started: RunStarted | None = None
    """On a fresh start, the run's first entry, so the host can skip reading the history."""
    start_unrecorded: bool | None = None
    """A start whose entry the starter does not append: the host that takes it records it. The
    run id was made for this start, so no other start can hold it (``protocol.start_run``)."""


def encode_activation(act: Activation) -> bytes:
    return orjson.dumps({k: v for k, v in act.__dict__.items() if v is not None}, default=_model_fields,
                        option=orjson.OPT_UTC_Z)


def decode_activation(data: bytes) -> Activation:
    return Activation.model_validate_json(data)


def encode_cancel_broadcast(run_id: str, reason: str) -> bytes:
    """The cancel broadcast's body (``Subjects.cancel_broadcast``): the run and the reason given."""
    return orjson.dumps({"run_id": run_id, "reason": reason})


def decode_cancel_broadcast(data: bytes) -> tuple[str, str]:
    """``(run_id, reason)`` from a cancel broadcast; a bare run id (what clients before sent): ``cancelled``."""
    if data.startswith(b"{"):
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("run_id"), str):
            return doc["run_id"], _reason_or_default(doc.get("reason"))
    return data.decode(errors="replace"), _reason_or_default(None)


class RunRemoval(BaseModel):
    """A message on ``<prefix>.work.@reaper.<run>``: the finished run's retention has passed, remove it."""

    model_config = ConfigDict(extra="allow")

    v: int = WIRE_VERSION
    run_id: str = Field(min_length=1)


class RunRemovals(BaseModel):
    """A message on ``<prefix>.work.@reaper.%batch.<batch>``: remove each of these finished runs once due.

    A host schedules the removals of the runs whose ends it carries out together as one
    message (actors.hosting.retention), due when the last of them is.
    """

    model_config = ConfigDict(extra="allow")

    v: int = WIRE_VERSION
    run_ids: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)


# --- the event router's inputs ------------------------------------------------------------------------


class WaitRegistration(BaseModel):
    """On ``<prefix>.waits.<key>``: one event condition of a wait, registered with (or cancelled at) the router.

    It travels in the events stream, so its sequence orders it against every event:
    events before it are the lookback's, events after it are live (waits are race-free).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    v: int = WIRE_VERSION
    op: Literal["register", "cancel"]
    wait_id: str
    cond: int
    run_id: str
    task: str
    event_key: str
    scope: str | None = None
    expression: str | None = None
    lookback_s: float | None = None
    run_input: Any = None
    """The waiting run's input, sent only when the expression reads it (as ``event``)."""


class TriggerRegistration(BaseModel):
    """On ``<prefix>.triggers.<task>``: the event keys that start a run of ``task`` (latest wins)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    v: int = WIRE_VERSION
    task: str
    durable: bool
    on_events: list[str]


def rfc3339(ts: datetime) -> str:
    """``ts`` in UTC to the microsecond, ``Z``-suffixed (``isoformat``: faster than ``strftime``,
    and it pads years before 1000, which glibc's ``%Y`` does not)."""
    if ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    return ts.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(raw: str | None) -> datetime:
    """A get's ``Nats-Time-Stamp`` (nanosecond RFC 3339), to the microsecond."""
    if not raw:
        return utcnow()
    try:
        head, _, frac = raw.rstrip("Z").partition(".")
        return datetime.fromisoformat(head + ("." + frac[:6] if frac else "")).replace(tzinfo=UTC)
    except ValueError:
        return utcnow()
