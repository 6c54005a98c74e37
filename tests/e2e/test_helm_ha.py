"""The Helm tier: the operator as users run it, installed by the chart helm/kubetask with
two replicas that elect a leader on a Lease.

The main release (kubetask in kubetask-system, cluster-wide) is paused by the ``stack``
fixture, so this module installs a release of its own, kt-ha-<random> in the namespace of
the same name, watching one namespace of work only, against this session's database (as
the pods reach PostgreSQL: on the pod bridge) and with short lease timings. Runner pods
call the release's Service, as they would anywhere.

Every case records every pod event of the work namespace (PodWatcher) and asserts on
facts: how the runs ended, how many attempt pods were alive at once, how many pods each
attempt had. Times are printed, never asserted."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.e2e.conftest import wait_for
from tests.e2e.harness import REPO, PodWatcher, Stack, hack, namespace

pytestmark = pytest.mark.e2e

#: Lease timings of the release (seconds): a dead leader is replaced in 4 to 4.5 s.
LEASE = {"leaseDurationSeconds": 4, "renewDeadlineSeconds": 3, "retryPeriodSeconds": 0.5}
RUNS, LIMIT = 12, 3

SLEEPER = """from kubetask import task
import time

@task(id="{id}")
def work(payload, ctx):
    time.sleep(payload.get("s", 1))
    return ctx.attempt.number
"""


def helm_binary() -> str:
    """The helm of the pinned version, as `make helm-check` finds it (hack/lib.sh)."""
    out = subprocess.run(
        ["bash", "-c", "source hack/lib.sh && command -v helm"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


@dataclass
class Release:
    """A release of the chart: its name (also its fullnameOverride and namespace) and the
    namespace it watches."""

    stack: Stack
    helm_path: str
    name: str
    work_ns: str
    #: The session's database, as this host reaches it (for diagnostics).
    database_url: str

    @property
    def ns(self) -> str:
        return self.name

    @property
    def lease_name(self) -> str:
        return f"{self.name}-operator"

    def helm(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.helm_path, "--kubeconfig", self.stack.kubeconfig, "-n", self.ns, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def operator_pods(self) -> list[Any]:
        selector = f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component=operator"
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
        parts.append(self.stack.kubectl(self.work_ns, "get", "runs.kubetask.dev,pods", "-o", "wide").stdout)
        parts.append(f"--- runs of {self.work_ns} in PostgreSQL (the authority) ---")
        engine = create_engine(self.database_url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT r.name, r.phase, r.finished_at, a.number, a.finished_at, a.pod_uid"
                        " FROM runs r LEFT JOIN attempts a ON a.run_id = r.id"
                        " WHERE r.namespace = :ns ORDER BY r.name, a.number"
                    ),
                    {"ns": self.work_ns},
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


@pytest.fixture(scope="module")
def release(stack: Stack, e2e_database: str) -> Iterator[Release]:
    """The chart installed as ``kt-ha-<random>``, 2 replicas, watching a namespace of its
    own; uninstalled, and its namespace deleted, at the end whatever happened."""
    name = f"kt-ha-{secrets.token_hex(3)}"
    repository, tag = hack("print.sh", "operator-image").rsplit(":", 1)
    # The pods reach PostgreSQL on the pod bridge, not on the host's loopback.
    database = make_url(e2e_database).set(host=stack.host_ip).render_as_string(hide_password=False)
    with namespace(stack, "e2e-helm-ha") as work_ns:
        rel = Release(
            stack=stack, helm_path=helm_binary(), name=name, work_ns=work_ns, database_url=e2e_database
        )
        values = {
            "fullnameOverride": name,
            "replicaCount": 2,
            "watchNamespaces": [work_ns],
            "database": {"url": database},
            "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
            "runnerImage": stack.runner_image,
            "leaderElection": LEASE,
        }
        # A file, not --set: the URL's characters mean things to --set (JSON is YAML).
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            json.dump(values, f)
        try:
            started = time.monotonic()
            # --skip-crds: the stack fixture applied crds/, as `make install` does.
            out = rel.helm(
                "install",
                name,
                str(REPO / "helm" / "kubetask"),
                "--create-namespace",
                "--skip-crds",
                "--values",
                f.name,
                "--wait",
                "--timeout",
                "3m",
            )
            assert out.returncode == 0, f"helm install failed:\n{out.stderr}\n{rel.diagnose()}"
            try:
                wait_for(rel.leading, 60, "a replica to lead")
            except AssertionError as e:
                raise AssertionError(f"{e}\n{rel.diagnose()}") from None
            print(
                f"\nrelease {name}: installed, 2 replicas Ready and a leader in {time.monotonic() - started:.1f}s"
            )
            yield rel
        finally:
            os.unlink(f.name)
            out = rel.helm("uninstall", name, "--wait", "--timeout", "90s")
            if out.returncode != 0 and "not found" not in out.stderr:
                print(f"helm uninstall {name}: {out.stderr}")
            with contextlib.suppress(ApiException):
                stack.core.delete_namespace(name, propagation_policy="Background")
            # Until the operators are gone: they hold connections to the session's
            # database, which is dropped at the end.
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not rel.operator_pods(), 90, f"the operator pods of {name} to go")


@pytest.fixture
def ha(release: Release, request: pytest.FixtureRequest) -> Iterator[Release]:
    """The release, with its pods' logs printed when the test fails."""
    yield release
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(release.diagnose())


