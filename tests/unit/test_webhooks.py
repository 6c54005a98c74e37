"""Signature verification of the three webhook formats, with vectors computed here."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from multidict import CIMultiDict
from pydantic import ValidationError

from kubetask.api.errors import ApiError
from kubetask.api.webhooks import SignatureError, run_payload, verify
from kubetask.spec import WebhookSpec

SECRET = b"It's a Secret to Everybody"
BODY = b'{"action":"opened","number":1}'
NOW = 1_700_000_000.0


def spec(format: str, **extra: Any) -> WebhookSpec:
    return WebhookSpec.model_validate(
        {"task": "t", "format": format, "secretRef": {"name": "s", "key": "k"}, **extra}
    )


def sign(message: bytes, secret: bytes = SECRET) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def check(webhook: WebhookSpec, headers: dict[str, str], body: bytes = BODY) -> None:
    verify(webhook, secret=SECRET, body=body, headers=CIMultiDict(headers), now=lambda: NOW)


def test_github_known_vector_from_its_docs() -> None:
    # docs.github.com "Validating webhook deliveries": this secret and "Hello, World!".
    expected = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert sign(b"Hello, World!") == expected
    verify(
        spec("github"),
        secret=SECRET,
        body=b"Hello, World!",
        headers=CIMultiDict({"X-Hub-Signature-256": f"sha256={expected}"}),
    )


def test_github_good_signature_passes_and_header_name_is_case_insensitive() -> None:
    check(spec("github"), {"x-hub-signature-256": f"sha256={sign(BODY)}"})
    check(spec("github"), {"X-Hub-Signature-256": f"sha256={sign(BODY).upper()}"})


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Hub-Signature-256": ""},
        {"X-Hub-Signature-256": sign(BODY)},  # no sha256= prefix
        {"X-Hub-Signature-256": f"sha256={sign(BODY, b'wrong')}"},
        {"X-Hub-Signature-256": f"sha256={sign(BODY + b' ')}"},  # the body as re-serialised
        {"X-Hub-Signature": f"sha1={hmac.new(SECRET, BODY, hashlib.sha1).hexdigest()}"},
    ],
    ids=["missing", "empty", "no prefix", "other secret", "other body", "sha1 only"],
)
def test_github_bad_or_missing_signature_fails(headers: dict[str, str]) -> None:
    with pytest.raises(SignatureError):
        check(spec("github"), headers)


def test_generic_hmac_reads_the_named_header() -> None:
    webhook = spec("hmac-sha256", header="X-Signature")
    check(webhook, {"X-Signature": sign(BODY)})
    check(webhook, {"x-signature": f"sha256={sign(BODY)}"})
    for headers in ({}, {"X-Signature": sign(b"{}")}, {"X-Hub-Signature-256": f"sha256={sign(BODY)}"}):
        with pytest.raises(SignatureError):
            check(webhook, headers)


def stripe_header(t: int, body: bytes = BODY, secret: bytes = SECRET, extra: str = "") -> str:
    return f"t={t},v1={sign(f'{t}.'.encode() + body, secret)}{extra}"


def test_stripe_good_signature_within_tolerance_passes() -> None:
    for t in (int(NOW), int(NOW) - 300, int(NOW) + 300):
        check(spec("stripe"), {"Stripe-Signature": stripe_header(t)})
    # During a secret roll Stripe sends several v1 (and a v0): any v1 may match.
    t = int(NOW)
    rolled = f"t={t},v1={sign(b'x', b'old')},v1={sign(f'{t}.'.encode() + BODY)},v0=abc"
    check(spec("stripe"), {"Stripe-Signature": rolled})


@pytest.mark.parametrize("offset", [-301, 301, -86_400], ids=["stale", "future", "a day old"])
def test_stripe_timestamp_outside_tolerance_fails(offset: int) -> None:
    with pytest.raises(SignatureError, match="timestamp"):
        check(spec("stripe"), {"Stripe-Signature": stripe_header(int(NOW) + offset)})


def test_stripe_tolerance_is_configurable() -> None:
    check(spec("stripe", toleranceSeconds=3600), {"Stripe-Signature": stripe_header(int(NOW) - 3000)})
    with pytest.raises(SignatureError):
        check(spec("stripe", toleranceSeconds=10), {"Stripe-Signature": stripe_header(int(NOW) - 11)})


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        f"v1={sign(BODY)}",  # no timestamp
        f"t={int(NOW)}",  # no signature
        f"t=soon,v1={sign(b'soon.' + BODY)}",
        stripe_header(int(NOW), secret=b"wrong"),
        stripe_header(int(NOW), body=b"{}"),
        # The timestamp is signed: moving it forward breaks the signature.
        f"t={int(NOW)},v1={sign(f'{int(NOW) - 3600}.'.encode() + BODY)}",
        f"t={int(NOW)},t={int(NOW)},v1={sign(f'{int(NOW)}.'.encode() + BODY)}",
    ],
    ids=[
        "missing",
        "empty",
        "no t",
        "no v1",
        "t not a number",
        "other secret",
        "other body",
        "moved t",
        "two t",
    ],
)
def test_stripe_bad_or_missing_signature_fails(header: str | None) -> None:
    with pytest.raises(SignatureError):
        check(spec("stripe"), {} if header is None else {"Stripe-Signature": header})


def test_format_specific_fields_are_checked() -> None:
    with pytest.raises(ValidationError, match=r"spec\.header"):
        spec("hmac-sha256")
    with pytest.raises(ValidationError, match=r"spec\.header"):
        spec("github", header="X-Sig")
    with pytest.raises(ValidationError, match="toleranceSeconds"):
        spec("github", toleranceSeconds=60)
    with pytest.raises(ValidationError):
        spec("gitlab")
    assert spec("stripe").tolerance == 300


def test_payload_is_the_body_or_wrapped_with_selected_headers() -> None:
    headers = CIMultiDict({"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=x", "Cookie": "c"})
    assert run_payload(spec("github"), BODY, headers) == {"action": "opened", "number": 1}
    wrapped = run_payload(spec("github", payload="wrapped"), b"[1]", headers)
    assert wrapped == {"headers": {"x-github-event": "push"}, "body": [1]}
    for body in (b"not json", b"[1, 2]", b""):
        with pytest.raises(ApiError) as e:
            run_payload(spec("github"), body, headers)
        assert e.value.status == 400 and e.value.code == "invalid_json"
