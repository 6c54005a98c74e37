"""Queues and concurrency limits on the real cluster: a watcher records every pod event
for the whole test, and no limit is ever exceeded."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from tests.e2e.conftest import wait_for
from tests.e2e.harness import Operator, PodWatcher, Stack

pytestmark = pytest.mark.e2e

SLEEPER = """from kubetask import task
import time

@task(id="{id}")
def work(payload, ctx):
    time.sleep(payload.get("s", 1))
    if ctx.attempt.number <= payload.get("fail", 0):
        raise RuntimeError("fails on purpose")
    return ctx.attempt.number
"""


def sleeper(task_id: str, **spec: object) -> dict[str, object]:
    return {
        "source": SLEEPER.format(id=task_id),
        "retry": {"maxAttempts": 3, "minTimeoutMs": 200, "randomize": False},
        **spec,
    }


def in_queue(queue: str) -> Callable[[dict[str, str]], bool]:
    return lambda labels: labels.get("kubetask.dev/queue") == queue


def started_order(watcher: PodWatcher) -> list[str]:
    created = watcher.first_created()
    return sorted(created, key=lambda name: created[name])


def test_thirty_runs_never_more_than_three_pods_alive(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(ns, "limited", sleeper("limited", queue={"concurrencyLimit": 3}))
    with PodWatcher(stack, ns) as watcher:
        names = [stack.create_run(ns, "limited", payload={"s": 1}) for _ in range(30)]
        wait_for(
            lambda: stack.get_run(ns, names[-1]).get("status", {}).get("phase") == "Queued",
            60,
            "the last run to be queued",
        )
        queued = stack.get_run(ns, names[-1])["status"]
        admitted = {c["type"]: c for c in queued["conditions"]}["Admitted"]
        assert admitted["status"] == "False" and admitted["reason"] == "QueueAtLimit", admitted
        done = stack.wait_all(ns, names, timeout=400)
    assert {r["status"]["phase"] for r in done.values()} == {"Succeeded"}
    assert watcher.max_alive_where(in_queue("limited")) == 3
    assert len(watcher.first_created()) == 30


def test_per_key_limit_holds_for_each_key(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(
        ns, "tenants", sleeper("tenants", queue={"concurrencyLimit": 10, "perKeyConcurrencyLimit": 2})
    )
    with PodWatcher(stack, ns) as watcher:
        keys = {
            stack.create_run(ns, "tenants", payload={"s": 1.5}, concurrencyKey=k): k
            for k in ["a"] * 6 + ["b"] * 6
        }
        done = stack.wait_all(ns, list(keys), timeout=300)
    assert {r["status"]["phase"] for r in done.values()} == {"Succeeded"}
    for key in ("a", "b"):
        runs = {n for n, k in keys.items() if k == key}
        assert watcher.max_alive_where(of_runs(runs)) == 2


def of_runs(runs: set[str]) -> Callable[[dict[str, str]], bool]:
    """Whether a pod's labels say it belongs to one of ``runs`` (Run names)."""
    return lambda labels: labels.get("kubetask.dev/run") in runs


