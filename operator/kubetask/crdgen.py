"""Generate the CustomResourceDefinitions in ``crds/`` from the pydantic models in
:mod:`kubetask.spec`, so the schema the API server enforces and the one the operator
parses cannot drift apart (``tests/unit/test_crds.py`` checks the committed files)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetask import spec as s

Schema = dict[str, Any]


def _structural(schema: Schema, defs: Schema) -> Schema:
    """Turn pydantic's JSON schema into a Kubernetes structural schema: inline $refs,
    drop nullability (absent means unset), keep bounds, patterns, defaults and CEL rules."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        merged = {**copy.deepcopy(defs[name]), **{k: v for k, v in schema.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express {schema} structurally")
        rest = {k: v for k, v in schema.items() if k != "anyOf" and k != "default"}
        if schema.get("default") is not None:
            rest["default"] = schema["default"]
        return _structural({**options[0], **rest}, defs)

    out: Schema = {}
    for key in (
        "description",
        "type",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "pattern",
        "maxItems",
        "minItems",
        "enum",
        "default",
        "x-kubernetes-validations",
    ):
        if key in schema:
            out[key] = schema[key]
    if out.get("type") == "integer" and isinstance(out.get("default"), float):
        out["default"] = int(out["default"])
    if out.get("type") == "number":
        out["type"] = "number"
    if "properties" in schema:
        out["type"] = "object"
        out["properties"] = {k: _structural(v, defs) for k, v in schema["properties"].items()}
        if schema.get("required"):
            out["required"] = list(schema["required"])
    elif out.get("type") == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra and extra.get("type") == "string":
            out["additionalProperties"] = {"type": "string"}
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "array":
        items = schema.get("items", {})
        out["items"] = _structural(items, defs) if items else {"type": "object"}
        if out["items"].get("type") == "object" and "properties" not in out["items"]:
            out["items"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return out


def spec_schema(model: type[BaseModel]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    out = _structural(raw, defs)
    out.pop("description", None)
    out["description"] = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    return out


_STATUS: Schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def _crd(
    kind: str,
    plural: str,
    short: list[str],
    spec: Schema,
    columns: list[Schema],
    *,
    rules: list[Schema] | None = None,
) -> Schema:
    root: Schema = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": _STATUS,
        },
    }
    if rules:
        root["x-kubernetes-validations"] = rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{s.GROUP}", "labels": {"app.kubernetes.io/part-of": "kubetask"}},
        "spec": {
            "group": s.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["kubetask"],
            },
            "versions": [
                {
                    "name": s.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        *columns,
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def task_crd() -> Schema:
    spec = spec_schema(s.TaskSpec)
    return _crd(
        "Task",
        "tasks",
        ["ktask", "ktasks"],
        spec,
        [
            {"name": "Image", "type": "string", "jsonPath": ".status.image"},
            {"name": "Queue", "type": "string", "jsonPath": ".status.queue"},
            {"name": "Limit", "type": "integer", "jsonPath": ".status.concurrencyLimit"},
        ],
    )


def run_crd() -> Schema:
    spec = spec_schema(s.RunSpec)
    spec["properties"]["tags"]["items"] = dict(s.TAG_ITEM_SCHEMA)
    spec["x-kubernetes-validations"] = [
        {"rule": "!has(oldSelf.task) || self.task == oldSelf.task", "message": "spec.task is immutable"},
        {
            "rule": "!has(oldSelf.cancel) || !oldSelf.cancel || self.cancel",
            "message": "spec.cancel cannot be set back to false",
        },
    ]
    return _crd(
        "Run",
        "runs",
        ["krun", "kruns"],
        spec,
        [
            {"name": "Task", "type": "string", "jsonPath": ".spec.task"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt"},
        ],
    )


def queue_crd() -> Schema:
    spec = spec_schema(s.QueueSpec)
    return _crd(
        "Queue",
        "queues",
        ["kq", "kqueue"],
        spec,
        [
            {"name": "Limit", "type": "integer", "jsonPath": ".spec.concurrencyLimit"},
            {"name": "Running", "type": "integer", "jsonPath": ".status.running"},
            {"name": "Queued", "type": "integer", "jsonPath": ".status.queued"},
            {"name": "Paused", "type": "boolean", "jsonPath": ".spec.paused", "priority": 1},
        ],
    )


def webhook_crd() -> Schema:
    spec = spec_schema(s.WebhookSpec)
    spec["properties"]["forwardHeaders"]["items"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": 128,
        "pattern": s.HTTP_HEADER,
    }
    return _crd(
        "Webhook",
        "webhooks",
        ["kwh"],
        spec,
        [
            {"name": "Task", "type": "string", "jsonPath": ".spec.task"},
            {"name": "Format", "type": "string", "jsonPath": ".spec.format"},
        ],
    )


def schedule_crd() -> Schema:
    spec = spec_schema(s.ScheduleSpec)
    return _crd(
        "Schedule",
        "schedules",
        ["sched", "ksched"],
        spec,
        [
            {"name": "Task", "type": "string", "jsonPath": ".spec.task"},
            {"name": "Cron", "type": "string", "jsonPath": ".spec.cron"},
            {"name": "Timezone", "type": "string", "jsonPath": ".spec.timezone"},
            {"name": "Next Run", "type": "string", "jsonPath": ".status.nextScheduleTime"},
            {"name": "Last Run", "type": "date", "jsonPath": ".status.lastScheduleTime"},
            {"name": "Active", "type": "integer", "jsonPath": ".status.active"},
            {"name": "Paused", "type": "boolean", "jsonPath": ".spec.paused", "priority": 1},
            {"name": "Last Run Name", "type": "string", "jsonPath": ".status.lastRun", "priority": 1},
        ],
        # The name is the value of the kubetask.dev/schedule label of its runs.
        rules=[
            {
                "rule": "self.metadata.name.size() <= 63",
                "message": "a Schedule's name has at most 63 characters (it is the kubetask.dev/schedule "
                "label of its runs)",
            }
        ],
    )


def all_crds() -> dict[str, Schema]:
    return {
        "task.yaml": task_crd(),
        "run.yaml": run_crd(),
        "queue.yaml": queue_crd(),
        "webhook.yaml": webhook_crd(),
        "schedule.yaml": schedule_crd(),
    }


HEADER = "# Generated by `kubetask crds generate` from operator/kubetask/spec.py. Do not edit.\n"


def render(crd: Schema) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=120)


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, crd in all_crds().items():
        path = directory / name
        path.write_text(render(crd))
        written.append(path)
    return written
