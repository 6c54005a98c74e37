"""The Python client of the public API (``/api/v1``): :class:`Client` (sync) and
:class:`AsyncClient`, with typed results (the models of :mod:`kubetask.apimodels`).
docs/client.md describes every method; :mod:`kubetask.sdk.credentials` how a client finds
the API and its token when not told.

Each method builds a :class:`_Call` (method, path, query, body); the two clients differ
only in how they send it, so both speak the API the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from kubetask.apimodels import (
    MAX_BATCH_ITEMS,
    TERMINAL_PHASES,
    BatchTriggerRequest,
    BatchTriggerResponse,
    BulkProgress,
    BulkRequest,
    BulkSummary,
    CancelResponse,
    EventRequest,
    EventResponse,
    LogLine,
    LogPage,
    LogStreamEnd,
    QueueItem,
    QueueList,
    QueueUpdate,
    ReplayRequest,
    ReplayResponse,
    RunDetail,
    RunList,
    RunSummary,
    ScheduleItem,
    ScheduleList,
    ScheduleUpdate,
    TaskItem,
    TaskList,
    TriggerRequest,
    TriggerResponse,
    duration_seconds,
    request_problem,
)
from kubetask.sdk.credentials import Connection, CredentialsError, StaticToken, discover

__all__ = ["ApiError", "AsyncClient", "Client", "Since"]

M = TypeVar("M", bound=BaseModel)
Since = str | datetime | timedelta
#: A duration: seconds, a timedelta, or "20s", "5m", "2h", "1d", "1h30m".
Duration = str | int | float | timedelta
"""A time filter: ISO-8601, a duration before now (``"24h"``, ``"7d"``, ``"1h30m"``), a
:class:`datetime` (naive means UTC) or a :class:`timedelta` before now."""

_UNSET: Final[Any] = object()
LIST_PAGE: Final = 500
LOG_PAGE: Final = 1000


class ApiError(Exception):
    """The API (or the way to it) answered an error: ``status`` (HTTP; 0 when nothing
    answered), ``code`` (stable, machine-readable, docs/api.md) and ``message`` (what to
    change; a 403 names the missing permission)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status} {code})" if status else message)
        self.status = status
        self.code = code
        self.message = message


# ---- calls --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    params: Sequence[tuple[str, str]] = ()
    body: BaseModel | None = None

    def json(self) -> Any:
        return (
            None
            if self.body is None
            else self.body.model_dump(by_alias=True, mode="json", exclude_unset=True)
        )


def _q(value: str) -> str:
    return quote(value, safe="")


