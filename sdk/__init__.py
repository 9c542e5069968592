"""Bide: durable async Python tasks on NATS JetStream.

``from sdk import Bide, DurableContext, Context, EmptyModel`` — the Hatchet names.
"""

from sdk.client import Bide
from sdk.config import BideConfig
from sdk.context import Context, DurableContext
from sdk.errors import (
    BideError,
    InputValidationError,
    NonDeterminismError,
    OutputSerializationError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    ServerBinaryNotFoundError,
    TaskTimeoutError,
    UnknownTaskError,
)
from sdk.models import EmptyModel, RunStatus, SleepResult
from sdk.runs import RunInfo, RunRef
from sdk.tasks import TaskDefinition
from sdk.worker import Worker

__all__ = [
    "Bide",
    "BideConfig",
    "BideError",
    "Context",
    "DurableContext",
    "EmptyModel",
    "InputValidationError",
    "NonDeterminismError",
    "OutputSerializationError",
    "RunCancelledError",
    "RunFailedError",
    "RunInfo",
    "RunNotFoundError",
    "RunRef",
    "RunStatus",
    "ServerBinaryNotFoundError",
    "SleepResult",
    "TaskDefinition",
    "TaskTimeoutError",
    "UnknownTaskError",
    "Worker",
]
