"""Event waits, as in the seeds: Hatchet's examples with the import changed, Inngest's and Zart's ported.

Run a worker:  bide worker examples.events.worker
Push events:   bide event push user:update --data '{"user_id": "1234"}'
               nats pub bide.events.user:update '{"user_id": "1234"}'
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import uuid4

from pydantic import BaseModel

from sdk import Bide, DurableContext, EmptyModel, EventTimeout, SleepCondition, UserEventCondition, or_

hatchet = Bide(debug=True)

EVENT_KEY = "durable-example:event"
SLEEP_TIME = 5

# -- Hatchet: durable event waits -------------------------------------------------------------------


@hatchet.durable_task(name="DurableEventTask")
async def durable_event_task(input: EmptyModel, ctx: DurableContext) -> None:
    res = await ctx.aio_wait_for_event(
        "user:update",
    )

    print("got event", res)


@hatchet.durable_task(name="DurableEventWithFilterTask")
async def durable_event_task_with_filter(input: EmptyModel, ctx: DurableContext) -> dict[str, Any]:
    res = await ctx.aio_wait_for_event("user:update", "input.user_id == '1234'")
    print("got event", res)
    return {"got": res}


class LookbackInput(BaseModel):
    user_id: int


class LookbackEventPayload(BaseModel):
    user_id: int
    name: str


@hatchet.durable_task(name="DurableLookbackTask")
async def durable_lookback_task(input: LookbackInput, ctx: DurableContext) -> dict[str, Any]:
    event = await ctx.aio_wait_for_event(
        key="user:create",
        expression=f"input.user_id == {input.user_id}",
        scope=f"user_id:{input.user_id}",
        lookback_window=timedelta(minutes=1),
        payload_validator=LookbackEventPayload,
    )
    return event.model_dump()


class AwaitedEvent(BaseModel):
    id: str


durable_workflow = hatchet.workflow(name="DurableWorkflow")


@durable_workflow.durable_task()
async def durable_task(input: EmptyModel, ctx: DurableContext) -> dict[str, str | int]:
    # Wait for a matching event
    event = await ctx.aio_wait_for_event(EVENT_KEY, "true", payload_validator=AwaitedEvent)
    print("Event received")
    return {
        "status": "success",
        "event_id": event.id,
    }


or_workflow = hatchet.workflow(name="DurableOrWorkflow")


@or_workflow.durable_task()
async def wait_for_or_group_1(_i: EmptyModel, ctx: DurableContext) -> dict[str, str | int | float]:
    wait_result = await ctx.aio_wait_for(
        uuid4().hex,
        or_(
            SleepCondition(timedelta(seconds=SLEEP_TIME)),
            UserEventCondition(event_key=EVENT_KEY),
        ),
    )
    return {"key": list(wait_result.keys())[0]}  # noqa: RUF015 - as in the seed


# -- Inngest: step.waitForEvent with match / if / timeout, event-triggered ---------------------------

sent_emails: list[tuple[str, str]] = []


async def send_email(user_id: str, template: str) -> str:
    sent_emails.append((user_id, template))
    return f"sent {template} to {user_id}"


@hatchet.durable_task(name="send-onboarding-nudge-email", on_events=["app/account.created"])
async def onboarding_email_drip_campaign(event: dict[str, Any], ctx: DurableContext) -> str:
    user_id = event["data"]["userId"]
    await ctx.memo(send_email, user_id, "welcome")
    # Wait up to 3 days for this user's onboarding to complete ("data.userId" equal in both events).
    onboarding_completed = await ctx.aio_wait_for_event("app/onboarding.completed", timeout="3d", match="data.userId")
    if not onboarding_completed:
        return await ctx.memo(send_email, user_id, "onboarding_nudge")
    return await ctx.memo(send_email, user_id, "new_user_tips")


@hatchet.durable_task(name="generate-blog-post-with-ai", on_events=["ai/post.generator.requested"])
async def generate_blog_post(event: dict[str, Any], ctx: DurableContext) -> dict[str, Any]:
    async def generate_topic_ideas(prompt: str) -> dict[str, Any]:
        return {"completionId": f"cmpl-{prompt}", "topics": ["a", "b", "c"]}

    generated = await ctx.memo(generate_topic_ideas, event["data"]["prompt"])
    # "async" is the awaited event (Inngest's name); "input" works too.
    topic_selected = await ctx.aio_wait_for_event(
        "ai/post.topic.selected",
        f'async.data.completionId == "{generated["completionId"]}"',
        timeout="5m",
    )
    return {"topic": None if topic_selected is None else topic_selected["data"]["topic"]}


# -- Zart: wait_for_event with a typed timeout, events delivered to one run ---------------------------


class ApprovalPayload(BaseModel):
    approved: bool
    reviewer: str
    notes: str | None = None


class OrderData(BaseModel):
    order_id: str
    approval_timeout_s: float = 86400


async def validate(order_id: str) -> bool:
    return True


@hatchet.durable_task(name="OrderApproval")
async def order_approval(data: OrderData, ctx: DurableContext) -> dict[str, Any]:
    await ctx.memo(validate, data.order_id)
    try:
        approval = await ctx.aio_wait_for_event(
            "manager-approval",
            timeout=timedelta(seconds=data.approval_timeout_s),
            payload_validator=ApprovalPayload,
            raise_on_timeout=True,
        )
    except EventTimeout:
        return {"order_id": data.order_id, "status": "escalated"}
    if not approval.approved:
        raise ValueError(f"Order rejected by {approval.reviewer}")
    return {"order_id": data.order_id, "status": "fulfilled", "reviewer": approval.reviewer}


worker = hatchet.worker("events-worker", workflows=[
    durable_event_task, durable_event_task_with_filter, durable_lookback_task, durable_workflow, or_workflow,
    onboarding_email_drip_campaign, generate_blog_post, order_approval,
])


def main() -> None:
    worker.start()


if __name__ == "__main__":
    main()
