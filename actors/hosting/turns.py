"""Running a turn's code: a durable run's, a regular task's, a workflow's, or none (a poison activation).

Each driver runs what user code the turn needs, turns how it stopped into an ending
(completed, failed, retried, cancelled, timed out, or parked), asks the engine what that
means (``Turn.conclude``, ``workflow_commands``, ``end_of_run``) and hands the commands
to the run's :class:`actors.hosting.turn_effects.RunWriter`. Nothing here writes directly.
"""

from __future__ import annotations

import asyncio
import traceback
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from actors.engine.commands import Append, Command, RunEnd, ScheduleRetry, TurnObserver, end_of_run, inbox_upto
from actors.engine.dag import plan_workflow_turn, workflow_commands
from actors.engine.decisions import failed_attempts
from actors.engine.replay import Turn
from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    ActivationBegun,
    AttemptFailed,
    ChildrenSpawned,
    ErrorInfo,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    Terminal,
    first_done,
    utcnow,
)
from actors.hosting.turn_effects import RunWriter, TurnEffects
from actors.hosting.warm_runs import WarmRun, WarmRuns
from actors.store.history import HistoryConflict
from actors.store.jetstream import is_transient
from sdk.context import Context, ContinuedAsNew, DurableContext, current_runtime
from sdk.errors import (
    InputValidationError,
    NonDeterminismError,
    NonRetryableError,
    OutputSerializationError,
    PayloadLimitError,
    PayloadValidationError,
    ScheduleTimeoutError,
    TaskCancelledByCondition,
    TaskSkipped,
    TaskTimeoutError,
)

if TYPE_CHECKING:
    from sdk.tasks import TaskDefinition


def error_info(exc: BaseException) -> ErrorInfo:
    return ErrorInfo(
        type=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc))[-8000:],
    )


