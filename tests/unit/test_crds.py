"""The committed CRDs are exactly what the pydantic models generate, and the models and
the schemas agree on what is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from kubetask import crdgen
from kubetask.spec import RetrySpec, RunSpec, ScheduleSpec, TaskSpec

CRDS = Path(__file__).resolve().parents[2] / "crds"


@pytest.mark.parametrize("name", sorted(crdgen.all_crds()))
def test_committed_crd_matches_the_models(name: str) -> None:
    committed = (CRDS / name).read_text()
    assert committed == crdgen.render(crdgen.all_crds()[name]), (
        f"crds/{name} is stale: run `kubetask crds generate`"
    )


def _spec_schema(plural: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"{plural[:-1]}.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def test_schema_bounds_match_the_models() -> None:
    retry = _spec_schema("tasks")["properties"]["retry"]["properties"]
    for field, alias in [("max_attempts", "maxAttempts"), ("min_timeout_ms", "minTimeoutMs")]:
        meta = {type(m).__name__: m for m in RetrySpec.model_fields[field].metadata}
        assert retry[alias]["minimum"] == meta["Ge"].ge
        assert retry[alias]["maximum"] == meta["Le"].le
    assert retry["maxAttempts"]["default"] == 3
    assert retry["factor"]["minimum"] == 1
    assert _spec_schema("tasks")["properties"]["maxDurationSeconds"]["minimum"] == 5


def test_every_model_field_is_in_the_schema_and_nothing_else() -> None:
    specs: list[tuple[str, type[BaseModel]]] = [
        ("tasks", TaskSpec),
        ("runs", RunSpec),
        ("schedules", ScheduleSpec),
    ]
    for plural, model in specs:
        props = set(_spec_schema(plural)["properties"])
        aliases = {f.alias or n for n, f in model.model_fields.items()}
        assert props == aliases


def test_cel_rules_are_in_the_schema() -> None:
    task = _spec_schema("tasks")
    rules = [r["rule"] for r in task["x-kubernetes-validations"]]
    assert "has(self.entrypoint) != has(self.source)" in rules
    retry_rules = [r["rule"] for r in task["properties"]["retry"]["x-kubernetes-validations"]]
    assert "self.maxTimeoutMs >= self.minTimeoutMs" in retry_rules


def test_failure_handling_fields_are_in_the_schema_with_their_rules() -> None:
    retry = _spec_schema("tasks")["properties"]["retry"]["properties"]
    names = retry["nonRetryableErrors"]
    assert names["type"] == "array" and names["maxItems"] == 64
    assert names["items"] == {
        "type": "string",
        "minLength": 1,
        "maxLength": 256,
        "pattern": r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$",
    }
    oom = retry["outOfMemory"]
    assert oom["required"] == ["resources"]
    assert oom["properties"]["resources"] == {
        "description": oom["properties"]["resources"]["description"],
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    spec = TaskSpec.model_validate(
        {
            "source": "x",
            "retry": {
                "nonRetryableErrors": ["ValueError", "billing.errors.Declined"],
                "outOfMemory": {"resources": {"limits": {"memory": "1Gi"}}},
            },
        }
    )
    assert spec.retry.non_retryable_errors == ["ValueError", "billing.errors.Declined"]
    with pytest.raises(ValidationError):
        RetrySpec.model_validate({"nonRetryableErrors": ["not a class"]})
    with pytest.raises(ValidationError):
        RetrySpec.model_validate({"outOfMemory": {}})


def test_models_reject_what_the_schema_rejects() -> None:
    with pytest.raises(ValidationError):
        RetrySpec(max_attempts=0)
    with pytest.raises(ValidationError):
        RunSpec.model_validate({"task": "Not_A_Name"})
    with pytest.raises(ValidationError):
        TaskSpec.model_validate({"source": "x", "maxDurationSeconds": 4})
    with pytest.raises(ValidationError):
        RunSpec.model_validate({"task": "a", "unknownField": 1})


@pytest.mark.parametrize("name", sorted(crdgen.all_crds()))
def test_helm_chart_ships_the_same_crds(name: str) -> None:
    chart = CRDS.parent / "helm" / "kubetask" / "crds" / name
    assert chart.read_text() == (CRDS / name).read_text(), f"{chart} is stale: run `make helm-crds`"


def test_schedule_printer_columns_short_name_and_name_rule() -> None:
    crd = yaml.safe_load((CRDS / "schedule.yaml").read_text())
    assert "sched" in crd["spec"]["names"]["shortNames"]
    version = crd["spec"]["versions"][0]
    visible = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert visible == ["Task", "Cron", "Timezone", "Next Run", "Last Run", "Active", "Age"]
    root = version["schema"]["openAPIV3Schema"]
    assert root["x-kubernetes-validations"][0]["rule"] == "self.metadata.name.size() <= 63"
    assert root["properties"]["spec"]["properties"]["timezone"]["default"] == "UTC"
