"""Tracing configuration from OTEL_* variables, and the trace-context helpers (no server)."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanContext, TraceFlags

from actors.observe.tracing import (
    Tracing,
    TracingConfigError,
    configure_from_env,
    derived_context,
    exporter_names,
    extract_context,
    otlp_exporter_class,
    span_context_of,
    traceparent_of,
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
        otlp_exporter_class({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


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


def test_bad_span_export_settings_name_the_variable() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    with pytest.raises(TracingConfigError, match=r"BIDE_SPAN_EXPORT='fork'.*'process' or 'thread'"):
        configure_from_env({**env, "BIDE_SPAN_EXPORT": "fork"})
    with pytest.raises(TracingConfigError, match=r"OTEL_BSP_MAX_QUEUE_SIZE='lots'.*positive whole number"):
        configure_from_env({**env, "OTEL_BSP_MAX_QUEUE_SIZE": "lots"})


@pytest.mark.parametrize("value", [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future",
    " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 ",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
    "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
    "00-0x f7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "",
])
def test_traceparent_parsing_agrees_with_the_w3c_propagator(value: str) -> None:
    reference = trace.get_current_span(extract_context(value)).get_span_context()
    ours = span_context_of(value)
    if not reference.is_valid:
        assert ours is None
    else:
        assert ours is not None
        assert (ours.trace_id, ours.span_id, ours.trace_flags) == (reference.trace_id, reference.span_id,
                                                                   reference.trace_flags)
        assert traceparent_of(ours) == f"00-{ours.trace_id:032x}-{ours.span_id:016x}-{int(ours.trace_flags):02x}"


_LATE_PROVIDER = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from actors.observe.tracing import Tracing

tracing = Tracing("bide")
assert not tracing.enabled
assert tracing.start_run("T", "r1", "bide.work.T.r1").traceparent is None
trace.set_tracer_provider(TracerProvider())
assert tracing.enabled
assert tracing.start_run("T", "r2", "bide.work.T.r2").traceparent is not None
"""

_ENV_PROVIDER = """
from actors.observe.tracing import Tracing
assert Tracing("bide").enabled
"""


@pytest.mark.parametrize("script,env", [
    (_LATE_PROVIDER, {}),
    # The OpenTelemetry API builds the global provider from this variable on its first lookup.
    (_ENV_PROVIDER, {"OTEL_PYTHON_TRACER_PROVIDER": "sdk_tracer_provider"}),
], ids=["set-after-the-client", "named-by-environment"])
def test_a_global_provider_turns_tracing_on_whenever_it_appears(script: str, env: dict[str, str]) -> None:
    # A fresh interpreter each: the global provider can be set once per process.
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", script], env={**environ, **env}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