def _time(value: Since | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, timedelta):
        return f"{max(1, int(value.total_seconds()))}s"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _many(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _request(model: type[M], data: Mapping[str, Any]) -> M:
    """Check a request body here, with the server's rules and messages."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ValueError(request_problem(e).message) from None


def _filters(
    task: str | Iterable[str] | None,
    status: str | Iterable[str] | None,
    since: Since | None,
    until: Since | None,
    tags: str | Iterable[str] | None,
    namespace: str | Iterable[str] | None,
    parent: str | None = None,
) -> list[tuple[str, str]]:
    params = [("task", t) for t in _many(task)]
    params += [("phase", p) for p in _many(status)]
    params += [("tag", t) for t in _many(tags)]
    params += [("namespace", n) for n in _many(namespace)]
    for name, value in (("since", _time(since)), ("until", _time(until))):
        if value is not None:
            params.append((name, value))
    if parent is not None:
        params.append(("parent", parent))
    return params


def _trigger_body(
    payload: Mapping[str, Any] | None,
    *,
    idempotency_key: str | None,
    idempotency_key_ttl_seconds: int | None,
    concurrency_key: str | None,
    priority: int | None,
    tags: Sequence[str] | None,
    max_attempts: int | None,
    ttl_seconds_after_finished: int | None,
    delay: Duration | datetime | None = None,
    ttl: Duration | None = None,
    debounce: Mapping[str, Any] | None = None,
) -> TriggerRequest:
    fields: dict[str, Any] = {
        "payload": dict(payload) if payload is not None else None,
        "idempotency_key": idempotency_key,
        "idempotency_key_ttl_seconds": idempotency_key_ttl_seconds,
        "concurrency_key": concurrency_key,
        "priority": priority,
        "tags": list(tags) if tags is not None else None,
        "max_attempts": max_attempts,
        "ttl_seconds_after_finished": ttl_seconds_after_finished,
    }
    if isinstance(delay, datetime):
        fields["not_before"] = delay if delay.tzinfo is not None else delay.replace(tzinfo=UTC)
    elif delay is not None:
        fields["delay_seconds"] = duration_seconds(delay, "delay")
    if ttl is not None:
        fields["ttl_seconds"] = duration_seconds(ttl, "ttl")
    if debounce is not None:
        fields["debounce"] = dict(debounce)
    return _request(TriggerRequest, {k: v for k, v in fields.items() if v is not None})


def _batch_items(items: Iterable[TriggerRequest | Mapping[str, Any]]) -> list[TriggerRequest]:
    out = []
    for i, item in enumerate(items):
        if isinstance(item, TriggerRequest):
            out.append(item)
            continue
        try:
            out.append(TriggerRequest.model_validate(item))
        except ValidationError as e:
            raise ValueError(f"items[{i}].{request_problem(e).message}") from None
    return out


def _bulk_body(
    task: str | Iterable[str] | None,
    status: str | Iterable[str] | None,
    since: Since | None,
    until: Since | None,
    tags: str | Iterable[str] | None,
    namespace: str | Iterable[str] | None,
    limit: int | None,
) -> BulkRequest:
    fields: dict[str, Any] = {
        "task": _many(task),
        "phase": _many(status),
        "tag": _many(tags),
        "namespace": _many(namespace),
        "since": _time(since),
        "until": _time(until),
    }
    if limit is not None:
        fields["limit"] = limit
    return _request(BulkRequest, {k: v for k, v in fields.items() if v})


def _queue_update(
    *, paused: Any = _UNSET, concurrency_limit: Any = _UNSET, per_key_concurrency_limit: Any = _UNSET
) -> QueueUpdate:
    fields = {
        "paused": paused,
        "concurrency_limit": concurrency_limit,
        "per_key_concurrency_limit": per_key_concurrency_limit,
    }
    return _request(QueueUpdate, {k: v for k, v in fields.items() if v is not _UNSET})


def _bulk_line(line: str) -> BulkProgress | BulkSummary:
    data = json.loads(line)
    if "summary" in data:
        return BulkSummary.model_validate(data)
    return BulkProgress.model_validate(data)


def _log_line(line: str) -> LogLine | LogStreamEnd:
    data = json.loads(line)
    if data.get("end"):
        return LogStreamEnd.model_validate(data)
    return LogLine.model_validate(data)


def _error(response: httpx.Response, conn: Connection, body: Any) -> ApiError:
    """The API's error body as an :class:`ApiError`; an answer of something else (the API
    server's proxy, a load balancer) explained."""
    status = response.status_code
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "code" in error and "message" in error:
        return ApiError(status, str(error["code"]), str(error["message"]))
    if isinstance(body, dict) and body.get("kind") == "Status":
        # The Kubernetes API server answered for the service proxy.
        message = str(body.get("message") or body.get("reason") or "")
        reason = str(body.get("reason") or "Error")
        hint = ""
        if status == 403:
            hint = (
                "; reaching the kubetask API through the Kubernetes API server needs `get` on "
                "`services/proxy` in its namespace (or set KUBETASK_API_URL to a URL you can reach)"
            )
        elif status == 503:
            hint = "; is the kubetask operator running (its API Service has no ready endpoint)?"
        elif status == 401:
            hint = "; the kubeconfig's credentials are not accepted by the Kubernetes API server"
        return ApiError(
            status, f"kubernetes_{reason.lower()}", f"the Kubernetes API server answered: {message}{hint}"
        )
    return ApiError(
        status,
        "unexpected_response",
        f"{response.request.method} {response.request.url} answered HTTP {status} that is not the kubetask "
        f"API's ({response.text[:200]!r}); the URL came from {conn.via}: is it right?",
    )


def _unreachable(conn: Connection, e: Exception) -> ApiError:
    return ApiError(
        0,
        "unreachable",
        f"cannot reach the kubetask API at {conn.base_url} ({type(e).__name__}: {e}); the URL came from "
        f"{conn.via}: pass api_url / --api-url or set KUBETASK_API_URL",
    )


def _timeout(run_id: str, phase: str, timeout: float) -> TimeoutError:
    return TimeoutError(
        f"run {run_id} is still {phase} after {timeout:g} s (it keeps going; wait again or cancel it)"
    )


def _connection(
    api_url: str | None, token: str | None, kubeconfig: str | None, context: str | None
) -> Connection:
    try:
        return discover(api_url=api_url, token=token, kubeconfig=kubeconfig, context=context)
    except CredentialsError as e:
        raise ApiError(0, "no_credentials", str(e)) from None


# ---- the sync client ---------------------------------------------------------------------


class Client:
    """The kubetask API, synchronously. ``Client()`` finds the API and a token by itself
    (docs/client.md, Credentials); ``namespace`` is the default of the methods that take
    one (else the kubeconfig context's, the pod's, or ``default``). Close it (or use
    ``with``) when done."""

    def __init__(
        self,
        api_url: str | None = None,
        token: str | None = None,
        *,
        namespace: str | None = None,
        timeout: float = 30.0,
        kubeconfig: str | None = None,
        context: str | None = None,
    ) -> None:
        self._conn = _connection(api_url, token, kubeconfig, context)
        self.namespace = namespace or self._conn.namespace
        self._http = httpx.Client(
            base_url=self._conn.base_url, verify=self._conn.verify, timeout=httpx.Timeout(timeout)
        )
        self.tasks = Tasks(self)
        self.runs = Runs(self)
        self.queues = Queues(self)
        self.events = Events(self)
        self.schedules = Schedules(self)

    @property
    def api_url(self) -> str:
        """The base URL requests go to."""
        return self._conn.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self) -> dict[str, str]:
        try:
            return self._conn.headers(self._conn.token.get())
        except CredentialsError as e:
            raise ApiError(0, "no_credentials", str(e)) from None

    def _send(self, call: _Call, *, stream: bool = False) -> httpx.Response:
        for retry in (False, True):
            request = self._http.build_request(
                call.method, call.path, params=list(call.params), json=call.json(), headers=self._headers()
            )
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                raise _unreachable(self._conn, e) from None
            if response.status_code == 401 and not retry and not isinstance(self._conn.token, StaticToken):
                # A token read from a file, a plugin or minted may be stale: a fresh one, once.
                response.close()
                self._conn.token.invalidate()
                continue
            if not response.is_success:
                response.read()
                try:
                    body = response.json()
                except ValueError:
                    body = None
                raise _error(response, self._conn, body)
            return response
        raise AssertionError("unreachable")

    def _model(self, model: type[M], call: _Call) -> M:
        return model.model_validate(self._send(call).json())

    def _lines(self, call: _Call) -> Iterator[str]:
        response = self._send(call, stream=True)
        try:
            for line in response.iter_lines():
                if line.strip():
                    yield line
        except httpx.TransportError as e:
            raise _unreachable(self._conn, e) from None
        finally:
            response.close()


