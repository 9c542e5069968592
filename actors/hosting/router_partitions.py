"""The event router's partitions on one host: a candidate for each, owners spread over the hosts that are up.

Every host that routes runs a candidate (:class:`actors.hosting.router.EventRouter`) for each of the
store's N partitions; JetStream pins one candidate per partition (ADR-42), never this code.
What this module decides is only *whether a candidate asks*:

- Each host publishes, once a second, a record of the partitions it owns on
  ``<prefix>.router.host.<host>`` (stream ``<PREFIX>_ROUTER``, the last message per
  subject), and each owner publishes ``<prefix>.router.partition.<p>``: its host id, its pin
  id and its pending wait count. ``bide status`` reads both and the consumers' pinned ids.
- The hosts up are those whose record is at most a few seconds older than the newest one (the
  server's timestamps, so hosts' clocks do not matter). A host owning at least its fair share,
  ceil(N / hosts), holds back from pulling further partitions, unless the partition's consumer
  has no pinned client at all (its owner left or died): then everyone asks and JetStream picks.
  A host owning more than its fair share while another owns less releases one partition (unpin,
  between batches) every few seconds, so a host that joins gets work.
- A host that stops unpins its partitions at once, and publishes a record without them.
- Each host also advertises the shape of every workflow it serves on
  ``<prefix>.router.shape.<workflow>.<host>``, every :data:`SHAPES_EVERY_S` seconds: the web UI
  draws a workflow run's DAG from the advertisement of a host that is up (it imports no user code).

Correctness never depends on any of this: a partition with two candidates asking, or none for
a moment, is still owned by at most one pinned process and handled in order from its checkpoint.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from actors.engine.wire import parse_time, partition_of
from actors.hosting.router import EventRouter
from actors.observe.tracing import Tracing
from actors.store.history import HistoryLog
from actors.store.jetstream import (
    Layout,
    api_request,
    check_router_partitions,
    direct_get_subject,
    is_transient,
    stream_names,
)
from actors.store.requests import Publisher
from sdk.limits import DEFAULT_LIMITS, PayloadLimits

log = logging.getLogger("bide.router")

STATUS_INTERVAL_S = 1.0
HOST_FRESH_S = 4.0
"""A host whose record is this much older than the newest is taken to be gone."""
SHAPES_EVERY_S = 20.0
"""How often a host sends its workflows' shapes again: well within the status stream's max age
(60 s), so a live host's shapes are always there to read."""
_RELEASE_EVERY_S = 3.0
_RELEASE_HOLD_S = 6.0
"""A released partition is not asked for again by the same host for this long."""
_PIN_CHECK_S = 0.5
_TRIGGER_CLEANUP_S = 5.0


