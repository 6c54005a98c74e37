"""The Task and Queue catalogue: what each Task runs and which limits each queue has.

An index of the Task and Queue resources (keyed by namespace and name, carrying the
uid so a Task deleted and applied again is a different Task), the queue limits written
to PostgreSQL for admission, and the Task/Queue status the operator reports. The index
is a cache: a miss asks the API server, and the resync relists both kinds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubetask.admission import Admission, QueueLimits
from kubetask.kube import Kube
from kubetask.policy import TaskPolicy
from kubetask.settings import Settings
from kubetask.spec import QueueSpec, TaskSpec
from kubetask.store.runs import iso

log = logging.getLogger("kubetask.catalogue")


def queue_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def condition(ctype: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": iso(datetime.now(UTC)),
    }


@dataclass(frozen=True)
class TaskInfo:
    name: str
    namespace: str
    uid: str
    spec: TaskSpec
    generation: int | None = None

    @property
    def queue(self) -> str:
        return self.spec.queue_name(self.name)

    def owner(self) -> dict[str, Any]:
        return {"apiVersion": "kubetask.dev/v1alpha1", "kind": "Task", "name": self.name, "uid": self.uid}

    def version(self, default_image: str) -> dict[str, Any]:
        """What a run keeps of its Task when it is resolved (``runs.task_version``): the
        spec, the image its pods run (``spec.image``, else the operator's default at that
        moment, so a later change of the default does not change the run either), the
        uid and generation."""
        return {
            "uid": self.uid,
            "generation": self.generation,
            "image": self.spec.image or default_image,
            "spec": self.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        }


@dataclass(frozen=True)
class Pinned:
    """The Task version a run's attempts use."""

    spec: TaskSpec
    image: str


def pinned(version: dict[str, Any] | None, current: TaskSpec, default_image: str) -> Pinned:
    """The spec and image of a run's attempts: the Task version it resolved against
    (:meth:`TaskInfo.version`), else (runs resolved before versions were kept) the
    Task's current spec and the operator's default image. The image is the digest an
    earlier attempt of the run ran, once one is known (:func:`with_image_digest`), so a
    tag pushed again mid-run changes no later attempt."""
    if version is not None:
        try:
            image = version.get("imageDigest") or version["image"]
            return Pinned(TaskSpec.model_validate(version["spec"]), str(image))
        except (ValidationError, KeyError, TypeError, AttributeError):
            log.warning("a run's task_version does not parse; using the Task's current spec")
    return Pinned(current, current.image or default_image)