class Tasks:
    """``client.tasks``: trigger runs, list Tasks."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def trigger(
        self,
        task: str,
        payload: Mapping[str, Any] | None = None,
        *,
        namespace: str | None = None,
        idempotency_key: str | None = None,
        idempotency_key_ttl_seconds: int | None = None,
        concurrency_key: str | None = None,
        priority: int | None = None,
        tags: Sequence[str] | None = None,
        max_attempts: int | None = None,
        ttl_seconds_after_finished: int | None = None,
        delay: Duration | datetime | None = None,
        ttl: Duration | None = None,
        debounce: Mapping[str, Any] | None = None,
    ) -> TriggerResponse:
        """Trigger one run of ``task``: a Run resource, created at once. With an
        ``idempotency_key`` still held by a run, that run is returned (``is_cached``).
        ``delay``: seconds, a timedelta, ``"20s"``-style, or a datetime to start at (the run
        is ``Delayed`` until then); ``ttl``: if it has not started that long after it may,
        it ends ``Expired``; ``debounce``: ``{"key", "delaySeconds", "mode", "maxDelaySeconds"}``
        (triggers with the same key in a burst are one run)."""
        body = _trigger_body(
            payload,
            idempotency_key=idempotency_key,
            idempotency_key_ttl_seconds=idempotency_key_ttl_seconds,
            concurrency_key=concurrency_key,
            priority=priority,
            tags=tags,
            max_attempts=max_attempts,
            ttl_seconds_after_finished=ttl_seconds_after_finished,
            delay=delay,
            ttl=ttl,
            debounce=debounce,
        )
        ns = namespace or self._c.namespace
        return self._c._model(
            TriggerResponse, _Call("POST", f"/api/v1/namespaces/{_q(ns)}/tasks/{_q(task)}/trigger", body=body)
        )

    def batch_trigger(
        self, task: str, items: Iterable[TriggerRequest | Mapping[str, Any]], *, namespace: str | None = None
    ) -> list[TriggerResponse]:
        """Trigger many runs of ``task``: each item a :class:`TriggerRequest` or a mapping of
        its fields (``{"payload": {...}, "idempotency_key": "..."}``). Sent
        :data:`MAX_BATCH_ITEMS` at a time; answers in the items' order."""
        ns = namespace or self._c.namespace
        requests = _batch_items(items)
        out: list[TriggerResponse] = []
        for start in range(0, len(requests), MAX_BATCH_ITEMS):
            body = BatchTriggerRequest(items=requests[start : start + MAX_BATCH_ITEMS])
            path = f"/api/v1/namespaces/{_q(ns)}/tasks/{_q(task)}/batch"
            out += self._c._model(BatchTriggerResponse, _Call("POST", path, body=body)).items
        return out

    def list(self, namespace: str | None = None) -> list[TaskItem]:
        """The namespace's Tasks with their unfinished runs counted by phase."""
        ns = namespace or self._c.namespace
        return self._c._model(TaskList, _Call("GET", f"/api/v1/namespaces/{_q(ns)}/tasks")).items


