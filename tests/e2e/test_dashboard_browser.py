"""The dashboard in a real browser (Debian's Chromium, driven by Playwright) against a real
operator process, PostgreSQL and cluster: runs in real pods from the runner image.

One scenario per module run (the operator, the runs and the browser are shared by its
steps, which is most of the cost): sign in, filter, open a failed run, read its logs and
stack, replay it, cancel a running run, cancel runs in bulk by filter, check that a user without ``patch`` sees no cancel
button and is refused by the API, the tasks and queues pages (pause, limit), and reach the
dashboard through ``kubetask dashboard``.

Screenshots of the main pages go to ``KUBETASK_TEST_LOGS``, and to
``KUBETASK_DASHBOARD_SCREENSHOTS`` when set (``docs/img`` for the README's).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.e2e.conftest import wait_for
from tests.e2e.harness import Operator, Stack, cli_dashboard, token_for
from tests.integration.test_client import _forwarder, _wait_proxy

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("KUBETASK_CHROMIUM", "/usr/bin/chromium")
GROUP = "kubetask.dev"

SOURCE = """
from kubetask import task, logger
import asyncio

@task(id="work")
async def work(payload: dict, ctx) -> dict:
    logger.info("working on order %s", payload.get("order"))
    if payload.get("mode") == "fail":
        logger.error("about to fail")
        raise ValueError(f"order {payload.get('order')} is broken")
    if payload.get("mode") == "sleep":
        for i in range(600):
            logger.info("still sleeping %d", i)
            await asyncio.sleep(1)
    return {"order": payload.get("order"), "ok": True}
