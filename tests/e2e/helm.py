"""Releases of the chart helm/kubetask for the Helm tier (test_helm_*.py): the operator as
users run it, from the locally built images, with the chart's ServiceAccount, RBAC,
probes and Services.

The main release (kubetask in kubetask-system, cluster-wide) is paused by the ``stack``
fixture and left alone: each module installs a release of its own, ``<prefix>-<random>``
in the namespace of the same name, watching only its own namespaces of work (so it never
acts on another test's Runs), against this session's database as the pods reach it (on
the pod bridge)."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.e2e.conftest import wait_for
from tests.e2e.harness import REPO, PodWatcher, Stack, hack
from tests.helmchart import CHART, helm_binary, values_file

OPERATOR_COMPONENT = "app.kubernetes.io/component=operator"
#: The concurrency limit of :func:`sleeper` Tasks.
LIMIT = 3
#: Short lease timings for test releases (seconds): a dead leader is replaced in 4 to 4.5 s.
LEASE = {"leaseDurationSeconds": 4, "renewDeadlineSeconds": 3, "retryPeriodSeconds": 0.5}
#: Labels of a namespace that enforces the Pod Security "restricted" profile.
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/warn": "restricted",
}

SLEEPER = """from kubetask import task
import time

@task(id="{id}")
def work(payload, ctx):
    time.sleep(payload.get("s", 1))
    return ctx.attempt.number
