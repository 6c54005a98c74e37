"""End to end: runs triggered over the public API by ``kubetask.Client`` and by
``kubetask trigger --wait`` run in pods and succeed (the real cluster, operator process,
PostgreSQL and runner image)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import yaml

from kubetask import ApiError, Client
from kubetask.apimodels import BulkProgress, BulkSummary
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


MANAGE_RULES = [
    {"apiGroups": [GROUP], "resources": ["runs"], "verbs": ["create", "get", "list", "patch"]},
    {"apiGroups": [GROUP], "resources": ["tasks", "queues"], "verbs": ["get", "list", "patch"]},
]


def test_cancel_a_running_run_replay_a_failed_one_and_bulk_cancel_fifty_queued(
    stack: Stack, ns: str, operator: Operator
) -> None:
    """The actions of the public API through the client, against the operator: a running
    run canceled (its pod goes), a failed run replayed (a new run with the same payload,
    linked to the original), and 50 queued runs canceled in one bulk request while a
    queue of limit 1 holds them back."""
    sleeper = "from kubetask import task\nimport time\n\n@task(id='sleeper')\ndef f(payload, ctx):\n"
    sleeper += "    time.sleep(payload.get('s', 300))\n    if payload.get('fail'):\n"
    sleeper += "        raise RuntimeError('failed on purpose')\n    return 1\n"
    stack.apply_task(
        ns,
        "sleeper",
        {"source": sleeper, "retry": {"maxAttempts": 1}, "queue": {"name": "one", "concurrencyLimit": 1}},
    )
    with (
        service_account_token(stack, ns, "ops", cluster_rules=MANAGE_RULES) as token,
        Client(operator.api, token, namespace=ns) as client,
    ):
        running = trigger_when_allowed(client, "sleeper", {"s": 300})
        deadline = time.monotonic() + 120
        while client.runs.retrieve(running.id).phase != "Running":
            assert time.monotonic() < deadline, "the first run never ran"
            time.sleep(0.5)
        queued = [client.tasks.trigger("sleeper", {"s": 1}, tags=["bulk"]) for _ in range(50)]
        assert {client.runs.retrieve(r.id).phase for r in queued[:3]} == {"Queued"}
        lines = list(client.runs.bulk_cancel(tags=["bulk"], namespace=ns))
        summary = lines[-1]
        assert isinstance(summary, BulkSummary), lines[-1]
        assert (summary.summary.matched, summary.summary.succeeded, summary.summary.failed) == (50, 50, 0)
        assert len([line for line in lines if isinstance(line, BulkProgress)]) == 50
        assert client.runs.cancel(running.id).id == running.id
        assert client.runs.wait(running.id, timeout=60).phase == "Canceled"
        for r in queued:
            assert client.runs.wait(r.id, timeout=60).phase == "Canceled"
        deadline = time.monotonic() + 60
        while stack.pods(ns):
            assert time.monotonic() < deadline, [p.metadata.name for p in stack.pods(ns)]
            time.sleep(0.5)
        # None of the 50 ever got a pod: they were canceled while queued.
        failed = client.tasks.trigger("sleeper", {"s": 0, "fail": True})
        assert client.runs.wait(failed.id, timeout=120).phase == "Failed"
        again = client.runs.replay(failed.id)
        assert again.replay_of == failed.id and again.id != failed.id
        replayed = stack.get_run(ns, again.name)
        assert replayed["spec"]["payload"] == {"s": 0, "fail": True}
        assert replayed["metadata"]["labels"]["kubetask.dev/replay-of"] == failed.id
        assert client.runs.wait(again.id, timeout=120).phase == "Failed"


def test_a_signed_webhook_triggers_a_run_and_a_bad_signature_creates_nothing(
    stack: Stack, ns: str, operator: Operator
) -> None:
    secret = b"e2e-webhook-secret"
    stack.apply_task(ns, "hello", example_task("hello"))
    stack.core.create_namespaced_secret(
        ns, {"metadata": {"name": "hook"}, "data": {"token": base64.b64encode(secret).decode()}}
    )
    stack.custom.create_namespaced_custom_object(
        GROUP,
        "v1alpha1",
        ns,
        "webhooks",
        {
            "apiVersion": f"{GROUP}/v1alpha1",
            "kind": "Webhook",
            "metadata": {"name": "gh"},
            "spec": {"task": "hello", "format": "github", "secretRef": {"name": "hook", "key": "token"}},
        },
    )
    body = json.dumps({"name": "webhook"}).encode()
    url = f"{operator.api}/api/v1/namespaces/{ns}/webhooks/gh"

    def deliver(signature: str) -> tuple[int, Any]:
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    bad = "sha256=" + hmac.new(b"wrong", body, hashlib.sha256).hexdigest()
    status, answer = deliver(bad)
    assert status == 401 and answer["error"]["code"] == "invalid_signature", answer
    good = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    status, answer = deliver(good)
    assert status == 202, answer
    run = stack.wait_run(ns, answer["name"], timeout=180)
    assert run["status"]["phase"] == "Succeeded" and run["status"]["output"]["message"] == "Hello, webhook!"
    runs = stack.custom.list_namespaced_custom_object(GROUP, "v1alpha1", ns, "runs")["items"]
    assert [r["metadata"]["name"] for r in runs] == [answer["name"]]  # the bad one created nothing
