"""Where the kubetask API is and which token to send it: what :class:`kubetask.Client` and
the CLI use when they are not told. docs/client.md describes the order:

1. explicit arguments (``api_url``, ``token``);
2. ``KUBETASK_API_URL`` and ``KUBETASK_TOKEN`` (either may be given alone; the other is
   discovered as below);
3. inside a pod: the projected ServiceAccount token, and the API's Service by its DNS name;
4. the current kubeconfig context: its bearer token (``token``, ``tokenFile``, an ``exec``
   plugin) as is; for a client-certificate user (the local cluster's admin, kind's) a
   token of the ServiceAccount ``KUBETASK_SERVICE_ACCOUNT`` (default
   ``kubetask-system/kubetask-admin``) minted with the TokenRequest API (1 h, cached in
   memory). The API is reached through the Kubernetes API server's service proxy, with the
   kubeconfig's own TLS and credentials.

The API server authenticates a proxied request and then removes its ``Authorization``
header (it never forwards the caller's credentials), so the kubetask token also travels in
``X-Kubetask-Token``, which the API accepts as well.

Only the standard library, httpx and PyYAML: this runs wherever the SDK does.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml

__all__ = [
    "DEFAULT_API_SERVICE",
    "DEFAULT_SERVICE_ACCOUNT",
    "TOKEN_HEADER",
    "Connection",
    "CredentialsError",
    "KubeConfig",
    "discover",
    "load_kubeconfig",
]

TOKEN_HEADER = "X-Kubetask-Token"
"""The header that carries the kubetask token through the API server's service proxy."""
DEFAULT_SERVICE_ACCOUNT = "kubetask-system/kubetask-admin"
"""The ServiceAccount whose tokens a client-certificate kubeconfig mints (the Helm chart's
``adminServiceAccount``)."""
DEFAULT_API_SERVICE = "kubetask-system/kubetask-api:8080"
"""The public API's Service, ``namespace/name:port``."""
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MINTED_TOKEN_SECONDS = 3600
#: A minted token is replaced this long before it expires.
MINT_MARGIN_SECONDS = 300


class CredentialsError(Exception):
    """No way to reach the API or no token: the message says what to set."""


# ---- tokens -----------------------------------------------------------------------------


class TokenSource:
    """Gives the token to send; ``get`` may do I/O (read a file, run a plugin, ask the API
    server), ``cached`` never does."""

    description = "a token"

    def cached(self) -> str | None:
        return None

    def get(self) -> str:
        raise NotImplementedError

    def invalidate(self) -> None:
        """The API refused the token: fetch a fresh one next time (when that can help)."""


@dataclass
class StaticToken(TokenSource):
    token: str
    description: str = "the token given"

    def cached(self) -> str | None:
        return self.token

    def get(self) -> str:
        return self.token


@dataclass
class FileToken(TokenSource):
    """A token file read at each use (projected tokens are rotated by the kubelet)."""

    path: str
    description: str = "a token file"

    def get(self) -> str:
        try:
            token = Path(self.path).read_text().strip()
        except OSError as e:
            raise CredentialsError(f"cannot read the token file {self.path}: {e.strerror}") from None
        if not token:
            raise CredentialsError(f"the token file {self.path} is empty")
        return token


@dataclass
class ExecToken(TokenSource):
    """A kubeconfig ``exec`` credential plugin (client.authentication.k8s.io), cached until
    the expiry it reports."""

    command: str
    args: list[str]
    env: dict[str, str]
    description: str = "the kubeconfig's exec plugin"
    _token: str | None = None
    _expires: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cached(self) -> str | None:
        return self._token if self._token and time.time() < self._expires else None

    def get(self) -> str:
        with self._lock:
            if (token := self.cached()) is not None:
                return token
            try:
                out = subprocess.run(
                    [self.command, *self.args],
                    env={**os.environ, **self.env},
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                )
                status = json.loads(out.stdout)["status"]
                token = str(status["token"])
            except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as e:
                raise CredentialsError(
                    f"the kubeconfig's credential plugin `{self.command}` gave no token ({e})"
                ) from None
            expiry = status.get("expirationTimestamp")
            self._expires = _epoch(expiry) - 60 if expiry else time.time() + 300
            self._token = token
            return token

    def invalidate(self) -> None:
        self._token = None


