"""The HTTP API: push events, receive webhooks, deliver events to one run and cancel runs, over plain HTTP.

``create_app`` builds a FastAPI app around a :class:`~sdk.Bide` client; ``serve_http``
runs it with uvicorn inside the caller's event loop (``bide serve`` and ``bide dev`` use it).

=====================================  =====================================================
``POST /api/v1/events``                push an event: ``{"key", "payload", "scope", "event_id", "metadata"}``
                                         (``additional_metadata`` is merged into ``metadata``)
``POST /api/v1/webhooks/{key}``        push an event whose payload is the raw JSON body (the key may contain ``/``)
``POST /api/v1/events/{run}/{name}``   deliver the raw JSON body to one run (Zart's ``offer_event``)
``GET /api/v1/runs``                   list runs, newest first: ``?status=&task=&since=&until=&meta=K=V&limit=&cursor=``
``GET /api/v1/runs/{run}``             a run's state; ``?detail=full``: with input, metadata, history, waits, children
``GET /api/v1/events``                 recent events and the runs each resumed or started: ``?key=&since=&limit=``
``POST /api/v1/runs/{run}/cancel``     cancel a run, its children and its waits: ``{"reason"}`` (optional)
``GET /``, ``/runs/…``, ``/events``…   the web UI (:mod:`actors.apps.web_ui`): pages, their session cookie
``GET /healthz``                       ``{"status": "ok"}``, never behind the token (liveness)
``GET /readyz``                        ``{"status": "ready"}`` when connected to NATS with every stream present;
                                       503 ``{"status": "not ready", "problems": [...]}`` otherwise; no token
=====================================  =====================================================

When a token is configured every ``/api/`` request needs ``Authorization: Bearer <token>``.
Without one (``bide dev``, or ``bide serve --no-auth``), a POST must be JSON
(``Content-Type: application/json``: a page in a browser cannot send that cross-site), and a
server on loopback answers to loopback host names only (no DNS rebinding).
Bodies larger than ``max_body_bytes`` are refused with 413 before they are read in full; a
payload over the payload limit (``BIDE_MAX_PAYLOAD``) gets 413 too, and one nested too deep or
holding an integer outside int64 gets 400, each naming the limit (see :mod:`sdk.limits`).
An empty body on the two raw-body routes is the payload ``null``; on ``cancel`` it is the default reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import socket
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from opentelemetry import context as otel_context
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.apps.http_views import (
    DURATION_AGO,
    MAX_EVENTS,
    SINCE_AGO_PATTERN,
    EventList,
    RunDetail,
    RunState,
    event_list,
    run_detail,
)
from actors.apps.web_ui import ui_refusal, ui_router
from actors.observe.tracing import TRACEPARENT, extract_context
from actors.store.jetstream import missing_streams
from actors.store.runs_index import CURSOR_PATTERN, MAX_LIMIT
from sdk import Bide, EventRef, RunAlreadyFinishedError, RunNotFoundError
from sdk.errors import EventPayloadError, PayloadLimitError, PayloadTooLargeError
from sdk.events import merge_metadata
from sdk.limits import PayloadLimits, check_payload

DEFAULT_MAX_BODY_BYTES = 1_048_576
API_PREFIX = "/api/"


# -- models ----------------------------------------------------------------------------------------

SPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
"""(A character class's inside.) Every character ``str.isspace`` (and so ``str.strip``) treats as
whitespace, spelled out: a JSON Schema ``\\s`` is narrower, and a key it allowed would be refused."""
CONTROL = r"\x00-\x1f\x7f"
"""(A character class's inside.) The control characters no name may hold (``sdk.limits.check_name``)."""
NAME_PATTERN = rf"^[^{SPACE}{CONTROL}](?:[^{CONTROL}]*[^{SPACE}{CONTROL}])?$"
"""An event key, scope, run id or event name: non-empty, no surrounding whitespace and no control
character, as :func:`sdk.events.validate_key` checks. In the schema so that what it allows is accepted."""
WEBHOOK_KEY_PATTERN = NAME_PATTERN
"""A webhook's key, in the path: as :data:`NAME_PATTERN` (which also keeps out the line break a
``{key:path}`` route never matches)."""
_NAME: dict[str, Any] = {"type": "string", "pattern": NAME_PATTERN}


class PushEventRequest(BaseModel):
    """An event to push: every wait and every ``on_events`` task matching its key (and scope) sees it."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="the event key, e.g. `user:update`", examples=["user:update"],
                     json_schema_extra=_NAME)
    payload: Any = Field(default=None, description="any JSON value within the payload limits; `null` when omitted")
    scope: str | None = Field(default=None, description="narrows the event to waits with the same scope",
                              json_schema_extra={"anyOf": [_NAME, {"type": "null"}]})
    event_id: str | None = Field(default=None, description="makes the push idempotent: a repeated id is dropped",
                                 json_schema_extra={"anyOf": [_NAME, {"type": "null"}]})
    metadata: dict[str, Any] | None = Field(default=None, description="extra JSON data carried with the event")
    additional_metadata: dict[str, Any] | None = Field(
        default=None, description="the same as metadata (Hatchet's name); its string values become the "
        "additional_metadata of the runs the event starts")


class EventAccepted(BaseModel):
    """A pushed event, stored in JetStream."""

    status: Literal["accepted"] = "accepted"
    event_id: str
    key: str
    scope: str | None
    seq: int = Field(description="the event's sequence number in the events stream")

    @classmethod
    def of(cls, ref: EventRef) -> EventAccepted:
        return cls(event_id=ref.event_id, key=ref.key, scope=ref.scope, seq=ref.seq)


class EventDelivered(BaseModel):
    """The answer to a direct delivery, as Zart gives it."""

    status: Literal["delivered"] = "delivered"
    execution_id: str
    event_name: str


class RunCancelled(BaseModel):
    """The answer to a cancel request."""

    run_id: str
    cancelled: bool = Field(description="`false` if the run had already finished (nothing was cancelled)")


class RunListed(BaseModel):
    """A run in a listing (from the runs index)."""

    run_id: str
    task: str
    status: str = Field(description="queued, running, waiting, completed, failed or cancelled")
    started_at: str
    ended_at: str | None = None
    parent_run_id: str | None = None
    additional_metadata: dict[str, str] = Field(default_factory=dict)


class RunPage(BaseModel):
    """A page of runs, newest first; pass `cursor` back to get the next page (`null`: no more)."""

    runs: list[RunListed]
    cursor: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"


class NotReady(BaseModel):
    """Why the API cannot serve requests now (a readiness probe's 503)."""

    status: Literal["not ready"] = "not ready"
    problems: list[str]


READY_TIMEOUT_S = 2.0
"""How long ``/readyz`` waits for NATS (a probe's own timeout is usually 1-5 s)."""


async def readiness_problems(bide: Bide, timeout: float = READY_TIMEOUT_S) -> list[str]:
    """Why ``bide`` cannot serve requests now (empty when it can): connected, and every stream present.

    The reasons name no URL or credential (NatsUnavailableError's message has them hidden too,
    but a probe's answer is public: only the kind of failure is said).
    """
    try:
        # Shielded: a probe that gives up does not cancel a connect that a later probe will use.
        conn = await asyncio.wait_for(asyncio.shield(bide._pool.get()), timeout)
    except (ConnectionError, TimeoutError, OSError) as e:
        return [f"not connected to NATS ({type(e).__name__})"]
    if not conn.nc.is_connected:
        return ["not connected to NATS (reconnecting)"]
    try:
        missing = await missing_streams(conn.nc, conn.layout, timeout=timeout)
    except Exception as e:  # a timeout, no responders, a JetStream API error: not ready, whatever it is
        return [f"JetStream did not answer ({type(e).__name__})"]
    return [f"stream {name} is missing" for name in missing]


class ErrorDetail(BaseModel):
    """Why a request was refused."""

    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    reasons = {
        400: "the body is not JSON, the SDK refused a value, or a query parameter is unknown or repeated "
             "(the detail names it)",
        401: "missing or wrong bearer token",
        404: "no run with that id",
        409: "the run has already finished",
        413: "the body, or the payload in it, is larger than the limit (the detail names it)",
        503: "NATS JetStream is unreachable or did not answer in time",
    }
    return {c: {"model": ErrorDetail, "description": reasons[c]} for c in codes}


_RAW_JSON_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "any JSON value: the event payload (an empty body is `null`), within the payload "
                       "limits (400 or 413 otherwise: nested too deep, an integer outside int64, too large)",
        "content": {"application/json": {"schema": {}}},
    }
}


DEFAULT_CANCEL_REASON = "cancelled by request"

_CANCEL_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "optional: why, recorded in the run's history (an empty body is the default reason)",
        "content": {"application/json": {"schema": {
            "type": "object",
            "properties": {"reason": {"type": "string", "default": DEFAULT_CANCEL_REASON}},
            "additionalProperties": False,
        }}},
    }
}


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _cancel_reason(body: Any, empty: bool) -> str:
    """The ``reason`` in a cancel request's body (the default when the body is ``empty``); 400 if malformed."""
    if empty:
        return DEFAULT_CANCEL_REASON
    if not isinstance(body, dict):
        raise HTTPException(400, 'the request body must be a JSON object such as {"reason": "..."}, '
                                 f"got {_JSON_TYPES.get(type(body), type(body).__name__)}")
    unknown = sorted(set(body) - {"reason"})
    if unknown:
        raise HTTPException(400, f"unknown field(s) in the request body: {', '.join(map(repr, unknown))}; "
                                 "only 'reason' is accepted")
    reason = body.get("reason", DEFAULT_CANCEL_REASON)
    if not isinstance(reason, str):
        raise HTTPException(400, f"'reason' must be a string, got {_JSON_TYPES.get(type(reason), '?')}: "
                                 f"{orjson.dumps(reason).decode()[:200]}")
    return reason


