"""The Task resources of a deploy, and applying them (server-side apply, all or nothing).

Each Task's spec is the decorator's :class:`~kubetask.spec.TaskSpec` with ``image`` and
``entrypoint`` added, validated by that same model; the API server then validates it
against the CRD schema (and its CEL rules) in a server-side dry run of every Task before
any is applied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import ValidationError
from pydantic.alias_generators import to_snake

from kubetask.deploy import DeployError
from kubetask.deploy.discover import FoundTask
from kubetask.sdk.credentials import CredentialsError, KubeConfig, load_kubeconfig
from kubetask.spec import API_VERSION, GROUP, VERSION, TaskSpec

FIELD_MANAGER = "kubetask-deploy"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PACKAGE = "kubetask.dev/package"

Outcome = Literal["created", "configured", "unchanged"]


def task_manifest(found: FoundTask, *, image: str, namespace: str, package: str) -> dict[str, Any]:
    """The Task resource of one ``@task`` function."""
    data = {
        **found.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "image": image,
        "entrypoint": found.entrypoint,
    }
    try:
        spec = TaskSpec.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(to_snake(str(p)) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise DeployError(
            f"task {found.name} ({found.entrypoint}): the Task spec is invalid: {problems}"
        ) from None
    return {
        "apiVersion": API_VERSION,
        "kind": "Task",
        "metadata": {
            "name": found.name,
            "namespace": namespace,
            "labels": {LABEL_MANAGED_BY: FIELD_MANAGER, LABEL_PACKAGE: package[:63].strip("-_.") or "app"},
        },
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def kubeconfig() -> KubeConfig:
    try:
        kube = load_kubeconfig()
    except CredentialsError as e:
        raise DeployError(str(e)) from None
    if kube is None:
        raise DeployError(
            "no kubeconfig (KUBECONFIG or ~/.kube/config): on the local stack, `export KUBECONFIG=$(make -s kubeconfig)`"
        )
    return kube


def default_namespace(kube: KubeConfig | None) -> str:
    return os.environ.get("KUBETASK_NAMESPACE") or (kube.namespace if kube else None) or "default"


@dataclass(frozen=True)
class Applied:
    name: str
    outcome: Outcome


class Applier:
    """Server-side apply of Tasks with the kubeconfig's credentials."""

    def __init__(self, kube: KubeConfig) -> None:
        self.kube = kube
        try:
            headers = kube.auth_headers()
            verify = kube.ssl_context()
        except (CredentialsError, OSError) as e:
            raise DeployError(
                f"cannot use the kubeconfig {kube.path} (context {kube.context}): {e}"
            ) from None
        self.http = httpx.Client(base_url=kube.server, verify=verify, headers=headers, timeout=30)

    def close(self) -> None:
        self.http.close()

    def _path(self, namespace: str, name: str) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace, safe='')}/tasks/{quote(name, safe='')}"

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise DeployError(
                f"cannot reach the Kubernetes API server {self.kube.server}: {type(e).__name__}: {e}"
            ) from None

    def _error(self, response: httpx.Response, name: str) -> str:
        try:
            message = str(response.json().get("message") or response.text)
        except ValueError:
            message = response.text
        if response.status_code == 404 and "namespaces" in message:
            return f"Task {name}: {message} (create the namespace first)"
        if response.status_code == 404:
            return f"Task {name}: the Task resource kind is not installed in this cluster (install kubetask: make install, docs/install.md)"
        return f"Task {name}: {message} (HTTP {response.status_code})"

    def _apply(self, manifest: dict[str, Any], *, dry_run: bool) -> httpx.Response:
        meta = manifest["metadata"]
        params = {"fieldManager": FIELD_MANAGER, "force": "true"}
        if dry_run:
            params["dryRun"] = "All"
        return self._request(
            "PATCH",
            self._path(meta["namespace"], meta["name"]),
            params=params,
            json=manifest,
            headers={"Content-Type": "application/apply-patch+yaml"},
        )

    def check(self, manifests: list[dict[str, Any]]) -> None:
        """A server-side dry run of every manifest; :class:`DeployError` listing every refusal."""
        problems = []
        for manifest in manifests:
            response = self._apply(manifest, dry_run=True)
            if not response.is_success:
                problems.append(self._error(response, manifest["metadata"]["name"]))
        if problems:
            raise DeployError(
                "the cluster refuses the Tasks (nothing was applied):\n  " + "\n  ".join(problems)
            )

    def apply(self, manifests: list[dict[str, Any]]) -> list[Applied]:
        done = []
        for manifest in manifests:
            meta = manifest["metadata"]
            before = self._request("GET", self._path(meta["namespace"], meta["name"]))
            old = before.json()["metadata"]["resourceVersion"] if before.status_code == 200 else None
            response = self._apply(manifest, dry_run=False)
            if not response.is_success:
                raise DeployError(self._error(response, meta["name"]))
            new = response.json()["metadata"]["resourceVersion"]
            outcome: Outcome = "created" if old is None else "unchanged" if old == new else "configured"
            done.append(Applied(meta["name"], outcome))
        return done