"""


def operator_image() -> tuple[str, str]:
    """The operator image hack/images.sh built (KUBETASK_IMAGE_TAG), as (repository, tag)."""
    repository, tag = hack("print.sh", "operator-image").rsplit(":", 1)
    return repository, tag


@contextlib.contextmanager
def operator_image_alias(suffix: str) -> Iterator[str | None]:
    """The operator image under the tag ``<tag>-<suffix>`` in the local stack's containerd
    (the same content under a new reference: to the chart, a new image, as an upgrade
    brings); yields that tag, or None on another cluster (KUBECONFIG set). The alias is
    removed at the end."""
    if os.environ.get("KUBECONFIG"):
        yield None
        return
    repository, tag = operator_image()
    alias = f"{tag}-{suffix}"
    script = 'source hack/lib.sh && ctr --address "$CONTAINERD_SOCK" -n k8s.io images "$@"'

    def ctr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script, "ctr", *args], cwd=REPO, capture_output=True, text=True)

    out = ctr("tag", "--force", f"{repository}:{tag}", f"{repository}:{alias}")
    assert out.returncode == 0, out.stderr
    try:
        yield alias
    finally:
        ctr("rm", f"{repository}:{alias}")


@dataclass
class Release:
    """A release of the chart: its name (also its fullnameOverride and namespace) and the
    namespaces it watches (the first is :attr:`work_ns`)."""

    stack: Stack
    name: str
    work_namespaces: list[str]
    #: The session's database, as this host reaches it (for diagnostics).
    database_url: str
    #: The values of the last :meth:`upgrade`.
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def ns(self) -> str:
        return self.name

    @property
    def work_ns(self) -> str:
        return self.work_namespaces[0]

    @property
    def lease_name(self) -> str:
        return f"{self.name}-operator"

    @property
    def operator_service_account(self) -> str:
        return f"{self.name}-operator"

    def helm(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [helm_binary(), "--kubeconfig", self.stack.kubeconfig, "-n", self.ns, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def upgrade(self, values: dict[str, Any], *extra: str) -> None:
        """``helm upgrade --install --wait`` with ``values`` (the whole set: helm's
        --reset-values); fails the test with the operator's state when it fails."""
        with values_file(values) as path:
            # --skip-crds: the stack fixture applied crds/, as `make install` does.
            out = self.helm(
                "upgrade",
                "--install",
                self.name,
                str(CHART),
                "--create-namespace",
                "--skip-crds",
                "--reset-values",
                "--values",
                path,
                "--wait",
                "--timeout",
                "3m",
                *extra,
            )
        assert out.returncode == 0, f"helm upgrade --install failed:\n{out.stderr}\n{self.diagnose()}"
        self.values = values

    def uninstall(self) -> subprocess.CompletedProcess[str]:
        return self.helm("uninstall", self.name, "--wait", "--timeout", "90s")

    def operator_pods(self) -> list[Any]:
        selector = f"app.kubernetes.io/instance={self.name},{OPERATOR_COMPONENT}"
        return list(self.stack.core.list_namespaced_pod(self.ns, label_selector=selector).items)

    def lease(self) -> Any:
        return client.CoordinationV1Api().read_namespaced_lease(self.lease_name, self.ns)

    def holder(self) -> str:
        """The Lease's holderIdentity, "" while there is no Lease or no holder."""
        try:
            return self.lease().spec.holder_identity or ""
        except ApiException as e:
            if e.status == 404:
                return ""
            raise

    def leading(self) -> bool:
        """Whether a replica holds the Lease and, by its log, leads: its first resync is
        done ("leading:"), so it could list and watch everything it needs."""
        holder = self.holder()
        return bool(holder) and "leading:" in self.logs(pod_of(holder), tail=-1)

    def leaders_by_log(self) -> set[str]:
        """The pods whose log's last word on the Lease is that they became its leader."""
        became, stopped = f"became leader of lease {self.ns}/", f"stopped leading lease {self.ns}/"
        leaders = set()
        for pod in self.operator_pods():
            lines = [
                ln
                for ln in self.logs(pod.metadata.name, tail=-1).splitlines()
                if became in ln or stopped in ln
            ]
            if lines and became in lines[-1]:
                leaders.add(pod.metadata.name)
        return leaders

    def logs(self, pod: str, *, previous: bool = False, tail: int = 200) -> str:
        args = ["logs", pod, f"--tail={tail}", *(["--previous"] if previous else [])]
        out = self.stack.kubectl(self.ns, *args)
        return out.stdout if out.returncode == 0 else out.stderr

    def diagnose(self) -> str:
        parts = [self.stack.kubectl(self.ns, "get", "pods,deploy,lease,pdb", "-o", "wide").stdout]
        for pod in self.operator_pods():
            name = pod.metadata.name
            parts.append(f"--- logs of {name} ---\n{self.logs(name)}")
            if any(s.restart_count for s in pod.status.container_statuses or []):
                parts.append(f"--- logs of {name}, previous container ---\n{self.logs(name, previous=True)}")
        parts.append(self.stack.kubectl(self.ns, "get", "events", "--sort-by=.lastTimestamp").stdout[-3000:])
        for ns in self.work_namespaces:
            parts.append(self.stack.kubectl(ns, "get", "runs.kubetask.dev,pods", "-o", "wide").stdout)
            parts.append(self.stack.kubectl(ns, "get", "events", "--sort-by=.lastTimestamp").stdout[-3000:])
        parts.append(f"--- runs of {self.work_namespaces} in PostgreSQL (the authority) ---")
        engine = create_engine(self.database_url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT r.namespace, r.name, r.phase, r.finished_at, a.number, a.finished_at,"
                        " a.pod_uid FROM runs r LEFT JOIN attempts a ON a.run_id = r.id"
                        " WHERE r.namespace = ANY(:ns) ORDER BY r.namespace, r.name, a.number"
                    ),
                    {"ns": self.work_namespaces},
                )
                parts.extend(" ".join(str(v) for v in row) for row in rows)
        except Exception as e:  # diagnostics must not hide the failure
            parts.append(repr(e))
        finally:
            engine.dispose()
        return "\n".join(parts)


def pod_of(identity: str) -> str:
    """The pod name in a holderIdentity, ``<pod name>_<random>``."""
    return identity.rsplit("_", 1)[0]


def ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def release_values(stack: Stack, rel: Release, **values: Any) -> dict[str, Any]:
    """The values every test release has (its names, its namespaces, this session's
    database and images), with ``values`` on top."""
    repository, tag = operator_image()
    # The pods reach PostgreSQL on the pod bridge, not on the host's loopback.
    database = make_url(rel.database_url).set(host=stack.host_ip).render_as_string(hide_password=False)
    return {
        "fullnameOverride": rel.name,
        "watchNamespaces": rel.work_namespaces,
        "database": {"url": database},
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        "runnerImage": stack.runner_image,
        **values,
    }


