"""The failure report of /runner/v1/complete: the error's class hierarchy and what the
task's catch_error decided (retryAt, skipped), as both sides read and write them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from kubetask.protocol import (
    MAX_ERROR_TYPE_NAME_CHARS,
    MAX_ERROR_TYPES,
    Completion,
    ErrorInfo,
    Failed,
    problem,
)

ERROR = {"type": "Declined", "message": "card declined", "stack": "Traceback ..."}


def failed(**fields: Any) -> Failed:
    result = Completion.model_validate({"status": "failed", "error": ERROR, **fields}).root
    assert isinstance(result, Failed)
    return result


def refused(**fields: Any) -> str:
    with pytest.raises(ValidationError) as info:
        Completion.model_validate({"status": "failed", "error": ERROR, **fields})
    found = problem(info.value)
    assert found.code == "invalid_result" and found.status == 400
    return found.message


def test_retry_at_is_rfc3339_with_an_offset_and_sent_as_utc() -> None:
    result = failed(retryAt="2026-05-01T14:00:00+02:00")
    assert result.retry_at == datetime(2026, 5, 1, 12, tzinfo=UTC)
    assert result.model_dump(by_alias=True)["retryAt"] == "2026-05-01T12:00:00.000000Z"
    assert failed(retryAt="2026-05-01T12:00:00Z").retry_at == datetime(2026, 5, 1, 12, tzinfo=UTC)
    assert failed().retry_at is None and failed(retryAt=None).retry_at is None


@pytest.mark.parametrize("value", ["2026-05-01T12:00:00", "tomorrow", "2026-05-01", 1714564800, True])
def test_retry_at_without_an_offset_or_not_a_time_is_refused_with_an_example(value: Any) -> None:
    assert "2024-05-01T12:00:00Z" in refused(retryAt=value)


def test_a_naive_datetime_is_refused_on_the_runner_side_too() -> None:
    with pytest.raises(ValidationError, match="time zone"):
        Failed(error=ErrorInfo(**ERROR), retry_at=datetime(2026, 5, 1))
    aware = Failed(
        error=ErrorInfo(**ERROR), retry_at=datetime(2026, 5, 1, tzinfo=timezone(timedelta(hours=1)))
    )
    assert aware.model_dump(by_alias=True)["retryAt"] == "2026-04-30T23:00:00.000000Z"


def test_skipped_and_retry_at_must_agree_with_retryable() -> None:
    assert failed(retryable=False, skipped=True).skipped
    assert '"skipped": true needs "retryable": false' in refused(skipped=True)
    assert '"retryAt" needs "retryable": true' in refused(retryable=False, retryAt="2026-05-01T12:00:00Z")
    assert "true or false" in refused(skipped="yes")


def test_the_class_hierarchy_is_kept_cut_to_its_limits() -> None:
    long = "m." + "X" * (2 * MAX_ERROR_TYPE_NAME_CHARS)
    error = ErrorInfo.model_validate(
        {**ERROR, "types": [long] + [f"m.E{i}" for i in range(2 * MAX_ERROR_TYPES)]}
    )
    assert len(error.types) == MAX_ERROR_TYPES
    assert error.types[0] == long[:MAX_ERROR_TYPE_NAME_CHARS] and error.types[1] == "m.E0"
    assert ErrorInfo.model_validate(ERROR).types == []  # older runners send none
    assert ErrorInfo.model_validate({**ERROR, "types": None}).types == []
    assert "error.types must be a list of strings" in refused(error={**ERROR, "types": "Declined"})
    assert "error.types must be a list of strings" in refused(error={**ERROR, "types": [1]})
