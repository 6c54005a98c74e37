"""The dashboard's pure parts: where sign-in may send a browser, how the page's form becomes
the API's filters, formatting, the timeline, and the local proxy's path rewriting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from multidict import MultiDict

from kubetask.api.runs import parse_time
from kubetask.apimodels import RunDetail
from kubetask.cli.dashboard import DashboardProxy
from kubetask.dashboard.views import _list_query, _safe_next, bulk_filter, duration, seconds, timeline
from kubetask.sdk.credentials import Connection, StaticToken


def test_sign_in_only_sends_the_browser_to_dashboard_paths() -> None:
    assert _safe_next("/dashboard/runs/run_1?x=1") == "/dashboard/runs/run_1?x=1"
    for target in (
        "https://evil.example/",
        "//evil.example/dashboard/",
        "/api/v1/runs",
        "/dashboard\\@evil",
        None,
    ):
        assert _safe_next(target) == "/dashboard/runs", target


def test_the_list_form_becomes_the_apis_filters() -> None:
    form = MultiDict(
        [("task", " a,b "), ("phase", ""), ("tag", "x, y"), ("range", "24h"), ("id", ""), ("partial", "rows")]
    )
    assert list(_list_query(form).items()) == [("task", "a,b"), ("tag", "x"), ("tag", "y"), ("since", "24h")]
    custom = MultiDict([("range", "custom"), ("from", "2026-01-01T00:00"), ("to", "")])
    assert list(_list_query(custom).items()) == [("since", "2026-01-01T00:00")]
    # A custom range's fields are ignored under a preset.
    preset = MultiDict([("range", "1h"), ("from", "2026-01-01T00:00")])
    assert list(_list_query(preset).items()) == [("since", "1h")]


def test_bulk_actions_get_the_lists_filters_as_their_body() -> None:
    query = MultiDict(
        [("task", "a,b"), ("tag", "x"), ("tag", "y"), ("since", "24h"), ("cursor", "c"), ("limit", "5")]
    )
    assert bulk_filter(query) == {"task": ["a", "b"], "tag": ["x", "y"], "since": "24h"}
    assert bulk_filter(MultiDict([("cursor", "c")])) == {}  # no filter: no bulk action


def test_a_time_filter_too_far_back_is_a_value_error_not_an_overflow() -> None:
    # The list's and the tasks page's since/until: a 400 invalid_time, never a 500.
    now = datetime.now(UTC)
    for value in ("999999999w", "99999999d", "0000-01-01"):
        with pytest.raises(ValueError):
            parse_time(value, now=now)
    assert parse_time("1h30m", now=now) == now - timedelta(hours=1, minutes=30)


def test_durations_read_like_a_person_would_say_them() -> None:
    start = "2026-01-01T00:00:00.000000Z"
    assert duration(start, "2026-01-01T00:00:03.250000Z") == "3.2s"
    assert duration(start, "2026-01-01T00:04:05Z") == "4m 5s"
    assert duration(start, "2026-01-01T02:03:00Z") == "2h 3m"
    assert duration(start, "2026-01-04T01:00:00Z") == "3d 1h"
    assert duration(None, None) == "—" and seconds(None) == "—" and seconds(65.0) == "1m 5s"


def test_timeline_orders_attempts_resumes_steps_and_the_end() -> None:
    run = RunDetail.model_validate(
        {
            "id": "run_1", "namespace": "ns", "name": "r", "task": "t", "queue": "ns/t", "phase": "Succeeded",
            "attempt": 1, "maxAttempts": 1, "createdAt": "2026-01-01T00:00:00Z",
            "finishedAt": "2026-01-01T00:10:00Z", "reason": "Succeeded",
            "attempts": [
                {"number": 1, "podName": "p-1", "createdAt": "2026-01-01T00:00:01Z",
                 "finishedAt": "2026-01-01T00:00:05Z", "exitCode": 14, "reason": "Suspended"},
                {"number": 1, "podName": "p-1-r1", "createdAt": "2026-01-01T00:09:00Z", "resume": True,
                 "finishedAt": "2026-01-01T00:09:59Z", "exitCode": 0, "reason": "Succeeded"},
            ],
            "checkpoints": [
                {"key": "sleep:nap", "name": "nap", "position": 1, "kind": "sleep", "status": "satisfied",
                 "attempt": 1, "startedAt": "2026-01-01T00:00:04Z", "finishedAt": "2026-01-01T00:08:59Z"},
            ],
        }
    )  # fmt: skip
    assert [e["text"] for e in timeline(run)] == [
        "created",
        "attempt 1: pod p-1",
        "wait 'nap' (sleep) started",
        "attempt 1 ended: Suspended",
        "wait 'nap': satisfied",
        "resume of attempt 1: pod p-1-r1",
        "resume of attempt 1 ended: Succeeded",
        "Succeeded (Succeeded)",
    ]


def test_the_local_proxy_takes_the_api_servers_proxy_path_off_links_and_redirects() -> None:
    base = "https://10.0.0.1:6443/api/v1/namespaces/kubetask-system/services/http:kubetask-api:8080/proxy"
    proxy = DashboardProxy(0, Connection(base, StaticToken("t", "test")), secret="s")
    try:
        prefix = "/api/v1/namespaces/kubetask-system/services/http:kubetask-api:8080/proxy"
        assert proxy.local(f'<a href="{prefix}/dashboard/runs/run_1">') == '<a href="/dashboard/runs/run_1">'
        assert proxy.local("/dashboard/runs") == "/dashboard/runs"
        assert proxy.url == f"http://127.0.0.1:{proxy.port}/_kubetask/open/s"
    finally:
        proxy.server_close()