class Runs:
    """``client.runs``: list, read, follow, wait for, cancel and replay runs."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(
        self,
        task: str | Iterable[str] | None = None,
        *,
        status: str | Iterable[str] | None = None,
        since: Since | None = None,
        until: Since | None = None,
        tags: str | Iterable[str] | None = None,
        namespace: str | Iterable[str] | None = None,
        parent: str | None = None,
        limit: int | None = None,
    ) -> Iterator[RunSummary]:
        """Runs, newest first, every page fetched as needed; at most ``limit`` runs.
        ``status``: phases (any, case-insensitive); ``tags``: all must be present;
        ``namespace``: default every namespace you may list runs in; ``parent``: the
        children of that run (``ctx.trigger``)."""
        params = _filters(task, status, since, until, tags, namespace, parent)
        cursor: str | None = None
        count = 0
        while True:
            size = LIST_PAGE if limit is None else max(1, min(LIST_PAGE, limit - count))
            page = self.page(params=params, limit=size, cursor=cursor)
            for run in page.items:
                if limit is not None and count >= limit:
                    return
                count += 1
                yield run
            cursor = page.next_cursor
            if cursor is None or (limit is not None and count >= limit):
                return

    def page(
        self, *, params: Sequence[tuple[str, str]] = (), limit: int = 50, cursor: str | None = None
    ) -> RunList:
        """One page of ``GET /api/v1/runs`` (``params``: the query, as the API names it)."""
        query = [*params, ("limit", str(limit))] + ([("cursor", cursor)] if cursor else [])
        return self._c._model(RunList, _Call("GET", "/api/v1/runs", query))

    def retrieve(self, run_id: str) -> RunDetail:
        """One run: its state, payload, output and attempts."""
        return self._c._model(RunDetail, _Call("GET", f"/api/v1/runs/{_q(run_id)}"))

    def cancel(self, run_id: str) -> CancelResponse:
        """Ask the run to stop (``Canceled`` follows); ``ApiError`` 409 if it already ended."""
        return self._c._model(CancelResponse, _Call("POST", f"/api/v1/runs/{_q(run_id)}/cancel"))

    def replay(self, run_id: str, payload: dict[str, Any] | None = None) -> ReplayResponse:
        """A new run of the same task with the same payload (or ``payload``), labelled with
        the original's id."""
        body = ReplayRequest(payload=payload) if payload is not None else None
        return self._c._model(ReplayResponse, _Call("POST", f"/api/v1/runs/{_q(run_id)}/replay", body=body))

    def logs(
        self, run_id: str, *, follow: bool = False, attempt: int | None = None, after: int | None = None
    ) -> Iterator[LogLine]:
        """The run's log lines, oldest first; with ``follow``, new ones as they come, until
        the run has ended and every line was sent."""
        base = [("attempt", str(attempt))] if attempt is not None else []
        path = f"/api/v1/runs/{_q(run_id)}/logs"
        while True:
            if follow:
                query = [*base, ("follow", "true")] + ([("after", str(after))] if after is not None else [])
                for raw in self._c._lines(_Call("GET", path, query)):
                    item = _log_line(raw)
                    if isinstance(item, LogStreamEnd):
                        return
                    after = item.id
                    yield item
                continue  # the stream was cut before its end: continue after the last line
            query = [*base, ("limit", str(LOG_PAGE))] + ([("after", str(after))] if after is not None else [])
            page = self._c._model(LogPage, _Call("GET", path, query))
            yield from page.items
            after = page.next
            if len(page.items) < LOG_PAGE:
                return

    def wait(self, run_id: str, *, timeout: float | None = None, poll_interval: float = 1.0) -> RunDetail:
        """Poll until the run has ended; its final state. ``TimeoutError`` after
        ``timeout`` seconds (the run goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.retrieve(run_id)
            if run.phase in TERMINAL_PHASES:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                raise _timeout(run_id, run.phase, timeout or 0)
            pause = (
                poll_interval
                if deadline is None
                else min(poll_interval, max(0.0, deadline - time.monotonic()))
            )
            time.sleep(pause)

    def bulk_cancel(
        self,
        task: str | Iterable[str] | None = None,
        *,
        status: str | Iterable[str] | None = None,
        since: Since | None = None,
        until: Since | None = None,
        tags: str | Iterable[str] | None = None,
        namespace: str | Iterable[str] | None = None,
        limit: int | None = None,
    ) -> Iterator[BulkProgress | BulkSummary]:
        """Cancel every unfinished run the filters match: one :class:`BulkProgress` per run
        as it is done, then the :class:`BulkSummary`."""
        body = _bulk_body(task, status, since, until, tags, namespace, limit)
        for line in self._c._lines(_Call("POST", "/api/v1/runs/cancel", body=body)):
            yield _bulk_line(line)

    def bulk_replay(
        self,
        task: str | Iterable[str] | None = None,
        *,
        status: str | Iterable[str] | None = None,
        since: Since | None = None,
        until: Since | None = None,
        tags: str | Iterable[str] | None = None,
        namespace: str | Iterable[str] | None = None,
        limit: int | None = None,
    ) -> Iterator[BulkProgress | BulkSummary]:
        """Replay every run the filters match, as :meth:`bulk_cancel` reports."""
        body = _bulk_body(task, status, since, until, tags, namespace, limit)
        for line in self._c._lines(_Call("POST", "/api/v1/runs/replay", body=body)):
            yield _bulk_line(line)


class Queues:
    """``client.queues``: list, pause, resume, change limits."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self, namespace: str | None = None) -> list[QueueItem]:
        ns = namespace or self._c.namespace
        return self._c._model(QueueList, _Call("GET", f"/api/v1/namespaces/{_q(ns)}/queues")).items

    def _patch(self, name: str, namespace: str | None, body: QueueUpdate) -> QueueItem:
        ns = namespace or self._c.namespace
        return self._c._model(
            QueueItem, _Call("PATCH", f"/api/v1/namespaces/{_q(ns)}/queues/{_q(name)}", body=body)
        )

    def pause(self, name: str, *, namespace: str | None = None) -> QueueItem:
        """Admit nothing more from the queue (running pods go on)."""
        return self._patch(name, namespace, _queue_update(paused=True))

    def resume(self, name: str, *, namespace: str | None = None) -> QueueItem:
        return self._patch(name, namespace, _queue_update(paused=False))

    def set_limit(
        self,
        name: str,
        concurrency_limit: int | None = _UNSET,
        *,
        per_key_concurrency_limit: int | None = _UNSET,
        namespace: str | None = None,
    ) -> QueueItem:
        """Change the queue's limits; ``None`` removes one, an omitted one stays as is."""
        body = _queue_update(
            concurrency_limit=concurrency_limit, per_key_concurrency_limit=per_key_concurrency_limit
        )
        return self._patch(name, namespace, body)


