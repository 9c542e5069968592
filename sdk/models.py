"""Small value types of the public API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class EmptyModel(BaseModel):
    """The input of a task that takes none (accepts and keeps any fields, as in Hatchet)."""

    model_config = ConfigDict(extra="allow")


@dataclass(frozen=True)
class SleepResult:
    """What ``aio_sleep_for`` / ``aio_sleep_until`` return: the duration asked for."""

    duration: timedelta


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