class TurnRunner:
    """Runs turns' code on one host, and stops a run's code when someone cancels it."""

    def __init__(self, effects: TurnEffects, host_id: str, workflows: set[str], warm: WarmRuns) -> None:
        self._fx = effects
        self._warm = warm
        self.host_id = host_id
        self._workflows = workflows
        """Tasks that are workflow runners: their failure stops their tasks."""
        self._running: dict[str, tuple[asyncio.Task[Any], Turn | None]] = {}
        """Runs whose code is running here now (what the cancel broadcast stops)."""
        self._cancelled_here: dict[str, str] = {}
        """Regular tasks the cancel broadcast stopped here, with the reason given."""

    def cancel(self, run_id: str, reason: str = "cancelled") -> None:
        """The cancel broadcast: stop the run now if it is running here (its inbox has the durable request)."""
        running = self._running.get(run_id)
        if running is None:
            return
        user, turn = running
        if turn is None:
            self._cancelled_here.setdefault(run_id, reason)  # a regular task: its turn records the cancellation
        else:
            turn.request_cancel(reason)
        user.cancel()

    async def durable(self, hist: RunHistory, defn: TaskDefinition, delivery: int,
                      observer: TurnObserver | None, warm: WarmRun | None = None) -> None:
        """A durable run's turn: its code replayed from the history, or a warm run's code going on."""
        started = hist.started
        writer = self._fx.writer(hist, defn.name)
        if warm is not None:
            warm.turn.resume(hist, writer, self.host_id, delivery, observer)
            try:
                await warm.turn.claim_signals()
            except BaseException:
                warm.discard()
                raise
            warm.turn.go_on()
            self._warm.hits += 1
            await self._until_stopped(hist, defn, warm.turn, warm.user, writer)
            return
        turn = Turn(history=hist, effects=writer, task=defn.name, host_id=self.host_id, delivery=delivery,
                    observer=observer)
        late = late_start(hist, defn)
        if late is not None or (turn.cancel_reason is not None and not turn.began):
            # Never ran: end it without running any code.
            await writer.carry_out(turn.conclude(late or RunCancelled(reason=turn.cancel_reason or "", at=utcnow())))
            return
        try:
            value = defn.signature.load_input(started.input)
        except Exception as e:
            await writer.carry_out(turn.conclude(RunFailed(error=error_info(e), at=utcnow())))
            return
        ctx = DurableContext(hist.run_id, defn.name, delivery, started.input, turn, retry_count=failed_attempts(hist),
                             parents=started.parents, additional_metadata=started.additional_metadata)

        async def drive() -> Any:
            current_runtime.set(turn)  # task.aio_run() in this code spawns children of this run
            return await defn.entry(value, ctx)

        await turn.claim_signals()
        await self._until_stopped(hist, defn, turn, asyncio.create_task(drive(), name=f"bide-run:{hist.run_id}"),
                                  writer)

    async def _until_stopped(self, hist: RunHistory, defn: TaskDefinition, turn: Turn, user: asyncio.Task[Any],
                             writer: RunWriter) -> None:
        """Let the code run until it parks or ends, then carry out what the turn concludes; keep it warm if it can."""
        started = hist.started
        self._running[hist.run_id] = (user, turn)
        turn.code = user
        timeout = time_limit(started, defn)
        try:
            done = await first_done({user, turn.suspended}, timeout)
            # A step's result the code's last wait sent on its own is stored (or failed: ``fatal``).
            await turn.steps_recorded()
        except asyncio.CancelledError:
            await _cancel(user)
            raise
        finally:
            self._running.pop(hist.run_id, None)
            # The code's task holds the turn (in its context): no cycle is left for the collector to find.
            turn.code = None
        finished = user in done
        keep = not finished and turn.suspended in done and turn.resumable
        # A cancel this turn took (or was broadcast while the code ran) ends the run, whatever the
        # code did since: it may have cleaned up in ``except CancelledError`` and returned, or gone
        # past a sleep that fell due with the cancel and continued as new (the next generation's
        # start marks the cancel taken: it was lost, and the run went on for ever).
        cancelled = turn.cancel_reason is not None
        if (finished and turn.fatal is None and not cancelled and not user.cancelled()
                and isinstance(user.exception(), ContinuedAsNew)):
            await self._continue_as_new(hist, defn, turn, user, writer)
            return
        if not keep:
            # Evict (the slot and the coroutine's memory are freed now); a finished task's
            # exception is marked retrieved either way.
            await _cancel(user)
        end: Terminal | AttemptFailed | None = None
        if turn.fatal is not None:
            if isinstance(turn.fatal, HistoryConflict) or is_transient(turn.fatal):
                # Another host wrote first (drop this stale turn), or the infrastructure failed
                # (retry it): neither is the user's error, and the code never saw it.
                raise turn.fatal
            # Not retried: a retry would replay into the same error (non-determinism, a write
            # the server can never accept).
            end = RunFailed(error=error_info(turn.fatal), at=utcnow())
        elif finished:
            if cancelled:
                end = RunCancelled(reason=turn.cancel_reason or "cancelled", at=utcnow())
            else:
                end = self._retried(defn, hist, outcome(user, defn), user)
        elif turn.suspended not in done:
            end = self._retried(defn, hist, timed_out(defn, hist.run_id, timeout or 0), None)
        try:
            await writer.carry_out(turn.conclude(end))
        except BaseException:
            if keep:
                await _cancel(user)
            raise
        if keep:
            # Parked, and everything it wrote is durable: the next turn here may go on from where it is.
            self._warm.keep(hist.run_id, WarmRun(turn, user, turn.history_after(writer.last_seq)))

    async def _continue_as_new(self, hist: RunHistory, defn: TaskDefinition, turn: Turn, user: asyncio.Task[Any],
                               writer: RunWriter) -> None:
        """The code called ``ctx.continue_as_new``: the next generation begins, or the run fails on a bad input."""
        exc = user.exception()
        assert isinstance(exc, ContinuedAsNew)
        try:
            commands = turn.continue_as_new(exc.input)
        except (OutputSerializationError, PayloadLimitError) as e:
            await writer.carry_out(turn.conclude(RunFailed(error=error_info(e), at=utcnow())))
            return
        await writer.carry_out(commands)

    async def regular(self, hist: RunHistory, defn: TaskDefinition, delivery: int) -> None:
        started = hist.started
        writer = self._fx.writer(hist, defn.name)
        begun = ActivationBegun(host=self.host_id, delivery=delivery, at=utcnow())
        cancel = next((sig for _, sig in hist.inbox if sig.source == "cancel"), None)
        end: Terminal | AttemptFailed | None = late_start(hist, defn)
        if end is None and cancel is not None:
            end = RunCancelled(reason=cancel.cancel_reason, at=utcnow())
        if end is None:
            try:
                value = defn.signature.load_input(started.input)
            except Exception as e:
                end = RunFailed(error=error_info(e), at=utcnow())
        if end is None:
            ctx = Context(hist.run_id, defn.name, delivery, started.input, retry_count=failed_attempts(hist),
                          parents=started.parents, additional_metadata=started.additional_metadata)
            user: asyncio.Task[Any] = asyncio.create_task(defn.entry(value, ctx))
            self._running[hist.run_id] = (user, None)
            timeout = time_limit(started, defn)
            try:
                done = await first_done({user}, timeout)
            finally:
                self._running.pop(hist.run_id, None)
            cancelled = self._cancelled_here.pop(hist.run_id, None)
            if cancelled is not None:
                await _cancel(user)
                end = RunCancelled(reason=cancelled, at=utcnow())
            elif user in done:
                end = self._retried(defn, hist, outcome(user, defn), user)
            else:
                await _cancel(user)
                end = self._retried(defn, hist, timed_out(defn, hist.run_id, timeout or 0), None)
        await writer.carry_out(self.ending(hist, [begun], end))

    async def workflow(self, hist: RunHistory, defn: TaskDefinition, delivery: int) -> None:
        """A DAG run's turn: carry out what :func:`plan_workflow_turn` decided."""
        wf = defn.workflow
        assert wf is not None
        steps = wf.order()
        plan = plan_workflow_turn(hist, steps, self.host_id, delivery, utcnow(), late_start(hist, defn))
        writer = self._fx.writer(hist, defn.name)
        await writer.carry_out(workflow_commands(hist, steps, plan))

    async def fail_without_code(self, hist: RunHistory, defn: TaskDefinition, delivery: int, end: RunFailed) -> None:
        """A poison activation or a run over a limit: it fails without running its code."""
        writer = self._fx.writer(hist, defn.name)
        if defn.runs_durably and not (defn.workflow is not None and defn is defn.workflow.runner):
            # A durable run's end withdraws its waits and timers and stops its children, as any end does.
            turn = Turn(history=hist, effects=writer, task=defn.name, host_id=self.host_id, delivery=delivery)
            await writer.carry_out(turn.conclude(end))
            return
        begun = ActivationBegun(host=self.host_id, delivery=delivery, at=utcnow())
        unfinished = [(rid, e.task) for e in hist.entries if isinstance(e, ChildrenSpawned)
                      for rid in e.run_ids] if defn.workflow is not None else []
        await writer.carry_out(self.ending(hist, [begun], end, unfinished))

    def ending(self, hist: RunHistory, entries: list[Any], end: Terminal | AttemptFailed,
               unfinished: list[tuple[str, str]] | None = None) -> list[Command]:
        """Append ``entries`` with ``end``, then retry the run or wind it up (a turn with no ``Turn``)."""
        commands: list[Command] = [Append([*entries, end])]
        if isinstance(end, AttemptFailed):
            return [*commands, ScheduleRetry(end)]
        return [*commands, *end_of_run(hist.started, RunEnd(
            end, unfinished or [], cancels_children_on_failure=hist.started.task in self._workflows,
            inbox_upto=inbox_upto(hist)))]

    @staticmethod
    def _retried(defn: TaskDefinition, hist: RunHistory, end: Terminal,
                 user: asyncio.Task[Any] | None) -> Terminal | AttemptFailed:
        """A failed attempt instead of ``end`` when the task has retries left and the error may be retried."""
        if not isinstance(end, RunFailed):
            return end
        failures = failed_attempts(hist)
        if failures >= defn.retries:
            return end
        exc = user.exception() if user is not None and user.done() and not user.cancelled() else None
        if isinstance(exc, _NEVER_RETRIED) or (user is not None and user.done() and exc is None):
            return end  # (no exception: the code returned, but its result cannot be stored)
        delay = defn.retry_delay(failures + 1)
        now = utcnow()
        return AttemptFailed(attempt=failures + 1, error=end.error, retry_at=now + timedelta(seconds=delay), at=now)