def test_a_small_key_is_not_starved_by_a_big_one(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_queue(ns, "fair", {"concurrencyLimit": 1, "paused": True})
    stack.apply_task(ns, "fair-task", sleeper("fair-task", queue={"name": "fair"}))
    with PodWatcher(stack, ns) as watcher:
        a = [stack.create_run(ns, "fair-task", payload={"s": 0.2}, concurrencyKey="A") for _ in range(20)]
        b = [stack.create_run(ns, "fair-task", payload={"s": 0.2}, concurrencyKey="B") for _ in range(2)]
        wait_for(
            lambda: all(stack.get_run(ns, n).get("status", {}).get("phase") == "Queued" for n in a + b),
            60,
            "every run to be queued",
        )
        stack.apply_queue(ns, "fair", {"concurrencyLimit": 1, "paused": False})
        wait_for(
            lambda: all(stack.get_run(ns, n).get("status", {}).get("phase") == "Succeeded" for n in b),
            240,
            "B's runs to finish",
        )
        order = [name.rsplit("-", 1)[0] for name in started_order(watcher)]
    a_started = [n for n in order if n in a]
    assert len(a_started) < 5 or all(order.index(x) < order.index(a_started[4]) for x in b), order
    # Within key A: first come, first served.
    assert a_started == a[: len(a_started)]


def test_pause_holds_runs_and_resume_releases_them(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_queue(ns, "pausable", {"concurrencyLimit": 2, "paused": True})
    stack.apply_task(ns, "p-task", sleeper("p-task", queue={"name": "pausable"}))
    names = [stack.create_run(ns, "p-task", payload={"s": 0.5}) for _ in range(3)]
    wait_for(lambda: stack.get_run(ns, names[0]).get("status", {}).get("phase") == "Queued", 60, "queued")
    time.sleep(3)
    assert not stack.pods(ns)
    status = stack.get_run(ns, names[0])["status"]
    assert {c["type"]: c for c in status["conditions"]}["Admitted"]["reason"] == "QueuePaused"
    queue = stack.custom.get_namespaced_custom_object("kubetask.dev", "v1alpha1", ns, "queues", "pausable")
    assert queue["status"]["queued"] == 3 and queue["status"]["running"] == 0
    stack.apply_queue(ns, "pausable", {"concurrencyLimit": 2, "paused": False})
    done = stack.wait_all(ns, names, timeout=180)
    assert {r["status"]["phase"] for r in done.values()} == {"Succeeded"}


def test_a_run_in_backoff_frees_its_slot(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(
        ns,
        "one-slot",
        {
            **sleeper("one-slot", queue={"concurrencyLimit": 1}),
            "retry": {"maxAttempts": 2, "minTimeoutMs": 8000, "randomize": False},
        },
    )
    with PodWatcher(stack, ns) as watcher:
        x = stack.create_run(ns, "one-slot", payload={"s": 0.5, "fail": 1})
        stack.wait_run(ns, x, {"Running"})
        y = stack.create_run(ns, "one-slot", payload={"s": 0.5})
        stack.wait_run(ns, x, {"Retrying"})
        y_status = stack.wait_run(ns, y, timeout=120)["status"]
        x_status = stack.wait_run(ns, x, timeout=120)["status"]
    assert y_status["phase"] == x_status["phase"] == "Succeeded"
    created = watcher.first_created()
    # Y ran while X waited out its 8 s back-off, not after X's second attempt.
    assert created[y_status["attempts"][0]["pod"]] < created[x_status["attempts"][1]["pod"]]
    assert watcher.max_alive_where(in_queue("one-slot")) == 1


def test_raising_a_limit_takes_effect_at_once(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_queue(ns, "elastic", {"concurrencyLimit": 1})
    stack.apply_task(ns, "e-task", sleeper("e-task", queue={"name": "elastic"}))
    with PodWatcher(stack, ns) as watcher:
        names = [stack.create_run(ns, "e-task", payload={"s": 6}) for _ in range(4)]
        wait_for(lambda: len(watcher.alive) == 1, 60, "one pod")
        stack.apply_queue(ns, "elastic", {"concurrencyLimit": 3})
        wait_for(lambda: len(watcher.alive) == 3, 30, "three pods after raising the limit")
        stack.apply_queue(ns, "elastic", {"concurrencyLimit": 1})  # lowering kills nothing
        time.sleep(1)
        assert len(watcher.alive) == 3
        stack.wait_all(ns, names, timeout=180)
    assert watcher.max_alive_where(in_queue("elastic")) == 3


def test_queue_resource_wins_over_inline_limits_and_reports_it(
    stack: Stack, ns: str, operator: Operator
) -> None:
    stack.apply_queue(ns, "shared", {"concurrencyLimit": 2})
    stack.apply_task(ns, "inline", sleeper("inline", queue={"name": "shared", "concurrencyLimit": 7}))

    def conflict() -> bool:
        task = stack.custom.get_namespaced_custom_object("kubetask.dev", "v1alpha1", ns, "tasks", "inline")
        conds = {c["type"]: c for c in (task.get("status") or {}).get("conditions", [])}
        return "QueueConflict" in conds and task["status"].get("concurrencyLimit") == 2

    wait_for(conflict, 30, "the Task to report the conflict and the Queue's limit")


def test_operator_killed_during_a_burst_never_exceeds_the_limit(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    stack.apply_task(ns, "burst", sleeper("burst", queue={"concurrencyLimit": 3}))
    with PodWatcher(stack, ns) as watcher:
        op = start_operator("burst-0")
        names = [stack.create_run(ns, "burst", payload={"s": 1}) for _ in range(24)]
        for i in range(3):
            time.sleep(random.uniform(2, 5))
            op.kill()
            time.sleep(random.uniform(0.5, 2))
            op = start_operator(f"burst-{i + 1}")
        done = stack.wait_all(ns, names, timeout=400)
        op.stop()
    assert {r["status"]["phase"] for r in done.values()} == {"Succeeded"}
    assert watcher.max_alive_where(in_queue("burst")) <= 3
    assert not {n: u for n, u in watcher.uids_by_name.items() if len(u) > 1}
