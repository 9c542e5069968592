"""A real OTLP/HTTP trace receiver, run as its own process by tests and the tracing benchmark.

``python -m tests.otlp_receiver --port-file P [--out F]``: listens on a free loopback port
(written to ``P`` once it accepts), decodes every ``POST /v1/traces`` body as an
``ExportTraceServiceRequest`` protobuf (gzip if so encoded) and, with ``--out``, appends each
span to ``F`` as one JSON line in the shape of ``tests.apps.traced.span_record`` plus the
exporting process's ``service.name``. Without ``--out`` it keeps the request bodies and decodes
them only when asked how many spans came (``GET /count``): a benchmark's sink should not
compete for the CPU with what it measures.
"""

from __future__ import annotations

import argparse
import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status


def any_value(v: AnyValue) -> Any:
    field = v.WhichOneof("value")
    if field == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if field == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if field == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, field) if field else None


def span_dict(span: Span, service: str | None) -> dict[str, Any]:
    return {
        "name": span.name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_id": span.parent_span_id.hex() or None,
        "kind": Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
        "start": span.start_time_unix_nano,
        "end": span.end_time_unix_nano,
        "attributes": {a.key: any_value(a.value) for a in span.attributes},
        "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()} for link in span.links],
        "status": Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
        "service": service,
    }


def decode(body: bytes) -> list[dict[str, Any]]:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    spans = []
    for rs in req.resource_spans:
        attrs = {a.key: any_value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            spans.extend(span_dict(s, attrs.get("service.name")) for s in ss.spans)
    return spans


class Receiver(ThreadingHTTPServer):
    def __init__(self, out: Path | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.out = out
        self.count = 0
        self.pending: list[bytes] = []
        self.lock = threading.Lock()

    def counted(self) -> int:
        with self.lock:
            bodies, self.pending = self.pending, []
            self.count += sum(len(decode(b)) for b in bodies)
            return self.count


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        with self.server.lock:
            if self.server.out is None:
                self.server.pending.append(body)
            else:
                spans = decode(body)
                self.server.count += len(spans)
                with self.server.out.open("ab") as f:
                    f.writelines(orjson.dumps(s) + b"\n" for s in spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self) -> None:
        if self.path != "/count":
            self.send_error(404)
            return
        reply = str(self.server.counted()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port-file", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    server = Receiver(args.out)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.rename(args.port_file)  # appears whole, and only once the socket accepts
    server.serve_forever()


if __name__ == "__main__":
    main()
