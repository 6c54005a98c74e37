"""The public API's models: one source of truth with the Run spec, field names on the
wire, and problems that name the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubetask.apimodels import (
    MAX_BATCH_ITEMS,
    PHASES,
    TERMINAL_PHASES,
    BatchTriggerRequest,
    BulkRequest,
    QueueUpdate,
    RunDetail,
    TriggerRequest,
    TriggerResponse,
    request_problem,
)
from kubetask.engine.machine import TERMINAL, Phase
from kubetask.spec import MAX_PAYLOAD_BYTES, QueueSpec, RunSpec


def problem_of(model: Any, body: Any) -> tuple[int, str, str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    found = request_problem(info.value)
    return found.status, found.code, found.message


def test_trigger_fields_have_the_run_specs_rules() -> None:
    for name in (
        "payload",
        "concurrency_key",
        "idempotency_key",
        "priority",
        "tags",
        "max_attempts",
        "ttl_seconds_after_finished",
    ):
        ours, theirs = TriggerRequest.model_fields[name], RunSpec.model_fields[name]
        assert ours.annotation == theirs.annotation, name
        assert ours.metadata == theirs.metadata, name
        assert ours.alias == theirs.alias and ours.description == theirs.description, name
    for name in ("concurrency_limit", "per_key_concurrency_limit"):
        assert QueueUpdate.model_fields[name].metadata == QueueSpec.model_fields[name].metadata


def test_phases_are_the_engines() -> None:
    assert set(PHASES) == {p.value for p in Phase}
    assert {p.value for p in TERMINAL} == TERMINAL_PHASES


def test_trigger_body_becomes_the_run_spec() -> None:
    body = {
        "payload": {"n": 1},
        "concurrencyKey": "tenant-1",
        "idempotencyKey": "k",
        "idempotencyKeyTTLSeconds": 60,
        "priority": 5,
        "tags": ["a"],
        "maxAttempts": 2,
        "ttlSecondsAfterFinished": 10,
    }
    trigger = TriggerRequest.model_validate(body)
    assert trigger.run_spec("hello").model_dump(by_alias=True, exclude_defaults=True) == {
        "task": "hello",
        "payload": {"n": 1},
        "concurrencyKey": "tenant-1",
        "idempotencyKey": "k",
        "priority": 5,
        "tags": ["a"],
        "maxAttempts": 2,
        "ttlSecondsAfterFinished": 10,
    }
    assert TriggerRequest.model_validate({}).run_spec("t") == RunSpec(task="t")


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        ({"priority": 5000}, 400, "invalid_body", "priority: "),
        ({"maxAttempts": 0}, 400, "invalid_body", "maxAttempts: "),
        ({"delay": 5}, 400, "invalid_body", "delay: unknown field"),
        ({"tags": ["x" * 129]}, 400, "invalid_body", "tags: "),
        ({"tags": ["x"] * 33}, 400, "invalid_body", "tags: "),
        ({"idempotencyKeyTTLSeconds": 5}, 400, "invalid_body", "needs an idempotencyKey"),
        ({"payload": {"x": "a" * MAX_PAYLOAD_BYTES}}, 413, "payload_too_large", "payload: is"),
        ({"payload": [1]}, 400, "invalid_body", "payload: "),
        ({"payload": {"a": "nul\x00"}}, 400, "invalid_body", "payload: has a NUL"),
        ({"payload": {"\x00": 1}}, 400, "invalid_body", "payload: has a NUL"),
        ({"tags": ["\ud800"]}, 400, "invalid_body", "tags: has a NUL"),
        ({"idempotencyKey": "k\x00"}, 400, "invalid_body", "idempotencyKey: has a NUL"),
    ],
)
def test_trigger_problems_name_the_field(body: Any, status: int, code: str, says: str) -> None:
    got = problem_of(TriggerRequest, body)
    assert got[:2] == (status, code) and says in got[2], got


def test_batch_limits() -> None:
    assert problem_of(BatchTriggerRequest, {"items": [{}] * (MAX_BATCH_ITEMS + 1)})[:2] == (
        413,
        "too_many_items",
    )
    assert problem_of(BatchTriggerRequest, {"items": []})[0] == 400
    got = problem_of(BatchTriggerRequest, {"items": [{}, {"priority": "high"}]})
    assert got[2].startswith("items[1].priority: ")
    assert len(BatchTriggerRequest.model_validate({"items": [{}] * MAX_BATCH_ITEMS}).items) == MAX_BATCH_ITEMS


def test_bulk_request_needs_a_filter_and_reads_lists_like_the_query() -> None:
    assert "at least one filter" in problem_of(BulkRequest, {})[2]
    bulk = BulkRequest.model_validate({"phase": "failed,Running", "task": "a", "since": "24h"})
    assert bulk.phase == ["Failed", "Running"] and bulk.task == ["a"]
    assert "phase[0]" in problem_of(BulkRequest, {"phase": ["Done"]})[2]


def test_queue_update_is_a_merge_patch() -> None:
    assert QueueUpdate.model_validate({"paused": True}).spec_patch() == {"paused": True}
    assert QueueUpdate.model_validate({"concurrencyLimit": None}).spec_patch() == {"concurrencyLimit": None}
    assert "at least one" in problem_of(QueueUpdate, {})[2]
    assert "paused" in problem_of(QueueUpdate, {"paused": None})[2]
    assert problem_of(QueueUpdate, {"concurrencyLimit": 0})[2].startswith("concurrencyLimit: ")


def test_responses_speak_camel_case_and_ignore_new_fields() -> None:
    resp = TriggerResponse(id="run_1", name="n", namespace="ns", task="t", is_cached=True)
    assert resp.model_dump(by_alias=True) == {
        "id": "run_1",
        "name": "n",
        "namespace": "ns",
        "task": "t",
        "isCached": True,
    }
    detail = RunDetail.model_validate(
        {
            "id": "run_1",
            "namespace": "ns",
            "name": "n",
            "task": "t",
            "queue": "ns/t",
            "phase": "Running",
            "attempt": 1,
            "maxAttempts": 3,
            "createdAt": "2024-05-01T12:00:00.000000Z",
            "somethingNew": 1,
            "attempts": [{"number": 1, "podName": "p", "error": {"type": "E", "message": "m"}}],
        }
    )
    assert detail.attempts[0].error is not None and detail.attempts[0].error.type == "E"
