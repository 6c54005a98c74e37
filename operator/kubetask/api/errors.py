"""Errors and request bodies, shared by every endpoint.

Every error is JSON ``{"error": {"code": ..., "message": ...}}``
(:class:`kubetask.protocol.ErrorResponse`) whose message says what to change: handlers
raise :class:`ApiError`, and the middleware turns it (and aiohttp's own errors, an
unavailable database, bugs) into that body. The middleware also counts and times every
request for ``/metrics``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, NoReturn, TypeVar

from aiohttp import ClientConnectionError, web
from aiohttp.typedefs import Handler
from kubernetes_asyncio.client.rest import ApiException
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from kubetask.apimodels import request_problem
from kubetask.protocol import ErrorDetail, ErrorResponse, problem

log = logging.getLogger("kubetask.api")

REQUESTS = Counter(
    "kubetask_api_requests_total", "HTTP requests served by the kubetask API.", ["method", "route", "status"]
)
LATENCY = Histogram(
    "kubetask_api_request_duration_seconds", "Time to serve one kubetask API request.", ["method", "route"]
)


class ApiError(Exception):
    """An error the client can do something about; becomes the JSON error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def invalid(cls, exc: ValidationError) -> ApiError:
        """A request body that breaks the protocol's rules (kubetask.protocol)."""
        found = problem(exc)
        return cls(found.status, found.code, found.message)


def bad(code: str, message: str) -> NoReturn:
    """Refuse the request as malformed (400)."""
    raise ApiError(400, code, message)


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message))
    return web.json_response(body.model_dump(), status=status, headers=headers)


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    started = time.perf_counter()
    status = 500
    try:
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except ApiError as e:
        status = e.status
        return error_response(e.status, e.code, e.message)
    except web.HTTPException as e:
        status = e.status
        if e.status < 400:
            raise
        if e.status == 404:
            message = f"no endpoint at {request.path}; docs/api.md lists the endpoints"
        elif e.status == 405:
            message = (
                f"{request.method} is not allowed on {request.path}; allowed: {e.headers.get('Allow', '')}"
            )
        else:
            message = e.text or e.reason
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return error_response(e.status, _HTTP_CODES.get(e.status, "http_error"), message, headers)
    except ApiException as e:  # the Kubernetes API server, where a handler did not expect it
        found = kube_error(e, f"serve {request.method} {request.path}")
        status = found.status
        return error_response(found.status, found.code, found.message)
    except ClientConnectionError as e:
        status = 503
        log.warning(
            "kubernetes API server unreachable while serving %s %s: %r", request.method, request.path, e
        )
        return error_response(
            503, "kubernetes_unavailable", "the Kubernetes API server does not answer; retry later"
        )
    except (OperationalError, InterfaceError) as e:
        status = 503
        log.warning("database unavailable while serving %s %s: %s", request.method, request.path, e)
        return error_response(
            503,
            "database_unavailable",
            "the kubetask database is unavailable; retry later (see the operator's log)",
        )
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; the operator's log has the details")
    finally:
        REQUESTS.labels(request.method, route, str(status)).inc()
        LATENCY.labels(request.method, route).observe(time.perf_counter() - started)


def _reject_constant(name: str) -> NoReturn:
    bad(
        "invalid_json",
        f"{name} is not valid JSON (PostgreSQL cannot store it); send a number or null instead",
    )


async def read_json(request: web.Request, limit: int, too_large: str) -> Any:
    """Read the body (at most ``limit`` bytes: 413 with ``too_large`` otherwise) and parse it."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", too_large)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "payload_too_large", too_large)
    if not body:
        bad("invalid_json", "the request body is empty; send a JSON object (Content-Type: application/json)")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        bad("invalid_json", f"the request body is not valid UTF-8 JSON: {e}")


M = TypeVar("M", bound=BaseModel)


async def read_model(request: web.Request, model: type[M], limit: int) -> M:
    """The body as ``model`` (at most ``limit`` bytes); a problem names the field
    (:func:`kubetask.apimodels.request_problem`)."""
    body = await read_json(
        request, limit, f"the request body is larger than {limit} bytes; docs/api.md lists the limits"
    )
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        found = request_problem(exc)
        raise ApiError(found.status, found.code, found.message) from None


def kube_error(e: ApiException, what: str) -> ApiError:
    """An error of the Kubernetes API server while the operator did ``what`` for a caller."""
    try:
        message = str(json.loads(e.body or b"{}").get("message") or e.reason)
    except (TypeError, ValueError, AttributeError):
        message = str(e.reason)
    if e.status == 422:
        return ApiError(400, "invalid_body", f"the Kubernetes API server refused to {what}: {message}")
    if e.status == 403:
        log.error("the operator may not %s: %s", what, message)
        return ApiError(
            500,
            "operator_forbidden",
            f"the operator's ServiceAccount may not {what} (its RBAC is incomplete; the Helm chart grants it)",
        )
    if e.status == 404:
        return ApiError(404, "not_found", f"cannot {what}: {message}")
    if e.status == 409:
        return ApiError(409, "conflict", f"cannot {what}: {message}")
    log.warning("kubernetes API error while trying to %s: %s %s", what, e.status, message)
    return ApiError(
        503,
        "kubernetes_unavailable",
        f"cannot {what}: the Kubernetes API server answered {e.status}; retry later",
    )