# -- guard: token and body size --------------------------------------------------------------------


def _auth_failure(authorization: bytes | None, token: bytes) -> str | None:
    """Why ``authorization`` does not carry ``token`` (``None`` when it does)."""
    if not authorization:
        return "missing bearer token"
    scheme, _, given = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not given.strip():
        return "the Authorization header must be 'Bearer <token>'"
    if not secrets.compare_digest(given.strip(), token):
        return "invalid bearer token"
    return None


class _Guard:
    """Pure ASGI middleware: the bearer token on ``/api/`` paths, then the body size limit.

    The size is checked twice: the ``Content-Length`` header (refused before anything is
    read) and the bytes actually received (a chunked body has no header, a lying one is
    caught too).
    """

    def __init__(self, app: ASGIApp, token: str | None, max_body_bytes: int,
                 allowed_hosts: frozenset[str] | None = None) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await JSONResponse({"detail": f"invalid Content-Length header {declared.decode('latin-1')!r}"},
                                   status_code=400)(scope, receive, send)
                return
            if size > limit:
                await JSONResponse({"detail": _too_large(limit, f"{size} bytes")}, status_code=413)(
                    scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, _too_large(limit, f"more than {limit} bytes received"))
            return message

        # A caller's W3C trace context (e.g. a webhook sender's) parents the spans of this request.
        traceparent = headers.get(TRACEPARENT.encode())
        token = otel_context.attach(extract_context(traceparent.decode("latin-1"))) if traceparent else None
        try:
            await self.app(scope, limited_receive, send)
        finally:
            if token is not None:
                otel_context.detach(token)


    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> ASGIApp | None:
        """Why this request is refused before it is read: a Host the server does not answer to, a
        missing or wrong token, or (with no token) a write a browser page could make cross-site."""
        if self.allowed_hosts is not None:
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                # DNS rebinding: a page whose name now resolves to 127.0.0.1 still sends its own name.
                return JSONResponse({"detail": f"unexpected Host {host!r}: this server answers to "
                                     f"{', '.join(sorted(self.allowed_hosts))} only"}, status_code=421)
        if not str(scope.get("path", "")).startswith(API_PREFIX):
            return ui_refusal(scope, headers, self.token)  # the web UI's pages: the session cookie
        if self.token is not None:
            reason = _auth_failure(headers.get(b"authorization"), self.token)
            if reason is None:
                return None
            challenge = "Bearer" if reason == "missing bearer token" else 'Bearer error="invalid_token"'
            return JSONResponse({"detail": reason}, status_code=401, headers={"WWW-Authenticate": challenge})
        if scope.get("method") == "POST":
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                # A browser sends a JSON content type cross-site only after a preflight this server
                # never answers: a page cannot push an event or cancel a run on an open server.
                got = kind.decode("latin-1") or "none"
                return JSONResponse({"detail": f"with no API token, a POST must have Content-Type: "
                                     f"application/json (got {got})"}, status_code=415)
        return None


