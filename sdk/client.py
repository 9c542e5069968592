"""The ``Bide`` client: define tasks, start runs, read runs, make workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import nats.js.errors

from actors.observe.tracing import Tracing, configure_from_env
from sdk._connection import ConnectionPool
from sdk.config import BideConfig
from sdk.errors import UnknownTaskError
from sdk.events import EventsClient
from sdk.runs import RunRef, RunsClient, StartRequest, new_run_id, start_run
from sdk.tasks import TaskDefinition, validate_task_name
from sdk.worker import Worker
from sdk.workflow import Workflow

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

F = TypeVar("F", bound=Callable[..., Any])


class Bide:
    """A client of one Bide deployment (one NATS URL and subject prefix).

    Args:
        nats_url: NATS server URL; default ``BIDE_NATS_URL`` or ``nats://127.0.0.1:4222``
            (where ``bide dev`` serves its embedded server).
        prefix: subject and stream prefix; default ``BIDE_PREFIX`` or ``bide``.
        replicas: stream replica count (1, or 3 on a cluster); default ``BIDE_REPLICAS`` or 1.
        ack_wait: seconds before an unacknowledged activation is redelivered to another host.
        debug: accepted for Hatchet compatibility; enables debug logging.
        tracer_provider: an OpenTelemetry tracer provider for Bide's spans. Default: the global
            one; if the application set none, one is made from the standard ``OTEL_*``
            variables when they ask for an exporter (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
            ``OTEL_TRACES_EXPORTER``). With neither, tracing is off and costs next to nothing.
    """

    def __init__(
        self,
        nats_url: str | None = None,
        *,
        prefix: str | None = None,
        replicas: int | None = None,
        ack_wait: float | None = None,
        debug: bool = False,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.config = BideConfig.from_env(nats_url, prefix, replicas, ack_wait)
        if tracer_provider is None:
            configure_from_env()
        self.tracing = Tracing(self.config.prefix, tracer_provider)
        self._pool = ConnectionPool(self.config, tracing=self.tracing)
        self.runs = RunsClient(self._pool)
        self.event = EventsClient(self._pool)
        """Push events (``push``, ``aio_push``, ``bulk_push``) or send one to a run (``send``)."""
        self._tasks: dict[str, TaskDefinition] = {}
        self._workflows: dict[str, Workflow] = {}
        if debug:
            import logging

            logging.getLogger("bide").setLevel(logging.DEBUG)

    # -- definitions ---------------------------------------------------------------------------

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        execution_timeout: timedelta | float | str | None = None,
        schedule_timeout: timedelta | float | str | None = None,
        on_events: Sequence[str] | None = None,
        retries: int = 0,
        backoff_factor: float | None = None,
        backoff_max_seconds: float | None = None,
    ) -> Any:
        """Define a regular task: ``fn(input, ctx: Context)``, sync or async, run at least once.

        ``on_events`` lists event keys that each start one run (the event's payload is the input).
        ``retries`` failed attempts are retried, ``backoff_factor ** (n - 1)`` seconds apart
        (capped at ``backoff_max_seconds``); raise ``NonRetryableError`` to fail at once.
        """
        return self._define(fn, name, durable=False, execution_timeout=execution_timeout, on_events=on_events,
                            retries=retries, backoff_factor=backoff_factor, backoff_max_seconds=backoff_max_seconds,
                            schedule_timeout=schedule_timeout)

    def durable_task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        execution_timeout: timedelta | float | str | None = None,
        schedule_timeout: timedelta | float | str | None = None,
        on_events: Sequence[str] | None = None,
        retries: int = 0,
        backoff_factor: float | None = None,
        backoff_max_seconds: float | None = None,
    ) -> Any:
        """Define a durable task: ``async fn(input, ctx: DurableContext)``, checkpointed and replayed.

        A retry resumes from the last checkpoint: recorded steps are not run again.
        """
        return self._define(fn, name, durable=True, execution_timeout=execution_timeout, on_events=on_events,
                            retries=retries, backoff_factor=backoff_factor, backoff_max_seconds=backoff_max_seconds,
                            schedule_timeout=schedule_timeout)

    def _define(
        self,
        fn: Callable[..., Any] | None,
        name: str | None,
        *,
        durable: bool,
        execution_timeout: Any,
        on_events: Sequence[str] | None = None,
        **options: Any,
    ) -> Any:
        def wrap(f: Callable[..., Any]) -> TaskDefinition:
            task_name = name or f.__name__
            if task_name in self._tasks and self._tasks[task_name].fn is not f:
                raise ValueError(f"a task named {task_name!r} is already defined on this client")
            t = TaskDefinition(self._pool, f, name=task_name, durable=durable, execution_timeout=execution_timeout,
                               on_events=on_events, **options)
            self._tasks[task_name] = t
            return t

        return wrap(fn) if fn is not None else wrap

    def workflow(self, name: str, *, on_events: Sequence[str] | None = None) -> Workflow:
        """A DAG of tasks (Hatchet's ``hatchet.workflow(name=...)``); ``on_events`` start a run each."""
        if name in self._workflows:
            raise ValueError(f"a workflow named {name!r} is already defined on this client")
        wf = Workflow(self, name, on_events)
        self._workflows[name] = wf
        return wf

    @property
    def tasks(self) -> dict[str, TaskDefinition]:
        return dict(self._tasks)

    def worker(
        self,
        name: str,
        workflows: Sequence[TaskDefinition | Workflow] | None = None,
        slots: int = 100,
        durable_slots: int = 1000,
    ) -> Worker:
        """An actor host for ``workflows`` (tasks or workflows; default: every task defined on this client)."""
        if workflows is None:
            tasks = list(self._tasks.values())
            for wf in self._workflows.values():
                wf._check_runnable()
                tasks.append(wf.runner)
        else:
            tasks = []
            for w in workflows:
                if isinstance(w, Workflow):
                    w._check_runnable()
                    tasks.extend(w.tasks)
                    tasks.append(w.runner)
                elif isinstance(w, TaskDefinition):
                    tasks.append(w)
                else:
                    raise TypeError(f"worker {name!r}: workflows= takes tasks and workflows, got {w!r}")
        unique = list({id(t): t for t in tasks}.values())  # a workflow's tasks may also be listed alone
        return Worker(self, name, unique, slots=slots, durable_slots=durable_slots)

    # -- running by name -----------------------------------------------------------------------

    async def aio_known_tasks(self) -> list[str]:
        """Names of tasks some worker has registered (one consumer each on the queue starts go to)."""
        conn = await self._pool.get()
        names = []
        for info in await conn.js.consumers_info(conn.layout.subjects.queue_stream):
            meta = info.config.metadata or {}
            if "bide_task" in meta:
                names.append(meta["bide_task"])
        return sorted(names)

    async def aio_run_no_wait_by_name(self, task: str, input: Any = None, *,
                                      additional_metadata: Mapping[str, str] | None = None) -> RunRef:
        """Start a task by name, e.g. from the CLI; the name must be registered by a worker."""
        validate_task_name(task)
        conn = await self._pool.get()
        try:
            info = await conn.js.consumer_info(
                conn.layout.subjects.queue_stream, conn.layout.subjects.consumer_name(task)
            )
        except nats.js.errors.NotFoundError:
            known = await self.aio_known_tasks()
            raise UnknownTaskError(
                f"unknown task {task!r}: no worker has registered it. "
                f"Known tasks: {', '.join(known) if known else '(none; start a worker first)'}"
            ) from None
        defined = self._tasks.get(task)
        req = StartRequest(
            task=task,
            durable=defined.durable if defined else (info.config.metadata or {}).get("bide_durable") == "true",
            input=defined.signature.dump_input(input) if defined else input,
            run_id=new_run_id(),
            new_id=True,
            additional_metadata=dict(additional_metadata) if additional_metadata else None,
        )
        await start_run(conn, req)
        return RunRef(self._pool, req.run_id, defined.signature.load_output if defined else None)

    async def aio_run_by_name(self, task: str, input: Any = None, timeout: float | None = None) -> Any:
        ref = await self.aio_run_no_wait_by_name(task, input)
        return await ref.aio_result(timeout)

    # -- lifecycle -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def _retarget(self, nats_url: str) -> None:
        """Point this client (and workers made from it later) at another server (:class:`sdk.testing.BideTestEnv`)."""
        self.config = dataclasses.replace(self.config, nats_url=nats_url)
        await self._pool.retarget(self.config)

    def close(self) -> None:
        self._pool.close()

    async def __aenter__(self) -> Bide:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["Bide"]