@dataclass
class MintedToken(TokenSource):
    """A token of a ServiceAccount from the TokenRequest API, asked with the kubeconfig's
    credentials (a client certificate), for :data:`MINTED_TOKEN_SECONDS`; kept until
    :data:`MINT_MARGIN_SECONDS` before it expires."""

    kube: KubeConfig
    namespace: str
    name: str
    _token: str | None = None
    _expires: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"a token of the ServiceAccount {self.namespace}/{self.name} (TokenRequest)"

    def cached(self) -> str | None:
        return self._token if self._token and time.time() < self._expires else None

    def get(self) -> str:
        with self._lock:
            if (token := self.cached()) is not None:
                return token
            token, expires = self._mint()
            self._token, self._expires = token, expires - MINT_MARGIN_SECONDS
            return token

    def invalidate(self) -> None:
        self._token = None

    def _mint(self) -> tuple[str, float]:
        path = (
            f"/api/v1/namespaces/{quote(self.namespace, safe='')}/serviceaccounts/"
            f"{quote(self.name, safe='')}/token"
        )
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": MINTED_TOKEN_SECONDS},
        }
        sa = f"{self.namespace}/{self.name}"
        try:
            with httpx.Client(verify=self.kube.ssl_context(), timeout=30) as http:
                response = http.post(self.kube.server + path, json=body, headers=self.kube.auth_headers())
        except httpx.HTTPError as e:
            raise CredentialsError(
                f"cannot reach the Kubernetes API server {self.kube.server} to mint a token of {sa} "
                f"({type(e).__name__}: {e})"
            ) from None
        if response.status_code == 404:
            raise CredentialsError(
                f"the ServiceAccount {sa} does not exist: install the Helm chart with "
                "adminServiceAccount.create=true, or name another one with KUBETASK_SERVICE_ACCOUNT="
                "namespace/name, or pass a token (KUBETASK_TOKEN)"
            )
        if response.status_code in (401, 403):
            raise CredentialsError(
                f"the kubeconfig user of context {self.kube.context!r} may not create tokens of the "
                f"ServiceAccount {sa} (`create serviceaccounts/token` in {self.namespace}; cluster "
                "admins may); pass a token of your own instead (KUBETASK_TOKEN)"
            )
        if not response.is_success:
            raise CredentialsError(
                f"minting a token of {sa} failed: HTTP {response.status_code} {response.text[:200]}"
            )
        status = response.json().get("status") or {}
        expiry = status.get("expirationTimestamp")
        expires = _epoch(expiry) if expiry else time.time() + MINTED_TOKEN_SECONDS
        return str(status["token"]), expires


#: Minted tokens, shared by the clients of one process (one TokenRequest an hour).
_MINTED: dict[tuple[str, str, str, str], MintedToken] = {}
_MINTED_LOCK = threading.Lock()


def _minted(kube: KubeConfig, namespace: str, name: str) -> MintedToken:
    key = (kube.server, kube.user_key, namespace, name)
    with _MINTED_LOCK:
        source = _MINTED.get(key)
        if source is None:
            source = _MINTED[key] = MintedToken(kube, namespace, name)
        return source


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


# ---- kubeconfig -------------------------------------------------------------------------


@dataclass
class KubeConfig:
    """The current context of a kubeconfig: the API server, its TLS, and the user."""

    path: str
    context: str
    server: str
    namespace: str | None
    cluster: dict[str, Any]
    user: dict[str, Any]
    _ssl: ssl.SSLContext | None = None

    @property
    def user_key(self) -> str:
        return f"{self.path}#{self.context}"

    def has_client_certificate(self) -> bool:
        return bool(self.user.get("client-certificate") or self.user.get("client-certificate-data"))

    def bearer(self) -> TokenSource | None:
        """The user's own bearer token (``token``, ``tokenFile``, ``exec``), if any."""
        if self.user.get("token"):
            return StaticToken(str(self.user["token"]), f"the token of kubeconfig context {self.context!r}")
        if self.user.get("tokenFile"):
            return FileToken(
                self._path(str(self.user["tokenFile"])),
                f"the tokenFile of kubeconfig context {self.context!r}",
            )
        plugin = self.user.get("exec")
        if isinstance(plugin, dict) and plugin.get("command"):
            env = {str(e["name"]): str(e["value"]) for e in plugin.get("env") or []}
            return ExecToken(str(plugin["command"]), [str(a) for a in plugin.get("args") or []], env)
        return None

    def auth_headers(self) -> dict[str, str]:
        """Headers authenticating to the API server (a client certificate is in the TLS)."""
        source = self.bearer()
        if source is not None:
            return {"Authorization": f"Bearer {source.get()}"}
        user, password = self.user.get("username"), self.user.get("password")
        if user and password:
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {basic}"}
        return {}

    def ssl_context(self) -> ssl.SSLContext | bool:
        """TLS to the API server: its CA, and the user's client certificate if any."""
        if not self.server.startswith("https://"):
            return True
        if self._ssl is not None:
            return self._ssl
        if self.cluster.get("insecure-skip-tls-verify"):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.cluster.get("certificate-authority-data"):
            ctx = ssl.create_default_context(
                cadata=base64.b64decode(self.cluster["certificate-authority-data"]).decode()
            )
        elif self.cluster.get("certificate-authority"):
            ctx = ssl.create_default_context(cafile=self._path(str(self.cluster["certificate-authority"])))
        else:
            ctx = ssl.create_default_context()
        cert = self._pem("client-certificate")
        key = self._pem("client-key")
        if cert is not None and key is not None:
            # ssl loads certificates from files only: a private directory, removed at once.
            with tempfile.TemporaryDirectory(prefix="kubetask-") as tmp:
                cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
                for path, data in ((cert_path, cert), (key_path, key)):
                    path.touch(mode=0o600)
                    path.write_bytes(data)
                ctx.load_cert_chain(cert_path, key_path)
        self._ssl = ctx
        return ctx

    def _pem(self, name: str) -> bytes | None:
        if self.user.get(f"{name}-data"):
            return base64.b64decode(self.user[f"{name}-data"])
        if self.user.get(name):
            return Path(self._path(str(self.user[name]))).read_bytes()
        return None

    def _path(self, value: str) -> str:
        """Relative paths in a kubeconfig are relative to the file."""
        return value if os.path.isabs(value) else str(Path(self.path).parent / value)


