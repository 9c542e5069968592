"""OTLP request bodies built straight from span records, for the exporter process.

The SDK's OTLP exporter encodes ``ReadableSpan`` objects attribute by attribute, about 80 µs
per span with the ``ReadableSpan`` itself; most of Bide's attributes repeat from span to span
(``messaging.system=nats``, the task, the activation kind). This encoder builds the same
``ExportTraceServiceRequest`` with the OpenTelemetry protobuf classes, from
:data:`~actors.observe.span_export.SpanRecord` tuples, and keeps the serialized form of each attribute
seen more than once: a span's repeating attributes are those pieces joined and merged in one
call (repeated fields concatenate on the protobuf wire). About 15 µs per span.

The request is sent by the SDK exporter's own HTTP client (endpoint, headers, TLS,
compression, retries all as ``OTEL_EXPORTER_OTLP_*`` say). :func:`raw_sender` finds it; an
exporter without one (another version, gRPC, console) is given ``ReadableSpan`` objects instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status

_HAS_IS_REMOTE = 0x100  # SpanFlags: the parent's remoteness is known ...
_IS_REMOTE = 0x200  # ... and it is remote
_INT64 = (-(2**63), 2**63 - 1)
_CACHE_SIZE = 8192
_UNSEEN: Any = object()


def any_value(value: Any) -> AnyValue:
    """An attribute value as OTLP carries it (unknown types as their ``str``)."""
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value) if _INT64[0] <= value <= _INT64[1] else AnyValue(string_value=str(value))
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, Mapping):
        return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=str(k), value=any_value(v))
                                                          for k, v in value.items()]))
    if isinstance(value, Sequence):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    return AnyValue(string_value=str(value))


class SpanEncoder:
    """Builds ``ExportTraceServiceRequest`` bodies for one resource."""

    def __init__(self, resource: Mapping[str, Any]) -> None:
        self._resource = Resource(attributes=[KeyValue(key=k, value=any_value(v)) for k, v in resource.items()])
        # attribute key -> value (numbers with their type: 1, 1.0 and True are equal keys)
        # -> None (seen once) or the attribute serialized as a Span field (seen again).
        self._seen: dict[str, dict[Any, bytes | None]] = {}
        self._seen_count = 0

    def _attributes(self, span: Span, attrs: Mapping[str, Any]) -> None:
        """Add ``attrs`` to ``span``: a value seen before as a kept piece, others one by one."""
        seen = self._seen
        pieces = []
        for key, value in attrs.items():
            t = type(value)
            if t is not str and t is not int and t is not float and t is not bool:
                span.attributes.add(key=key, value=any_value(value))  # a list or a map: not kept
                continue
            values = seen.get(key)
            if values is None:
                values = seen[key] = {}
            vk = value if t is str else (t, value)
            piece = values.get(vk, _UNSEEN)
            if piece is None:  # the second time: a repeating value, worth keeping encoded
                piece = values[vk] = Span(attributes=[KeyValue(key=key, value=any_value(value))]).SerializeToString()
            if piece is _UNSEEN:  # the first time (most run ids stop here)
                span.attributes.add(key=key, value=any_value(value))
                self._seen_count += 1
                if self._seen_count > _CACHE_SIZE:
                    # Full of one-off values: start again, so that values that do repeat
                    # (tasks, outcomes) are kept whatever came first.
                    seen.clear()
                    self._seen_count = 0
                else:
                    values[vk] = None
            else:
                pieces.append(piece)
        if pieces:
            span.MergeFromString(b"".join(pieces))  # repeated fields concatenate on the wire

    def encode(self, records: Sequence[tuple[Any, ...]]) -> bytes:
        """One request holding ``records`` (see :data:`actors.observe.span_export.SpanRecord`), serialized."""
        request = ExportTraceServiceRequest()
        resource_spans: ResourceSpans = request.resource_spans.add()
        resource_spans.resource.CopyFrom(self._resource)
        scopes: dict[tuple[str, str | None], Any] = {}
        for (name, kind, trace_id, span_id, _flags, trace_state, parent_id, parent_remote, start, end, attrs, links,
             status_code, status_desc, events, scope_name, scope_version) in records:
            scope = scopes.get((scope_name, scope_version))
            if scope is None:
                scope = scopes[(scope_name, scope_version)] = resource_spans.scope_spans.add(
                    scope=InstrumentationScope(name=scope_name, version=scope_version or ""))
            tid = trace_id.to_bytes(16, "big")
            span = scope.spans.add(
                trace_id=tid, span_id=span_id.to_bytes(8, "big"), name=name, kind=kind + 1,  # API kinds start at 0
                parent_span_id=parent_id.to_bytes(8, "big") if parent_id else b"",
                start_time_unix_nano=start, end_time_unix_nano=end,
                flags=_HAS_IS_REMOTE | (_IS_REMOTE if parent_remote else 0))  # as the SDK's encoder sets them
            if attrs:
                self._attributes(span, attrs)
            if trace_state:
                span.trace_state = ",".join(f"{k}={v}" for k, v in trace_state)
            if status_code:
                span.status.CopyFrom(Status(code=status_code, message=status_desc or ""))
            else:
                span.status.SetInParent()  # present and UNSET, as the SDK's encoder sends it
            for ev_name, ev_time, ev_attrs in events:
                span.events.add(name=ev_name, time_unix_nano=ev_time,
                                attributes=[KeyValue(key=k, value=any_value(v)) for k, v in ev_attrs.items()])
            for l_trace, l_span, _l_flags, l_attrs in links:
                span.links.add(trace_id=l_trace.to_bytes(16, "big"), span_id=l_span.to_bytes(8, "big"),
                               flags=_HAS_IS_REMOTE | _IS_REMOTE,
                               attributes=[KeyValue(key=k, value=any_value(v)) for k, v in l_attrs.items()])
        body: bytes = request.SerializeToString()
        return body


def raw_sender(exporter: Any) -> Callable[[bytes], bool] | None:
    """The SDK OTLP/HTTP exporter's own client as ``send(body) -> ok``, if this version has one."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        return None
    client: Any = getattr(exporter, "_client", None)
    if not isinstance(exporter, OTLPSpanExporter) or not callable(getattr(client, "export", None)):
        return None

    def send(body: bytes) -> bool:
        return bool(client.export(body).success)

    return send


__all__ = ["SpanEncoder", "any_value", "raw_sender"]
