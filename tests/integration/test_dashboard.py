"""The dashboard's pages on the public API's application, against real PostgreSQL and the
real Kubernetes API server (real TokenReviews and SubjectAccessReviews).

Who is who (ServiceAccounts of a scratch namespace A; B is another namespace with runs):

- ``viewer`` may get and list runs in A;
- ``ops`` may also patch and create runs, and patch queues, in A;
- both may list tasks and queues in A.

The browser tests (tests/e2e/test_dashboard_browser.py) drive the same pages in Chromium
against a real operator; these check what HTML and HTTP alone can show, fast.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import DummyCookieJar
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.api import make_app
from kubetask.apimodels import PHASES
from kubetask.dashboard.views import COOKIE, CSRF_HEADER
from kubetask.kube import Kube
from kubetask.settings import Settings
from kubetask.spec import GROUP
from kubetask.store import tables as t
from tests.e2e.harness import Stack, namespace, token_for
from tests.integration.test_public_api import _role, _wait_allowed

pytestmark = [pytest.mark.db, pytest.mark.asyncio(loop_scope="session")]

Sessions = async_sessionmaker[AsyncSession]
Client = TestClient[Any, Any]

STACK = 'Traceback (most recent call last):\n  File "app/tasks.py", line 7, in boom\nValueError: <b>no</b>'


@dataclass(frozen=True)
class World:
    a: str
    b: str
    viewer: str
    ops: str


@pytest.fixture(scope="module")
def world(cluster: Stack) -> Iterator[World]:
    with (
        namespace(cluster, "it-dash-a", label="kubetask.dev/integration") as a,
        namespace(cluster, "it-dash-b", label="kubetask.dev/integration") as b,
    ):
        for sa in ("viewer", "ops"):
            cluster.core.create_namespaced_service_account(a, {"metadata": {"name": sa}})
        read = {"apiGroups": [GROUP], "resources": ["tasks", "queues"], "verbs": ["list"]}
        _role(
            a,
            "viewer",
            [{"apiGroups": [GROUP], "resources": ["runs"], "verbs": ["get", "list"]}, read],
            (a, "viewer"),
        )
        _role(
            a,
            "ops",
            [
                {"apiGroups": [GROUP], "resources": ["runs"], "verbs": ["get", "list", "patch", "create"]},
                {"apiGroups": [GROUP], "resources": ["queues"], "verbs": ["patch"]},
                read,
            ],
            (a, "ops"),
        )
        cluster.apply_task(a, "hello", {"entrypoint": "app.tasks:hello"})
        cluster.apply_queue(a, "q1", {"concurrencyLimit": 3})
        _wait_allowed(f"system:serviceaccount:{a}:viewer", "list", "runs", a)
        _wait_allowed(f"system:serviceaccount:{a}:ops", "patch", "runs", a)
        _wait_allowed(f"system:serviceaccount:{a}:ops", "patch", "queues", a)
        yield World(a=a, b=b, viewer=token_for(cluster, a, "viewer"), ops=token_for(cluster, a, "ops"))


@pytest_asyncio.fixture(loop_scope="session")
async def web(sessions: Sessions, kube: Kube) -> AsyncIterator[Client]:
    apps = make_app(sessions=sessions, settings=Settings(), kube=kube)
    # No cookie jar: each request sends the cookie it names.
    async with TestClient(TestServer(apps.public), cookie_jar=DummyCookieJar()) as c:
        yield c


async def add_run(sessions: Sessions, ns: str, *, phase: str, task: str = "hello", ago: float = 0) -> str:
    """A run row (no Run resource: the pages read PostgreSQL), with one attempt and logs."""
    run_id = f"run_{secrets.token_hex(10)}"
    now = datetime.now(UTC) - timedelta(seconds=ago)
    failed = phase == "Failed"
    async with sessions() as s, s.begin():
        s.add(
            t.Run(
                id=run_id, namespace=ns, name=f"{task}-{run_id[-5:]}", uid=secrets.token_hex(16), task=task,
                queue=f"{ns}/{task}", phase=phase, attempt=1, max_attempts=1, payload={"order": 42},
                tags=["dash"], created_at=now, started_at=now,
                finished_at=now + timedelta(seconds=3) if phase in ("Failed", "Succeeded") else None,
                error={"type": "ValueError", "message": "no"} if failed else None,
                has_output=phase == "Succeeded", output={"done": True} if phase == "Succeeded" else None,
            )
        )  # fmt: skip
        await s.flush()
        s.add(
            t.Attempt(
                run_id=run_id, number=1, pod_name=f"{run_id}-1", token_hash=secrets.token_hex(32),
                created_at=now, started_at=now, exit_code=1 if failed else None,
                finished_at=now + timedelta(seconds=3) if failed else None,
                error={"type": "ValueError", "message": "no"} if failed else None,
                report={"succeeded": False, "error": {"type": "ValueError", "message": "no", "stack": STACK}}
                if failed else None,
            )
        )  # fmt: skip
        s.add(t.LogLine(run_id=run_id, attempt=1, ts=now, level="INFO", stream="log", message="hello dash"))
    return run_id


def cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={token}"}


async def html(resp: Any, status: int = 200) -> str:
    text = await resp.text()
    assert resp.status == status, text[:2000]
    assert resp.headers["Content-Type"].startswith("text/html")
    return str(text)


async def test_pages_send_callers_without_a_token_to_sign_in_and_keep_their_target(web: Client) -> None:
    resp = await web.get("/dashboard/runs?phase=Failed", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/dashboard/signin?next=%2Fdashboard%2Fruns%3Fphase%3DFailed"
    page = await html(await web.get(resp.headers["Location"]))
    assert 'name="next" value="/dashboard/runs?phase=Failed"' in page
    assert (await web.get("/", allow_redirects=False)).headers["Location"] == "/dashboard/runs"


async def test_sign_in_checks_the_token_and_keeps_it_in_an_httponly_strict_cookie(
    web: Client, world: World
) -> None:
    refused = await web.post("/dashboard/signin", data={"token": "garbage", "next": "/dashboard/runs"})
    assert "the token is not valid" in await html(refused, 401)
    resp = await web.post(
        "/dashboard/signin",
        data={"token": world.viewer, "next": "https://evil.example/"},
        allow_redirects=False,
    )
    assert resp.status == 302 and resp.headers["Location"] == "/dashboard/runs"  # no open redirect
    set_cookie = resp.headers["Set-Cookie"]
    assert set_cookie.startswith(f"{COOKIE}={world.viewer}")
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/dashboard" in set_cookie
    assert "Secure" not in set_cookie  # plain HTTP here; behind a TLS-ending proxy it is:
    behind_tls = await web.post(
        "/dashboard/signin",
        data={"token": world.viewer},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    )
    assert "Secure" in behind_tls.headers["Set-Cookie"]
    # A sign-in form posted from another site is refused (login CSRF); from the page, fine.
    forged = await web.post(
        "/dashboard/signin", data={"token": world.viewer}, headers={"Origin": "https://evil.example"}
    )
    assert forged.status == 403 and "Set-Cookie" not in forged.headers
    own = await web.post(
        "/dashboard/signin",
        data={"token": world.viewer},
        headers={"Origin": str(web.make_url("")).rstrip("/")},
        allow_redirects=False,
    )
    assert own.status == 302 and own.headers["Set-Cookie"].startswith(COOKIE)
    # A cookie the cluster does not accept sends the caller back to sign in, and is removed.
    stale = await web.get("/dashboard/runs", headers=cookie("garbage"), allow_redirects=False)
    assert stale.status == 302 and "error=" in stale.headers["Location"]
    assert f'{COOKIE}=""' in stale.headers["Set-Cookie"]


async def test_runs_list_shows_only_readable_namespaces_filters_and_pages(
    web: Client, world: World, sessions: Sessions
) -> None:
    failed = await add_run(sessions, world.a, phase="Failed", ago=30)
    running = await add_run(sessions, world.a, phase="Running", task="other", ago=20)
    hidden = await add_run(sessions, world.b, phase="Failed", ago=10)
    page = await html(await web.get("/dashboard/runs", headers=cookie(world.viewer)))
    assert failed in page and running in page and hidden not in page
    options = re.findall(r'<option value="([^"]*)"', page.split('name="namespace"')[1].split("</select>")[0])
    assert options == ["", world.a]  # B is not offered: RBAC does not let the viewer read it
    assert (
        "Content-Security-Policy" in (await web.get("/dashboard/runs", headers=cookie(world.viewer))).headers
    )

    only_failed = await html(
        await web.get("/dashboard/runs?phase=Failed&range=1h", headers=cookie(world.viewer))
    )
    assert failed in only_failed and running not in only_failed
    by_task = await html(await web.get("/dashboard/runs?task=other&tag=dash", headers=cookie(world.viewer)))
    assert running in by_task and failed not in by_task
    # The live refresh asks for the rows only.
    rows = await html(await web.get("/dashboard/runs?partial=rows&task=other", headers=cookie(world.viewer)))
    assert rows.lstrip().startswith("<tr") and running in rows and "<html" not in rows
    # Keyset pages: newest first, one per page here, the cursor the API's.
    first = await html(
        await web.get(f"/dashboard/runs?limit=1&namespace={world.a}", headers=cookie(world.viewer))
    )
    assert running in first and failed not in first
    older = re.search(r'href="([^"]+)" id="next-page"', first)
    assert older is not None and "cursor=" in older.group(1)
    second = await html(await web.get(older.group(1).replace("&amp;", "&"), headers=cookie(world.viewer)))
    assert failed in second and running not in second and "not live" in second
    # A bad filter is explained on the page, not a stack trace.
    bad = await html(
        await web.get("/dashboard/runs?range=custom&from=yesterday", headers=cookie(world.viewer))
    )
    assert "is neither an ISO-8601 time" in bad
    # Searching a run id opens its page.
    found = await web.get(f"/dashboard/runs?id={failed}", headers=cookie(world.viewer), allow_redirects=False)
    assert found.headers["Location"] == f"/dashboard/runs/{failed}"


async def test_run_page_shows_the_run_and_only_the_buttons_rbac_allows(
    web: Client, world: World, sessions: Sessions
) -> None:
    failed = await add_run(sessions, world.a, phase="Failed")
    running = await add_run(sessions, world.a, phase="Running")
    page = await html(await web.get(f"/dashboard/runs/{failed}", headers=cookie(world.viewer)))
    assert "&#34;order&#34;: 42" in page  # the payload, formatted and escaped
    assert "ValueError: &lt;b&gt;no&lt;/b&gt;" in page  # the attempt's stack, escaped
    assert "attempt 1 ended: ValueError" in page  # the timeline
    assert f"kubectl -n {world.a} describe pod {failed}-1" in page  # the Kubernetes side
    assert 'id="cancel"' not in page and 'id="replay"' not in page  # get and list only
    viewer_running = await html(await web.get(f"/dashboard/runs/{running}", headers=cookie(world.viewer)))
    assert 'id="cancel"' not in viewer_running
    ops_running = await html(await web.get(f"/dashboard/runs/{running}", headers=cookie(world.ops)))
    assert 'id="cancel"' in ops_running and 'id="replay"' in ops_running
    ops_failed = await html(await web.get(f"/dashboard/runs/{failed}", headers=cookie(world.ops)))
    assert 'id="cancel"' not in ops_failed and 'id="replay"' in ops_failed  # nothing to cancel
    # Another namespace's run: refused, as the API refuses it.
    other = await add_run(sessions, world.b, phase="Failed")
    assert "may not get runs" in await html(
        await web.get(f"/dashboard/runs/{other}", headers=cookie(world.ops)), 403
    )
    assert "no run with id" in await html(
        await web.get("/dashboard/runs/run_nope", headers=cookie(world.ops)), 404
    )


async def test_bulk_buttons_need_a_filter_and_the_permission_to_act(
    web: Client, world: World, sessions: Sessions
) -> None:
    await add_run(sessions, world.a, phase="Running")
    unfiltered = await html(await web.get("/dashboard/runs", headers=cookie(world.ops)))
    assert 'id="bulk-cancel"' not in unfiltered and "Filter to act on every matching run" in unfiltered
    filtered = await html(
        await web.get(f"/dashboard/runs?tag=dash&namespace={world.a}", headers=cookie(world.ops))
    )
    assert 'id="bulk-cancel"' in filtered and 'id="bulk-replay"' in filtered
    # The filter the buttons send is the list's, as the bulk API's body.
    assert (
        f'data-filter="{{&#34;tag&#34;: [&#34;dash&#34;], &#34;namespace&#34;: [&#34;{world.a}&#34;]}}"'
        in filtered
    )
    viewer = await html(
        await web.get(f"/dashboard/runs?tag=dash&namespace={world.a}", headers=cookie(world.viewer))
    )
    assert 'id="bulk-cancel"' not in viewer and 'id="bulk-replay"' not in viewer


async def test_tasks_page_shows_counts_and_recent_statistics(
    web: Client, world: World, sessions: Sessions
) -> None:
    await add_run(sessions, world.a, phase="Failed")
    page = await html(
        await web.get(f"/dashboard/tasks?namespace={world.a}&since=1h", headers=cookie(world.viewer))
    )
    row = page.split('data-task="hello"')[1].split("</tr>")[0]
    assert f"/dashboard/runs?task=hello&amp;namespace={world.a}" in row  # its recent runs
    assert re.search(r'class="num rate">\d+\.\d%<', row)  # a success rate: runs of hello ended
    assert "Runs (1h)" in page
    newest = re.findall(r'href="/dashboard/runs/(run_[0-9a-f]+)" title="[^"]*: (\w+)"', row)
    assert 1 <= len(newest) <= 5 and all(phase in PHASES for _, phase in newest)
    bad = await web.get(f"/dashboard/tasks?namespace={world.a}&since=2h", headers=cookie(world.viewer))
    assert "since must be one of" in await html(bad, 400)


async def test_queues_page_offers_changes_only_to_who_may_patch_queues(
    web: Client, world: World, cluster: Stack
) -> None:
    viewer = await html(await web.get(f"/dashboard/queues?namespace={world.a}", headers=cookie(world.viewer)))
    row = viewer.split('data-queue="q1"')[1].split("</tr>")[0]
    assert "admitting" in row and ">3<" in row and "queue-pause" not in row
    ops = await html(await web.get(f"/dashboard/queues?namespace={world.a}", headers=cookie(world.ops)))
    assert "queue-pause" in ops.split('data-queue="q1"')[1]
    # What the Pause button sends.
    resp = await web.patch(
        f"/dashboard/api/v1/namespaces/{world.a}/queues/q1",
        json={"paused": True},
        headers={**cookie(world.ops), CSRF_HEADER: "1"},
    )
    assert resp.status == 200, await resp.text()
    queue = cluster.custom.get_namespaced_custom_object(GROUP, "v1alpha1", world.a, "queues", "q1")
    assert queue["spec"]["paused"] is True
    paused = await html(await web.get(f"/dashboard/queues?namespace={world.a}", headers=cookie(world.viewer)))
    assert "paused" in paused.split('data-queue="q1"')[1].split("</tr>")[0]


async def test_the_pages_scripts_use_the_api_with_the_cookie_and_changes_need_the_csrf_header(
    web: Client, world: World, sessions: Sessions
) -> None:
    running = await add_run(sessions, world.a, phase="Running")
    logs = await web.get(f"/dashboard/api/v1/runs/{running}/logs", headers=cookie(world.viewer))
    assert resp_ok(logs) and [line["message"] for line in (await logs.json())["items"]] == ["hello dash"]
    # Without the header a cross-site form could send, a change is refused before anything.
    no_csrf = await web.post(f"/dashboard/api/v1/runs/{running}/cancel", headers=cookie(world.ops))
    assert no_csrf.status == 403 and CSRF_HEADER in (await no_csrf.json())["error"]["message"]
    # The viewer may not patch runs: the API refuses, whatever the page shows.
    refused = await web.post(
        f"/dashboard/api/v1/runs/{running}/cancel", headers={**cookie(world.viewer), CSRF_HEADER: "1"}
    )
    assert refused.status == 403 and "may not patch runs" in (await refused.json())["error"]["message"]
    assert (await web.get(f"/dashboard/api/v1/runs/{running}")).status == 401
    static = await web.get("/dashboard/static/dashboard.js")
    assert static.status == 200 and "X-Kubetask-Dashboard" in await static.text()


def resp_ok(resp: Any) -> bool:
    return bool(resp.status == 200)