def _kubeconfig_paths(explicit: str | None, env: Mapping[str, str]) -> list[str]:
    if explicit:
        return [explicit]
    listed = env.get("KUBECONFIG")
    if listed:
        return [p for p in listed.split(os.pathsep) if p]
    return [str(Path.home() / ".kube" / "config")]


def load_kubeconfig(
    path: str | None = None, context: str | None = None, env: Mapping[str, str] | None = None
) -> KubeConfig | None:
    """The current (or ``context``) context of the kubeconfig (``path``, else
    ``KUBECONFIG``, else ``~/.kube/config``); None when there is no kubeconfig. Several
    files in ``KUBECONFIG`` merge as kubectl merges them: the first value wins."""
    docs: list[tuple[str, dict[str, Any]]] = []
    for p in _kubeconfig_paths(path, os.environ if env is None else env):
        try:
            loaded = yaml.safe_load(Path(p).read_text())
        except FileNotFoundError:
            continue
        except (OSError, yaml.YAMLError) as e:
            raise CredentialsError(f"cannot read the kubeconfig {p}: {e}") from None
        if isinstance(loaded, dict):
            docs.append((p, loaded))
    if not docs:
        return None
    current = context or next((d["current-context"] for _, d in docs if d.get("current-context")), None)
    if not current:
        raise CredentialsError(
            f"the kubeconfig {docs[0][0]} has no current context: `kubectl config use-context NAME`"
        )

    def named(kind: str, name: str) -> tuple[str, dict[str, Any]] | None:
        for p, d in docs:
            for item in d.get(kind) or []:
                if isinstance(item, dict) and item.get("name") == name:
                    return p, dict(item.get(kind[:-1]) or {})
        return None

    ctx = named("contexts", current)
    if ctx is None:
        raise CredentialsError(f"the kubeconfig has no context {current!r}")
    ctx_path, ctx_body = ctx
    cluster = named("clusters", str(ctx_body.get("cluster", "")))
    if cluster is None or not cluster[1].get("server"):
        raise CredentialsError(f"the kubeconfig context {current!r} names no cluster with a server")
    user = named("users", str(ctx_body.get("user", ""))) or (ctx_path, {})
    return KubeConfig(
        path=cluster[0],
        context=current,
        server=str(cluster[1]["server"]).rstrip("/"),
        namespace=ctx_body.get("namespace") or None,
        cluster=cluster[1],
        user=user[1],
    )


# ---- discovery ----------------------------------------------------------------------------


