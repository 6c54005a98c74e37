"""The Helm tier: kubetask as `helm upgrade --install` puts it in a cluster, from the
locally built images, with the chart's own ServiceAccounts and RBAC, and what users then do
with the release: run the examples, check who may do what, upgrade the operator with runs
in flight, uninstall.

One release for the module (tests/e2e/helm.py), kt-in-<random>, one replica, watching one
namespace of work; both namespaces enforce the Pod Security "restricted" profile, so every
operator and attempt pod of the module passes it. The cases run in the file's order and
the last one uninstalls the release."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.e2e.conftest import wait_for
from tests.e2e.harness import GROUP, REPO, TERMINAL, VERSION, PodWatcher, Stack, cli_dashboard, namespace
from tests.e2e.helm import (
    LEASE,
    RESTRICTED,
    Release,
    assert_runs_within_limits,
    beyond_baseline,
    installed_release,
    operator_image_alias,
    ready,
    sleeper,
)
from tests.integration.test_client import _wait_proxy

pytestmark = pytest.mark.e2e

EXAMPLES = REPO / "examples"
#: Pods that do not pass the "restricted" profile are refused (and warned about).
#: Tasks may run the runner image only, and not on the control plane.
POLICY = {
    "allowedImages": ["localhost/kubetask/runner:*"],
    "forbiddenTolerations": [{"key": "node-role.kubernetes.io/control-plane"}],
}
#: The operator's rights on namespaced resources, in each namespace it watches
#: (helm/kubetask/templates/_helpers.tpl, kubetask.namespacedRules).
WATCHED_NAMESPACE_RIGHTS = {
    "runs.kubetask.dev": {"get", "list", "watch", "create", "patch", "delete"},
    "tasks.kubetask.dev": {"get", "list", "watch"},
    "queues.kubetask.dev": {"get", "list", "watch", "create", "patch"},
    "webhooks.kubetask.dev": {"get"},
    "runs.kubetask.dev/status": {"patch"},
    "tasks.kubetask.dev/status": {"patch"},
    "queues.kubetask.dev/status": {"patch"},
    "schedules.kubetask.dev": {"get", "list", "watch", "patch"},
    "schedules.kubetask.dev/status": {"patch"},
    "pods": {"get", "list", "watch", "create", "delete"},
    "secrets": {"get", "list", "create", "update", "delete"},
    "configmaps": {"create"},
    "serviceaccounts": {"create"},
    "events": {"create"},
    "networkpolicies.networking.k8s.io": {"create", "update"},
}
#: Its rights everywhere: reviewing the public API's callers.
CLUSTER_RIGHTS = {
    "namespaces": {"get"},  # the watched namespace only (resourceNames)
    "tokenreviews.authentication.k8s.io": {"create"},
    "subjectaccessreviews.authorization.k8s.io": {"create"},
}


@pytest.fixture(scope="module")
def release(stack: Stack, e2e_database: str) -> Iterator[Release]:
    with (
        namespace(stack, "e2e-helm-install", labels=RESTRICTED) as work_ns,
        installed_release(
            stack,
            e2e_database,
            prefix="kt-in",
            work_namespaces=[work_ns],
            namespace_labels=RESTRICTED,
            replicaCount=1,
            # Short lease timings: the upgrade's new pod takes over at once from the old
            # one (which releases the Lease), and a crash is not waited for long.
            leaderElection=LEASE,
            taskPolicy=POLICY,
        ) as rel,
    ):
        yield rel


@pytest.fixture
def installed(release: Release, request: pytest.FixtureRequest) -> Iterator[Release]:
    """The release, with its state printed when the test fails."""
    yield release
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(release.diagnose())


def kubectl_ok(stack: Stack, ns: str, *args: str) -> str:
    out = stack.kubectl(ns, *args)
    assert out.returncode == 0, f"kubectl -n {ns} {' '.join(args)}: {out.stderr}"
    return out.stdout


#: How a refusal of the API server shows in the operator's log (kopf's APIForbiddenError,
#: the client's "(403)\nReason: Forbidden", our "pod watch failed (403)").
REFUSED = re.compile(r"orbidden|\(403\)|\b403 ")


def assert_never_forbidden(rel: Release) -> None:
    """No operator pod's log shows the API server refusing it something (its RBAC is
    all it needs)."""
    for pod in rel.operator_pods():
        log = rel.logs(pod.metadata.name, tail=-1)
        refused = [ln for ln in log.splitlines() if REFUSED.search(ln)]
        assert not refused, "\n".join(refused[:20])


def test_the_operator_runs_as_the_charts_service_account(stack: Stack, installed: Release) -> None:
    (pod,) = installed.operator_pods()
    assert pod.spec.service_account_name == installed.operator_service_account
    assert ready(pod)


def test_the_install_notes_give_the_next_three_commands(installed: Release) -> None:
    out = installed.helm("get", "notes", installed.name)
    assert out.returncode == 0, out.stderr
    for command in (
        f"kubectl -n {installed.ns} rollout status deployment/{installed.name}-operator",
        f"kubectl -n {installed.work_ns} apply -f examples/hello/task.yaml",
        f"kubectl -n {installed.work_ns} get runs.kubetask.dev -w",
    ):
        assert command in out.stdout, out.stdout


def test_both_namespaces_refuse_pods_outside_the_restricted_profile(stack: Stack, installed: Release) -> None:
    """So the operator's pod (Ready above) and the attempt pods (below) pass it."""
    privileged = {
        "metadata": {"name": "not-restricted"},
        "spec": {
            "containers": [
                {"name": "c", "image": stack.runner_image, "securityContext": {"privileged": True}}
            ]
        },
    }
    for ns in (installed.ns, installed.work_ns):
        with pytest.raises(ApiException) as refused:
            stack.core.create_namespaced_pod(ns, privileged, dry_run="All")
        assert refused.value.status == 403 and "violates PodSecurity" in str(refused.value.body), (
            refused.value
        )


