from __future__ import annotations

from typing import Any

from kubetask.engine.machine import Outcome
from kubetask.engine.outcomes import Report, classify, pod_end


def pod(
    phase: str,
    *,
    exit_code: int | None = None,
    reason: str | None = None,
    container_reason: str = "Error",
    waiting: str | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if reason:
        status["reason"] = reason
    cs: dict[str, Any] = {"name": "task", "state": {}}
    if exit_code is not None:
        cs["state"] = {"terminated": {"exitCode": exit_code, "reason": container_reason}}
    if waiting:
        cs["state"] = {"waiting": {"reason": waiting, "message": "details"}}
    status["containerStatuses"] = [cs]
    return {"metadata": {"name": "p"}, "status": status}


def test_running_pod_has_not_ended() -> None:
    assert pod_end(pod("Running")) is None


def test_reported_success_wins() -> None:
    end = pod_end(pod("Failed", exit_code=137, container_reason="OOMKilled"))
    assert end is not None
    assert classify(attempt=1, end=end, report=Report(succeeded=True)).outcome is Outcome.SUCCEEDED


def test_deadline_exceeded_is_a_timeout() -> None:
    end = pod_end(pod("Failed", reason="DeadlineExceeded"))
    assert end is not None
    ev = classify(attempt=1, end=end, report=None)
    assert ev.outcome is Outcome.TIMED_OUT
    assert ev.reason == "MaxDurationExceeded"


def test_oom_killed_is_a_retryable_failure_with_its_reason() -> None:
    end = pod_end(pod("Failed", exit_code=137, container_reason="OOMKilled"))
    assert end is not None
    ev = classify(attempt=2, end=end, report=None)
    assert (ev.outcome, ev.reason) == (Outcome.FAILED, "OOMKilled")


def test_evicted_pod_is_a_retryable_failure() -> None:
    end = pod_end(pod("Failed", reason="Evicted"))
    assert end is not None
    assert classify(attempt=1, end=end, report=None).reason == "Evicted"


def test_deleted_pod_is_a_retryable_failure() -> None:
    end = pod_end(None)
    assert end is not None
    ev = classify(attempt=1, end=end, report=None)
    assert (ev.outcome, ev.reason) == (Outcome.FAILED, "PodDeleted")


def test_abort_exit_code_is_not_retried() -> None:
    end = pod_end(pod("Failed", exit_code=10))
    assert end is not None
    assert classify(attempt=1, end=end, report=None).outcome is Outcome.ABORTED


def test_report_not_retryable_is_aborted_with_the_error() -> None:
    end = pod_end(pod("Failed", exit_code=10))
    assert end is not None
    ev = classify(
        attempt=1,
        end=end,
        report=Report(succeeded=False, retryable=False, error_type="AbortRun", error_message="no"),
    )
    assert ev.outcome is Outcome.ABORTED
    assert ev.error is not None and ev.error.message == "no"


def test_exit_zero_without_report_is_a_failure() -> None:
    end = pod_end(pod("Succeeded", exit_code=0, container_reason="Completed"))
    assert end is not None
    assert classify(attempt=1, end=end, report=None).reason == "MissingResult"


def test_image_that_cannot_be_pulled_ends_the_attempt() -> None:
    end = pod_end(pod("Pending", waiting="ErrImageNeverPull"))
    assert end is not None
    assert classify(attempt=1, end=end, report=None).reason == "ErrImageNeverPull"
