"""The web UI: runs, a run, events and workers, as server-rendered pages on the HTTP API's port.

=====================================  =====================================================
``GET /``                              the runs, newest first: filters, cursor paging, live
``GET /runs/{run}``                    a run: input, result or error, timeline, waits, children
``POST /runs/{run}/cancel|rerun|send`` its actions (HTML forms)
``GET /events``, ``POST /events``      recent events; push one
``GET /workers``                       hosts up, their tasks and slots, router partitions
``GET|POST /login``, ``POST /logout``  the session cookie (only when a token is configured)
``GET /ui/static/{file}``              the one script and style sheet (no third-party code)
=====================================  =====================================================

A live page polls itself with ``?fragment=1`` every 2 s (``ui.js``) and swaps in the part
that changes. Every page works without the script (forms post and redirect).

Auth. With a token, pages need it too: ``POST /login`` takes it once and sets an HttpOnly,
SameSite=Strict cookie holding a keyed hash of it (not the token: the cookie opens the pages,
never the API, which takes the bearer token only). Every form POST must carry an ``Origin``
whose host is the request's ``Host`` (a cross-site form sends its own origin; the Strict cookie
is not sent cross-site either); ``_Guard``'s Host check on an open loopback server makes the
Host trustworthy there. Pages are sent with a CSP (scripts from this origin only) and may not
be framed (no clickjacking of the cancel button).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Scope

from actors.apps.web_views import recent_events, run_page, to_json
from actors.engine.wire import utcnow
from sdk import Bide, RunAlreadyFinishedError, RunNotFoundError
from sdk.errors import BideError

WEB = Path(__file__).parent / "web"
STATIC = {"ui.js": "text/javascript", "ui.css": "text/css"}
SESSION_COOKIE = "bide_session"
TRACE_URL_ENV = "BIDE_TRACE_URL"
PAGE_SIZE = 50
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
NOTICES = {
    "cancelled": "Cancel requested: the run, its children and its waits end shortly.",
    "finished": "The run had already finished: nothing was cancelled.",
    "rerun": "Started this run with the same input and metadata as the one it re-runs.",
    "sent": "Event sent to this run.",
    "pushed": "Event pushed.",
}

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(WEB / "templates"), autoescape=True)


def _when(at: datetime | None) -> str:
    return "" if at is None else f"{at:%Y-%m-%d %H:%M:%S}Z"


def _took(start: datetime, end: datetime | None) -> str:
    seconds = max(0.0, ((end or utcnow()) - start).total_seconds())
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60)}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60)}m"


_env.filters.update(when=_when, json=to_json)
_env.globals.update(took=_took)


# -- auth: the session cookie and the Origin check -------------------------------------------------


def session_value(token: bytes) -> str:
    """The cookie's value: a keyed hash of the token, the same on every server sharing the token."""
    return hmac.new(token, b"bide web ui session v1", hashlib.sha256).hexdigest()


def is_ui_path(path: str) -> bool:
    """A page or action of the UI that needs the session (the login page and static files do not)."""
    return path == "/" or path.startswith(("/runs/", "/events", "/workers", "/logout"))