def test_the_examples_hello_and_flaky_succeed(stack: Stack, installed: Release) -> None:
    ns = installed.work_ns
    for example in ("hello", "flaky"):
        kubectl_ok(stack, ns, "apply", "-f", str(EXAMPLES / example / "task.yaml"))
    hello, flaky = (
        kubectl_ok(stack, ns, "create", "-f", str(EXAMPLES / e / "run.yaml"), "-o", "name")
        .strip()
        .split("/")[-1]
        for e in ("hello", "flaky")
    )
    status = stack.wait_run(ns, hello, timeout=180)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["output"] == {"message": "Hello, kubetask!", "attempt": 1}
    status = stack.wait_run(ns, flaky, timeout=180)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["output"] == {"succeededOnAttempt": 3}
    assert [a["reason"] for a in status["attempts"]][-1] == "Succeeded"
    assert len(status["attempts"]) == 3
    assert_never_forbidden(installed)


def test_the_cli_and_its_dashboard_reach_the_charts_operator_as_a_user_with_a_kubeconfig(
    stack: Stack, installed: Release
) -> None:
    """What a user with the cluster's admin kubeconfig (a client certificate, no token)
    runs after ``helm install``: the CLI mints a token of the chart's admin ServiceAccount
    and reaches the chart's ``-api`` Service through the API server's service proxy, to
    trigger, read and list; ``kubetask dashboard`` serves the run's page the same way."""
    ns = installed.work_ns
    kubectl_ok(stack, ns, "apply", "-f", str(EXAMPLES / "hello" / "task.yaml"))
    service = f"{installed.ns}/{installed.name}-api:8080"
    _wait_proxy(stack, service)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KUBETASK_")},
        "KUBECONFIG": stack.kubeconfig,
        "KUBETASK_API_SERVICE": service,
        "KUBETASK_SERVICE_ACCOUNT": f"{installed.ns}/{installed.name}-admin",
    }

    def kubetask(*args: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-m", "kubetask.cli", *args, "--json"],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert out.returncode == 0, f"kubetask {' '.join(args)}: {out.stderr}"
        return json.loads(out.stdout)

    run = kubetask(
        "trigger", "hello", "-n", ns, "--payload", '{"name": "helm"}', "--wait", "--timeout", "180"
    )
    assert run["phase"] == "Succeeded" and run["output"] == {"message": "Hello, helm!", "attempt": 1}, run
    # The Run resource says who triggered it: the admin ServiceAccount the CLI minted for.
    admin = f"system:serviceaccount:{installed.ns}:{installed.name}-admin"
    annotations = stack.get_run(ns, run["name"])["metadata"]["annotations"]
    assert annotations["kubetask.dev/triggered-by"] == admin
    listed = kubetask("runs", "list", "-n", ns, "--task", "hello", "--since", "all")
    assert run["id"] in {r["id"] for r in listed["items"]}

    with cli_dashboard(env, None) as url:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(url, timeout=60) as r:  # signs in (a cookie), then the runs list
            assert r.url.endswith("/dashboard/runs"), r.url
        with opener.open(f"{url.split('/_kubetask')[0]}/dashboard/runs/{run['id']}", timeout=60) as r:
            page = r.read().decode()
        assert f'data-run-id="{run["id"]}"' in page and "phase-succeeded" in page
        assert admin in page  # signed in as the admin ServiceAccount
    assert_never_forbidden(installed)


def test_the_operator_may_do_what_its_code_does_and_runner_pods_nothing(
    stack: Stack, installed: Release
) -> None:
    sa = f"{installed.ns}:{installed.operator_service_account}"
    # In the namespace it watches: its Role, and the cluster-wide reviews.
    assert beyond_baseline(stack, sa, installed.work_ns) == WATCHED_NAMESPACE_RIGHTS | CLUSTER_RIGHTS
    # In its own namespace: the Lease it elects its leader on.
    assert beyond_baseline(stack, sa, installed.ns) == CLUSTER_RIGHTS | {
        "leases.coordination.k8s.io": {"get", "create", "update"}
    }
    # Anywhere else: nothing but the reviews (no Secret, pod or Run of other namespaces).
    assert beyond_baseline(stack, sa, "default") == CLUSTER_RIGHTS

    # Attempt pods run as the runner ServiceAccount (the operator created it with the
    # first pod of the namespace): no right at all, and no token in the pod.
    runner = stack.core.read_namespaced_service_account("kubetask-runner", installed.work_ns)
    assert runner.automount_service_account_token is False
    assert beyond_baseline(stack, f"{installed.work_ns}:kubetask-runner", installed.work_ns) == {}
    stack.apply_task(installed.work_ns, "probe", sleeper("probe"))
    run = stack.create_run(installed.work_ns, "probe", payload={"s": 3})
    wait_for(lambda: bool(stack.pods(installed.work_ns, f"kubetask.dev/run={run}")), 60, "the probe's pod")
    (pod,) = stack.pods(installed.work_ns, f"kubetask.dev/run={run}")
    assert pod.spec.service_account_name == "kubetask-runner"
    assert pod.spec.automount_service_account_token is False
    assert not [v for v in pod.spec.volumes if v.projected is not None], pod.spec.volumes
    assert all(
        m.mount_path != "/var/run/secrets/kubernetes.io/serviceaccount"
        for m in pod.spec.containers[0].volume_mounts
    )
    assert stack.wait_run(installed.work_ns, run, timeout=120)["status"]["phase"] == "Succeeded"


def test_network_policies_let_attempt_pods_reach_only_dns_and_the_runner_port(
    stack: Stack, installed: Release
) -> None:
    """What the chart and the operator put in place. (The local stack's CNI, the bridge
    plugin, does not enforce NetworkPolicies: that runs succeed shows that they allow
    what runs need, not that they deny the rest.)"""
    net = client.NetworkingV1Api()
    # Put by the operator with the first attempt pod of the namespace.
    runner = net.read_namespaced_network_policy("kubetask-runner", installed.work_ns).spec
    assert runner.policy_types == ["Ingress", "Egress"] and not runner.ingress
    assert runner.pod_selector.match_labels == {"app.kubernetes.io/managed-by": "kubetask"}
    to_operator, dns = runner.egress
    assert [p.port for p in to_operator.ports] == [8081]
    assert to_operator.to[0].namespace_selector.match_labels == {"kubernetes.io/metadata.name": installed.ns}
    assert to_operator.to[0].pod_selector.match_labels["app.kubernetes.io/instance"] == installed.name
    assert sorted((p.protocol, p.port) for p in dns.ports) == [("TCP", 53), ("UDP", 53)]
    # The chart's, in front of the operator.
    operator = net.read_namespaced_network_policy(f"{installed.name}-operator", installed.ns).spec
    from_runners, api = operator.ingress
    assert [p.port for p in from_runners.ports] == [8081] and [p.port for p in api.ports] == [8080]
    assert from_runners._from[0].namespace_selector.match_expressions[0].values == [installed.work_ns]


def test_a_task_with_an_image_or_toleration_outside_the_policy_is_not_ready_and_its_runs_fail(
    stack: Stack, installed: Release
) -> None:
    ns = installed.work_ns
    refused: dict[str, tuple[dict[str, Any], str]] = {
        "elsewhere": ({"source": "x", "image": "docker.io/library/busybox:1"}, "ImageNotAllowed"),
        "anywhere": (
            {"source": "x", "podTemplate": {"tolerations": [{"operator": "Exists"}]}},
            "TolerationNotAllowed",
        ),
    }
    for name, (spec, _) in refused.items():
        stack.apply_task(ns, name, spec)
    runs = {name: stack.create_run(ns, name) for name in refused}
    # The runner image, named explicitly, is allowed.
    stack.apply_task(ns, "allowed", {**sleeper("allowed"), "image": stack.runner_image})
    allowed = stack.create_run(ns, "allowed", payload={"s": 0})
    for name, (_, reason) in refused.items():
        status = stack.wait_run(ns, runs[name], timeout=120)["status"]
        assert status["phase"] == "Failed", status
        assert status["attempts"][-1]["reason"] == reason, status
        assert len(status["attempts"]) == 1  # not retried
        assert stack.pods(ns, f"kubetask.dev/run={runs[name]}") == []
        task = stack.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "tasks", name)
        (ready,) = [c for c in task["status"]["conditions"] if c["type"] == "Ready"]
        assert (ready["status"], ready["reason"]) == ("False", reason), ready
    assert stack.wait_run(ns, allowed, timeout=120)["status"]["phase"] == "Succeeded"


