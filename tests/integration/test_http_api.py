"""The HTTP API against a real nats-server: in-process (ASGI) and through a real uvicorn server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from actors.apps.http_api import create_app, serve_http
from actors.store.server import free_port
from sdk import Bide, DurableContext, EmptyModel, RunStatus
from tests.support import running_worker, wait_until

TOKEN = "s3cret-token"


def client_for(bide: Bide, token: str | None = None, max_body_bytes: int = 1_048_576) -> httpx.AsyncClient:
    """A client of the API as a program uses it: it says it sends JSON (an open API takes nothing else)."""
    app = create_app(bide, token, max_body_bytes=max_body_bytes)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bide.test",
                             headers={"Content-Type": "application/json"})


@pytest.fixture
async def api(bide: Bide) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(bide) as client:
        yield client


async def waiting(bide: Bide, run_id: str, waits: int = 1) -> None:
    """Until the run has registered its ``waits``-th wait and been evicted."""

    async def _is_waiting() -> bool:
        hist = await bide.runs.aio_history(run_id)
        registered = sum(e.k == "wait_registered" for e in hist.entries)
        return registered >= waits and (await bide.runs.aio_get(run_id)).status is RunStatus.WAITING

    await wait_until(_is_waiting, what=f"run {run_id} to wait")


async def test_push_resumes_a_waiting_run(bide: Bide, api: httpx.AsyncClient) -> None:
    @bide.durable_task(name="WaitsForSignup")
    async def waits_for_signup(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        return {"got": await ctx.aio_wait_for_event("user:signup")}

    async with running_worker(bide, [waits_for_signup]):
        ref = await waits_for_signup.aio_run_no_wait(EmptyModel())
        await waiting(bide, ref.workflow_run_id)
        resp = await api.post("/api/v1/events", json={"key": "user:signup", "payload": {"user": "ada"},
                                                      "event_id": "signup-1", "metadata": {"source": "test"}})
        assert resp.status_code == 202, resp.text
        body = resp.json()
        assert body["status"] == "accepted" and body["event_id"] == "signup-1"
        assert body["key"] == "user:signup" and body["scope"] is None and body["seq"] >= 1
        assert await ref.aio_result(timeout=10) == {"got": {"user": "ada"}}


async def test_webhook_with_a_slash_in_the_key_through_a_real_server(bide: Bide) -> None:
    @bide.durable_task(name="WaitsForAccount")
    async def waits_for_account(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        return {"got": await ctx.aio_wait_for_event("app/account.created", scope="acct-1")}

    port = free_port()
    ready = asyncio.Event()
    server = asyncio.create_task(serve_http(bide, "127.0.0.1", port, TOKEN, ready))
    await asyncio.wait_for(ready.wait(), 10)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with running_worker(bide, [waits_for_account]), \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            ref = await waits_for_account.aio_run_no_wait(EmptyModel())
            await waiting(bide, ref.workflow_run_id)
            denied = await http.post("/api/v1/webhooks/app/account.created", content=b'{"id": 7}')
            assert denied.status_code == 401
            resp = await http.post("/api/v1/webhooks/app/account.created", params={"scope": "acct-1"},
                                   content=b'{"id": 7, "plan": "pro"}', headers=auth)
            assert resp.status_code == 202, resp.text
            assert resp.json()["key"] == "app/account.created" and resp.json()["scope"] == "acct-1"
            assert await ref.aio_result(timeout=10) == {"got": {"id": 7, "plan": "pro"}}
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
    assert server.cancelled()
    with socket.socket() as s:  # the listening socket was closed on cancel
        s.bind(("127.0.0.1", port))


async def test_direct_delivery_answers_like_zart(bide: Bide, api: httpx.AsyncClient) -> None:
    @bide.durable_task(name="NeedsApproval")
    async def needs_approval(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        return {"approval": await ctx.aio_wait_for_event("manager-approval", timeout="30s")}

    async with running_worker(bide, [needs_approval]):
        ref = await needs_approval.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id
        await waiting(bide, run_id)
        resp = await api.post(f"/api/v1/events/{run_id}/manager-approval", content=b'{"approved": true}')
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"status": "delivered", "execution_id": run_id, "event_name": "manager-approval"}
        assert await ref.aio_result(timeout=10) == {"approval": {"approved": True}}

        late = await api.post(f"/api/v1/events/{run_id}/manager-approval", content=b"1")
        assert late.status_code == 409
        assert run_id in late.json()["detail"] and "finished" in late.json()["detail"]


async def test_unknown_run_is_404(api: httpx.AsyncClient) -> None:
    resp = await api.post("/api/v1/events/no-such-run/manager-approval", content=b"{}")
    assert resp.status_code == 404
    assert resp.json() == {"detail": "no run with id 'no-such-run'"}


@pytest.mark.parametrize(("body", "content_type", "reason"), [
    (b'{"key": "k\xff"}', "application/json", "request body is not UTF-8 (byte 10"),
    ('{"key": "caf\u00e9"}'.encode("latin-1"), "application/json; charset=latin-1", "request body is not UTF-8"),
    (b'{"key":"k","payload":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", "64 levels of nesting"),
], ids=["not utf-8", "latin-1", "nested 100,000 deep"])
async def test_a_body_the_event_model_cannot_parse_names_the_reason(api: httpx.AsyncClient, body: bytes,
                                                                    content_type: str, reason: str) -> None:
    # FastAPI answered "There was an error parsing the body", naming nothing.
    resp = await api.post("/api/v1/events", content=body, headers={"content-type": content_type})
    assert resp.status_code == 400
    assert reason in resp.json()["detail"]


async def test_a_since_too_far_back_names_the_reason(api: httpx.AsyncClient) -> None:
    # `since=99999999d` said "is not an RFC 3339 time", though `<n>d` is a documented form.
    resp = await api.get("/api/v1/events?since=99999999d")
    assert resp.status_code == 400
    assert "'99999999d' is longer than 100 years" in resp.json()["detail"]
    assert (await api.get("/api/v1/events?since=9999d")).status_code == 200


async def test_a_run_id_with_a_control_character_is_400_not_500(api: httpx.AsyncClient) -> None:
    for resp in (await api.get("/api/v1/runs/a%0Fb"), await api.get("/api/v1/runs/a%0Fb?detail=full"),
                 await api.post("/api/v1/runs/a%0Fb/cancel")):
        assert resp.status_code == 400, resp.text
        assert "holds the control character '\\x0f'" in resp.json()["detail"]


@pytest.mark.parametrize("path", ["/api/v1/events", "/api/v1/webhooks/k", "/api/v1/events/some-run/ev"])
async def test_a_body_that_is_not_json_is_400_with_the_reason(api: httpx.AsyncClient, path: str) -> None:
    resp = await api.post(path, content=b'{"key": "k",', headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["detail"].startswith("request body is not valid JSON: ")
    assert len(resp.json()["detail"]) > len("request body is not valid JSON: ")


async def test_bad_fields_are_refused_with_the_reason(api: httpx.AsyncClient) -> None:
    missing = await api.post("/api/v1/events", json={"payload": {"a": 1}})
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "key"]
    unknown = await api.post("/api/v1/events", json={"key": "k", "paylod": 1})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "paylod"]
    spaced = await api.post("/api/v1/events", json={"key": " k "})
    assert spaced.status_code == 400 and "event key" in spaced.json()["detail"]
    bad_scope = await api.post("/api/v1/webhooks/k", params={"scope": " "}, content=b"{}")
    assert bad_scope.status_code == 400 and "scope" in bad_scope.json()["detail"]


async def test_an_oversized_body_is_413(bide: Bide) -> None:
    async with client_for(bide, max_body_bytes=64) as api:
        declared = await api.post("/api/v1/webhooks/k", content=b"[" + b"1," * 40 + b"1]")
        assert declared.status_code == 413
        assert "64 bytes" in declared.json()["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b"1" * 10

        streamed = await api.post("/api/v1/events", content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413 and "64 bytes" in streamed.json()["detail"]

        small = await api.post("/api/v1/webhooks/k", content=b'{"ok": true}')
        assert small.status_code == 202, small.text


async def test_bearer_token(bide: Bide) -> None:
    async with client_for(bide, token=TOKEN) as api:
        missing = await api.post("/api/v1/events", json={"key": "k"})
        assert missing.status_code == 401
        assert missing.json() == {"detail": "missing bearer token"}
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")

        wrong = await api.post("/api/v1/events", json={"key": "k"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code in (401, 403) and "invalid bearer token" in wrong.json()["detail"]
        basic = await api.post("/api/v1/events/r/e", content=b"{}", headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status_code in (401, 403) and "Bearer" in basic.json()["detail"]
        # Refused before the body is looked at: no token and a broken body is still 401.
        assert (await api.post("/api/v1/webhooks/k", content=b"{")).status_code == 401

        ok = await api.post("/api/v1/events", json={"key": "k"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 202, ok.text
        assert (await api.get("/healthz")).json() == {"status": "ok"}


async def test_openapi_documents_the_endpoints(bide: Bide) -> None:
    async with client_for(bide, token=TOKEN) as api:
        spec = (await api.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in ("/api/v1/events", "/api/v1/webhooks/{key}", "/api/v1/events/{run_id}/{name}"):
        assert "post" in paths[path], path
    assert "get" in paths["/healthz"]
    schemas = spec["components"]["schemas"]
    assert {"PushEventRequest", "EventAccepted", "EventDelivered", "ErrorDetail"} <= set(schemas)
    assert set(schemas["PushEventRequest"]["properties"]) == {"key", "payload", "scope", "event_id", "metadata",
                                                              "additional_metadata"}
    delivered = paths["/api/v1/events/{run_id}/{name}"]["post"]["responses"]
    assert {"200", "404", "409", "401"} <= set(delivered)
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


async def test_cancel_a_waiting_run_then_it_is_already_finished(bide: Bide) -> None:
    @bide.durable_task(name="HttpNeverResumes")
    async def never_resumes(input: EmptyModel, ctx: DurableContext) -> None:
        await ctx.aio_wait_for_event("never")

    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with running_worker(bide, [never_resumes]), client_for(bide, token=TOKEN) as api:
        ref = await never_resumes.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id
        await waiting(bide, run_id)
        denied = await api.post(f"/api/v1/runs/{run_id}/cancel", json={"reason": "no token"})
        assert denied.status_code == 401
        assert (await bide.runs.aio_get(run_id)).status is RunStatus.WAITING

        resp = await api.post(f"/api/v1/runs/{run_id}/cancel", json={"reason": "over HTTP"}, headers=auth)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"run_id": run_id, "cancelled": True}

        async def is_cancelled() -> bool:
            return (await bide.runs.aio_get(run_id)).status is RunStatus.CANCELLED

        await wait_until(is_cancelled, what=f"run {run_id} to be cancelled")
        terminal = (await bide.runs.aio_history(run_id)).terminal
        assert terminal is not None and terminal.k == "run_cancelled" and terminal.reason == "over HTTP"

        again = await api.post(f"/api/v1/runs/{run_id}/cancel", headers=auth)  # no body: the default reason
        assert again.status_code == 200, again.text
        assert again.json() == {"run_id": run_id, "cancelled": False}


async def test_cancel_without_a_body_uses_the_default_reason(bide: Bide, api: httpx.AsyncClient) -> None:
    @bide.durable_task(name="HttpNeverResumesEither")
    async def never_resumes(input: EmptyModel, ctx: DurableContext) -> None:
        await ctx.aio_wait_for_event("never")

    async with running_worker(bide, [never_resumes]):
        ref = await never_resumes.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id
        await waiting(bide, run_id)
        resp = await api.post(f"/api/v1/runs/{run_id}/cancel")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"run_id": run_id, "cancelled": True}

        async def is_cancelled() -> bool:
            return (await bide.runs.aio_get(run_id)).status is RunStatus.CANCELLED

        await wait_until(is_cancelled, what=f"run {run_id} to be cancelled")
        terminal = (await bide.runs.aio_history(run_id)).terminal
        assert terminal is not None and terminal.reason == "cancelled by request"


async def test_cancel_an_unknown_run_is_404(api: httpx.AsyncClient) -> None:
    resp = await api.post("/api/v1/runs/no-such-run/cancel", json={"reason": "why not"})
    assert resp.status_code == 404
    assert resp.json() == {"detail": "no run with id 'no-such-run'"}
    empty = await api.post("/api/v1/runs/no-such-run/cancel")
    assert empty.status_code == 404


@pytest.mark.parametrize(("body", "why"), [
    (b'["reason"]', "must be a JSON object"),
    (b'"stop"', "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b'{"reason": 42}', "'reason' must be a string"),
    (b'{"reason": null}', "'reason' must be a string"),
    (b'{"reasn": "typo"}', "unknown field(s) in the request body: 'reasn'"),
    (b'{"reason": ', "request body is not valid JSON: "),
    (b'{"reason": "' + b"x" * 5000 + b'"}', "cancel reason is 5,000 bytes, more than the 4,096 allowed"),
])
async def test_cancel_with_a_bad_body_is_400_with_the_reason(bide: Bide, api: httpx.AsyncClient, body: bytes,
                                                             why: str) -> None:
    @bide.durable_task(name="HttpNotCancelled")
    async def not_cancelled(input: EmptyModel, ctx: DurableContext) -> None:
        await ctx.aio_wait_for_event("never")

    run_id = (await not_cancelled.aio_run_no_wait(EmptyModel())).workflow_run_id  # exists: the body is at fault
    resp = await api.post(f"/api/v1/runs/{run_id}/cancel", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert why in resp.json()["detail"]
    assert (await bide.runs.aio_history(run_id)).terminal is None  # nothing was cancelled


async def test_openapi_documents_cancel(bide: Bide) -> None:
    async with client_for(bide) as api:
        spec = (await api.get("/openapi.json")).json()
    cancel = spec["paths"]["/api/v1/runs/{run_id}/cancel"]["post"]
    assert {"200", "400", "404"} <= set(cancel["responses"])
    assert "reason" in cancel["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(spec["components"]["schemas"]["RunCancelled"]["properties"]) == {"run_id", "cancelled"}


async def test_an_open_api_refuses_what_a_browser_page_could_send_cross_site(bide: Bide) -> None:
    """No token: a POST that is not JSON (a form, text, no body at all) and a rebinding Host are refused."""
    from actors.apps.http_api import LOOPBACK_NAMES

    app = create_app(bide, None, allowed_hosts=LOOPBACK_NAMES)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080") as api:
        form = await api.post("/api/v1/runs/r1/cancel", data={"reason": "x"})
        assert form.status_code == 415 and "application/json" in form.json()["detail"]
        bare = await api.post("/api/v1/webhooks/k", content=b'{"id": 1}')  # no Content-Type (fetch no-cors)
        assert bare.status_code == 415
        text = await api.post("/api/v1/events/r1/go", content=b"{}", headers={"Content-Type": "text/plain"})
        assert text.status_code == 415
        ok = await api.post("/api/v1/webhooks/k", json={"id": 1})
        assert ok.status_code == 202
        rebound = await api.get("/healthz", headers={"Host": "evil.example:8080"})
        assert rebound.status_code == 421 and "evil.example" in rebound.json()["detail"]
        assert (await api.get("/healthz", headers={"Host": "localhost:8080"})).status_code == 200
    # With a token, the token is what keeps pages out: any content type with it is served.
    async with client_for(bide, TOKEN) as api:
        auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain"}
        assert (await api.post("/api/v1/webhooks/k", content=b'{"id": 1}', headers=auth)).status_code == 202


async def test_an_unknown_field_names_the_fields_there_are(api: httpx.AsyncClient) -> None:
    """Inngest's events carry `data`; here the payload is `payload`, and the 422 says so."""
    resp = await api.post("/api/v1/events", json={"key": "k", "data": {"a": 1}})
    assert resp.status_code == 422
    (err,) = resp.json()["detail"]
    assert err["loc"] == ["body", "data"]
    assert err["msg"] == ("Extra inputs are not permitted: 'data' is not a field here; "
                          "the fields are key, payload, scope, event_id, metadata, additional_metadata")