@contextlib.contextmanager
def installed_release(
    stack: Stack,
    database_url: str,
    *,
    prefix: str,
    work_namespaces: list[str],
    namespace_labels: dict[str, str] | None = None,
    **values: Any,
) -> Iterator[Release]:
    """The chart installed as ``<prefix>-<random>`` (``values`` over
    :func:`release_values`), its namespace labelled ``namespace_labels``, with a leader
    that finished its first resync; uninstalled, and its namespace deleted, at the end
    whatever happened (an uninstall the test did itself is fine)."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    rel = Release(stack=stack, name=name, work_namespaces=work_namespaces, database_url=database_url)
    stack.core.create_namespace(
        {"metadata": {"name": name, "labels": {"kubetask.dev/e2e": "true", **(namespace_labels or {})}}}
    )
    try:
        started = time.monotonic()
        rel.upgrade(release_values(stack, rel, **values))
        try:
            wait_for(rel.leading, 90, "a replica to lead")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{rel.diagnose()}") from None
        print(f"\nrelease {name}: installed, Ready and leading in {time.monotonic() - started:.1f}s")
        yield rel
    finally:
        out = rel.uninstall()
        if out.returncode != 0 and "not found" not in out.stderr:
            print(f"helm uninstall {name}: {out.stderr}")
        with contextlib.suppress(ApiException):
            stack.core.delete_namespace(name, propagation_policy="Background")
        # Until the operators are gone: they hold connections to the session's database,
        # which is dropped at the end.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not rel.operator_pods(), 90, f"the operator pods of {name} to go")


# ---- workloads ------------------------------------------------------------------------------


def sleeper(task_id: str, *, limit: int = LIMIT) -> dict[str, Any]:
    """A Task whose runs sleep ``payload["s"]`` seconds, ``limit`` at a time."""
    return {
        "source": SLEEPER.format(id=task_id),
        "queue": {"concurrencyLimit": limit},
        "retry": {"maxAttempts": 3, "minTimeoutMs": 200, "randomize": False},
    }


def of_task(task: str) -> Any:
    return lambda labels: labels.get("kubetask.dev/task") == task


def assert_runs_within_limits(
    watcher: PodWatcher, task: str, done: dict[str, dict[str, Any]], *, limit: int = LIMIT
) -> None:
    """Every run Succeeded; never more than ``limit`` attempt pods alive (and the limit
    reached, so the burst did press on it); exactly one pod per attempt, and every pod
    belongs to an attempt."""
    assert {r["status"]["phase"] for r in done.values()} == {"Succeeded"}, {
        n: r["status"]["phase"] for n, r in done.items()
    }
    assert watcher.max_alive_where(of_task(task)) == limit, watcher.max_alive
    events = [ev for ev in watcher.events if of_task(task)(ev.labels)]
    per_attempt: dict[tuple[str, str], set[str]] = {}
    per_name: dict[str, set[str]] = {}
    for ev in events:
        key = (ev.labels.get("kubetask.dev/run-id", ""), ev.labels.get("kubetask.dev/attempt", ""))
        per_attempt.setdefault(key, set()).add(ev.uid)
        per_name.setdefault(ev.name, set()).add(ev.uid)
    assert all(len(uids) == 1 for uids in per_attempt.values()), f"attempts with two pods: {per_attempt}"
    assert all(len(uids) == 1 for uids in per_name.values()), f"pod names used twice: {per_name}"
    attempt_pods = {a["pod"] for r in done.values() for a in r["status"]["attempts"]}
    assert attempt_pods == set(per_name), (sorted(attempt_pods), sorted(per_name))
    for r in done.values():
        assert r["status"]["attempts"][-1]["reason"] == "Succeeded", r["status"]


# ---- RBAC ---------------------------------------------------------------------------------


def can_i(stack: Stack, service_account: str, ns: str) -> dict[str, set[str]]:
    """``kubectl auth can-i --list`` of ``<namespace>:<name>`` (a ServiceAccount, by
    impersonation) in namespace ``ns``: resource -> verbs (non-resource URLs left out)."""
    out = stack.kubectl(ns, "auth", "can-i", "--list", f"--as=system:serviceaccount:{service_account}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = lines[0]
    urls, verbs_at = header.index("Non-Resource URLs"), header.index("Verbs")
    rights: dict[str, set[str]] = {}
    for line in lines[1:]:
        resource = line[:urls].strip()
        if resource:
            rights.setdefault(resource, set()).update(line[verbs_at:].strip().strip("[]").split())
    return rights


def beyond_baseline(stack: Stack, service_account: str, ns: str) -> dict[str, set[str]]:
    """The rights of ``service_account`` in ``ns`` beyond those of a ServiceAccount that
    nothing names (what every ServiceAccount has: self-reviews, say)."""
    baseline = can_i(stack, f"{service_account.split(':')[0]}:kubetask-e2e-nobody", ns)
    rights = can_i(stack, service_account, ns)
    return {
        r: verbs - baseline.get(r, set()) for r, verbs in rights.items() if verbs - baseline.get(r, set())
    }
