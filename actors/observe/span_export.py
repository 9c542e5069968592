"""Span export out of the host's process: records down a pipe to a child exporter process.

Why: a span made by the OpenTelemetry SDK and encoded by its OTLP exporter costs a host about
150 to 300 µs of CPU, much of it holding the GIL its event loop needs, against 300 µs for a whole
trivial turn. When Bide sets tracing up itself (from ``OTEL_*``), each of its spans is instead a
small tuple (a :data:`SpanRecord`) appended to a list. A writer thread pickles the list every
``interval`` and writes it down a pipe to ``python -m actors.observe.span_export``, a child process that
rebuilds SDK ``ReadableSpan`` objects and exports them with the SDK's own exporters (OTLP, console)
on the machine's other cores.

The child starts with the pipe (its imports take about half a second of CPU, better spent
before the first run than during it). A host that is SIGKILLed loses only the records it had
not yet written (one interval at most): the child reads the pipe to its end, exports what it
got and exits. A child that dies is restarted for the next batch; a host whose child cannot
keep up keeps at most ``max_queue`` records and counts the rest as dropped, never blocking its
event loop. A collector that is down is not waited for batch after batch: after a failed
export, the child drops what comes in the next five seconds.

Frames, parent to child: a 4-byte big-endian length, then a pickle of ``(kind, body)``:
``("header", {"resource": {...}, "exporters": [...], "batch": n})`` once, then
``("spans", ([SpanRecord, ...], end_of_batch))`` or ``("flush", token)``: the child sends
what it has at the end of each of the parent's batches (or every ``max_batch`` records). The child answers a flush by
writing the 4-byte token to the acknowledgement pipe once its exporters have flushed.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import SpanProcessor

log = logging.getLogger("bide.tracing")

SpanRecord = tuple[Any, ...]
"""One ended span, positionally: ``(name, kind, trace_id, span_id, flags, trace_state, parent_span_id
(0: a root), parent_is_remote, start_ns, end_ns, attributes, links [(trace_id, span_id, flags,
attributes)], status_code, status_description, events [(name, time_ns, attributes)], scope_name,
scope_version)``. Plain values only: it is pickled on the hot path's behalf by the writer thread."""

_FRAME = struct.Struct(">I")
_COOL_DOWN_S = 5.0
_FRAME_RECORDS = 64
_NICE = 19
_PKG_ROOT = str(Path(__file__).resolve().parent.parent)  # the child imports actors from where we did


# -- parent side ---------------------------------------------------------------------------------


