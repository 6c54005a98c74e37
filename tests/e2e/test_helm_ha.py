"""The Helm tier: the operator as users run it, installed by the chart helm/kubetask with
two replicas that elect a leader on a Lease.

This module installs a release of its own (tests/e2e/helm.py), kt-ha-<random>, watching
one namespace of work only, with short lease timings. Runner pods call the release's
Service, as they would anywhere.

Every case records every pod event of the work namespace (PodWatcher) and asserts on
facts: how the runs ended, how many attempt pods were alive at once, how many pods each
attempt had. Times are printed, never asserted."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from tests.e2e.conftest import wait_for
from tests.e2e.harness import GROUP, VERSION, PodWatcher, Stack, namespace
from tests.e2e.helm import (
    LEASE,
    LIMIT,
    Release,
    assert_runs_within_limits,
    installed_release,
    pod_of,
    ready,
    sleeper,
)
from tests.e2e.test_control_loop import token_secrets
from tests.e2e.test_faults import apiserver_pid, leftovers, stopped
from tests.faults.tcp import TcpProxy

pytestmark = pytest.mark.e2e

RUNS = 12


@pytest.fixture(scope="module")
def db_proxy(stack: Stack) -> Iterator[TcpProxy]:
    """A fault-injecting TCP proxy in front of PostgreSQL, on the pod bridge's address:
    the release's pods reach the database through it."""
    url = make_url(stack.database_url)
    assert url.host and url.port
    with TcpProxy(url.host, url.port, listen_host=stack.host_ip) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def release(stack: Stack, e2e_database: str, db_proxy: TcpProxy) -> Iterator[Release]:
    """The chart installed as ``kt-ha-<random>``, 2 replicas, watching a namespace of its
    own, its database behind :func:`db_proxy`; uninstalled, and its namespace deleted, at
    the end whatever happened."""
    with (
        namespace(stack, "e2e-helm-ha") as work_ns,
        installed_release(
            stack,
            e2e_database,
            prefix="kt-ha",
            work_namespaces=[work_ns],
            replicaCount=2,
            leaderElection=LEASE,
            database={"url": db_proxy.url_for(e2e_database)},
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


def leader_pod(ha: Release) -> Any:
    holder = ha.holder()
    return next(p for p in ha.operator_pods() if p.metadata.name == pod_of(holder))


def assert_ran_once(done: dict[str, dict[str, Any]]) -> None:
    """Every run's task ran once: one attempt, one pod (sleepers never fail, so a second
    attempt could only come from the operator losing track of the first)."""
    attempts = {n: len(r["status"]["attempts"]) for n, r in done.items()}
    assert set(attempts.values()) == {1}, attempts


def test_the_leaders_pod_deleted_mid_burst_every_run_ends_once_within_limits(
    stack: Stack, ha: Release
) -> None:
    """``kubectl delete pod`` of the leader, as a node drain or a user does: it stops
    gracefully (releasing the Lease), the standby leads, the Deployment makes a new pod."""
    stack.apply_task(ha.work_ns, "deleted", sleeper("deleted"))
    wait_for(lambda: len([p for p in ha.operator_pods() if ready(p)]) == 2, 90, "both replicas to be Ready")
    with PodWatcher(stack, ha.work_ns) as watcher:
        runs = [stack.create_run(ha.work_ns, "deleted", payload={"s": 3}) for _ in range(RUNS)]
        wait_for(lambda: len(watcher.first_created()) > LIMIT, 90, "the second wave of pods")
        old = leader_pod(ha)
        stack.core.delete_namespaced_pod(old.metadata.name, ha.ns)
        deleted = time.monotonic()
        wait_for(lambda: pod_of(ha.holder()) not in ("", old.metadata.name), 30, "the standby to take over")
        takeover = time.monotonic() - deleted
        done = stack.wait_all(ha.work_ns, runs, timeout=150)
    print(f"\nleader pod {old.metadata.name} deleted; {ha.holder()} led {takeover:.2f}s later")
    assert old.metadata.name not in {p.metadata.name for p in ha.operator_pods()}
    assert_runs_within_limits(watcher, "deleted", done)
    assert_ran_once(done)
    wait_for(lambda: len([p for p in ha.operator_pods() if ready(p)]) == 2, 120, "a new second replica")


def test_the_leader_frozen_past_its_lease_then_thawed_never_acts_as_leader_again(
    stack: Stack, ha: Release
) -> None:
    """SIGSTOP of the leader's process (a long GC pause, a frozen VM) for three lease
    durations: the standby takes over; thawed, the old leader finds its term over and
    steps down, and no attempt gets a second pod."""
    stack.apply_task(ha.work_ns, "frozen", sleeper("frozen"))
    wait_for(lambda: len([p for p in ha.operator_pods() if ready(p)]) == 2, 90, "both replicas to be Ready")
    with PodWatcher(stack, ha.work_ns) as watcher:
        runs = [stack.create_run(ha.work_ns, "frozen", payload={"s": 3}) for _ in range(RUNS)]
        wait_for(lambda: len(watcher.first_created()) > LIMIT, 90, "the second wave of pods")
        holder = ha.holder()
        frozen = leader_pod(ha)
        pid = operator_pid(frozen.metadata.uid)
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: ha.holder() not in ("", holder), 30, "the standby to take over")
            successor = ha.holder()
            time.sleep(3 * LEASE["leaseDurationSeconds"] - LEASE["leaseDurationSeconds"])
        finally:
            os.kill(pid, signal.SIGCONT)
        done = stack.wait_all(ha.work_ns, runs, timeout=150)
    assert ha.holder() == successor, "the thawed replica took the Lease back"
    assert_runs_within_limits(watcher, "frozen", done)
    assert_ran_once(done)
    # The thawed process said it stopped leading, and did not restart (no crash loop).
    log = ha.logs(frozen.metadata.name, tail=-1)
    assert "stopped leading" in log, log[-3000:]
    restarted: Any = stack.core.read_namespaced_pod(frozen.metadata.name, ha.ns)
    print(
        f"\nthawed replica restarts: {[s.restart_count for s in restarted.status.container_statuses or []]}"
    )


def test_a_run_deleted_and_created_again_under_its_name_gets_a_pod_of_its_own(
    stack: Stack, ha: Release
) -> None:
    """A Run deleted while its pod runs, and a new Run of the same name created at once
    (a GitOps tool re-applying it): the old pod goes, the old run ends Canceled, the new
    Run runs in a pod of its own (never adopting the old one)."""
    stack.apply_task(ha.work_ns, "again", sleeper("again"))
    with PodWatcher(stack, ha.work_ns) as watcher:
        stack.create_run(ha.work_ns, "again", name="same-name", payload={"s": 60})
        old = stack.wait_run(ha.work_ns, "same-name", {"Running"}, timeout=90)
        wait_for(lambda: bool(watcher.alive), 60, "the first run's pod")
        old_id = old["status"]["runId"]
        stack.custom.delete_namespaced_custom_object(GROUP, VERSION, ha.work_ns, "runs", "same-name")
        wait_for(lambda: not run_exists(stack, ha.work_ns, "same-name"), 30, "the Run to go")
        stack.create_run(ha.work_ns, "again", name="same-name", payload={"s": 2})
        new = stack.wait_run(ha.work_ns, "same-name", timeout=120)
        wait_for(lambda: not watcher.alive, 60, "every pod to go")
    assert new["status"]["phase"] == "Succeeded", new["status"]
    assert new["status"]["runId"] != old_id
    uids = watcher.uids_by_name
    assert len(uids) == 2 and all(len(u) == 1 for u in uids.values()), uids
    assert new["status"]["attempts"][0]["pod"] in uids
    with contextlib.closing(create_engine(ha.database_url, poolclass=NullPool).connect()) as db:
        ended = db.execute(text("SELECT phase, reason FROM runs WHERE id = :id"), {"id": old_id}).one()
    assert tuple(ended) == ("Canceled", "RunDeleted"), ended


def run_exists(stack: Stack, ns: str, name: str) -> bool:
    try:
        stack.get_run(ns, name)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


EMPTY = {"slots": 0, "running": 0, "live_attempts": 0}


def burst_through_a_fault(stack: Stack, ha: Release, task: str, fault: Callable[[], None]) -> dict[str, Any]:
    """A burst of sleepers; ``fault`` once the first wave of pods exists; then every run
    ends once, within its limit, and nothing is left behind (slots, attempts, Secrets)."""
    stack.apply_task(ha.work_ns, task, sleeper(task))
    wait_for(lambda: len([p for p in ha.operator_pods() if ready(p)]) == 2, 90, "both replicas to be Ready")
    with PodWatcher(stack, ha.work_ns) as watcher:
        runs = [stack.create_run(ha.work_ns, task, payload={"s": 3}) for _ in range(RUNS)]
        wait_for(lambda: len(watcher.first_created()) >= LIMIT, 90, "the first wave of pods")
        fault()
        runs += [stack.create_run(ha.work_ns, task, payload={"s": 1}) for _ in range(2)]
        done = stack.wait_all(ha.work_ns, runs, timeout=240)
        wait_for(lambda: not watcher.alive, 60, "every attempt pod to go")
    assert_runs_within_limits(watcher, task, done)
    assert_ran_once(done)
    wait_for(lambda: leftovers(ha.database_url, ha.work_ns) == EMPTY, 30, "every slot to be released")
    assert token_secrets(stack, ha.work_ns) == []
    return done


@pytest.mark.parametrize("mode", ["blackhole", "reject"])
def test_postgresql_unreachable_for_twenty_seconds_every_run_ends_once(
    stack: Stack, ha: Release, db_proxy: TcpProxy, mode: str
) -> None:
    """The database behind the proxy cut for 20 s (blackhole: packets vanish; reject:
    connections reset) while pods run, end and new Runs arrive."""

    def cut() -> None:
        getattr(db_proxy, mode)()
        try:
            time.sleep(20)
        finally:
            db_proxy.heal()

    burst_through_a_fault(stack, ha, f"db-{mode}", cut)


def test_the_api_server_stopped_for_ten_seconds_every_run_ends_once(stack: Stack, ha: Release) -> None:
    """SIGSTOP of the real kube-apiserver for 10 s, longer than the lease: neither replica
    can renew, the leader stops acting, and once the server is back one replica leads."""
    pid = apiserver_pid()

    def pause() -> None:
        with stopped(pid):
            time.sleep(10)

    burst_through_a_fault(stack, ha, "apiserver", pause)
