"""Errors users see. Each message names the run, the position or the offending value."""

from __future__ import annotations


class BideError(Exception):
    """Base class of every Bide error."""


class NonDeterminismError(BideError):
    """A replay asked for a different operation than the history recorded at that position."""

    def __init__(self, run_id: str, position: int, recorded: str, requested: str) -> None:
        super().__init__(
            f"run {run_id}: non-deterministic replay at position {position}: "
            f"the history recorded {recorded}, but the code now calls {requested}. "
            "Code that changes the order or arguments of durable calls cannot resume runs started "
            "by the old code."
        )
        self.run_id = run_id
        self.position = position
        self.recorded = recorded
        self.requested = requested


class InputValidationError(BideError, ValueError):
    """A run's input does not fit the task's input model."""


class OutputSerializationError(BideError, TypeError):
    """A task returned (or a memo produced) a value that cannot be stored as JSON."""


class UnknownTaskError(BideError, LookupError):
    """A task name that no worker has registered."""


class RunNotFoundError(BideError, LookupError):
    """No run with that id exists: it never did, or it finished and was removed after its retention."""

    def __init__(self, message: str, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class RunAlreadyExistsError(BideError, ValueError):
    """A run with this id was started before, by another request (another task or input)."""

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class HistoryTooLargeError(BideError):
    """A run's history grew past ``BIDE_MAX_HISTORY``: the run fails rather than grow further."""


class RunFailedError(BideError):
    """The run failed; ``error_type`` and ``error_message`` describe the task's exception."""

    def __init__(self, run_id: str, error_type: str, error_message: str, traceback: str = "") -> None:
        super().__init__(f"run {run_id} failed: {error_type}: {error_message}")
        self.run_id = run_id
        self.error_type = error_type
        self.error_message = error_message
        self.remote_traceback = traceback


class RunCancelledError(BideError):
    """The run was cancelled before it finished."""


class TaskTimeoutError(BideError, TimeoutError):
    """A task ran longer than its ``execution_timeout``."""


class ServerBinaryNotFoundError(BideError, FileNotFoundError):
    """The ``nats-server`` binary for the embedded server cannot be found."""


class EventTimeout(BideError, TimeoutError):
    """A wait for an event timed out (raised only when the caller asked for it; otherwise ``None``)."""


class InvalidExpression(BideError, ValueError):
    """A CEL expression that does not parse or uses names a wait cannot see."""

    def __init__(self, expression: str, reason: str) -> None:
        super().__init__(f"invalid CEL expression {expression!r}: {reason}")
        self.expression = expression
        self.reason = reason


class PayloadValidationError(BideError, ValueError):
    """An awaited event's payload does not fit the wait's ``payload_validator``."""


class EventPayloadError(BideError, ValueError):
    """An event payload (or metadata) that is not JSON data."""


class PayloadLimitError(BideError, ValueError):
    """A payload over one of Bide's limits: nested too deep, or an integer outside int64.

    ``what`` names the payload, ``limit`` the limit and ``found`` what broke it.
    """

    def __init__(self, what: str, limit: str, found: str, hint: str = "") -> None:
        super().__init__(f"{what} is over Bide's limit of {limit}: it has {found}" + (f"; {hint}" if hint else ""))
        self.what = what
        self.limit = limit
        self.found = found


class PayloadTooLargeError(PayloadLimitError):
    """A payload larger than the configured payload limit (``BIDE_MAX_PAYLOAD``)."""

    def __init__(self, what: str, limit: str, found: str) -> None:
        super().__init__(what, limit, found, hint="store large data elsewhere and pass a reference to it")


class NonRetryableError(BideError):
    """Raise it from a task to fail the run at once, whatever its ``retries``."""


NonRetryableException = NonRetryableError
"""Hatchet's name for :class:`NonRetryableError`."""


class ScheduleTimeoutError(BideError, TimeoutError):
    """A run waited in the queue longer than its task's ``schedule_timeout`` before a host took it."""


class DeliveryLimitExceeded(BideError):
    """A run's activation came back more often than ``BIDE_MAX_DELIVERIES``: every host that took it
    died or failed before finishing the turn (a poison input), so the run failed without its code
    running again."""


class WorkflowDefinitionError(BideError, ValueError):
    """A workflow's tasks do not form a valid graph (unknown parent, a cycle, a misplaced condition)."""


class TaskSkipped(BideError):
    """Raised inside a workflow task's run when its ``skip_if`` holds: the task ends as skipped."""


class TaskCancelledByCondition(BideError):
    """Raised inside a workflow task's run when its ``cancel_if`` holds: the run ends cancelled."""
