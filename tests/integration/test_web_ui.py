"""The web UI's pages over plain HTTP (no browser), against a real nats-server: content, login, CSRF, bad input."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from actors.apps.http_api import create_app
from actors.apps.run_graph import child_tree
from actors.apps.web_ui import SESSION_COOKIE
from actors.store.server import EmbeddedServer
from sdk import Bide, Context, DurableContext, EmptyModel, RunFailedError, RunStatus
from tests.e2e.test_cli_events import cli
from tests.integration.test_http_api import waiting
from tests.support import running_worker, wait_until

TOKEN = "ui-s3cret"


def dag_rows(html: str) -> list[tuple[str, str, str]]:
    """(task, state, after) of each row of a workflow run's task table."""
    return re.findall(r'<tr class="dag-task" data-task="[^"]+"><td>([^<]+)</td>'
                      r'<td><span class="status \w+">(\w+)</span></td><td>([^<]*)</td>', html)

BASE = "http://bide.test"
SAME_ORIGIN = {"Origin": BASE}


def ui_client(bide: Bide, token: str | None = None) -> httpx.AsyncClient:
    app = create_app(bide, token)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


@pytest.fixture
async def ui(bide: Bide) -> AsyncIterator[httpx.AsyncClient]:
    async with ui_client(bide) as client:
        yield client


