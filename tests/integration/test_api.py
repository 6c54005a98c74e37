"""The HTTP API against a real PostgreSQL: runner token auth, payload, logs, results, and
the public listing with its filters and pagination."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.api import make_app
from kubetask.control.leadership import Leadership
from kubetask.kube import Kube
from kubetask.protocol import MAX_LOG_MESSAGE_BYTES, MAX_OUTPUT_BYTES, TRUNCATED
from kubetask.settings import Settings
from kubetask.store.tables import Attempt, LogLine, Run

pytestmark = [pytest.mark.db, pytest.mark.asyncio(loop_scope="session")]

Sessions = async_sessionmaker[AsyncSession]


class Listeners:
    """Both listeners of one operator, as these tests call them: ``/runner/v1`` paths go to
    the runner listener, the others to the public one, with a token that may read every
    run (unless the request brings its own ``Authorization``)."""

    def __init__(self, runner: TestClient[Any, Any], public: TestClient[Any, Any], token: str) -> None:
        self.runner, self.public, self.token = runner, public, token

    def _pick(self, path: str, kwargs: dict[str, Any]) -> TestClient[Any, Any]:
        if path.startswith("/runner/"):
            return self.runner
        kwargs["headers"] = {"Authorization": f"Bearer {self.token}", **(kwargs.get("headers") or {})}
        return self.public

    async def get(self, path: str, **kwargs: Any) -> Any:
        return await self._pick(path, kwargs).get(path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Any:
        return await self._pick(path, kwargs).post(path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Any:
        return await self._pick(path, kwargs).delete(path, **kwargs)

    def make_url(self, path: str) -> Any:
        return self.public.make_url(path)


@pytest_asyncio.fixture(loop_scope="session")
async def client(sessions: Sessions, kube: Kube, reader_token: str) -> AsyncIterator[Listeners]:
    apps = make_app(sessions=sessions, settings=Settings(), kube=kube)
    async with TestClient(TestServer(apps.runner)) as runner, TestClient(TestServer(apps.public)) as public:
        yield Listeners(runner, public, reader_token)


def _id(prefix: str = "run") -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


async def add_run(sessions: Sessions, **fields: Any) -> Run:
    run_id = fields.pop("id", None) or _id()
    values: dict[str, Any] = {
        "id": run_id,
        "namespace": "default",
        "name": run_id,
        "uid": secrets.token_hex(16),
        "task": "hello",
        "queue": "default/hello",
        "phase": "Running",
        "attempt": 1,
        "max_attempts": 3,
        "payload": {"who": "world"},
        "tags": [],
    }
    values.update(fields)
    run = Run(**values)
    async with sessions() as s, s.begin():
        s.add(run)
    return run


async def add_attempt(sessions: Sessions, run_id: str, number: int = 1, **fields: Any) -> str:
    """Insert an attempt; returns its token."""
    token = secrets.token_urlsafe(32)
    attempt = Attempt(
        run_id=run_id,
        number=number,
        pod_name=f"{run_id}-{number}",
        token_hash=hashlib.sha256(token.encode()).hexdigest(),
        **fields,
    )
    async with sessions() as s, s.begin():
        s.add(attempt)
    return token


async def running(sessions: Sessions, **fields: Any) -> tuple[Run, str]:
    run = await add_run(sessions, **fields)
    return run, await add_attempt(sessions, run.id, run.attempt)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def error_of(resp: Any, status: int) -> dict[str, str]:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return dict(body["error"])


# ---- runner: auth and payload ---------------------------------------------------------


async def test_attempt_returns_the_payload_and_marks_the_start(client: Listeners, sessions: Sessions) -> None:
    run, token = await running(sessions, tags=["a", "b"], payload={"n": 1, "nested": {"x": [1, 2]}})
    resp = await client.get("/runner/v1/attempt", headers=auth(token))
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {
        "run": {"id": run.id, "name": run.name, "namespace": "default", "tags": ["a", "b"]},
        "task": {"id": "hello"},
        "attempt": {"number": 1, "maxAttempts": 3},
        "payload": {"n": 1, "nested": {"x": [1, 2]}},
    }
    async with sessions() as s:
        started = await s.scalar(select(Attempt.started_at).where(Attempt.run_id == run.id))
    assert started is not None
    # A second call keeps the first start time.
    assert (await client.get("/runner/v1/attempt", headers=auth(token))).status == 200
    async with sessions() as s:
        assert await s.scalar(select(Attempt.started_at).where(Attempt.run_id == run.id)) == started


async def test_missing_and_wrong_tokens_are_refused(client: Listeners, sessions: Sessions) -> None:
    await running(sessions)
    err = await error_of(await client.get("/runner/v1/attempt"), 401)
    assert err["code"] == "missing_token" and "Authorization: Bearer" in err["message"]
    err = await error_of(await client.get("/runner/v1/attempt", headers={"Authorization": "Basic x"}), 401)
    assert err["code"] == "missing_token"
    err = await error_of(await client.get("/runner/v1/attempt", headers=auth("not-a-token")), 401)
    assert err["code"] == "invalid_token"
    resp = await client.post("/runner/v1/logs", headers=auth("nope"), json={"lines": []})
    assert (await error_of(resp, 401))["code"] == "invalid_token"


async def test_tokens_of_finished_or_old_attempts_are_refused(client: Listeners, sessions: Sessions) -> None:
    run, token = await running(sessions)
    async with sessions() as s, s.begin():
        attempt = await s.get(Attempt, (run.id, 1))
        assert attempt is not None
        attempt.finished_at = datetime.now(UTC)
    err = await error_of(await client.get("/runner/v1/attempt", headers=auth(token)), 401)
    assert err["code"] == "attempt_finished" and run.id in err["message"]

    # Attempt 1's token once attempt 2 is the current one.
    run2 = await add_run(sessions, attempt=2)
    old = await add_attempt(sessions, run2.id, 1)
    new = await add_attempt(sessions, run2.id, 2)
    assert (await error_of(await client.get("/runner/v1/attempt", headers=auth(old)), 401))["code"] == (
        "attempt_finished"
    )
    assert (await client.get("/runner/v1/attempt", headers=auth(new))).status == 200

    # A run that is no longer Running.
    _, token3 = await running(sessions, phase="Canceled")
    err = await error_of(await client.post("/runner/v1/complete", headers=auth(token3), json={}), 400)
    resp = await client.post(
        "/runner/v1/complete", headers=auth(token3), json={"status": "succeeded", "output": 1}
    )
    err = await error_of(resp, 401)
    assert err["code"] == "run_not_running" and "Canceled" in err["message"]


# ---- runner: logs ---------------------------------------------------------------------


async def test_logs_are_stored_and_read_back_in_order(client: Listeners, sessions: Sessions) -> None:
    run, token = await running(sessions)
    batches = [
        [
            {"ts": "2024-05-01T12:00:00Z", "level": "info", "stream": "stdout", "message": f"line {i}"}
            for i in range(5)
        ],
        [
            {"ts": 1714564800.5, "level": "error", "stream": "stderr", "message": "boom"},
            {"message": "defaults"},
        ],
    ]
    for lines in batches:
        resp = await client.post("/runner/v1/logs", headers=auth(token), json={"lines": lines})
        assert resp.status == 204, await resp.text()

    resp = await client.get(f"/api/v1/runs/{run.id}/logs")
    assert resp.status == 200
    body = await resp.json()
    messages = [item["message"] for item in body["items"]]
    assert messages == [f"line {i}" for i in range(5)] + ["boom", "defaults"]
    ids = [item["id"] for item in body["items"]]
    assert ids == sorted(ids) and body["next"] == ids[-1]
    first = body["items"][0]
    assert first == {
        "id": ids[0],
        "attempt": 1,
        "ts": "2024-05-01T12:00:00.000000Z",
        "level": "info",
        "stream": "stdout",
        "message": "line 0",
    }
    assert body["items"][5]["ts"] == "2024-05-01T12:00:00.500000Z"
    assert body["items"][6]["level"] == "info" and body["items"][6]["stream"] == "stdout"

    # Paging with after= and limit=.
    page = await (
        await client.get(f"/api/v1/runs/{run.id}/logs", params={"after": ids[1], "limit": 2})
    ).json()
    assert [i["id"] for i in page["items"]] == ids[2:4] and page["next"] == ids[3]
    tail = await (await client.get(f"/api/v1/runs/{run.id}/logs", params={"after": ids[-1]})).json()
    assert tail == {"items": [], "next": ids[-1]}
    other = await (await client.get(f"/api/v1/runs/{run.id}/logs", params={"attempt": 2})).json()
    assert other == {"items": [], "next": None}


async def test_log_limits(client: Listeners, sessions: Sessions) -> None:
    run, token = await running(sessions)
    too_many = {"lines": [{"message": "x"}] * 1001}
    err = await error_of(await client.post("/runner/v1/logs", headers=auth(token), json=too_many), 413)
    assert "1000" in err["message"]

    huge = "é" * MAX_LOG_MESSAGE_BYTES  # twice the cap in UTF-8 bytes
    lines = [
        {"message": huge},
        {"message": "nul\x00byte"},
        {"message": "x", "level": "a-very-long-level-name"},
    ]
    assert (await client.post("/runner/v1/logs", headers=auth(token), json={"lines": lines})).status == 204
    async with sessions() as s:
        stored = (
            await s.execute(select(LogLine).where(LogLine.run_id == run.id).order_by(LogLine.id))
        ).scalars()
        rows = list(stored)
    assert len(rows[0].message.encode()) <= MAX_LOG_MESSAGE_BYTES and rows[0].message.endswith(TRUNCATED)
    assert rows[1].message == "nul\ufffdbyte"
    assert rows[2].level == "a-very-long-leve"

    bad: dict[str, Any] = {"lines": [{"message": 42}]}
    err = await error_of(await client.post("/runner/v1/logs", headers=auth(token), json=bad), 400)
    assert "lines[0].message" in err["message"]
    bad = {"lines": [{"message": "x", "ts": "yesterday"}]}
    err = await error_of(await client.post("/runner/v1/logs", headers=auth(token), json=bad), 400)
    assert "lines[0].ts" in err["message"]
    resp = await client.post("/runner/v1/logs", headers=auth(token), data=b"{not json")
    assert (await error_of(resp, 400))["code"] == "invalid_json"


# ---- runner: results ------------------------------------------------------------------


async def test_complete_stores_the_output_once(client: Listeners, sessions: Sessions) -> None:
    run, token = await running(sessions)
    output = {"greeting": "héllo", "n": [1, 2, 3]}
    resp = await client.post(
        "/runner/v1/complete", headers=auth(token), json={"status": "succeeded", "output": output}
    )
    assert resp.status == 204, await resp.text()
    async with sessions() as s:
        stored = await s.get(Run, run.id)
        attempt = await s.get(Attempt, (run.id, 1))
    assert stored is not None and attempt is not None
    assert stored.output == output and stored.has_output
    assert stored.output_bytes == len(json.dumps(output, ensure_ascii=False, separators=(",", ":")).encode())
    assert stored.phase == "Running"  # the operator moves the run when the pod ends
    assert attempt.report == {"succeeded": True, "retryable": False, "error": None}

    again = {"status": "failed", "error": {"type": "X", "message": "y"}}
    err = await error_of(await client.post("/runner/v1/complete", headers=auth(token), json=again), 409)
    assert err["code"] == "already_completed"

    detail = await (await client.get(f"/api/v1/runs/{run.id}")).json()
    assert detail["output"] == output and detail["hasOutput"] is True


async def test_complete_failure_and_falsy_outputs(client: Listeners, sessions: Sessions) -> None:
    run, token = await running(sessions)
    body = {
        "status": "failed",
        "error": {"type": "ValueError", "message": "bad input", "stack": "Traceback ..."},
        "retryable": False,
    }
    assert (await client.post("/runner/v1/complete", headers=auth(token), json=body)).status == 204
    async with sessions() as s:
        attempt = await s.get(Attempt, (run.id, 1))
        stored = await s.get(Run, run.id)
    assert attempt is not None and stored is not None
    assert attempt.report == {
        "succeeded": False,
        "retryable": False,
        "error": {"type": "ValueError", "message": "bad input", "stack": "Traceback ...", "types": []},
        "retryAt": None,
        "skipped": False,
    }
    assert not stored.has_output

    run2, token2 = await running(sessions)
    assert (
        await client.post("/runner/v1/complete", headers=auth(token2), json={"status": "succeeded"})
    ).status == 204
    detail = await (await client.get(f"/api/v1/runs/{run2.id}")).json()
    assert detail["hasOutput"] is True and detail["output"] is None

    _, token3 = await running(sessions)
    err = await error_of(
        await client.post("/runner/v1/complete", headers=auth(token3), json={"status": "ok"}), 400
    )
    assert "succeeded" in err["message"]
    resp = await client.post("/runner/v1/complete", headers=auth(token3), json={"status": "failed"})
    assert "error" in (await error_of(resp, 400))["message"]


async def test_a_failure_keeps_its_hierarchy_stack_and_retry_time_for_the_run_detail(
    client: Listeners, sessions: Sessions
) -> None:
    run, token = await running(sessions)
    types = ["billing.Declined", "billing.PaymentError", "builtins.Exception", "builtins.BaseException"]
    body: dict[str, Any] = {
        "status": "failed",
        "error": {
            "type": "Declined",
            "message": "card declined",
            "stack": "Traceback: line 3",
            "types": types,
        },
        "retryAt": "2030-01-01T01:00:00+01:00",
    }
    assert (await client.post("/runner/v1/complete", headers=auth(token), json=body)).status == 204
    async with sessions() as s, s.begin():
        attempt = await s.get(Attempt, (run.id, 1))
        assert attempt is not None
        assert attempt.report == {
            "succeeded": False,
            "retryable": True,
            "error": {**body["error"]},
            "retryAt": "2030-01-01T00:00:00.000000Z",
            "skipped": False,
        }
        # What the operator records when the pod's end is seen (control/attempts.py).
        attempt.error, attempt.reason = {"type": "Declined", "message": "card declined"}, "TaskFailed"
    detail = await (await client.get(f"/api/v1/runs/{run.id}")).json()
    assert detail["attempts"][0]["error"] == {
        "type": "Declined",
        "message": "card declined",
        "stack": "Traceback: line 3",
        "types": types,
    }

    _, token2 = await running(sessions)
    contradiction = {**body, "retryable": False}
    err = await error_of(
        await client.post("/runner/v1/complete", headers=auth(token2), json=contradiction), 400
    )
    assert err["code"] == "invalid_result" and '"retryAt" needs "retryable": true' in err["message"]
    naive = {**body, "retryAt": "2030-01-01T00:00:00"}
    err = await error_of(await client.post("/runner/v1/complete", headers=auth(token2), json=naive), 400)
    assert "retryAt='2030-01-01T00:00:00' is not an RFC 3339 time with an offset" in err["message"]


async def test_output_over_10_mib_is_refused(client: Listeners, sessions: Sessions) -> None:
    run, token = await running(sessions)
    big = {"status": "succeeded", "output": "x" * (MAX_OUTPUT_BYTES + 10)}
    err = await error_of(await client.post("/runner/v1/complete", headers=auth(token), json=big), 413)
    assert err["code"] == "output_too_large" and "10 MiB" in err["message"]
    bigger = {"status": "succeeded", "output": "x" * (MAX_OUTPUT_BYTES + 2 * 1024 * 1024)}
    err = await error_of(await client.post("/runner/v1/complete", headers=auth(token), json=bigger), 413)
    assert "10 MiB" in err["message"]
    # Nothing was recorded: the attempt may still report a (smaller) result.
    resp = await client.post(
        "/runner/v1/complete", headers=auth(token), json={"status": "succeeded", "output": 1}
    )
    assert resp.status == 204
    async with sessions() as s:
        assert (await s.get(Run, run.id)).output == 1  # type: ignore[union-attr]


# ---- public: runs ---------------------------------------------------------------------


async def _thirty_runs(sessions: Sessions) -> tuple[str, list[Run]]:
    """30 runs in a namespace of their own, newest first; two pairs share created_at."""
    ns = f"ns-{secrets.token_hex(4)}"
    base = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    phases = ["Succeeded", "Failed", "Running", "Queued", "Canceled"]
    runs = []
    for i in range(30):
        created = base - timedelta(minutes=i if i not in (11, 21) else i - 1)
        runs.append(
            await add_run(
                sessions,
                namespace=ns,
                task="alpha" if i % 2 == 0 else "beta",
                phase=phases[i % 5],
                tags=["even", f"mod3-{i % 3}"] if i % 2 == 0 else [f"mod3-{i % 3}"],
                created_at=created,
                priority=i,
            )
        )
    runs.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    return ns, runs


async def _list(client: Listeners, params: Any) -> list[dict[str, Any]]:
    resp = await client.get("/api/v1/runs", params=params)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["nextCursor"] is None
    return list(body["items"])


async def test_runs_pagination(client: Listeners, sessions: Sessions) -> None:
    ns, runs = await _thirty_runs(sessions)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"namespace": ns, "limit": "7"} | ({"cursor": cursor} if cursor else {})
        resp = await client.get("/api/v1/runs", params=params)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["nextCursor"]
        if cursor is None:
            break
    assert pages == 5 and seen == [r.id for r in runs]

    items = await _list(client, {"namespace": ns, "limit": "30"})
    first = items[0]
    assert first["id"] == runs[0].id and first["createdAt"] == "2024-05-01T12:00:00.000000Z"
    assert set(first) == {
        "id", "namespace", "name", "task", "queue", "phase", "attempt", "maxAttempts", "tags", "concurrencyKey",
        "idempotencyKey", "priority", "createdAt", "startedAt", "finishedAt", "error", "reason", "message",
        "originalRunId", "parentRunId", "resumes",
    }  # fmt: skip
    page = await (await client.get("/api/v1/runs", params={"namespace": ns})).json()
    assert len(page["items"]) == 30 and page["nextCursor"] is None  # default limit 50


async def test_runs_filters(client: Listeners, sessions: Sessions) -> None:
    ns, runs = await _thirty_runs(sessions)

    def ids(pred: Any) -> list[str]:
        return [r.id for r in runs if pred(r)]

    async def got(**params: Any) -> list[str]:
        query = [("namespace", ns)] + [
            (k, v) for k, vs in params.items() for v in (vs if isinstance(vs, list) else [vs])
        ]
        return [item["id"] for item in await _list(client, query)]

    assert await got(task="alpha") == ids(lambda r: r.task == "alpha")
    assert await got(phase="Running") == ids(lambda r: r.phase == "Running")
    assert await got(phase="running,Queued") == ids(lambda r: r.phase in ("Running", "Queued"))
    assert await got(phase=["Failed", "Canceled"]) == ids(lambda r: r.phase in ("Failed", "Canceled"))
    assert await got(tag="even") == ids(lambda r: "even" in r.tags)
    assert await got(tag=["even", "mod3-0"]) == ids(lambda r: {"even", "mod3-0"} <= set(r.tags))
    assert await got(task="beta", tag="even") == []
    cut = datetime(2024, 5, 1, 11, 50, tzinfo=UTC)
    assert await got(since="2024-05-01T11:50:00Z") == ids(lambda r: r.created_at >= cut)
    assert await got(until="2024-05-01T11:50:00+00:00") == ids(lambda r: r.created_at < cut)
    assert await got(since="2024-05-01T11:50:00") == ids(lambda r: r.created_at >= cut)  # naive: UTC
    assert await got(since="1h") == []  # these runs are from 2024
    assert await got(until="1h") == [r.id for r in runs]
    assert await got(since="100000w") == [r.id for r in runs]
    assert await got(namespace="elsewhere") == [r.id for r in runs]  # namespaces OR together


async def test_runs_bad_queries(client: Listeners) -> None:
    err = await error_of(await client.get("/api/v1/runs", params={"since": "yesterday"}), 400)
    assert err["code"] == "invalid_time" and "'yesterday'" in err["message"] and "24h" in err["message"]
    err = await error_of(await client.get("/api/v1/runs", params={"until": "3x"}), 400)
    assert "'3x'" in err["message"]
    err = await error_of(await client.get("/api/v1/runs", params={"phase": "Running,Done"}), 400)
    assert err["code"] == "invalid_phase" and "'Done'" in err["message"] and "Succeeded" in err["message"]
    for limit in ("0", "501", "ten"):
        err = await error_of(await client.get("/api/v1/runs", params={"limit": limit}), 400)
        assert "1 to 500" in err["message"]
    err = await error_of(await client.get("/api/v1/runs", params={"cursor": "garbage!"}), 400)
    assert err["code"] == "invalid_cursor"
    err = await error_of(await client.get("/api/v1/runs", params={"status": "Running"}), 400)
    assert err["code"] == "unknown_parameter" and "'status'" in err["message"] and "phase" in err["message"]


async def test_run_detail_and_unknown_runs(client: Listeners, sessions: Sessions) -> None:
    run = await add_run(sessions, attempt=2, phase="Retrying", error={"type": "E", "message": "m"})
    await add_attempt(sessions, run.id, 2, exit_code=None)
    await add_attempt(sessions, run.id, 1, exit_code=1, reason="TaskFailed", finished_at=datetime.now(UTC))
    detail = await (await client.get(f"/api/v1/runs/{run.id}")).json()
    assert detail["payload"] == {"who": "world"} and detail["hasOutput"] is False and detail["output"] is None
    assert detail["error"] == {"type": "E", "message": "m"}
    assert [a["number"] for a in detail["attempts"]] == [1, 2]
    one = detail["attempts"][0]
    assert one["podName"] == f"{run.id}-1" and one["exitCode"] == 1 and one["reason"] == "TaskFailed"
    assert one["finishedAt"].endswith("Z") and detail["attempts"][1]["finishedAt"] is None

    for path in ("/api/v1/runs/no-such-run", "/api/v1/runs/no-such-run/logs", f"/api/v1/runs/{'x' * 300}"):
        err = await error_of(await client.get(path), 404)
        assert err["code"] == "run_not_found"
        assert ("no-such-run" if "no-such" in path else "x" * 300) in err["message"]
    err = await error_of(await client.get("/api/v1/nothing"), 404)
    assert err["code"] == "not_found"
    err = await error_of(await client.delete("/api/v1/runs"), 405)
    assert err["code"] == "method_not_allowed"


async def test_health_and_metrics(client: Listeners) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    # Without leader election wired in (an API served on its own): not leading.
    assert await resp.json() == {
        "status": "ok",
        "identity": "",
        "leader": False,
        "lease": None,
        "leaseHolder": None,
    }
    resp = await client.get("/metrics")
    assert resp.status == 200 and "kubetask_api_requests_total" in await resp.text()


async def test_health_and_metrics_say_whether_this_replica_leads(sessions: Sessions, kube: Kube) -> None:
    leadership = Leadership(identity="op-a_1234", lease="kubetask-system/kubetask-operator")
    apps = make_app(sessions=sessions, settings=Settings(), kube=kube, leadership=leadership)

    def transitions(direction: str) -> float:
        return REGISTRY.get_sample_value("kubetask_leader_transitions_total", {"direction": direction}) or 0.0

    async with TestClient(TestServer(apps.public)) as public, TestClient(TestServer(apps.runner)) as runner:

        async def health() -> tuple[Any, Any]:
            return (await (await public.get("/healthz")).json(), await (await runner.get("/healthz")).json())

        async def gauge() -> float:
            text = await (await public.get("/metrics")).text()
            [value] = [line.split()[1] for line in text.splitlines() if line.startswith("kubetask_leader ")]
            return float(value)

        before = {d: transitions(d) for d in ("acquired", "lost")}
        leadership.changed(False, "op-b_5678")  # a standby that sees another holder
        public_health, runner_health = await health()
        assert (
            public_health
            == runner_health
            == {
                "status": "ok",
                "identity": "op-a_1234",
                "leader": False,
                "lease": "kubetask-system/kubetask-operator",
                "leaseHolder": "op-b_5678",
            }
        )
        assert await gauge() == 0.0

        leadership.changed(True, "op-a_1234")  # takes over
        public_health, _ = await health()
        assert (public_health["leader"], public_health["leaseHolder"]) == (True, "op-a_1234")
        assert await gauge() == 1.0
        leadership.changed(True, "op-a_1234")  # renewed: no transition
        leadership.changed(False, "op-a_1234")  # could not renew in time
        assert (await health())[0]["leader"] is False and await gauge() == 0.0
        after = {d: transitions(d) - before[d] for d in ("acquired", "lost")}
        assert after == {"acquired": 1.0, "lost": 1.0}


# ---- the CLI against the API ------------------------------------------------------------


async def cli(*args: str, token: str = "not-used") -> Any:
    """Run ``kubetask ARGS`` in a thread (the API serves from this event loop), with
    ``token`` as KUBETASK_TOKEN (``--api-url`` names the API)."""
    from typer.testing import CliRunner

    from kubetask.cli import app

    env = {"COLUMNS": "250", "KUBETASK_TOKEN": token}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def test_cli_runs_commands(client: Listeners, sessions: Sessions) -> None:
    url = str(client.make_url("")).rstrip("/")
    ns, runs = await _thirty_runs(sessions)
    reader = functools.partial(cli, token=client.token)
    result = await reader(
        "runs", "list", "--api-url", url, "-n", ns, "--since", "all", "--limit", "20", "--json"
    )
    assert result.exit_code == 0, result.output
    page = json.loads(result.stdout)
    assert [r["id"] for r in page["items"]] == [r.id for r in runs[:20]] and page["nextCursor"]
    more = await reader(
        "runs", "list", "--api-url", url, "-n", ns, "--since", "all", "--cursor", page["nextCursor"]
    )
    assert more.exit_code == 0 and runs[20].id in more.stdout and runs[0].id not in more.stdout
    filtered = await reader(
        "runs",
        "list",
        "--api-url",
        url,
        "-n",
        ns,
        "--since",
        "all",
        "--status",
        "Running",
        "--tag",
        "even",
        "--json",
    )
    assert [r["id"] for r in json.loads(filtered.stdout)["items"]] == [
        r.id for r in runs if r.phase == "Running" and "even" in r.tags
    ]
    recent = await reader("runs", "list", "--api-url", url, "-n", ns)  # default: the last 24h
    assert recent.exit_code == 0 and "No runs created since 24h" in recent.stdout
    bad = await reader("runs", "list", "--api-url", url, "--since", "yesterday")
    assert bad.exit_code == 1 and "'yesterday'" in bad.stderr

    run, token = await running(sessions, tags=["cli"])
    lines = [{"message": f"hello {i}", "level": "info"} for i in range(3)]
    assert (await client.post("/runner/v1/logs", headers=auth(token), json={"lines": lines})).status == 204
    got = await reader("runs", "get", run.id, "--api-url", url)
    assert got.exit_code == 0, got.output
    assert "Payload" in got.stdout and '"who": "world"' in got.stdout and "1 of 3" in got.stdout
    got_json = await reader("runs", "get", run.id, "--api-url", url, "--json")
    assert json.loads(got_json.stdout)["id"] == run.id
    logs = await reader("runs", "logs", run.id, "--api-url", url)
    assert logs.exit_code == 0 and [ln.split()[-1] for ln in logs.stdout.splitlines()] == ["0", "1", "2"]

    # --follow returns once the run has ended and its last lines are printed.
    async with sessions() as s, s.begin():
        stored = await s.get(Run, run.id)
        assert stored is not None
        stored.phase = "Succeeded"
    follow = await reader("runs", "logs", run.id, "--api-url", url, "--follow", "--json", "--attempt", "1")
    assert follow.exit_code == 0 and len(follow.stdout.splitlines()) == 3

    missing = await reader("runs", "get", "no-such-run", "--api-url", url)
    assert missing.exit_code == 1 and "no run with id 'no-such-run'" in missing.stderr


async def test_cli_errors_and_crds(tmp_path: Any) -> None:
    down = await cli("runs", "list", "--api-url", "http://127.0.0.1:9")
    assert down.exit_code == 1
    assert "http://127.0.0.1:9" in down.stderr and "make -s api-url" in down.stderr

    stale = await cli("crds", "generate", "--out", str(tmp_path), "--check")
    assert stale.exit_code == 1 and "task.yaml" in stale.stderr and "kubetask crds generate" in stale.stderr
    assert (await cli("crds", "generate", "--out", str(tmp_path))).exit_code == 0
    assert (await cli("crds", "generate", "--out", str(tmp_path), "--check")).exit_code == 0