def test_an_upgrade_to_a_new_operator_image_finishes_the_runs_in_flight(
    stack: Stack, installed: Release
) -> None:
    runs_count, limit = 6, 2
    ns = installed.work_ns
    stack.apply_task(ns, "upgrade", sleeper("upgrade", limit=limit))
    (old,) = installed.operator_pods()
    with operator_image_alias("upgrade") as alias, PodWatcher(stack, ns) as watcher:
        runs = [stack.create_run(ns, "upgrade", payload={"s": 5}) for _ in range(runs_count)]
        wait_for(
            lambda: any(p.status.phase == "Running" for p in stack.pods(ns, "kubetask.dev/task=upgrade")),
            120,
            "an attempt pod of the burst to run",
        )
        in_flight = runs_count - len(finished(stack, ns, runs))
        values: dict[str, Any] = dict(installed.values)
        if alias is not None:
            values["image"] = {**values["image"], "tag": alias}
        else:  # another cluster: a changed pod template rolls the Deployment all the same
            values["podAnnotations"] = {"kubetask.dev/upgrade": str(time.time())}
        started = time.monotonic()
        installed.upgrade(values)
        rolled = time.monotonic() - started
        # helm --wait returns once the new pod is Ready; the old one is stopping then.
        wait_for(lambda: len(installed.operator_pods()) == 1, 90, "the old operator pod to go")
        (new,) = installed.operator_pods()
        assert new.metadata.uid != old.metadata.uid
        if alias is not None:
            assert new.spec.containers[0].image.endswith(f":{alias}"), new.spec.containers[0].image
        wait_for(installed.leading, 60, "the new operator pod to lead")
        during = runs_count - len(finished(stack, ns, runs))
        done = stack.wait_all(ns, runs, timeout=180)
    print(
        f"\n{in_flight} of {runs_count} runs in flight when the upgrade began; the rollout took"
        f" {rolled:.1f}s; {during} were still unfinished when the new pod led"
    )
    assert in_flight > 0
    assert_runs_within_limits(watcher, "upgrade", done, limit=limit)
    assert_never_forbidden(installed)


