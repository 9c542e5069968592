"""Which OTLP span exporter the standard ``OTEL_*`` variables ask for (used in-process and by the export pipe)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class TracingConfigError(ValueError):
    """An ``OTEL_*`` variable asks for something Bide cannot set up (names the variable and value)."""



def otlp_exporter_class(env: Mapping[str, str]) -> Any:
    """The SDK's OTLP span exporter class for ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``."""
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip()
    if protocol == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise TracingConfigError("OTLP export is configured (OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP_ENDPOINT) "
                                     "but the exporter is not installed: pip install 'bide[otlp]'") from None
        return OTLPSpanExporter
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            raise TracingConfigError("OTEL_EXPORTER_OTLP_PROTOCOL='grpc' needs the gRPC exporter: "
                                     "pip install opentelemetry-exporter-otlp-proto-grpc") from None
        return GrpcExporter
    raise TracingConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected 'http/protobuf' or 'grpc'")