class RouterPartitions:
    """This host's candidates for every router partition, and the views the rest of the host uses."""

    def __init__(self, nc: NATS, publisher: Publisher, layout: Layout, history: HistoryLog,
                 tracing: Tracing | None = None, limits: PayloadLimits = DEFAULT_LIMITS, *,
                 host_id: str = "", describe: Callable[[], dict[str, Any]] | None = None,
                 shapes: dict[str, dict[str, Any]] | None = None) -> None:
        self._nc = nc
        self._describe = describe
        """What the host says of itself in its status record (its tasks, turns, slots in use)."""
        self._shapes = shapes or {}
        """The shape of each workflow it serves (:func:`actors.engine.dag.workflow_shape`), by name."""
        self._pub = publisher
        self._layout = layout
        self._s = layout.subjects
        self._history = history
        self._tracing = tracing
        self._limits = limits
        self.host_id = host_id
        self.parts: list[EventRouter] = []
        self.hosts_up = 1
        self._others_owning: dict[str, int] = {}
        self._pins: dict[int, tuple[float, bool]] = {}
        self._hold_until: dict[int, float] = {}
        self._last_release = 0.0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> RouterPartitions:
        n = await check_router_partitions(self._nc, self._layout)
        self.parts = [
            EventRouter(self._nc, self._pub, self._layout, self._history, self._tracing, self._limits,
                        partition=p, partitions=n, may_pull=self._may_pull)
            for p in range(n)
        ]
        for part in self.parts:
            await part.start()
        self._task = asyncio.create_task(self._status_loop(), name="bide-router-status")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5.0)
        await asyncio.gather(*(part.stop() for part in self.parts))
        try:
            await self._publish_host([], up=False)  # seen as gone at once
        except Exception as e:
            log.debug("router: last status record failed: %s", e)

    # -- views -----------------------------------------------------------------------------

    @property
    def partitions(self) -> int:
        return len(self.parts)

    def for_key(self, key: str) -> EventRouter:
        """The partition candidate that handles events and waits of ``key``."""
        return self.parts[partition_of(key, len(self.parts))]

    def owned(self) -> list[int]:
        return [p.partition for p in self.parts if p.owner]

    @property
    def index(self) -> _AllWaits:
        """Every pending wait held here, over the owned partitions."""
        return _AllWaits(self.parts)

    @property
    def events_routed(self) -> int:
        return sum(p.events_routed for p in self.parts)

    @property
    def rejected(self) -> int:
        return sum(p.rejected for p in self.parts)

    # -- spreading ---------------------------------------------------------------------------

    async def _may_pull(self, part: EventRouter) -> bool:
        now = time.monotonic()
        if now < self._hold_until.get(part.partition, 0.0):
            return False
        fair = math.ceil(len(self.parts) / max(1, self.hosts_up))
        if len(self.owned()) < fair:
            return True
        # Our share is taken: ask only for a partition nobody holds (its owner stopped or died).
        checked, pinned = self._pins.get(part.partition, (0.0, True))
        if now - checked >= _PIN_CHECK_S:
            try:
                info = await api_request(
                    self._nc, f"$JS.API.CONSUMER.INFO.{self._s.events_stream}.{part.consumer}", {}, timeout=2.0)
                pinned = any(g.get("pinned_client_id") for g in info.get("priority_groups") or [])
            except Exception as e:
                if not is_transient(e):
                    raise
                pinned = False  # cannot tell: ask (JetStream still pins one)
            self._pins[part.partition] = (now, pinned)
        return not pinned

    async def _rebalance(self) -> None:
        """Release one partition if this host holds more than its share while another holds less."""
        owned = self.owned()
        n, hosts = len(self.parts), max(1, self.hosts_up)
        fair, least = math.ceil(n / hosts), n // hosts
        if time.monotonic() - self._last_release < _RELEASE_EVERY_S or len(self._others_owning) < hosts - 1:
            return  # just released one, or not every host up has said what it owns yet
        starved = any(k < least for k in self._others_owning.values())
        if not (len(owned) > fair or (len(owned) > least and starved)) or not starved:
            return
        p = owned[-1]
        self._last_release = time.monotonic()
        self._hold_until[p] = self._last_release + _RELEASE_HOLD_S
        log.info("router partition %d released: this host owned %d of %d with %d hosts up", p, len(owned), n, hosts)
        await self.parts[p].release()

    # -- status ------------------------------------------------------------------------------

    async def _status_loop(self) -> None:
        last_cleanup = last_shapes = 0.0
        while True:
            try:
                await self._publish_host(self.owned())
                if time.monotonic() - last_shapes >= SHAPES_EVERY_S:
                    await self._publish_shapes()
                    last_shapes = time.monotonic()
                for part in self.parts:
                    if part.owner:
                        await self._publish_partition(part)
                await self._read_hosts()
                await self._rebalance()
                if time.monotonic() - last_cleanup >= _TRIGGER_CLEANUP_S:
                    last_cleanup = time.monotonic()
                    await self._clean_triggers()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("router status: %s", e)
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def _publish_host(self, owned: list[int], *, up: bool = True) -> None:
        about = self._describe() if self._describe is not None and up else {}
        body = orjson.dumps({**about, "host": self.host_id, "up": up, "owns": owned, "partitions": len(self.parts)})
        await self._pub.publish(self._s.router_host_status(self.host_id), body)

    async def _publish_shapes(self) -> None:
        """Each workflow's shape, on its own subject: it changes only with a deployment, so it is sent
        far less often than the host record (which says whether the host is up), never on a run's path."""
        for name, shape in self._shapes.items():
            await self._pub.publish(self._s.router_workflow_shape(name, self.host_id),
                                    orjson.dumps({**shape, "host": self.host_id}))

    async def _publish_partition(self, part: EventRouter) -> None:
        body = orjson.dumps({"partition": part.partition, "host": self.host_id, "pin": part.pin,
                             "waits": len(part.index), "handled_seq": part.handled_seq,
                             "rebuild_s": round(part.rebuild_s, 3)})
        await self._pub.publish(self._s.router_partition_status(part.partition), body)

    async def _read_hosts(self) -> None:
        records = await read_status(self._nc, self._layout, "host")
        if not records:
            return
        newest = max(r["_ts"] for r in records)
        up = [r for r in records if newest - r["_ts"] <= HOST_FRESH_S and r.get("up", True)]
        self.hosts_up = max(1, len({r["host"] for r in up} | {self.host_id}))
        self._others_owning = {r["host"]: len(r.get("owns") or []) for r in up if r["host"] != self.host_id}

    async def _clean_triggers(self) -> None:
        """Older trigger registrations leave the stream once every partition has passed their replacement."""
        mine = [p for p in self.parts if p.owner and p.superseded]
        if not mine:
            return
        # Where each partition's next owner would start reading: an ack floor can run ahead of the
        # checkpoint, and an owner that starts below a replacement still needs the older one (the
        # chaos run lost a triggered run that way: the registration went, its event was handled again).
        floors = [(await part.start_point())[0] for part in self.parts]
        for part in mine:
            await part.delete_superseded(min(floors))


