"""End to end: runs triggered over the public API by ``kubetask.Client`` and by
``kubetask trigger --wait`` run in pods and succeed (the real cluster, operator process,
PostgreSQL and runner image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import yaml

from kubetask import ApiError, Client
from kubetask.spec import GROUP
from tests.e2e.harness import REPO, Operator, Stack, service_account_token

pytestmark = pytest.mark.e2e

TRIGGER_RULES = [{"apiGroups": [GROUP], "resources": ["runs"], "verbs": ["create", "get", "list"]}]


def example_task(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / name / "task.yaml").read_text())
    return dict(doc["spec"])


def trigger_when_allowed(client: Client, task: str, payload: dict[str, Any]) -> Any:
    """RBAC reaches the authorizer through an informer: a new binding may take a moment."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.tasks.trigger(task, payload)
        except ApiError as e:
            if e.status != 403 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_runs_triggered_by_the_client_and_the_cli_succeed(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(ns, "hello", example_task("hello"))
    with service_account_token(stack, ns, "app", cluster_rules=TRIGGER_RULES) as token:
        with Client(operator.api, token, namespace=ns) as client:
            made = trigger_when_allowed(client, "hello", {"name": "client"})
            assert stack.get_run(ns, made.name)["spec"]["payload"] == {"name": "client"}
            run = client.runs.wait(made.id, timeout=180)
            assert run.phase == "Succeeded", run
            assert run.output == {"message": "Hello, client!", "attempt": 1}
            messages = [line.message for line in client.runs.logs(made.id)]
            assert any("greeting client on attempt 1" in m for m in messages), messages
            assert made.id in {r.id for r in client.runs.list("hello", status=["Succeeded"], namespace=ns)}

        env = {**os.environ, "KUBETASK_TOKEN": token, "KUBETASK_API_URL": operator.api}
        cli = subprocess.run(
            [sys.executable, "-m", "kubetask.cli", "trigger", "hello", "--payload", '{"name": "cli"}',
             "--wait", "--timeout", "180", "--json", "-n", ns],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        result = json.loads(cli.stdout)
        assert result["phase"] == "Succeeded" and result["output"] == {"message": "Hello, cli!", "attempt": 1}
        assert stack.get_run(ns, result["name"])["status"]["phase"] == "Succeeded"


def test_a_client_in_a_pod_uses_the_pods_service_account_token(
    stack: Stack, ns: str, operator: Operator
) -> None:
    """``Client()`` in a pod: the projected ServiceAccount token, the pod's namespace."""
    stack.apply_task(ns, "hello", example_task("hello"))
    script = (
        "import time\n"
        "from kubetask import ApiError, Client\n"
        "client = Client()\n"
        "print('namespace', client.namespace, flush=True)\n"
        "for _ in range(60):  # the RoleBinding may take a moment to reach the authorizer\n"
        "    try:\n"
        "        run = client.tasks.trigger('hello', {'name': 'pod'})\n"
        "        break\n"
        "    except ApiError as e:\n"
        "        if e.status != 403: raise\n"
        "        time.sleep(0.5)\n"
        "print('phase', client.runs.wait(run.id, timeout=150).phase, flush=True)\n"
    )
    with service_account_token(stack, ns, "app", cluster_rules=TRIGGER_RULES):
        stack.core.create_namespaced_pod(
            ns,
            {
                "metadata": {"name": "client"},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": "app",
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                    "containers": [
                        {
                            "name": "main",
                            "image": stack.runner_image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["python", "-c", script],
                            # The operator runs on this host, not behind the kubetask-api Service.
                            "env": [
                                {
                                    "name": "KUBETASK_API_URL",
                                    "value": f"http://{stack.host_ip}:{operator.port}",
                                }
                            ],
                        }
                    ],
                },
            },
        )
        deadline = time.monotonic() + 240
        phase = ""
        while time.monotonic() < deadline:
            phase = stack.core.read_namespaced_pod("client", ns).status.phase
            if phase in ("Succeeded", "Failed"):
                break
            time.sleep(1)
        log = stack.core.read_namespaced_pod_log("client", ns)
        assert phase == "Succeeded", log
        assert f"namespace {ns}" in log and "phase Succeeded" in log, log
