"""The Kubernetes side of a run on its page: the Run resource as the API server has it,
the run's pods and the events of both, read **with the caller's own bearer token** (the
one they signed in with), so the API server's RBAC decides what they see, and the
operator needs no right to read events. A part the caller may not read is replaced by
the API server's refusal, never hidden silently."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from kubetask.pods import LABEL_RUN_ID
from kubetask.spec import GROUP, VERSION

#: Most events shown per object (the newest).
EVENTS = 20
#: Seconds a read of the API server may take before the page shows it as unavailable.
TIMEOUT = 5.0


@dataclass
class PodView:
    name: str
    phase: str
    node: str
    attempt: str
    state: str
    restarts: int
    created: str


@dataclass
class EventView:
    object: str
    type: str
    reason: str
    message: str
    count: int
    last: str


@dataclass
class KubeSide:
    #: The Run resource as YAML (managedFields left out); None if it could not be read.
    resource: str | None = None
    pods: list[PodView] = field(default_factory=list)
    events: list[EventView] = field(default_factory=list)
    #: What could not be read, and why (the API server's answer).
    problems: list[str] = field(default_factory=list)


def as_user(base: Any, token: str) -> Any:
    """A copy of the operator's client configuration (the API server's address and CA)
    that authenticates with ``token`` only (no client certificate, no token of its own)."""
    cfg = copy.copy(base)
    cfg.api_key = {"BearerToken": token}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    cfg.refresh_api_key_hook = None
    cfg.cert_file = None
    cfg.key_file = None
    cfg.username = None
    cfg.password = None
    return cfg


def _refusal(what: str, e: Exception) -> str:
    if isinstance(e, ApiException):
        if e.status == 403:
            return f"{what}: forbidden by RBAC for your user (HTTP 403)"
        if e.status == 404:
            return f"{what}: not found (deleted, or kept only in kubetask's records)"
        return f"{what}: the API server answered {e.status} {e.reason}"
    if isinstance(e, TimeoutError):
        return f"{what}: the API server did not answer in {TIMEOUT:.0f}s"
    return f"{what}: {e!r}"


def _age(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _container_state(pod: Any) -> tuple[str, int]:
    statuses = pod.status.container_statuses or []
    if not statuses:
        return (pod.status.reason or ""), 0
    s = statuses[0]
    restarts = sum(c.restart_count or 0 for c in statuses)
    if s.state.terminated is not None:
        t = s.state.terminated
        return f"terminated: {t.reason or ''} (exit {t.exit_code})", restarts
    if s.state.waiting is not None:
        return f"waiting: {s.state.waiting.reason or ''}", restarts
    if s.state.running is not None:
        return "running", restarts
    return "", restarts


async def kubernetes_side(base: Any, token: str, *, namespace: str, name: str, run_id: str) -> KubeSide:
    """The Run ``namespace/name`` (kubetask run ``run_id``), its pods and their events."""
    side = KubeSide()
    async with client.ApiClient(as_user(base, token)) as api:
        custom = client.CustomObjectsApi(api)
        core = client.CoreV1Api(api)
        uids: dict[str, str] = {}
        try:
            async with asyncio.timeout(TIMEOUT):
                run = await custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "runs", name)
            run.get("metadata", {}).pop("managedFields", None)
            side.resource = yaml.safe_dump(run, sort_keys=False)
            uids[run["metadata"]["uid"]] = f"Run/{name}"
        except Exception as e:  # shown on the page, as the API server put it
            side.problems.append(_refusal(f"the Run resource {namespace}/{name}", e))
        try:
            async with asyncio.timeout(TIMEOUT):
                listed = await core.list_namespaced_pod(namespace, label_selector=f"{LABEL_RUN_ID}={run_id}")
            for pod in sorted(listed.items, key=lambda p: p.metadata.creation_timestamp or datetime.min):
                state, restarts = _container_state(pod)
                side.pods.append(
                    PodView(
                        name=pod.metadata.name,
                        phase=pod.status.phase or "",
                        node=pod.spec.node_name or "",
                        attempt=(pod.metadata.labels or {}).get("kubetask.dev/attempt", ""),
                        state=state,
                        restarts=restarts,
                        created=_age(pod.metadata.creation_timestamp),
                    )
                )
                uids[pod.metadata.uid] = f"Pod/{pod.metadata.name}"
        except Exception as e:
            side.problems.append(_refusal(f"the pods of run {run_id}", e))
        if uids:
            try:
                async with asyncio.timeout(TIMEOUT):
                    found = await asyncio.gather(
                        *(
                            core.list_namespaced_event(namespace, field_selector=f"involvedObject.uid={uid}")
                            for uid in uids
                        )
                    )
                events = [ev for listed_events in found for ev in listed_events.items]
                events.sort(
                    key=lambda ev: _age(ev.last_timestamp or ev.event_time or ev.metadata.creation_timestamp)
                )
                for ev in events[-EVENTS * max(1, len(uids)) :]:
                    side.events.append(
                        EventView(
                            object=uids.get(ev.involved_object.uid, ev.involved_object.name or ""),
                            type=ev.type or "",
                            reason=ev.reason or "",
                            message=ev.message or "",
                            count=ev.count or 1,
                            last=_age(ev.last_timestamp or ev.event_time or ev.metadata.creation_timestamp),
                        )
                    )
            except Exception as e:
                side.problems.append(_refusal("the events", e))
    return side
