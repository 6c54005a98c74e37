"""The chart helm/kubetask rendered by `helm template` for its main combinations of values
(no cluster): what each one creates, and the values it refuses."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.helmchart import CHART, RenderError, helm_binary, render

pytestmark = pytest.mark.skipif(not helm_binary(), reason="helm is not built (make binaries)")

DB = {"database": {"url": "postgresql+psycopg://u:p@db:5432/kubetask"}}


def kinds(objects: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted((o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects)


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, kinds(objects))
    return found[0]


def env_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_the_defaults_are_two_replicas_with_a_leader_a_budget_and_a_database_secret() -> None:
    objects = render(DB)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert one(objects, "Secret", "kubetask-database")["stringData"]["url"] == DB["database"]["url"]
    env = env_of(objects)
    assert env["KUBETASK_LEADER_ELECTION"] == "true"
    assert env["KUBETASK_LEASE_NAME"] == "kubetask-operator"
    assert env["KUBETASK_NAMESPACES"] == "[]"
    assert env["KUBETASK_API_URL"] == "http://kubetask-runner.kubetask-system.svc:8081"
    assert env["KUBETASK_DATABASE_URL"] == {"secretKeyRef": {"name": "kubetask-database", "key": "url"}}
    assert {s["metadata"]["name"] for s in objects if s["kind"] == "Service"} == {
        "kubetask-api",
        "kubetask-runner",
    }


def test_one_replica_has_no_disruption_budget_and_may_run_without_election() -> None:
    objects = render(DB | {"replicaCount": 1, "leaderElection": {"enabled": False}})
    assert one(objects, "Deployment")["spec"]["replicas"] == 1
    assert not [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert env_of(objects)["KUBETASK_LEADER_ELECTION"] == "false"
    # No Lease to elect on: no Role for it.
    assert not [o for o in objects if o["kind"] == "Role" and "leader" in o["metadata"]["name"]]


def test_two_replicas_without_election_are_refused() -> None:
    with pytest.raises(RenderError, match="needs replicaCount 1"):
        render(DB | {"replicaCount": 2, "leaderElection": {"enabled": False}})


def test_a_database_url_or_an_existing_secret_is_required() -> None:
    with pytest.raises(RenderError, match=r"database\.url"):
        render({})
    objects = render({"database": {"existingSecret": "mine", "existingSecretKey": "dsn"}})
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert env_of(objects)["KUBETASK_DATABASE_URL"] == {"secretKeyRef": {"name": "mine", "key": "dsn"}}


def test_lease_timings_must_be_ordered() -> None:
    with pytest.raises(RenderError):
        render(DB | {"leaderElection": {"retryPeriodSeconds": 8}})


def test_a_second_release_gets_names_of_its_own() -> None:
    objects = render(DB | {"fullnameOverride": "other"}, release="other", namespace="other")
    cluster_scoped = [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert cluster_scoped
    assert all(o["metadata"]["name"].startswith("other-") for o in cluster_scoped)
    assert env_of(objects)["KUBETASK_LEASE_NAME"] == "other-operator"
    # Token completion URLs (ctx.create_token) point at this release's public API Service.
    assert env_of(objects)["KUBETASK_PUBLIC_URL"] == "http://other-api.other.svc:8080"
    given = render(DB | {"api": {"publicUrl": "https://tasks.example.com"}})
    assert env_of(given)["KUBETASK_PUBLIC_URL"] == "https://tasks.example.com"


def rules(role: dict[str, Any]) -> dict[str, set[str]]:
    """resource (group/plural) -> verbs, over a role's rules."""
    out: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault(f"{group}/{resource}", set()).update(rule["verbs"])
    return out


