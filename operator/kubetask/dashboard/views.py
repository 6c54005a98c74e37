"""The dashboard's routes: sign-in, the runs list, a run's page, the tasks and queues
pages, the static assets, and the public API mounted again under ``/dashboard/api/v1`` for
the pages' scripts.

Reading goes through the public API's own functions (:func:`kubetask.api.runs.run_list`,
:func:`~kubetask.api.runs.find_run`, :func:`~kubetask.api.runs.run_detail`,
:func:`~kubetask.api.runs.scope`, :func:`kubetask.api.catalog.task_list`,
:func:`~kubetask.api.catalog.queue_list`), so filters, keyset cursors and permission checks
are the API's. Which action buttons a page shows is asked of RBAC with the same
SubjectAccessReviews the API asks when the button is used.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from aiohttp import web
from multidict import MultiDict, MultiMapping

from kubetask.api.actions import RUNS
from kubetask.api.auth import REVIEWER, TOKEN_HEADER, Permission, User, authenticate_token, bearer_token
from kubetask.api.catalog import TASK_STATS_SINCE, last_runs, queue_list, task_list
from kubetask.api.errors import ApiError
from kubetask.api.openapi import Endpoint
from kubetask.api.runs import LIST_PARAMS, RUN_NAMESPACES, dns_label, find_run, run_detail, run_list, scope
from kubetask.api.state import SESSIONS
from kubetask.apimodels import PHASES, TERMINAL_PHASES, RunDetail, RunList
from kubetask.dashboard.cluster import kubernetes_side

PREFIX = "/dashboard"
COOKIE = "kubetask_token"
"""The sign-in cookie: the bearer token itself (HttpOnly, SameSite=Strict, path /dashboard),
checked with a TokenReview on every request like a header would be."""
CSRF_HEADER = "X-Kubetask-Dashboard"
"""What a cookie-authenticated change must carry (``1``): a cross-site form cannot set it."""
#: The time-range presets of the runs list (the API's relative ``since``).
RANGES = ("15m", "1h", "6h", "24h", "7d", "30d")
STATIC = Path(__file__).parent / "static"
#: No request leaves the operator's origin: scripts and styles are files served from it.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("kubetask.dashboard", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def when(value: str | None) -> str:
    """An API time as ``2026-05-01 12:00:03`` (UTC), or a dash."""
    at = _parse(value)
    return at.strftime("%Y-%m-%d %H:%M:%S") if at else "—"


def duration(start: str | None, end: str | None) -> str:
    """From ``start`` to ``end`` (or now, for what still runs) as ``1h 2m``, ``3.4s``."""
    began = _parse(start)
    if began is None:
        return "—"
    seconds = ((_parse(end) or datetime.now(UTC)) - began).total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m" if hours < 48 else f"{hours // 24}d {hours % 24}h"


def seconds(value: float | None) -> str:
    """A number of seconds as ``3.2s``, ``4m 5s``, ``2h 3m``, or a dash."""
    if value is None:
        return "—"
    start = datetime(2000, 1, 1, tzinfo=UTC)
    return duration(start.isoformat(), (start + timedelta(seconds=value)).isoformat())


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


_env.filters.update(
    when=when,
    duration=duration,
    seconds=seconds,
    percent=percent,
    pretty=pretty,
    urlquote=lambda v: quote(str(v), safe=""),
)


def render(template: str, context: dict[str, Any], *, http_status: int = 200) -> web.Response:
    """An HTML page (or fragment) from ``template``, with the security headers."""
    body = _env.get_template(template).render(prefix=PREFIX, **context)
    return web.Response(text=body, status=http_status, content_type="text/html", headers=SECURITY_HEADERS)


# ---- who is calling ---------------------------------------------------------------------


class _SignInNeeded(Exception):
    """No credentials (or a cookie the cluster no longer accepts): go to the sign-in page."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


def _header_token(request: web.Request) -> str | None:
    if request.headers.get("Authorization") or request.headers.get(TOKEN_HEADER):
        return bearer_token(request)
    return None


async def dashboard_user(request: web.Request) -> User:
    """The caller, from the API's headers or else the sign-in cookie."""
    token = _header_token(request)
    if token is not None:
        return await authenticate_token(request, token)
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        raise _SignInNeeded()
    try:
        return await authenticate_token(request, cookie)
    except ApiError as e:
        if e.status == 401:
            raise _SignInNeeded("your token is no longer accepted; sign in again") from None
        raise


def redirect(location: str) -> web.Response:
    """A 302 to ``location`` (returned, so that cookies can be set on it)."""
    return web.Response(status=302, headers={"Location": location, **SECURITY_HEADERS})


def _signin_redirect(request: web.Request, message: str) -> web.Response:
    query = {"next": request.path_qs}
    if message:
        query["error"] = message
    response = redirect(f"{PREFIX}/signin?{urlencode(query)}")
    if message:
        response.del_cookie(COOKIE, path=PREFIX)
    return response


