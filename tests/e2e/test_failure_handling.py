"""Failure handling by error type, end to end (docs/retries.md): a Task's
retry.nonRetryableErrors, the task's catch_error (skip, retry_after) and retry.outOfMemory
after a real OOM kill, on the real cluster with pods from the runner image built from this
tree."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.e2e.harness import Operator, PodWatcher, Stack

pytestmark = pytest.mark.e2e


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def inline(task_id: str, body: str, *, catch_error: str | None = None) -> str:
    """An inline Task source: errors of its own, an optional catch_error hook, one @task."""
    hook = f"\n{catch_error}\n" if catch_error else ""
    option = ", catch_error=decide" if catch_error else ""
    return (
        "from kubetask import task, RetryDecision\n\n"
        "class PaymentError(Exception):\n    pass\n\n"
        "class Declined(PaymentError):\n    pass\n"
        f"{hook}\n"
        f"@task(id={task_id!r}{option})\n"
        f"{body}\n"
    )


class Tasks:
    """Applies a test's Tasks and checks that the API server kept their spec.retry whole
    (a Task CRD of another checkout on a shared cluster would prune the new fields; the
    ``ns`` fixture installs this tree's CRDs before each test, see ``ensure_crds``)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def apply_task(self, ns: str, name: str, spec: dict[str, Any]) -> None:
        stored = self.stack.apply_task(ns, name, spec)
        kept = stored["spec"].get("retry") or {}
        assert {**kept, **spec["retry"]} == kept, f"the API server prunes spec.retry of Task {name}: {kept}"


@pytest.fixture
def tasks(stack: Stack) -> Tasks:
    return Tasks(stack)


def attempt_reports(database_url: str, run_id: str) -> list[dict[str, Any] | None]:
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT report FROM attempts WHERE run_id = :i ORDER BY number"), {"i": run_id}
        ).all()
    engine.dispose()
    return [r.report for r in rows]


def test_an_error_named_in_non_retryable_errors_fails_the_run_after_one_attempt(
    stack: Stack, ns: str, operator: Operator, tasks: Tasks
) -> None:
    tasks.apply_task(
        ns,
        "charge",
        {
            "source": inline("charge", "def f(payload, ctx):\n    raise Declined('card 4242 declined')"),
            "retry": {
                "maxAttempts": 5,
                "minTimeoutMs": 100,
                "randomize": False,
                "nonRetryableErrors": ["PaymentError"],
            },
        },
    )
    name = stack.create_run(ns, "charge")
    status = stack.wait_run(ns, name)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "NonRetryableError"), status
    assert len(status["attempts"]) == 1 and status["attempts"][0]["exitCode"] == 1
    assert status["error"] == {"type": "Declined", "message": "card 4242 declined"}
    assert "'PaymentError'" in status["message"]
    assert status["attempts"][0]["error"] == {"type": "Declined", "message": "card 4242 declined"}
    # The API's run detail has the attempt's stack and the hierarchy that was matched.
    error = operator.get(f"/api/v1/runs/{status['runId']}")["attempts"][0]["error"]
    assert error["types"][:2] == ["kubetask_inline_task.Declined", "kubetask_inline_task.PaymentError"]
    assert "Traceback" in error["stack"] and "card 4242 declined" in error["stack"]


def test_catch_error_skip_fails_the_run_after_one_attempt(
    stack: Stack, ns: str, operator: Operator, tasks: Tasks
) -> None:
    hook = (
        "def decide(error, ctx):\n    return RetryDecision.skip() if isinstance(error, KeyError) else None\n"
    )
    tasks.apply_task(
        ns,
        "lookup",
        {
            "source": inline(
                "lookup", "def f(payload, ctx):\n    return payload['missing']", catch_error=hook
            ),
            "retry": {"maxAttempts": 5, "minTimeoutMs": 100, "randomize": False},
        },
    )
    name = stack.create_run(ns, "lookup")
    status = stack.wait_run(ns, name)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "RetrySkipped"), status
    assert len(status["attempts"]) == 1 and status["attempts"][0]["exitCode"] == 10
    assert status["error"]["type"] == "KeyError" and "missing" in status["error"]["message"]