NAMESPACED_RIGHTS = {
    "kubetask.dev/runs": {"get", "list", "watch", "create", "patch", "delete"},
    "kubetask.dev/tasks": {"get", "list", "watch"},
    "kubetask.dev/queues": {"get", "list", "watch", "create", "patch"},
    "kubetask.dev/webhooks": {"get"},
    "kubetask.dev/runs/status": {"patch"},
    "kubetask.dev/tasks/status": {"patch"},
    "kubetask.dev/queues/status": {"patch"},
    "kubetask.dev/schedules": {"get", "list", "watch", "patch"},
    "kubetask.dev/schedules/status": {"patch"},
    "/pods": {"get", "list", "watch", "create", "delete"},
    "/secrets": {"get", "list", "create", "update", "delete"},
    "/configmaps": {"create"},
    "/serviceaccounts": {"create"},
    "/events": {"create"},
    "networking.k8s.io/networkpolicies": {"create", "update"},
}
REVIEWS = {
    "/namespaces": {"get"},
    "authentication.k8s.io/tokenreviews": {"create"},
    "authorization.k8s.io/subjectaccessreviews": {"create"},
}


def test_cluster_wide_the_operator_has_one_cluster_role_of_what_its_code_uses() -> None:
    objects = render(DB)
    assert rules(one(objects, "ClusterRole", "kubetask-operator")) == NAMESPACED_RIGHTS | REVIEWS | {
        "apiextensions.k8s.io/customresourcedefinitions": {"get", "list", "watch"}
    }
    binding = one(objects, "ClusterRoleBinding", "kubetask-operator")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetask-operator", "namespace": "kubetask-system"}
    ]
    roles = [o for o in objects if o["kind"] == "Role"]
    assert [r["metadata"]["name"] for r in roles] == ["kubetask-operator-leader-election"]
    assert rules(roles[0]) == {"coordination.k8s.io/leases": {"get", "create", "update"}}


def test_watching_namespaces_the_operator_has_roles_in_them_and_only_reviews_cluster_wide() -> None:
    objects = render(DB | {"watchNamespaces": ["team-a", "team-b"]})
    cluster_role = one(objects, "ClusterRole", "kubetask-operator")
    assert rules(cluster_role) == REVIEWS
    # Namespaces: only the watched ones may be read.
    (ns_rule,) = [r for r in cluster_role["rules"] if r["resources"] == ["namespaces"]]
    assert ns_rule["resourceNames"] == ["team-a", "team-b"]
    for ns in ("team-a", "team-b"):
        (role,) = [o for o in objects if o["kind"] == "Role" and o["metadata"].get("namespace") == ns]
        assert rules(role) == NAMESPACED_RIGHTS
        (binding,) = [
            o for o in objects if o["kind"] == "RoleBinding" and o["metadata"].get("namespace") == ns
        ]
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"][0] == {
            "kind": "ServiceAccount",
            "name": "kubetask-operator",
            "namespace": "kubetask-system",
        }
    assert env_of(objects)["KUBETASK_NAMESPACES"] == '["team-a","team-b"]'


def test_without_a_runner_service_account_or_network_policy_the_operator_creates_none() -> None:
    objects = render(DB | {"runner": {"serviceAccountName": ""}, "networkPolicy": {"enabled": False}})
    granted = rules(one(objects, "ClusterRole", "kubetask-operator"))
    assert "/serviceaccounts" not in granted and "networking.k8s.io/networkpolicies" not in granted
    assert env_of(objects)["KUBETASK_RUNNER_SERVICE_ACCOUNT"] == ""
    assert env_of(objects)["KUBETASK_RUNNER_NETWORK_POLICY"] == "null"
    assert not [o for o in objects if o["kind"] == "NetworkPolicy"]


def test_attempt_pods_may_reach_only_dns_and_the_operators_runner_port() -> None:
    objects = render(DB | {"watchNamespaces": ["team-a"]}, release="kt", namespace="kt-system")
    spec = json.loads(env_of(objects)["KUBETASK_RUNNER_NETWORK_POLICY"])
    assert spec["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/managed-by": "kubetask"},
        "matchExpressions": [{"key": "kubetask.dev/run-id", "operator": "Exists"}],
    }
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["ingress"] == []
    to_operator, dns = spec["egress"]
    assert to_operator == {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kt-system"}},
                "podSelector": {"matchLabels": one(objects, "Deployment")["spec"]["selector"]["matchLabels"]},
            }
        ],
        "ports": [{"protocol": "TCP", "port": 8081}],
    }
    assert dns == {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}