Page = Callable[[web.Request], Awaitable[web.StreamResponse]]


def page(handler: Page) -> Page:
    """A page: to the sign-in page without credentials; API errors as an error page."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except _SignInNeeded as e:
            return _signin_redirect(request, e.message)
        except ApiError as e:
            return render(
                "error.html",
                {"status": e.status, "code": e.code, "message": e.message, "user": None},
                http_status=e.status,
            )

    return wrapped


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a dashboard path only (no open redirect)."""
    if value and value.startswith(f"{PREFIX}/") and not value.startswith("//") and "\\" not in value:
        return value
    return f"{PREFIX}/runs"


# ---- pages ------------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    return redirect(f"{PREFIX}/runs")


async def signin_form(request: web.Request) -> web.StreamResponse:
    context = {
        "next": _safe_next(request.query.get("next")),
        "error": request.query.get("error", ""),
        "user": None,
    }
    return render("signin.html", context)


async def signin(request: web.Request) -> web.StreamResponse:
    """Checks the token (TokenReview) and keeps it in the cookie. A form posted from
    another origin is refused (it would sign the browser in as someone else)."""
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.host:
        raise ApiError(403, "forbidden", "sign in from the dashboard's own page")
    form = await request.post()
    token = str(form.get("token", "")).strip()
    target = _safe_next(str(form.get("next", "")))
    if not token:
        return render(
            "signin.html", {"next": target, "error": "paste a token", "user": None}, http_status=400
        )
    try:
        await authenticate_token(request, token)
    except ApiError as e:
        if e.status != 401:
            raise
        return render("signin.html", {"next": target, "error": e.message, "user": None}, http_status=401)
    response = redirect(target)
    # Secure over HTTPS, also where a proxy in front (an Ingress) ended TLS and says so:
    # that only makes the cookie stricter.
    https = request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
    response.set_cookie(COOKIE, token, path=PREFIX, httponly=True, samesite="Strict", secure=https)
    return response


async def signout(request: web.Request) -> web.StreamResponse:
    response = redirect(f"{PREFIX}/signin")
    response.del_cookie(COOKIE, path=PREFIX)
    return response


def _list_query(query: MultiMapping[str]) -> MultiDict[str]:
    """The API's list parameters from the page's form: tags comma-separated, the time range
    a preset (``since=24h``) or custom (``from``/``to``, ISO-8601 UTC)."""
    out: MultiDict[str] = MultiDict()
    for key in ("task", "phase", "namespace", "cursor", "limit", "parent"):
        for value in query.getall(key, []):
            if value.strip():
                out.add(key, value.strip())
    for value in query.getall("tag", []):
        for tag in value.split(","):
            if tag.strip():
                out.add("tag", tag.strip())
    period = query.get("range", "")
    if period == "custom":
        if query.get("from", "").strip():
            out.add("since", query["from"].strip())
        if query.get("to", "").strip():
            out.add("until", query["to"].strip())
    elif period:
        out.add("since", period)
    assert set(out) <= set(LIST_PARAMS)
    return out


async def readable_namespaces(request: web.Request) -> list[str]:
    """The namespaces with runs that the caller may list runs in (what the filter offers)."""
    allowed = await scope(request, "list", ())
    if allowed.namespaces is None:
        return sorted(await request.app[RUN_NAMESPACES].get(request.app[SESSIONS]))
    return sorted(allowed.namespaces)


def bulk_filter(query: MultiMapping[str]) -> dict[str, Any]:
    """The list's filters as the body of a bulk action (``BulkRequest``); empty without any."""
    body: dict[str, Any] = {}
    for key in ("task", "phase", "tag", "namespace", "parent"):
        values = [v for raw in query.getall(key, []) for v in raw.split(",") if v.strip()]
        if values:
            body[key] = values if key != "parent" else values[0]
    for key in ("since", "until"):
        if query.get(key):
            body[key] = query[key]
    return body


async def may_act(request: web.Request, verb: str, namespaces: list[str]) -> bool:
    """Whether the caller may ``verb`` runs in some of ``namespaces`` (every one, when
    named), as a bulk action would check."""
    try:
        allowed = await scope(request, verb, namespaces)
    except ApiError as e:
        if e.status == 403:
            return False
        raise
    return allowed.namespaces is None or bool(allowed.namespaces)


