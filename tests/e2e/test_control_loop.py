"""The control loop under the conditions that used to lose runs or run them twice.

Each test watches every pod event of its namespace (PodWatcher) and asserts on facts:
how many pods each attempt had, how many were alive at once, how every run ended, and
that nothing (slot, token Secret) is left behind."""

from __future__ import annotations

import threading
import time
import urllib.error
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.conftest import wait_for
from tests.e2e.harness import GROUP, TERMINAL, VERSION, Operator, PodWatcher, Stack, namespace

pytestmark = pytest.mark.e2e


def source(body: str, task_id: str) -> str:
    return f"from kubetask import task\nimport time\n\n@task(id={task_id!r})\n{body}\n"


HELLO = {"source": source("def f(payload, ctx):\n    return {'n': payload.get('n')}", "hello")}
SLEEPER = {
    "source": source("def f(payload, ctx):\n    time.sleep(payload.get('s', 1))\n    return 1", "sleeper")
}


def create_at_once(stack: Stack, ns: str, task: str, n: int, **spec: Any) -> list[str]:
    """``n`` Runs created by ``n`` threads released together."""
    names: list[str] = []
    gate = threading.Barrier(n)
    lock = threading.Lock()

    def one() -> None:
        gate.wait()
        name = stack.create_run(ns, task, **spec)
        with lock:
            names.append(name)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(names) == n
    return names


def statuses(stack: Stack, ns: str) -> dict[str, dict[str, Any]]:
    items = stack.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "runs")["items"]
    return {r["metadata"]["name"]: r.get("status") or {} for r in items}


def token_secrets(stack: Stack, ns: str) -> list[str]:
    return [
        s.metadata.name
        for s in stack.core.list_namespaced_secret(
            ns, label_selector="app.kubernetes.io/managed-by=kubetask"
        ).items
    ]


def assert_one_pod_per_attempt(watcher: PodWatcher) -> None:
    duplicated = {name: uids for name, uids in watcher.uids_by_name.items() if len(uids) > 1}
    assert not duplicated, f"attempts with more than one pod: {duplicated}"
    per_attempt: dict[tuple[str, str], set[str]] = {}
    for ev in watcher.events:
        key = (ev.labels.get("kubetask.dev/run-id", ""), ev.labels.get("kubetask.dev/attempt", ""))
        per_attempt.setdefault(key, set()).add(ev.uid)
    assert all(len(u) == 1 for u in per_attempt.values()), per_attempt


@pytest.mark.parametrize("task_first", [True, False], ids=["task-exists", "task-created-after"])
def test_runs_sharing_an_idempotency_key_created_at_once_execute_exactly_once(
    stack: Stack, ns: str, operator: Operator, task_first: bool
) -> None:
    if task_first:
        stack.apply_task(ns, "hello", HELLO)
    with PodWatcher(stack, ns) as watcher:
        names = create_at_once(stack, ns, "hello", 6, idempotencyKey="order-7", payload={"n": 7})
        if not task_first:
            time.sleep(1)
            stack.apply_task(ns, "hello", HELLO)
        done = stack.wait_all(ns, names, timeout=120)
        time.sleep(3)  # a late promotion would create a pod now: give it the chance
    phases = sorted(r["status"]["phase"] for r in done.values())
    assert phases == ["Deduplicated"] * 5 + ["Succeeded"], phases
    [original] = [r["status"] for r in done.values() if r["status"]["phase"] == "Succeeded"]
    for r in done.values():
        st = r["status"]
        if st["phase"] == "Deduplicated":
            assert st["originalRun"] == original["runId"] and st["attempts"] == []
    assert len(watcher.uids_by_name) == 1, f"pods: {sorted(watcher.uids_by_name)}"
    # Terminal means terminal: later resyncs (every 5 s here) changed no phase.
    assert {n: s["phase"] for n, s in statuses(stack, ns).items()} == {
        n: r["status"]["phase"] for n, r in done.items()
    }


def test_a_run_recreated_under_the_same_name_gets_its_own_pod(
    stack: Stack, ns: str, operator: Operator
) -> None:
    stack.apply_task(ns, "sleeper", SLEEPER)
    with PodWatcher(stack, ns) as watcher:
        stack.create_run(ns, "sleeper", name="same", payload={"s": 30})
        wait_for(lambda: bool(watcher.alive), 60, "the first Run's pod")
        old = stack.get_run(ns, "same")
        stack.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "runs", "same")
        # Created again while the old pod is still terminating.
        deadline = time.monotonic() + 30
        while True:
            try:
                stack.create_run(ns, "sleeper", name="same", payload={"s": 1})
                break
            except ApiException as e:
                assert e.status == 409 and time.monotonic() < deadline, e
                time.sleep(0.2)
        new = stack.wait_run(ns, "same", timeout=120)
        assert_one_pod_per_attempt(watcher)
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    assert new["status"]["phase"] == "Succeeded", new["status"]
    new_pod = new["status"]["attempts"][0]["pod"]
    owners = {ev.name: ev.labels.get("kubetask.dev/run-uid") for ev in watcher.events}
    assert owners[new_pod] == new["metadata"]["uid"]
    assert len(owners) == 2 and new_pod in owners, owners  # two pods, one per Run, none adopted


