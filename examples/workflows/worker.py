"""Children and DAG workflows, as in the seeds: Hatchet's examples with the import changed.

Run a worker:   bide worker examples.workflows.worker
Start runs:     bide run FanOutParent --input '{"n": 10}'
                bide run TaskConditionWorkflow --no-wait
Push events:    bide event push wait_for_event:start --data '{}'
                nats pub bide.events.skip_on_event:skip '{}'
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from sdk import (
    Bide,
    Context,
    DurableContext,
    EmptyModel,
    ParentCondition,
    SleepCondition,
    UserEventCondition,
    or_,
)

hatchet = Bide(debug=True)

# -- Hatchet: a durable task spawning children (fan-out where N comes from the input) ---------------


class ParentInput(BaseModel):
    n: int = 5


class ChildInput(BaseModel):
    value: int


@hatchet.task(name="SquareChild", retries=2, backoff_factor=2, backoff_max_seconds=10)
async def square_child(input: ChildInput, ctx: Context) -> dict[str, int]:
    return {"square": input.value * input.value}


@hatchet.durable_task(name="FanOutParent", execution_timeout=timedelta(minutes=10))
async def fan_out_parent(input: ParentInput, ctx: DurableContext) -> dict[str, Any]:
    # One checkpoint for all N children; the parent is evicted until the last one ends.
    results = await square_child.aio_run_many(
        [square_child.create_bulk_run_item(input=ChildInput(value=i)) for i in range(input.n)]
    )
    total = sum(r["square"] for r in results)
    # Decide at run time what to do next: one more child, awaited like a function call.
    extra = await square_child.aio_run(ChildInput(value=total % 7))
    return {"total": total, "extra": extra["square"]}


# -- Hatchet: a durable workflow (a regular task and a durable task, both roots) --------------------

EVENT_KEY = "durable-example:event"
SLEEP_TIME = 5

durable_workflow = hatchet.workflow(name="DurableWorkflow")


@durable_workflow.task()
async def ephemeral_task(input: EmptyModel, ctx: Context) -> None:
    print("Running non-durable task")


class AwaitedEvent(BaseModel):
    id: str


@durable_workflow.durable_task()
async def durable_task(input: EmptyModel, ctx: DurableContext) -> dict[str, str | int]:
    print("Waiting for sleep")
    sleep = await ctx.aio_sleep_for(duration=timedelta(seconds=SLEEP_TIME))
    print("Sleep finished")

    print("Waiting for event")
    event = await ctx.aio_wait_for_event(
        EVENT_KEY, "true", payload_validator=AwaitedEvent
    )
    print("Event received")

    return {
        "status": "success",
        "event_id": event.id,
        "sleep_duration_seconds": sleep.duration.seconds,
    }


# -- Hatchet: DAG-level wait and skip conditions ----------------------------------------------------


class StepOutput(BaseModel):
    random_number: int


task_condition_workflow = hatchet.workflow(name="TaskConditionWorkflow")


@task_condition_workflow.task()
def start(input: EmptyModel, ctx: Context) -> StepOutput:
    return StepOutput(random_number=random.randint(1, 100))


# Wait for a timer OR an event before running
@task_condition_workflow.task(
    parents=[start],
    wait_for=[
        or_(
            SleepCondition(duration=timedelta(minutes=1)),
            UserEventCondition(event_key="wait_for_event:start"),
        )
    ],
)
def wait_for_event(input: EmptyModel, ctx: Context) -> StepOutput:
    return StepOutput(random_number=random.randint(1, 100))


# Skip this task if the skip event arrives within its 30 s wait
@task_condition_workflow.task(
    parents=[start],
    wait_for=[SleepCondition(timedelta(seconds=30))],
    skip_if=[UserEventCondition(event_key="skip_on_event:skip")],
)
def skip_on_event(input: EmptyModel, ctx: Context) -> StepOutput:
    return StepOutput(random_number=random.randint(1, 100))


# Skip this task if start emitted a number > 50 (CEL over the parent's output)
@task_condition_workflow.task(
    parents=[start],
    skip_if=[ParentCondition(parent=start, expression="output.random_number > 50")],
)
def left_branch(input: EmptyModel, ctx: Context) -> StepOutput:
    return StepOutput(random_number=ctx.task_output(start).random_number)


@task_condition_workflow.task(parents=[wait_for_event, skip_on_event, left_branch])
def sum_task(input: EmptyModel, ctx: Context) -> dict[str, Any]:
    outputs = [ctx.task_output(t) for t in (wait_for_event, skip_on_event, left_branch)]
    return {"sum": sum(o.random_number for o in outputs if o is not None),
            "skipped": [t.workflow_key for t in (skip_on_event, left_branch) if ctx.was_skipped(t)]}


worker = hatchet.worker("workflows-worker", workflows=[
    square_child, fan_out_parent, durable_workflow, task_condition_workflow,
])


def main() -> None:
    worker.start()


if __name__ == "__main__":
    main()