def _host_name(host: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8080`` -> ``::1``)."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


_DATE_TIME: dict[str, Any] = {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _moment(text: str | None, name: str) -> datetime | None:
    """An RFC 3339 time (a date-time with its offset), or a 400 naming the value."""
    if text is None:
        return None
    if _RFC3339.match(text):
        head, frac = text[:19], re.match(r"^\.(\d+)", text[19:])
        zone = text[19 + (len(frac.group(0)) if frac else 0):].upper().replace("Z", "+00:00")
        try:
            moment = datetime.fromisoformat(f"{head[:10]}T{head[11:]}{'.' + frac.group(1)[:6] if frac else ''}{zone}")
        except ValueError:
            moment = None
        if moment is not None:
            try:
                return moment.astimezone(UTC)
            except OverflowError:  # a valid time beyond what UTC can hold (0001-01-01T00:00:00+16:00): the edge
                return (datetime.min if moment.year == 1 else datetime.max).replace(tzinfo=UTC)
    raise HTTPException(400, f"{name} {text!r:.100} is not an RFC 3339 time such as 2026-01-31T12:00:00Z")


_UNPARSED = "There was an error parsing the body"
"""What FastAPI answers when a body it parses for a model is not JSON it can read (it names nothing)."""


async def _why_unparsed(request: Request, limits: PayloadLimits) -> str:
    """Why the body FastAPI could not parse is refused: not UTF-8, nested too deep, not JSON."""
    try:
        body = await request.body()
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"request body is not UTF-8 (byte {e.start}: {body[e.start:e.start + 1]!r}); JSON must be sent as "
                "UTF-8")
    except Exception:  # the body could not be read again: say what is known
        return "request body is not JSON that can be read (it must be UTF-8 JSON, nested at most 64 levels)"
    try:
        check_payload(body, limits, "the request body")
    except (PayloadLimitError, EventPayloadError) as e:
        return str(e)
    return "request body is not JSON that can be read (it must be UTF-8 JSON, nested at most 64 levels)"


