"""Talking to JetStream: connecting with clear errors, the stream layout, raw API helpers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from actors.engine.wire import Subjects, parse_time, utcnow
from actors.store.requests import requests_of, server_status
from sdk.config import NatsAuth, redact_url

if TYPE_CHECKING:
    from sdk.config import BideConfig

log = logging.getLogger("bide.jetstream")

ERR_WRONG_LAST_SEQUENCE = 10071
"""JetStream error code for a failed ``Nats-Expected-Last-Subject-Sequence`` check."""
ERR_WRONG_LAST_SEQUENCE_CONSTANT = 10164
"""The same check refused while another write to the subject is in flight (clustered streams)."""
ERR_EXPECTED_LAST_SEQ_NOT_READY = 10163
"""The same check cannot be made yet (a stream leader that was just elected)."""
ERR_MESSAGE_TOO_BIG = 10054
"""A message larger than the stream accepts: the same message is refused every time."""
ERR_NO_SUITABLE_PEERS = 10005
"""A 400 about the cluster, not the request: no peers to place the replicas on yet (a node still
joining a cluster that just started, or down). The same request succeeds once they are there."""
_NO_RESPONDERS_RETRY_S = 0.1


class NatsUnavailableError(ConnectionError):
    """The NATS server could not be reached; the message names the URL and what to do."""


class StaleReadError(Exception):
    """Every replica that answered a read was behind a write the reader knows was acknowledged."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failed JetStream operation may succeed if repeated: infrastructure, not input.

    A timeout, a lost connection, no responders (503) or a JetStream API error is
    transient (a leader election, a limit an operator can raise), except a message the
    server can never accept and a request it refuses as such (400: bad request, 404: not
    found): repeating those changes nothing, and a writer that must not skip anything
    (the router) would wait on them for ever. One 400 is about the cluster, not the request:
    no peers to place replicas on yet (``ERR_NO_SUITABLE_PEERS``).
    """
    if isinstance(exc, nats.errors.MaxPayloadError):
        return False
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code == ERR_NO_SUITABLE_PEERS:
            return True
        return exc.err_code != ERR_MESSAGE_TOO_BIG and exc.code not in (400, 404)
    return isinstance(exc, (TimeoutError, ConnectionError, OSError, nats.errors.Error, StaleReadError))


_RETRY_BACKOFF_MAX_S = 2.0


async def retry_transient(what: str, op: Callable[[], Awaitable[Any]], deadline_s: float | None = None) -> Any:
    """Run ``op`` until it succeeds or fails for good; infrastructure errors are retried with backoff.

    With ``deadline_s`` the last infrastructure error is raised once that long has passed
    (a client gives up; the router, which must not skip anything, retries for ever).
    """
    loop = asyncio.get_running_loop()
    give_up = None if deadline_s is None else loop.time() + deadline_s
    delay = 0.05
    while True:
        try:
            return await op()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not is_transient(e) or (give_up is not None and loop.time() + delay > give_up):
                raise
            log.warning("%s failed (%s: %s); retrying in %.2fs", what, type(e).__name__, e, delay)
            await asyncio.sleep(delay)
            delay = min(_RETRY_BACKOFF_MAX_S, delay * 2)


@dataclass(frozen=True)
class Layout:
    """Stream settings shared by clients and hosts (created idempotently at start-up)."""

    subjects: Subjects
    replicas: int = 1
    ack_wait_s: float = 3.0
    events_max_age_s: float = 24 * 3600
    """How long events are kept for lookback (the longest lookback window that can see anything)."""
    event_dedupe_window_s: float = 600.0
    """Pushing an event id again within this window is a no-op (JetStream de-duplication)."""
    router_failover_s: float = 2.0
    """How long a router partition's owner may be silent before another process takes over."""
    router_partitions: int = 4
    """Event router partitions a new store is made with (an existing store keeps its own)."""

    @classmethod
    def from_config(cls, config: BideConfig) -> Layout:
        return cls(
            Subjects(config.prefix),
            replicas=config.replicas,
            ack_wait_s=config.ack_wait_s,
            events_max_age_s=config.events_max_age_s,
            # JetStream refuses a window longer than the stream's max age (10052): events kept less
            # than 10 minutes are de-duplicated for as long as they are kept.
            event_dedupe_window_s=min(cls.event_dedupe_window_s, config.events_max_age_s),
            router_partitions=config.router_partitions,
        )


def _auth_options(auth: NatsAuth | None) -> dict[str, Any]:
    """``nats.connect`` arguments for ``auth``: credentials, and a TLS context when a CA or client cert is set."""
    if auth is None:
        return {}
    opts: dict[str, Any] = {}
    if auth.creds:
        opts["user_credentials"] = auth.creds
    if auth.nkey:
        opts["nkeys_seed"] = auth.nkey
    if auth.user:
        opts["user"] = auth.user
        opts["password"] = auth.password or ""
    if auth.token:
        opts["token"] = auth.token
    if auth.tls:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=auth.tls_ca)
        if auth.tls_cert and auth.tls_key:
            ctx.load_cert_chain(auth.tls_cert, auth.tls_key)
        opts["tls"] = ctx
    return opts


