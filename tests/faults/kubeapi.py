"""An HTTP reverse proxy in front of the real kube-apiserver, with fault controls.

    with KubeApiProxy(stack.kubeconfig) as api:
        api.write_kubeconfig(tmp_path / "kubeconfig")  # KUBECONFIG for the process under test
        api.fail(method="POST", path_regex=r"/pods$", times=1)  # one 503 Status, then normal
        api.hang(method="POST", path_regex=r"/pods$", applied=True)  # created, but no answer
        api.pause(); api.resume()  # the API server frozen, for this client only
        api.expire_watches()  # 410 Gone on every open watch; re-watching from old versions too
        api.requests(method="POST", path_regex="/pods")  # what the client asked, and got

The proxy listens on plain HTTP on 127.0.0.1 and talks to the real server with the given
kubeconfig's credentials (client certificate, token, or basic auth; inline data or files).
Responses stream: watch events are forwarded one by one as they arrive. Not supported:
upgraded connections (``kubectl exec/attach/port-forward``) and exec/auth-provider logins."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import aiohttp
import yaml
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tests.faults._loop import LoopThread

# Never forwarded: hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself.
# Accept-Encoding is dropped so that the server answers uncompressed and watch events can
# be read line by line.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer"}
    | {"transfer-encoding", "upgrade", "proxy-connection"}
)
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "authorization", "content-length", "accept-encoding"}
_NO_AUTO_HEADERS = ("Content-Type", "Accept-Encoding", "User-Agent")
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
_GONE_EVENT = {
    "type": "ERROR",
    "object": {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "too old resource version",
        "reason": "Expired",
        "code": 410,
    },
}


@dataclass(frozen=True)
class RequestRecord:
    """One request the proxy received, as the client experienced it."""

    method: str
    path: str
    query: str
    watch: bool
    #: When it arrived (``time.time()``).
    at: float
    #: The HTTP status the client got; None while unanswered (held, paused, in flight) or
    #: if the client gave up first.
    status: int | None = None
    #: "fail", "hang", "gone" (a re-watch answered 410) or None when forwarded untouched.
    fault: str | None = None


@dataclass
class _Rule:
    kind: Literal["fail", "hang"]
    method: str | None
    path: re.Pattern[str] | None
    watch: bool | None
    #: Matches left; None for every match until ``clear()``.
    times: int | None
    status: int = 503
    delay: float = 0.0
    message: str | None = None
    applied: bool = False

    def take(self, method: str, path: str, watch: bool) -> bool:
        """Whether this rule applies to the request; counts it if so."""
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.path is not None and not self.path.search(path):
            return False
        if self.watch is not None and self.watch != watch:
            return False
        if self.times is not None:
            self.times -= 1
        return True


@dataclass(eq=False)
class _Watch:
    path: str
    start_rv: int | None
    response: web.StreamResponse
    last_rv: int | None = None
    #: Held while writing an event, so an expiry never lands inside one.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    copier: asyncio.Task[None] | None = None
    expired: bool = False

    def note(self, line: bytes) -> None:
        try:
            rv = json.loads(line)["object"]["metadata"]["resourceVersion"]
        except (ValueError, KeyError, TypeError):
            return
        if isinstance(rv, str) and rv.isdigit():
            self.last_rv = int(rv)


@dataclass(frozen=True)
class _Upstream:
    server: str
    ssl: ssl.SSLContext | None
    headers: dict[str, str]
    server_hostname: str | None


class KubeApiProxy:
    """See the module docstring. Controls are thread-safe and return once in effect."""

    def __init__(self, kubeconfig_path: str | Path) -> None:
        self.kubeconfig_path = Path(kubeconfig_path)
        self._upstream = _load_kubeconfig(self.kubeconfig_path)
        self._loop = LoopThread("kube-api-proxy")
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._rules: list[_Rule] = []
        self._log: list[RequestRecord] = []
        self._watches: set[_Watch] = set()
        #: Watch path -> newest resourceVersion seen on an expired stream there (None: any);
        #: the next watch on that path from a version not newer is answered 410.
        self._expired: dict[str, int | None] = {}
        self._running: asyncio.Event | None = None
        self._release: asyncio.Event | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> KubeApiProxy:
        self._loop.start()
        self.port = self._loop.call(self._start())
        return self

    def close(self) -> None:
        if self._runner is not None:
            self._loop.call(self._close())
        self._loop.stop()

    def __enter__(self) -> KubeApiProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def write_kubeconfig(self, path: str | Path) -> Path:
        """A kubeconfig for ``http://127.0.0.1:<port>`` without credentials (the proxy adds them)."""
        name = "kubetask-fault-proxy"
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": {"server": self.url}}],
            "users": [{"name": name, "user": {}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name,
        }
        out = Path(path)
        out.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return out

    # ---- faults ----------------------------------------------------------------------------

    def fail(
        self,
        method: str | None = None,
        path_regex: str | None = None,
        *,
        status: int = 503,
        times: int | None = None,
        delay: float = 0.0,
        message: str | None = None,
        watch: bool | None = None,
    ) -> None:
        """Answer matching requests (``path_regex`` searched in the URL path, ``watch``
        None for both kinds) with ``status`` and a Kubernetes Status body after ``delay``
        seconds, instead of forwarding them; ``times`` matches, or all until ``clear()``."""
        rule = _Rule(
            "fail", _method(method), _pattern(path_regex), watch, times, status, delay, message=message
        )
        self._loop.call(self._add(rule))

    def hang(
        self,
        method: str | None = None,
        path_regex: str | None = None,
        *,
        times: int | None = None,
        applied: bool = False,
        watch: bool | None = None,
    ) -> None:
        """Hold matching requests without an answer until ``clear()`` (then they go on
        normally) or until the client gives up. With ``applied`` the request reaches the
        API server at once (its effect happens) and only the answer is held: the client
        times out on a create that did succeed."""
        rule = _Rule("hang", _method(method), _pattern(path_regex), watch, times, applied=applied)
        self._loop.call(self._add(rule))

    def pause(self) -> None:
        """Stall every request, new and in flight, and every open watch stream, until ``resume()``."""
        self._loop.call(self._pause(True))

    def resume(self) -> None:
        self._loop.call(self._pause(False))

    def expire_watches(self, path_regex: str | None = None, *, gone_on_rewatch: bool = True) -> int:
        """End every open watch stream whose path matches with an ERROR event carrying a 410
        Expired Status, as the API server does when the watch's version is compacted. With
        ``gone_on_rewatch`` the next watch on the same path from a resourceVersion not newer
        than the stream's last one is answered the same way, once (a client must relist,
        not resume). Returns how many streams were ended."""
        return self._loop.call(self._expire(_pattern(path_regex), gone_on_rewatch))

    def clear(self) -> None:
        """Remove every fault: rules, pending 410s, pause; held requests go on."""
        self._loop.call(self._clear())

    def requests(
        self,
        method: str | None = None,
        path_regex: str | None = None,
        *,
        watch: bool | None = None,
        fault: str | None = None,
    ) -> list[RequestRecord]:
        """The requests received so far, oldest first, that match all the given filters."""
        pattern, method = _pattern(path_regex), _method(method)
        return [
            r
            for r in self._loop.call(self._snapshot())
            if (method is None or r.method == method)
            and (pattern is None or pattern.search(r.path))
            and (watch is None or r.watch == watch)
            and (fault is None or r.fault == fault)
        ]

    # ---- inside the loop: controls -----------------------------------------------------------

    async def _start(self) -> int:
        self._running, self._release = asyncio.Event(), asyncio.Event()
        self._running.set()
        connector = aiohttp.TCPConnector(limit=0, ssl=self._upstream.ssl or True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # No read timeout: watches are long. Clients time out on their side.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        # Cancel a handler when its client disconnects: a held request is then forgotten,
        # and an abandoned watch closes its upstream stream.
        server = web.Server(self._handle, handler_cancellation=True)
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        return int(sock.getsockname()[1])

    async def _close(self) -> None:
        assert self._runner is not None and self._session is not None
        await self._clear()
        for w in list(self._watches):
            if w.copier is not None:
                w.copier.cancel()
        await self._runner.cleanup()
        await self._session.close()

    async def _add(self, rule: _Rule) -> None:
        self._rules.append(rule)

    async def _pause(self, paused: bool) -> None:
        assert self._running is not None
        if paused:
            self._running.clear()
        else:
            self._running.set()

    async def _clear(self) -> None:
        assert self._running is not None and self._release is not None
        self._rules.clear()
        self._expired.clear()
        self._running.set()
        self._release.set()
        self._release = asyncio.Event()

    async def _snapshot(self) -> list[RequestRecord]:
        return list(self._log)

    async def _expire(self, pattern: re.Pattern[str] | None, gone_on_rewatch: bool) -> int:
        ended = 0
        for w in list(self._watches):
            if w.expired or (pattern is not None and not pattern.search(w.path)):
                continue
            async with w.lock:
                w.expired = True
                if w.copier is not None:
                    w.copier.cancel()
                with contextlib.suppress(ConnectionResetError):  # its client is gone already
                    await w.response.write(json.dumps(_GONE_EVENT).encode() + b"\n")
            if gone_on_rewatch:
                newest = [rv for rv in (w.start_rv, w.last_rv) if rv is not None]
                old = self._expired.get(w.path, 0)
                self._expired[w.path] = None if not newest or old is None else max(old, *newest)
            ended += 1
        return ended

    # ---- inside the loop: requests -----------------------------------------------------------

    def _record(self, index: int, **changes: Any) -> None:
        self._log[index] = replace(self._log[index], **changes)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._running is not None and self._release is not None
        watch = _is_watch(request)
        index = len(self._log)
        self._log.append(
            RequestRecord(request.method, request.path, request.query_string, watch, time.time())
        )
        await self._running.wait()
        rule = next((r for r in self._rules if r.take(request.method, request.path, watch)), None)
        if rule is not None and rule.kind == "fail":
            self._record(index, fault="fail")
            if rule.delay:
                await asyncio.sleep(rule.delay)
            self._record(index, status=rule.status)
            return _status_response(
                rule.status, rule.message or f"injected fault: {request.method} {request.path}"
            )
        held: asyncio.Event | None = None
        if rule is not None:
            self._record(index, fault="hang")
            held = self._release
            if not rule.applied:
                await held.wait()
                held = None
                await self._running.wait()
        if watch and self._gone(request):
            self._record(index, fault="gone", status=200)
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            with contextlib.suppress(ConnectionResetError):
                await response.write(json.dumps(_GONE_EVENT).encode() + b"\n")
                await response.write_eof()
            return response
        return await self._forward(request, index, watch, held)

    def _gone(self, request: web.BaseRequest) -> bool:
        if request.path not in self._expired:
            return False
        rv = request.query.get("resourceVersion", "")
        if not rv or rv == "0":
            return False  # "any version" or "the newest": nothing to be too old
        newest = self._expired[request.path]
        if newest is not None and (not rv.isdigit() or int(rv) > newest):
            return False
        del self._expired[request.path]
        return True

    async def _forward(
        self, request: web.BaseRequest, index: int, watch: bool, held: asyncio.Event | None
    ) -> web.StreamResponse:
        assert self._session is not None and self._running is not None
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _not_forwarded(request)
        )
        headers.update(self._upstream.headers)
        body = await request.content.read()
        url = URL(self._upstream.server.rstrip("/") + request.raw_path, encoded=True)
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=body or None,
                # Only the client's headers: no Content-Type guessed for a body sent without
                # one (the API server takes that as JSON), no compression asked for.
                skip_auto_headers=_NO_AUTO_HEADERS,
                server_hostname=self._upstream.server_hostname,
            ) as upstream:
                if held is not None:
                    await held.wait()  # hang(applied=True): the server acted; the client waits
                await self._running.wait()
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for k, v in upstream.headers.items():
                    if k.lower() not in _HOP_BY_HOP:
                        response.headers.add(k, v)
                await response.prepare(request)
                self._record(index, status=upstream.status)
                # The client may go away mid-answer (a watcher that has read its 410, say):
                # then there is nobody left to tell.
                with contextlib.suppress(ConnectionResetError):
                    if watch and upstream.status == 200:
                        await self._stream_watch(request, response, upstream)
                    else:
                        async for chunk in upstream.content.iter_any():
                            await self._running.wait()
                            await response.write(chunk)
                    await response.write_eof()
                return response
        except aiohttp.ClientConnectorError as e:
            self._record(index, status=503)
            return _status_response(503, f"kube-api proxy cannot reach {self._upstream.server}: {e}")

    async def _stream_watch(
        self, request: web.BaseRequest, response: web.StreamResponse, upstream: aiohttp.ClientResponse
    ) -> None:
        rv = request.query.get("resourceVersion", "")
        w = _Watch(request.path, int(rv) if rv.isdigit() else None, response)
        w.copier = asyncio.create_task(self._copy_events(w, upstream))
        self._watches.add(w)
        try:
            await w.copier
        except asyncio.CancelledError:
            if not w.expired:
                raise  # the client went away (or the proxy closes): not ours to swallow
        finally:
            self._watches.discard(w)
            w.copier.cancel()

    async def _copy_events(self, w: _Watch, upstream: aiohttp.ClientResponse) -> None:
        assert self._running is not None
        pending = b""
        async for chunk in upstream.content.iter_any():
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                await self._running.wait()
                async with w.lock:
                    if w.expired:
                        return
                    w.note(line)
                    await w.response.write(line + b"\n")
        if pending:
            async with w.lock:
                if not w.expired:
                    await w.response.write(pending)