def test_the_same_task_in_two_namespaces_and_reapplied_runs_everywhere(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    with namespace(stack, "e2e-second") as ns2:
        start_operator(namespaces=[ns, ns2])
        for n in (ns, ns2):
            stack.apply_task(n, "hello", HELLO)
        first = [stack.create_run(n, "hello", payload={"n": 1}) for n in (ns, ns2)]
        for n, name in zip((ns, ns2), first, strict=True):
            assert stack.wait_run(n, name, timeout=90)["status"]["phase"] == "Succeeded"
        # Deleted and applied again (same name, same source, a new uid): its ConfigMap is
        # garbage-collected with the old Task; the new Task's runs get their own.
        stack.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "tasks", "hello")
        wait_for(
            lambda: not stack.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "tasks")["items"],
            30,
            "the Task to go",
        )
        stack.apply_task(ns, "hello", HELLO)
        again = stack.create_run(ns, "hello", payload={"n": 2})
        status = stack.wait_run(ns, again, timeout=90)["status"]
        assert status["phase"] == "Succeeded", status
        assert status["output"] == {"n": 2}


def test_exceeded_quota_is_retried_until_it_fits_and_is_not_counted(
    stack: Stack, ns: str, operator: Operator
) -> None:
    stack.apply_task(
        ns, "hello", {**HELLO, "retry": {"maxAttempts": 1, "minTimeoutMs": 500, "maxTimeoutMs": 2000}}
    )
    stack.core.create_namespaced_resource_quota(
        ns, {"metadata": {"name": "pods"}, "spec": {"hard": {"pods": "1"}}}
    )
    blocker = {
        "metadata": {"name": "blocker"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": stack.runner_image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", "600"],
                }
            ],
            "terminationGracePeriodSeconds": 0,
        },
    }
    wait_for(lambda: _quota_ready(stack, ns), 30, "the quota to be enforced")
    stack.core.create_namespaced_pod(ns, blocker)
    name = stack.create_run(ns, "hello", payload={"n": 3})
    wait_for(
        lambda: (stack.get_run(ns, name).get("status") or {}).get("infraFailures", 0) >= 2,
        60,
        "pod creation to be refused by the quota twice",
    )
    status = stack.get_run(ns, name)["status"]
    assert status["phase"] in ("Retrying", "Queued", "Running"), status
    assert status["attempts"][0]["reason"] == "QuotaExceeded", status["attempts"][0]
    stack.core.delete_namespaced_pod("blocker", ns, grace_period_seconds=0)
    status = stack.wait_run(ns, name, timeout=120)["status"]
    # maxAttempts is 1: the refusals did not use it up.
    assert status["phase"] == "Succeeded" and status["output"] == {"n": 3}, status
    assert status["infraFailures"] >= 2 and status["attempts"][-1]["reason"] == "Succeeded"


def _quota_ready(stack: Stack, ns: str) -> bool:
    q = stack.core.read_namespaced_resource_quota("pods", ns)
    return bool(q.status and q.status.hard)


