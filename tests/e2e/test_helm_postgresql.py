"""The Helm tier with the chart's bundled PostgreSQL (postgresql.enabled): a StatefulSet
with a PersistentVolumeClaim, in a namespace that enforces Pod Security "restricted", no
database URL given. On the local stack the image is the one hack/images.sh builds from
Debian's packages; the claim binds to a hostPath PersistentVolume made for the test (the
local stack has no provisioner; kind's local-path one does this by itself).

What is shown: the operator migrates the empty database and runs tasks; the database pod
deleted during a burst comes back with its data (the same volume), and every run ends
once, within its queue's limit, watched pod event by pod event."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.conftest import wait_for
from tests.e2e.harness import PodWatcher, Stack, hack, namespace
from tests.e2e.helm import (
    LEASE,
    LIMIT,
    RESTRICTED,
    Release,
    assert_runs_within_limits,
    installed_release,
    ready,
    sleeper,
)

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def host_path_volume(stack: Stack) -> Iterator[str]:
    """A 1 GiB hostPath PersistentVolume of its own StorageClass name (yielded), its
    directory owned by PostgreSQL's uid (999) as a provisioner would make it writable;
    deleted with its data at the end."""
    if os.environ.get("KUBECONFIG"):
        pytest.skip("another cluster: its own provisioner serves the claim (no hostPath volume made)")
    name = f"kubetask-e2e-pg-{secrets.token_hex(3)}"
    path = Path(hack("print.sh", "state-dir")) / "volumes" / name
    path.mkdir(parents=True)
    os.chown(path, 999, 999)
    stack.core.create_persistent_volume(
        {
            "metadata": {"name": name, "labels": {"kubetask.dev/e2e": "true"}},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": name,
                "hostPath": {"path": str(path), "type": "Directory"},
            },
        }
    )
    try:
        yield name
    finally:
        with contextlib.suppress(ApiException):
            stack.core.delete_persistent_volume(name)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def release(stack: Stack, e2e_database: str) -> Iterator[Release]:
    repository, tag = hack("print.sh", "postgres-image").rsplit(":", 1)
    with (
        host_path_volume(stack) as storage_class,
        namespace(stack, "e2e-helm-pg", labels=RESTRICTED) as work_ns,
        installed_release(
            stack,
            e2e_database,  # diagnostics only: this release's database is its own
            prefix="kt-pg",
            work_namespaces=[work_ns],
            namespace_labels=RESTRICTED,
            replicaCount=1,
            leaderElection=LEASE,
            database={},
            postgresql={
                "enabled": True,
                "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
                "persistence": {"enabled": True, "size": "1Gi", "storageClass": storage_class},
            },
        ) as rel,
    ):
        yield rel


@pytest.fixture
def bundled(release: Release, request: pytest.FixtureRequest) -> Iterator[Release]:
    yield release
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(release.diagnose())
        print(release.stack.kubectl(release.ns, "logs", f"{release.name}-postgresql-0", "--tail=80").stdout)


def psql(rel: Release, query: str) -> str:
    out = rel.stack.kubectl(
        rel.ns,
        "exec",
        f"{rel.name}-postgresql-0",
        "--",
        "psql",
        "-U",
        "kubetask",
        "-d",
        "kubetask",
        "-tAc",
        query,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def database_pod(rel: Release) -> object:
    return rel.stack.core.read_namespaced_pod(f"{rel.name}-postgresql-0", rel.ns)


def test_the_operator_migrates_the_bundled_database_and_runs_tasks(stack: Stack, bundled: Release) -> None:
    claim = stack.core.read_namespaced_persistent_volume_claim(
        f"data-{bundled.name}-postgresql-0", bundled.ns
    )
    assert claim.status.phase == "Bound"
    # The password was generated, and the operator's URL carries it.
    secret = stack.core.read_namespaced_secret(f"{bundled.name}-database", bundled.ns)
    assert set(secret.data) == {"password", "url"}
    stack.apply_task(bundled.work_ns, "hello", sleeper("hello"))
    run = stack.create_run(bundled.work_ns, "hello", payload={"s": 1})
    done = stack.wait_run(bundled.work_ns, run, timeout=120)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert psql(bundled, f"SELECT phase FROM runs WHERE id = '{done['status']['runId']}'") == "Succeeded"
    assert psql(bundled, "SELECT count(*) FROM alembic_version") == "1"


def test_the_database_pod_deleted_mid_burst_comes_back_with_its_data_and_every_run_ends_once(
    stack: Stack, bundled: Release
) -> None:
    before = int(psql(bundled, "SELECT count(*) FROM runs"))
    assert before >= 1
    old_uid = database_pod(bundled).metadata.uid  # type: ignore[attr-defined]
    stack.apply_task(bundled.work_ns, "burst", sleeper("burst"))
    runs_count = 2 * LIMIT + 2
    with PodWatcher(stack, bundled.work_ns) as watcher:
        runs = [stack.create_run(bundled.work_ns, "burst", payload={"s": 4}) for _ in range(runs_count)]
        wait_for(lambda: len(watcher.first_created()) >= LIMIT, 90, "the first wave of pods")
        stack.core.delete_namespaced_pod(f"{bundled.name}-postgresql-0", bundled.ns)

        def back() -> bool:
            try:
                pod = database_pod(bundled)
            except ApiException:
                return False
            return pod.metadata.uid != old_uid and ready(pod)  # type: ignore[attr-defined]

        wait_for(back, 120, "the database pod to come back Ready")
        done = stack.wait_all(bundled.work_ns, runs, timeout=240)
    assert_runs_within_limits(watcher, "burst", done)
    attempts = {n: len(r["status"]["attempts"]) for n, r in done.items()}
    assert set(attempts.values()) == {1}, attempts
    # The same volume: what was there before the deletion still is, and the burst too.
    assert int(psql(bundled, "SELECT count(*) FROM runs")) == before + runs_count
    (pod,) = bundled.operator_pods()
    print(
        f"\noperator restarts through the database's restart: {[s.restart_count for s in pod.status.container_statuses]}"
    )