@dataclass
class Connection:
    """How to call the API: the base URL (``/api/v1/...`` is appended), the TLS to use, the
    token, and the headers that authenticate to a proxy in between (the API server)."""

    base_url: str
    token: TokenSource
    verify: ssl.SSLContext | bool = True
    proxy_headers: TokenSource | None = None
    """Through the API server's service proxy: the kubeconfig's own bearer token, sent as
    ``Authorization`` (the kubetask token then travels in ``X-Kubetask-Token`` only)."""
    via: str = ""
    """Where the URL came from, for error messages."""
    namespace: str = "default"
    """The namespace commands use when none is given (the context's, the pod's)."""
    proxied: bool = False

    def headers(self, token: str) -> dict[str, str]:
        headers = {TOKEN_HEADER: token}
        if not self.proxied:
            headers["Authorization"] = f"Bearer {token}"
        elif self.proxy_headers is not None:
            headers["Authorization"] = f"Bearer {self.proxy_headers.get()}"
        return headers


def _parse_service(value: str) -> tuple[str, str, str]:
    try:
        where, port = value.rsplit(":", 1)
        ns, name = where.split("/", 1)
    except ValueError:
        raise CredentialsError(
            f"KUBETASK_API_SERVICE={value!r} is not namespace/name:port (e.g. {DEFAULT_API_SERVICE})"
        ) from None
    if not (ns and name and port):
        raise CredentialsError(f"KUBETASK_API_SERVICE={value!r} is not namespace/name:port")
    return ns, name, port


def _parse_account(value: str) -> tuple[str, str]:
    ns, _, name = value.partition("/")
    if not ns or not name:
        raise CredentialsError(f"KUBETASK_SERVICE_ACCOUNT={value!r} is not namespace/name")
    return ns, name


def _in_pod(env: Mapping[str, str]) -> bool:
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and (SA_DIR / "token").is_file()


def discover(
    *,
    api_url: str | None = None,
    token: str | None = None,
    kubeconfig: str | None = None,
    context: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Connection:
    """The :class:`Connection` to use, in the order the module's docstring gives."""
    env = os.environ if env is None else env
    service = _parse_service(env.get("KUBETASK_API_SERVICE") or DEFAULT_API_SERVICE)
    # In an attempt pod KUBETASK_API_URL is the runner listener's (the operator sets it,
    # with KUBETASK_TOKEN_FILE): not the public API.
    env_url = None if env.get("KUBETASK_TOKEN_FILE") else env.get("KUBETASK_API_URL")
    url = api_url or env_url or None
    via = "the api_url given (--api-url)" if api_url else "KUBETASK_API_URL" if env_url else ""
    given = token or env.get("KUBETASK_TOKEN") or None
    source: TokenSource | None = None
    if given:
        source = StaticToken(given, "the token given" if token else "KUBETASK_TOKEN")
    if (source is None or url is None) and _in_pod(env) and kubeconfig is None and context is None:
        source = source or FileToken(str(SA_DIR / "token"), "the pod's ServiceAccount token")
        ns_file = SA_DIR / "namespace"
        pod_ns = ns_file.read_text().strip() if ns_file.is_file() else "default"
        if url is None:
            url, via = f"http://{service[1]}.{service[0]}.svc:{service[2]}", "the API's Service (in a pod)"
        return Connection(url.rstrip("/"), source, via=via, namespace=env.get("KUBETASK_NAMESPACE") or pod_ns)
    kube = load_kubeconfig(kubeconfig, context, env)
    namespace = env.get("KUBETASK_NAMESPACE") or (kube.namespace if kube else None) or "default"
    if url is not None and source is not None:
        return Connection(url.rstrip("/"), source, via=via, namespace=namespace)
    if kube is None:
        raise CredentialsError(
            "no kubeconfig found (KUBECONFIG, ~/.kube/config) and no KUBETASK_API_URL with a "
            "KUBETASK_TOKEN: set them, or point KUBECONFIG at your cluster"
        )
    bearer = kube.bearer()
    if source is None:
        if bearer is not None:
            source = bearer
        elif kube.has_client_certificate():
            sa_ns, sa_name = _parse_account(env.get("KUBETASK_SERVICE_ACCOUNT") or DEFAULT_SERVICE_ACCOUNT)
            source = _minted(kube, sa_ns, sa_name)
        else:
            raise CredentialsError(
                f"the kubeconfig context {kube.context!r} has no token and no client certificate: "
                "set KUBETASK_TOKEN (e.g. `kubectl create token SERVICEACCOUNT`)"
            )
    if url is not None:
        return Connection(url.rstrip("/"), source, via=via, namespace=namespace)
    ns, name, port = service
    proxy = f"{kube.server}/api/v1/namespaces/{ns}/services/http:{name}:{port}/proxy"
    return Connection(
        proxy,
        source,
        verify=kube.ssl_context(),
        proxy_headers=bearer,
        via=f"the Kubernetes API server's service proxy (kubeconfig context {kube.context!r})",
        namespace=namespace,
        proxied=True,
    )