class Events:
    """``client.events``: send events to runs waiting for them (``ctx.wait_for_event``)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def send(
        self, name: str, data: dict[str, Any] | None = None, *, namespace: str | None = None
    ) -> EventResponse:
        """Store the event and resume the runs of ``namespace`` waiting for it."""
        body = EventRequest(name=name, namespace=namespace or self._c.namespace, data=data or {})
        return self._c._model(EventResponse, _Call("POST", "/api/v1/events", body=body))


class Schedules:
    """``client.schedules``: list, read, pause, resume, trigger now (docs/schedules.md)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self, namespace: str | None = None) -> list[ScheduleItem]:
        """The namespace's Schedules, by name, with their next and last fire times."""
        ns = namespace or self._c.namespace
        return self._c._model(ScheduleList, _Call("GET", f"/api/v1/namespaces/{_q(ns)}/schedules")).items

    def retrieve(self, name: str, *, namespace: str | None = None) -> ScheduleItem:
        return self._c._model(ScheduleItem, _Call("GET", _schedule_path(self._c.namespace, name, namespace)))

    def pause(self, name: str, *, namespace: str | None = None) -> ScheduleItem:
        """Fire nothing until resumed (runs already started go on)."""
        path = _schedule_path(self._c.namespace, name, namespace)
        return self._c._model(ScheduleItem, _Call("PATCH", path, body=ScheduleUpdate(paused=True)))

    def resume(self, name: str, *, namespace: str | None = None) -> ScheduleItem:
        """Fire again from the next fire time (those it was paused over are not caught up)."""
        path = _schedule_path(self._c.namespace, name, namespace)
        return self._c._model(ScheduleItem, _Call("PATCH", path, body=ScheduleUpdate(paused=False)))

    def trigger_now(self, name: str, *, namespace: str | None = None) -> TriggerResponse:
        """One run of the Schedule's task now, with its payload (``timestamp``: now)."""
        path = _schedule_path(self._c.namespace, name, namespace) + "/trigger"
        return self._c._model(TriggerResponse, _Call("POST", path))


