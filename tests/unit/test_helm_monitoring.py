"""The chart's monitoring objects (metrics.*): off by default; when on, the ServiceMonitor
scrapes the public API Service's port, and every metric an alert or a dashboard panel asks
for is one the operator exports (a renamed metric fails here, not silently in Grafana)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from prometheus_client import REGISTRY

# Every module that registers kubetask metrics (the names below come from the registry).
import kubetask.api.errors
import kubetask.api.runner
import kubetask.control.leadership
import kubetask.metrics
from tests.helmchart import helm_binary, render

pytestmark = pytest.mark.skipif(not helm_binary(), reason="helm is not built (make binaries)")

DB = {"database": {"url": "postgresql+psycopg://u:p@db:5432/kubetask"}}
ALL_ON = DB | {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "prometheusRule": {"enabled": True, "stuckQueueMinutes": 7, "failureRatio": 0.4},
        "grafanaDashboard": {"enabled": True},
    }
}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported() -> set[str]:
    """The sample names kubetask's metrics are scraped under."""
    modules = (kubetask.api.errors, kubetask.api.runner, kubetask.control.leadership, kubetask.metrics)
    assert all(m.__name__.startswith("kubetask.") for m in modules)
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("kubetask_"):
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def used(expr: str) -> set[str]:
    return set(re.findall(r"\bkubetask_[a-z_]+\b", expr))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_monitoring_objects_are_off_by_default() -> None:
    objects = render(DB)
    assert not of_kind(objects, "ServiceMonitor") and not of_kind(objects, "PrometheusRule")
    assert not [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]


def test_the_service_monitor_scrapes_the_public_api_service_and_keeps_kubetasks_labels() -> None:
    objects = render(ALL_ON)
    (monitor,) = of_kind(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [
        s
        for s in of_kind(objects, "Service")
        if selector.items() <= s["metadata"]["labels"].items()
        and any(p["name"] == monitor["spec"]["endpoints"][0]["port"] for p in s["spec"]["ports"])
    ]
    assert [s["metadata"]["name"] for s in scraped] == ["kubetask-api"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["honorLabels"] is True


def test_every_alert_asks_for_exported_metrics_of_this_release_with_the_values_thresholds() -> None:
    (rule,) = of_kind(render(ALL_ON), "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {
        "KubetaskNoLeader",
        "KubetaskQueueStuck",
        "KubetaskTaskFailureRateHigh",
        "KubetaskReconcileErrors",
        "KubetaskPodCreateErrors",
        "KubetaskDatabaseSlow",
    }
    names = exported()
    for name, alert in alerts.items():
        metrics = used(alert["expr"])
        assert metrics and metrics <= names, (name, metrics - names)
        # Only this release's scrape job: two releases in a cluster do not mix.
        assert alert["expr"].count('job="kubetask-api"') == alert["expr"].count("kubetask_"), name
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert alert["annotations"]["summary"] and alert["for"]
    assert alerts["KubetaskQueueStuck"]["for"] == "7m"
    assert "> 0.4" in alerts["KubetaskTaskFailureRateHigh"]["expr"]


def test_the_grafana_dashboard_is_valid_json_asking_for_exported_metrics() -> None:
    objects = render(ALL_ON)
    (config_map,) = [
        o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "kubetask-operator-dashboard"
    ]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["kubetask.json"])
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    names = exported()
    for expr in exprs:
        assert used(expr) and used(expr) <= names, (expr, used(expr) - names)
    # Every family the operator exports is on the dashboard or in an alert.
    (rule,) = of_kind(objects, "PrometheusRule")
    shown = set().union(
        *(used(e) for e in exprs), *(used(r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"])
    )
    families = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in shown}
    missing = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in names} - families
    assert not missing, missing
