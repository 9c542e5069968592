"""OpenTelemetry tracing: one trace per run, across activations, evictions, hosts and children.

Whoever starts a run (the SDK, the event router for ``on_events``, a parent run) opens a
PRODUCER span and writes its W3C ``traceparent`` into the run's first history entry. Every
activation, on any host, reads it back and becomes a CONSUMER span under it, so every span of
the run shares one trace id however many hosts and crashes it crosses. A run started with no
trace context still gets one trace: its id is derived from the run id.

Nothing is held open across an eviction. A sleep or a wait is emitted as one span, with its
real start and end, by the turn that writes its end into the history. Only entries a turn
*writes* produce spans, never entries it replays, so replay is silent.

With no tracer provider (none given, no global one, no ``OTEL_*`` exporter configured), every
call here returns at its first check: tracing costs a few attribute reads per turn.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from actors.engine.wire import TERMINAL, TRACEPARENT, AttemptFailed, RunFailed
from actors.observe.otlp import TracingConfigError, otlp_exporter_class

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from actors.engine.wire import EventSignal, HistoryEntry, RunStarted, WaitRegistered, WaitResolved

log = logging.getLogger("bide.tracing")


_PROPAGATOR = TraceContextTextMapPropagator()
_INSTRUMENTATION = "bide"


# -- configuration from OTEL_* ---------------------------------------------------------------------

_env_configured = False


def _is_unset(provider: Any) -> bool:
    return isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


_GLOBAL_SLOT = hasattr(trace, "_TRACER_PROVIDER")
"""Whether this OpenTelemetry API keeps its global provider in ``trace._TRACER_PROVIDER``.

``trace.get_tracer_provider()`` looks ``OTEL_PYTHON_TRACER_PROVIDER`` up in ``os.environ`` on every
call while no provider is set: with tracing off, that lookup was a few percent of a host's CPU
per trivial run. Where the slot exists, "still off" is one attribute read."""


def _global_provider_unset(env_names_provider: bool) -> bool:
    """Whether no global tracer provider is set yet (cheaply, where the API allows it)."""
    if _GLOBAL_SLOT and not env_names_provider:
        return trace._TRACER_PROVIDER is None
    return _is_unset(trace.get_tracer_provider())


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """The exporters ``OTEL_TRACES_EXPORTER`` asks for; an OTLP endpoint alone means ``otlp``.

    Unlike the OpenTelemetry default (``otlp``), nothing is exported unless asked for: a
    machine with no collector does not pay for spans nobody reads.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    for n in names:
        if n not in ("otlp", "console", "none"):
            raise TracingConfigError(f"OTEL_TRACES_EXPORTER={raw!r}: unknown exporter {n!r}; "
                                     "expected a comma-separated list of 'otlp', 'console' or 'none'")
    return [n for n in names if n != "none"]


SPAN_EXPORT = "BIDE_SPAN_EXPORT"
"""Where spans are encoded and sent: ``process`` (default, a child process) or ``thread`` (the SDK's own
batch processor inside this process)."""

_light_tracers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
"""The light tracer of each provider that :func:`provider_from_env` made in ``process`` mode."""


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise TracingConfigError(f"{name}={raw!r}: expected a positive whole number")
    return value