def _schedule_path(default: str, name: str, namespace: str | None) -> str:
    return f"/api/v1/namespaces/{_q(namespace or default)}/schedules/{_q(name)}"


# ---- the async client --------------------------------------------------------------------


class AsyncClient:
    """The kubetask API for asyncio: :class:`Client`'s methods, awaited (``list``, ``logs``
    and the bulk actions are async iterators)."""

    def __init__(
        self,
        api_url: str | None = None,
        token: str | None = None,
        *,
        namespace: str | None = None,
        timeout: float = 30.0,
        kubeconfig: str | None = None,
        context: str | None = None,
    ) -> None:
        self._conn = _connection(api_url, token, kubeconfig, context)
        self.namespace = namespace or self._conn.namespace
        self._http = httpx.AsyncClient(
            base_url=self._conn.base_url, verify=self._conn.verify, timeout=httpx.Timeout(timeout)
        )
        self.tasks = AsyncTasks(self)
        self.runs = AsyncRuns(self)
        self.queues = AsyncQueues(self)
        self.events = AsyncEvents(self)
        self.schedules = AsyncSchedules(self)

    @property
    def api_url(self) -> str:
        return self._conn.base_url

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _headers(self) -> dict[str, str]:
        source = self._conn.token
        try:
            # A file read, a plugin or a TokenRequest: in a thread, not in the event loop.
            token = source.cached()
            if token is None:
                token = await asyncio.to_thread(source.get)
            proxy = self._conn.proxy_headers
            if proxy is not None and proxy.cached() is None:
                return await asyncio.to_thread(self._conn.headers, token)
            return self._conn.headers(token)
        except CredentialsError as e:
            raise ApiError(0, "no_credentials", str(e)) from None

    async def _send(self, call: _Call, *, stream: bool = False) -> httpx.Response:
        for retry in (False, True):
            request = self._http.build_request(
                call.method,
                call.path,
                params=list(call.params),
                json=call.json(),
                headers=await self._headers(),
            )
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                raise _unreachable(self._conn, e) from None
            if response.status_code == 401 and not retry and not isinstance(self._conn.token, StaticToken):
                await response.aclose()
                self._conn.token.invalidate()
                continue
            if not response.is_success:
                await response.aread()
                try:
                    body = response.json()
                except ValueError:
                    body = None
                raise _error(response, self._conn, body)
            return response
        raise AssertionError("unreachable")

    async def _model(self, model: type[M], call: _Call) -> M:
        return model.model_validate((await self._send(call)).json())

    async def _lines(self, call: _Call) -> AsyncIterator[str]:
        response = await self._send(call, stream=True)
        try:
            async for line in response.aiter_lines():
                if line.strip():
                    yield line
        except httpx.TransportError as e:
            raise _unreachable(self._conn, e) from None
        finally:
            await response.aclose()