@pytest.mark.parametrize("event_id", [" ", "dup-1 ", "\tdup-1\n", "e" * 70_000, "\x1b[2J"],
                         ids=["blank", "trailing-space", "surrounding-controls", "over-64k", "escape"])
async def test_an_event_id_a_header_cannot_carry_unchanged_is_refused(api: httpx.AsyncClient, bide: Bide,
                                                                     event_id: str) -> None:
    """nats-py strips a header's value: `"dup-1 "` was stored as `"dup-1"`, a silent duplicate, while the
    reply named the caller's id; an id over 64 KiB was a 500."""
    resp = await api.post("/api/v1/events", json={"key": "k", "event_id": event_id, "payload": {}})
    assert resp.status_code == 400 and "event_id of event 'k'" in resp.json()["detail"], resp.text
    with pytest.raises(ValueError, match="event_id of event 'k'"):
        await bide.event.aio_push("k", {}, event_id=event_id)


async def test_a_webhook_key_that_is_not_utf8_is_refused(api: httpx.AsyncClient) -> None:
    """`/api/v1/webhooks/%C3%28` was pushed as key '\\ufffd(' (the path decoded with replacement characters)."""
    resp = await api.post("/api/v1/webhooks/%C3%28", content=b"{}")
    assert resp.status_code == 400 and "not UTF-8" in resp.json()["detail"], resp.text
    ok = await api.post("/api/v1/webhooks/caf%C3%A9", content=b"{}")
    assert ok.status_code == 202 and ok.json()["key"] == "café", ok.text