def approval_task(bide: Bide) -> Any:
    @bide.durable_task(name="AwaitsApproval")
    async def awaits_approval(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        await ctx.aio_sleep_for(0.01)
        return {"got": await ctx.aio_wait_for_event("order:approved", scope="order-7")}

    return awaits_approval


async def test_a_waiting_run_its_event_and_the_workers_as_pages(bide: Bide, ui: httpx.AsyncClient,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    task = approval_task(bide)
    async with running_worker(bide, [task]):
        ref = await task.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id
        await waiting(bide, run_id)

        page = await ui.get(f"/runs/{run_id}")
        assert page.status_code == 200, page.text
        html = page.text
        assert "AwaitsApproval" in html and ">waiting<" in html
        assert "event &#39;order:approved&#39; scope &#39;order-7&#39;" in html  # the pending wait, escaped
        assert "turn on " in html and "sleep 0.01s" in html and "wakes at" in html  # timeline: host, sleep
        assert (await bide.runs.aio_get(run_id)).trace_id in html
        assert page.headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in page.headers[
            "Content-Security-Policy"]
        fragment = await ui.get(f"/runs/{run_id}", params={"fragment": "1"})
        assert fragment.status_code == 200 and "<html" not in fragment.text and "waiting" in fragment.text

        workers = await ui.get("/workers")
        assert workers.status_code == 200 and "AwaitsApproval" in workers.text
        assert re.search(r"<td>\d+/\d+</td>", workers.text), "slots in use of the host"

        pushed = await ui.post("/events", data={"key": "order:approved", "scope": "order-7",
                                                "payload": '{"by": "ada"}', "metadata": "source=ui"},
                               headers=SAME_ORIGIN)
        assert pushed.status_code == 303 and pushed.headers["location"].startswith("/events?done=pushed&seq=")
        seq = int(pushed.headers["location"].rpartition("=")[2])
        assert await ref.aio_result(timeout=10) == {"got": {"by": "ada"}}

        events = await ui.get(pushed.headers["location"])
        assert "Event pushed." in events.text and "order:approved" in events.text
        assert f"<td>{seq}</td>" in events.text and "&#34;source&#34;: &#34;ui&#34;" not in events.text
        assert "order-7" in events.text and "source" in events.text

        done = (await ui.get(f"/runs/{run_id}")).text
        assert ">completed<" in done and "received event &#39;order:approved&#39;" in done
        assert f"<i>event seq</i> {seq}" in done  # which event resumed it

        # A trace backend's link, from BIDE_TRACE_URL.
        monkeypatch.setenv("BIDE_TRACE_URL", "http://jaeger.test/trace/{trace_id}")
        async with ui_client(bide) as traced:
            trace_id = (await bide.runs.aio_get(run_id)).trace_id
            assert f'href="http://jaeger.test/trace/{trace_id}"' in (await traced.get(f"/runs/{run_id}")).text
        monkeypatch.setenv("BIDE_TRACE_URL", "http://jaeger.test/trace/")
        with pytest.raises(ValueError, match=r"BIDE_TRACE_URL=.*must contain \{trace_id\}"):
            create_app(bide, None)


async def test_cancel_rerun_and_send_from_a_run_page(bide: Bide, ui: httpx.AsyncClient) -> None:
    task = approval_task(bide)
    async with running_worker(bide, [task]):
        ref = await task.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id
        await waiting(bide, run_id)

        rerun = await ui.post(f"/runs/{run_id}/rerun", headers=SAME_ORIGIN)
        assert rerun.status_code == 303, rerun.text
        new_id = rerun.headers["location"].split("/runs/")[1].split("?")[0]
        assert new_id != run_id
        assert (await bide.runs.aio_history(new_id)).started.task == "AwaitsApproval"
        assert "Started this run" in (await ui.get(rerun.headers["location"])).text

        bad = await ui.post(f"/runs/{run_id}/send", data={"name": "x", "payload": "{not json"}, headers=SAME_ORIGIN)
        assert bad.status_code == 400 and "the payload is not valid JSON" in bad.text and "{not json" in bad.text
        sent = await ui.post(f"/runs/{run_id}/send", data={"name": "nudge", "payload": "[1]"}, headers=SAME_ORIGIN)
        assert sent.status_code == 303 and sent.headers["location"].endswith("?done=sent")

        cancel = await ui.post(f"/runs/{run_id}/cancel", headers=SAME_ORIGIN)
        assert cancel.status_code == 303 and cancel.headers["location"].endswith("?done=cancelled")

        async def cancelled() -> bool:
            return (await bide.runs.aio_get(run_id)).status is RunStatus.CANCELLED

        await wait_until(cancelled, what=f"run {run_id} to be cancelled")
        page = (await ui.get(f"/runs/{run_id}")).text
        assert ">cancelled<" in page and "cancelled from the web UI" in page
        again = await ui.post(f"/runs/{run_id}/cancel", headers=SAME_ORIGIN)
        assert again.headers["location"].endswith("?done=finished")
        finished = await ui.post(f"/runs/{run_id}/send", data={"name": "late"}, headers=SAME_ORIGIN)
        assert finished.status_code == 409 and "has already finished" in finished.text
        await bide.runs.aio_cancel(new_id)


class Square(BaseModel):
    n: int


async def test_a_parent_shows_its_children_a_memo_step_and_a_failed_child_its_traceback(bide: Bide,
                                                                                      ui: httpx.AsyncClient) -> None:
    @bide.task(name="SquareOrFail")
    async def square(input: Square, ctx: Context) -> int:
        if input.n < 0:
            raise ValueError(f"no square of {input.n} today")
        return input.n * input.n

    async def double(n: int) -> int:
        await asyncio.sleep(0.02)  # a step that takes a while: its duration is recorded and shown
        return 2 * n

    @bide.durable_task(name="FansOut")
    async def fans_out(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
        doubled = await ctx.memo(double, 21)
        squares = await square.aio_run_many([Square(n=2), Square(n=3)])
        return {"doubled": doubled, "squares": squares}

    async with running_worker(bide, [square, fans_out]):
        ref = await fans_out.aio_run_no_wait(EmptyModel())
        assert await ref.aio_result(timeout=10) == {"doubled": 42, "squares": [4, 9]}
        html = (await ui.get(f"/runs/{ref.workflow_run_id}")).text
        assert "double</b>" in html and "<i>result</i> 42" in html  # the memo step (by qualified name)
        step = next(e for e in (await bide.runs.aio_history(ref.workflow_run_id)).entries if e.k == "memo")
        assert step.ms is not None and step.ms >= 20, step
        assert f"<i>took</i> {step.ms:,.1f} ms" in html
        assert "spawned 2 runs of SquareOrFail" in html
        children = re.findall(r'<li class="child"><span class="status (\w+)">\w+</span> '
                              r'<span class="task">SquareOrFail</span> <a href="/runs/([^"]+)">', html)
        assert [st for st, _ in children] == ["completed", "completed"], html
        child = (await ui.get(f"/runs/{children[0][1]}")).text
        assert f"parent {ref.workflow_run_id} (FansOut)" in child and "<pre>4</pre>" in child

        failing = await square.aio_run_no_wait(Square(n=-1))
        with pytest.raises(RunFailedError):
            await failing.aio_result(timeout=10)
        failed = (await ui.get(f"/runs/{failing.workflow_run_id}")).text
        assert ">failed<" in failed and "ValueError: no square of -1 today" in failed
        assert 'class="traceback"' in failed and "Traceback (most recent call last)" in failed


async def test_a_workflow_run_shows_its_tasks_their_states_and_parents(bide: Bide, ui: httpx.AsyncClient) -> None:
    wf = bide.workflow(name="TwoSteps")

    @wf.task()
    async def fetch(input: EmptyModel, ctx: Context) -> int:
        return 1

    @wf.task(parents=[fetch])
    async def store(input: EmptyModel, ctx: Context) -> int:
        return 2

    async with running_worker(bide, [wf]):
        ref = await wf.aio_run_no_wait(EmptyModel())
        await ref.aio_result(timeout=10)
        html = (await ui.get(f"/runs/{ref.workflow_run_id}")).text
        assert dag_rows(html) == [("fetch", "completed", ""), ("store", "completed", "fetch")], html


def diamond(bide: Bide) -> Any:
    """A -> B, C -> D, where C waits for ``diamond:go``."""
    wf = bide.workflow(name="Diamond")

    @wf.task()
    async def a(input: EmptyModel, ctx: Context) -> int:
        return 1

    @wf.task(parents=[a])
    async def b(input: EmptyModel, ctx: Context) -> int:
        return 2

    @wf.durable_task(parents=[a])
    async def c(input: EmptyModel, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("diamond:go")

    @wf.task(parents=[b, c])
    async def d(input: EmptyModel, ctx: Context) -> int:
        return 4

    return wf


async def test_a_workflow_run_is_its_dag_with_the_tasks_not_started_and_without_a_host_what_it_started(
        nats_server: EmbeddedServer, bide: Bide, ui: httpx.AsyncClient) -> None:
    wf = diamond(bide)
    async with running_worker(bide, [wf]):
        ref = await wf.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id

        async def full() -> dict[str, Any]:
            got = await ui.get(f"/api/v1/runs/{run_id}", params={"detail": "full"})
            assert got.status_code == 200, got.text
            return dict(got.json())

        async def settled() -> bool:
            doc = await full()
            dag = doc["dag"]
            # B's own run shows it completed a moment before the parent takes its report: until then
            # the parent's history still grows, and the CLI below would read more of it than this page.
            reports = sum(h["entry"]["k"] == "signal" for h in doc["history"])
            return dag is not None and reports == 2 and [(t["key"], t["state"]) for t in dag["tasks"]] == [
                ("a", "completed"), ("b", "completed"), ("c", "waiting"), ("d", "pending")]

        await wait_until(settled, what="B completed and its report taken, C waiting and D pending, every task shown")
        doc = await full()
        dag = doc["dag"]
        assert dag["workflow"] == "Diamond" and dag["shape"] == "advertised" and "test-worker" in dag["host"]
        assert [(t["task"], t["parents"]) for t in dag["tasks"]] == [
            ("Diamond:a", []), ("Diamond:b", ["a"]), ("Diamond:c", ["a"]), ("Diamond:d", ["b", "c"])]
        assert dag["tasks"][3]["run_id"] is None
        assert [t["run_id"] for t in dag["tasks"][:3]] == [c["run_id"] for c in doc["children"]]
        out = await cli("runs", "show", run_id, "--json", url=nats_server.url)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == doc

        html = (await ui.get(f"/runs/{run_id}")).text
        assert dag_rows(html) == [("a", "completed", ""), ("b", "completed", "a"), ("c", "waiting", "a"),
                                  ("d", "pending", "b, c")], html
        assert "<svg" in html and html.count('<path class="edge"') == 4 and 'class="node pending"' in html
        assert 'id="dag-note"' not in html

    # No host up: the shape is unknown; the tasks started are shown, with their states.
    html = (await ui.get(f"/runs/{run_id}")).text
    assert "shape is unknown: no host that is up serves it" in html
    assert dag_rows(html) == [("a", "completed", ""), ("b", "completed", "a"), ("c", "waiting", "a")], html
    dag = (await full())["dag"]
    assert dag["shape"] == "unknown" and dag["host"] is None and [t["key"] for t in dag["tasks"]] == ["a", "b", "c"]


class Depth(BaseModel):
    n: int


async def test_a_run_shows_its_descendants_as_a_tree_bounded_in_depth_and_count(bide: Bide,
                                                                               ui: httpx.AsyncClient) -> None:
    @bide.durable_task(name="Nests")
    async def nests(input: Depth, ctx: DurableContext) -> int:
        return 0 if input.n == 0 else 1 + int(await nests.aio_run(Depth(n=input.n - 1)))

    async with running_worker(bide, [nests]):
        ref = await nests.aio_run_no_wait(Depth(n=4))
        assert await ref.aio_result(timeout=20) == 4
    doc = (await ui.get(f"/api/v1/runs/{ref.workflow_run_id}", params={"detail": "full"})).json()
    assert doc["dag"] is None and doc["children_more"] == 0
    [child] = doc["children"]
    [grandchild] = child["children"]
    [great] = grandchild["children"]
    assert (child["more"], grandchild["more"], great["more"], great["children"]) == (0, 0, 1, [])
    assert {child["status"], grandchild["status"], great["status"]} == {"completed"}
    html = (await ui.get(f"/runs/{ref.workflow_run_id}")).text
    for node in (child, grandchild, great):
        assert f'<span class="task">Nests</span> <a href="/runs/{node["run_id"]}">' in html
    assert f'<a href="/runs/{great["run_id"]}">1 more</a>' in html  # past three levels: on its own page
    assert html.count("<ul>") >= 3  # nested: a list inside each level

    # The node bound: two runs in all, the rest counted where cut.
    top, more = await child_tree(bide, await bide.runs.aio_history(ref.workflow_run_id), budget=2)
    assert more == 0 and [len(top), len(top[0].children), top[0].children[0].children] == [1, 1, []]
    assert top[0].children[0].more == 1


async def test_bad_input_is_a_page_naming_it_never_a_500(bide: Bide, ui: httpx.AsyncClient) -> None:
    missing = await ui.get("/runs/no-such-run")
    assert missing.status_code == 404 and "no run with id &#39;no-such-run&#39;" in missing.text
    for action in ("cancel", "rerun", "send"):
        resp = await ui.post(f"/runs/no-such-run/{action}", data={"name": "n"}, headers=SAME_ORIGIN)
        assert resp.status_code == 404, (action, resp.text)
    for form, why in (({"key": "k", "payload": '{"a": }'}, "the payload is not valid JSON: Expecting value at "
                                                           "line 1 column 7"),
                      ({"key": "", "payload": "1"}, "the event key is empty"),
                      ({"key": "k", "metadata": "novalue"}, "metadata: &#39;novalue&#39; is not a key=value pair"),
                      ({"key": "k", "payload": "1" * 40}, "integers within int64")):
        resp = await ui.post("/events", data=form, headers=SAME_ORIGIN)
        assert resp.status_code == 400, (form, resp.text)
        assert why in resp.text, (why, resp.text)
    assert (await ui.get("/events", params={"done": "pushed", "seq": "<b>"})).status_code == 200
    assert (await ui.get("/ui/static/nothing.js")).status_code == 404
    assert (await ui.get("/ui/static/ui.js")).headers["content-type"].startswith("text/javascript")


async def test_form_posts_need_this_servers_origin_and_the_api_keeps_its_rules(bide: Bide,
                                                                                ui: httpx.AsyncClient) -> None:
    for headers in ({}, {"Origin": "http://evil.test"}, {"Origin": "null"}, {"Origin": "http://bide.test.evil"}):
        resp = await ui.post("/events", data={"key": "k"}, headers=headers)
        assert resp.status_code == 403 and "must be posted from this server" in resp.text, headers
    ok = await ui.post("/events", data={"key": "k"}, headers=SAME_ORIGIN)
    assert ok.status_code == 303
    # The API's own routes still take JSON only when open: a form cannot post to them.
    form = await ui.post("/api/v1/events", data={"key": "k"}, headers=SAME_ORIGIN)
    assert form.status_code == 415


async def test_with_a_token_pages_need_the_login_cookie(bide: Bide) -> None:
    async with ui_client(bide, TOKEN) as ui:
        for path in ("/", "/runs/abc", "/events?key=a", "/workers"):
            resp = await ui.get(path)
            assert resp.status_code == 303, path
            assert resp.headers["location"].startswith("/login?next=%2F"), resp.headers["location"]
        assert (await ui.post("/events", data={"key": "k"}, headers=SAME_ORIGIN)).status_code == 401
        assert (await ui.get("/ui/static/ui.css")).status_code == 200  # the login page's style sheet is open
        assert (await ui.get("/login")).status_code == 200

        wrong = await ui.post("/login", data={"token": "nope", "next": "/workers"}, headers=SAME_ORIGIN)
        assert wrong.status_code == 401 and "wrong token" in wrong.text and SESSION_COOKIE not in ui.cookies
        forged = await ui.post("/login", data={"token": TOKEN}, headers={"Origin": "http://evil.test"})
        assert forged.status_code == 403 and SESSION_COOKIE not in ui.cookies
        offsite = await ui.post("/login", data={"token": TOKEN, "next": "//evil.test/"}, headers=SAME_ORIGIN)
        assert offsite.status_code == 303 and offsite.headers["location"] == "/"
        cookie = offsite.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
        assert ui.cookies.get(SESSION_COOKIE)

        assert (await ui.get("/workers")).status_code == 200
        assert (await ui.get("/events")).status_code == 200
        # The cookie opens the pages, not the API (which takes the bearer token only).
        assert (await ui.get("/api/v1/runs/abc")).status_code == 401
        ui.cookies.set(SESSION_COOKIE, "0" * 64)
        assert (await ui.get("/workers")).status_code == 303
        ui.cookies.clear()
        assert (await ui.get("/workers", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200

        await ui.post("/login", data={"token": TOKEN}, headers=SAME_ORIGIN)
        out = await ui.post("/logout", headers=SAME_ORIGIN)
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert (await ui.get("/workers")).status_code == 303


async def test_the_runs_page_filters_pages_and_reruns_with_the_metadata(bide: Bide, ui: httpx.AsyncClient,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    @bide.durable_task(name="Tagged")
    async def tagged(input: Square, ctx: DurableContext) -> Any:
        return await ctx.aio_wait_for_event("never:comes")

    @bide.task(name="Quick")
    async def quick(input: EmptyModel, ctx: Context) -> int:
        return 1

    async with running_worker(bide, [tagged, quick]):
        acme = [await tagged.aio_run_no_wait(Square(n=i), additional_metadata={"customer": "acme"})
                for i in range(2)]
        other = await tagged.aio_run_no_wait(Square(n=9), additional_metadata={"customer": "other"})
        await quick.aio_run(EmptyModel())
        waiting_ids = [r.workflow_run_id for r in [*acme, other]]
        for run_id in waiting_ids:
            await waiting(bide, run_id)

        async def listed(**params: str) -> tuple[list[str], str]:
            resp = await ui.get("/", params=params)
            assert resp.status_code == 200, resp.text
            return re.findall(r'<tr data-run="([^"]+)">', resp.text), resp.text

        ids, html = await listed(status="waiting")
        assert sorted(ids) == sorted(waiting_ids) and ">waiting<" in html
        ids, html = await listed(meta="customer=acme", task="Tagged")
        assert sorted(ids) == sorted(r.workflow_run_id for r in acme) and "customer=acme" in html
        ids, html = await listed(status="completed")
        assert len(ids) == 1 and "Quick" in html
        ids, html = await listed(status="failed", since="1h")
        assert ids == [] and "No runs match." in html
        fragment = await ui.get("/", params={"status": "waiting", "fragment": "1"})
        assert "<html" not in fragment.text and waiting_ids[0] in fragment.text

        monkeypatch.setattr("actors.apps.web_ui.PAGE_SIZE", 2)
        first, html = await listed(status="waiting")
        assert len(first) == 2
        older = re.search(r'href="/\?(status=waiting&(?:amp;)?cursor=[^"]+)" rel="next"', html)
        assert older, html
        rest = await ui.get("/?" + older[1].replace("&amp;", "&"))
        last = re.findall(r'<tr data-run="([^"]+)">', rest.text)
        assert sorted(first + last) == sorted(waiting_ids) and 'rel="next"' not in rest.text

        for params, why in (({"status": "bogus"}, "bogus"), ({"since": "yesterday"}, "yesterday"),
                            ({"meta": "novalue"}, "is not a key=value pair")):
            bad = await ui.get("/", params=params)
            assert bad.status_code == 400 and why in bad.text, (params, bad.text)

        again = await ui.post(f"/runs/{acme[0].workflow_run_id}/rerun", headers=SAME_ORIGIN)
        new_id = again.headers["location"].split("/runs/")[1].split("?")[0]
        started = (await bide.runs.aio_history(new_id)).started
        assert started.input == {"n": 0} and started.additional_metadata == {"customer": "acme"}
        assert "customer=acme" in (await ui.get(f"/runs/{new_id}")).text
        for run_id in [*waiting_ids, new_id]:
            await bide.runs.aio_cancel(run_id)
