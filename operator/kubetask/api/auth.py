"""Who is calling the public API, and what they may do: Kubernetes' own answers.

- **Authentication**: the bearer token is checked with a TokenReview
  (``authentication.k8s.io/v1``), so every token the cluster accepts works here:
  ServiceAccount tokens (``kubectl create token``, projected, or a long-lived token
  Secret), OIDC tokens, whatever the API server is configured to trust.
- **Authorization**: each endpoint asks a SubjectAccessReview
  (``authorization.k8s.io/v1``) for the verb on the ``kubetask.dev`` resource kubectl would
  need for the same thing (docs/api.md has the table), so RBAC is the one answer to "who
  may trigger, read or cancel runs in a namespace".

Both answers are cached, bounded in size: a TokenReview by the token's SHA-256 for
:attr:`Settings.token_review_ttl_seconds` (a rejected token for at most 10 s), a
SubjectAccessReview for :attr:`Settings.access_review_ttl_seconds`. A revoked token or a
removed RoleBinding therefore takes effect within those times. Concurrent identical
reviews share one request.

An attempt's runner token is refused outright (it is for ``/runner/v1`` only, on its own
listener): it is recognised by its digest before any review is asked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiohttp import web
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from kubetask.api.errors import ApiError
from kubetask.protocol import hash_token
from kubetask.spec import GROUP

log = logging.getLogger("kubetask.api.auth")

MAX_TOKEN_CHARS = 16 * 1024
#: How long a rejected token is remembered (a token created a moment ago may be retried).
REJECTED_TOKEN_TTL_SECONDS = 10.0
#: Most SubjectAccessReviews one request sends at once (listing across namespaces).
REVIEW_CONCURRENCY = 16

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A bounded map whose entries expire; the least recently used goes first when full.
    Lookups of a key already being computed wait for that computation (one request to
    the API server for N concurrent callers)."""

    def __init__(self, *, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._pending: dict[K, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, value = found
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V, ttl: float) -> None:
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def get_or_compute(
        self, key: K, compute: Callable[[], Awaitable[V]], ttl: Callable[[V], float]
    ) -> V:
        cached = self.get(key)
        if cached is not None:
            return cached
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await compute()
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            self._pending.pop(key, None)
        future.set_result(value)
        self.put(key, value, ttl(value))
        return value


@dataclass(frozen=True)
class User:
    """An authenticated caller, as the TokenReview named it."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def key(self) -> tuple[Any, ...]:
        return (self.username, self.uid, self.groups, tuple(sorted(self.extra.items())))


@dataclass(frozen=True)
class _Rejected:
    message: str


@dataclass(frozen=True)
class Permission:
    """A verb on a kubetask.dev resource in a namespace ("" is every namespace)."""

    verb: str
    resource: str
    namespace: str = ""

    def describe(self) -> str:
        where = f"in namespace {self.namespace}" if self.namespace else "cluster-wide"
        return f"{self.verb} {self.resource}.{GROUP} {where}"


class Reviewer:
    """TokenReview and SubjectAccessReview through ``api_client``, cached."""

    def __init__(
        self,
        api_client: Any,
        *,
        token_ttl: float = 60.0,
        access_ttl: float = 10.0,
        max_entries: int = 10_000,
        is_attempt_token: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self._authn: Any = client.AuthenticationV1Api(api_client)
        self._authz: Any = client.AuthorizationV1Api(api_client)
        self._token_ttl = token_ttl
        self._access_ttl = access_ttl
        self._tokens: TtlCache[str, User | _Rejected] = TtlCache(max_entries=max_entries)
        self._access: TtlCache[tuple[Any, ...], bool] = TtlCache(max_entries=max_entries)
        self._is_attempt_token = is_attempt_token

    async def authenticate(self, token: str) -> User:
        """The token's user, or ``401 invalid_token``."""
        digest = hash_token(token)

        async def review() -> User | _Rejected:
            if self._is_attempt_token is not None and await self._is_attempt_token(digest):
                return _Rejected(
                    "this is an attempt's runner token: it is valid on the runner listener "
                    "(/runner/v1) only; the public API needs a Kubernetes token (docs/api.md)"
                )
            return await self._token_review(token)

        found = await self._tokens.get_or_compute(
            digest,
            review,
            lambda v: (
                self._token_ttl if isinstance(v, User) else min(self._token_ttl, REJECTED_TOKEN_TTL_SECONDS)
            ),
        )
        if isinstance(found, _Rejected):
            raise ApiError(401, "invalid_token", found.message)
        return found

    async def _token_review(self, token: str) -> User | _Rejected:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        try:
            result = await self._authn.create_token_review(body)
        except ApiException as e:
            raise _unavailable("TokenReview", e) from None
        status = result.status
        if status is None or not status.authenticated or status.user is None:
            why = (status.error if status is not None else None) or "the cluster does not accept it"
            return _Rejected(f"the token is not valid: {why}")
        user = status.user
        return User(
            username=user.username or "",
            uid=user.uid or "",
            groups=tuple(user.groups or ()),
            extra={k: tuple(v or ()) for k, v in (user.extra or {}).items()},
        )

    async def allowed(self, user: User, permission: Permission) -> bool:
        """Whether RBAC (or whichever authorizer the cluster runs) allows it."""
        key = (*user.key(), permission.verb, permission.resource, permission.namespace)
        return await self._access.get_or_compute(
            key, lambda: self._access_review(user, permission), lambda _: self._access_ttl
        )

    async def _access_review(self, user: User, permission: Permission) -> bool:
        spec: dict[str, Any] = {
            "user": user.username,
            "groups": list(user.groups),
            "resourceAttributes": {
                "group": GROUP,
                "resource": permission.resource,
                "verb": permission.verb,
                "namespace": permission.namespace,
            },
        }
        if user.uid:
            spec["uid"] = user.uid
        if user.extra:
            spec["extra"] = {k: list(v) for k, v in user.extra.items()}
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        try:
            result = await self._authz.create_subject_access_review(body)
        except ApiException as e:
            raise _unavailable("SubjectAccessReview", e) from None
        return bool(result.status is not None and result.status.allowed)

    async def allowed_namespaces(
        self, user: User, verb: str, resource: str, namespaces: Iterable[str]
    ) -> set[str]:
        """Those of ``namespaces`` in which ``user`` may ``verb`` ``resource``."""
        gate = asyncio.Semaphore(REVIEW_CONCURRENCY)

        async def check(ns: str) -> tuple[str, bool]:
            async with gate:
                return ns, await self.allowed(user, Permission(verb, resource, ns))

        results = await asyncio.gather(*(check(ns) for ns in sorted(set(namespaces))))
        return {ns for ns, ok in results if ok}


def _unavailable(what: str, e: ApiException) -> ApiError:
    if e.status == 403:
        log.error(
            "the operator may not create %ss: grant it what system:auth-delegator holds (%s)", what, e.reason
        )
        return ApiError(
            500,
            "auth_misconfigured",
            f"the operator may not create {what}s; its ServiceAccount needs `create` on tokenreviews and "
            "subjectaccessreviews (the ClusterRole system:auth-delegator; the Helm chart grants them)",
        )
    log.warning("%s failed: %s %s", what, e.status, e.reason)
    return ApiError(503, "auth_unavailable", f"cannot ask the Kubernetes API server ({what}); retry later")


# ---- request helpers ---------------------------------------------------------------------

REVIEWER: web.AppKey[Reviewer] = web.AppKey("reviewer", Reviewer)
_USER: web.RequestKey[User] = web.RequestKey("user", User)


#: The token's other header: the Kubernetes API server's service proxy authenticates a
#: request and then removes its ``Authorization`` (it never forwards credentials), so
#: clients that come that way (the CLI, ``kubetask.Client``) send the token here as well.
TOKEN_HEADER = "X-Kubetask-Token"


def bearer_token(request: web.Request) -> str:
    """The token of ``Authorization: Bearer``, else of ``X-Kubetask-Token``."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        token = request.headers.get(TOKEN_HEADER, "").strip()
    if not token:
        raise ApiError(
            401,
            "missing_token",
            "send a Kubernetes token as `Authorization: Bearer <token>` (or `X-Kubetask-Token: <token>`; "
            "e.g. `kubectl create token <serviceaccount>`; docs/api.md, Authentication)",
        )
    if len(token) > MAX_TOKEN_CHARS:
        raise ApiError(401, "invalid_token", "the token is not valid (too long)")
    return token


async def authenticate(request: web.Request) -> User:
    """The caller (``401`` without a token the cluster accepts); once per request."""
    user = request.get(_USER)
    if user is None:
        user = await request.app[REVIEWER].authenticate(bearer_token(request))
        request[_USER] = user
    return user


async def authenticate_token(request: web.Request, token: str) -> User:
    """The caller of ``token`` (``401`` unless the cluster accepts it), remembered for the
    request as :func:`authenticate` would: for credentials that come another way than the
    headers (the dashboard's cookie)."""
    if len(token) > MAX_TOKEN_CHARS:
        raise ApiError(401, "invalid_token", "the token is not valid (too long)")
    user = await request.app[REVIEWER].authenticate(token)
    request[_USER] = user
    return user


async def authorize(request: web.Request, verb: str, resource: str, namespace: str = "") -> User:
    """The caller, if they may ``verb`` ``resource`` in ``namespace``; else ``403`` naming
    the missing permission."""
    user = await authenticate(request)
    permission = Permission(verb, resource, namespace)
    if not await request.app[REVIEWER].allowed(user, permission):
        raise ApiError(403, "forbidden", f"user {user.username} may not {permission.describe()}")
    return user
