"""The core engine end to end: real cluster, real pods from the runner image, a real
operator process and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.e2e.conftest import wait_for
from tests.e2e.harness import REPO, Operator, PodWatcher, Stack

pytestmark = pytest.mark.e2e


def example_task(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / name / "task.yaml").read_text())
    return dict(doc["spec"])


def source(body: str, task_id: str) -> str:
    return f"from kubetask import task, AbortRun, logger\nimport time\n\n@task(id={task_id!r})\n{body}\n"


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_hello_succeeds_with_output_logs_and_history(
    stack: Stack, ns: str, operator: Operator, e2e_database: str
) -> None:
    stack.apply_task(ns, "hello", example_task("hello"))
    name = stack.create_run(ns, "hello", payload={"name": "e2e"}, tags=["smoke"])
    run = stack.wait_run(ns, name)
    status = run["status"]
    assert status["phase"] == "Succeeded", status
    assert status["output"] == {"message": "Hello, e2e!", "attempt": 1}
    assert status["attempt"] == 1 and len(status["attempts"]) == 1
    assert status["attempts"][0]["exitCode"] == 0
    assert {c["type"]: c["status"] for c in status["conditions"]}["Finished"] == "True"

    # PostgreSQL holds the same run, attempt, output and the log lines (logger + print).
    api = operator.get(f"/api/v1/runs/{status['runId']}")
    assert api["phase"] == "Succeeded" and api["output"] == status["output"]
    assert [a["number"] for a in api["attempts"]] == [1]
    assert api["attempts"][0]["podName"] == status["attempts"][0]["pod"]
    logs = operator.get(f"/api/v1/runs/{status['runId']}/logs")["items"]
    messages = "\n".join(line["message"] for line in logs)
    assert "greeting e2e on attempt 1" in messages
    assert f"hello from run {status['runId']}" in messages
    listed = operator.get("/api/v1/runs?task=hello&tag=smoke")["items"]
    assert status["runId"] in [r["id"] for r in listed]
    engine = create_engine(e2e_database, poolclass=NullPool)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT phase, attempt, output FROM runs WHERE id = :i"), {"i": status["runId"]}
        ).one()
    engine.dispose()
    assert tuple(row) == ("Succeeded", 1, status["output"])
    # The ended pod is cleaned up; its history is not.
    wait_for(lambda: not stack.pods(ns), 30, "the attempt pod to be deleted")


def test_flaky_retries_with_backoff_gaps_no_shorter_than_configured(
    stack: Stack, ns: str, operator: Operator
) -> None:
    stack.apply_task(ns, "flaky", example_task("flaky"))
    name = stack.create_run(ns, "flaky", payload={"failures": 2})
    status = stack.wait_run(ns, name, timeout=240)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["output"] == {"succeededOnAttempt": 3}
    attempts = status["attempts"]
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert [a["exitCode"] for a in attempts] == [1, 1, 0]
    # minTimeoutMs 2000, factor 2, no jitter: >= 2 s before attempt 2, >= 4 s before attempt 3.
    for prev, nxt, delay in [(attempts[0], attempts[1], 2.0), (attempts[1], attempts[2], 4.0)]:
        gap = (ts(nxt["createdAt"]) - ts(prev["finishedAt"])).total_seconds()
        assert gap >= delay, (
            f"attempt {nxt['number']} started {gap:.3f}s after the previous ended (< {delay}s)"
        )
    assert "failed on purpose" in attempts[0]["error"]["message"]


def test_retries_exhausted_fails_with_the_last_error(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(
        ns,
        "always-fails",
        {
            "source": source(
                "def f(payload, ctx):\n    raise ValueError(f'nope {ctx.attempt.number}')", "always-fails"
            ),
            "retry": {"maxAttempts": 2, "minTimeoutMs": 100, "randomize": False},
        },
    )
    name = stack.create_run(ns, "always-fails")
    status = stack.wait_run(ns, name)["status"]
    assert status["phase"] == "Failed"
    assert status["reason"] == "RetriesExhausted"
    assert status["error"]["type"] == "ValueError"
    assert "nope 2" in status["error"]["message"]
    assert len(status["attempts"]) == 2


def test_abort_run_fails_after_one_attempt(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(
        ns,
        "aborts",
        {
            "source": source("def f(payload, ctx):\n    raise AbortRun('bad input, do not retry')", "aborts"),
            "retry": {"maxAttempts": 5, "minTimeoutMs": 100},
        },
    )
    name = stack.create_run(ns, "aborts")
    status = stack.wait_run(ns, name)["status"]
    assert status["phase"] == "Failed"
    assert len(status["attempts"]) == 1
    assert status["attempts"][0]["exitCode"] == 10
    assert "bad input" in status["error"]["message"]


def test_max_duration_ends_timed_out(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(
        ns,
        "sleeper",
        {
            "source": source("def f(payload, ctx):\n    time.sleep(120)", "sleeper"),
            "maxDurationSeconds": 5,
            "retry": {"maxAttempts": 3},
        },
    )
    name = stack.create_run(ns, "sleeper")
    status = stack.wait_run(ns, name, timeout=120)["status"]
    assert status["phase"] == "TimedOut", status
    assert len(status["attempts"]) == 1
    assert status["error"]["type"] == "MaxDurationExceeded"


def test_cancel_deletes_the_pod_and_keeps_history(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(ns, "long", {"source": source("def f(payload, ctx):\n    time.sleep(300)", "long")})
    name = stack.create_run(ns, "long")
    run = stack.wait_run(ns, name, {"Running"})
    wait_for(lambda: any(p.status.phase == "Running" for p in stack.pods(ns)), 60, "the pod to run")
    stack.patch_run(ns, name, {"cancel": True})
    status = stack.wait_run(ns, name, timeout=60)["status"]
    assert status["phase"] == "Canceled"
    wait_for(lambda: not stack.pods(ns), 60, "the canceled run's pod to be gone")
    api = operator.get(f"/api/v1/runs/{run['status']['runId']}")
    assert api["phase"] == "Canceled" and len(api["attempts"]) == 1


def test_deleting_a_run_cancels_it_and_history_stays(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(ns, "long", {"source": source("def f(payload, ctx):\n    time.sleep(300)", "long")})
    name = stack.create_run(ns, "long")
    run_id = stack.wait_run(ns, name, {"Running"})["status"]["runId"]
    stack.custom.delete_namespaced_custom_object("kubetask.dev", "v1alpha1", ns, "runs", name)
    wait_for(
        lambda: operator.get(f"/api/v1/runs/{run_id}")["phase"] == "Canceled", 60, "the run to be canceled"
    )
    wait_for(lambda: not stack.pods(ns), 60, "the pod to be gone")


def test_unknown_task_fails_after_the_grace_period(stack: Stack, ns: str, operator: Operator) -> None:
    name = stack.create_run(ns, "no-such-task")
    status = stack.wait_run(ns, name, timeout=60)["status"]
    assert status["phase"] == "Failed"
    assert status["reason"] == "TaskNotFound"
    accepted = {c["type"]: c for c in status["conditions"]}["Accepted"]
    assert accepted["status"] == "False" and "no-such-task" in accepted["message"]


def test_run_starts_when_its_task_appears_within_the_grace_period(
    stack: Stack, ns: str, operator: Operator
) -> None:
    name = stack.create_run(ns, "hello", payload={"name": "late"})
    time.sleep(1.5)
    assert stack.get_run(ns, name).get("status", {}).get("phase") in (None, "Pending")
    stack.apply_task(ns, "hello", example_task("hello"))
    assert stack.wait_run(ns, name)["status"]["output"]["message"] == "Hello, late!"


def test_payload_over_the_limit_fails_with_a_condition(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(ns, "hello", example_task("hello"))
    name = stack.create_run(ns, "hello", payload={"blob": "x" * (300 * 1024)})
    status = stack.wait_run(ns, name)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "PayloadTooLarge"
    assert "262144" in status["message"]


def test_idempotency_key_does_not_execute_twice(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(ns, "hello", example_task("hello"))
    first = stack.create_run(ns, "hello", idempotencyKey="order-1")
    first_status = stack.wait_run(ns, first)["status"]
    second = stack.create_run(ns, "hello", idempotencyKey="order-1")
    status = stack.wait_run(ns, second)["status"]
    assert status["originalRun"] == first_status["runId"]
    # The documented rule (docs/concepts.md): a duplicate ends at once in its own terminal
    # phase, pointing at the original; it never executes, whatever the original's fate.
    assert status["phase"] == "Deduplicated" and status["attempt"] == 0 and status["attempts"] == []
    assert status["reason"] == "Deduplicated"


def test_operator_killed_mid_flight_every_run_finishes_and_no_attempt_has_two_pods(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    stack.apply_task(
        ns,
        "work",
        {
            "source": source(
                "def f(payload, ctx):\n    time.sleep(payload['s'])\n"
                "    if ctx.attempt.number == 1 and payload['fail']:\n        raise RuntimeError('first')\n"
                "    return payload['s']",
                "work",
            ),
            "retry": {"maxAttempts": 3, "minTimeoutMs": 1000, "randomize": False},
        },
    )
    with PodWatcher(stack, ns) as watcher:
        op = start_operator("first")
        names = [stack.create_run(ns, "work", payload={"s": 2 + i % 3, "fail": i % 2 == 0}) for i in range(8)]
        wait_for(lambda: len(watcher.first_created()) >= 4, 120, "pods to start")
        op.kill()
        time.sleep(3)  # pods end and new Runs arrive while no operator runs
        names += [stack.create_run(ns, "work", payload={"s": 1, "fail": False}) for _ in range(2)]
        op2 = start_operator("second")
        done = stack.wait_all(ns, names, timeout=300)
        op2.kill()
        op3 = start_operator("third")  # a second restart once everything is done changes nothing
        time.sleep(3)
        op3.stop()
    assert {r["status"]["phase"] for r in done.values()} == {"Succeeded"}
    for r in done.values():
        expected = 2 if r["spec"]["payload"]["fail"] else 1
        assert len(r["status"]["attempts"]) == expected, r["status"]
    duplicated = {name: uids for name, uids in watcher.uids_by_name.items() if len(uids) > 1}
    assert not duplicated, f"attempts with more than one pod: {duplicated}"


def test_database_matches_run_status(stack: Stack, ns: str, operator: Operator, e2e_database: str) -> None:
    stack.apply_task(
        ns,
        "flaky",
        {**example_task("flaky"), "retry": {"maxAttempts": 3, "minTimeoutMs": 200, "randomize": False}},
    )
    name = stack.create_run(ns, "flaky", payload={"failures": 1})
    status = stack.wait_run(ns, name)["status"]
    engine = create_engine(e2e_database, poolclass=NullPool)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT number, pod_name, exit_code, reason FROM attempts WHERE run_id = :i ORDER BY number"
            ),
            {"i": status["runId"]},
        ).all()
        logs = conn.execute(
            text("SELECT count(*) FROM logs WHERE run_id = :i"), {"i": status["runId"]}
        ).scalar()
    engine.dispose()
    assert [(r.number, r.pod_name, r.exit_code, r.reason) for r in rows] == [
        (a["number"], a["pod"], a["exitCode"], a["reason"]) for a in status["attempts"]
    ]
    assert logs and logs > 0


def test_examples_are_valid_manifests(stack: Stack, ns: str) -> None:
    for path in sorted(Path(REPO / "examples").glob("*/*.yaml")):
        out = stack.kubectl(ns, "create", "--dry-run=server", "-f", str(path))
        assert out.returncode == 0, f"{path}: {out.stderr}"
