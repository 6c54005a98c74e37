"""Which pod events the pod index hands to the reconcile: the end of a pod, its
deletion, and the moment a shorter start limit starts to apply; not a pod starting. And
relists: one namespace's leaves the others' pods alone, and the index is synced once
every namespace was listed."""

from __future__ import annotations

import asyncio
from typing import Any

from kubetask import pods
from kubetask.control.podindex import PodIndex


def pod(
    *, waiting: str | None = None, running: bool = False, phase: str = "Pending", **meta: Any
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if waiting:
        state = {"waiting": {"reason": waiting}}
    if running:
        state = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    return {
        "metadata": {
            "name": "r-1",
            "namespace": "ns",
            "uid": "u1",
            "labels": {pods.LABEL_RUN_ID: "run_1", pods.LABEL_ATTEMPT: "1"},
            **meta,
        },
        "status": {"phase": phase, "containerStatuses": [{"name": "task", "state": state}]},
    }


def handed(*events: tuple[str, dict[str, Any]]) -> list[int]:
    """For each event in turn, whether the index handed the run to the reconcile (1/0)."""
    changed: list[str] = []
    index = PodIndex(mine=lambda ns: True, changed=changed.append)
    out = []
    for kind, body in events:
        before = len(changed)
        asyncio.run(index.on_event(kind, body))
        out.append(len(changed) - before)
    return out


def test_a_starting_and_running_pod_costs_no_reconcile() -> None:
    assert handed(
        ("ADDED", pod()),
        ("MODIFIED", pod(waiting="ContainerCreating")),
        ("MODIFIED", pod(running=True, phase="Running")),
    ) == [0, 0, 0]


def test_an_image_pull_error_is_handed_over_once() -> None:
    # The run's timer looked at the pod while it was still creating its container and
    # aimed at the (long) start limit: the pull error must move it to the pull limit.
    assert handed(
        ("ADDED", pod(waiting="ContainerCreating")),
        ("MODIFIED", pod(waiting="ErrImagePull")),
        ("MODIFIED", pod(waiting="ImagePullBackOff")),
        ("MODIFIED", pod(waiting="ErrImagePull")),
    ) == [0, 1, 0, 0]


def test_an_unschedulable_verdict_is_handed_over() -> None:
    unscheduled = pod()
    unscheduled["status"]["conditions"] = [{"type": "PodScheduled", "status": "False"}]
    assert handed(("ADDED", pod()), ("MODIFIED", unscheduled), ("MODIFIED", unscheduled)) == [0, 1, 0]


def test_an_end_or_a_deletion_is_handed_over() -> None:
    assert handed(
        ("ADDED", pod(running=True, phase="Running")),
        ("MODIFIED", pod(running=True, phase="Running", deletionTimestamp="2026-01-01T00:00:00Z")),
        ("DELETED", pod(running=True, phase="Running", deletionTimestamp="2026-01-01T00:00:00Z")),
    ) == [0, 1, 1]


def pod_in(ns: str, run_id: str, attempt: int = 1) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"{run_id}-{attempt}",
            "namespace": ns,
            "uid": f"uid-{run_id}-{attempt}",
            "labels": {pods.LABEL_RUN_ID: run_id, pods.LABEL_ATTEMPT: str(attempt)},
        },
        "status": {"phase": "Running"},
    }


async def test_a_relist_of_one_namespace_forgets_only_that_namespaces_missing_pods() -> None:
    changed: list[str] = []
    index = PodIndex(mine=lambda ns: ns in ("a", "b"), changed=changed.append, scopes=["a", "b"])
    await index.on_relist([pod_in("a", "r1"), pod_in("a", "r2")], "a")
    assert not index.synced
    await index.on_relist([pod_in("b", "r3")], "b")
    assert index.synced
    changed.clear()
    await index.on_relist([pod_in("a", "r1")], "a")  # r2's pod went while the watch was down
    assert index.get("r2", 1) is None
    assert index.get("r1", 1) is not None and index.get("r3", 1) is not None
    assert sorted(changed) == ["r1", "r2"]


async def test_a_cluster_wide_relist_replaces_everything_and_ignores_other_namespaces() -> None:
    index = PodIndex(mine=lambda ns: ns == "a", changed=lambda _: None)
    await index.on_relist([pod_in("a", "r1"), pod_in("z", "r9")], None)
    assert index.synced
    assert index.get("r1", 1) is not None and index.get("r9", 1) is None
    await index.on_relist([], None)
    assert len(index) == 0