def test_catch_error_retry_after_delays_the_next_attempt_past_the_backoff(
    stack: Stack, ns: str, operator: Operator, tasks: Tasks, e2e_database: str
) -> None:
    # The policy would retry after 0.2 s; the hook asks for 8 s on the first attempt.
    hook = (
        "def decide(error, ctx):\n"
        "    return RetryDecision.retry_after(8) if ctx.attempt.number == 1 else None\n"
    )
    body = (
        "def f(payload, ctx):\n"
        "    if ctx.attempt.number == 1:\n"
        "        raise RuntimeError('rate limited')\n"
        "    return ctx.attempt.number"
    )
    tasks.apply_task(
        ns,
        "polite",
        {
            "source": inline("polite", body, catch_error=hook),
            "retry": {"maxAttempts": 3, "minTimeoutMs": 200, "maxTimeoutMs": 200, "randomize": False},
        },
    )
    name = stack.create_run(ns, "polite")
    status = stack.wait_run(ns, name, timeout=120)["status"]
    assert status["phase"] == "Succeeded" and status["output"] == 2, status
    first, second = status["attempts"]
    reports = attempt_reports(e2e_database, status["runId"])
    assert reports[0] is not None and reports[0]["retryAt"] is not None, reports
    retry_at = ts(reports[0]["retryAt"])
    # The recorded times: the second attempt was granted no earlier than the time the hook
    # chose, which lies well past the end of the first plus the policy's 0.2 s.
    assert ts(second["createdAt"]) >= retry_at, (second, reports[0])
    assert (retry_at - ts(first["finishedAt"])).total_seconds() > 2, (first, reports[0])


def test_an_oom_killed_attempt_is_retried_with_the_out_of_memory_resources(
    stack: Stack, ns: str, operator: Operator, tasks: Tasks
) -> None:
    # 200 MiB of touched memory: killed under 64 MiB, fine under 512 MiB. The task reports
    # the memory limit it ran under (cgroup v1, else v2), so the output proves the resources.
    body = (
        "def f(payload, ctx):\n"
        "    blocks = [b'\\x01' * (1 << 20) for _ in range(payload['mib'])]\n"
        "    for path in ('/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/memory.max'):\n"
        "        try:\n"
        "            limit = open(path).read().strip()\n"
        "            break\n"
        "        except OSError:\n"
        "            limit = 'unknown'\n"
        "    return {'attempt': ctx.attempt.number, 'limit': limit, 'held': len(blocks)}"
    )
    tasks.apply_task(
        ns,
        "hungry",
        {
            "source": inline("hungry", body),
            "podTemplate": {"resources": {"limits": {"memory": "64Mi"}, "requests": {"memory": "64Mi"}}},
            "retry": {
                "maxAttempts": 3,
                "minTimeoutMs": 200,
                "randomize": False,
                "outOfMemory": {
                    "resources": {"limits": {"memory": "512Mi"}, "requests": {"memory": "256Mi"}}
                },
            },
        },
    )
    with PodWatcher(stack, ns) as watcher:
        name = stack.create_run(ns, "hungry", payload={"mib": 200})
        status = stack.wait_run(ns, name, timeout=180)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["output"] == {"attempt": 2, "limit": str(512 * 1024 * 1024), "held": 200}
    first, second = status["attempts"]
    assert (first["reason"], first["exitCode"]) == ("OOMKilled", 137), first
    assert second["exitCode"] == 0
    # One pod per attempt, seen by the watch: the OOM-killed one and the bigger one.
    pods = {n: uids for n, uids in watcher.uids_by_name.items() if n.startswith(name)}
    assert sorted(pods) == sorted([first["pod"], second["pod"]]) and all(len(u) == 1 for u in pods.values())