async def connect(url: str, *, name: str = "bide", connect_timeout: float = 2.0,
                  auth: NatsAuth | None = None, closed_cb: Callable[[], Awaitable[None]] | None = None) -> NATS:
    """Connect to NATS (``url`` may list several servers, comma-separated), failing fast if none answers.

    Errors name the URL with any password or token in it hidden, and never the credentials.
    ``closed_cb`` is called once the connection is closed for good: by its owner, or by nats-py
    after a protocol error from the server (it reconnects after a lost socket, never after an
    ``-ERR``).
    """
    errors: list[str] = []
    refused = asyncio.Event()

    async def _on_error(e: Exception) -> None:
        errors.append(str(e) or type(e).__name__)
        if _is_refusal(errors[-1]):
            refused.set()  # retrying the same credentials cannot help: fail now, not at the timeout

    try:
        # With unlimited reconnects nats-py would retry the *initial* connect forever: bound it.
        attempt = asyncio.ensure_future(nats.connect(
            [u.strip() for u in url.split(",") if u.strip()],
            name=name,
            connect_timeout=connect_timeout,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            allow_reconnect=True,
            error_cb=_on_error,
            **({"closed_cb": closed_cb} if closed_cb is not None else {}),
            pending_size=64 * 1024 * 1024,
            **_auth_options(auth),
        ))
        gave_up = asyncio.ensure_future(refused.wait())
        try:
            await asyncio.wait({attempt, gave_up}, timeout=connect_timeout * 2.5,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gave_up.cancel()
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
            raise TimeoutError("no server answered")
        return attempt.result()
    except (TimeoutError, nats.errors.NoServersError, nats.errors.Error, OSError) as e:
        # A refusal of the credentials is the reason, whatever came after it (the server then hangs up).
        last = next((x for x in reversed(errors) if _is_refusal(x)), errors[-1] if errors else None)
        why = _hide(last or str(e) or type(e).__name__, url, auth)
        shown = redact_url(url)
        if _is_refusal(why):
            raise NatsUnavailableError(
                f"NATS at {shown!r} refused this process's credentials ({why}): check BIDE_NATS_CREDS, "
                "BIDE_NATS_NKEY, BIDE_NATS_USER/BIDE_NATS_PASSWORD or BIDE_NATS_TOKEN") from None
        raise NatsUnavailableError(
            f"cannot connect to NATS at {shown!r} ({why}). Start a local server with `bide dev`, "
            "or point BIDE_NATS_URL at a running nats-server with JetStream enabled."
        ) from None


def _is_refusal(error: str) -> bool:
    """The server refused the credentials (not a network or availability problem)."""
    return "authorization" in error.lower() or "authentication" in error.lower()


def _hide(text: str, url: str, auth: NatsAuth | None) -> str:
    """``text`` with the URL's secrets and the configured password and token replaced by ``***``."""
    secrets = [auth.password, auth.token] if auth is not None else []
    for one in url.split(","):
        userinfo = one.strip().partition("://")[2].rpartition("@")[0]
        if userinfo:
            secrets += [userinfo.partition(":")[2] or userinfo]
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _stream_configs(layout: Layout) -> list[StreamConfig]:
    s = layout.subjects
    return [
        StreamConfig(
            name=s.history_stream,
            subjects=[s.history_all, s.inbox_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            # No max age: a live run never expires (DESIGN.md invariant 9); a finished run is
            # removed by the reaper (actors/hosting/retention.py) after BIDE_HISTORY_RETENTION.
            max_age=0,
            num_replicas=layout.replicas,
            allow_direct=True,
            # Invariant 10: whoever may deliver to a run cannot purge histories with a rollup header.
            allow_rollup_hdrs=False,
            discard=DiscardPolicy.OLD,
            duplicate_window=120.0,
        ),
        StreamConfig(
            # Starts, signals and retries: what clients, the HTTP API and hosts publish. Invariant 10:
            # a `nats pub` with Nats-Rollup must not purge every queued activation.
            name=s.queue_stream,
            subjects=[s.queue_all],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=layout.replicas,
            allow_direct=True,
            allow_rollup_hdrs=False,
            duplicate_window=120.0,
        ),
        StreamConfig(
            # Timers and what they fire. Scheduling makes nats-server allow rollup headers here
            # whatever the configuration says, so only hosts publish to this stream.
            name=s.work_stream,
            subjects=[s.work_all, s.timers_all],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=layout.replicas,
            allow_msg_schedules=True,
            allow_direct=True,
            duplicate_window=120.0,
        ),
        StreamConfig(
            name=s.events_stream,
            subjects=[s.events_all, s.waits_all, s.triggers_all, s.rejected_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=layout.events_max_age_s,
            num_replicas=layout.replicas,
            allow_direct=True,
            # Invariant 10: a `nats pub` with Nats-Rollup must not wipe every event and wait.
            allow_rollup_hdrs=False,
            discard=DiscardPolicy.OLD,
            duplicate_window=layout.event_dedupe_window_s,
        ),
        StreamConfig(
            # One counter per spawn batch: each finished child adds one and learns the total,
            # so only the child that completes the batch wakes the parent.
            name=s.counters_stream,
            subjects=[s.counters_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=0,  # as the history: removed with its run, never by age
            num_replicas=layout.replicas,
            allow_direct=True,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            # The router partitions' own checkpoints: the last sequence each handled with every
            # effect durable. The consumers' ack floors say the same, unless an ack floor runs
            # ahead of what was handled (seen in a cluster losing nodes): the lower one wins.
            name=s.checkpoints_stream,
            subjects=[s.checkpoints_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=1,
            num_replicas=layout.replicas,
            allow_direct=True,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            # Which runs each event resumed or started (actors/hosting/router_effects.py): a view
            # kept as long as the events. Not in the events stream: a record there is a gap in
            # every router partition's deliveries, which each would read the stream to fill.
            name=s.outcomes_stream,
            subjects=[s.outcomes_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=layout.events_max_age_s,
            num_replicas=layout.replicas,
            allow_direct=True,
            allow_rollup_hdrs=False,
            discard=DiscardPolicy.OLD,
            # A redone batch's records are duplicates (the server refuses a window over the max age).
            duplicate_window=min(120.0, layout.events_max_age_s or 120.0),
        ),
        StreamConfig(
            # The runs index (actors/store/runs_index.py): one record per subject, a view for
            # listing runs that no run depends on. An ended run's `live` record is replaced by a
            # marker that expires (Nats-TTL), so listing live runs reads live runs only.
            name=s.runs_stream,
            subjects=[s.runs_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=0,  # removed with its run by the reaper, never by age
            max_msgs_per_subject=1,
            num_replicas=layout.replicas,
            allow_direct=True,
            allow_rollup_hdrs=False,
            discard=DiscardPolicy.OLD,
        ),
    ]


def stream_names(layout: Layout) -> list[str]:
    """Every stream Bide uses under ``layout`` (what a readiness probe checks exists)."""
    return [cfg.name for cfg in _stream_configs(layout) if cfg.name]


async def missing_streams(nc: NATS, layout: Layout, timeout: float = 2.0) -> list[str]:
    """The streams of :func:`stream_names` the server does not have (one ``STREAM.NAMES`` request)."""
    have: set[str] = set()
    offset = 0
    while True:
        resp = await api_request(nc, "$JS.API.STREAM.NAMES", {"offset": offset}, timeout=timeout)
        names = resp.get("streams") or []
        have.update(names)
        offset += len(names)
        if not names or offset >= int(resp.get("total", 0)):
            break
    return [name for name in stream_names(layout) if name not in have]


def _stream_body(cfg: StreamConfig, layout: Layout) -> dict[str, Any]:
    """The STREAM.CREATE/UPDATE body for ``cfg`` (nats-py's StreamConfig has no ``allow_msg_ttl``)."""
    body = cfg.as_dict()
    if cfg.name in (layout.subjects.events_stream, layout.subjects.runs_stream):
        body["allow_msg_ttl"] = True
    if cfg.name == layout.subjects.counters_stream:
        body["allow_msg_counter"] = True
    return body


async def ensure_streams(js: JetStreamContext, layout: Layout) -> None:
    """Create or update every stream; safe to call from every process at start-up."""
    for cfg in _stream_configs(layout):
        await _create_or_update(js._nc, cfg.name or "", _stream_body(cfg, layout))
    await ensure_router_consumers(js._nc, layout)


async def _create_or_update(nc: NATS, name: str, body: dict[str, Any]) -> None:
    try:
        await api_request(nc, f"$JS.API.STREAM.CREATE.{name}", body)
    except nats.js.errors.APIError as e:
        # 10058: stream name in use with a different configuration.
        if e.err_code != 10058:
            raise
        await api_request(nc, f"$JS.API.STREAM.UPDATE.{name}", body)


ERR_STREAM_NOT_FOUND = 10059
GUARDED_FIELDS: dict[str, Any] = {
    "subjects": None, "max_age": 0, "max_msgs": -1, "max_bytes": -1, "max_msgs_per_subject": -1,
    "max_msg_size": -1, "discard": "old", "allow_rollup_hdrs": False, "deny_delete": False,
    "deny_purge": False, "allow_msg_ttl": False, "allow_msg_schedules": False, "allow_msg_counter": False,
    "sealed": False, "duplicate_window": None,
}
"""The stream settings Bide's guarantees rest on, with the server's default where Bide sets none.

A max age or a message limit expires live runs' histories and pending timers; a rollup
header allowed again lets a plain publish purge a stream (invariant 10); a purge or delete
denied stops the reaper; a subject taken away refuses every write to it. Everything else
(replicas, placement, compression, a description) is the operator's to change. A setting whose
default is ``None`` is guarded only on the streams Bide sets it on.
"""


def _drift(want: dict[str, Any], have: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The guarded settings in which the stream's configuration ``have`` differs from ``want``."""
    out: dict[str, tuple[Any, Any]] = {}
    for field, default in GUARDED_FIELDS.items():
        if field == "allow_rollup_hdrs" and want.get("allow_msg_schedules"):
            continue  # the server allows rollups on a stream with schedules, whatever it is told
        if default is None and not want.get(field):  # not set (0: the server's default)
            continue
        wanted = want.get(field, default)
        had = have.get(field, default)
        if field == "subjects":
            wanted, had = sorted(wanted or []), sorted(had or [])
        if wanted != had:
            out[field] = (had, wanted)
    return out


def _shown(field: str, value: Any) -> str:
    if field in ("max_age", "duplicate_window"):  # nanoseconds on the wire
        return f"{value / 1e9:g}s" if value else "0 (none)"
    return repr(value)


ERR_NO_MESSAGE = (10037, 10043, 10057)
"""JetStream: no message found, sequence not found, past the end of the store: nothing to delete."""


async def delete_message(nc: NATS, stream: str, seq: int, timeout: float = 5.0) -> None:
    """Delete message ``seq`` of ``stream``; one already gone is deleted too (idempotent)."""
    try:
        await api_request(nc, f"$JS.API.STREAM.MSG.DELETE.{stream}", {"seq": seq, "no_erase": True}, timeout=timeout)
    except nats.js.errors.APIError as e:
        if e.err_code not in ERR_NO_MESSAGE:
            raise


OVERDUE_SLACK_S = 60.0
"""How far past the events' max age (or that age again, if shorter) an event must be before
:func:`remove_overdue_events` removes it: room for the server's own removal and the clocks' skew."""


async def remove_overdue_events(nc: NATS, layout: Layout, limit: int = 1000) -> int:
    """Remove events kept past the events' max age by their own ``Nats-TTL`` (``never``, or longer).

    The events stream allows per-message TTLs (a wait's registration is kept with ``never``), so a
    publisher's ``nats pub bide.events.k -H 'Nats-TTL:never'`` outlived ``BIDE_EVENTS_MAX_AGE``.
    Events are stored in time order and the server removes the others at their max age, so the
    oldest events left, while older than that, are exactly the overdue ones: read from the first,
    each by one direct get. Returns how many were removed (at most ``limit`` a call).
    """
    s = layout.subjects
    cutoff = utcnow() - timedelta(seconds=layout.events_max_age_s + min(OVERDUE_SLACK_S, layout.events_max_age_s))
    removed, seq = 0, 1
    while removed < limit:
        oldest = await direct_get_subject(nc, s.events_stream, s.events_all, start_seq=seq, batch=1, limit=1)
        hdrs = (oldest[0].headers or {}) if oldest else {}
        if "Nats-Sequence" not in hdrs or parse_time(hdrs.get("Nats-Time-Stamp")) >= cutoff:
            return removed
        seq = int(hdrs["Nats-Sequence"])
        await delete_message(nc, s.events_stream, seq)
        removed += 1
        log.warning("removed event %d on %s: kept past the events' max age by its own Nats-TTL header",
                    seq, hdrs.get("Nats-Subject", "?"))
        seq += 1
    return removed


async def restore_streams(nc: NATS, layout: Layout) -> list[str]:
    """Put back every guarded setting (:data:`GUARDED_FIELDS`) that was changed outside Bide.

    A stream edited by hand (``nats stream edit BIDE_HISTORY --max-age 30d``) is updated with
    the operator's configuration and Bide's value of each guarded setting; a stream deleted by
    hand is created again (what it held is gone). Returns what was put back, one line each.
    What the server removed under the changed setting before this ran is not brought back.
    """
    restored: list[str] = []
    for cfg in _stream_configs(layout):
        name = cfg.name or ""
        want = _stream_body(cfg, layout)
        try:
            info = await api_request(nc, f"$JS.API.STREAM.INFO.{name}", {})
        except nats.js.errors.APIError as e:
            if e.err_code != ERR_STREAM_NOT_FOUND:
                raise
            await _create_or_update(nc, name, want)
            restored.append(f"stream {name} was deleted outside Bide: created again (what it held is gone)")
            continue
        have: dict[str, Any] = info.get("config") or {}
        drift = _drift(want, have)
        if not drift:
            continue
        body = {**have, **{field: want.get(field, GUARDED_FIELDS[field]) for field in drift}}
        await api_request(nc, f"$JS.API.STREAM.UPDATE.{name}", body)
        restored += [f"stream {name}: {field} was {_shown(field, had)}, put back to {_shown(field, wanted)}"
                     for field, (had, wanted) in drift.items()]
    return restored


class RouterPartitionsError(ValueError):
    """The configured router partition count differs from the one the store was made with."""


ERR_CONSUMER_NOT_FOUND = 10014
LEGACY_ROUTER_CONSUMERS = ("event_router_v2", "event_router")
"""Earlier routers' single consumers (newest first): replaced, from their ack floor, at start-up."""
ROUTER_GROUP = "router"
"""The priority group each router partition's owner is pinned in."""
_META_PARTITION = "bide_router_partition"
_META_PARTITIONS = "bide_router_partitions"


async def _consumer_info(nc: NATS, stream: str, name: str) -> dict[str, Any] | None:
    try:
        return await api_request(nc, f"$JS.API.CONSUMER.INFO.{stream}.{name}", {})
    except nats.js.errors.APIError as e:
        if e.err_code != ERR_CONSUMER_NOT_FOUND:
            raise
        return None


async def router_partition_count(nc: NATS, layout: Layout) -> int | None:
    """How many router partitions the store was made with (``None``: no partitioned router yet)."""
    info = await _consumer_info(nc, layout.subjects.events_stream, layout.subjects.router_consumer(0))
    if info is None:
        return None
    return int((info.get("config", {}).get("metadata") or {}).get(_META_PARTITIONS, "1"))


async def check_router_partitions(nc: NATS, layout: Layout) -> int:
    """The store's partition count; raises :class:`RouterPartitionsError` if it is not the configured one."""
    have = await router_partition_count(nc, layout)
    if have is not None and have != layout.router_partitions:
        raise RouterPartitionsError(
            f"BIDE_ROUTER_PARTITIONS={layout.router_partitions}, but the event router of this store "
            f"(stream {layout.subjects.events_stream}) has {have} partitions. The count is fixed for the "
            f"life of a store: set BIDE_ROUTER_PARTITIONS={have} on every host."
        )
    return have or layout.router_partitions


async def ensure_router_consumers(nc: NATS, layout: Layout) -> None:
    """The event router's partitions: one durable consumer each, reading every event, wait and trigger.

    They exist as soon as the stream does, so nothing published later is missed. Each
    partition is owned by one process at a time (a pinned-client priority group, ADR-42);
    another takes over when the owner has been silent for ``router_failover_s``. Acks are
    cumulative (``all``): an owner acks a batch once its writes are durable, so each
    consumer's ack floor is its partition's checkpoint (invariant 11). The partition count
    is recorded in every consumer's metadata; a store that has partitions keeps its count
    (hosts with another one refuse to route, :func:`check_router_partitions`). A store made
    by an earlier, unpartitioned router goes on from that router's ack floor.
    """
    s = layout.subjects
    n = await router_partition_count(nc, layout) or layout.router_partitions
    start = 0
    legacy: list[str] = []
    for name in LEGACY_ROUTER_CONSUMERS:
        old = await _consumer_info(nc, s.events_stream, name)
        if old is not None:
            legacy.append(name)
            if not start:
                start = int(old.get("ack_floor", {}).get("stream_seq", 0)) + 1
    for p in range(n):
        if await _consumer_info(nc, s.events_stream, s.router_consumer(p)) is not None:
            continue
        config: dict[str, Any] = {
            "durable_name": s.router_consumer(p),
            "filter_subjects": [s.events_all, s.waits_all, s.triggers_all],
            "ack_policy": "all",
            "deliver_policy": "all",
            "ack_wait": int(max(30.0, layout.ack_wait_s) * 1e9),
            "max_deliver": -1,
            "max_ack_pending": 100_000,
            "num_replicas": layout.replicas,
            "priority_groups": [ROUTER_GROUP],
            "priority_policy": "pinned_client",
            "priority_timeout": int(layout.router_failover_s * 1e9),
            "metadata": {_META_PARTITION: str(p), _META_PARTITIONS: str(n)},
        }
        if start > 1:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=start)
        try:
            await api_request(nc, f"$JS.API.CONSUMER.CREATE.{s.events_stream}.{s.router_consumer(p)}",
                              {"stream_name": s.events_stream, "config": config})
        except nats.js.errors.APIError:
            # Another process starting at the same time made it first (perhaps from a legacy
            # floor it has deleted since): theirs stands.
            if await _consumer_info(nc, s.events_stream, s.router_consumer(p)) is None:
                raise
    for name in legacy:
        try:
            await api_request(nc, f"$JS.API.CONSUMER.DELETE.{s.events_stream}.{name}", {})
        except nats.js.errors.APIError as e:
            if e.err_code != ERR_CONSUMER_NOT_FOUND:
                raise
    await ensure_router_status_stream(nc, layout)


async def ensure_router_status_stream(nc: NATS, layout: Layout) -> None:
    """Who routes: the last host and partition records (``bide status``, spreading partitions)."""
    s = layout.subjects
    body = StreamConfig(
        name=s.router_status_stream,
        subjects=[s.router_status_all],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.MEMORY,
        max_msgs_per_subject=1,
        max_age=60.0,  # a record nobody refreshes (a dead host's) leaves by itself
        num_replicas=layout.replicas,
        allow_direct=True,
        discard=DiscardPolicy.OLD,
    ).as_dict()
    await _create_or_update(nc, s.router_status_stream, body)


def task_consumer_config(layout: Layout, task: str, durable: bool, stream: str) -> ConsumerConfig:
    """The consumer of ``task``'s activations in ``stream`` (one of ``Subjects.activation_streams``)."""
    s = layout.subjects
    return ConsumerConfig(
        durable_name=s.consumer_name(task),
        filter_subject=s.activation_filter(stream, task),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=layout.ack_wait_s,
        # Unbounded here on purpose: the host counts deliveries itself and fails a run whose
        # activation came back too often (``BIDE_MAX_DELIVERIES``), so the run ends visibly
        # instead of its activation sitting undeliverable in the stream.
        max_deliver=-1,
        max_ack_pending=20_000,
        max_waiting=2048,
        num_replicas=layout.replicas,
        metadata={"bide_task": task, "bide_durable": "true" if durable else "false"},
    )


async def ensure_reaper_consumer(js: JetStreamContext, layout: Layout) -> str:
    """The consumer every host pulls finished runs' removals from (they fall due as scheduled messages)."""
    s = layout.subjects
    cfg = ConsumerConfig(
        durable_name=s.reaper_consumer,
        filter_subject=s.reap_all,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=layout.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=1000,
        num_replicas=layout.replicas,
    )
    await js.add_consumer(s.work_stream, cfg)
    return s.reaper_consumer


async def ensure_task_consumers(js: JetStreamContext, layout: Layout, task: str, durable: bool) -> str:
    """``task``'s consumer in each of ``activation_streams`` (the same name in each)."""
    for stream in layout.subjects.activation_streams:
        cfg = task_consumer_config(layout, task, durable, stream)
        await js.add_consumer(stream, cfg)
    return layout.subjects.consumer_name(task)


async def recreate_if_missing(nc: NATS, stream: str, name: str, create: Callable[[], Awaitable[object]]) -> bool:
    """``create()`` the consumer ``name`` of ``stream`` if it does not exist; True if it was missing.

    For a host whose pulls found its consumer gone: a consumer deleted by hand is made again
    with the configuration every host gives it at start.
    """
    if await _consumer_info(nc, stream, name) is not None:
        return False
    await create()
    return True


async def api_request(nc: NATS, subject: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    resp: dict[str, Any] = json.loads(msg.data)
    if "error" in resp:
        raise nats.js.errors.APIError.from_error(resp["error"])
    return resp


async def direct_get_subject(
    nc: NATS,
    stream: str,
    subject: str,
    *,
    start_seq: int = 0,
    batch: int = 1000,
    limit: int | None = None,
    start_time: str | None = None,
    min_last_seq: int = 0,
    timeout: float = 5.0,
) -> list[Msg]:
    """Every message on ``subject`` from ``start_seq``, by batch direct get (ADR-31), in one list.

    ``min_last_seq`` is ADR-53's request for a replica that has applied the stream up to that
    sequence; nats-server ignores it (2.12 removed read-after-write for direct gets), so any
    replica may answer, one behind included: callers check what they read
    (:meth:`actors.store.history.HistoryLog.read`) or ask the leader (:func:`leader_get`).
    """
    out: list[Msg] = []
    pages = direct_get_pages(nc, stream, subject, start_seq=start_seq, batch=batch, start_time=start_time,
                             min_last_seq=min_last_seq, timeout=timeout)
    async with contextlib.aclosing(pages):
        async for page in pages:
            out.extend(page)
            if limit is not None and len(out) >= limit:
                break
    return out


async def direct_get_pages(
    nc: NATS,
    stream: str,
    subject: str,
    *,
    start_seq: int = 0,
    batch: int = 1000,
    start_time: str | None = None,
    min_last_seq: int = 0,
    timeout: float = 5.0,
) -> AsyncGenerator[list[Msg]]:
    """The messages on ``subject`` from ``start_seq``, one batch direct get (ADR-31) at a time.

    nats-py has no helper for batched direct get, so the raw request is sent and the
    replies are collected up to the end-of-batch status (204). Pages let a reader of a
    large subject (a router rebuild over a million registrations) hold one batch at a time.
    Each page may come from a different replica; each is complete up to its last message,
    since a replica holds a prefix of the stream.
    """
    seq = start_seq
    deadline = asyncio.get_running_loop().time() + timeout
    requests = await requests_of(nc)
    while True:
        req: dict[str, Any] = {"next_by_subj": subject, "batch": batch}
        if start_time is not None and seq == start_seq:
            req["start_time"] = start_time
        else:
            req["seq"] = seq
        if min_last_seq:
            req["min_last_seq"] = min_last_seq
        try:
            # Short attempts: a request routed to a replica that just died is never answered.
            remaining = deadline - asyncio.get_running_loop().time()
            got, status = await requests.batch(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(req),
                                               max(0.05, min(2.0, remaining)))
        except TimeoutError:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            continue
        if status in (503, 412) and not got:
            # No replica answers direct gets for a moment (e.g. a cluster just lost a node), or
            # the one that answered is behind ``min_last_seq``: an empty answer here would read
            # as "no history", so wait for a replica that is up to date, or fail.
            if asyncio.get_running_loop().time() >= deadline:
                raise nats.errors.NoRespondersError
            await asyncio.sleep(_NO_RESPONDERS_RETRY_S)
            continue
        if got:
            yield got
        if status == 404 or not got:
            return
        last = got[-1]
        # A batch may end early (the server sends at most 64 MiB per request): only "nothing
        # pending" ends the read, so a large history is read whole, not cut short.
        pending = int((last.headers or {}).get("Nats-Num-Pending", "0"))
        if pending == 0:
            return
        seq = int((last.headers or {})["Nats-Sequence"]) + 1
        # Progress made: the deadline bounds a stalled read, not the size of a large one.
        deadline = max(deadline, asyncio.get_running_loop().time() + timeout)


async def read_before(nc: NATS, stream: str, subject: str, before_seq: int, start_time: str,
                      timeout: float = 30.0) -> list[Msg]:
    """Every message on ``subject`` stored at or after ``start_time`` with a sequence below ``before_seq``.

    Complete even on a cluster where a follower answers the direct get: a replica holds a
    prefix of the stream, so what it read is complete up to its last message, and one get
    from the leader (``STREAM.MSG.GET``, never answered by a follower) for the next message
    on the subject proves there is nothing more below ``before_seq``, or supplies what the
    replica had not applied yet (invariant 13).
    """
    msgs = [m for m in await direct_get_subject(nc, stream, subject, start_time=start_time, timeout=timeout)
            if _seq_of(m) < before_seq]
    while True:
        nxt = await leader_next(nc, stream, subject, _seq_of(msgs[-1]) + 1 if msgs else 0,
                                start_time=None if msgs else start_time, timeout=timeout)
        if nxt is None or _seq_of(nxt) >= before_seq:
            return msgs
        msgs.append(nxt)


async def leader_get(nc: NATS, stream: str, *, seq: int = 0, last_by_subj: str | None = None,
                     timeout: float = 5.0) -> Msg | None:
    """The message stored at ``seq`` (or the last on ``last_by_subj``), as the stream's leader has it, or ``None``.

    ``STREAM.MSG.GET``, which no follower answers: unlike a direct get, it sees every
    acknowledged write (invariant 13). nats-server has no read-after-write for direct gets
    (2.12 removed the ``min_last_seq`` that asked for an up-to-date replica), so a read whose
    "not found" decides something is asked of the leader.
    """
    req: dict[str, Any] = {"last_by_subj": last_by_subj} if last_by_subj is not None else {"seq": seq}
    try:
        resp = await api_request(nc, f"$JS.API.STREAM.MSG.GET.{stream}", req, timeout=timeout)
    except nats.js.errors.NotFoundError:
        return None
    return _stored_msg(nc, stream, resp["message"])


async def leader_next(nc: NATS, stream: str, subject: str, seq: int = 0, *, start_time: str | None = None,
                      timeout: float = 5.0) -> Msg | None:
    """The first message on ``subject`` (wildcards allowed) at or after ``seq``, or ``None``.

    Asked of the stream's leader (``STREAM.MSG.GET``, which no follower answers), so it sees
    every acknowledged write (invariant 13), unlike a direct get. ``start_time`` instead of
    ``seq``: the first stored at or after that time.
    """
    req: dict[str, Any] = {"next_by_subj": subject}
    if start_time is not None:
        req["start_time"] = start_time
    else:
        req["seq"] = seq
    try:
        resp = await api_request(nc, f"$JS.API.STREAM.MSG.GET.{stream}", req, timeout=timeout)
    except nats.js.errors.NotFoundError:
        return None
    return _stored_msg(nc, stream, resp["message"])


def _seq_of(m: Msg) -> int:
    return int((m.headers or {}).get("Nats-Sequence", "0"))


def _stored_msg(nc: NATS, stream: str, stored: dict[str, Any]) -> Msg:
    """A ``STREAM.MSG.GET`` answer in the shape of a direct get's (the same ``Nats-*`` headers)."""
    headers: dict[str, str] = {}
    raw = base64.b64decode(stored.get("hdrs") or b"").decode()
    for line in raw.split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    headers.update({"Nats-Stream": stream, "Nats-Subject": stored["subject"], "Nats-Sequence": str(stored["seq"]),
                    "Nats-Time-Stamp": stored["time"]})
    return Msg(_client=nc, subject=stored["subject"], data=base64.b64decode(stored.get("data") or b""),
               headers=headers)


async def direct_get_first(nc: NATS, stream: str, subject: str, timeout: float = 5.0) -> Msg | None:
    """The first message on ``subject`` or ``None``."""
    msgs = await direct_get_subject(nc, stream, subject, batch=1, limit=1, timeout=timeout)
    return msgs[0] if msgs else None


async def direct_get_last(nc: NATS, stream: str, subject: str, timeout: float = 5.0,
                          min_last_seq: int = 0) -> Msg | None:
    """The last message on ``subject`` or ``None`` (direct get, served by any replica)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    req: dict[str, Any] = {"last_by_subj": subject}
    if min_last_seq:
        req["min_last_seq"] = min_last_seq
    while True:
        try:
            # Short attempts: a request routed to a replica that just died is never answered.
            msg = await (await requests_of(nc)).request(
                f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(req),
                timeout=max(0.05, min(1.0, deadline - loop.time())),
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            # No replica answers for a moment (e.g. a cluster just lost a node): wait for one.
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(_NO_RESPONDERS_RETRY_S)
            continue
        if server_status(msg) == "412" and loop.time() < deadline:
            await asyncio.sleep(_NO_RESPONDERS_RETRY_S)  # a replica behind min_last_seq
            continue
        break
    status = server_status(msg)
    if status == "404":
        return None
    if status is not None:
        raise RuntimeError(f"direct get of {subject!r} failed with status {status}")
    return msg


MULTI_LAST_MAX = 1000
"""Subjects :func:`direct_get_last_many` asks for in one request (nats-server refuses more than 1024)."""


async def direct_get_last_many(nc: NATS, stream: str, subjects: list[str], timeout: float = 5.0) -> dict[str, Msg]:
    """The last message of each of ``subjects`` that has one, by subject: one batch direct get
    (``multi_last``) per :data:`MULTI_LAST_MAX` subjects, served by any replica."""
    out: dict[str, Msg] = {}
    requests = await requests_of(nc)
    loop = asyncio.get_running_loop()
    for i in range(0, len(subjects), MULTI_LAST_MAX):
        chunk = subjects[i:i + MULTI_LAST_MAX]
        req = orjson.dumps({"multi_last": chunk, "batch": len(chunk)})
        deadline = loop.time() + timeout
        while True:
            try:
                got, status = await requests.batch(f"$JS.API.DIRECT.GET.{stream}", req,
                                                   max(0.05, min(2.0, deadline - loop.time())))
            except TimeoutError:
                if loop.time() >= deadline:
                    raise
                continue
            if status == 503 and not got and loop.time() < deadline:
                await asyncio.sleep(_NO_RESPONDERS_RETRY_S)  # no replica answers for a moment
                continue
            if status not in (204, 404):
                raise RuntimeError(f"direct get of the last messages of {len(chunk)} subjects failed with status "
                                   f"{status}")
            break
        for m in got:
            out[(m.headers or {}).get("Nats-Subject", m.subject)] = m
    return out


async def direct_get_seq(nc: NATS, stream: str, seq: int, timeout: float = 1.0) -> Msg | None:
    """The message stored at ``seq``, or ``None`` (not stored, or no replica answered in ``timeout``).

    A get by sequence costs the server the same however busy the stream is; a batch get
    by subject walks every message of other subjects between two of its own in a block.
    """
    try:
        msg = await (await requests_of(nc)).request(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps({"seq": seq}),
                                                    timeout=timeout)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return None
    return None if server_status(msg) is not None else msg


async def purge_subject(js: JetStreamContext, stream: str, subject: str) -> None:
    await js.purge_stream(stream, subject=subject)


async def increment(nc: NATS, subject: str, timeout: float = 5.0) -> int:
    """Add one to a JetStream counter (ADR-49) and return the new total."""
    msg = await nc.request(subject, b"", timeout=timeout, headers={"Nats-Incr": "+1"})
    resp: dict[str, Any] = orjson.loads(msg.data)
    if "error" in resp:
        try:
            nats.js.errors.APIError.from_error(resp["error"])
        except nats.js.errors.APIError:
            raise
    return int(resp["val"])
