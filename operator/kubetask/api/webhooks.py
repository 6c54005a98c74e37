"""Signed webhooks: ``POST /api/v1/namespaces/{namespace}/webhooks/{name}``.

A :class:`kubetask.spec.WebhookSpec` resource names a Task, a signature format and a Secret
key holding the shared secret. The signature is the caller's authentication (GitHub and
Stripe cannot send a Kubernetes token), so this endpoint takes no bearer token: it verifies
an HMAC-SHA256 over the **raw** body with :func:`hmac.compare_digest` and, for formats that
sign a timestamp (Stripe), refuses timestamps outside the tolerance (replay protection).
Nothing is created before the signature holds. Then it triggers exactly as
``POST .../tasks/{task}/trigger`` does (:meth:`kubetask.api.actions.Runs.trigger`), as the
user ``webhook:<namespace>/<name>``.

The Webhook and its Secret are read from the API server at most every
:data:`CACHE_SECONDS` (a rotated secret is in force within that time).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from kubernetes_asyncio.client.rest import ApiException
from pydantic import ValidationError

from kubetask.api.actions import RUNS, Runs
from kubetask.api.auth import TtlCache, User
from kubetask.api.errors import ApiError, bad, kube_error
from kubetask.api.runs import dns_label, reply
from kubetask.apimodels import TriggerRequest, request_problem
from kubetask.spec import WebhookSpec

log = logging.getLogger("kubetask.api.webhooks")

#: Largest body a webhook accepts (GitHub caps its payloads at 25 MB, but a run's payload
#: is at most 256 KiB anyway).
MAX_WEBHOOK_BODY_BYTES = 1024 * 1024
#: How long a Webhook resource and its Secret are reused before they are read again.
CACHE_SECONDS = 30.0
#: How long "no such Webhook" is remembered (a flood of unknown names stays cheap).
MISSING_CACHE_SECONDS = 5.0

GITHUB_HEADER = "X-Hub-Signature-256"
STRIPE_HEADER = "Stripe-Signature"


class SignatureError(Exception):
    """The request is not signed by the holder of the secret (or the signature is stale)."""


# ---- verification (pure) --------------------------------------------------------------------


def _hex_hmac(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _same(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.strip().lower().encode("utf-8", "replace"))


def verify(
    spec: WebhookSpec,
    *,
    secret: bytes,
    body: bytes,
    headers: Mapping[str, str],
    now: Callable[[], float] = time.time,
) -> None:
    """Raise :class:`SignatureError` unless ``headers`` sign ``body`` with ``secret`` in the
    format of ``spec`` (``headers`` must look names up case-insensitively, as aiohttp's do)."""
    if spec.format == "github":
        given = headers.get(GITHUB_HEADER)
        if not given:
            raise SignatureError(f"the {GITHUB_HEADER} header is missing")
        if not given.startswith("sha256="):
            raise SignatureError(f"the {GITHUB_HEADER} header is not sha256=<hex>")
        if not _same(_hex_hmac(secret, body), given.removeprefix("sha256=")):
            raise SignatureError(f"the {GITHUB_HEADER} signature does not match the body")
    elif spec.format == "hmac-sha256":
        assert spec.header is not None  # the model requires it for this format
        given = headers.get(spec.header)
        if not given:
            raise SignatureError(f"the {spec.header} header is missing")
        if not _same(_hex_hmac(secret, body), given.removeprefix("sha256=")):
            raise SignatureError(f"the {spec.header} signature does not match the body")
    else:
        _verify_stripe(spec, secret=secret, body=body, given=headers.get(STRIPE_HEADER), now=now())


def _verify_stripe(spec: WebhookSpec, *, secret: bytes, body: bytes, given: str | None, now: float) -> None:
    # Stripe-Signature: t=1492774577,v1=5257a869...,v1=<during a secret roll>,v0=...
    if not given:
        raise SignatureError(f"the {STRIPE_HEADER} header is missing")
    stamps: list[str] = []
    signatures: list[str] = []
    for part in given.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            stamps.append(value)
        elif key == "v1":
            signatures.append(value)
    if len(stamps) != 1 or not stamps[0].isdigit() or not signatures:
        raise SignatureError(f"the {STRIPE_HEADER} header is not t=<unix time>,v1=<hex>")
    stamp = stamps[0]
    expected = _hex_hmac(secret, stamp.encode() + b"." + body)
    # Every v1 is compared (no early exit), so timing does not tell which one matched.
    matched = [_same(expected, s) for s in signatures]
    if not any(matched):
        raise SignatureError(f"no v1 signature of the {STRIPE_HEADER} header matches the body")
    # Checked after the signature, which covers the timestamp: only a stale (or future)
    # *genuine* request is told that its time is the problem.
    if abs(now - int(stamp)) > spec.tolerance:
        raise SignatureError(
            f"the {STRIPE_HEADER} timestamp is more than {spec.tolerance} s from the server's clock "
            "(a replay, or a clock out of sync)"
        )


def run_payload(spec: WebhookSpec, body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    """The run's payload from a verified request; 400 when the body is not what it needs."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as e:
        bad(
            "invalid_json",
            f"the webhook body is not valid UTF-8 JSON: {e}; send Content-Type: application/json",
        )
    if spec.payload == "wrapped":
        selected = {name.lower(): headers[name] for name in spec.forward_headers if name in headers}
        return {"headers": selected, "body": parsed}
    if not isinstance(parsed, dict):
        bad(
            "invalid_json",
            f"the webhook body is a JSON {type(parsed).__name__}, and a run's payload is an object; "
            "set spec.payload: wrapped on the Webhook to take any JSON",
        )
    return parsed


# ---- the resources, cached ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """A Webhook (None: there is none) as read at ``resource_version``."""

    spec: WebhookSpec | None
    resource_version: str = ""


class Webhooks:
    """Reads Webhook resources and their Secrets, each reused for :data:`CACHE_SECONDS`."""

    def __init__(self, runs: Runs, *, max_entries: int = 1024) -> None:
        self.runs = runs
        self._hooks: TtlCache[tuple[str, str], _Found] = TtlCache(max_entries=max_entries)
        self._secrets: TtlCache[tuple[str, str, str], bytes] = TtlCache(max_entries=max_entries)

    async def spec(self, namespace: str, name: str) -> WebhookSpec:
        """The Webhook's spec, or 404 (409 when it does not parse)."""

        async def read() -> _Found:
            try:
                body = await self.runs.kube.get_object("webhooks", namespace, name)
            except ApiException as e:
                raise kube_error(e, f"read Webhook {namespace}/{name}") from None
            if body is None:
                return _Found(None)
            try:
                spec = WebhookSpec.model_validate(body.get("spec") or {})
            except ValidationError as e:
                log.warning("Webhook %s/%s has an invalid spec: %s", namespace, name, e)
                raise ApiError(
                    409, "webhook_invalid", f"Webhook {namespace}/{name} has an invalid spec"
                ) from None
            return _Found(spec, body["metadata"].get("resourceVersion", ""))

        found = await self._hooks.get_or_compute(
            (namespace, name), read, lambda f: CACHE_SECONDS if f.spec else MISSING_CACHE_SECONDS
        )
        if found.spec is None:
            raise ApiError(404, "webhook_not_found", f"no Webhook {name!r} in namespace {namespace!r}")
        return found.spec

    async def secret(self, namespace: str, webhook: str, spec: WebhookSpec) -> bytes:
        """The shared secret; 500 (without naming the Secret to an unauthenticated caller)
        when it cannot be read."""
        ref = spec.secret_ref

        async def read() -> bytes:
            try:
                obj = await self.runs.kube.core.read_namespaced_secret(ref.name, namespace)
            except ApiException as e:
                if e.status != 404:
                    raise kube_error(e, f"read the Secret of Webhook {namespace}/{webhook}") from None
                obj = None
            data = (obj.data or {}) if obj is not None else {}
            value = data.get(ref.key)
            try:
                secret = base64.b64decode(value, validate=True) if value else b""
            except (binascii.Error, ValueError):
                secret = b""
            if not secret:
                log.error(
                    "Webhook %s/%s: Secret %s has no key %r (or it is empty)",
                    namespace,
                    webhook,
                    ref.name,
                    ref.key,
                )
                raise ApiError(
                    500,
                    "webhook_misconfigured",
                    f"the secret of Webhook {namespace}/{webhook} cannot be read; the operator's log says why",
                )
            return secret

        return await self._secrets.get_or_compute(
            (namespace, ref.name, ref.key), read, lambda _: CACHE_SECONDS
        )


WEBHOOKS: web.AppKey[Webhooks] = web.AppKey("webhooks", Webhooks)


async def _raw_body(request: web.Request) -> bytes:
    too_large = ApiError(
        413, "payload_too_large", f"the webhook body is larger than {MAX_WEBHOOK_BODY_BYTES} bytes"
    )
    if request.content_length is not None and request.content_length > MAX_WEBHOOK_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > MAX_WEBHOOK_BODY_BYTES:
            raise too_large
    return bytes(body)


async def receive(request: web.Request) -> web.Response:
    """``POST /api/v1/namespaces/{namespace}/webhooks/{name}``: no bearer token; the request
    must be signed with the Webhook's secret (docs/webhooks.md). A bad, missing or stale
    signature answers 401 ``invalid_signature`` and creates nothing; otherwise one run of the
    Webhook's task, as a trigger would (202, or the run holding the idempotency key)."""
    ns = dns_label("namespace", request.match_info["namespace"])
    name = dns_label("Webhook", request.match_info["name"])
    hooks = request.app[WEBHOOKS]
    spec = await hooks.spec(ns, name)
    body = await _raw_body(request)
    secret = await hooks.secret(ns, name, spec)
    try:
        verify(spec, secret=secret, body=body, headers=request.headers)
    except SignatureError as e:
        raise ApiError(401, "invalid_signature", str(e)) from None
    key = request.headers.get(spec.idempotency_key_header) if spec.idempotency_key_header else None
    try:
        trigger = TriggerRequest.model_validate(
            {"payload": run_payload(spec, body, request.headers), "idempotencyKey": key or None}
        )
    except ValidationError as exc:
        found = request_problem(exc)
        raise ApiError(found.status, found.code, found.message) from None
    runs = request.app[RUNS]
    info = await runs.task(ns, spec.task)
    answer = await runs.trigger(info, trigger, User(username=f"webhook:{ns}/{name}"))
    return reply(answer, 202)
