"""Who can run what: allowed images and forbidden tolerations of Tasks."""

from __future__ import annotations

from typing import Any

from kubetask.policy import TaskPolicy, tolerates
from kubetask.spec import TaskSpec

POLICY = TaskPolicy(
    allowed_images=("registry.example.com/team-a/*", "localhost/kubetask/runner:*"),
    forbidden_tolerations=({"key": "node-role.kubernetes.io/control-plane"}, {"key": "gpu", "value": "a100"}),
)


def task(image: str | None = None, tolerations: list[dict[str, Any]] | None = None) -> TaskSpec:
    spec: dict[str, Any] = {"source": "x"}
    if image:
        spec["image"] = image
    if tolerations:
        spec["podTemplate"] = {"tolerations": tolerations}
    return TaskSpec.model_validate(spec)


def test_images_must_match_an_allowed_pattern_and_the_runner_image_is_always_allowed() -> None:
    assert POLICY.check(task()) is None
    assert POLICY.check(task("registry.example.com/team-a/etl:1.2")) is None
    assert POLICY.check(task("localhost/kubetask/runner:0.1.0")) is None
    refusal = POLICY.check(task("docker.io/library/busybox:1"))
    assert refusal is not None and refusal.reason == "ImageNotAllowed"
    assert "docker.io/library/busybox:1" in refusal.message and "team-a/*" in refusal.message
    assert POLICY.check(task("registry.example.com/team-b/etl:1")) is not None
    assert TaskPolicy().check(task("anything:1")) is None  # no list: any image


def test_a_toleration_of_a_forbidden_taint_is_refused() -> None:
    refusal = POLICY.check(
        task(tolerations=[{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}])
    )
    assert refusal is not None and refusal.reason == "TolerationNotAllowed"
    # The wildcard toleration tolerates every taint, the forbidden ones too.
    assert POLICY.check(task(tolerations=[{"operator": "Exists"}])) is not None
    assert POLICY.check(task(tolerations=[{"key": "gpu", "operator": "Equal", "value": "a100"}])) is not None
    assert POLICY.check(task(tolerations=[{"key": "gpu", "operator": "Equal", "value": "t4"}])) is None
    assert POLICY.check(task(tolerations=[{"key": "spot", "operator": "Exists"}])) is None


def test_toleration_matching_follows_kubernetes() -> None:
    taint = {"key": "k", "value": "v", "effect": "NoSchedule"}
    assert tolerates({"key": "k", "operator": "Equal", "value": "v"}, taint)
    assert tolerates({"key": "k", "value": "v", "effect": "NoSchedule"}, taint)  # Equal is the default
    assert not tolerates({"key": "k", "value": "v", "effect": "NoExecute"}, taint)
    assert not tolerates({"key": "k", "value": "w"}, taint)
    assert tolerates({"key": "k", "operator": "Exists"}, taint)
    assert not tolerates({"key": "", "operator": "Equal"}, taint)
    assert tolerates({"operator": "Exists", "effect": "NoSchedule"}, taint)
    assert tolerates(
        {"key": "k", "value": "anything", "effect": "NoExecute"}, {"key": "k"}
    )  # any value, effect