def provider_from_env(env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A tracer provider that exports as ``OTEL_*`` asks (``None`` if no exporter is asked for).

    Honours the SDK's own variables: ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` and ``OTEL_EXPORTER_OTLP_*``.

    By default (``BIDE_SPAN_EXPORT=process``) spans are encoded and sent by a child process
    (:mod:`actors.observe.span_export`), and Bide's own spans are light ones (:mod:`actors.observe.spans`):
    the host's event loop pays a few microseconds per span, not a few hundred.
    ``BIDE_SPAN_EXPORT=thread`` keeps everything in this process, with the SDK's batch processor.
    ``env`` defaults to ``os.environ``; the SDK reads the resource and the sampler from ``os.environ``.
    """
    env = os.environ if env is None else env
    names = exporter_names(env)
    if not names:
        return None
    mode = env.get(SPAN_EXPORT, "process").strip().lower() or "process"
    if mode not in ("process", "thread"):
        raise TracingConfigError(f"{SPAN_EXPORT}={env[SPAN_EXPORT]!r}: expected 'process' or 'thread'")
    interval_s = _int_env(env, "OTEL_BSP_SCHEDULE_DELAY", 200) / 1000
    max_queue = _int_env(env, "OTEL_BSP_MAX_QUEUE_SIZE", 65_536)
    max_batch = _int_env(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporter_classes = [otlp_exporter_class(env) if n == "otlp" else ConsoleSpanExporter for n in names]
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "bide"}))
    provider = SdkTracerProvider(resource=resource)
    if mode == "thread":
        for cls in exporter_classes:
            provider.add_span_processor(BatchSpanProcessor(cls()))
    else:
        from actors.observe.span_export import ExportPipe, PipeSpanProcessor
        from actors.observe.spans import LightTracer

        pipe = ExportPipe(names, resource.attributes, env=env, interval_s=interval_s, max_queue=max_queue,
                          max_batch=max_batch)
        provider.add_span_processor(PipeSpanProcessor(pipe))  # the application's own spans
        _light_tracers[provider] = LightTracer(pipe, provider.sampler, _INSTRUMENTATION, _version())
    log.info("tracing: exporting spans with %s (%s)", ", ".join(names), mode)
    return provider


def configure_from_env(env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Install :func:`provider_from_env` as the global tracer provider, once per process.

    Does nothing if the application set a global provider itself (its choice wins) or no
    exporter is asked for.
    """
    global _env_configured
    if _env_configured or not _is_unset(trace.get_tracer_provider()):
        return None
    provider = provider_from_env(env)
    if provider is not None:
        trace.set_tracer_provider(provider)
        _env_configured = True
    return provider


@functools.cache
def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bide")
    except PackageNotFoundError:
        return None


def _tracer_of(provider: TracerProvider) -> Tracer:
    light = _light_tracers.get(provider)
    if light is not None:
        return cast("Tracer", light)
    return provider.get_tracer(_INSTRUMENTATION, _version())


# -- trace context helpers -------------------------------------------------------------------------

def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000_000)


_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def span_context_of(traceparent: str | None) -> SpanContext | None:
    """The span context a W3C ``traceparent`` value names, or ``None`` if it is missing or malformed."""
    if not traceparent:
        return None
    m = _TRACEPARENT_RE.fullmatch(traceparent.strip())
    if m is None:
        return None
    version, trace_hex, span_hex, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):  # version 00 has exactly four fields
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(flags, 16)))


def traceparent_of(ctx: SpanContext) -> str:
    """The W3C ``traceparent`` value of a span context."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def extract_context(traceparent: str) -> Context:
    """The OpenTelemetry context a ``traceparent`` header value carries (empty if malformed)."""
    return _PROPAGATOR.extract({TRACEPARENT: traceparent})


def derived_context(run_id: str) -> SpanContext:
    """A run's trace when no one gave it one: ids derived from the run id, the same on every host."""
    digest = hashlib.sha256(run_id.encode()).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:24], "big") or 1
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def trace_id_of(started: RunStarted) -> str:
    """The run's trace id in hex, the id to search for in a trace backend."""
    ctx = span_context_of(started.meta.get(TRACEPARENT)) or derived_context(started.run_id)
    return f"{ctx.trace_id:032x}"


def _messaging(operation: str, subject: str) -> dict[str, Any]:
    # The destination template is the span's name; the real subject is an attribute.
    return {
        "messaging.system": "nats",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": subject,
    }


def _clean(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v is not None}


class ProducerSpan:
    """A PRODUCER span around one publish; :attr:`traceparent` goes into the message.

    ``end()`` once the message is durable. A publish that turns out to be a repeat (a run
    that already existed) calls ``discard()``: the span is never ended, so never exported.
    """

    def __init__(self, span: Span | None) -> None:
        self._span = span
        self.traceparent: str | None = None
        if span is not None:
            ctx = span.get_span_context()
            self.traceparent = traceparent_of(ctx) if ctx.is_valid else None

    def end(self) -> None:
        if self._span is not None:
            self._span.end()
            self._span = None

    def fail(self, exc: BaseException) -> None:
        if self._span is not None:
            self._span.record_exception(exc)
            self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            self.end()

    def discard(self) -> None:
        self._span = None


_NO_SPAN = ProducerSpan(None)