@page
async def runs_page(request: web.Request) -> web.StreamResponse:
    """``/dashboard/runs``: the filtered list, one keyset page; ``partial=rows`` answers the
    table's body only (what the page polls for live updates)."""
    user = await dashboard_user(request)
    query = request.query
    run_id = query.get("id", "").strip()
    if run_id:
        return redirect(f"{PREFIX}/runs/{quote(run_id, safe='')}")
    error = ""
    api_query = _list_query(query)
    try:
        listing = await run_list(request, api_query)
    except ApiError as e:
        if e.status != 400:
            raise
        listing, error = RunList(items=[]), e.message
    first = {k: v for k, v in query.items() if k not in ("cursor", "partial")}
    context = {
        "user": user,
        "runs": listing.items,
        "next_url": (
            f"{PREFIX}/runs?{urlencode([*first.items(), ('cursor', listing.next_cursor)])}"
            if listing.next_cursor
            else None
        ),
        "first_url": f"{PREFIX}/runs?{urlencode(list(first.items()))}" if query.get("cursor") else None,
        "live": not query.get("cursor"),
        "error": error,
    }
    if query.get("partial") == "rows":
        return render("_rows.html", context)
    bulk = bulk_filter(api_query) if not error else {}
    named = list(bulk.get("namespace", []))
    context.update(
        namespaces=await readable_namespaces(request),
        phases=PHASES,
        ranges=RANGES,
        form=query,
        bulk=json.dumps(bulk),
        can_bulk_cancel=bool(bulk) and await may_act(request, "patch", named),
        can_bulk_replay=bool(bulk) and await may_act(request, "create", named),
    )
    return render("runs.html", context)


#: The statistics windows the tasks page offers (the API's ``since``).
STATS_WINDOWS = ("1h", "24h", "7d", "30d")


async def _namespace(request: web.Request) -> tuple[list[str], str]:
    """The readable namespaces, and the one the page shows (``?namespace=``, else the first)."""
    namespaces = await readable_namespaces(request)
    chosen = request.query.get("namespace") or (namespaces[0] if namespaces else "")
    if chosen and chosen not in namespaces:  # one without runs yet: the page checks access
        namespaces.append(dns_label("namespace", chosen))
    return namespaces, dns_label("namespace", chosen) if chosen else ""


@page
async def tasks_page(request: web.Request) -> web.StreamResponse:
    """``/dashboard/tasks``: a namespace's Tasks, live counts, recent success rate and
    durations (the API's ``task_list``)."""
    user = await dashboard_user(request)
    namespaces, ns = await _namespace(request)
    window = request.query.get("since") or TASK_STATS_SINCE
    if window not in STATS_WINDOWS:
        raise ApiError(400, "invalid_parameter", f"since must be one of {', '.join(STATS_WINDOWS)}")
    tasks = (await task_list(request, ns)).items if ns else []
    # The newest runs of each, where the caller may read the namespace's runs.
    newest = {}
    if ns and await request.app[REVIEWER].allowed(user, Permission("list", "runs", ns)):
        newest = await last_runs(request, ns, [task.name for task in tasks])
    context = {
        "newest": newest,
        "user": user,
        "namespaces": namespaces,
        "namespace": ns,
        "tasks": tasks,
        "windows": STATS_WINDOWS,
        "window": window,
    }
    return render("tasks.html", context)


@page
async def queues_page(request: web.Request) -> web.StreamResponse:
    """``/dashboard/queues``: a namespace's queues; pause, resume and limits for those who
    may ``patch queues``."""
    user = await dashboard_user(request)
    namespaces, ns = await _namespace(request)
    queues = (await queue_list(request, ns)).items if ns else []
    may_patch = bool(ns) and await request.app[REVIEWER].allowed(user, Permission("patch", "queues", ns))
    context = {
        "user": user,
        "namespaces": namespaces,
        "namespace": ns,
        "queues": queues,
        "can_patch": may_patch,
    }
    return render("queues.html", context)


def timeline(run: RunDetail) -> list[dict[str, Any]]:
    """What happened to a run, oldest first: its creation, each attempt's pod (and resumes),
    its steps and waits, its end."""
    events: list[dict[str, Any]] = [{"at": run.created_at, "kind": "created", "text": "created"}]
    for a in run.attempts:
        what = f"resume of attempt {a.number}" if a.resume else f"attempt {a.number}"
        if a.created_at:
            events.append({"at": a.created_at, "kind": "attempt", "text": f"{what}: pod {a.pod_name}"})
        if a.finished_at:
            outcome = a.error.type if a.error else (a.reason or f"exit {a.exit_code}")
            events.append(
                {
                    "at": a.finished_at,
                    "kind": "failed" if a.error else "attempt-end",
                    "text": f"{what} ended: {outcome}",
                }
            )
    for cp in run.checkpoints:
        label = (
            "step"
            if cp.kind == "step"
            else "wait"
            if cp.kind in ("sleep", "event", "token_wait", "child")
            else cp.kind
        )
        if cp.started_at:
            events.append(
                {"at": cp.started_at, "kind": label, "text": f"{label} {cp.name!r} ({cp.kind}) started"}
            )
        if cp.finished_at:
            events.append({"at": cp.finished_at, "kind": label, "text": f"{label} {cp.name!r}: {cp.status}"})
    if run.finished_at:
        events.append(
            {"at": run.finished_at, "kind": run.phase.lower(), "text": f"{run.phase} ({run.reason})"}
        )
    return sorted(events, key=lambda e: _parse(e["at"]) or datetime.min.replace(tzinfo=UTC))