class AsyncTasks:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def trigger(
        self,
        task: str,
        payload: Mapping[str, Any] | None = None,
        *,
        namespace: str | None = None,
        idempotency_key: str | None = None,
        idempotency_key_ttl_seconds: int | None = None,
        concurrency_key: str | None = None,
        priority: int | None = None,
        tags: Sequence[str] | None = None,
        max_attempts: int | None = None,
        ttl_seconds_after_finished: int | None = None,
        delay: Duration | datetime | None = None,
        ttl: Duration | None = None,
        debounce: Mapping[str, Any] | None = None,
    ) -> TriggerResponse:
        body = _trigger_body(
            payload,
            idempotency_key=idempotency_key,
            idempotency_key_ttl_seconds=idempotency_key_ttl_seconds,
            concurrency_key=concurrency_key,
            priority=priority,
            tags=tags,
            max_attempts=max_attempts,
            ttl_seconds_after_finished=ttl_seconds_after_finished,
            delay=delay,
            ttl=ttl,
            debounce=debounce,
        )
        ns = namespace or self._c.namespace
        return await self._c._model(
            TriggerResponse, _Call("POST", f"/api/v1/namespaces/{_q(ns)}/tasks/{_q(task)}/trigger", body=body)
        )

    async def batch_trigger(
        self, task: str, items: Iterable[TriggerRequest | Mapping[str, Any]], *, namespace: str | None = None
    ) -> list[TriggerResponse]:
        ns = namespace or self._c.namespace
        requests = _batch_items(items)
        out: list[TriggerResponse] = []
        for start in range(0, len(requests), MAX_BATCH_ITEMS):
            body = BatchTriggerRequest(items=requests[start : start + MAX_BATCH_ITEMS])
            path = f"/api/v1/namespaces/{_q(ns)}/tasks/{_q(task)}/batch"
            out += (await self._c._model(BatchTriggerResponse, _Call("POST", path, body=body))).items
        return out

    async def list(self, namespace: str | None = None) -> list[TaskItem]:
        ns = namespace or self._c.namespace
        return (await self._c._model(TaskList, _Call("GET", f"/api/v1/namespaces/{_q(ns)}/tasks"))).items


