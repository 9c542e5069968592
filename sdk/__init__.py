"""Bide: durable async Python tasks on NATS JetStream.

``from sdk import Bide, DurableContext, Context, EmptyModel`` — the Hatchet names.
"""

import importlib
from typing import TYPE_CHECKING, Any

# The names load on first use (PEP 562): importing one module of the package, as the runtime
# does for ``sdk.errors`` or ``sdk._cel``, does not import the whole client and its runtime.
_HOME: dict[str, str] = {
    "Bide": "sdk.client",
    "BideConfig": "sdk.config",
    "BideError": "sdk.errors",
    "BulkPushEvent": "sdk.events",
    "BulkRunItem": "sdk.tasks",
    "Context": "sdk.context",
    "DeliveryLimitExceeded": "sdk.errors",
    "DeliveryReceipt": "sdk.events",
    "DurableContext": "sdk.context",
    "EmptyModel": "sdk.models",
    "EventPayloadError": "sdk.errors",
    "EventRef": "sdk.events",
    "EventTimeout": "sdk.errors",
    "HistoryTooLargeError": "sdk.errors",
    "InputValidationError": "sdk.errors",
    "InvalidExpression": "sdk.errors",
    "NonDeterminismError": "sdk.errors",
    "NonRetryableError": "sdk.errors",
    "NonRetryableException": "sdk.errors",
    "OrGroup": "sdk.conditions",
    "OutputSerializationError": "sdk.errors",
    "ParentCondition": "sdk.conditions",
    "PayloadLimitError": "sdk.errors",
    "PayloadTooLargeError": "sdk.errors",
    "PayloadValidationError": "sdk.errors",
    "RunAlreadyExistsError": "sdk.errors",
    "RunAlreadyFinishedError": "sdk.events",
    "RunCancelledError": "sdk.errors",
    "RunFailedError": "sdk.errors",
    "RunInfo": "sdk.runs",
    "RunList": "sdk.runs",
    "RunNotFoundError": "sdk.errors",
    "RunRef": "sdk.runs",
    "RunSummary": "sdk.runs",
    "RunStatus": "sdk.models",
    "ScheduleTimeoutError": "sdk.errors",
    "ServerBinaryNotFoundError": "sdk.errors",
    "SleepCondition": "sdk.conditions",
    "SleepResult": "sdk.models",
    "TaskDefinition": "sdk.tasks",
    "TaskTimeoutError": "sdk.errors",
    "UnknownTaskError": "sdk.errors",
    "UserEventCondition": "sdk.conditions",
    "Worker": "sdk.worker",
    "Workflow": "sdk.workflow",
    "WorkflowDefinitionError": "sdk.errors",
    "or_": "sdk.conditions",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


if TYPE_CHECKING:
    from sdk.client import Bide
    from sdk.conditions import OrGroup, ParentCondition, SleepCondition, UserEventCondition, or_
    from sdk.config import BideConfig
    from sdk.context import Context, DurableContext
    from sdk.errors import (
        BideError,
        DeliveryLimitExceeded,
        EventPayloadError,
        EventTimeout,
        HistoryTooLargeError,
        InputValidationError,
        InvalidExpression,
        NonDeterminismError,
        NonRetryableError,
        NonRetryableException,
        OutputSerializationError,
        PayloadLimitError,
        PayloadTooLargeError,
        PayloadValidationError,
        RunAlreadyExistsError,
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
    from sdk.runs import RunInfo, RunList, RunRef, RunSummary
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
    "DeliveryLimitExceeded",
    "DeliveryReceipt",
    "DurableContext",
    "EmptyModel",
    "EventPayloadError",
    "EventRef",
    "EventTimeout",
    "HistoryTooLargeError",
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
    "RunAlreadyExistsError",
    "RunAlreadyFinishedError",
    "RunCancelledError",
    "RunFailedError",
    "RunInfo",
    "RunList",
    "RunNotFoundError",
    "RunRef",
    "RunStatus",
    "RunSummary",
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