class _AllWaits:
    """Pending waits over the owned partitions (what tests and ``bide status`` count)."""

    def __init__(self, parts: list[EventRouter]) -> None:
        self._parts = parts

    @property
    def by_cid(self) -> collections.ChainMap[str, Any]:
        return collections.ChainMap(*(p.index.by_cid for p in self._parts))

    def __len__(self) -> int:
        return sum(len(p.index) for p in self._parts)


async def read_status(nc: NATS, layout: Layout, kind: str) -> list[dict[str, Any]]:
    """The last record of every host (``kind="host"``) or partition (``"partition"``), with ``_ts`` (server time)."""
    s = layout.subjects
    out = []
    for m in await direct_get_subject(nc, s.router_status_stream, f"{s.prefix}.router.{kind}.>", timeout=5.0):
        try:
            rec = dict(orjson.loads(m.data))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            continue
        rec["_ts"] = _server_time((m.headers or {}).get("Nats-Time-Stamp", ""))
        out.append(rec)
    return out


def _server_time(raw: str) -> float:
    return parse_time(raw).timestamp()


async def deployment_status(nc: NATS, layout: Layout) -> dict[str, Any]:
    """What ``bide status`` prints: the server, the streams (leader, replicas), the hosts up, the router's partitions.

    A partition's owner is the host whose record carries the pin id JetStream reports as pinned,
    so a dead host's stale record never shows as the owner.
    """
    s = layout.subjects
    info = nc._server_info  # what the server said on connect
    out: dict[str, Any] = {
        "server": {"name": info.get("server_name"), "version": info.get("version"), "cluster": info.get("cluster"),
                   "connect_urls": info.get("connect_urls") or []},
        "streams": [],
        "hosts": [],
        "router": [],
    }
    for name in stream_names(layout):  # every stream, the one list the readiness probe checks too
        try:
            st = await api_request(nc, f"$JS.API.STREAM.INFO.{name}", {})
        except Exception as e:
            out["streams"].append({"name": name, "error": str(e)})
            continue
        cluster = st.get("cluster") or {}
        out["streams"].append({
            "name": name, "messages": st.get("state", {}).get("messages"),
            "replicas": st.get("config", {}).get("num_replicas"), "leader": cluster.get("leader"),
            "followers": [{"name": r.get("name"), "current": r.get("current")} for r in cluster.get("replicas") or []],
        })
    hosts = await read_status(nc, layout, "host")
    newest = max((r["_ts"] for r in hosts), default=0.0)
    out["hosts"] = sorted(({k: v for k, v in r.items() if k != "_ts"} for r in hosts
                           if r.get("up", True) and newest - r["_ts"] <= HOST_FRESH_S), key=lambda r: r["host"])
    records = {int(r["partition"]): r for r in await read_status(nc, layout, "partition")}
    p = 0
    while True:
        try:
            ci = await api_request(nc, f"$JS.API.CONSUMER.INFO.{s.events_stream}.{s.router_consumer(p)}", {})
        except Exception:
            break
        pinned = next((g.get("pinned_client_id") for g in ci.get("priority_groups") or []), None)
        rec = records.get(p, {})
        owned = bool(pinned) and rec.get("pin") == pinned
        out["router"].append({
            "partition": p, "owner": rec.get("host") if owned else None, "pinned": bool(pinned),
            "pending_waits": rec.get("waits") if owned else None,
            "checkpoint": ci.get("ack_floor", {}).get("stream_seq"), "unhandled": ci.get("num_pending"),
            "in_flight": ci.get("num_ack_pending"),
        })
        p += 1
    return out
