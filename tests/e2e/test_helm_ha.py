"""The Helm tier: the operator as users run it, installed by the chart helm/kubetask with
two replicas that elect a leader on a Lease.

This module installs a release of its own (tests/e2e/helm.py), kt-ha-<random>, watching
one namespace of work only, with short lease timings. Runner pods call the release's
Service, as they would anywhere.

Every case records every pod event of the work namespace (PodWatcher) and asserts on
facts: how the runs ended, how many attempt pods were alive at once, how many pods each
attempt had. Times are printed, never asserted."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import wait_for
from tests.e2e.harness import PodWatcher, Stack, namespace
from tests.e2e.helm import (
    LIMIT,
    Release,
    assert_runs_within_limits,
    installed_release,
    pod_of,
    ready,
    sleeper,
)

pytestmark = pytest.mark.e2e

#: Lease timings of the release (seconds): a dead leader is replaced in 4 to 4.5 s.
LEASE = {"leaseDurationSeconds": 4, "renewDeadlineSeconds": 3, "retryPeriodSeconds": 0.5}
RUNS = 12


@pytest.fixture(scope="module")
def release(stack: Stack, e2e_database: str) -> Iterator[Release]:
    """The chart installed as ``kt-ha-<random>``, 2 replicas, watching a namespace of its
    own; uninstalled, and its namespace deleted, at the end whatever happened."""
    with (
        namespace(stack, "e2e-helm-ha") as work_ns,
        installed_release(
            stack,
            e2e_database,
            prefix="kt-ha",
            work_namespaces=[work_ns],
            replicaCount=2,
            leaderElection=LEASE,
        ) as rel,
    ):
        yield rel


@pytest.fixture
def ha(release: Release, request: pytest.FixtureRequest) -> Iterator[Release]:
    """The release, with its pods' logs printed when the test fails."""
    yield release
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(release.diagnose())


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
