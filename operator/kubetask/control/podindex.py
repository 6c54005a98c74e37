"""The attempt pods the operator knows of, from its pod watch: (run id, attempt) -> pod.

Only a cache for speed. The reconcile never concludes "the pod is gone" from a miss
here alone: it asks the API server first (a watch may lag, a relist may be under way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kubetask import pods
from kubetask.engine.outcomes import IMAGE_PULL, UNSCHEDULABLE, pod_end, start_stage

AttemptKey = tuple[str, int]


def attempt_key(pod: dict[str, Any]) -> AttemptKey | None:
    labels = pod["metadata"].get("labels") or {}
    run_id = labels.get(pods.LABEL_RUN_ID)
    with contextlib.suppress(TypeError, ValueError):
        if run_id:
            return run_id, int(labels.get(pods.LABEL_ATTEMPT, ""))
    return None


class PodIndex:
    def __init__(
        self,
        *,
        mine: Callable[[str], bool],
        changed: Callable[[str], None],
        scopes: Sequence[str | None] = (None,),
    ) -> None:
        self._mine = mine
        #: Called with the run id of every pod that changed (or vanished).
        self._changed = changed
        self._pods: dict[AttemptKey, dict[str, Any]] = {}
        #: What the pod watch lists, one relist each: namespaces, or None (the cluster).
        self._scopes = set(scopes)
        self._listed: set[str | None] = set()

    @property
    def synced(self) -> bool:
        """Whether every scope was listed once: only then is a pod missing from here
        worth asking the API server about."""
        return self._listed >= self._scopes

    def get(self, run_id: str, attempt: int) -> dict[str, Any] | None:
        return self._pods.get((run_id, attempt))

    def of_run(self, run_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for (rid, attempt), pod in list(self._pods.items()):
            if rid == run_id:
                yield attempt, pod

    def put(self, pod: dict[str, Any]) -> None:
        """Remember a pod we created or read, unless the watch already delivered it: the
        watch's copy may be newer (the scheduler's verdict can arrive before the create's
        answer), and an older copy must never replace it."""
        key = attempt_key(pod)
        if key is not None:
            self._pods.setdefault(key, pod)

    def __len__(self) -> int:
        return len(self._pods)

    def items(self) -> list[tuple[AttemptKey, dict[str, Any]]]:
        return list(self._pods.items())

    async def on_event(self, kind: str, pod: dict[str, Any]) -> None:
        if not self._mine(pod["metadata"]["namespace"]):
            return
        key = attempt_key(pod)
        if key is None:
            return
        known = self._pods.get(key)
        ended_before = (
            known is not None
            and known["metadata"]["uid"] == pod["metadata"]["uid"]
            and pod_end(known) is not None
        )
        if kind == "DELETED":
            if known is None or known["metadata"]["uid"] == pod["metadata"]["uid"]:
                self._pods.pop(key, None)
        else:
            self._pods[key] = pod
        if ended_before:
            return  # its end was seen (and handed to a reconcile) already: nothing new
        if kind != "DELETED" and pod_end(pod) is None and pod["metadata"].get("deletionTimestamp") is None:
            # Starting or running: nothing for the reconcile to do now. A pod slow to start
            # is looked at when the run's timer fires (set at the grant to the earliest
            # start deadline), so pod events cost no queries until the end; except when
            # the pod turns out to be unschedulable or its image not to be had: a shorter
            # limit applies from now on, and the run's timer must move to it (the
            # verdict may come after the timer's first look, which saw only a slow start).
            stage = start_stage(pod)
            if stage not in (UNSCHEDULABLE, IMAGE_PULL) or (
                known is not None and start_stage(known) == stage
            ):
                return
        self._changed(key[0])

    async def on_relist(self, listed: list[dict[str, Any]], namespace: str | None = None) -> None:
        """A complete list of ``namespace`` (None: of the whole cluster): its pods
        missing from it are gone (their runs are looked at)."""
        fresh: dict[AttemptKey, dict[str, Any]] = {}
        for pod in listed:
            key = attempt_key(pod)
            if key is not None and self._mine(pod["metadata"]["namespace"]):
                fresh[key] = pod
        in_scope = {
            key
            for key, pod in self._pods.items()
            if namespace is None or pod["metadata"]["namespace"] == namespace
        }
        gone = in_scope - set(fresh)
        for key in gone:
            del self._pods[key]
        self._pods.update(fresh)
        self._listed.add(namespace)
        for run_id in {k[0] for k in gone} | {k[0] for k in fresh}:
            self._changed(run_id)
