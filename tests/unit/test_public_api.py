from __future__ import annotations

import subprocess
import sys

import sdk

EXPECTED = [
    "Bide", "BideConfig", "BideError", "Context", "DurableContext", "EmptyModel", "InputValidationError",
    "NonDeterminismError", "OutputSerializationError", "RunCancelledError", "RunFailedError", "RunInfo",
    "RunList", "RunNotFoundError", "RunRef", "RunStatus", "RunSummary", "ServerBinaryNotFoundError", "SleepResult",
    "TaskDefinition",
    "TaskTimeoutError", "UnknownTaskError", "Worker",
    # event waits
    "BulkPushEvent", "DeliveryReceipt", "EventPayloadError", "EventRef", "EventTimeout", "InvalidExpression",
    "OrGroup", "ParentCondition", "PayloadValidationError", "RunAlreadyFinishedError", "SleepCondition",
    "UserEventCondition", "or_",
    # children, workflows, retries
    "BulkRunItem", "NonRetryableError", "NonRetryableException", "ScheduleTimeoutError", "Workflow",
    "WorkflowDefinitionError",
    # limits
    "PayloadLimitError", "PayloadTooLargeError",
    # errors a caller may catch: a chosen run id taken, a run failed over a limit
    "RunAlreadyExistsError", "HistoryTooLargeError", "DeliveryLimitExceeded",
]


def test_public_names_are_pinned() -> None:
    assert sorted(sdk.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert hasattr(sdk, name), name


def test_importing_the_sdk_does_not_load_the_runtime() -> None:
    runtime = "('actors.hosting.host', 'actors.engine.replay', 'actors.hosting.router')"
    code = f"import sdk, sys; print(sorted(m for m in {runtime} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
