from __future__ import annotations

from typing import Any

from kubetask import pods
from kubetask.spec import TaskSpec

RUN: dict[str, Any] = {
    "metadata": {"name": "hello-abc", "namespace": "ns1", "uid": "5f0c1a2b-0000-4000-8000-000000000001"}
}
UID = RUN["metadata"]["uid"]


def build(
    task: TaskSpec, attempt: int = 2, *, after_oom: bool = False, image: str | None = None
) -> dict[str, Any]:
    return pods.attempt_pod(
        run=RUN,
        run_id="run_1",
        task_name="hello",
        task_uid="9a8b7c6d-1111-4000-8000-000000000002",
        task=task,
        queue="hello",
        attempt=attempt,
        max_attempts=3,
        api_url="http://api:8080",
        default_image="runner:1",
        image_pull_policy="IfNotPresent",
        image=image,
        after_oom=after_oom,
    )


def test_pod_name_is_deterministic_per_run_uid_and_attempt() -> None:
    assert pods.pod_name("hello-abc", UID, 2) == "hello-abc-5f0c1-2"
    assert build(TaskSpec(source="x"))["metadata"]["name"] == "hello-abc-5f0c1-2"
    long = "r" * 80
    assert pods.pod_name(long, UID, 7) == pods.pod_name(long, UID, 7)
    assert len(pods.pod_name(long, UID, 7)) <= 63
    assert pods.pod_name(long, UID, 7) != pods.pod_name(long + "x", UID, 7)


def test_a_run_created_again_under_the_same_name_gets_other_pod_and_secret_names() -> None:
    again = "77aa0000-0000-4000-8000-000000000003"
    assert pods.pod_name("hello-abc", UID, 1) != pods.pod_name("hello-abc", again, 1)
    assert pods.token_secret_name("hello-abc", UID, 1) != pods.token_secret_name("hello-abc", again, 1)


def test_source_configmap_is_tied_to_the_tasks_uid_and_source() -> None:
    a = pods.source_configmap_name("hello", "aaaaa-1", "print(1)")
    assert a == pods.source_configmap_name("hello", "aaaaa-1", "print(1)")
    assert a != pods.source_configmap_name("hello", "bbbbb-1", "print(1)")  # re-applied Task
    assert a != pods.source_configmap_name("hello", "aaaaa-1", "print(2)")  # edited source


def test_pod_is_owned_by_the_run_and_labelled() -> None:
    pod = build(TaskSpec(source="x"))
    assert pod["metadata"]["ownerReferences"][0]["uid"] == UID
    labels = pod["metadata"]["labels"]
    assert labels[pods.LABEL_RUN_ID] == "run_1"
    assert labels[pods.LABEL_RUN_UID] == UID
    assert labels[pods.LABEL_TASK] == "hello"
    assert labels[pods.LABEL_QUEUE] == "hello"
    assert labels[pods.LABEL_ATTEMPT] == "2"