class ExportPipe:
    """Ships span records to a child exporter process (started by the writer thread at once).

    Args:
        exporters: the exporter names the child sets up (``otlp``, ``console``).
        resource: the resource attributes of every span (computed once, here).
        interval_s: how often the writer thread ships what has accumulated.
        max_queue: records kept while the child is behind; more are dropped and counted.
        max_batch: records per export request in the child (``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``).
        env: variables for the child on top of ``os.environ`` (its exporters read ``OTEL_EXPORTER_*``).
        restart_delay_s: the least time between two starts of the child (one that dies at
            once is not restarted in a loop).
    """

    def __init__(self, exporters: Sequence[str], resource: Mapping[str, Any], *, env: Mapping[str, str] | None = None,
                 interval_s: float = 0.2, max_queue: int = 65_536, max_batch: int = 512,
                 restart_delay_s: float = 5.0) -> None:
        self._env = {**os.environ, **(env or {})}
        self._header = ("header", {"resource": dict(resource), "exporters": list(exporters), "batch": max_batch})
        self._interval = interval_s
        self._max_queue = max_queue
        self._buf: list[SpanRecord] = []
        self._lock = threading.Lock()  # guards the swap of _buf against a concurrent append
        self._io = threading.Lock()  # one writer on the pipe at a time (writer thread, force_flush, shutdown)
        self._wake = threading.Event()
        self._closed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._ack_r = -1
        self._next_start = 0.0
        self._restart_delay = restart_delay_s
        self._token = 0
        self.dropped = 0
        self.shipped = 0  # records written to a child
        self.started = 0  # children started
        self._thread = threading.Thread(target=self._loop, name="bide-span-export", daemon=True)
        self._thread.start()

    def emit(self, record: SpanRecord) -> None:
        """Queue one ended span (any thread; a list append under a lock)."""
        with self._lock:
            if len(self._buf) >= self._max_queue or self._closed:
                self.dropped += 1
                return
            self._buf.append(record)

    def _loop(self) -> None:
        with self._io:
            self._ensure_child()  # now, not at the first span: its imports take a CPU-second
        while not self._closed:
            self._wake.wait(self._interval)
            with self._io:
                self._ship()

    def _take(self) -> list[SpanRecord]:
        with self._lock:
            batch, self._buf = self._buf, []
        return batch

    def _ship(self) -> bool:
        """Write what has accumulated to the child (holding ``_io``); False if some was dropped."""
        batch = self._take()
        # Frames of a few hundred microseconds of pickling each: pickle holds the GIL for a
        # whole call, and the host's event loop should not wait for a whole interval's batch.
        for i in range(0, len(batch), _FRAME_RECORDS):
            chunk = batch[i:i + _FRAME_RECORDS]
            if not self._write(("spans", (chunk, i + _FRAME_RECORDS >= len(batch)))):
                self.dropped += len(batch) - i
                return False
            self.shipped += len(chunk)
        return True

    @property
    def pending(self) -> int:
        """Records queued here, not yet written to the child."""
        return len(self._buf)

    @property
    def child_pid(self) -> int | None:
        """The exporter process's pid, while it runs."""
        return self._proc.pid if self._alive() and self._proc is not None else None

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ensure_child(self) -> bool:
        if self._alive():
            return True
        if self._proc is not None:
            log.warning("tracing: the span exporter process exited (code %s); starting a new one",
                        self._proc.returncode)
            self._close_child()
        now = time.monotonic()
        if now < self._next_start:
            return False
        self._next_start = now + self._restart_delay
        ack_r, ack_w = os.pipe()
        env = {**self._env,
               "PYTHONPATH": os.pathsep.join(p for p in (_PKG_ROOT, self._env.get("PYTHONPATH")) if p)}
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "actors.observe.span_export", str(ack_w)],
                                          stdin=subprocess.PIPE, pass_fds=(ack_w,), env=env)
        except OSError as e:
            log.warning("tracing: cannot start the span exporter process: %s", e)
            os.close(ack_r)
            return False
        finally:
            os.close(ack_w)
        self._ack_r = ack_r
        self.started += 1
        return self._write_frame(self._header)

    def _close_child(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if self._ack_r >= 0:
            os.close(self._ack_r)
            self._ack_r = -1

    def _write(self, frame: tuple[str, Any]) -> bool:
        return self._ensure_child() and self._write_frame(frame)

    def _write_frame(self, frame: tuple[str, Any]) -> bool:
        assert self._proc is not None and self._proc.stdin is not None
        data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._proc.stdin.write(_FRAME.pack(len(data)) + data)  # blocks, GIL released, while the child is behind
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            log.warning("tracing: the span exporter process stopped reading (%s)", e)
            self._close_child()
            return False
        return True

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Ship everything queued and wait until the child's exporters have sent it."""
        deadline = time.monotonic() + timeout_s
        if not self._io.acquire(timeout=timeout_s):
            return False
        try:
            if not self._ship():
                return False  # spans were dropped: not everything handed over was exported
            if not self._alive():
                # No exporter now: fine if there never was one (nothing was ever shipped);
                # one that died may have taken spans with it.
                return self.started == 0
            self._token = (self._token + 1) & 0xFFFFFFFF
            if not self._write_frame(("flush", self._token)):
                return False
            return self._await_ack(self._token, deadline)
        finally:
            self._io.release()

    def _await_ack(self, token: int, deadline: float) -> bool:
        got = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self._ack_r < 0:
                return False
            ready, _, _ = select.select([self._ack_r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._ack_r, 4 - len(got))
            if not chunk:
                return False  # the child died before answering
            got += chunk
            if len(got) == 4:
                if _FRAME.unpack(got)[0] == token:
                    return True
                got = b""  # an answer to an earlier flush that timed out

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Ship what is queued, close the pipe and give the child ``timeout_s`` to finish exporting.

        A child still exporting after that (a slow or unreachable collector) is left to finish
        on its own: it has the whole batch and exits when it is done.
        """
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        with self._io:
            self._ship()
            proc = self._proc
            self._close_child()
        if proc is not None:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tracing: the span exporter process is still exporting; leaving it to finish")
        if self.dropped:
            log.warning("tracing: %d spans were dropped (the exporter process fell behind or was down)", self.dropped)


def span_record(name: str, kind: int, ctx: Any, parent: Any, start: int, end: int, attrs: dict[str, Any],
                links: Sequence[Any], status: tuple[int, str | None], events: Sequence[tuple[str, int, dict[str, Any]]],
                scope_name: str, scope_version: str | None) -> SpanRecord:
    """The record of one ended span (``ctx``, ``parent`` and each link's ``context`` are API ``SpanContext``)."""
    # Tuples, not lists, where a span has nothing: records wait up to an interval in the host,
    # and a tuple of plain values is one the garbage collector soon stops looking at.
    return (name, kind, ctx.trace_id, ctx.span_id, int(ctx.trace_flags),
            tuple(ctx.trace_state.items()) if ctx.trace_state else None,
            parent.span_id if parent is not None else 0, bool(parent is not None and parent.is_remote),
            start, end, attrs,
            tuple((lk.context.trace_id, lk.context.span_id, int(lk.context.trace_flags), dict(lk.attributes or {}))
                  for lk in links) if links else (),
            status[0], status[1], events, scope_name, scope_version)


def record_of(span: Any) -> SpanRecord | None:
    """The record of an SDK ``ReadableSpan`` (a span the application made), or None if not sampled."""
    ctx = span.context
    if ctx is None or not ctx.trace_flags.sampled:
        return None
    scope = span.instrumentation_scope
    return span_record(span.name, span.kind.value, ctx, span.parent, span.start_time, span.end_time,
                       dict(span.attributes or {}), span.links,
                       (span.status.status_code.value, span.status.description),
                       tuple((e.name, e.timestamp, dict(e.attributes or {})) for e in span.events),
                       scope.name if scope else "", scope.version if scope else None)


class PipeSpanProcessor(SpanProcessor):
    """An SDK span processor that sends the application's own spans down the same pipe."""

    def __init__(self, pipe: ExportPipe) -> None:
        self.pipe = pipe

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: Any) -> None:
        record = record_of(span)
        if record is not None:
            self.pipe.emit(record)

    def shutdown(self) -> None:
        self.pipe.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.pipe.force_flush(timeout_millis / 1000)


# -- child side ----------------------------------------------------------------------------------


def readable_span(record: SpanRecord, resource: Any, scopes: dict[tuple[str, str | None], Any]) -> Any:
    """The SDK span a record describes, ready for an SDK exporter."""
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

    (name, kind, trace_id, span_id, flags, trace_state, parent_id, parent_remote, start, end, attrs, links,
     status_code, status_desc, events, scope_name, scope_version) = record
    state = TraceState(trace_state) if trace_state else None
    scope = scopes.get((scope_name, scope_version))
    if scope is None:
        scope = scopes[(scope_name, scope_version)] = InstrumentationScope(scope_name, scope_version)
    return ReadableSpan(
        name=name,
        context=SpanContext(trace_id, span_id, False, TraceFlags(flags), state),
        parent=SpanContext(trace_id, parent_id, parent_remote, TraceFlags(flags), state) if parent_id else None,
        resource=resource,
        attributes=attrs,
        events=[Event(n, a, t) for n, t, a in events],
        links=[Link(SpanContext(t, s, True, TraceFlags(f)), a) for t, s, f, a in links],
        kind=SpanKind(kind),
        status=Status(StatusCode(status_code), status_desc),
        start_time=start,
        end_time=end,
        instrumentation_scope=scope,
    )


def _read_frame(stream: Any) -> tuple[str, Any] | None:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    body = stream.read(_FRAME.unpack(head)[0])
    frame: tuple[str, Any] = pickle.loads(body)  # our own parent process wrote it
    return frame


def _exporters(names: Sequence[str]) -> list[Any]:
    from actors.observe.otlp import otlp_exporter_class

    out: list[Any] = []
    for name in names:
        if name == "otlp":
            out.append(otlp_exporter_class(os.environ)())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
    return out


def serve(stream: Any, ack: Callable[[int], None]) -> None:
    """Read frames until the end of ``stream``, exporting every span; then shut the exporters down.

    An OTLP/HTTP exporter is handed request bodies built straight from the records
    (:mod:`actors.observe.span_encoding`); any other exporter gets SDK ``ReadableSpan`` objects.
    """
    from opentelemetry.sdk.resources import Resource

    from actors.observe.span_encoding import SpanEncoder, raw_sender

    first = _read_frame(stream)
    if first is None or first[0] != "header":
        return
    header = first[1]
    resource = Resource(header["resource"])
    exporters = _exporters(header["exporters"])
    senders = [raw_sender(e) for e in exporters]
    encoder = SpanEncoder(header["resource"])
    batch = max(1, int(header["batch"]))
    scopes: dict[tuple[str, str | None], Any] = {}
    down_until, dropped = 0.0, 0
    pending: list[SpanRecord] = []

    def export(records: list[SpanRecord]) -> None:
        nonlocal down_until, dropped
        spans = None
        for i in range(0, len(records), batch):
            chunk = records[i:i + batch]
            for exporter, send in zip(exporters, senders, strict=True):
                if send is None:
                    if spans is None:
                        spans = [readable_span(r, resource, scopes) for r in records]
                    exporter.export(spans[i:i + batch])
                elif time.monotonic() < down_until:
                    dropped += len(chunk)
                elif not send(encoder.encode(chunk)):  # the client retried and logged why
                    # A collector that is down is not waited for batch after batch: what
                    # comes in the next few seconds is dropped, as a full queue would be.
                    down_until = time.monotonic() + _COOL_DOWN_S
                    dropped += len(chunk)

    try:
        while (frame := _read_frame(stream)) is not None:
            kind, body = frame
            if kind == "spans":
                records, end_of_batch = body
                pending.extend(records)
                if end_of_batch or len(pending) >= batch:
                    export(pending)
                    pending = []
            elif kind == "flush":
                export(pending)
                pending = []
                for exporter in exporters:
                    exporter.force_flush()
                ack(body)
    finally:
        if pending:
            export(pending)
        for exporter in exporters:
            exporter.shutdown()
        if dropped:
            log.warning("%d spans were not exported: the collector did not take them", dropped)


def main() -> None:
    # Ctrl-C reaches the whole process group; this process finishes when its parent closes the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Background work: when the host and this process both want a core, the host goes first.
    os.nice(_NICE)
    logging.basicConfig(level=logging.WARNING, format="bide span exporter: %(levelname)s %(name)s: %(message)s")
    ack_fd = int(sys.argv[1])

    def ack(token: int) -> None:
        try:
            os.write(ack_fd, _FRAME.pack(token))
        except OSError:
            pass  # the parent is gone; its spans are still exported

    serve(sys.stdin.buffer, ack)


if __name__ == "__main__":
    main()