class Tracing:
    """The spans one Bide client or actor host emits.

    Args:
        prefix: the deployment's subject prefix (span names are destination templates).
        provider: a tracer provider; default the global one (which may be set later, or
            from ``OTEL_*`` by :func:`configure_from_env`).
    """

    def __init__(self, prefix: str, provider: TracerProvider | None = None) -> None:
        self.prefix = prefix
        self._provider = provider
        self._on = provider is not None
        self._tracer: Tracer = _tracer_of(provider) if provider is not None else trace.NoOpTracer()
        self._templates: dict[str, str] = {}
        self._env_provider = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ

    @property
    def enabled(self) -> bool:
        # A global provider, once set, stays set: only "off" is looked up again.
        if not self._on and not _global_provider_unset(self._env_provider):
            provider = trace.get_tracer_provider()
            if not _is_unset(provider):
                self._tracer = _tracer_of(provider)
                self._on = True
        return self._on

    def force_flush(self) -> None:
        provider = self._provider or trace.get_tracer_provider()
        flush = getattr(provider, "force_flush", None)
        if flush is not None and self.enabled:
            flush()

    def work_template(self, task: str) -> str:
        template = self._templates.get(task)
        if template is None:
            from actors.engine.wire import encode_token

            template = self._templates[task] = f"{self.prefix}.queue.{encode_token(task)}.{{run_id}}"
        return template

    # -- producers -------------------------------------------------------------------------------

    def start_run(self, task: str, run_id: str, subject: str, *, parent: SpanContext | None = None,
                  detached: bool = False, attributes: Mapping[str, Any] | None = None) -> ProducerSpan:
        """The span of starting a run; its ``traceparent`` becomes the run's trace context.

        The span is a child of ``parent`` if given, else of the current span. A ``detached``
        run (a fire-and-forget child) starts a trace of its own, linked to the current span.
        """
        if not self.enabled:
            return _NO_SPAN
        ctx: Context | None = None
        links = None
        if parent is not None:
            ctx = trace.set_span_in_context(NonRecordingSpan(parent))
        elif detached:
            ctx = Context()
            current = trace.get_current_span().get_span_context()
            links = [Link(current, {"bide.link": "spawned_by"})] if current.is_valid else None
        attrs = {**_messaging("send", subject), "bide.run_id": run_id, "bide.task": task}
        if attributes:
            attrs.update(_clean(attributes))
        span = self._tracer.start_span(f"send {self.work_template(task)}", context=ctx, kind=SpanKind.PRODUCER,
                                       attributes=attrs, links=links)
        return ProducerSpan(span)

    def push_event(self, key: str, scope: str | None, subject: str, event_id: str) -> ProducerSpan:
        """The span of pushing an event: the span a resumed wait links to."""
        if not self.enabled:
            return _NO_SPAN
        from actors.engine.wire import encode_token

        template = f"{self.prefix}.events.{encode_token(key)}" + (".{scope}" if scope is not None else "")
        attrs = {**_messaging("send", subject), "messaging.message.id": event_id, "bide.event.key": key}
        if scope is not None:
            attrs["bide.event.scope"] = scope
        return ProducerSpan(self._tracer.start_span(f"send {template}", kind=SpanKind.PRODUCER, attributes=attrs))

    def send_to_run(self, run_id: str, name: str, subject: str, event_id: str) -> ProducerSpan:
        """The span of delivering an event straight to one run's inbox."""
        if not self.enabled:
            return _NO_SPAN
        attrs = {**_messaging("send", subject), "messaging.message.id": event_id, "bide.run_id": run_id,
                 "bide.event.key": name}
        return ProducerSpan(self._tracer.start_span(f"send {self.prefix}.inbox.{{run_id}}", kind=SpanKind.PRODUCER,
                                                    attributes=attrs))

    # -- consumers -------------------------------------------------------------------------------

    def run(self, started: RunStarted) -> RunTrace | None:
        """The spans of one turn of this run (``None`` when tracing is off)."""
        return RunTrace(self, started) if self.enabled else None


def _signal_links(signals: list[EventSignal]) -> list[Link] | None:
    links = []
    for sig in signals:
        ctx = span_context_of(sig.meta.get(TRACEPARENT)) if sig.meta else None
        if ctx is not None:
            links.append(Link(ctx, _clean({"bide.event.key": sig.name, "bide.event.id": sig.event_id,
                                           "bide.event.scope": sig.scope})))
    return links or None


