"""The web UI in a real headless browser (Debian's chromium, driven by Playwright) against `bide dev`.

Skipped with the reason when chromium or Playwright is missing, unless BIDE_REQUIRE_BROWSER=1 (CI),
which makes that a failure. Screenshots of each page are saved under the test's tmp_path.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actors.store.server import free_port
from tests.support import REPO

CHROMIUM = os.environ.get("BIDE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "browser-s3cret"


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[dev]')"
    if not Path(CHROMIUM).exists():
        return f"no chromium at {CHROMIUM} (apt-get install -y chromium)"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get("BIDE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"BIDE_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@dataclass
class Dev:
    proc: subprocess.Popen[bytes]
    nats_url: str
    http: str
    env: dict[str, str]

    def run_no_wait(self, task: str, input: str) -> str:
        out = subprocess.run([sys.executable, "-m", "actors.apps.cli", "run", task, "--input", input, "--no-wait"],
                             cwd=REPO, env={**self.env, "BIDE_NATS_URL": self.nats_url}, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()


@contextlib.contextmanager
def bide_dev(tmp_path: Path, module: str, token: str | None = None) -> Iterator[Dev]:
    """`bide dev MODULE` as a real process, on free ports, with a temporary store."""
    port, http_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("BIDE_API_TOKEN", None)
    if token:
        env["BIDE_API_TOKEN"] = token
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "actors.apps.cli", "dev", module,
                                 "--port", str(port), "--store", str(tmp_path / "js"), "--http-port", str(http_port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "worker(s) up" not in log.read_text():
            assert proc.poll() is None, "bide dev exited:\n" + log.read_text()
            assert time.monotonic() < deadline, "bide dev did not come up:\n" + log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        http = re.search(r"HTTP API at (\S+)", text)
        assert http, text
        yield Dev(proc, f"nats://127.0.0.1:{port}", http[1], env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def dev(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Dev]:
    """`bide dev examples.events.worker` (with the token given as the fixture's parameter, if any)."""
    with bide_dev(tmp_path, "examples.events.worker", getattr(request, "param", None)) as d:
        yield d


def test_find_a_waiting_run_push_its_event_and_cancel_another(browser: Any, dev: Dev, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"screenshots in {shots}")
    # Two runs waiting for user:create in their own scope (examples.events.worker's DurableLookbackTask).
    first = dev.run_no_wait("DurableLookbackTask", '{"user_id": 1}')
    second = dev.run_no_wait("DurableLookbackTask", '{"user_id": 2}')
    page = browser.new_page()
    page.set_default_timeout(20_000)

    page.goto(dev.http + "/")
    expect(page.locator("h1")).to_have_text("Runs")
    page.screenshot(path=shots / "runs.png", full_page=True)
    # Filter to the waiting ones: both runs appear once they have parked at their wait (live refresh).
    page.select_option("select[name=status]", "waiting")
    page.click("#run-filters button[type=submit]")
    expect(page).to_have_url(re.compile(r"status=waiting"))
    for run_id in (first, second):
        expect(page.locator(f"tr[data-run='{run_id}'] .status")).to_have_text("waiting")
    page.screenshot(path=shots / "runs-waiting.png", full_page=True)

    page.click(f"a[href='/runs/{first}']")
    expect(page.locator("#run-status")).to_have_text("waiting")
    expect(page.locator("ul.pending")).to_contain_text("event 'user:create' scope 'user_id:1'")
    page.screenshot(path=shots / "run-waiting.png", full_page=True)

    # Push the awaited event from the Events page, in a second tab; the first turns completed by itself.
    events = browser.new_page()
    events.set_default_timeout(20_000)
    events.goto(dev.http + "/events")
    events.fill("input[name=key]", "user:create")
    events.fill("input[name=scope]", "user_id:1")
    events.fill("textarea[name=payload]", '{"user_id": 1, "name": "ada"}')
    events.fill("input[name=metadata]", "source=browser")
    events.click("form.push button[type=submit]")
    expect(events.locator(".notice")).to_contain_text("Event pushed.")
    expect(events.locator("table.events")).to_contain_text("user_id:1")
    events.screenshot(path=shots / "events.png", full_page=True)

    expect(page.locator("#run-status")).to_have_text("completed")  # no reload: the page refreshed itself
    expect(page.locator("#live")).to_contain_text('"name": "ada"')
    expect(page.locator("ol.timeline")).to_contain_text("received event 'user:create'")
    page.screenshot(path=shots / "run-completed.png", full_page=True)

    # Cancel the other from its page (after the confirm dialog).
    page.goto(f"{dev.http}/runs/{second}")
    expect(page.locator("#run-status")).to_have_text("waiting")
    page.once("dialog", lambda d: d.accept())
    page.click("#cancel")
    expect(page.locator(".notice")).to_contain_text("Cancel requested")
    expect(page.locator("#run-status")).to_have_text("cancelled")
    expect(page.locator("#cancel")).to_be_disabled()
    page.screenshot(path=shots / "run-cancelled.png", full_page=True)

    page.goto(dev.http + "/workers")
    expect(page.locator("table.hosts")).to_contain_text("DurableLookbackTask")
    page.screenshot(path=shots / "workers.png", full_page=True)

    # A bad payload is a message on the page, not an error page.
    events.fill("input[name=key]", "user:create")
    events.fill("textarea[name=payload]", "{oops")
    events.click("form.push button[type=submit]")
    expect(events.locator(".error")).to_contain_text("the payload is not valid JSON")
    events.screenshot(path=shots / "events-bad-payload.png", full_page=True)


@pytest.mark.parametrize("dev", [TOKEN], indirect=True)
def test_with_a_token_the_browser_logs_in_once(browser: Any, dev: Dev, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()
    page.set_default_timeout(20_000)
    page.goto(dev.http + "/workers")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fworkers$"))
    page.fill("input[name=token]", "wrong")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_have_text("wrong token")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    expect(page).to_have_url(dev.http + "/workers")
    expect(page.locator("table.hosts")).to_contain_text("DurableLookbackTask")
    page.screenshot(path=tmp_path / "workers-logged-in.png", full_page=True)
    cookie = next(c for c in page.context.cookies() if c["name"] == "bide_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    page.click("header .logout button")
    expect(page).to_have_url(dev.http + "/login")
    page.goto(dev.http + "/")
    expect(page).to_have_url(re.compile(r"/login\?next=%2F$"))


def test_a_workflow_run_page_draws_its_dag_with_the_tasks_not_started(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"screenshots in {shots}")
    # examples.workflows.worker's TaskConditionWorkflow: start, then three branches (two of them wait
    # 30 s or more for a timer or an event), then sum_task once all three have ended.
    with bide_dev(tmp_path, "examples.workflows.worker") as dev:
        run_id = dev.run_no_wait("TaskConditionWorkflow", "{}")
        page = browser.new_page()
        page.set_default_timeout(20_000)
        page.goto(f"{dev.http}/runs/{run_id}")
        expect(page.locator("svg .node")).to_have_count(5)
        expect(page.locator("svg .edge")).to_have_count(6)

        def state(task: str) -> Any:
            return page.locator(f"tr.dag-task[data-task='{task}'] .status")

        expect(state("sum_task")).to_have_text("pending")
        expect(page.locator("svg .node.pending")).to_contain_text("sum_task")
        # The page refreshes itself while the tasks run: start ends, its children start.
        expect(state("start")).to_have_text("completed")
        expect(state("left_branch")).to_have_text(re.compile(r"^(completed|skipped)$"))
        expect(state("wait_for_event")).to_have_text("waiting")
        expect(page.locator("#dag-note")).to_have_count(0)
        page.screenshot(path=shots / "run-workflow.png", full_page=True)

        # Each started task is a link to its run; its page links back to the workflow run.
        page.click("svg a:has(.node:has-text('start'))")
        expect(page.locator("h1")).to_contain_text("Run")
        expect(page.locator("dl.facts")).to_contain_text(run_id)
        page.screenshot(path=shots / "run-workflow-task.png", full_page=True)
