"""Builds the pod, token Secret and source ConfigMap for one attempt. Pure functions."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from kubetask.spec import API_VERSION, TaskSpec

LABEL_RUN = "kubetask.dev/run"
LABEL_RUN_ID = "kubetask.dev/run-id"
#: The Run resource's uid: a pod or Secret of a deleted Run of the same name is never adopted.
LABEL_RUN_UID = "kubetask.dev/run-uid"
LABEL_TASK = "kubetask.dev/task"
LABEL_QUEUE = "kubetask.dev/queue"
LABEL_ATTEMPT = "kubetask.dev/attempt"
#: A child run's label: the id of the run that triggered it (ctx.trigger).
LABEL_PARENT_RUN = "kubetask.dev/parent-run"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetask"
#: On a pod whose resources come from the Task's retry.outOfMemory (an earlier attempt
#: was OOM-killed).
ANNOTATION_RESOURCES = "kubetask.dev/resources"
#: The server-side label selector the operator's pod watch (and Secret sweep) uses.
POD_SELECTOR = f"{LABEL_MANAGED}={MANAGED_BY},{LABEL_RUN_ID}"

TOKEN_DIR = "/var/run/kubetask/token"
SOURCE_DIR = "/var/run/kubetask/source"
RUNNER_UID = 65532


def _short(value: str, limit: int) -> str:
    """Keep names within Kubernetes limits while staying unique (hash suffix)."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{value[: limit - 9].rstrip('-.')}-{digest}"


def uid_part(run_uid: str) -> str:
    """Five characters of the Run's uid: a Run deleted and created again under the same
    name gets pods and Secrets of other names, so a 409 never means "the old one"."""
    return run_uid.replace("-", "")[:5].lower()


def pod_name(run_name: str, run_uid: str, attempt: int) -> str:
    """Deterministic: the same Run (uid) and attempt always give the same name, so a
    repeated create (after a crash, or from a second replica) is answered 409 and does
    no harm; the 409 is then checked against the run-uid label."""
    suffix = f"-{uid_part(run_uid)}-{attempt}"
    return f"{_short(run_name, 63 - len(suffix))}{suffix}"


def token_secret_name(run_name: str, run_uid: str, attempt: int) -> str:
    return _short(f"{pod_name(run_name, run_uid, attempt)}-token", 253)


def source_configmap_name(task_name: str, task_uid: str, source: str) -> str:
    """Tied to the Task's uid and its source: a Task deleted and applied again, or the
    same Task in another namespace, gets its own ConfigMap (each owned by its Task)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:10]
    return _short(f"kubetask-src-{task_name}-{uid_part(task_uid)}-{digest}", 253)


def label_value(value: str) -> str:
    return _short(value, 63)


def owner_ref(run: dict[str, Any]) -> dict[str, Any]:
    meta = run["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": "Run",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": False,
    }


def source_configmap(
    *, task_name: str, namespace: str, source: str, task_owner: dict[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": source_configmap_name(task_name, task_owner["uid"], source),
            "namespace": namespace,
            "labels": {LABEL_MANAGED: MANAGED_BY, LABEL_TASK: label_value(task_name)},
            "ownerReferences": [task_owner],
        },
        "data": {"task.py": source},
    }


def runner_service_account(*, name: str, namespace: str) -> dict[str, Any]:
    """The ServiceAccount of attempt pods: no token mounted, and no rights unless someone
    binds it to a role (the operator binds nothing)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_MANAGED: MANAGED_BY}},
        "automountServiceAccountToken": False,
    }


#: The name of the NetworkPolicy of attempt pods in each namespace (KUBETASK_RUNNER_NETWORK_POLICY).
RUNNER_NETWORK_POLICY = "kubetask-runner"


def runner_network_policy(*, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The NetworkPolicy of attempt pods in ``namespace``: ``spec`` as the operator's
    settings give it (the chart renders it: DNS and the operator's runner port only)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": RUNNER_NETWORK_POLICY,
            "namespace": namespace,
            "labels": {LABEL_MANAGED: MANAGED_BY},
        },
        "spec": spec,
    }


def token_secret(*, run: dict[str, Any], run_id: str, attempt: int, token: str) -> dict[str, Any]:
    meta = run["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": token_secret_name(meta["name"], meta["uid"], attempt),
            "namespace": meta["namespace"],
            "labels": {
                LABEL_MANAGED: MANAGED_BY,
                LABEL_RUN: label_value(meta["name"]),
                LABEL_RUN_UID: meta["uid"],
                LABEL_RUN_ID: run_id,
                LABEL_ATTEMPT: str(attempt),
            },
            "ownerReferences": [owner_ref(run)],
        },
        "stringData": {"token": token},
    }


