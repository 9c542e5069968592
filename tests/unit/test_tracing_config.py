"""Tracing configuration from OTEL_* variables, and the trace-context helpers (no server)."""

from __future__ import annotations

import pytest
from opentelemetry.trace import SpanContext, TraceFlags

from actors.tracing import (
    Tracing,
    TracingConfigError,
    _otlp_exporter,
    derived_context,
    exporter_names,
    span_context_of,
)


def test_no_exporter_unless_asked_for() -> None:
    assert exporter_names({}) == []
    assert exporter_names({"OTEL_SERVICE_NAME": "x"}) == []
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == ["otlp"]
    assert exporter_names({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) == ["otlp"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "console, none"}) == ["console"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == []
    assert exporter_names({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}) == []


def test_bad_exporter_settings_name_the_variable_and_the_choices() -> None:
    with pytest.raises(TracingConfigError, match=r"OTEL_TRACES_EXPORTER='zipkin'.*'otlp', 'console' or 'none'"):
        exporter_names({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TracingConfigError, match=r"OTEL_EXPORTER_OTLP_PROTOCOL='http/json'.*'http/protobuf' or 'grpc'"):
        _otlp_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_tracing_is_off_without_a_provider() -> None:
    tracing = Tracing("bide")
    assert not tracing.enabled
    span = tracing.start_run("t", "r", "bide.work.t.r")
    assert span.traceparent is None
    span.end()


def test_a_run_without_a_starter_trace_gets_one_derived_from_its_id() -> None:
    ctx = derived_context("some-run")
    assert ctx == derived_context("some-run") and ctx != derived_context("other-run")
    assert ctx.trace_flags == TraceFlags.SAMPLED
    assert span_context_of("garbage") is None and span_context_of(None) is None
    parsed = span_context_of(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01")
    assert isinstance(parsed, SpanContext) and (parsed.trace_id, parsed.span_id) == (ctx.trace_id, ctx.span_id)