def test_pod_is_locked_down() -> None:
    spec = build(TaskSpec.model_validate({"source": "x", "maxDurationSeconds": 30}))["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["activeDeadlineSeconds"] == 30
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_token_is_mounted_from_a_secret_not_in_the_pod_spec() -> None:
    pod = build(TaskSpec(source="x"))
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert all("token" not in str(v) or v.endswith("/token") for v in env.values())
    secret_vols = [v for v in pod["spec"]["volumes"] if "secret" in v]
    assert secret_vols[0]["secret"]["secretName"] == pods.token_secret_name("hello-abc", UID, 2)


def test_inline_source_comes_from_a_configmap_and_entrypoint_from_env() -> None:
    inline = build(TaskSpec(source="print(1)"))
    assert any("configMap" in v for v in inline["spec"]["volumes"])
    ep = build(TaskSpec(entrypoint="mod:fn", image="custom:1"))
    env = {e["name"]: e.get("value") for e in ep["spec"]["containers"][0]["env"]}
    assert env["KUBETASK_ENTRYPOINT"] == "mod:fn"
    assert ep["spec"]["containers"][0]["image"] == "custom:1"
    assert inline["spec"]["containers"][0]["image"] == "runner:1"


def test_a_pinned_image_wins_over_the_tasks_tag() -> None:
    digest = "registry.example/app@sha256:" + "ab" * 32
    pod = build(TaskSpec(entrypoint="mod:fn", image="registry.example/app:v1"), image=digest)
    assert pod["spec"]["containers"][0]["image"] == digest


def test_pod_template_is_applied() -> None:
    task = TaskSpec.model_validate(
        {
            "source": "x",
            "podTemplate": {
                "resources": {"limits": {"memory": "64Mi"}},
                "nodeSelector": {"a": "b"},
                "env": [{"name": "X", "value": "1"}],
                "tolerations": [{"operator": "Exists"}],
            },
        }
    )
    pod = build(task)
    c = pod["spec"]["containers"][0]
    assert c["resources"] == {"limits": {"memory": "64Mi"}}
    assert {"name": "X", "value": "1"} in c["env"]
    assert pod["spec"]["nodeSelector"] == {"a": "b"}


OOM_TASK = TaskSpec.model_validate(
    {
        "source": "x",
        "podTemplate": {
            "resources": {"limits": {"memory": "64Mi", "cpu": "1"}, "requests": {"memory": "64Mi"}}
        },
        "retry": {
            "outOfMemory": {"resources": {"limits": {"memory": "512Mi"}, "requests": {"memory": "256Mi"}}}
        },
    }
)


def test_after_an_oom_kill_the_out_of_memory_resources_are_merged_over_the_template() -> None:
    pod = build(OOM_TASK, after_oom=True)
    assert pod["spec"]["containers"][0]["resources"] == {
        "limits": {"memory": "512Mi", "cpu": "1"},  # the CPU limit of the template stays
        "requests": {"memory": "256Mi"},
    }
    assert pod["metadata"]["annotations"] == {pods.ANNOTATION_RESOURCES: "retry.outOfMemory"}
    # The Task itself is not changed by it.
    assert OOM_TASK.pod_template is not None and OOM_TASK.pod_template.resources is not None
    assert OOM_TASK.pod_template.resources["limits"] == {"memory": "64Mi", "cpu": "1"}


def test_without_an_oom_kill_the_template_resources_apply() -> None:
    pod = build(OOM_TASK, after_oom=False)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == "64Mi"
    assert "annotations" not in pod["metadata"]


def test_out_of_memory_resources_apply_without_a_pod_template_too() -> None:
    task = TaskSpec.model_validate(
        {"source": "x", "retry": {"outOfMemory": {"resources": {"limits": {"memory": "1Gi"}}}}}
    )
    assert "resources" not in build(task)["spec"]["containers"][0]
    assert build(task, after_oom=True)["spec"]["containers"][0]["resources"] == {"limits": {"memory": "1Gi"}}


def test_a_task_without_out_of_memory_gets_the_same_pod_after_an_oom_kill() -> None:
    task = TaskSpec.model_validate(
        {"source": "x", "podTemplate": {"resources": {"limits": {"memory": "64Mi"}}}}
    )
    assert build(task, after_oom=True) == build(task)


DEFAULTS: dict[str, Any] = {
    "service_account": "kubetask-runner",
    "default_resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
    "tmp_size_limit": "1Gi",
    "read_only_root_filesystem": True,
}


def build_with_defaults(task: TaskSpec) -> dict[str, Any]:
    return pods.attempt_pod(
        run=RUN,
        run_id="run_1",
        task_name="hello",
        task_uid="9a8b7c6d-1111-4000-8000-000000000002",
        task=task,
        queue="hello",
        attempt=1,
        max_attempts=3,
        api_url="http://api:8080",
        default_image="runner:1",
        image_pull_policy="IfNotPresent",
        **DEFAULTS,
    )


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What the Pod Security "restricted" profile (v1.25+) refuses in ``pod``."""
    spec, out = pod["spec"], []
    psc = spec.get("securityContext") or {}
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        out.append("host namespaces")
    allowed = {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
    out += [f"volume {v['name']}" for v in spec.get("volumes", []) if not set(v) - {"name"} <= allowed]
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{c['name']}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            out.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{c['name']}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c['name']}: seccompProfile")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{c['name']}: capabilities")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{c['name']}: hostPort")
    return out


def test_every_attempt_pod_passes_the_restricted_pod_security_profile() -> None:
    task = TaskSpec.model_validate(
        {
            "entrypoint": "m:f",
            "image": "custom:1",
            "podTemplate": {
                "resources": {"limits": {"cpu": "1"}},
                "env": [{"name": "X", "value": "1"}],
                "envFrom": [{"secretRef": {"name": "s"}}],
                "nodeSelector": {"a": "b"},
                "tolerations": [{"operator": "Exists"}],
            },
        }
    )
    for pod in (
        build(TaskSpec(source="x")),
        build_with_defaults(TaskSpec(source="x")),
        build_with_defaults(task),
    ):
        assert restricted_violations(pod) == []


def test_attempt_pods_run_as_the_runner_service_account_without_a_token() -> None:
    spec = build_with_defaults(TaskSpec(source="x"))["spec"]
    assert spec["serviceAccountName"] == "kubetask-runner"
    assert spec["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in build(TaskSpec(source="x"))["spec"]  # "": the namespace's default
    sa = pods.runner_service_account(name="kubetask-runner", namespace="ns1")
    assert sa["automountServiceAccountToken"] is False
    assert sa["metadata"] == {
        "name": "kubetask-runner",
        "namespace": "ns1",
        "labels": {"app.kubernetes.io/managed-by": "kubetask"},
    }


def test_the_root_filesystem_is_read_only_and_tmp_is_a_bounded_empty_dir() -> None:
    pod = build_with_defaults(TaskSpec(source="x"))
    container = pod["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    tmp = next(v for v in pod["spec"]["volumes"] if v["name"] == "tmp")
    assert tmp == {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_default_resources_apply_unless_the_task_sets_its_own() -> None:
    plain = build_with_defaults(TaskSpec(source="x"))["spec"]["containers"][0]
    assert plain["resources"] == DEFAULTS["default_resources"]
    own = TaskSpec.model_validate(
        {"source": "x", "podTemplate": {"resources": {"limits": {"memory": "2Gi"}}}}
    )
    # The Task's replace the defaults as a whole: no default request above its limit.
    assert build_with_defaults(own)["spec"]["containers"][0]["resources"] == {"limits": {"memory": "2Gi"}}
    assert "resources" not in build(TaskSpec(source="x"))["spec"]["containers"][0]


def test_out_of_memory_resources_are_merged_over_the_default_resources_too() -> None:
    task = TaskSpec.model_validate(
        {"source": "x", "retry": {"outOfMemory": {"resources": {"limits": {"memory": "1Gi"}}}}}
    )
    resources = pods.attempt_resources(task, after_oom=True, default=DEFAULTS["default_resources"])
    assert resources == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}
    assert DEFAULTS["default_resources"]["limits"] == {"memory": "512Mi"}  # not changed by it


def test_the_runner_network_policy_carries_the_spec_it_is_given() -> None:
    spec = {"podSelector": {}, "policyTypes": ["Egress"], "egress": []}
    policy = pods.runner_network_policy(namespace="ns1", spec=spec)
    assert policy["metadata"] == {
        "name": "kubetask-runner",
        "namespace": "ns1",
        "labels": {"app.kubernetes.io/managed-by": "kubetask"},
    }
    assert policy["spec"] == spec and policy["apiVersion"] == "networking.k8s.io/v1"
