"""The public API's OpenAPI document: valid OpenAPI 3.1, generated from the models, and
documenting every route the public listener serves (and none of the runner's)."""

from __future__ import annotations

from typing import Any

from openapi_spec_validator import validate
from sqlalchemy.ext.asyncio import async_sessionmaker

from kubetask.api import make_public_app
from kubetask.api.server import OPENAPI, PUBLIC_ENDPOINTS
from kubetask.apimodels import BatchTriggerRequest, TriggerRequest, TriggerResponse
from kubetask.kube import Kube
from kubetask.settings import Settings


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(OPENAPI)
    assert OPENAPI["openapi"].startswith("3.1")
    assert OPENAPI["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": OPENAPI["components"]["securitySchemes"]["bearerAuth"]["description"],
    }


async def test_every_public_route_is_documented_and_no_runner_route() -> None:
    kube = Kube()  # never called: the routes are all this test reads
    app = make_public_app(sessions=async_sessionmaker(), settings=Settings(), kube=kube)
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    await kube.close()
    documented = {(method, path) for path, ops in OPENAPI["paths"].items() for method in ops}
    # The dashboard's pages are HTML, not API (docs/dashboard.md).
    assert {(m, p) for m, p in served if p != "/" and not p.startswith("/dashboard")} == documented
    # It mounts every authenticated /api/v1 endpoint again for its scripts, and nothing else.
    mounted = {(m, p.removeprefix("/dashboard")) for m, p in served if p.startswith("/dashboard/api/")}
    assert mounted == {
        (ep.method.lower(), ep.path)
        for ep in PUBLIC_ENDPOINTS
        if ep.auth and ep.path.startswith("/api/v1/") and ep.path != "/api/v1/openapi.json"
    }
    assert not any(path.startswith("/runner/") for _, path in served)
    for ep in PUBLIC_ENDPOINTS:
        for name in {p.name for p in ep.params if p.where == "path"}:
            assert "{" + name + "}" in ep.path, (ep.path, name)


def test_security_and_permissions_per_operation() -> None:
    for path, ops in OPENAPI["paths"].items():
        for method, op in ops.items():
            if path in ("/healthz", "/metrics"):
                assert op["security"] == [] and "401" not in op["responses"], path
                continue
            if path == "/api/v1/namespaces/{namespace}/webhooks/{name}":  # the signature authenticates
                assert op["security"] == [] and "x-kubetask-permission" not in op
                assert "401" in op["responses"] and "default" in op["responses"]
                continue
            if path == "/api/v1/tokens/{id}/complete":  # the unguessable id in the URL authorizes
                assert op["security"] == [] and "x-kubetask-permission" not in op
                assert {"404", "409", "410"} <= set(op["responses"])
                continue
            assert "security" not in op, (method, path)  # the global bearerAuth applies
            assert "401" in op["responses"] and "default" in op["responses"]
            if path != "/api/v1/openapi.json":
                assert op["x-kubetask-permission"] in op["description"]
                assert "403" in op["responses"]
    trigger = OPENAPI["paths"]["/api/v1/namespaces/{namespace}/tasks/{task}/trigger"]["post"]
    assert trigger["x-kubetask-permission"] == "create runs"
    assert {p["name"] for p in trigger["parameters"]} == {"namespace", "task"}


def test_schemas_are_the_models() -> None:
    schemas: dict[str, Any] = OPENAPI["components"]["schemas"]
    trigger = schemas["TriggerRequest"]
    assert trigger["additionalProperties"] is False
    assert set(trigger["properties"]) == {f.alias for f in TriggerRequest.model_fields.values()}
    assert trigger["properties"]["priority"]["maximum"] == 1000
    assert schemas["BatchTriggerRequest"]["properties"]["items"]["items"] == {
        "$ref": "#/components/schemas/TriggerRequest"
    }
    assert set(schemas["TriggerResponse"]["properties"]) == {
        f.alias or name for name, f in TriggerResponse.model_fields.items()
    }
    assert "BatchTriggerRequest" in schemas and BatchTriggerRequest.__doc__
    for name, schema in schemas.items():
        assert "$defs" not in schema, name
    logs = OPENAPI["paths"]["/api/v1/runs/{id}/logs"]["get"]["responses"]["200"]["content"]
    assert set(logs) == {"application/json", "application/x-ndjson"}
