"""``kubetask dashboard``: the operator's dashboard on a local address, signed in as the
current kubeconfig user.

A small reverse proxy on ``127.0.0.1``: every request under ``/dashboard/`` goes to the
API the other commands use (found the same way, the API server's service proxy by default),
with the credentials the other commands send (the kubeconfig's token, or for a
client-certificate user a minted ServiceAccount token; docs/client.md). Only the standard
library's HTTP server and httpx, so it needs nothing beyond the CLI's own dependencies.

The printed URL carries a one-time secret that becomes an HttpOnly, SameSite=Strict cookie
of the local address; requests without it are refused, so neither another local user nor a
web page in the same browser (DNS rebinding is stopped by the ``Host`` check, cross-site
requests by SameSite) can use the proxy's credentials.
"""

from __future__ import annotations

import http.server
import secrets
import threading
import webbrowser
from http.cookies import SimpleCookie
from typing import Annotated
from urllib.parse import urlsplit

import httpx
import typer

from kubetask.cli.common import ApiUrl, app, fail
from kubetask.sdk.credentials import Connection, CredentialsError, discover

DASHBOARD = "/dashboard"
LOCAL_COOKIE = "kubetask_local"
#: Request headers passed on to the operator (besides the credentials the proxy adds).
FORWARDED = ("Accept", "Content-Type", "X-Kubetask-Dashboard", "If-None-Match")
#: Response headers passed back to the browser.
RETURNED = ("Content-Type", "Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy",
            "Cache-Control", "ETag", "Last-Modified")  # fmt: skip


class DashboardProxy(http.server.ThreadingHTTPServer):
    """The local server: ``secret`` opens a session, ``conn`` reaches the API."""

    daemon_threads = True

    def __init__(self, port: int, conn: Connection, *, secret: str | None = None) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.conn = conn
        self.secret = secret or secrets.token_urlsafe(24)
        self.http = httpx.Client(base_url=conn.base_url, verify=conn.verify, timeout=httpx.Timeout(60.0))
        # Through the API server's service proxy, HTML links and redirects come back with
        # the proxy's path in front (the API server rewrites them): it is taken off again.
        self.upstream_path = urlsplit(conn.base_url).path.rstrip("/")
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """What the user opens: it sets the session cookie, then shows the runs."""
        return f"http://127.0.0.1:{self.port}/_kubetask/open/{self.secret}"

    def token(self, *, fresh: bool = False) -> str:
        with self.lock:  # a minted token is made once, whatever the threads
            if fresh:
                self.conn.token.invalidate()
            return self.conn.token.get()

    def local(self, path: str) -> str:
        """An upstream path or URL as the browser should see it (the service proxy's prefix off)."""
        if self.upstream_path and self.upstream_path != "/":
            path = path.replace(self.upstream_path + DASHBOARD, DASHBOARD)
        return path

    def server_close(self) -> None:
        super().server_close()
        self.http.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: DashboardProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet: the URL is all we print
        return

    def _plain(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _allowed(self) -> bool:
        host = self.headers.get("Host", "")
        if host not in (f"127.0.0.1:{self.server.port}", f"localhost:{self.server.port}"):
            self._plain(421, "this address serves 127.0.0.1 only")
            return False
        opening = f"/_kubetask/open/{self.server.secret}"
        if self.path == opening:
            cookie = f"{LOCAL_COOKIE}={self.server.secret}; HttpOnly; SameSite=Strict; Path=/"
            self._plain(302, "signed in", {"Location": f"{DASHBOARD}/runs", "Set-Cookie": cookie})
            return False
        jar = SimpleCookie(self.headers.get("Cookie", ""))
        got = jar.get(LOCAL_COOKIE)
        if got is None or not secrets.compare_digest(got.value, self.server.secret):
            self._plain(403, "open the URL `kubetask dashboard` printed (it signs this browser in)")
            return False
        path = self.server.local(self.path)
        if not path.startswith(f"{DASHBOARD}/") or path.startswith(f"{DASHBOARD}/sign"):
            if path in ("/", DASHBOARD):
                self._plain(302, "", {"Location": f"{DASHBOARD}/runs"})
            else:
                self._plain(404, f"only {DASHBOARD}/ is served here")
            return False
        self.path = path
        return True

    def _forward(self) -> None:
        if not self._allowed():
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {name: self.headers[name] for name in FORWARDED if name in self.headers}
        try:
            for fresh in (False, True):
                sent = {**headers, **self.server.conn.headers(self.server.token(fresh=fresh))}
                # httpx puts the path after base_url's (the service proxy's, if any).
                upstream = self.server.http.request(self.command, self.path, content=body, headers=sent)
                if upstream.status_code != 401:
                    break
        except (httpx.HTTPError, CredentialsError) as e:
            self._plain(502, f"cannot reach the kubetask API at {self.server.conn.base_url}: {e}")
            return
        content = upstream.content
        if upstream.headers.get("Content-Type", "").startswith("text/html"):
            content = self.server.local(upstream.text).encode()
        self.send_response(upstream.status_code)
        for name in RETURNED:
            if name in upstream.headers:
                self.send_header(name, upstream.headers[name])
        if "Location" in upstream.headers:
            self.send_header("Location", self.server.local(upstream.headers["Location"]))
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward


@app.command("dashboard")
def dashboard(
    port: Annotated[int, typer.Option("--port", help="Local port (default: a free one).")] = 0,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the URL only.")] = False,
    api_url: ApiUrl = None,
) -> None:
    """Serve the dashboard on 127.0.0.1, signed in as the current kubeconfig user; print
    its URL and open the browser (docs/dashboard.md)."""
    try:
        conn = discover(api_url=api_url)
    except CredentialsError as e:
        fail(str(e))
    try:
        server = DashboardProxy(port, conn)
    except OSError as e:
        fail(f"cannot listen on 127.0.0.1:{port}: {e}")
    typer.echo(f"kubetask dashboard: {server.url}", err=False)
    typer.echo(f"(the API: {conn.base_url}; Ctrl-C stops)", err=True)
    if not no_browser:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