def test_more_egress_for_attempt_pods_and_dns_servers_come_from_values() -> None:
    internet = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}
    dns_pods = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
    values = DB | {"networkPolicy": {"runnerEgress": [internet], "dnsTo": [dns_pods]}}
    spec = json.loads(env_of(render(values))["KUBETASK_RUNNER_NETWORK_POLICY"])
    assert spec["egress"][1]["to"] == [dns_pods]
    assert spec["egress"][2:] == [internet]


def test_the_operators_pods_take_runner_calls_from_attempt_pods_and_api_calls_from_where_values_say() -> None:
    policy = one(render(DB), "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    runner, api = policy["spec"]["ingress"]
    assert runner["ports"] == [{"protocol": "TCP", "port": 8081}]
    assert runner["from"][0]["namespaceSelector"] == {}  # cluster-wide: any namespace's attempt pods
    assert runner["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "kubetask"}
    assert api == {"ports": [{"protocol": "TCP", "port": 8080}]}  # no `from`: anyone
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
    namespaced = render(DB | {"watchNamespaces": ["a"], "networkPolicy": {"apiFrom": [ingress]}})
    runner, api = one(namespaced, "NetworkPolicy")["spec"]["ingress"]
    assert runner["from"][0]["namespaceSelector"] == {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["a"]}]
    }
    assert api["from"] == [ingress]


def test_runner_defaults_reach_the_operator() -> None:
    env = env_of(render(DB))
    assert env["KUBETASK_RUNNER_SERVICE_ACCOUNT"] == "kubetask-runner"
    assert json.loads(env["KUBETASK_RUNNER_RESOURCES"]) == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "512Mi"},
    }
    assert env["KUBETASK_RUNNER_READ_ONLY_ROOT_FILESYSTEM"] == "true"
    assert env["KUBETASK_RUNNER_TMP_SIZE_LIMIT"] == "1Gi"
    env = env_of(
        render(DB | {"runner": {"resources": None, "tmpSizeLimit": "", "readOnlyRootFilesystem": False}})
    )
    assert env["KUBETASK_RUNNER_RESOURCES"] == "null"
    assert env["KUBETASK_RUNNER_TMP_SIZE_LIMIT"] == "null"
    assert env["KUBETASK_RUNNER_READ_ONLY_ROOT_FILESYSTEM"] == "false"


def test_the_task_policy_reaches_the_operator() -> None:
    assert env_of(render(DB))["KUBETASK_ALLOWED_IMAGES"] == "[]"
    assert env_of(render(DB))["KUBETASK_FORBIDDEN_TOLERATIONS"] == "[]"
    policy = {"allowedImages": ["registry.example.com/*"], "forbiddenTolerations": [{"key": "gpu"}]}
    env = env_of(render(DB | {"taskPolicy": policy}))
    assert json.loads(env["KUBETASK_ALLOWED_IMAGES"]) == ["registry.example.com/*"]
    assert json.loads(env["KUBETASK_FORBIDDEN_TOLERATIONS"]) == [{"key": "gpu"}]


#: Values whose content is passed through as is (Kubernetes objects, maps): one row each.
OPAQUE = {
    "postgresql.resources",
    "postgresql.settings",
    "metrics.grafanaDashboard.labels",
    "resources",
    "runner.resources",
    "api.service.annotations",
    "api.runnerService.annotations",
    "serviceAccount.annotations",
    "podAnnotations",
    "podLabels",
    "podSecurityContext",
    "securityContext",
    "nodeSelector",
    "affinity",
    "probes.startup",
    "probes.readiness",
    "probes.liveness",
    "updateStrategy",
}


def value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in OPAQUE:
            out += value_paths(value, f"{path}.")
        else:
            out.append(path)
    return out


