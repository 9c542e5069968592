"""Span records encoded for OTLP: the same request the SDK's own encoder builds (no server)."""

from __future__ import annotations

import pickle
from typing import Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

from actors.observe.span_encoding import SpanEncoder, raw_sender
from actors.observe.span_export import readable_span

RESOURCE = {"service.name": "enc-test", "host.id": 7}


def _record(i: int, **over: Any) -> tuple[Any, ...]:
    fields: dict[str, Any] = {
        "name": f"process bide.work.T{i % 2}.{{run_id}}", "kind": 4, "trace_id": (7 << 100) + i, "span_id": 1000 + i,
        "flags": 1, "trace_state": None, "parent_id": 99, "parent_remote": True, "start": 1_700_000_000_000_000_000 + i,
        "end": 1_700_000_000_500_000_000 + i,
        "attrs": {"messaging.system": "nats", "bide.run_id": f"run-{i}", "bide.attempt": 1 + i % 3,
                  "bide.ok": i % 2 == 0, "bide.ratio": 0.5, "bide.keys": ["a", "b"], "bide.nums": (1, 2)},
        "links": [], "status_code": 0, "status_desc": None, "events": [], "scope_name": "bide",
        "scope_version": "0.1.0",
    }
    fields.update(over)
    return tuple(fields.values())


RECORDS = [
    _record(0),
    _record(1),  # the same repeating attributes, served from the cache
    _record(2, parent_id=0, parent_remote=False, kind=3, attrs={}),  # a root PRODUCER span without attributes
    _record(3, status_code=2, status_desc="ValueError: boom", trace_state=[("vendor", "x1"), ("other", "y")],
            events=[("exception", 1_700_000_000_100_000_000, {"exception.type": "ValueError"})],
            links=[((5 << 64) + 1, 77, 1, {"bide.event.key": "order:paid"})]),
    _record(4, scope_name="user-code", scope_version=None, parent_remote=False),
]


def _spans(body: bytes) -> list[dict[str, Any]]:
    request = ExportTraceServiceRequest.FromString(body)
    out = []
    for rs in request.resource_spans:
        resource = MessageToDict(rs.resource)
        for ss in rs.scope_spans:
            for span in ss.spans:
                d = MessageToDict(span)
                # Attributes are a map: their order on the wire means nothing.
                d["attributes"] = sorted(d.get("attributes", []), key=lambda a: a["key"])
                d["_resource"], d["_scope"] = resource, MessageToDict(ss.scope)
                out.append(d)
    return sorted(out, key=lambda d: d["spanId"])


def test_records_encode_as_the_sdk_encodes_the_same_spans() -> None:
    ours = _spans(SpanEncoder(RESOURCE).encode(RECORDS))
    scopes: dict[Any, Any] = {}
    resource = Resource(RESOURCE)
    theirs = _spans(encode_spans([readable_span(r, resource, scopes) for r in RECORDS]).SerializeToString())
    assert len(ours) == len(RECORDS)
    for mine, sdk in zip(ours, theirs, strict=True):
        assert mine == sdk


def test_an_integer_beyond_int64_is_sent_as_text_not_dropped() -> None:
    (span,) = _spans(SpanEncoder(RESOURCE).encode([_record(0, attrs={"big": 2**70})]))
    assert span["attributes"] == [{"key": "big", "value": {"stringValue": str(2**70)}}]


def test_records_survive_the_pipe_and_a_second_batch_uses_the_cache() -> None:
    encoder = SpanEncoder(RESOURCE)
    first = encoder.encode(pickle.loads(pickle.dumps(RECORDS)))
    for _ in range(2):
        assert _spans(encoder.encode(RECORDS)) == _spans(first)


def test_the_otlp_http_exporter_of_this_version_takes_request_bodies() -> None:
    # Bide's fast path hands bodies to the exporter's own HTTP client. If an upgrade of the
    # exporter removes it, spans still go out (as ReadableSpans), but this test says so.
    exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")
    try:
        assert raw_sender(exporter) is not None
    finally:
        exporter.shutdown()


def test_one_off_values_do_not_crowd_out_repeating_ones() -> None:
    encoder = SpanEncoder(RESOURCE)
    for i in range(3 * 8192):  # far more distinct run ids than the encoder keeps
        encoder.encode([_record(i, attrs={"bide.run_id": f"run-{i}"})])
    for _ in range(2):
        encoder.encode([_record(0, attrs={"bide.task": "Repeats"})])
    assert isinstance(encoder._seen["bide.task"]["Repeats"], bytes)
    assert sum(len(v) for v in encoder._seen.values()) <= 8192


def test_equal_numbers_of_different_types_keep_their_types() -> None:
    encoder = SpanEncoder(RESOURCE)
    got = []
    for i, v in enumerate([1, 1.0, True] * 3):  # from the second round on, from what was kept
        (span,) = _spans(encoder.encode([_record(i, attrs={"v": v})]))
        got.append(next(iter(span["attributes"][0]["value"].items())))
    assert got == [("intValue", "1"), ("doubleValue", 1.0), ("boolValue", True)] * 3