def image_digest(pod: dict[str, Any]) -> str | None:
    """The repository digest (``registry/repo@sha256:…``) of the image the pod's task
    container ran, as its kubelet reports it (``imageID``); None when the kubelet reports
    only a local image id (``sha256:…``: an image imported into the node, never pulled,
    which no other node could pull by that id) or nothing yet."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") != "task":
            continue
        image_id = str(cs.get("imageID") or "").removeprefix("docker-pullable://")
        repo, at, digest = image_id.partition("@")
        if repo and at and digest.startswith("sha256:") and len(digest) == len("sha256:") + 64:
            return image_id
    return None


def with_image_digest(version: dict[str, Any] | None, pod: dict[str, Any]) -> dict[str, Any] | None:
    """The run's Task version with the digest its first attempt's pod ran (the image a
    later attempt must run), or None when there is nothing to add: no version, a digest
    kept already, an image named by digest in the Task, or no repository digest known."""
    if not version or version.get("imageDigest") or "@" in str(version.get("image", "")):
        return None
    digest = image_digest(pod)
    return None if digest is None else {**version, "imageDigest": digest}


class Catalogue:
    def __init__(
        self,
        *,
        kube: Kube,
        admission: Admission,
        settings: Settings,
        queue_changed: Callable[[str], None],
    ) -> None:
        self.kube = kube
        self.admission = admission
        self.settings = settings
        #: Which images and tolerations Tasks may choose.
        self.policy = TaskPolicy(tuple(settings.allowed_images), tuple(settings.forbidden_tolerations))
        #: Called with a queue's key when its limits changed (admission may grant more).
        self._queue_changed = queue_changed
        self.tasks: dict[tuple[str, str], TaskInfo] = {}
        self.queues: dict[tuple[str, str], QueueSpec] = {}
        self._task_status: dict[tuple[str, str], dict[str, Any]] = {}
        self._task_generation: dict[tuple[str, str], Any] = {}
        self._limits: dict[str, QueueLimits] = {}

    # ---- tasks ---------------------------------------------------------------------------

    async def task(self, namespace: str, name: str) -> TaskInfo | None:
        info = self.tasks.get((namespace, name))
        if info is not None:
            return info
        body = await self.kube.get_object("tasks", namespace, name)
        return self.index_task(body) if body else None

    def index_task(self, body: dict[str, Any]) -> TaskInfo | None:
        meta = body["metadata"]
        try:
            spec = TaskSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            return None
        info = TaskInfo(meta["name"], meta["namespace"], meta["uid"], spec, meta.get("generation"))
        self.tasks[(info.namespace, info.name)] = info
        return info

    async def on_task_event(self, kind: str, body: dict[str, Any]) -> TaskInfo | None:
        """Index the Task and report its status. Returns it when its spec changed (or it
        appeared), so the caller can look at the runs that were waiting for it."""
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if kind == "DELETED":
            known = self.tasks.get((ns, name))
            if known is not None and known.uid == meta["uid"]:
                self.tasks.pop((ns, name), None)
                self._task_status.pop((ns, name), None)
                self._task_generation.pop((ns, name), None)
            return None
        known = self.tasks.get((ns, name))
        if (
            known is not None
            and known.uid == meta["uid"]
            and self._task_generation.get((ns, name)) == meta.get("generation")
        ):
            return None  # a status-only change (our own patch): nothing to do
        self._task_generation[(ns, name)] = meta.get("generation")
        try:
            TaskSpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            await self._patch_task_status(
                ns,
                name,
                {
                    "conditions": [condition("Ready", False, "InvalidSpec", str(e.errors()[0]["msg"]))],
                    "observedGeneration": meta.get("generation"),
                },
            )
            return None
        info = self.index_task(body)
        assert info is not None
        await self.configure_queue(ns, info.queue)
        await self.refresh_task_status(info, meta.get("generation"))
        return info

    async def refresh_task_status(self, info: TaskInfo, generation: int | None = None) -> None:
        """Write the Task's effective image, queue and limits (and a conflict, if any)."""
        conflict = self.queue_conflict(info)
        limits = await self.admission.limits(queue_key(info.namespace, info.queue))
        refusal = self.policy.check(info.spec)
        if refusal is not None:
            conds = [condition("Ready", False, refusal.reason, f"{refusal.message}: its runs fail")]
        else:
            conds = [condition("Ready", True, "Accepted", "the task is ready to run")]
        if conflict:
            conds.append(condition("QueueConflict", True, "QueueResourceWins", conflict))
        previous = self._task_status.get((info.namespace, info.name)) or {}
        await self._patch_task_status(
            info.namespace,
            info.name,
            {
                "image": info.spec.image or self.settings.runner_image,
                "queue": info.queue,
                "concurrencyLimit": limits.concurrency_limit if limits else None,
                "perKeyConcurrencyLimit": limits.per_key_limit if limits else None,
                "observedGeneration": generation
                if generation is not None
                else previous.get("observedGeneration"),
                "conditions": conds,
            },
        )

    async def _patch_task_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        """Patch only what changed; a condition keeps its lastTransitionTime while its
        status stays the same (so our own patches do not trigger endless events)."""
        previous = self._task_status.get((ns, name))
        old_conds = {c["type"]: c for c in (previous or {}).get("conditions", [])}
        for cond in status.get("conditions", []):
            old = old_conds.get(cond["type"])
            if old is not None and old["status"] == cond["status"]:
                cond["lastTransitionTime"] = old["lastTransitionTime"]
        if status == previous:
            return
        self._task_status[(ns, name)] = status
        await self.kube.patch_status("tasks", ns, name, status)

    # ---- queues --------------------------------------------------------------------------

    def queue_conflict(self, info: TaskInfo) -> str | None:
        qspec = self.queues.get((info.namespace, info.queue))
        inline = info.spec.queue
        if (
            qspec is None
            or inline is None
            or not (inline.concurrency_limit or inline.per_key_concurrency_limit)
        ):
            return None
        if (inline.concurrency_limit, inline.per_key_concurrency_limit) == (
            qspec.concurrency_limit,
            qspec.per_key_concurrency_limit,
        ):
            return None
        return (
            f"Queue {info.queue!r} sets concurrencyLimit={qspec.concurrency_limit}, "
            f"perKeyConcurrencyLimit={qspec.per_key_concurrency_limit}; the Task's inline queue limits "
            f"(concurrencyLimit={inline.concurrency_limit}, "
            f"perKeyConcurrencyLimit={inline.per_key_concurrency_limit}) are ignored"
        )

    def limits_for(self, ns: str, queue: str) -> QueueLimits:
        """A Queue resource wins over Tasks' inline settings (see :meth:`queue_conflict`);
        among Tasks, the last one seen with inline limits."""
        qspec = self.queues.get((ns, queue))
        inline = [
            i.spec.queue
            for i in self.tasks.values()
            if i.namespace == ns
            and i.queue == queue
            and i.spec.queue
            and (i.spec.queue.concurrency_limit or i.spec.queue.per_key_concurrency_limit)
        ]
        if qspec is not None:
            rate = qspec.rate_limit
            return QueueLimits(
                qspec.concurrency_limit,
                qspec.per_key_concurrency_limit,
                qspec.paused,
                "queue",
                rate.limit if rate else None,
                float(rate.period_seconds) if rate else None,
                bool(rate and rate.per_key),
            )
        if inline and inline[-1] is not None:
            return QueueLimits(
                inline[-1].concurrency_limit, inline[-1].per_key_concurrency_limit, False, "task"
            )
        return QueueLimits(source="default")

    async def configure_queue(self, ns: str, queue: str) -> None:
        limits = self.limits_for(ns, queue)
        key = queue_key(ns, queue)
        if self._limits.get(key) == limits:
            return  # known to be in the database already (no query)
        if await self.admission.limits(key) != limits:
            await self.admission.configure(key, limits)
            self._queue_changed(key)
        self._limits[key] = limits

    async def on_queue_event(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if kind == "DELETED":
            self.queues.pop((ns, name), None)
        else:
            try:
                spec = QueueSpec.model_validate(body.get("spec") or {})
            except ValidationError:
                return
            if self.queues.get((ns, name)) == spec:
                return  # a status-only change (our own patch)
            self.queues[(ns, name)] = spec
        await self.configure_queue(ns, name)
        for info in list(self.tasks.values()):
            if info.namespace == ns and info.queue == name:
                await self.refresh_task_status(info)

    async def relist(self, mine: Callable[[str], bool]) -> None:
        """Rebuild the index from the API server (start-up and resync), and configure
        every queue the index names."""
        seen_tasks: set[tuple[str, str]] = set()
        async for body in self.kube.iter_objects("tasks"):
            meta = body["metadata"]
            if mine(meta["namespace"]):
                known = self.tasks.get((meta["namespace"], meta["name"]))
                if known is None or known.uid != meta["uid"]:
                    await self.on_task_event("ADDED", body)
                seen_tasks.add((meta["namespace"], meta["name"]))
        for key in set(self.tasks) - seen_tasks:
            self.tasks.pop(key, None)
        seen_queues: set[tuple[str, str]] = set()
        async for body in self.kube.iter_objects("queues"):
            meta = body["metadata"]
            if not mine(meta["namespace"]):
                continue
            seen_queues.add((meta["namespace"], meta["name"]))
            try:
                self.queues[(meta["namespace"], meta["name"])] = QueueSpec.model_validate(
                    body.get("spec") or {}
                )
            except ValidationError:
                continue
        for key in set(self.queues) - seen_queues:
            self.queues.pop(key, None)
        for ns, q in {(i.namespace, i.queue) for i in self.tasks.values()} | set(self.queues):
            await self.configure_queue(ns, q)