def test_the_charts_readme_and_schema_cover_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    missing = [p for p in value_paths(values) if f"| `{p}` |" not in readme]
    assert not missing, f"values without a row in helm/kubetask/README.md: {missing}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path in value_paths(values):
        node = schema
        for part in path.split("."):
            assert part in node.get("properties", {}), f"{path} is not in values.schema.json"
            node = node["properties"][part]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": "two"}, "at '/replicaCount': got string, want integer"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"leaderElecton": {"enabled": False}}, "additional properties 'leaderElecton' not allowed"),
        ({"database": {"url": "mysql://u@h/d"}}, "at '/database/url'"),
        ({"runner": {"tmpSizeLimit": "a lot"}}, "at '/runner/tmpSizeLimit'"),
        ({"taskPolicy": {"forbiddenTolerations": [{"effect": "NoSchedule"}]}}, "missing property 'key'"),
        ({"logLevel": "LOUD"}, "at '/logLevel'"),
        ({"api": {"port": 0}}, "at '/api/port'"),
    ],
)
def test_a_bad_value_is_refused_with_its_path(values: dict[str, Any], message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render(DB | values if "database" not in values else values)


def test_extra_volumes_reach_the_operators_pod() -> None:
    volume = {"name": "db-ca", "secret": {"secretName": "db-ca"}}
    mount = {"name": "db-ca", "mountPath": "/etc/kubetask/db-ca", "readOnly": True}
    pod = one(render(DB | {"extraVolumes": [volume], "extraVolumeMounts": [mount]}), "Deployment")["spec"][
        "template"
    ]["spec"]
    assert pod["volumes"][1:] == [volume]
    assert pod["containers"][0]["volumeMounts"][1:] == [mount]


def test_the_bundled_postgresql_is_a_restricted_statefulset_the_operators_url_points_at() -> None:
    objects = render({"postgresql": {"enabled": True}}, release="kt", namespace="kt-system")
    statefulset = one(objects, "StatefulSet", "kubetask-postgresql")
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 999
    (container,) = pod["containers"]
    assert container["image"] == "docker.io/library/postgres:16-bookworm"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["args"] == ["postgres", "-c", "max_connections=100", "-c", "shared_buffers=128MB"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["POSTGRES_PASSWORD"] == {"secretKeyRef": {"name": "kubetask-database", "key": "password"}}
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert (
        claim["spec"]["resources"]["requests"]["storage"] == "8Gi" and "storageClassName" not in claim["spec"]
    )
    # The operator's URL: the Service, the generated password, the database.
    secret = one(objects, "Secret", "kubetask-database")["stringData"]
    assert len(secret["password"]) == 32
    assert secret["url"] == (
        f"postgresql+psycopg://kubetask:{secret['password']}@kubetask-postgresql.kt-system.svc:5432/kubetask"
    )
    assert env_of(objects)["KUBETASK_DATABASE_URL"] == {
        "secretKeyRef": {"name": "kubetask-database", "key": "url"}
    }
    service = one(objects, "Service", "kubetask-postgresql")
    assert service["spec"]["selector"] == statefulset["spec"]["template"]["metadata"]["labels"]
    # The operator's Services and selectors never match the database's pod.
    for name in ("kubetask-api", "kubetask-runner"):
        selector = one(objects, "Service", name)["spec"]["selector"]
        assert not selector.items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    # Only the operator's pods may reach it.
    policy = one(objects, "NetworkPolicy", "kubetask-postgresql")
    (rule,) = policy["spec"]["ingress"]
    assert (
        rule["from"][0]["podSelector"]["matchLabels"]
        == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    )


def test_the_bundled_postgresql_without_persistence_keeps_its_data_in_an_empty_dir() -> None:
    objects = render({"postgresql": {"enabled": True, "persistence": {"enabled": False}}})
    statefulset = one(objects, "StatefulSet", "kubetask-postgresql")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}


def test_the_bundled_postgresql_and_a_database_url_are_refused_together() -> None:
    with pytest.raises(RenderError, match="choose the bundled PostgreSQL or your own"):
        render(DB | {"postgresql": {"enabled": True}})
