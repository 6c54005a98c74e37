"""Smoke tests of the local stack itself: the node, DNS, Services, PostgreSQL from a pod,
and the runner image."""

from __future__ import annotations

import os
import re
import time
from typing import Any

import pytest

from tests.e2e.conftest import wait_for
from tests.e2e.harness import REPO, Stack, hack

pytestmark = pytest.mark.e2e


def pod(name: str, image: str, command: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": command,
                    **extra,
                }
            ],
        },
    }


def run_to_end(stack: Stack, ns: str, manifest: dict[str, Any], timeout: float = 120) -> str:
    name = manifest["metadata"]["name"]
    stack.core.create_namespaced_pod(ns, manifest)
    deadline = time.monotonic() + timeout
    phase = ""
    while time.monotonic() < deadline:
        phase = stack.core.read_namespaced_pod(name, ns).status.phase
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(0.5)
    log = stack.core.read_namespaced_pod_log(name, ns)
    assert phase == "Succeeded", f"pod {name} ended {phase!r}; log:\n{log}"
    return str(log)


def test_node_is_ready_at_the_built_version(stack: Stack) -> None:
    pinned = re.search(r"^K8S_VERSION=(\S+)", (REPO / "hack" / "versions.env").read_text(), re.M)
    assert pinned is not None
    nodes = stack.core.list_node().items
    assert len(nodes) >= 1
    ready = [n for n in nodes if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)]
    assert ready, "no node is Ready"
    if not os.environ.get("KUBECONFIG"):  # the local stack, not a user's cluster
        assert [n.status.node_info.kubelet_version for n in nodes] == [pinned.group(1)]


def test_coredns_is_running(stack: Stack) -> None:
    pods = stack.core.list_namespaced_pod("kube-system", label_selector="k8s-app=kube-dns").items
    assert any(p.status.phase == "Running" for p in pods), [p.status.phase for p in pods]


def test_runner_image_pod_succeeds_and_its_log_is_read_through_the_api(stack: Stack, ns: str) -> None:
    log = run_to_end(
        stack,
        ns,
        pod(
            "version",
            stack.runner_image,
            ["python", "-c", "import kubetask; print('kubetask', kubetask.__version__)"],
        ),
    )
    assert re.search(r"^kubetask \d+\.\d+\.\d+", log, re.M), log


def test_pod_reaches_a_clusterip_service_by_dns_name(stack: Stack, ns: str) -> None:
    server = pod(
        "web",
        stack.runner_image,
        ["python", "-m", "http.server", "8080", "--directory", "/tmp"],
        ports=[{"containerPort": 8080}],
    )
    server["spec"]["restartPolicy"] = "Always"
    stack.core.create_namespaced_pod(ns, server)
    stack.core.create_namespaced_service(
        ns,
        {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )
    wait_for(lambda: stack.core.read_namespaced_pod("web", ns).status.phase == "Running", 120, "the web pod")
    client = (
        "import urllib.request, time\n"
        "for i in range(30):\n"
        "    try:\n"
        f"        r = urllib.request.urlopen('http://web.{ns}.svc.cluster.local/', timeout=3)\n"
        "        print('status', r.status); break\n"
        "    except OSError as e:\n"
        "        print('retry', e); time.sleep(1)\n"
        "else:\n"
        "    raise SystemExit(1)\n"
    )
    log = run_to_end(stack, ns, pod("client", stack.runner_image, ["python", "-c", client]))
    assert "status 200" in log


def test_pod_reaches_postgresql(stack: Stack, ns: str) -> None:
    operator_image = hack("print.sh", "operator-image")
    url = hack("db.sh", "url", "pods").replace("postgresql+psycopg://", "postgresql://")
    script = f"import psycopg\nwith psycopg.connect({url!r}) as c:\n    print('select', c.execute('select 41 + 1').fetchone()[0])\n"
    log = run_to_end(stack, ns, pod("pg", operator_image, ["python", "-c", script]))
    assert "select 42" in log