def ui_refusal(scope: Scope, headers: dict[bytes, bytes], token: bytes | None) -> ASGIApp | None:
    """Why ``_Guard`` refuses a UI request (``None`` if it may pass): with a token, no session cookie
    (nor the bearer token).

    A page asked for without the cookie redirects to the login form; anything else gets 401.
    """
    path = str(scope.get("path", ""))
    if token is None or not is_ui_path(path):
        return None
    scheme, _, given = headers.get(b"authorization", b"").strip().partition(b" ")
    if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token):
        return None  # a program (curl) may read the pages with the API's bearer token
    cookies = cookie_parser(headers.get(b"cookie", b"").decode("latin-1"))
    if hmac.compare_digest(cookies.get(SESSION_COOKIE, "").encode(), session_value(token).encode()):
        return None
    if scope.get("method") in ("GET", "HEAD"):
        query = scope.get("query_string", b"").decode("latin-1")
        target = path + (f"?{query}" if query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    return _render("error.html", 401, title="Log in first",
                   message="This server needs its API token: log in at /login.")


class UIError(Exception):
    """A request the UI refuses, with the status and the message the page shows."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_origin(request: Request) -> None:
    """CSRF: a form POST must come from a page of this server (``Origin`` host equal to ``Host``)."""
    origin = request.headers.get("origin")
    host = request.headers.get("host", "")
    if not origin or origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
        raise UIError(403, f"refused: a form must be posted from this server's own pages (Origin {origin!r} "
                           f"does not match Host {host!r})")


# -- rendering -------------------------------------------------------------------------------------


def _render(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("token_required", False)
    context.setdefault("notice", None)
    context.setdefault("nav", "")
    html = _env.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def _html_errors(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Bad input, an unknown run or an unreachable NATS as a page naming the problem, never a 500."""

    @functools.wraps(handler)
    async def wrapped(*args: Any, **kwargs: Any) -> Response:
        try:
            return await handler(*args, **kwargs)
        except UIError as e:
            return _render("error.html", e.status, title="Refused" if e.status == 403 else "Cannot do that",
                           message=e.message)
        except RunNotFoundError as e:
            return _render("error.html", 404, title="No such run", message=str(e))
        except ValueError as e:  # not a run id at all (a control character in it)
            return _render("error.html", 400, title="Cannot do that", message=str(e))
        except (ConnectionError, TimeoutError) as e:
            return _render("error.html", 503, title="NATS JetStream is unavailable",
                           message=f"{type(e).__name__}: {e}")

    return wrapped


async def form_of(request: Request) -> dict[str, str]:
    """A form's fields (URL-encoded, as every form of the UI posts them; the last of a repeated name wins)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise UIError(415, f"a form must be posted as application/x-www-form-urlencoded, got {kind or 'none'}")
    try:
        return dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
    except UnicodeDecodeError as e:
        raise UIError(400, f"the form is not UTF-8: {e}") from None


def parse_payload(text: str, what: str) -> Any:
    """A form's JSON text (empty is ``null``); :class:`UIError` naming the position of a mistake."""
    import json

    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UIError(400, f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise UIError(400, f"{what} is nested too deeply") from None


def parse_pairs(text: str, what: str) -> dict[str, str]:
    """``k=v`` pairs separated by commas or lines; :class:`UIError` naming a pair without ``=``."""
    out: dict[str, str] = {}
    for part in text.replace("\n", ",").split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise UIError(400, f"{what}: {part.strip()!r} is not a key=value pair")
        out[k.strip()] = v.strip()
    return out


def trace_url_template() -> str | None:
    """``BIDE_TRACE_URL``, e.g. ``http://localhost:16686/trace/{trace_id}``; ``ValueError`` without ``{trace_id}``."""
    url = os.environ.get(TRACE_URL_ENV) or None
    if url is not None and "{trace_id}" not in url:
        raise ValueError(f"{TRACE_URL_ENV}={url!r} must contain {{trace_id}}, e.g. "
                         "http://localhost:16686/trace/{trace_id}")
    return url


# -- the routes ------------------------------------------------------------------------------------


def ui_router(bide: Bide, token: str | None) -> APIRouter:
    """The UI's routes over ``bide``; ``token`` (if not ``None``) is what ``POST /login`` takes."""
    router = APIRouter(include_in_schema=False)
    trace_url = trace_url_template()
    secret = token.encode() if token is not None else None
    base = {"token_required": secret is not None}

    def page(template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return _render(template, status, **base, **context)

    @router.get("/ui/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response((WEB / "static" / name).read_bytes(), media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    @router.get("/login")
    async def login_form(next: str = "/") -> Response:
        if secret is None:
            return RedirectResponse("/", status_code=303)
        return page("login.html", next=next, error=None, nav="login")

    @router.post("/login")
    @_html_errors
    async def login(request: Request) -> Response:
        check_origin(request)
        form = await form_of(request)
        target = form.get("next") or "/"
        if not target.startswith("/") or target.startswith("//"):
            target = "/"  # never redirect off this server
        if secret is None:
            return RedirectResponse(target, status_code=303)
        given = form.get("token", "").strip().encode()
        if not hmac.compare_digest(given, secret):
            return page("login.html", 401, next=target, error="wrong token", nav="login")
        resp = RedirectResponse(target, status_code=303)
        resp.set_cookie(SESSION_COOKIE, session_value(secret), httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
        return resp

    @router.post("/logout")
    @_html_errors
    async def logout(request: Request) -> Response:
        check_origin(request)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return resp

    # -- runs --------------------------------------------------------------------------------------

    @router.get("/")
    @_html_errors
    async def runs(request: Request, status: str = "", task: str = "", since: str = "", meta: str = "",
                   cursor: str = "", fragment: str = "") -> Response:
        filters = {"status": status, "task": task, "since": since, "meta": meta}
        error, listing, code = None, None, 200
        try:
            listing = await bide.runs.aio_list(status=status or None, task=task.strip() or None,
                                               since=since.strip() or None,
                                               metadata=parse_pairs(meta, "metadata filter") or None,
                                               limit=PAGE_SIZE, cursor=cursor or None)
        except (ValueError, UIError, BideError) as e:
            error, code = str(e), 400
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in filters.items() if v)
        context = dict(filters=filters, listing=listing, error=error, query=query, cursor=cursor, nav="runs",
                       notice=None)
        return page("_runs_table.html" if fragment else "runs.html", code, **context)

    @router.get("/runs/{run_id}")
    @_html_errors
    async def run(run_id: str, done: str = "", fragment: str = "") -> Response:
        view = await run_page(bide, run_id)
        link = trace_url.replace("{trace_id}", view.trace_id) if trace_url else None
        return page("_run_live.html" if fragment else "run.html", run=view, trace_link=link,
                    notice=NOTICES.get(done), form=None, form_error=None, nav="runs")

    async def run_with_error(run_id: str, status: int, error: str, form: dict[str, str]) -> Response:
        view = await run_page(bide, run_id)
        link = trace_url.replace("{trace_id}", view.trace_id) if trace_url else None
        return page("run.html", status, run=view, trace_link=link, notice=None, form=form, form_error=error,
                    nav="runs")

    @router.post("/runs/{run_id}/cancel")
    @_html_errors
    async def cancel(request: Request, run_id: str) -> Response:
        check_origin(request)
        cancelled = await bide.runs.aio_cancel(run_id, reason="cancelled from the web UI")
        return RedirectResponse(f"/runs/{quote(run_id, safe='')}?done={'cancelled' if cancelled else 'finished'}",
                                status_code=303)

    @router.post("/runs/{run_id}/rerun")
    @_html_errors
    async def rerun(request: Request, run_id: str) -> Response:
        check_origin(request)
        hist = await bide.runs.aio_history(run_id)
        first = hist.started
        try:
            ref = await bide.aio_run_no_wait_by_name(first.task, first.input,
                                                     additional_metadata=first.additional_metadata or None)
        except (ValueError, BideError) as e:
            raise UIError(400, f"cannot re-run {run_id}: {e}") from None
        return RedirectResponse(f"/runs/{quote(ref.workflow_run_id, safe='')}?done=rerun", status_code=303)

    @router.post("/runs/{run_id}/send")
    @_html_errors
    async def send(request: Request, run_id: str) -> Response:
        check_origin(request)
        form = await form_of(request)
        name = form.get("name", "").strip()
        try:
            if not name:
                raise UIError(400, "the event name is empty: give the name the run waits for")
            payload = parse_payload(form.get("payload", ""), "the payload")
            await bide.event.aio_send(run_id, name, payload)
        except UIError as e:
            return await run_with_error(run_id, e.status, e.message, form)
        except RunAlreadyFinishedError as e:
            return await run_with_error(run_id, 409, str(e), form)
        except ValueError as e:  # a payload over the limits
            return await run_with_error(run_id, 400, str(e), form)
        return RedirectResponse(f"/runs/{quote(run_id, safe='')}?done=sent", status_code=303)

    # -- events ------------------------------------------------------------------------------------

    async def events_page(status: int, key: str, notice: str | None, form: dict[str, str] | None,
                          error: str | None, fragment: bool = False) -> Response:
        rows = await recent_events(bide, PAGE_SIZE, key.strip() or None)
        return page("_events_table.html" if fragment else "events.html", status, events=rows, key=key,
                    notice=notice, form=form or {}, form_error=error, nav="events")

    @router.get("/events")
    @_html_errors
    async def events(key: str = "", done: str = "", seq: str = "", fragment: str = "") -> Response:
        notice = NOTICES.get(done)
        if notice and seq.isdigit():
            notice = f"{notice} Stream sequence {seq}."
        return await events_page(200, key, notice, None, None, bool(fragment))

    @router.post("/events")
    @_html_errors
    async def push(request: Request) -> Response:
        check_origin(request)
        form = await form_of(request)
        try:
            key = form.get("key", "").strip()
            if not key:
                raise UIError(400, "the event key is empty: give a key such as order:approved")
            payload = parse_payload(form.get("payload", ""), "the payload")
            metadata = parse_pairs(form.get("metadata", ""), "metadata") or None
            ref = await bide.event.aio_push(key, payload, scope=form.get("scope", "").strip() or None,
                                            metadata=metadata)
        except UIError as e:
            return await events_page(e.status, "", None, form, e.message)
        except ValueError as e:
            return await events_page(400, "", None, form, str(e))
        return RedirectResponse(f"/events?done=pushed&seq={ref.seq}", status_code=303)

    # -- workers -----------------------------------------------------------------------------------

    @router.get("/workers")
    @_html_errors
    async def workers(fragment: str = "") -> Response:
        from actors.hosting.router_partitions import deployment_status

        conn = await bide._pool.get()
        st = await deployment_status(conn.nc, conn.layout)
        return page("_workers_live.html" if fragment else "workers.html", deployment=st, nav="workers")

    return router
