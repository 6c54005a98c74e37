"""Attempts whose pod never gets going: an image that cannot be pulled, a pod stuck
terminating. Each ends after its timeout (set short for the test's operator) without
using up an attempt, and the run goes on or ends for a reason that says why.

Real faults only: an image on a registry that does not exist (the kubelet really tries to
pull it), a pod that a finalizer holds after its deletion (nothing can confirm it gone, as
when its node is lost). Every pod event is watched."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.conftest import wait_for
from tests.e2e.harness import Operator, PodWatcher, Stack
from tests.e2e.test_control_loop import assert_one_pod_per_attempt, source, token_secrets

pytestmark = pytest.mark.e2e

#: A registry that cannot exist (the .invalid top-level domain never resolves).
MISSING_IMAGE = "kubetask-e2e.invalid/kubetask/missing:1"
#: Holds a pod after its deletion, as a controller that never finishes would.
HOLD = "kubetask.dev/e2e-hold"


def echo(task_id: str) -> dict[str, str]:
    """A Task spec whose inline source returns ``{"n": payload["n"]}``."""
    return {"source": source("def f(payload, ctx):\n    return {'n': payload.get('n')}", task_id)}


FAST_RETRY = {"maxAttempts": 1, "minTimeoutMs": 200, "maxTimeoutMs": 500, "randomize": False}


def of_run(name: str) -> Callable[[dict[str, str]], bool]:
    return lambda labels: labels.get("kubetask.dev/run") == name


def when(raw: str) -> datetime:
    return datetime.fromisoformat(raw.replace("Z", "+00:00"))


def test_an_image_that_cannot_be_pulled_ends_each_attempt_after_the_timeout_without_counting(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    start_operator(
        KUBETASK_IMAGE_PULL_TIMEOUT_SECONDS="3",
        KUBETASK_IMAGE_PULL_POLICY="Always",
        KUBETASK_INFRA_RETRY_LIMIT="1",
    )
    stack.apply_task(ns, "unpullable", {**echo("unpullable"), "image": MISSING_IMAGE, "retry": FAST_RETRY})
    with PodWatcher(stack, ns) as watcher:
        name = stack.create_run(ns, "unpullable")
        status = stack.wait_run(ns, name, timeout=90)["status"]
        wait_for(lambda: not stack.pods(ns), 30, "the attempt pods to be deleted")
    assert (status["phase"], status["reason"]) == ("Failed", "InfrastructureFailures"), status
    # maxAttempts is 1, yet two pods were tried: the infrastructure limit (1) ended it.
    attempts = status["attempts"]
    assert len(attempts) == 2 and status["infraFailures"] == 2, status
    for a in attempts:
        assert a["reason"] in ("ErrImagePull", "ImagePullBackOff"), a
        # The kubelet's own words, and the limit that ended the attempt.
        assert "did not start within 3s" in a["error"]["message"], a
        assert "kubetask-e2e.invalid" in a["error"]["message"], a
    assert "2 attempts could not start (limit 1)" in status["message"], status
    assert len(watcher.uids_by_name) == 2, sorted(watcher.uids_by_name)
    assert_one_pod_per_attempt(watcher)
    # The next pod was created only once the previous one was gone.
    assert watcher.max_alive_where(of_run(name)) == 1, [
        (round(e.at, 3), e.type, e.name, e.phase) for e in watcher.events
    ]
    assert token_secrets(stack, ns) == []


@contextlib.contextmanager
def released_at_the_end(stack: Stack, ns: str) -> Iterator[list[str]]:
    """Names of pods the test holds with :data:`HOLD`; the hold is lifted at the end, so
    that the pods (and the namespace) can go."""
    held: list[str] = []
    try:
        yield held
    finally:
        for name in held:
            with contextlib.suppress(ApiException):
                stack.core.patch_namespaced_pod(name, ns, {"metadata": {"finalizers": None}})


@contextlib.contextmanager
def node_label_at_the_end(stack: Stack, label: str) -> Iterator[list[str]]:
    """Names of the nodes the test gave ``label``; it is removed from them at the end."""
    nodes: list[str] = []
    try:
        yield nodes
    finally:
        for node in nodes:
            with contextlib.suppress(ApiException):
                stack.core.patch_node(node, {"metadata": {"labels": {label: None}}})


def test_a_pod_stuck_terminating_ends_its_attempt_after_the_timeout_and_the_run_goes_on(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    start_operator(KUBETASK_TERMINATING_TIMEOUT_SECONDS="3")
    # Attempt 1 cannot be scheduled (no node has this test's label yet), so no kubelet
    # ever owns its pod: once deleted, no kubelet can confirm that it is gone (only the
    # pod GC controller may mark it Failed, see below).
    label = f"kubetask.dev/e2e-{ns}"
    stack.apply_task(
        ns,
        "held",
        {
            **echo("held"),
            "podTemplate": {"nodeSelector": {label: "true"}},
            "retry": FAST_RETRY,
        },
    )
    with (
        PodWatcher(stack, ns) as watcher,
        released_at_the_end(stack, ns) as held,
        node_label_at_the_end(stack, label) as nodes,
    ):
        name = stack.create_run(ns, "held", payload={"n": 4})
        wait_for(lambda: bool(stack.pods(ns)), 60, "the first attempt's pod")
        [first] = stack.pods(ns)
        stack.core.patch_namespaced_pod(first.metadata.name, ns, {"metadata": {"finalizers": [HOLD]}})
        held.append(first.metadata.name)
        stack.core.delete_namespaced_pod(first.metadata.name, ns)
        deleting = stack.core.read_namespaced_pod(first.metadata.name, ns).metadata.deletion_timestamp
        assert deleting is not None
        # The next attempt's pod comes once the stuck one's attempt has ended (after the
        # terminating timeout). It has the same nodeSelector (the run keeps the Task version
        # it started with), so the node gets the label only then: the scheduler has long
        # seen the first pod's deletion, and never schedules a pod being deleted. (Labelling
        # the node at once raced with that: the held pod could be bound, then killed by the
        # kubelet, and end as an ordinary failure.)
        wait_for(lambda: len(watcher.first_created()) >= 2, 60, "the next attempt's pod")
        for node in stack.core.list_node().items:
            stack.core.patch_node(node.metadata.name, {"metadata": {"labels": {label: "true"}}})
            nodes.append(node.metadata.name)

        status = stack.wait_run(ns, name, timeout=90)["status"]
        # The run did not wait for the stuck pod: it is still there, held.
        still = stack.core.read_namespaced_pod(first.metadata.name, ns)
        assert still.metadata.uid == first.metadata.uid and still.metadata.deletion_timestamp
        wait_for(lambda: token_secrets(stack, ns) == [], 30, "the token Secrets to be deleted")

    assert status["phase"] == "Succeeded" and status["output"] == {"n": 4}, status
    stuck, second = status["attempts"]
    assert stuck["pod"] == first.metadata.name, stuck
    if stuck["reason"] == "NodeLost":
        assert "node never confirmed" in stuck["error"]["message"], stuck
        # Not before the timeout: the deletion's deadline (grace 0 for a pod never
        # scheduled) plus the terminating timeout.
        assert when(stuck["finishedAt"]) >= deleting + timedelta(seconds=3), (stuck, deleting)
    else:
        # Kubernetes' pod GC controller marks an unscheduled pod being deleted Failed (it
        # looks every 20 s): Kubernetes confirmed the task never ran, before the operator's
        # timeout. The attempt then ends at once, uncounted, as a pod that failed before its
        # container started. (Which of the two comes first is the pod GC's timing.)
        assert stuck["reason"] == "NotStarted", stuck
        assert "before its task container started" in stuck["error"]["message"], stuck
        assert still.status.phase == "Failed", still.status
    print(f"\nthe stuck pod's attempt ended {stuck['reason']}")
    # The task never ran in the stuck pod: the attempt did not count.
    assert status["infraFailures"] == 1 and second["reason"] == "Succeeded", status
    assert_one_pod_per_attempt(watcher)
    assert len(watcher.uids_by_name) == 2
    created = watcher.first_created()
    assert created[second["pod"]] > created[first.metadata.name]


#: The taint of :func:`lost_node`: only pods that tolerate it may land there.
LOST = "kubetask.dev/e2e-lost-node"


@contextlib.contextmanager
def lost_node(stack: Stack, label: str) -> Iterator[str]:
    """A Node whose kubelet is gone: the Node object alone, as a kubelet registered it,
    with no kubelet behind it (it never posts status, so the node controller marks it
    unreachable). Labelled ``label`` and tainted :data:`LOST`, so that only this test's
    pods can land there. A pod bound to it never starts, and once deleted it stays,
    marked for deletion, until someone forces it: what a node that lost its power does to
    its pods. Deleted at the end (the pod GC controller then removes pods bound to it)."""
    name = f"kubetask-e2e-lost-{secrets.token_hex(3)}"
    capacity = {"cpu": "8", "memory": "16Gi", "pods": "110"}
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", label: "true"}
    stack.core.create_node(
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": [{"key": LOST, "effect": "NoSchedule"}]},
            "status": {"capacity": capacity, "allocatable": capacity},
        }
    )
    try:
        yield name
    finally:
        with contextlib.suppress(ApiException):
            stack.core.delete_node(name)


def test_a_pod_whose_node_is_lost_gives_its_queue_slot_back_after_the_terminating_timeout(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    """A canceled run's pod is on a node that is gone: its deletion is never confirmed.
    The slot it holds in a queue of one goes to the next run once the pod has been stuck
    for the terminating timeout past its deletion deadline (then forced), not for ever, and
    never while the pod is still there."""
    op = start_operator(KUBETASK_TERMINATING_TIMEOUT_SECONDS="3")
    label = f"kubetask.dev/e2e-{ns}"
    stack.apply_queue(ns, "one", {"concurrencyLimit": 1})
    stranded_spec = {
        **echo("stranded"),
        "queue": {"name": "one"},
        "podTemplate": {"nodeSelector": {label: "true"}, "tolerations": [{"operator": "Exists"}]},
    }
    stack.apply_task(ns, "stranded", stranded_spec)
    stack.apply_task(ns, "next", {**echo("next"), "queue": {"name": "one"}})
    with PodWatcher(stack, ns) as watcher, lost_node(stack, label) as node:
        stranded = stack.create_run(ns, "stranded")
        wait_for(
            lambda: [p.spec.node_name for p in stack.pods(ns)] == [node],
            60,
            "the pod to be bound to the lost node",
        )
        [pod] = stack.pods(ns)
        following = stack.create_run(ns, "next", payload={"n": 2})
        stack.wait_run(ns, following, {"Queued"}, timeout=30)
        stack.patch_run(ns, stranded, {"cancel": True})
        wait_for(
            lambda: (
                stack.core.read_namespaced_pod(pod.metadata.name, ns).metadata.deletion_timestamp is not None
            ),
            30,
            "the pod to be marked for deletion",
        )
        deadline = stack.core.read_namespaced_pod(pod.metadata.name, ns).metadata.deletion_timestamp
        done = stack.wait_run(ns, following, timeout=120)["status"]
        canceled = stack.wait_run(ns, stranded, timeout=30)["status"]

    assert canceled["phase"] == "Canceled", canceled
    assert done["phase"] == "Succeeded" and done["output"] == {"n": 2}, done
    assert op.own_log_has("node never confirmed"), op.log_tail()
    gone = [e.at for e in watcher.events if e.uid == pod.metadata.uid and e.type == "DELETED"]
    assert gone, "the stuck pod was never removed"
    # Forced only once the terminating timeout had passed since its deletion deadline.
    assert gone[0] >= (deadline + timedelta(seconds=3)).timestamp(), (gone[0], deadline)
    # The next run's pod came only after the stuck one was gone: the limit of 1 held.
    [following_pod] = [n for n, _ in watcher.first_created().items() if n != pod.metadata.name]
    assert watcher.first_created()[following_pod] >= gone[0]
    assert watcher.max_alive_where(lambda labels: labels.get("kubetask.dev/queue") == "one") == 1
    assert_one_pod_per_attempt(watcher)
    wait_for(lambda: token_secrets(stack, ns) == [], 30, "the token Secrets to be deleted")


def test_a_node_lost_under_a_running_task_ends_its_attempt_node_lost_counted_and_the_retry_runs_elsewhere(
    stack: Stack, ns: str, start_operator: Callable[..., Operator]
) -> None:
    """The node under a running task is lost. Kubernetes does what it does: the node
    controller marks the node unreachable (it never posts status again) and evicts its
    pods (here after the pod's 1 s toleration of that taint); nothing confirms the
    eviction, so the pod stays marked for deletion. Its attempt ends ``NodeLost`` the
    terminating timeout past the deletion deadline and counts (the task may have run),
    and the retry runs on a live node, the stuck pod gone first."""
    op = start_operator(KUBETASK_TERMINATING_TIMEOUT_SECONDS="3")
    label = f"kubetask.dev/e2e-{ns}"
    evict_after_1s = [
        {
            "key": f"node.kubernetes.io/{why}",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 1,
        }
        for why in ("unreachable", "not-ready")
    ]
    schedule_anyway = [
        {"key": key, "operator": "Exists", "effect": "NoSchedule"}
        for key in (LOST, "node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")
    ]
    stack.apply_task(
        ns,
        "stranded",
        {
            **echo("stranded"),
            "retry": {**FAST_RETRY, "maxAttempts": 2},
            "podTemplate": {"nodeSelector": {label: "true"}, "tolerations": schedule_anyway + evict_after_1s},
        },
    )
    with (
        PodWatcher(stack, ns) as watcher,
        lost_node(stack, label) as node,
        node_label_at_the_end(stack, label) as labelled,
    ):
        name = stack.create_run(ns, "stranded", payload={"n": 5})
        wait_for(
            lambda: [p.spec.node_name for p in stack.pods(ns)] == [node],
            60,
            "the pod to be bound to the lost node",
        )
        [pod] = stack.pods(ns)
        # What its kubelet posted before the node went: the task's container is running.
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        stack.core.patch_namespaced_pod_status(
            pod.metadata.name,
            ns,
            {
                "status": {
                    "phase": "Running",
                    "startTime": now,
                    "containerStatuses": [
                        {
                            "name": "task",
                            "image": pod.spec.containers[0].image,
                            "imageID": "",
                            "ready": True,
                            "started": True,
                            "restartCount": 0,
                            "state": {"running": {"startedAt": now}},
                        }
                    ],
                }
            },
        )
        # The retry may only land on a live node: the label moves there.
        stack.core.patch_node(node, {"metadata": {"labels": {label: None}}})
        for live in stack.core.list_node().items:
            if live.metadata.name != node:
                stack.core.patch_node(live.metadata.name, {"metadata": {"labels": {label: "true"}}})
                labelled.append(live.metadata.name)
        # The node controller marks the node unreachable once its grace period passes with
        # no status from it, and evicts the pod 1 s later (the taint's toleration).
        wait_for(
            lambda: (
                stack.core.read_namespaced_pod(pod.metadata.name, ns).metadata.deletion_timestamp is not None
            ),
            150,
            "Kubernetes to evict the pod from the lost node",
        )
        evicted = stack.core.read_namespaced_pod(pod.metadata.name, ns)
        status = stack.wait_run(ns, name, timeout=120)["status"]
        wait_for(lambda: token_secrets(stack, ns) == [], 30, "the token Secrets to be deleted")

    assert status["phase"] == "Succeeded" and status["output"] == {"n": 5}, status
    lost, retry = status["attempts"]
    assert lost["pod"] == pod.metadata.name and lost["reason"] == "NodeLost", lost
    assert "node never confirmed" in lost["error"]["message"], lost
    # The task may have run on the lost node: the attempt counted.
    assert status["infraFailures"] == 0, status
    assert retry["reason"] == "Succeeded", retry
    assert op.own_log_has("node never confirmed"), op.log_tail()
    # Evicted by Kubernetes (its taint eviction controller), not by kubetask; then forced
    # once the terminating timeout had passed since the deletion deadline.
    why = {c.type: c for c in evicted.status.conditions or []}.get("DisruptionTarget")
    assert why is not None and why.reason == "DeletionByTaintManager", evicted.status.conditions
    gone = [e.at for e in watcher.events if e.uid == pod.metadata.uid and e.type == "DELETED"]
    assert gone, "the lost pod was never removed"
    deadline = evicted.metadata.deletion_timestamp
    assert gone[0] >= (deadline + timedelta(seconds=3)).timestamp(), (gone[0], deadline)
    created = watcher.first_created()
    assert created[retry["pod"]] >= gone[0], "the retry's pod came before the lost one was gone"
    assert_one_pod_per_attempt(watcher)
    assert len(watcher.uids_by_name) == 2
