"""The router's index of pending waits: by event key, scope and one equality predicate.

Pure (no I/O): the event router holds one :class:`WaitIndex` per owned partition, and
the matching benchmark drives it without a server. An event costs O(candidates), not
O(all waits).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg

from actors.engine.wire import HDR_EVENT_METADATA, TRACEPARENT, WaitRegistration, event_id_of
from sdk import _cel
from sdk.errors import EventPayloadError, PayloadLimitError
from sdk.limits import DEFAULT_LIMITS, PayloadLimits, check_payload


class PendingWaitEntry:
    """One event condition of one wait, as the router holds it (small: it may hold millions)."""

    __slots__ = (
        "cid",
        "complete",
        "cond",
        "expression",
        "index_key",
        "key",
        "more_preds",
        "run_id",
        "run_input",
        "scope",
        "seq",
        "task",
    )

    def __init__(self, reg: WaitRegistration, seq: int) -> None:
        self.cid = f"{reg.wait_id}/{reg.cond}"
        self.cond = reg.cond
        self.run_id = reg.run_id
        self.task = sys.intern(reg.task)
        self.key = sys.intern(reg.event_key)
        self.scope = None if reg.scope is None else sys.intern(reg.scope)
        preds, self.complete = _cel.equality_predicates(reg.expression)
        # Only what matching reads is kept: an expression of equality predicates alone is checked
        # through them, so neither its text nor the run's input is held (waits may be millions).
        self.expression = None if self.complete else reg.expression
        self.run_input = None if self.complete else reg.run_input
        self.index_key: tuple[_cel.Path, _cel.IndexValue] | None = _shared(preds[0]) if preds else None
        # Kept here, not looked up again: the parse cache is bounded and waits are many.
        self.more_preds = preds[1:] or None
        self.seq = seq

    @property
    def wait_id(self) -> str:
        return self.cid.rpartition("/")[0]

    def matches(self, payload: Any) -> bool:
        if self.complete:
            # The expression is only equality predicates: checking them is evaluating it, ~100x cheaper.
            preds = ([self.index_key] if self.index_key is not None else []) + list(self.more_preds or ())
            for path, value in preds:
                try:
                    if _cel.index_value(_cel.lookup(payload, path)) != value:
                        return False
                except KeyError:
                    return False
            return True
        return _cel.evaluate(self.expression, payload, self.run_input)


_PATHS: dict[Any, Any] = {}
"""Index keys' paths, one object per distinct path (``("userId",)`` is shared by a million waits)."""


def _shared(index_key: tuple[_cel.Path, _cel.IndexValue]) -> tuple[_cel.Path, _cel.IndexValue]:
    path, value = index_key
    return _PATHS.setdefault(path, path), value


_Group = PendingWaitEntry | dict[str, PendingWaitEntry]
"""The waits with one indexed value: most often exactly one, kept without a dict around it."""


class _Bucket:
    """The waits for one (key, scope): by one equality predicate each, or scanned."""

    __slots__ = ("by_value", "count", "scan")

    def __init__(self) -> None:
        self.by_value: dict[_cel.Path, dict[_cel.IndexValue, _Group]] = {}
        self.scan: dict[str, PendingWaitEntry] = {}
        self.count = 0

    def add(self, w: PendingWaitEntry) -> None:
        if w.index_key is None:
            if w.cid not in self.scan:
                self.count += 1
            self.scan[w.cid] = w
            return
        path, value = w.index_key
        values = self.by_value.setdefault(path, {})
        group = values.get(value)
        if group is None or (isinstance(group, PendingWaitEntry) and group.cid == w.cid):
            self.count += group is None
            values[value] = w
        elif isinstance(group, PendingWaitEntry):
            values[value] = {group.cid: group, w.cid: w}
            self.count += 1
        else:
            self.count += w.cid not in group
            group[w.cid] = w

    def remove(self, w: PendingWaitEntry) -> None:
        if w.index_key is None:
            if self.scan.pop(w.cid, None) is not None:
                self.count -= 1
            return
        path, value = w.index_key
        values = self.by_value.get(path)
        if values is None:
            return
        group = values.get(value)
        if isinstance(group, PendingWaitEntry):
            if group.cid == w.cid:
                del values[value]
                self.count -= 1
        elif group is not None and group.pop(w.cid, None) is not None:
            self.count -= 1
            if len(group) == 1:
                values[value] = next(iter(group.values()))
        if not values:
            del self.by_value[path]

    def candidates(self, payload: Any) -> Iterator[PendingWaitEntry]:
        yield from list(self.scan.values())
        for path, values in list(self.by_value.items()):
            try:
                tagged = _cel.index_value(_cel.lookup(payload, path))
            except KeyError:
                continue
            group = values.get(tagged) if tagged is not None else None
            if isinstance(group, PendingWaitEntry):
                yield group
            elif group is not None:
                yield from list(group.values())

    def __len__(self) -> int:
        return self.count