def sleeper(task_id: str) -> dict[str, Any]:
    return {
        "source": SLEEPER.format(id=task_id),
        "queue": {"concurrencyLimit": LIMIT},
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


def operator_pid(pod_uid: str) -> int:
    """The operator's process of a pod running on this host: the python process whose
    command line names kubetask, in a cgroup of the pod (its uid written with dashes by
    the cgroupfs driver, with underscores by the systemd one)."""
    forms = (pod_uid, pod_uid.replace("-", "_"))
    found: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cgroup = (proc / "cgroup").read_text()
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:  # gone meanwhile
            continue
        if not any(form in cgroup for form in forms):
            continue
        if any("python" in Path(a).name for a in argv) and any("kubetask" in a for a in argv):
            found.append(int(proc.name))
    assert len(found) == 1, f"operator processes of pod {pod_uid} on this host: {found}"
    return found[0]


def test_two_replicas_one_leader_and_a_burst_stays_within_its_limit(stack: Stack, ha: Release) -> None:
    pods = ha.operator_pods()
    assert len(pods) == 2 and all(ready(p) for p in pods), [(p.metadata.name, ready(p)) for p in pods]
    lease = ha.lease()
    assert lease.spec.lease_duration_seconds == LEASE["leaseDurationSeconds"]
    assert pod_of(lease.spec.holder_identity) in {p.metadata.name for p in pods}, lease.spec.holder_identity

    def one_leader() -> bool:
        # The Lease read before and after the logs, so that all three agree at one time.
        holder = ha.holder()
        return ha.leaders_by_log() == {pod_of(holder)} and ha.holder() == holder

    # Exactly one replica leads by its own account, and the Lease names it.
    wait_for(one_leader, 30, "one replica to lead, the one the Lease names")
    transitions = ha.lease().spec.lease_transitions

    stack.apply_task(ha.work_ns, "burst", sleeper("burst"))
    with PodWatcher(stack, ha.work_ns) as watcher:
        runs = [stack.create_run(ha.work_ns, "burst", payload={"s": 2}) for _ in range(RUNS)]
        done = stack.wait_all(ha.work_ns, runs, timeout=150)
    assert_runs_within_limits(watcher, "burst", done)
    # Not asserted: an API server slower than the renew deadline (3 s) moves the Lease,
    # and that is no fault of the operator.
    print(f"\nleader changes during the burst: {ha.lease().spec.lease_transitions - transitions}")


def test_the_leader_sigkilled_mid_burst_is_replaced_and_every_run_ends_within_limits(
    stack: Stack, ha: Release
) -> None:
    stack.apply_task(ha.work_ns, "failover", sleeper("failover"))
    wait_for(lambda: all(ready(p) for p in ha.operator_pods()), 60, "both replicas to be Ready")
    with PodWatcher(stack, ha.work_ns) as watcher:
        runs = [stack.create_run(ha.work_ns, "failover", payload={"s": 2}) for _ in range(RUNS)]
        wait_for(lambda: len(watcher.first_created()) > LIMIT, 90, "the second wave of pods")

        holder = ha.holder()
        leader = next(p for p in ha.operator_pods() if p.metadata.name == pod_of(holder))
        pid = operator_pid(leader.metadata.uid)
        assert ha.holder() == holder, "the Lease moved while the process was looked for"
        os.kill(pid, signal.SIGKILL)
        killed, killed_at = time.monotonic(), time.time()
        # Polled every 50 ms (not wait_for's 300) for a take-over time worth printing.
        while (successor := ha.holder()) in ("", holder):
            assert time.monotonic() - killed < 30, "no replica took the Lease over in 30 s"
            time.sleep(0.05)
        takeover = time.monotonic() - killed

        done = stack.wait_all(ha.work_ns, runs, timeout=150)
    # Pods seen after the take-over: the new leader's (the old one was dead by then).
    took_over_at = killed_at + takeover
    created = watcher.first_created().values()
    new_pods = sorted(t for t in created if t > took_over_at)
    print(
        f"\nleader {holder} (pid {pid}) SIGKILLed after {sum(t <= killed_at for t in created)} pods; "
        f"Lease taken over by {successor} {takeover:.2f}s later (lease {LEASE['leaseDurationSeconds']}s, "
        f"renew deadline {LEASE['renewDeadlineSeconds']}s, retry {LEASE['retryPeriodSeconds']}s); "
        + (
            f"its first attempt pod {new_pods[0] - took_over_at:.2f}s after the take-over"
            if new_pods
            else "it created no attempt pod"
        )
    )
    assert pod_of(successor) in {p.metadata.name for p in ha.operator_pods()}, successor
    assert_runs_within_limits(watcher, "failover", done)
    # The kill hit the operator's container, which the kubelet restarted.
    restarted: Any = stack.core.read_namespaced_pod(leader.metadata.name, ha.ns)
    assert sum(s.restart_count for s in restarted.status.container_statuses or []) >= 1