class AsyncRuns:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(
        self,
        task: str | Iterable[str] | None = None,
        *,
        status: str | Iterable[str] | None = None,
        since: Since | None = None,
        until: Since | None = None,
        tags: str | Iterable[str] | None = None,
        namespace: str | Iterable[str] | None = None,
        parent: str | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[RunSummary]:
        params = _filters(task, status, since, until, tags, namespace, parent)
        cursor: str | None = None
        count = 0
        while True:
            size = LIST_PAGE if limit is None else max(1, min(LIST_PAGE, limit - count))
            page = await self.page(params=params, limit=size, cursor=cursor)
            for run in page.items:
                if limit is not None and count >= limit:
                    return
                count += 1
                yield run
            cursor = page.next_cursor
            if cursor is None or (limit is not None and count >= limit):
                return

    async def page(
        self, *, params: Sequence[tuple[str, str]] = (), limit: int = 50, cursor: str | None = None
    ) -> RunList:
        query = [*params, ("limit", str(limit))] + ([("cursor", cursor)] if cursor else [])
        return await self._c._model(RunList, _Call("GET", "/api/v1/runs", query))

    async def retrieve(self, run_id: str) -> RunDetail:
        return await self._c._model(RunDetail, _Call("GET", f"/api/v1/runs/{_q(run_id)}"))

    async def cancel(self, run_id: str) -> CancelResponse:
        return await self._c._model(CancelResponse, _Call("POST", f"/api/v1/runs/{_q(run_id)}/cancel"))

    async def replay(self, run_id: str, payload: dict[str, Any] | None = None) -> ReplayResponse:
        body = ReplayRequest(payload=payload) if payload is not None else None
        return await self._c._model(
            ReplayResponse, _Call("POST", f"/api/v1/runs/{_q(run_id)}/replay", body=body)
        )

    async def logs(
        self, run_id: str, *, follow: bool = False, attempt: int | None = None, after: int | None = None
    ) -> AsyncIterator[LogLine]:
        base = [("attempt", str(attempt))] if attempt is not None else []
        path = f"/api/v1/runs/{_q(run_id)}/logs"
        while True:
            if follow:
                query = [*base, ("follow", "true")] + ([("after", str(after))] if after is not None else [])
                async for raw in self._c._lines(_Call("GET", path, query)):
                    item = _log_line(raw)
                    if isinstance(item, LogStreamEnd):
                        return
                    after = item.id
                    yield item
                continue
            query = [*base, ("limit", str(LOG_PAGE))] + ([("after", str(after))] if after is not None else [])
            page = await self._c._model(LogPage, _Call("GET", path, query))
            for line in page.items:
                yield line
            after = page.next
            if len(page.items) < LOG_PAGE:
                return

    # The same signature as Client.runs.wait; the TimeoutError names the run and its phase.
    async def wait(
        self,
        run_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        poll_interval: float = 1.0,
    ) -> RunDetail:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = await self.retrieve(run_id)
            if run.phase in TERMINAL_PHASES:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                raise _timeout(run_id, run.phase, timeout or 0)
            pause = (
                poll_interval
                if deadline is None
                else min(poll_interval, max(0.0, deadline - time.monotonic()))
            )
            await asyncio.sleep(pause)

    async def bulk_cancel(
        self,
        task: str | Iterable[str] | None = None,
        *,
        status: str | Iterable[str] | None = None,
        since: Since | None = None,
        until: Since | None = None,
        tags: str | Iterable[str] | None = None,
        namespace: str | Iterable[str] | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[BulkProgress | BulkSummary]:
        body = _bulk_body(task, status, since, until, tags, namespace, limit)
        async for line in self._c._lines(_Call("POST", "/api/v1/runs/cancel", body=body)):
            yield _bulk_line(line)

    async def bulk_replay(
        self,
        task: str | Iterable[str] | None = None,
        *,
        status: str | Iterable[str] | None = None,
        since: Since | None = None,
        until: Since | None = None,
        tags: str | Iterable[str] | None = None,
        namespace: str | Iterable[str] | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[BulkProgress | BulkSummary]:
        body = _bulk_body(task, status, since, until, tags, namespace, limit)
        async for line in self._c._lines(_Call("POST", "/api/v1/runs/replay", body=body)):
            yield _bulk_line(line)


class AsyncEvents:
    """``client.events`` of the async client."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def send(
        self, name: str, data: dict[str, Any] | None = None, *, namespace: str | None = None
    ) -> EventResponse:
        body = EventRequest(name=name, namespace=namespace or self._c.namespace, data=data or {})
        return await self._c._model(EventResponse, _Call("POST", "/api/v1/events", body=body))


class AsyncQueues:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self, namespace: str | None = None) -> list[QueueItem]:
        ns = namespace or self._c.namespace
        return (await self._c._model(QueueList, _Call("GET", f"/api/v1/namespaces/{_q(ns)}/queues"))).items

    async def _patch(self, name: str, namespace: str | None, body: QueueUpdate) -> QueueItem:
        ns = namespace or self._c.namespace
        path = f"/api/v1/namespaces/{_q(ns)}/queues/{_q(name)}"
        return await self._c._model(QueueItem, _Call("PATCH", path, body=body))

    async def pause(self, name: str, *, namespace: str | None = None) -> QueueItem:
        return await self._patch(name, namespace, _queue_update(paused=True))

    async def resume(self, name: str, *, namespace: str | None = None) -> QueueItem:
        return await self._patch(name, namespace, _queue_update(paused=False))

    async def set_limit(
        self,
        name: str,
        concurrency_limit: int | None = _UNSET,
        *,
        per_key_concurrency_limit: int | None = _UNSET,
        namespace: str | None = None,
    ) -> QueueItem:
        body = _queue_update(
            concurrency_limit=concurrency_limit, per_key_concurrency_limit=per_key_concurrency_limit
        )
        return await self._patch(name, namespace, body)


class AsyncSchedules:
    """``client.schedules`` of the async client."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self, namespace: str | None = None) -> list[ScheduleItem]:
        ns = namespace or self._c.namespace
        call = _Call("GET", f"/api/v1/namespaces/{_q(ns)}/schedules")
        return (await self._c._model(ScheduleList, call)).items

    async def retrieve(self, name: str, *, namespace: str | None = None) -> ScheduleItem:
        return await self._c._model(
            ScheduleItem, _Call("GET", _schedule_path(self._c.namespace, name, namespace))
        )

    async def pause(self, name: str, *, namespace: str | None = None) -> ScheduleItem:
        path = _schedule_path(self._c.namespace, name, namespace)
        return await self._c._model(ScheduleItem, _Call("PATCH", path, body=ScheduleUpdate(paused=True)))

    async def resume(self, name: str, *, namespace: str | None = None) -> ScheduleItem:
        path = _schedule_path(self._c.namespace, name, namespace)
        return await self._c._model(ScheduleItem, _Call("PATCH", path, body=ScheduleUpdate(paused=False)))

    async def trigger_now(self, name: str, *, namespace: str | None = None) -> TriggerResponse:
        path = _schedule_path(self._c.namespace, name, namespace) + "/trigger"
        return await self._c._model(TriggerResponse, _Call("POST", path))
