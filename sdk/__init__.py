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
    OutputSerializationError,
    PayloadValidationError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    ServerBinaryNotFoundError,
    TaskTimeoutError,
    UnknownTaskError,
)
from sdk.events import BulkPushEvent, DeliveryReceipt, EventRef, RunAlreadyFinishedError
from sdk.models import EmptyModel, RunStatus, SleepResult
from sdk.runs import RunInfo, RunRef
from sdk.tasks import TaskDefinition
from sdk.worker import Worker

__all__ = [
    "Bide",
    "BideConfig",
    "BideError",
    "BulkPushEvent",
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
    "OrGroup",
    "OutputSerializationError",
    "ParentCondition",
    "PayloadValidationError",
    "RunAlreadyFinishedError",
    "RunCancelledError",
    "RunFailedError",
    "RunInfo",
    "RunNotFoundError",
    "RunRef",
    "RunStatus",
    "ServerBinaryNotFoundError",
    "SleepCondition",
    "SleepResult",
    "TaskDefinition",
    "TaskTimeoutError",
    "UnknownTaskError",
    "UserEventCondition",
    "Worker",
    "or_",
]
