"""Each attempt's error as the Run's status shows it (type and message, short) and as the
API's run detail does (type, message, stack and class hierarchy)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubetask.apimodels import AttemptInfo
from kubetask.protocol import TRUNCATED
from kubetask.store import tables as t
from kubetask.store.runs import STATUS_ERROR_MESSAGE_BYTES, attempt_view

T = datetime(2026, 1, 1, tzinfo=UTC)
TYPES = ["app.Declined", "builtins.Exception", "builtins.BaseException"]


def attempt(
    error: dict[str, Any] | None, report: dict[str, Any] | None, reason: str = "TaskFailed"
) -> t.Attempt:
    return t.Attempt(
        run_id="r",
        number=1,
        pod_name="p-1",
        token_hash="x",
        created_at=T,
        started_at=T,
        finished_at=T,
        exit_code=1,
        reason=reason,
        error=error,
        report=report,
        resume=False,  # the column's default, as a stored row has it
    )


def reported(message: str) -> t.Attempt:
    error = {
        "type": "Declined",
        "message": message,
        "stack": "Traceback (most recent call last): ...",
        "types": TYPES,
    }
    report = {"succeeded": False, "retryable": True, "error": error, "retryAt": None, "skipped": False}
    return attempt({"type": "Declined", "message": message}, report)


def test_the_api_shows_type_message_stack_and_hierarchy() -> None:
    view = attempt_view(reported("card declined"), pod_key="podName", detail=True)
    assert view["error"] == {
        "type": "Declined",
        "message": "card declined",
        "stack": "Traceback (most recent call last): ...",
        "types": TYPES,
    }
    info = AttemptInfo.model_validate(view)
    assert info.error is not None and info.error.stack and info.error.types == TYPES
    assert info.model_dump(by_alias=True)["podName"] == "p-1"


def test_the_status_shows_type_and_a_message_short_enough_for_every_attempt() -> None:
    long = "é" * (2 * STATUS_ERROR_MESSAGE_BYTES)
    view = attempt_view(reported(long), pod_key="pod")
    assert set(view["error"]) == {"type", "message"} and view["error"]["type"] == "Declined"
    assert len(view["error"]["message"].encode()) <= STATUS_ERROR_MESSAGE_BYTES
    assert view["error"]["message"].endswith(TRUNCATED) and view["pod"] == "p-1"
    assert attempt_view(reported("short"), pod_key="pod")["error"] == {"type": "Declined", "message": "short"}
    # The API keeps the whole message.
    assert attempt_view(reported(long), pod_key="podName", detail=True)["error"]["message"] == long


def test_an_attempt_that_ended_without_a_report_has_no_stack() -> None:
    oom = attempt(
        {"type": "OOMKilled", "message": "container exited with code 137"}, None, reason="OOMKilled"
    )
    assert attempt_view(oom, pod_key="podName", detail=True)["error"] == {
        "type": "OOMKilled",
        "message": "container exited with code 137",
        "stack": None,
        "types": [],
    }
    # A report of another error (the deadline ended the pod after it) lends it no stack.
    late = reported("slow")
    late.error = {"type": "MaxDurationExceeded", "message": "the attempt exceeded maxDurationSeconds"}
    assert attempt_view(late, pod_key="podName", detail=True)["error"]["stack"] is None
    assert attempt_view(attempt(None, None, reason="Succeeded"), pod_key="pod")["error"] is None