class WaitIndex:
    """Pending waits by event key, scope and one equality predicate: an event costs O(candidates)."""

    def __init__(self) -> None:
        self.by_cid: dict[str, PendingWaitEntry] = {}
        self._buckets: dict[tuple[str, str | None], _Bucket] = {}

    def __len__(self) -> int:
        return len(self.by_cid)

    def add(self, w: PendingWaitEntry) -> None:
        if w.cid in self.by_cid:
            return
        self.by_cid[w.cid] = w
        self._buckets.setdefault((w.key, w.scope), _Bucket()).add(w)

    def remove(self, cid: str) -> PendingWaitEntry | None:
        w = self.by_cid.pop(cid, None)
        if w is not None:
            bucket = self._buckets.get((w.key, w.scope))
            if bucket is not None:
                bucket.remove(w)
                if not len(bucket):
                    del self._buckets[(w.key, w.scope)]
        return w

    def matches(
        self, key: str, scope: str | None, payload: Any,
        on_error: Callable[[PendingWaitEntry, Exception], None] | None = None,
    ) -> list[PendingWaitEntry]:
        """Waits satisfied by an event: same key; same scope, or a wait without scope.

        An expression that raises on this payload (an integer CEL cannot hold) does not
        match; ``on_error`` hears of it, and the other candidates are still checked.
        """
        out: list[PendingWaitEntry] = []
        for bucket_scope in (scope, None) if scope is not None else (None,):
            bucket = self._buckets.get((key, bucket_scope))
            if bucket is None:
                continue
            for w in bucket.candidates(payload):
                try:
                    if w.matches(payload):
                        out.append(w)
                except Exception as e:
                    if on_error is None:
                        raise
                    on_error(w, e)
        return out

    def clear(self) -> None:
        self.by_cid.clear()
        self._buckets.clear()


@dataclass(frozen=True)
class IncomingEvent:
    key: str
    scope: str | None
    payload: Any
    event_id: str
    seq: int
    at: datetime
    meta: dict[str, Any]


def decode_event(msg: Msg, key: str, scope: str | None, seq: int, at: datetime,
                 limits: PayloadLimits = DEFAULT_LIMITS) -> IncomingEvent:
    """An event as published by anyone (``nats pub``, the SDK, HTTP): a JSON body, optional headers.

    A body that is not JSON (a raw ``nats pub`` of plain text) becomes a string payload. The
    SDK and the HTTP API check limits before publishing; a raw publish is checked here, and
    one over a limit raises :class:`sdk.errors.PayloadLimitError` (the router records it).
    """
    try:
        payload = check_payload(msg.data, limits, f"event {seq} on key {key!r}")
    except EventPayloadError:
        payload = msg.data.decode("utf-8", errors="replace")
    hdrs = msg.headers or {}
    meta: dict[str, Any] = {}
    if HDR_EVENT_METADATA in hdrs:
        # Metadata is a JSON object within the limits, like the SDK sends; anything else from a raw
        # publish is dropped (a JSON array of pairs made a dict with integer keys, which no signal
        # holds), the event kept: its payload is what waits are for.
        try:
            loaded = check_payload(hdrs[HDR_EVENT_METADATA].encode(), limits, f"the metadata of event {seq}")
        except (EventPayloadError, PayloadLimitError):
            loaded = None
        meta = loaded if isinstance(loaded, dict) else {}
    if TRACEPARENT in hdrs:
        meta[TRACEPARENT] = hdrs[TRACEPARENT]
    event_id = event_id_of(hdrs, seq)
    return IncomingEvent(key, scope, payload, event_id, seq, at, meta)