def _is_watch(request: web.BaseRequest) -> bool:
    return request.query.get("watch", "").lower() in ("1", "true") or "/watch/" in request.path


def _not_forwarded(request: web.BaseRequest) -> frozenset[str]:
    # Headers named in Connection are hop-by-hop too.
    named = {h.strip().lower() for h in request.headers.get("Connection", "").split(",") if h.strip()}
    return _NOT_FORWARDED | named


def _status_response(status: int, message: str) -> web.Response:
    reason = _REASONS.get(status) or HTTPStatus(status).phrase.replace(" ", "")
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": status,
    }
    return web.json_response(body, status=status)


def _pattern(regex: str | None) -> re.Pattern[str] | None:
    return None if regex is None else re.compile(regex)


def _method(method: str | None) -> str | None:
    return None if method is None else method.upper()


def _load_kubeconfig(path: Path) -> _Upstream:
    """The server and credentials of ``path``'s current context."""
    cfg = yaml.safe_load(path.read_text())
    base = path.resolve().parent

    def named(section: str, name: str) -> dict[str, Any]:
        for item in cfg.get(section) or []:
            if item.get("name") == name:
                return dict(item.get(section[:-1]) or {})
        raise ValueError(f"{path}: no {section[:-1]} named {name!r}")

    def data(d: dict[str, Any], key: str) -> bytes | None:
        if d.get(f"{key}-data"):
            return base64.b64decode(str(d[f"{key}-data"]))
        if d.get(key):
            return (base / str(d[key])).read_bytes()
        return None

    context = named("contexts", cfg["current-context"])
    cluster, user = named("clusters", context["cluster"]), named("users", context["user"])
    if "exec" in user or "auth-provider" in user:
        raise ValueError(f"{path}: exec and auth-provider credentials are not supported")
    server: str = cluster["server"]
    headers: dict[str, str] = {}
    token = user.get("token") or (
        (base / user["tokenFile"]).read_text().strip() if user.get("tokenFile") else None
    )
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif user.get("username"):
        basic = base64.b64encode(f"{user['username']}:{user.get('password', '')}".encode()).decode()
        headers["Authorization"] = f"Basic {basic}"
    if not server.startswith("https://"):
        return _Upstream(server, None, headers, None)
    ca = data(cluster, "certificate-authority")
    ctx = ssl.create_default_context(cadata=ca.decode() if ca else None)
    if cluster.get("insecure-skip-tls-verify"):
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    cert, key = data(user, "client-certificate"), data(user, "client-key")
    if cert and key:
        # ssl loads client certificates from files only: write them out for a moment.
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tls.crt").write_bytes(cert)
            (Path(tmp) / "tls.key").write_bytes(key)
            ctx.load_cert_chain(Path(tmp) / "tls.crt", Path(tmp) / "tls.key")
    return _Upstream(server, ctx, headers, cluster.get("tls-server-name"))