def finished(stack: Stack, ns: str, names: list[str]) -> list[str]:
    items = stack.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "runs")["items"]
    return [
        r["metadata"]["name"]
        for r in items
        if r["metadata"]["name"] in names and (r.get("status") or {}).get("phase") in TERMINAL
    ]


def test_uninstall_leaves_no_pods_secrets_or_config_maps_and_keeps_the_crds(
    stack: Stack, installed: Release
) -> None:
    ns, work = installed.ns, installed.work_ns
    # The work of the earlier cases is over: nothing of it is in flight.
    leftovers = stack.custom.list_namespaced_custom_object(GROUP, VERSION, work, "runs")["items"]
    assert all((r.get("status") or {}).get("phase") in TERMINAL for r in leftovers)
    wait_for(lambda: not stack.pods(work), 60, "the attempt pods of finished runs to be deleted")
    tasks = {
        t["metadata"]["uid"]
        for t in stack.custom.list_namespaced_custom_object(GROUP, VERSION, work, "tasks")["items"]
    }

    out = installed.uninstall()
    assert out.returncode == 0, out.stderr
    wait_for(lambda: not installed.operator_pods(), 90, "the operator pods to go")

    # The release's namespace holds nothing of it but the Lease the operator created.
    assert [s.metadata.name for s in stack.core.list_namespaced_secret(ns).items] == []
    assert [c.metadata.name for c in stack.core.list_namespaced_config_map(ns).items] == ["kube-root-ca.crt"]
    assert [a.metadata.name for a in stack.core.list_namespaced_service_account(ns).items] == ["default"]
    assert [s.metadata.name for s in stack.core.list_namespaced_service(ns).items] == []
    assert [p.metadata.name for p in stack.core.list_namespaced_pod(ns).items] == []
    # Nothing cluster-wide either.
    rbac = client.RbacAuthorizationV1Api()
    selector = f"app.kubernetes.io/instance={installed.name}"
    assert rbac.list_cluster_role(label_selector=selector).items == []
    assert rbac.list_cluster_role_binding(label_selector=selector).items == []
    assert rbac.list_namespaced_role(work, label_selector=selector).items == []
    assert rbac.list_namespaced_role_binding(work, label_selector=selector).items == []

    # The namespace of work: no attempt pod or token Secret; the ConfigMaps of inline
    # sources only while their Task is there (they are the Task's: owner references).
    managed = "app.kubernetes.io/managed-by=kubetask"
    assert stack.pods(work) == []
    assert stack.core.list_namespaced_secret(work, label_selector=managed).items == []
    for cm in stack.core.list_namespaced_config_map(work, label_selector=managed).items:
        assert {o.uid for o in cm.metadata.owner_references or []} <= tasks, cm.metadata
    # What the operator put there for attempt pods stays (docs/install.md, Uninstalling).
    assert [
        a.metadata.name
        for a in stack.core.list_namespaced_service_account(work, label_selector=managed).items
    ] == ["kubetask-runner"]
    policies = client.NetworkingV1Api().list_namespaced_network_policy(work, label_selector=managed).items
    assert [p.metadata.name for p in policies] == ["kubetask-runner"]

    # The CRDs stay, and with them the Tasks and Runs.
    ext = client.ApiextensionsV1Api()
    for plural in ("tasks", "runs", "queues", "webhooks"):
        ext.read_custom_resource_definition(f"{plural}.{GROUP}")
    assert len(stack.custom.list_namespaced_custom_object(GROUP, VERSION, work, "runs")["items"]) == len(
        leftovers
    )
    with contextlib.suppress(Exception):
        print(f"\nleft in {ns}: {installed.stack.kubectl(ns, 'get', 'all,lease', '-o', 'name').stdout}")