def snippets(run: RunDetail) -> dict[str, str]:
    """The same run from kubectl, the CLI and Python."""
    payload = json.dumps(run.payload, separators=(",", ":"))
    return {
        "kubectl": (
            f"kubectl -n {run.namespace} get runs.kubetask.dev {run.name} -o yaml\n"
            f"kubectl -n {run.namespace} patch runs.kubetask.dev {run.name} --type merge -p "
            '\'{"spec":{"cancel":true}}\''
            + (
                # The newest pod (it is deleted some time after it ends; the logs stay here).
                f"\nkubectl -n {run.namespace} describe pod {run.attempts[-1].pod_name}"
                f"\nkubectl -n {run.namespace} logs {run.attempts[-1].pod_name}"
                if run.attempts
                else ""
            )
        ),
        "cli": (
            f"kubetask runs get {run.id}\nkubetask runs logs {run.id}\n"
            f"kubetask trigger {run.task} -n {run.namespace} --payload '{payload}'"
        ),
        "python": (
            "from kubetask import Client\n\nclient = Client()\n"
            f"run = client.runs.get({run.id!r})\n"
            f"again = client.tasks.trigger({run.task!r}, {run.payload!r}, namespace={run.namespace!r})"
        ),
    }


@page
async def run_page(request: web.Request) -> web.StreamResponse:
    """``/dashboard/runs/{id}``: one run; the buttons its caller may use."""
    user = await dashboard_user(request)
    run = await find_run(request, "get")
    detail = await run_detail(request, run)
    reviewer = request.app[REVIEWER]
    may_patch = await reviewer.allowed(user, Permission("patch", "runs", run.namespace))
    may_create = await reviewer.allowed(user, Permission("create", "runs", run.namespace))
    children = await run_list(request, MultiDict({"parent": run.id, "limit": "100"}))
    # The Kubernetes side, read with the caller's own token: their RBAC decides.
    token = _header_token(request) or request.cookies.get(COOKIE) or ""
    kube = await kubernetes_side(
        request.app[RUNS].kube.api.configuration,
        token,
        namespace=run.namespace,
        name=detail.name,
        run_id=run.id,
    )
    context = {
        "user": user,
        "run": detail,
        "finished": detail.phase in TERMINAL_PHASES,
        "can_cancel": may_patch and detail.phase not in TERMINAL_PHASES,
        "can_replay": may_create,
        "children": children.items,
        "timeline": timeline(detail),
        "snippets": snippets(detail),
        "kube": kube,
    }
    return render("run.html", context)


# ---- the API for the pages' scripts -----------------------------------------------------


def _mirrored(handler: Page) -> Page:
    """An API handler, with the sign-in cookie as a credential when no header is sent; a
    change made with the cookie needs :data:`CSRF_HEADER`."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        if _header_token(request) is None:
            cookie = request.cookies.get(COOKIE)
            if not cookie:
                raise ApiError(401, "missing_token", f"sign in at {PREFIX}/signin, or send a bearer token")
            if request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != "1":
                raise ApiError(
                    403, "forbidden", f"a change made with the dashboard's cookie must send {CSRF_HEADER}: 1"
                )
            await authenticate_token(request, cookie)
        return await handler(request)

    return wrapped


def add_dashboard(app: web.Application, endpoints: Iterable[Endpoint]) -> None:
    """Adds the dashboard's routes to the public application: the pages, ``/dashboard/static``
    and, under ``/dashboard/api/v1``, each authenticated ``/api/v1`` endpoint."""
    app.router.add_get("/", index)
    app.router.add_get(f"{PREFIX}", index)
    app.router.add_get(f"{PREFIX}/", index)
    app.router.add_get(f"{PREFIX}/signin", signin_form)
    app.router.add_post(f"{PREFIX}/signin", signin)
    app.router.add_post(f"{PREFIX}/signout", signout)
    app.router.add_get(f"{PREFIX}/runs", runs_page)
    app.router.add_get(f"{PREFIX}/runs/{{id}}", run_page)
    app.router.add_get(f"{PREFIX}/tasks", tasks_page)
    app.router.add_get(f"{PREFIX}/queues", queues_page)
    app.router.add_static(f"{PREFIX}/static/", STATIC, append_version=False)
    for ep in endpoints:
        if ep.auth and ep.path.startswith("/api/v1/") and not ep.path.endswith("openapi.json"):
            app.router.add_route(ep.method, f"{PREFIX}{ep.path}", _mirrored(ep.handler))
