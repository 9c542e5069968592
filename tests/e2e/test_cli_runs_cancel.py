"""``bide runs cancel`` as a user runs it: a real process against a real server."""

from __future__ import annotations

from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, EmptyModel, RunStatus
from tests.e2e.test_cli_events import bide_cli, cli
from tests.support import running_worker, wait_until


async def test_runs_cancel_cancels_a_waiting_run_then_reports_it_finished(
        nats_server: EmbeddedServer, bide: Bide) -> None:
    @bide.durable_task(name="CliNeverResumes")
    async def never_resumes(input: EmptyModel, ctx: DurableContext) -> None:
        await ctx.aio_wait_for_event("never")

    url = nats_server.url
    async with running_worker(bide, [never_resumes]):
        ref = await never_resumes.aio_run_no_wait(EmptyModel())
        run_id = ref.workflow_run_id

        async def status_is(status: RunStatus) -> bool:
            return (await bide.runs.aio_get(run_id)).status is status

        await wait_until(lambda: status_is(RunStatus.WAITING), what=f"run {run_id} to wait")
        out = await cli("runs", "cancel", run_id, "--reason", "changed my mind", url=url)
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"cancelled {run_id}\n"
        await wait_until(lambda: status_is(RunStatus.CANCELLED), what=f"run {run_id} to be cancelled")
        terminal = (await bide.runs.aio_history(run_id)).terminal
        assert terminal is not None and terminal.k == "run_cancelled" and terminal.reason == "changed my mind"

        again = await cli("runs", "cancel", run_id, url=url)
        assert again.returncode == 0, again.stderr
        assert again.stdout == f"run {run_id} had already finished\n"
        assert (await bide.runs.aio_get(run_id)).status is RunStatus.CANCELLED


def test_runs_cancel_of_an_unknown_run_fails_naming_it(nats_server: EmbeddedServer) -> None:
    unknown = bide_cli("runs", "cancel", "no-such-run", url=nats_server.url)
    assert unknown.returncode == 2  # as every command does on a BideError (``runs show``, ``event send``)
    assert unknown.stderr == "bide: error: no run with id 'no-such-run'\n"
    assert unknown.stdout == ""

    missing_id = bide_cli("runs", "cancel", url=nats_server.url)
    assert missing_id.returncode == 2 and "run_id" in missing_id.stderr  # argparse usage error
