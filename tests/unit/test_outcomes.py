from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from kubetask.api.runner import _report as api_report
from kubetask.control.attempts import _report as read_report
from kubetask.engine.machine import Outcome
from kubetask.engine.outcomes import (
    IMAGE_PULL,
    STARTING,
    TERMINATING,
    UNSCHEDULABLE,
    Report,
    StartLimits,
    classify,
    pod_end,
    start_problem,
    start_stage,
)
from kubetask.protocol import Completion


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


def test_a_pod_that_failed_before_its_container_started_is_not_counted() -> None:
    # The kubelet refused it at admission (no container status beyond an empty one).
    end = pod_end(pod("Failed", reason="OutOfcpu"))
    assert end is not None and end.infra and end.reason == "OutOfcpu"
    ev = classify(attempt=1, end=end, report=None)
    assert (ev.outcome, ev.reason) == (Outcome.INFRA, "OutOfcpu")
    # Killed before the start, with no reason given.
    end = pod_end(pod("Failed"))
    assert end is not None and end.infra and end.reason == "NotStarted"
    assert "before its task container started" in end.message
    # A container that ran and failed is counted as ever.
    ran = pod_end(pod("Failed", exit_code=1))
    assert ran is not None and not ran.infra


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


def test_report_of_a_raised_error_carries_its_hierarchy_and_retry_time() -> None:
    end = pod_end(pod("Failed", exit_code=1))
    assert end is not None
    at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    types = ("app.Declined", "app.PaymentError", "builtins.Exception", "builtins.BaseException")
    report = Report(
        succeeded=False, error_type="Declined", error_message="no", error_types=types, retry_at=at
    )
    ev = classify(attempt=2, end=end, report=report)
    assert (ev.outcome, ev.reason, ev.error_types, ev.retry_at) == (Outcome.FAILED, "TaskFailed", types, at)


def test_report_without_a_hierarchy_names_the_class_alone() -> None:
    # An older runner reports error.type only: nonRetryableErrors can still match the name.
    end = pod_end(pod("Failed", exit_code=1))
    assert end is not None
    ev = classify(
        attempt=1, end=end, report=Report(succeeded=False, error_type="KeyError", error_message="k")
    )
    assert ev.error_types == ("KeyError",) and ev.retry_at is None


def test_catch_error_skip_is_not_retried_and_says_so() -> None:
    end = pod_end(pod("Failed", exit_code=10))
    assert end is not None
    report = Report(
        succeeded=False, retryable=False, error_type="ValueError", error_message="bad", skipped=True
    )
    ev = classify(attempt=1, end=end, report=report)
    assert (ev.outcome, ev.reason) == (Outcome.ABORTED, "RetrySkipped")
    assert ev.error is not None and (ev.error.type, ev.error.message) == ("ValueError", "bad")


def test_exit_zero_without_report_is_a_failure() -> None:
    end = pod_end(pod("Succeeded", exit_code=0, container_reason="Completed"))
    assert end is not None
    assert classify(attempt=1, end=end, report=None).reason == "MissingResult"


