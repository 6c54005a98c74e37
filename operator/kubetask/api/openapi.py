"""The OpenAPI 3.1 document of the public API, generated from the endpoint table
(:data:`kubetask.api.server.PUBLIC_ENDPOINTS`) and the models of :mod:`kubetask.apimodels`
(pydantic's JSON Schemas, which OpenAPI 3.1 takes as they are). The routes are registered
from the same table, so a route cannot go undocumented."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from kubetask.apimodels import ErrorResponse

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Param:
    """A path or query parameter."""

    name: str
    where: Literal["path", "query"]
    schema: Mapping[str, Any]
    description: str = ""
    repeatable: bool = False


@dataclass(frozen=True)
class Body:
    """A response (or request) body: a model, NDJSON lines of some models, or plain text."""

    models: Sequence[type[BaseModel]] = ()
    media: str = "application/json"
    description: str = ""


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    permission: str | None
    """The RBAC verb and resource it needs (``create runs``), None when only a valid token,
    or (``auth=False``) nothing."""
    request: type[BaseModel] | None = None
    responses: Mapping[int, Body | tuple[Body, ...]] = field(default_factory=dict)
    """By status; a tuple for one status with several media types."""
    params: Sequence[Param] = ()
    auth: bool = True
    raw_request: Body | None = None
    """A request body the handler reads as bytes (a signed webhook): documented by media
    type, with any JSON value allowed."""
    request_optional: bool = False
    """The ``request`` body may be left out."""


def _schema_ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": REF.format(model=model.__name__)}


def _content(body: Body) -> dict[str, Any]:
    if body.media.startswith("text/"):
        return {body.media: {"schema": {"type": "string"}}}
    refs = [_schema_ref(m) for m in body.models]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {body.media: {"schema": schema}}


def document(endpoints: Sequence[Endpoint], *, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``endpoints``."""
    models: set[type[BaseModel]] = {ErrorResponse}
    for ep in endpoints:
        if ep.request is not None:
            models.add(ep.request)
        for bodies in ep.responses.values():
            for body in bodies if isinstance(bodies, tuple) else (bodies,):
                models.update(body.models)
    ordered = sorted(models, key=lambda m: m.__name__)
    # One mode for all: requests forbid unknown fields, responses ignore them; the
    # serialization schema of a response is what the server sends.
    _, defs = models_json_schema([(m, "serialization") for m in ordered], ref_template=REF, by_alias=True)
    schemas = dict(defs.get("$defs", {}))
    requests = {ep.request for ep in endpoints if ep.request is not None}
    for model in requests:  # a request's schema is its validation schema (what is accepted)
        schemas[model.__name__] = model.model_json_schema(ref_template=REF, by_alias=True, mode="validation")
        schemas.update(schemas[model.__name__].pop("$defs", {}))

    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        op: dict[str, Any] = {
            "operationId": ep.handler.__name__,
            "summary": ep.summary,
            "description": (ep.handler.__doc__ or "").strip(),
            "responses": {},
        }
        if ep.permission:
            op["x-kubetask-permission"] = ep.permission
            op["description"] += f"\n\nNeeds `{ep.permission}` (group kubetask.dev) in the namespace."
        if not ep.auth:
            op["security"] = []
        params = []
        for p in ep.params:
            param: dict[str, Any] = {"name": p.name, "in": p.where, "required": p.where == "path"}
            param["schema"] = {"type": "array", "items": dict(p.schema)} if p.repeatable else dict(p.schema)
            if p.repeatable:
                param["style"], param["explode"] = "form", True
            if p.description:
                param["description"] = p.description
            params.append(param)
        if params:
            op["parameters"] = params
        if ep.request is not None:
            op["requestBody"] = {
                "required": not ep.request_optional,
                "content": {"application/json": {"schema": _schema_ref(ep.request)}},
            }
        if ep.raw_request is not None:
            op["requestBody"] = {
                "required": True,
                "description": ep.raw_request.description,
                "content": {ep.raw_request.media: {"schema": {}}},
            }
        for status, bodies in ep.responses.items():
            alternatives = bodies if isinstance(bodies, tuple) else (bodies,)
            response: dict[str, Any] = {
                "description": "; ".join(b.description for b in alternatives if b.description) or str(status)
            }
            for body in alternatives:
                if body.models or body.media.startswith("text/"):
                    response.setdefault("content", {}).update(_content(body))
            op["responses"][str(status)] = response
        error = {
            "description": "an error (docs/api.md lists the codes)",
            "content": _content(Body((ErrorResponse,))),
        }
        if ep.auth:
            op["responses"]["401"] = error | {"description": "no token, or one the cluster does not accept"}
        if ep.permission:
            op["responses"]["403"] = error | {"description": "the caller lacks the permission (named)"}
        op["responses"]["default"] = error
        paths.setdefault(ep.path, {})[ep.method.lower()] = op

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kubetask public API",
            "version": version,
            "description": "Trigger, read, cancel and replay runs; list tasks and queues. Authenticate "
            "with a Kubernetes bearer token; RBAC on kubetask.dev resources decides what each "
            "caller may do. docs/api.md has the details.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token the cluster accepts (TokenReview), e.g. `kubectl create token SA`.",
                }
            },
        },
        "security": [{"bearerAuth": []}],
    }
