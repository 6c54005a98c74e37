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

from kubetask.apimodels import TERMINAL_PHASES
from kubetask.deploy import DeployError
from kubetask.deploy.discover import FoundTask
from kubetask.sdk.credentials import CredentialsError, KubeConfig, load_kubeconfig
from kubetask.spec import API_VERSION, GROUP, VERSION, TaskSpec

FIELD_MANAGER = "kubetask-deploy"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PACKAGE = "kubetask.dev/package"

Outcome = Literal["created", "configured", "unchanged"]


def package_label(package: str) -> str:
    """The value of the ``kubetask.dev/package`` label of a package's Tasks."""
    return package[:63].strip("-_.") or "app"


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
            "labels": {LABEL_MANAGED_BY: FIELD_MANAGER, LABEL_PACKAGE: package_label(package)},
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


@dataclass(frozen=True)
class Pruned:
    """A Task an earlier deploy of the package made that its code no longer has: deleted,
    or kept because runs of it are unfinished (deleting it would end them TaskNotFound)."""

    name: str
    deleted: bool
    unfinished: int = 0


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

    def _list(self, namespace: str, plural: str, selector: str | None = None) -> list[dict[str, Any]]:
        """Every ``plural`` object in the namespace, page by page."""
        items: list[dict[str, Any]] = []
        params: dict[str, str] = {"limit": "500"}
        if selector:
            params["labelSelector"] = selector
        while True:
            response = self._request(
                "GET",
                f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace, safe='')}/{plural}",
                params=params,
            )
            if not response.is_success:
                raise DeployError(f"cannot list {plural} in {namespace}: {self._error(response, '*')}")
            body = response.json()
            items.extend(body.get("items") or [])
            more = (body.get("metadata") or {}).get("continue")
            if not more:
                return items
            params["continue"] = more

    def prune(self, namespace: str, package: str, keep: set[str], *, dry_run: bool = False) -> list[Pruned]:
        """Delete the Tasks an earlier deploy of ``package`` made in ``namespace`` (its
        labels say so; Tasks written by hand are never touched) that are not in ``keep``,
        unless runs of them are unfinished: those are kept, and said so. With ``dry_run``
        nothing is deleted (``deleted`` says what would be)."""
        selector = f"{LABEL_MANAGED_BY}={FIELD_MANAGER},{LABEL_PACKAGE}={package_label(package)}"
        stale = sorted(
            str(t["metadata"]["name"])
            for t in self._list(namespace, "tasks", selector)
            if t["metadata"]["name"] not in keep
        )
        if not stale:
            return []
        unfinished: dict[str, int] = {}
        for run in self._list(namespace, "runs"):
            task = str((run.get("spec") or {}).get("task") or "")
            if task in stale and (run.get("status") or {}).get("phase") not in TERMINAL_PHASES:
                unfinished[task] = unfinished.get(task, 0) + 1
        done = []
        for name in stale:
            if unfinished.get(name):
                done.append(Pruned(name, deleted=False, unfinished=unfinished[name]))
                continue
            if not dry_run:
                response = self._request("DELETE", self._path(namespace, name))
                if not response.is_success and response.status_code != 404:
                    raise DeployError(f"cannot delete {self._error(response, name)}")
            done.append(Pruned(name, deleted=True))
        return done

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