def _with_known_fields(err: Any, request: Request) -> Any:
    """An unknown body field's error names the fields there are (``data``: the payload is ``payload``)."""
    loc = tuple(err.get("loc") or ())
    if err.get("type") != "extra_forbidden" or len(loc) != 2 or loc[0] != "body":
        return err
    route = request.scope.get("route")
    model = getattr(getattr(getattr(route, "body_field", None), "field_info", None), "annotation", None)
    fields = getattr(model, "model_fields", None)
    if not fields:
        return err
    return {**err, "msg": f"{err.get('msg', 'Extra inputs are not permitted')}: {loc[1]!r} is not a field here; "
                          f"the fields are {', '.join(fields)}"}


def _path_is_utf8(request: Request) -> bool:
    """Whether the request's path, percent-decoded, is UTF-8 (the server put U+FFFD for what was not)."""
    raw = request.scope.get("raw_path")
    if not isinstance(raw, bytes):
        return True
    try:
        urllib.parse.unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _too_large(limit: int, got: str) -> str:
    return f"request body too large: {got}, the limit is {limit} bytes"


def _query_params(*known: str, repeatable: tuple[str, ...] = ()) -> Any:
    """A dependency refusing (400) a query parameter not in ``known``, or one given twice: a typo
    such as ``?scop=x`` would otherwise push an unscoped event, and which of two values was meant
    cannot be known. Those in ``repeatable`` may be given many times."""

    async def check(request: Request) -> None:  # async: a sync dependency costs a thread hop per request
        unknown = sorted(set(request.query_params) - set(known) - set(repeatable))
        if unknown:
            accepted = ", ".join(map(repr, known)) or "none"
            raise HTTPException(400, f"unknown query parameter(s) {', '.join(map(repr, unknown))}; "
                                     f"accepted: {accepted}")
        for name in known:
            if len(request.query_params.getlist(name)) > 1:
                raise HTTPException(400, f"query parameter {name!r} given more than once; expected at most one")

    return Depends(check)