LIMITS = StartLimits(
    unschedulable=timedelta(seconds=300),
    image_pull=timedelta(seconds=60),
    start=timedelta(seconds=600),
    terminating=timedelta(seconds=30),
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def created(p: dict[str, Any], at: datetime = T0, **meta: Any) -> dict[str, Any]:
    p["metadata"].update({"creationTimestamp": at.isoformat().replace("+00:00", "Z"), **meta})
    return p


def test_image_that_cannot_be_pulled_waits_then_ends_the_attempt_uncounted() -> None:
    p = created(pod("Pending", waiting="ErrImageNeverPull"))
    assert pod_end(p) is None  # the image may still arrive: not the end by itself
    end, due = start_problem(p, now=T0 + timedelta(seconds=10), limits=LIMITS)
    assert end is None and due == T0 + timedelta(seconds=60)
    end, due = start_problem(p, now=T0 + timedelta(seconds=60), limits=LIMITS)
    assert end is not None and end.infra and due is None
    ev = classify(attempt=1, end=end, report=None)
    assert (ev.outcome, ev.reason) == (Outcome.INFRA, "ErrImageNeverPull")


def test_invalid_image_name_fails_at_once_without_retry() -> None:
    end = pod_end(pod("Pending", waiting="InvalidImageName"))
    assert end is not None and end.permanent
    assert classify(attempt=1, end=end, report=None).outcome is Outcome.ABORTED


def test_unschedulable_pod_ends_after_its_timeout_uncounted() -> None:
    p = created(pod("Pending"))
    p["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}
    ]
    end, due = start_problem(p, now=T0 + timedelta(seconds=299), limits=LIMITS)
    assert end is None and due == T0 + timedelta(seconds=300)
    end, _ = start_problem(p, now=T0 + timedelta(seconds=300), limits=LIMITS)
    assert end is not None and end.infra and end.reason == "Unschedulable" and "0/1 nodes" in end.message


def test_started_pod_has_no_start_deadline() -> None:
    p = created(pod("Running"))
    p["status"]["containerStatuses"][0]["state"] = {"running": {"startedAt": "x"}}
    assert start_problem(p, now=T0 + timedelta(days=1), limits=LIMITS) == (None, None)


def test_pod_stuck_terminating_on_a_lost_node_ends_after_the_terminating_timeout() -> None:
    p = created(pod("Running"), deletionTimestamp=T0.isoformat().replace("+00:00", "Z"))
    p["status"]["containerStatuses"][0]["state"] = {"running": {"startedAt": "x"}}
    end, due = start_problem(p, now=T0 + timedelta(seconds=10), limits=LIMITS)
    assert end is None and due == T0 + timedelta(seconds=30)
    end, _ = start_problem(p, now=T0 + timedelta(seconds=30), limits=LIMITS)
    # It ran: the node's loss counts as a failed attempt (the task may have done work).
    assert end is not None and end.reason == "NodeLost" and not end.infra
    assert classify(attempt=1, end=end, report=None).outcome is Outcome.FAILED


def test_a_failure_report_survives_the_api_and_the_database_into_the_engine() -> None:
    # The runner's body -> attempts.report (api/runner.py) -> jsonb -> Report (control/attempts.py).
    body = {
        "status": "failed",
        "error": {"type": "Declined", "message": "no", "stack": "Traceback", "types": ["app.Declined"]},
        "retryAt": "2026-01-01T12:00:00+02:00",
    }
    stored = json.loads(json.dumps(api_report(Completion.model_validate(body).root)))
    assert stored["retryAt"] == "2026-01-01T10:00:00.000000Z"
    report = read_report(stored)
    assert report == Report(
        succeeded=False,
        retryable=True,
        error_type="Declined",
        error_message="no",
        error_types=("app.Declined",),
        retry_at=datetime(2026, 1, 1, 10, tzinfo=UTC),
    )
    skipped = {**body, "retryable": False, "skipped": True, "retryAt": None}
    assert read_report(json.loads(json.dumps(api_report(Completion.model_validate(skipped).root)))) == Report(
        succeeded=False,
        retryable=False,
        error_type="Declined",
        error_message="no",
        error_types=("app.Declined",),
        skipped=True,
    )
    # A report stored before these fields existed still reads.
    old = {"succeeded": False, "retryable": True, "error": {"type": "E", "message": "m", "stack": None}}
    assert read_report(old) == Report(succeeded=False, error_type="E", error_message="m")


def test_start_stage_names_the_limit_a_pod_is_under() -> None:
    assert start_stage(created(pod("Pending", waiting="ContainerCreating"))) == STARTING
    assert start_stage(created(pod("Pending", waiting="ImagePullBackOff"))) == IMAGE_PULL
    unscheduled = created(pod("Pending"))
    unscheduled["status"]["conditions"] = [{"type": "PodScheduled", "status": "False"}]
    assert start_stage(unscheduled) == UNSCHEDULABLE
    running = created(pod("Running"))
    running["status"]["containerStatuses"][0]["state"] = {"running": {"startedAt": "x"}}
    assert start_stage(running) is None
    running["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert start_stage(running) == TERMINATING


def test_a_pull_error_after_a_slow_start_moves_the_deadline_to_the_pull_limit() -> None:
    p = created(pod("Pending", waiting="ContainerCreating"))
    assert start_problem(p, now=T0 + timedelta(seconds=10), limits=LIMITS) == (
        None,
        T0 + timedelta(seconds=600),
    )
    p["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ErrImagePull"}}
    end, _ = start_problem(p, now=T0 + timedelta(seconds=70), limits=LIMITS)
    assert end is not None and end.infra and end.reason == "ErrImagePull" and "within 60s" in end.message
