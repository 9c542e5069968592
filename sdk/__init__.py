"""Bide: durable async Python tasks on NATS JetStream.

``from sdk import Bide, DurableContext, Context, EmptyModel`` — the Hatchet names.
"""

from sdk.client import Bide
from sdk.conditions import OrGroup, ParentCondition, SleepCondition, UserEventCondition, or_
from sdk.config import BideConfig
from sdk.context import Context, DurableContext
from sdk.errors import (
    BideError,
    EventPayloadError,
    EventTimeout,
    InputValidationError,
    InvalidExpression,
    NonDeterminismError,
    NonRetryableError,
    NonRetryableException,
    OutputSerializationError,
    PayloadLimitError,
    PayloadTooLargeError,
    PayloadValidationError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    ScheduleTimeoutError,
    ServerBinaryNotFoundError,
    TaskTimeoutError,
    UnknownTaskError,
    WorkflowDefinitionError,
)
from sdk.events import BulkPushEvent, DeliveryReceipt, EventRef, RunAlreadyFinishedError
from sdk.models import EmptyModel, RunStatus, SleepResult
from sdk.runs import RunInfo, RunRef
from sdk.tasks import BulkRunItem, TaskDefinition
from sdk.worker import Worker
from sdk.workflow import Workflow

__all__ = [
    "Bide",
    "BideConfig",
    "BideError",
    "BulkPushEvent",
    "BulkRunItem",
    "Context",
    "DeliveryReceipt",
    "DurableContext",
    "EmptyModel",
    "EventPayloadError",
    "EventRef",
    "EventTimeout",
    "InputValidationError",
    "InvalidExpression",
    "NonDeterminismError",
    "NonRetryableError",
    "NonRetryableException",
    "OrGroup",
    "OutputSerializationError",
    "ParentCondition",
    "PayloadLimitError",
    "PayloadTooLargeError",
    "PayloadValidationError",
    "RunAlreadyFinishedError",
    "RunCancelledError",
    "RunFailedError",
    "RunInfo",
    "RunNotFoundError",
    "RunRef",
    "RunStatus",
    "ScheduleTimeoutError",
    "ServerBinaryNotFoundError",
    "SleepCondition",
    "SleepResult",
    "TaskDefinition",
    "TaskTimeoutError",
    "UnknownTaskError",
    "UserEventCondition",
    "Worker",
    "Workflow",
    "WorkflowDefinitionError",
    "or_",
]
