"""Bide's own light spans: the OpenTelemetry API's ``Span``, recorded as one tuple when it ends.

Used when Bide sets tracing up from ``OTEL_*`` (see :mod:`actors.observe.span_export`). The SDK's span
does much that Bide's spans never need (locks, bounded attribute validation, span processors,
a readable copy at end); this one keeps its fields in slots and, at ``end()``, hands a plain
:data:`~actors.observe.span_export.SpanRecord` to the export pipe. It is still an API span: put in a
context, the application's own SDK spans nest under it, and its ids are what ``traceparent``
values carry. Sampling is the SDK sampler's decision (``OTEL_TRACES_SAMPLER``).
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Mapping, Sequence
from time import time_ns
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from actors.observe.span_export import ExportPipe, span_record

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_DEFAULT_SAMPLER = ("ParentBased{root:AlwaysOnSampler,remoteParentSampled:AlwaysOnSampler,"
                    "remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler,"
                    "localParentNotSampled:AlwaysOffSampler}")


class LightSpan(trace.Span):
    """A recording span whose end is one record in the export pipe."""

    # What most spans never set stays on the class (an API span has a __dict__ anyway).
    _events: list[tuple[str, int, dict[str, Any]]] | None = None
    _status: tuple[int, str | None] = (0, None)  # UNSET
    _ended = False

    def __init__(self, tracer: LightTracer, name: str, kind: int, ctx: SpanContext, parent: SpanContext | None,
                 start: int, attrs: dict[str, Any], links: Sequence[Link] | None) -> None:
        self._tracer = tracer
        self._name = name
        self._kind = kind  # the SpanKind's value
        self._ctx = ctx
        self._parent = parent
        self._start = start
        self._attrs = attrs
        self._links = links

    def get_span_context(self) -> SpanContext:
        return self._ctx

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: Any) -> None:
        if not self._ended and value is not None:
            self._attrs[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None) -> None:
        if not self._ended:
            if self._events is None:
                self._events = []
            self._events.append((name, timestamp or time_ns(), dict(attributes or {})))

    def update_name(self, name: str) -> None:
        if not self._ended:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended or self._status[0] == StatusCode.OK.value:
            return  # as in the SDK: OK is final
        code = status.status_code if isinstance(status, Status) else status
        if isinstance(status, Status):
            description = status.description
        self._status = (code.value, description if code is StatusCode.ERROR else None)

    def record_exception(self, exception: BaseException, attributes: Mapping[str, Any] | None = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        attrs = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        attrs.update(attributes or {})
        self.add_event("exception", attrs, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        tracer = self._tracer
        tracer.pipe.emit(span_record(self._name, self._kind, self._ctx, self._parent, self._start,
                                     end_time or time_ns(), self._attrs, self._links or (), self._status,
                                     self._events or (), tracer.scope_name, tracer.scope_version))

    def __repr__(self) -> str:
        return f"LightSpan({self._name!r}, trace_id={self._ctx.trace_id:032x}, span_id={self._ctx.span_id:016x})"


class LightTracer(trace.Tracer):
    """Starts :class:`LightSpan` objects; ``sampler`` is an SDK sampler (its ``should_sample``)."""

    def __init__(self, pipe: ExportPipe, sampler: Any, scope_name: str, scope_version: str | None = None) -> None:
        self.pipe = pipe
        self.sampler = sampler
        # The SDK's default (parent-based, root always on) decides from the parent's flag alone.
        self._parent_or_on = sampler.get_description() == _DEFAULT_SAMPLER
        self.scope_name = scope_name
        self.scope_version = scope_version

    def start_span(self, name: str, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: Mapping[str, Any] | None = None, links: Sequence[Link] | None = None,
                   start_time: int | None = None, record_exception: bool = True,
                   set_status_on_exception: bool = True) -> trace.Span:
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        attrs = {k: v for k, v in attributes.items() if v is not None} if attributes else {}
        return self.start_under(parent if parent is not None and parent.is_valid else None, name, kind, attrs, links,
                                start_time, context)

    def start_under(self, parent: SpanContext | None, name: str, kind: SpanKind, attrs: dict[str, Any],
                    links: Sequence[Link] | None = None, start_time: int | None = None,
                    context: Context | None = None) -> trace.Span:
        """``start_span`` for Bide's own spans: the parent given, not looked up; ``attrs`` owned and clean."""
        trace_id = parent.trace_id if parent is not None else random.getrandbits(128)
        extra: Mapping[str, Any] | None = None
        if self._parent_or_on:
            sampled = parent is None or bool(parent.trace_flags & TraceFlags.SAMPLED)
            state = parent.trace_state if parent is not None else None
        else:
            if context is None and parent is not None:
                context = trace.set_span_in_context(NonRecordingSpan(parent))
            decision = self.sampler.should_sample(context, trace_id, name, kind, attrs, links)
            sampled, state, extra = decision.decision.is_sampled(), decision.trace_state, decision.attributes
        ctx = SpanContext(trace_id, random.getrandbits(64), False, _SAMPLED if sampled else _NOT_SAMPLED, state)
        if not sampled:
            return NonRecordingSpan(ctx)
        if extra:
            attrs.update(extra)
        return LightSpan(self, name, kind._value_, ctx, parent, start_time or time_ns(), attrs, links)

    def current_under(self, parent: SpanContext | None, name: str, kind: SpanKind, attrs: dict[str, Any],
                      links: Sequence[Link] | None = None, start_time: int | None = None) -> Current:
        """:meth:`start_under`, the span current for a ``with`` block and ended after it."""
        return Current(self.start_under(parent, name, kind, attrs, links, start_time), True, True, True)

    def start_as_current_span(  # type: ignore[override]  # a context manager, as the API's is
            self, name: str, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
            attributes: Mapping[str, Any] | None = None, links: Sequence[Link] | None = None,
            start_time: int | None = None, record_exception: bool = True, set_status_on_exception: bool = True,
            end_on_exit: bool = True) -> Current:
        return Current(self.start_span(name, context, kind, attributes, links, start_time), record_exception,
                       set_status_on_exception, end_on_exit)


class Current:
    """A span made current for a ``with`` block: ``trace.use_span`` as one small object.

    An exception leaving the block is recorded on the span and sets its status to ERROR
    (``Exception`` only: a cancellation is not an error), as ``use_span`` does.
    """

    __slots__ = ("_end", "_record", "_set_status", "_span", "_token")

    def __init__(self, span: trace.Span, record_exception: bool, set_status_on_exception: bool,
                 end_on_exit: bool) -> None:
        self._span = span
        self._record = record_exception
        self._set_status = set_status_on_exception
        self._end = end_on_exit
        self._token: object = None

    def __enter__(self) -> trace.Span:
        self._token = context_api.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        context_api.detach(self._token)  # type: ignore[arg-type]
        span = self._span
        if isinstance(exc, Exception) and span.is_recording():
            if self._record:
                span.record_exception(exc)
            if self._set_status:
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        if self._end:
            span.end()


__all__ = ["Current", "LightSpan", "LightTracer"]