def mark_failed(message: str) -> None:
    """Mark the current (activation) span as failed: the run's attempt raised."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR, message))


def mark_outcome(outcome: str) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("bide.outcome", outcome)


def observe_appended(entries: Sequence[HistoryEntry]) -> None:
    """A turn's append is durable: an attempt that failed, or the run's end, marks the current (activation) span."""
    for e in entries:
        if isinstance(e, AttemptFailed):
            mark_outcome("retry")
            mark_failed(f"{e.error.type}: {e.error.message}")
        elif isinstance(e, TERMINAL):
            mark_outcome(e.k.removeprefix("run_"))
            if isinstance(e, RunFailed):
                mark_failed(f"{e.error.type}: {e.error.message}")


class RunTrace:
    """The spans of one turn of one run: its activation, memos live, sleeps and waits once ended.

    The run's trace context is parsed once per turn. Spans under the activation carry only
    what differs from it (a position, a label): the rest is one click up the tree.
    """

    def __init__(self, tracing: Tracing, started: RunStarted) -> None:
        self._tracer = tracing._tracer
        # Bide's light tracer (actors.observe.spans) takes parents directly: no context to build or search.
        self._light: Any = self._tracer if hasattr(self._tracer, "current_under") else None
        self._started = started
        self._template = tracing.work_template(started.task)
        self._parent = span_context_of(started.meta.get(TRACEPARENT)) or derived_context(started.run_id)
        self._ctx: Context | None = None

    @property
    def _run_ctx(self) -> Context:
        """The run's trace context (its starter's span), as an OpenTelemetry context."""
        if self._ctx is None:
            self._ctx = trace.set_span_in_context(NonRecordingSpan(self._parent))
        return self._ctx

    def activation(self, *, kind: str, subject: str, delivery: int, attempt: int, signals: list[EventSignal],
                   began_ns: int) -> Any:
        """The CONSUMER span of one turn, current while the run's code runs (a context manager).

        Links to the publish span of every event the turn takes from the inbox: the events
        that resumed the run.
        """
        started = self._started
        attrs = {**_messaging("process", subject), "bide.run_id": started.run_id, "bide.task": started.task,
                 "bide.attempt": attempt, "bide.activation": kind}
        if delivery > 1:
            attrs["bide.delivery"] = delivery  # a redelivery: the previous host died or gave it back
        if started.parent is not None:
            attrs["bide.parent_run_id"] = started.parent.run_id
        links = _signal_links(signals) if signals else None
        if self._light is not None:
            return self._light.current_under(self._parent, f"process {self._template}", SpanKind.CONSUMER, attrs,
                                             links, began_ns)
        return self._tracer.start_as_current_span(
            f"process {self._template}", context=self._run_ctx, kind=SpanKind.CONSUMER, attributes=attrs,
            links=links, start_time=began_ns, record_exception=True, set_status_on_exception=True)

    def memo(self, name: str, pos: int) -> AbstractContextManager[Any]:
        """A step that runs now (under the current span: the activation); a replayed memo has no span."""
        if self._light is not None:
            parent = trace.get_current_span().get_span_context()
            return cast("AbstractContextManager[Any]", self._light.current_under(
                parent if parent.is_valid else None, f"memo {name}", SpanKind.INTERNAL, {"bide.position": pos}))
        return self._tracer.start_as_current_span(f"memo {name}", attributes={"bide.position": pos},
                                                  record_exception=True, set_status_on_exception=True)

    def sleep(self, pos: int, duration_s: float, began: datetime, ended: datetime) -> None:
        """A sleep that has just ended, with its real start and end (a child of the run's context)."""
        span = self._tracer.start_span("sleep", context=self._run_ctx, start_time=_ns(began), attributes={
            "bide.run_id": self._started.run_id, "bide.position": pos, "bide.sleep.duration_s": duration_s})
        span.end(end_time=_ns(ended))

    def wait(self, reg: WaitRegistered, resolved: WaitResolved, signals: list[EventSignal]) -> None:
        """A wait that has just been resolved, linked to the publish spans of the events that ended it."""
        keys = sorted({c.event_key for c in reg.flat() if c.event_key})
        scopes = sorted({c.scope for c in reg.flat() if c.scope})
        attrs: dict[str, Any] = {"bide.run_id": self._started.run_id, "bide.position": reg.pos,
                                 "bide.wait.id": reg.wait_id, "bide.wait.label": reg.label}
        if keys:
            attrs["bide.event.key"] = keys[0] if len(keys) == 1 else keys
        if scopes:
            attrs["bide.event.scope"] = scopes[0] if len(scopes) == 1 else scopes
        won = list(resolved.result)
        if won:
            attrs["bide.wait.satisfied"] = won
        span = self._tracer.start_span(f"wait_for {' | '.join(keys) if keys else 'sleep'}", context=self._run_ctx,
                                       start_time=_ns(reg.at), attributes=attrs, links=_signal_links(signals))
        span.end(end_time=_ns(resolved.at))


__all__ = [
    "TRACEPARENT",
    "ProducerSpan",
    "RunTrace",
    "Tracing",
    "TracingConfigError",
    "configure_from_env",
    "derived_context",
    "exporter_names",
    "extract_context",
    "mark_failed",
    "mark_outcome",
    "observe_appended",
    "otlp_exporter_class",
    "provider_from_env",
    "span_context_of",
    "trace_id_of",
    "traceparent_of",
]