"""


def _role(
    stack: Stack, ns: str, name: str, verbs: list[str], queues: list[str], *, pods_and_events: bool = False
) -> str:
    """A ServiceAccount with ``verbs`` on runs, list on tasks, and ``queues`` on queues
    (and, with ``pods_and_events``, read on pods and events); its token."""
    stack.core.create_namespaced_service_account(ns, {"metadata": {"name": name}})
    rbac = k8s.RbacAuthorizationV1Api()
    rules = [
        {"apiGroups": [GROUP], "resources": ["runs"], "verbs": verbs},
        {"apiGroups": [GROUP], "resources": ["tasks"], "verbs": ["list"]},
        {"apiGroups": [GROUP], "resources": ["queues"], "verbs": queues},
    ]
    if pods_and_events:
        rules.append({"apiGroups": [""], "resources": ["pods", "events"], "verbs": ["get", "list"]})
    rbac.create_namespaced_role(ns, {"metadata": {"name": name}, "rules": rules})
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "namespace": ns, "name": name}],
        },
    )
    user = f"system:serviceaccount:{ns}:{name}"
    authz = k8s.AuthorizationV1Api()
    review = {
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}"],
            "resourceAttributes": {"group": GROUP, "resource": "runs", "verb": verbs[-1], "namespace": ns},
        }
    }
    wait_for(lambda: bool(authz.create_subject_access_review(review).status.allowed), 30, f"RBAC for {user}")
    return token_for(stack, ns, name)


def _run_id(stack: Stack, ns: str, name: str, phases: set[str]) -> str:
    run = stack.wait_run(ns, name, phases, timeout=180)
    return str(run["status"]["runId"])


@pytest.fixture
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: hack/install-deps.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: the tests run as root, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def _screenshot(page: Any, log_dir: Path, name: str, *, dark: bool = False) -> None:
    if dark:
        page.emulate_media(color_scheme="dark")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(log_dir / f"dashboard-{name}.png"))
    page.emulate_media(color_scheme="light")
    target = os.environ.get("KUBETASK_DASHBOARD_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(log_dir / f"dashboard-{name}.png", Path(target) / f"dashboard-{name}.png")


def _sign_in(page: Any, base: str, token: str) -> None:
    page.goto(f"{base}/dashboard/runs")
    assert "/dashboard/signin" in page.url
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/dashboard/runs$"))


def test_dashboard_sign_in_filter_logs_replay_cancel_and_rbac(
    stack: Stack,
    ns: str,
    start_operator: Callable[..., Operator],
    browser: Any,
    log_dir: Path,
) -> None:
    from playwright.sync_api import expect

    # Generous waits: `make test` runs other modules beside this one on two cores, and log
    # lines reach the database in the runner's batches.
    expect.set_options(timeout=20_000)
    stack.apply_task(ns, "work", {"source": SOURCE, "retry": {"maxAttempts": 1}})
    ops_token = _role(
        stack, ns, "ops", ["get", "list", "create", "patch"], ["list", "patch"], pods_and_events=True
    )
    viewer_token = _role(stack, ns, "viewer", ["get", "list"], ["list"])
    operator = start_operator()
    failed_name = stack.create_run(ns, "work", payload={"order": 7, "mode": "fail"}, tags=["web"])
    sleeper_name = stack.create_run(ns, "work", payload={"order": 8, "mode": "sleep"})
    other_sleeper = stack.create_run(ns, "work", payload={"order": 9, "mode": "sleep"})
    ok_name = stack.create_run(ns, "work", payload={"order": 10})
    bulk_names = [
        stack.create_run(ns, "work", payload={"order": 20 + i, "mode": "sleep"}, tags=["bulk"])
        for i in range(2)
    ]
    failed = _run_id(stack, ns, failed_name, {"Failed"})
    sleeper = _run_id(stack, ns, sleeper_name, {"Running"})
    other = _run_id(stack, ns, other_sleeper, {"Running"})
    succeeded = _run_id(stack, ns, ok_name, {"Succeeded"})
    base = operator.api

    context = browser.new_context(viewport={"width": 1360, "height": 860})
    page = context.new_page()
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))

    # Sign in; the list shows this namespace's runs, live.
    _sign_in(page, base, ops_token)
    expect(page.locator("#rows")).to_contain_text(failed)
    expect(page.locator("#rows")).to_contain_text(sleeper)
    expect(page.locator("#live")).to_contain_text("updated", timeout=15_000)  # polled at least once
    _screenshot(page, log_dir, "runs")
    _screenshot(page, log_dir, "runs-dark", dark=True)

    # Filter by status: several statuses at once, then only the failed run.
    page.click("#phase-filter summary")
    page.check("input[name=phase][value=Failed]")
    page.check("input[name=phase][value=Succeeded]")
    page.select_option("select[name=namespace]", ns)
    page.click("#filters button[type=submit]")
    expect(page.locator("#rows tr[data-run-id]")).to_have_count(2)
    expect(page.locator("#rows")).to_contain_text(failed)
    expect(page.locator("#rows")).to_contain_text(succeeded)
    expect(page.locator("#phase-chosen")).to_have_text("Succeeded, Failed")  # in the list's order
    page.click("#phase-filter summary")
    page.uncheck("input[name=phase][value=Succeeded]")
    page.click("#filters button[type=submit]")
    expect(page.locator("#phase-chosen")).to_have_text("Failed")
    expect(page.locator("#rows tr[data-run-id]")).to_have_count(1)
    expect(page.locator("#rows")).to_contain_text(failed)

    # Open it with the keyboard: its page has its id in the URL, the stack and the logs.
    page.keyboard.press("j")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/dashboard/runs/{failed}")
    expect(page.locator("#phase")).to_have_text("Failed")
    expect(page.locator("#timeline")).to_contain_text("attempt 1 ended: ValueError")
    page.click("text=Stack of attempt 1")
    expect(page.locator("tr.stack pre")).to_contain_text("order 7 is broken")
    expect(page.locator("#payload")).to_contain_text('"order": 7')
    expect(page.locator("#logs")).to_contain_text("about to fail")
    page.fill("#log-search", "working on")
    expect(page.locator("#log-count")).to_contain_text("1 of")
    expect(page.locator("#logs")).not_to_contain_text("about to fail")
    expect(page.locator("#cancel")).to_have_count(0)  # finished: nothing to cancel
    _screenshot(page, log_dir, "run")

    # Replay it: a new run of the same task and payload, whose page we land on.
    page.click("#replay")
    page.wait_for_url(lambda url: "/dashboard/runs/run_" in url and not url.endswith(failed))
    replayed = page.url.rsplit("/", 1)[1]
    assert replayed != failed
    assert operator.get(f"/api/v1/runs/{replayed}")["payload"] == {"order": 7, "mode": "fail"}

    # Replay with an edited payload: a replay of the run with what was typed.
    page.goto(f"{base}/dashboard/runs/{failed}")
    page.click("#replay-edit-toggle")
    page.fill("#replay-payload", '{"order": 11}')
    page.click("#replay-edit button[type=submit]")
    page.wait_for_url(lambda url: "/dashboard/runs/run_" in url and not url.endswith(failed))
    edited = page.url.rsplit("/", 1)[1]
    assert edited not in (failed, replayed)
    assert operator.get(f"/api/v1/runs/{edited}")["payload"] == {"order": 11}
    edited_name = operator.get(f"/api/v1/runs/{edited}")["name"]
    assert stack.get_run(ns, edited_name)["metadata"]["labels"]["kubetask.dev/replay-of"] == failed
    expect(page.locator("#payload")).to_contain_text('"order": 11')

    # The run id search opens a run's page.
    page.goto(f"{base}/dashboard/runs")
    page.keyboard.press("/")
    page.keyboard.type(failed)
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/dashboard/runs/{failed}")

    # Cancel the running run from its page; its logs were followed while it ran.
    page.goto(f"{base}/dashboard/runs/{sleeper}")
    expect(page.locator("#logs")).to_contain_text("still sleeping")
    # The Kubernetes side, read with the user's own token: its pod, the pod's events, the
    # Run resource (this user may read pods and events).
    kube = page.locator("#kubernetes")
    expect(kube.locator("td.mono").first).to_contain_text(f"{sleeper_name}-")
    expect(page.locator("#kube-events")).to_contain_text("Scheduled")
    page.locator("#kube-resource summary").click()
    expect(page.locator("#kube-resource pre")).to_contain_text(f"name: {sleeper_name}")
    expect(kube.locator(".error")).to_have_count(0)
    page.once("dialog", lambda d: d.accept())
    page.click("#cancel")
    expect(page.locator("#action-status")).to_contain_text("Cancel requested")
    assert stack.wait_run(ns, sleeper_name, {"Canceled"}, timeout=120)["status"]["phase"] == "Canceled"
    # The page follows the run's phase without a reload, and says when it ended.
    expect(page.locator("#phase")).to_have_text("Canceled", timeout=15_000)
    expect(page.locator("#ended")).to_be_visible()

    # Bulk cancel by filter: the confirmation states how many, then the progress.
    page.goto(f"{base}/dashboard/runs?tag=bulk&namespace={ns}")
    expect(page.locator("#rows tr[data-run-id]")).to_have_count(2)
    asked: list[str] = []

    def confirm(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.once("dialog", confirm)
    page.click("#bulk-cancel")
    expect(page.locator("#bulk-status")).to_contain_text("Done: 2 canceled, 0 skipped, 0 failed")
    assert asked and asked[0].startswith("Cancel 2 runs matching these filters"), asked
    for name in bulk_names:
        assert stack.wait_run(ns, name, {"Canceled"}, timeout=120)["status"]["phase"] == "Canceled"

    # Tasks: the recent runs' success rate (the failed run and its replay, the succeeded one).
    page.goto(f"{base}/dashboard/tasks?namespace={ns}")
    work = page.locator('tr[data-task="work"]')
    expect(work.locator(".rate")).to_have_text(re.compile(r"\d+\.\d%"))
    _screenshot(page, log_dir, "tasks")
    # Queues: pause the task's queue, then set its limit.
    page.goto(f"{base}/dashboard/queues?namespace={ns}")
    queue = page.locator('tr[data-queue="work"]')
    queue.locator(".queue-pause").click()
    expect(page.locator('tr[data-queue="work"] .state')).to_have_text("paused")
    page.locator('tr[data-queue="work"] .queue-limit').fill("4")
    page.locator('tr[data-queue="work"] .queue-set').click()
    expect(page.locator('tr[data-queue="work"] td').nth(3)).to_have_text("4")
    _screenshot(page, log_dir, "queues")
    spec = stack.custom.get_namespaced_custom_object(GROUP, "v1alpha1", ns, "queues", "work")["spec"]
    assert spec["paused"] is True and spec["concurrencyLimit"] == 4

    # A user who may not patch runs sees no cancel button, and the API refuses them.
    viewer = browser.new_context().new_page()
    _sign_in(viewer, base, viewer_token)
    viewer.goto(f"{base}/dashboard/runs/{other}")
    expect(viewer.locator("#phase")).to_have_text("Running")
    expect(viewer.locator("#cancel")).to_have_count(0)
    # Their RBAC has no pods or events: the page says so rather than hiding it.
    expect(viewer.locator("#kubernetes")).to_contain_text("the pods of run")
    expect(viewer.locator("#kubernetes")).to_contain_text("forbidden by RBAC for your user")
    expect(viewer.locator("#replay")).to_have_count(0)
    refused = viewer.evaluate(
        """async (id) => {
            const r = await fetch(`/dashboard/api/v1/runs/${id}/cancel`,
                                  {method: "POST", headers: {"X-Kubetask-Dashboard": "1"}});
            return [r.status, (await r.json()).error.message];
        }""",
        other,
    )
    assert refused[0] == 403 and "may not patch runs" in refused[1]
    assert stack.get_run(ns, other_sleeper)["status"]["phase"] == "Running"

    # `kubetask dashboard`: a local address signed in with the CLI's credentials.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASK_")}
    with cli_dashboard({**env, "KUBETASK_TOKEN": ops_token, "KUBECONFIG": stack.kubeconfig}, base) as url:
        local = browser.new_context().new_page()
        local.goto(url)
        local.wait_for_url(re.compile(r"http://127\.0\.0\.1:\d+/dashboard/runs$"))
        expect(local.locator("#rows")).to_contain_text(other)
        local.goto(f"{url.split('/_kubetask')[0]}/dashboard/runs/{other}")
        expect(local.locator("#cancel")).to_have_count(1)  # ops may patch
        # Without the printed URL's secret, the local address refuses.
        stranger = browser.new_context().new_page()
        stranger.goto(f"{url.split('/_kubetask')[0]}/dashboard/runs")
        expect(stranger.locator("body")).to_contain_text("open the URL")

    # The default way: the kubeconfig's client-certificate user (a token of
    # KUBETASK_SERVICE_ACCOUNT minted for it) through the API server's service proxy, which
    # rewrites the pages' links with its own path; the local address takes it off again.
    with _forwarder(stack, ns, operator.port) as service:
        _wait_proxy(stack, service)
        proxied = {
            **env,
            "KUBECONFIG": stack.kubeconfig,
            "KUBETASK_API_SERVICE": service,
            "KUBETASK_SERVICE_ACCOUNT": f"{ns}/ops",
        }
        with cli_dashboard(proxied, None) as url:
            local = browser.new_context().new_page()
            local.goto(url)
            local.wait_for_url(re.compile(r"http://127\.0\.0\.1:\d+/dashboard/runs$"))
            expect(local.locator("header .who")).to_have_text(f"system:serviceaccount:{ns}:ops")
            local.click(f'a[href$="/dashboard/runs/{other}"]')
            local.wait_for_url(re.compile(rf"http://127\.0\.0\.1:\d+/dashboard/runs/{other}$"))
            expect(local.locator("#logs")).to_contain_text("still sleeping")  # the scripts' API calls
            expect(local.locator("#cancel")).to_have_count(1)
    stack.patch_run(ns, other_sleeper, {"cancel": True})
    assert outside == [], f"the dashboard requested other origins: {outside}"