def test_a_pod_spec_the_api_server_rejects_fails_at_once(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(
        ns,
        "bad",
        {**HELLO, "podTemplate": {"resources": {"limits": {"memory": "lots"}}}, "retry": {"maxAttempts": 3}},
    )
    status = stack.wait_run(ns, stack.create_run(ns, "bad"), timeout=60)["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "PodRejected"), status
    # One attempt, and the API server's own words say what to fix.
    assert len(status["attempts"]) == 1 and "quantities must match" in status["message"], status


def test_an_unschedulable_pod_ends_its_attempt_after_the_timeout_without_counting(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    start_operator(KUBETASK_UNSCHEDULABLE_TIMEOUT_SECONDS="2", KUBETASK_INFRA_RETRY_LIMIT="2")
    stack.apply_task(
        ns,
        "nowhere",
        {
            **HELLO,
            "podTemplate": {"nodeSelector": {"kubetask.dev/no-such-node": "true"}},
            "retry": {"maxAttempts": 1, "minTimeoutMs": 200, "maxTimeoutMs": 500, "randomize": False},
        },
    )
    with PodWatcher(stack, ns) as watcher:
        status = stack.wait_run(ns, stack.create_run(ns, "nowhere"), timeout=90)["status"]
        wait_for(lambda: not stack.pods(ns), 30, "the unschedulable pods to be deleted")
    assert (status["phase"], status["reason"]) == ("Failed", "InfrastructureFailures"), status
    # maxAttempts 1, yet three pods were tried: the infrastructure limit (2) ended it.
    assert [a["reason"] for a in status["attempts"]] == ["Unschedulable"] * 3
    assert status["infraFailures"] == 3
    assert len(watcher.uids_by_name) == 3
    assert_one_pod_per_attempt(watcher)


def test_a_finished_run_is_deleted_after_its_ttl_and_its_record_stays(
    stack: Stack, ns: str, operator: Operator
) -> None:
    stack.apply_task(ns, "hello", HELLO)
    name = stack.create_run(ns, "hello", payload={"n": 5}, ttlSecondsAfterFinished=2)
    status = stack.wait_run(ns, name, timeout=60)["status"]
    assert status["phase"] == "Succeeded"

    def gone() -> bool:
        try:
            stack.get_run(ns, name)
        except ApiException as e:
            return bool(e.status == 404)
        return False

    wait_for(gone, 30, "the Run resource to be deleted after its TTL")
    kept = operator.get(f"/api/v1/runs/{status['runId']}")
    assert kept["phase"] == "Succeeded" and kept["output"] == {"n": 5}
    assert token_secrets(stack, ns) == []


def test_two_operators_at_once_one_leads_and_every_run_ends_within_limits(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    stack.apply_task(ns, "sleeper", {**SLEEPER, "queue": {"concurrencyLimit": 3}})
    with PodWatcher(stack, ns) as watcher:
        a = start_operator("a")
        b = start_operator("b", wait_ready=False)
        names = create_at_once(stack, ns, "sleeper", 12, payload={"s": 2})
        wait_for(lambda: len(watcher.first_created()) >= 4, 90, "pods to start")
        leader, follower = (a, b) if a.leading() else (b, a)
        assert leader.leading() and not follower.leading()
        leader.kill()  # SIGKILL mid-burst: the follower takes over within the lease
        wait_for(follower.leading, 30, "the follower to take over")
        done = stack.wait_all(ns, names, timeout=240)
        wait_for(lambda: token_secrets(stack, ns) == [], 30, "token Secrets to be deleted")
    assert {r["status"]["phase"] for r in done.values()} == {"Succeeded"}
    assert watcher.max_alive.get("sleeper", 0) <= 3, watcher.max_alive
    assert_one_pod_per_attempt(watcher)
    for r in done.values():
        assert [x["reason"] for x in r["status"]["attempts"]][-1] == "Succeeded"


def test_terminal_runs_are_not_promoted_by_a_restart(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    stack.apply_task(ns, "hello", HELLO)
    op = start_operator()
    names = [stack.create_run(ns, "hello", idempotencyKey="k", payload={"n": i}) for i in range(3)]
    before = {n: r["status"] for n, r in stack.wait_all(ns, names, timeout=90).items()}
    op.stop()
    start_operator("again")
    time.sleep(3)
    after = statuses(stack, ns)
    assert {n: s["phase"] for n, s in after.items()} == {n: s["phase"] for n, s in before.items()}
    # Conditions keep their lastTransitionTime across the restart (kept in PostgreSQL).
    assert {n: s["conditions"] for n, s in after.items()} == {n: s["conditions"] for n, s in before.items()}
    assert sorted(s["phase"] for s in after.values()) == ["Deduplicated", "Deduplicated", "Succeeded"]
    assert all(s["phase"] in TERMINAL for s in after.values())


def test_a_task_that_ends_while_the_operator_is_down_for_long_is_not_run_again(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    """Runners keep trying to report for 10 minutes (docs/runner.md): an operator away
    for longer than the old 30 s budget must not make a finished task run again."""
    stack.apply_task(ns, "sleeper", SLEEPER)
    op = start_operator()
    with PodWatcher(stack, ns) as watcher:
        name = stack.create_run(ns, "sleeper", payload={"s": 2})
        wait_for(lambda: bool(watcher.alive), 60, "the pod to start")
        op.kill()
        time.sleep(40)  # the task ends and keeps trying to report while no operator runs
        start_operator("back")
        status = stack.wait_run(ns, name, timeout=120)["status"]
    assert status["phase"] == "Succeeded" and [a["reason"] for a in status["attempts"]] == ["Succeeded"]
    assert len(watcher.uids_by_name) == 1


def test_records_and_logs_go_after_their_retention(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    """Nothing grows without bound: a finished Run's resource goes after its TTL, then its
    record and its log lines after their retention (here about a second each)."""
    op = start_operator(KUBETASK_RECORD_RETENTION_DAYS="0.00001", KUBETASK_LOG_RETENTION_DAYS="0.00001")
    stack.apply_task(ns, "hello", HELLO)
    name = stack.create_run(ns, "hello", payload={"n": 9}, ttlSecondsAfterFinished=0)
    status = stack.wait_run(ns, name, timeout=60)["status"]
    assert status["phase"] == "Succeeded"

    def record_gone() -> bool:
        try:
            op.get(f"/api/v1/runs/{status['runId']}")
        except urllib.error.HTTPError as e:
            return e.code == 404
        return False

    wait_for(record_gone, 60, "the record to be deleted after its retention")
    assert token_secrets(stack, ns) == []