async def _json_body(request: Request, max_body_bytes: int, limits: PayloadLimits) -> Any:
    """The raw body parsed as JSON and checked against the payload limits; an empty body is ``None``."""
    body = await request.body()
    if len(body) > max_body_bytes:
        raise HTTPException(413, _too_large(max_body_bytes, f"{len(body)} bytes"))
    try:
        return check_payload(body, limits, "the request body")
    except PayloadTooLargeError as e:
        raise HTTPException(413, str(e)) from None
    except PayloadLimitError as e:
        raise HTTPException(400, str(e)) from None
    except EventPayloadError as e:
        raise HTTPException(400, f"request body is not valid JSON: {e}") from None


# -- the app ---------------------------------------------------------------------------------------


def create_app(bide: Bide, token: str | None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               allowed_hosts: frozenset[str] | None = None) -> FastAPI:
    """The HTTP API over ``bide``. ``token`` (if not ``None``) is required as a bearer token on ``/api/``.

    With no token, every POST to ``/api/`` must be JSON (no cross-site writes from a browser);
    ``allowed_hosts`` (host names, no ports) refuses any other ``Host`` header (DNS rebinding).
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
    if token is not None and not token:
        raise ValueError("the API token must not be empty (pass None for no token)")
    app = FastAPI(
        title="Bide HTTP API",
        version="1",
        summary="Push events and deliver them to durable runs.",
    )
    app.state.bide = bide

    limits = bide.config.payload_limits
    # Documents the scheme in the OpenAPI schema; the check itself is in _Guard, before the body is read.
    auth = [Security(HTTPBearer(auto_error=False))] if token is not None else []
    app.add_middleware(_Guard, token=token, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                why = (err.get("ctx") or {}).get("error") or err.get("msg", "")
                loc: tuple[Any, ...] = tuple(err.get("loc") or ())
                where = f" at position {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
                return JSONResponse({"detail": f"request body is not valid JSON: {why}{where}"}, status_code=400)
        errors = [_with_known_fields(err, request) for err in exc.errors()]
        return await request_validation_exception_handler(request, RequestValidationError(errors, body=exc.body))

    @app.exception_handler(StarletteHTTPException)
    async def _not_allowed(request: Request, exc: StarletteHTTPException) -> Any:
        if exc.status_code == 400 and exc.detail == _UNPARSED:
            return JSONResponse({"detail": await _why_unparsed(request, limits)}, status_code=400)
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        # Starlette's 405 names the methods of the first route on the path only: ``/api/v1/events``
        # has two (GET lists, POST pushes), and ``Allow`` must name both.
        allowed = sorted({m for r in app.routes if isinstance(r, Route) and r.methods
                          and r.matches(request.scope)[0] is not Match.NONE for m in r.methods})
        return JSONResponse({"detail": exc.detail}, status_code=405, headers={"Allow": ", ".join(allowed)})

    @app.exception_handler(ConnectionError)
    async def _unavailable(request: Request, exc: ConnectionError) -> JSONResponse:
        return JSONResponse({"detail": f"NATS JetStream is unavailable: {exc}"}, status_code=503)

    @app.exception_handler(TimeoutError)
    async def _timed_out(request: Request, exc: TimeoutError) -> JSONResponse:
        return JSONResponse({"detail": f"NATS JetStream did not answer in time: {exc or type(exc).__name__}"},
                            status_code=503)

    app.include_router(ui_router(bide, token))  # the web UI (actors/apps/web_ui.py)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """Liveness: the HTTP server answers. Needs no token."""
        return Health()

    @app.get("/readyz", response_model=Ready, tags=["health"],
             responses={503: {"model": NotReady, "description": "not connected to NATS, or a stream is missing"}})
    async def readyz() -> Any:
        """Readiness: connected to NATS and every stream present; 503 with the reasons otherwise. Needs no token."""
        problems = await readiness_problems(bide)
        if problems:
            return JSONResponse(NotReady(problems=problems).model_dump(), status_code=503)
        return Ready()

    async def push(key: str, payload: Any, scope: str | None, event_id: str | None,
                   metadata: dict[str, Any] | None) -> EventAccepted:
        try:
            ref = await bide.event.aio_push(key, payload, scope=scope, event_id=event_id, metadata=metadata)
        except PayloadTooLargeError as e:
            raise HTTPException(413, str(e)) from None
        except ValueError as e:  # EventPayloadError and PayloadLimitError are ValueErrors too
            raise HTTPException(400, str(e)) from None
        return EventAccepted.of(ref)

    @app.post("/api/v1/events", status_code=202, response_model=EventAccepted, dependencies=auth,
              responses=_errors(400, 401, 413, 503), tags=["events"])
    async def push_event(event: PushEventRequest, _: None = _query_params()) -> EventAccepted:
        """Push an event. Every wait and every ``on_events`` task matching its key (and scope) sees it."""
        metadata = merge_metadata(event.metadata, event.additional_metadata)
        return await push(event.key, event.payload, event.scope, event.event_id,
                          dict(metadata) if metadata is not None else None)

    @app.post("/api/v1/webhooks/{key:path}", status_code=202, response_model=EventAccepted, dependencies=auth,
              responses={**_errors(400, 401, 413, 503), 404: {
                  "model": ErrorDetail, "description": "the key holds a line break (push it with /api/v1/events)"}},
              openapi_extra=_RAW_JSON_BODY, tags=["events"])
    async def webhook(request: Request, key: str = Path(json_schema_extra={"pattern": WEBHOOK_KEY_PATTERN}),
                      scope: str | None = Query(None, json_schema_extra={"anyOf": [_NAME, {"type": "null"}]}),
                      event_id: str | None = Query(None, json_schema_extra={"anyOf": [_NAME, {"type": "null"}]}),
                      _: None = _query_params("scope", "event_id")) -> EventAccepted:
        """Push the raw JSON body as the payload of event ``key`` (which may contain ``/``)."""
        if "\ufffd" in key and not _path_is_utf8(request):
            raise HTTPException(400, f"the event key in the path is not UTF-8 once percent-decoded: "
                                     f"{request.scope.get('raw_path', b'')!r:.200}")
        payload = await _json_body(request, max_body_bytes, limits)
        return await push(key, payload, scope, event_id, None)

    @app.post("/api/v1/events/{run_id}/{name}", response_model=EventDelivered, dependencies=auth,
              responses=_errors(400, 401, 404, 409, 413, 503), openapi_extra=_RAW_JSON_BODY, tags=["events"])
    async def deliver(request: Request, run_id: str = Path(json_schema_extra=_NAME),
                      name: str = Path(json_schema_extra=_NAME), _: None = _query_params()) -> EventDelivered:
        """Deliver the raw JSON body to one run as event ``name`` (Zart's ``offer_event``).

        A wait for ``name`` in that run receives it; if the run is not waiting yet, the event
        is kept, in the order sent, until it waits.
        """
        payload = await _json_body(request, max_body_bytes, limits)
        try:
            receipt = await bide.event.aio_send(run_id, name, payload)
        except RunNotFoundError as e:
            raise HTTPException(404, str(e)) from None
        except RunAlreadyFinishedError as e:
            raise HTTPException(409, str(e)) from None
        except PayloadTooLargeError as e:
            raise HTTPException(413, str(e)) from None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return EventDelivered(execution_id=receipt.execution_id, event_name=receipt.event_name)

    @app.get("/api/v1/events", response_model=EventList, dependencies=auth, responses=_errors(400, 401, 503),
             tags=["events"])
    async def list_events(
        key: str | None = Query(None, description="events of this key only (any scope)",
                                json_schema_extra={"anyOf": [_NAME, {"type": "null"}]}),
        since: str | None = Query(None, description="events stored at or after this time: RFC 3339, or a "
                                  "duration ago such as `10m` (`ms`, `s`, `m`, `h` or `d`)",
                                  json_schema_extra={"anyOf": [{"type": "string", "format": "date-time"},
                                                               {"type": "string", "pattern": SINCE_AGO_PATTERN},
                                                               {"type": "null"}]}),
        limit: int = Query(50, description=f"at most this many (1 to {MAX_EVENTS}; 400 otherwise)",
                           json_schema_extra={"minimum": 1, "maximum": MAX_EVENTS}),
        _: None = _query_params("key", "since", "limit"),
    ) -> EventList:
        """Recent events, newest first, each with the runs it resumed or started (as the router recorded them)."""
        try:
            return await event_list(bide, key, since if since is None or re.match(DURATION_AGO, since)
                                    else _moment(since, "since"), limit)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    @app.get("/api/v1/runs", response_model=RunPage, dependencies=auth, responses=_errors(400, 401, 503),
             tags=["runs"])
    async def list_runs(
        status: Literal["queued", "running", "waiting", "completed", "failed", "cancelled"] | None = Query(None),
        task: str | None = Query(None, json_schema_extra={"anyOf": [_NAME, {"type": "null"}]}),
        since: str | None = Query(None, description="runs started at or after this time (RFC 3339)",
                                  json_schema_extra=_DATE_TIME),
        until: str | None = Query(None, description="runs started at or before this time (RFC 3339)",
                                  json_schema_extra=_DATE_TIME),
        meta: list[str] | None = Query(None, description="KEY=VALUE, repeatable: every pair must be in the "
                                       "run's additional_metadata", json_schema_extra={
                                           "items": {"type": "string", "pattern": "^[^=]+="}}),
        limit: int = Query(50, ge=1, le=MAX_LIMIT),
        cursor: str | None = Query(None, json_schema_extra={"anyOf": [
            {"type": "string", "pattern": CURSOR_PATTERN}, {"type": "null"}]}),
        _: None = _query_params("status", "task", "since", "until", "limit", "cursor", repeatable=("meta",)),
    ) -> RunPage:
        """Runs, newest first (by the index's last write: a live run's start, an ended run's end)."""
        pairs = [m.partition("=") for m in meta or []]
        if any(not k or not sep for k, sep, _v in pairs):
            raise HTTPException(400, f"meta must be KEY=VALUE, got {meta!r:.200}")
        try:
            page = await bide.runs.aio_list(status=status, task=task, since=_moment(since, "since"),
                                            until=_moment(until, "until"),
                                            metadata={k: v for k, _sep, v in pairs}, limit=limit, cursor=cursor)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return RunPage(runs=[RunListed(**r.as_dict()) for r in page.runs], cursor=page.cursor)

    @app.get("/api/v1/runs/{run_id}", response_model=RunState | RunDetail, dependencies=auth,
             responses=_errors(400, 401, 404, 503), tags=["runs"])
    async def get_run(run_id: str = Path(json_schema_extra=_NAME),
                      detail: Literal["full"] | None = Query(None, description="`full`: the whole run (input, "
                                                             "metadata, history, pending waits, children)"),
                      _: None = _query_params("detail")) -> RunState | RunDetail:
        """A run's state; with `?detail=full`, the whole run. 404 if there is no such run: it never
        existed, or it finished and was removed after the history retention (`BIDE_HISTORY_RETENTION`)."""
        try:
            if detail == "full":
                return await run_detail(bide, run_id)
            info = await bide.runs.aio_get(run_id)
        except RunNotFoundError as e:
            raise HTTPException(404, str(e)) from None
        except ValueError as e:  # not a run id at all (a control character in it)
            raise HTTPException(400, str(e)) from None
        return RunState(run_id=info.run_id, task=info.task, status=info.status.value,
                        started_at=info.started_at.isoformat(), result=info.result, error=info.error,
                        entries=info.entries, trace_id=info.trace_id)

    @app.post("/api/v1/runs/{run_id}/cancel", response_model=RunCancelled, dependencies=auth,
              responses=_errors(400, 401, 404, 413, 503), openapi_extra=_CANCEL_BODY, tags=["runs"])
    async def cancel_run(request: Request, run_id: str = Path(json_schema_extra=_NAME),
                         _: None = _query_params()) -> RunCancelled:
        """Cancel a run, its children (transitively) and its pending waits.

        The cancellation is asynchronous: the run ends ``cancelled`` shortly after. ``cancelled``
        is ``false`` if the run had already finished.
        """
        body = await _json_body(request, max_body_bytes, limits)
        reason = _cancel_reason(body, empty=not (await request.body()).strip())
        try:
            cancelled = await bide.runs.aio_cancel(run_id, reason=reason)
        except RunNotFoundError as e:
            raise HTTPException(404, str(e)) from None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return RunCancelled(run_id=run_id, cancelled=cancelled)

    return app


# -- serving ---------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (the caller owns SIGINT/SIGTERM and cancels us)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.listening.set()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; ``OSError`` (e.g. the port is taken) names the address."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve_http(
    bide: Bide,
    host: str,
    port: int,
    token: str | None,
    ready: asyncio.Event | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Serve the HTTP API on ``host:port`` in the running loop until cancelled.

    ``ready`` is set once the server accepts connections. Cancelling the task shuts the
    server down gracefully (in-flight requests get up to 5 s) before the cancellation
    propagates. Raises ``OSError`` naming the address if it cannot be bound.
    """
    # An open server on loopback answers to loopback names only (a page cannot rebind a name to it).
    loopback = host in LOOPBACK_NAMES
    app = create_app(bide, token, max_body_bytes, LOOPBACK_NAMES if token is None and loopback else None)
    await serve_app(app, host, port, ready)


async def serve_app(app: ASGIApp, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve ``app`` on ``host:port`` in the running loop until cancelled (see :func:`serve_http`)."""
    # Bound here rather than by uvicorn, which logs a bind error and calls sys.exit().
    listening = bind(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=5)
    server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listening]), name=f"bide-http-{host}:{port}")
    try:
        started = asyncio.create_task(server.listening.wait())
        try:
            await asyncio.wait([serving, started], return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if server.started and ready is not None:
            ready.set()
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        await asyncio.gather(serving, return_exceptions=True)
        raise
    finally:
        if not serving.done():
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        listening.close()