def late_start(hist: RunHistory, defn: TaskDefinition) -> RunFailed | None:
    """``schedule_timeout``: a run that waited too long for its first turn fails without running."""
    if defn.schedule_timeout is None or any(isinstance(e, ActivationBegun) for e in hist.entries):
        return None
    waited = utcnow() - hist.started.at
    if waited <= defn.schedule_timeout:
        return None
    err = ScheduleTimeoutError(
        f"run {hist.run_id} of task {defn.name!r} waited {waited.total_seconds():.1f}s for a worker, longer than "
        f"its schedule_timeout of {defn.schedule_timeout.total_seconds():g}s")
    return RunFailed(error=error_info(err), at=utcnow())


def outcome(user: asyncio.Task[Any], defn: TaskDefinition) -> Terminal:
    """How the code that finished ended the run."""
    if user.cancelled():
        return RunCancelled(reason="cancelled", at=utcnow())
    exc = user.exception()
    if isinstance(exc, TaskSkipped):
        return RunCompleted(result=None, skipped=True, at=utcnow())
    if isinstance(exc, TaskCancelledByCondition):
        return RunCancelled(reason=str(exc), at=utcnow())
    if exc is not None:
        return RunFailed(error=error_info(exc), at=utcnow())
    try:
        return RunCompleted(result=defn.signature.dump_output(user.result()), at=utcnow())
    except OutputSerializationError as e:
        return RunFailed(error=error_info(e), at=utcnow())


_NEVER_RETRIED = (NonRetryableError, NonDeterminismError, InputValidationError, PayloadValidationError,
                  OutputSerializationError)
"""Errors a retry cannot fix: the same input, history or payload would fail the same way."""


def time_limit(started: RunStarted, defn: TaskDefinition) -> float | None:
    """``execution_timeout`` of a turn: the starter's, else the task's."""
    if started.execution_timeout_s:
        limit: float = started.execution_timeout_s
        return limit
    return defn.execution_timeout.total_seconds() if defn.execution_timeout else None


def timed_out(defn: TaskDefinition, run_id: str, limit_s: float) -> RunFailed:
    err = TaskTimeoutError(f"task {defn.name!r} (run {run_id}) exceeded its execution_timeout of {limit_s:g}s")
    return RunFailed(error=error_info(err), at=utcnow())


async def _cancel(task: asyncio.Task[Any]) -> None:
    if task.done():
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" noise
        return
    task.cancel()
    try:
        await task
    except BaseException:
        pass