def attempt_resources(
    task: TaskSpec, *, after_oom: bool, default: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The task container's resources: ``podTemplate.resources`` (else the operator's
    ``default``: a Task's replace them as a whole, so no default request ends above the
    Task's limit), and once an attempt of the run was OOM-killed (``after_oom``),
    ``retry.outOfMemory.resources`` merged over them key by key inside ``limits`` and
    ``requests`` (a CPU limit of the template stays when only the memory is raised)."""
    tpl = task.pod_template
    own = tpl.resources if tpl is not None and tpl.resources else default
    base: dict[str, Any] = copy.deepcopy(own) if own else {}
    oom = task.retry.out_of_memory
    if not after_oom or oom is None:
        return base or None
    for key, value in oom.resources.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **copy.deepcopy(value)}
        else:
            base[key] = copy.deepcopy(value)
    return base or None


def attempt_pod(
    *,
    run: dict[str, Any],
    run_id: str,
    task_name: str,
    task_uid: str,
    task: TaskSpec,
    queue: str,
    attempt: int,
    max_attempts: int,
    api_url: str,
    default_image: str,
    image_pull_policy: str,
    image: str | None = None,
    after_oom: bool = False,
    service_account: str = "",
    default_resources: dict[str, Any] | None = None,
    tmp_size_limit: str | None = None,
    read_only_root_filesystem: bool = False,
) -> dict[str, Any]:
    """The pod of one attempt. It passes the Pod Security "restricted" profile whatever
    the Task sets (a Task chooses its image, env, resources, node selector and
    tolerations, nothing of the pod's security). Resources: :func:`attempt_resources`
    (``after_oom``: an earlier attempt of the run was OOM-killed, so the Task's
    ``retry.outOfMemory`` resources apply; ``default_resources`` when the Task sets no
    ``podTemplate.resources``). ``image``, when given, is what the pod runs whatever the
    Task names (the digest the run's first attempt ran: control.catalogue.pinned)."""
    meta = run["metadata"]
    name = pod_name(meta["name"], meta["uid"], attempt)
    env: list[dict[str, Any]] = [
        {"name": "KUBETASK_API_URL", "value": api_url},
        {"name": "KUBETASK_RUN_ID", "value": run_id},
        {"name": "KUBETASK_RUN_NAME", "value": meta["name"]},
        {"name": "KUBETASK_TASK_ID", "value": task_name},
        {"name": "KUBETASK_ATTEMPT", "value": str(attempt)},
        {"name": "KUBETASK_MAX_ATTEMPTS", "value": str(max_attempts)},
        {"name": "KUBETASK_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    volumes: list[dict[str, Any]] = [
        {
            "name": "token",
            "secret": {
                "secretName": token_secret_name(meta["name"], meta["uid"], attempt),
                "defaultMode": 0o440,
            },
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": tmp_size_limit} if tmp_size_limit else {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if task.source is not None:
        env.append({"name": "KUBETASK_SOURCE_FILE", "value": f"{SOURCE_DIR}/task.py"})
        volumes.append(
            {"name": "source", "configMap": {"name": source_configmap_name(task_name, task_uid, task.source)}}
        )
        mounts.append({"name": "source", "mountPath": SOURCE_DIR, "readOnly": True})
    else:
        env.append({"name": "KUBETASK_ENTRYPOINT", "value": task.entrypoint or ""})
    tpl = task.pod_template
    if tpl is not None and tpl.env:
        env.extend(tpl.env)
    container: dict[str, Any] = {
        "name": "task",
        "image": image or task.image or default_image,
        "imagePullPolicy": image_pull_policy,
        "env": env,
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": read_only_root_filesystem,
            "capabilities": {"drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = attempt_resources(task, after_oom=after_oom, default=default_resources)
    if resources is not None:
        container["resources"] = resources
    if tpl is not None and tpl.env_from:
        container["envFrom"] = tpl.env_from
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 10,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,
            "runAsGroup": RUNNER_UID,
            "fsGroup": RUNNER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    if task.max_duration_seconds is not None:
        spec["activeDeadlineSeconds"] = task.max_duration_seconds
    if tpl is not None and tpl.node_selector:
        spec["nodeSelector"] = tpl.node_selector
    if tpl is not None and tpl.tolerations:
        spec["tolerations"] = tpl.tolerations
    pod_meta: dict[str, Any] = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": {
            LABEL_MANAGED: MANAGED_BY,
            LABEL_RUN: label_value(meta["name"]),
            LABEL_RUN_ID: run_id,
            LABEL_RUN_UID: meta["uid"],
            LABEL_TASK: label_value(task_name),
            LABEL_QUEUE: label_value(queue),
            LABEL_ATTEMPT: str(attempt),
        },
        "ownerReferences": [owner_ref(run)],
    }
    if after_oom and task.retry.out_of_memory is not None:
        pod_meta["annotations"] = {ANNOTATION_RESOURCES: "retry.outOfMemory"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec}
