"""Bad manifests are rejected by the API server itself, with a message naming the field."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.e2e.harness import Stack

pytestmark = pytest.mark.e2e

OK_TASK: dict[str, Any] = {"source": "x"}


def task(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kubetask.dev/v1alpha1", "kind": "Task", "metadata": {"name": "t"}, "spec": spec}


def run(spec: dict[str, Any], name: str = "r") -> dict[str, Any]:
    return {"apiVersion": "kubetask.dev/v1alpha1", "kind": "Run", "metadata": {"name": name}, "spec": spec}


def queue(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kubetask.dev/v1alpha1", "kind": "Queue", "metadata": {"name": "q"}, "spec": spec}


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("task without code", task({}), "exactly one of spec.entrypoint or spec.source"),
    ("task with both entrypoint and source", task({"source": "x", "entrypoint": "a:b"}), "exactly one of"),
    ("entrypoint without function", task({"entrypoint": "module_only"}), "spec.entrypoint"),
    ("maxAttempts 0", task({**OK_TASK, "retry": {"maxAttempts": 0}}), "spec.retry.maxAttempts"),
    ("maxAttempts 101", task({**OK_TASK, "retry": {"maxAttempts": 101}}), "spec.retry.maxAttempts"),
    ("factor below 1", task({**OK_TASK, "retry": {"factor": 0.5}}), "spec.retry.factor"),
    ("negative minTimeoutMs", task({**OK_TASK, "retry": {"minTimeoutMs": -1}}), "spec.retry.minTimeoutMs"),
    ("negative maxTimeoutMs", task({**OK_TASK, "retry": {"maxTimeoutMs": -5}}), "spec.retry.maxTimeoutMs"),
    (
        "max below min timeout",
        task({**OK_TASK, "retry": {"minTimeoutMs": 5000, "maxTimeoutMs": 1000}}),
        "maxTimeoutMs must be greater than or equal to retry.minTimeoutMs",
    ),
    ("randomize not a bool", task({**OK_TASK, "retry": {"randomize": "sometimes"}}), "spec.retry.randomize"),
    ("unknown retry field", task({**OK_TASK, "retry": {"attempts": 3}}), "attempts"),
    ("maxDurationSeconds below 5", task({**OK_TASK, "maxDurationSeconds": 4}), "spec.maxDurationSeconds"),
    ("queue name not DNS-1123", task({**OK_TASK, "queue": {"name": "Bad_Queue"}}), "spec.queue.name"),
    ("queue limit 0", task({**OK_TASK, "queue": {"concurrencyLimit": 0}}), "spec.queue.concurrencyLimit"),
    ("image empty", task({**OK_TASK, "image": ""}), "spec.image"),
    (
        "nodeSelector not strings",
        task({**OK_TASK, "podTemplate": {"nodeSelector": {"a": 1}}}),
        "spec.podTemplate.nodeSelector",
    ),
    ("unknown task field", task({**OK_TASK, "retries": 3}), "retries"),
    ("run without task", run({"payload": {}}), "spec.task"),
    ("run task not DNS-1123", run({"task": "Hello_World"}), "spec.task"),
    ("payload not an object", run({"task": "t", "payload": [1, 2]}), "spec.payload"),
    ("priority too high", run({"task": "t", "priority": 5000}), "spec.priority"),
    ("run maxAttempts 0", run({"task": "t", "maxAttempts": 0}), "spec.maxAttempts"),
    ("tag too long", run({"task": "t", "tags": ["x" * 129]}), "spec.tags[0]"),
    ("too many tags", run({"task": "t", "tags": [f"t{i}" for i in range(33)]}), "spec.tags"),
    ("cancel not a bool", run({"task": "t", "cancel": "yes"}), "spec.cancel"),
    ("empty concurrencyKey", run({"task": "t", "concurrencyKey": ""}), "spec.concurrencyKey"),
    ("unknown run field", run({"task": "t", "queue": "x"}), "queue"),
    ("queue limit negative", queue({"concurrencyLimit": -1}), "spec.concurrencyLimit"),
    ("queue paused not bool", queue({"paused": "no"}), "spec.paused"),
    *[
        (
            f"webhook {what}",
            {
                "apiVersion": "kubetask.dev/v1alpha1",
                "kind": "Webhook",
                "metadata": {"name": "w"},
                "spec": {"task": "t", "secretRef": {"name": "s", "key": "k"}, **spec},
            },
            field,
        )
        for what, spec, field in list[tuple[str, dict[str, Any], str]](
            [
                ("unknown format", {"format": "gitlab"}, "spec.format"),
                ("hmac-sha256 without header", {"format": "hmac-sha256"}, "spec.header"),
                (
                    "tolerance on github",
                    {"format": "github", "toleranceSeconds": 60},
                    "spec.toleranceSeconds",
                ),
                ("payload mode unknown", {"format": "github", "payload": "raw"}, "spec.payload"),
            ]
        )
    ],
]


def dry_run(
    stack: Stack, ns: str, manifest: dict[str, Any], verb: str = "create"
) -> subprocess.CompletedProcess[str]:
    return stack.kubectl(
        ns, verb, "--dry-run=server", "--validate=strict", "-f", "-", stdin=json.dumps(manifest)
    )


@pytest.mark.parametrize(("manifest", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_manifest_is_rejected_naming_the_field(
    stack: Stack, ns: str, manifest: dict[str, Any], field: str
) -> None:
    out = dry_run(stack, ns, manifest)
    assert out.returncode != 0, f"accepted: {manifest}"
    assert field in out.stderr, out.stderr


def test_good_manifests_are_accepted(stack: Stack, ns: str) -> None:
    for manifest in [
        task({"entrypoint": "pkg.mod:fn", "retry": {"maxAttempts": 100, "factor": 1}}),
        task(
            {
                "source": "x",
                "queue": {"name": "q", "concurrencyLimit": 1, "perKeyConcurrencyLimit": 1},
                "maxDurationSeconds": 5,
                "podTemplate": {"resources": {"limits": {"memory": "1Gi"}}},
            }
        ),
        run({"task": "t", "payload": {"a": [1, {"b": None}]}, "tags": ["x"], "priority": -5}),
        queue({"concurrencyLimit": 3, "paused": True}),
    ]:
        out = dry_run(stack, ns, manifest)
        assert out.returncode == 0, out.stderr


def test_run_task_is_immutable_and_cancel_cannot_be_undone(stack: Stack, ns: str) -> None:
    created = stack.kubectl(
        ns, "create", "-f", "-", stdin=json.dumps(run({"task": "t", "cancel": True}, name="immut"))
    )
    assert created.returncode == 0, created.stderr
    for patch, message in [
        ({"spec": {"task": "other"}}, "spec.task is immutable"),
        ({"spec": {"cancel": False}}, "spec.cancel cannot be set back to false"),
    ]:
        out = stack.kubectl(
            ns, "patch", "runs.kubetask.dev", "immut", "--type=merge", "-p", json.dumps(patch)
        )
        assert out.returncode != 0 and message in out.stderr, out.stderr
