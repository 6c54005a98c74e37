"""Durable execution on the real cluster: checkpointed steps, waits that hold no pod and
no slot, tokens, child runs.

Side effects are counted outside the pods: the tasks call an HTTP counter this test
serves on the host (reachable from pods at the host's bridge address), so "step 1 ran
once" is a fact, not a log line. Every pod event of the namespace is watched."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kubetask import Client
from tests.e2e.conftest import wait_for
from tests.e2e.harness import GROUP, REPO, VERSION, Operator, PodWatcher, Stack, service_account_token

pytestmark = pytest.mark.e2e

FAST_RETRY = {"maxAttempts": 3, "minTimeoutMs": 200, "maxTimeoutMs": 500, "randomize": False}


class Counter:
    """``POST /<name>`` counts a call of ``name`` (and keeps its body); served on the host
    for the pods."""

    def __init__(self, host: str) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        #: The bodies POSTed, by name.
        self.bodies: dict[str, list[str]] = collections.defaultdict(list)
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                name = self.path.strip("/")
                size = int(self.headers.get("Content-Length") or 0)
                counter.bodies[name].append(self.rfile.read(size).decode())
                counter.calls[name] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def counter(stack: Stack) -> Iterator[Counter]:
    c = Counter(stack.host_ip)
    yield c
    c.close()


def task_source(body: str) -> str:
    """An async task ``durable`` with helpers ``count(name)``; ``body`` is its code."""
    return (
        "import asyncio, json, urllib.request\n"
        "from datetime import timedelta\n"
        "from kubetask import task, WaitTimeout, ChildRunFailed, AbortRun\n\n"
        "def count(url, name, body=''):\n"
        "    request = urllib.request.Request(f'{url}/{name}', data=body.encode(), method='POST')\n"
        "    urllib.request.urlopen(request, timeout=10)\n"
        "    return name\n\n"
        "@task(id='durable')\n"
        "async def run(payload, ctx):\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"
    )


def apply(stack: Stack, ns: str, body: str, name: str = "durable", **spec: Any) -> None:
    source = task_source(body).replace("@task(id='durable')", f"@task(id={name!r})")
    stack.apply_task(ns, name, {"source": source, "retry": FAST_RETRY, **spec})


def phase(stack: Stack, ns: str, name: str) -> str:
    return str((stack.get_run(ns, name).get("status") or {}).get("phase"))


def post(url: str, body: Any, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture
def sender(stack: Stack, ns: str) -> Iterator[str]:
    """A token that may send events to the test's namespace (``patch runs``)."""
    rules = [{"apiGroups": [GROUP], "resources": ["runs"], "verbs": ["get", "list", "patch"]}]
    with service_account_token(stack, ns, "sender", cluster_rules=rules) as token:
        yield token


def run_pods(watcher: PodWatcher, run_name: str) -> list[str]:
    return sorted(n for n in watcher.uids_by_name if n.startswith(f"{run_name}-"))


def test_steps_done_before_a_pod_is_killed_are_not_run_again(
    stack: Stack, ns: str, operator: Operator, counter: Counter
) -> None:
    apply(
        stack,
        ns,
        f"""
        url = {counter.url!r}
        a = await ctx.step("one", count, url, "one")
        b = await ctx.step("two", count, url, "two")
        if ctx.attempt.number == 1:
            await asyncio.sleep(600)  # killed here, after step two
        c = await ctx.step("three", count, url, "three")
        return [a, b, c, ctx.attempt.number]
        """,
    )
    with PodWatcher(stack, ns) as watcher:
        stack.create_run(ns, "durable", name="steps")
        wait_for(lambda: counter.calls["two"] == 1, 120, "step two")
        time.sleep(1)  # its result is stored before the task goes on
        [pod] = [p.metadata.name for p in stack.pods(ns)]
        stack.core.delete_namespaced_pod(pod, ns, grace_period_seconds=0)
        run = stack.wait_run(ns, "steps", timeout=120)
    st = run["status"]
    assert st["phase"] == "Succeeded", st
    assert st["output"] == ["one", "two", "three", 2]
    assert dict(counter.calls) == {"one": 1, "two": 1, "three": 1}
    assert len(run_pods(watcher, "steps")) == 2


def test_wait_for_event_holds_no_pod_and_no_slot_and_resumes_on_the_matching_event(
    stack: Stack, ns: str, operator: Operator, counter: Counter, sender: str
) -> None:
    apply(
        stack,
        ns,
        f"""
        request = await ctx.step("create request", count, {counter.url!r}, "create")
        data = await ctx.wait_for_event("approval.received", {{"requestId": payload["id"]}},
                                        timeout=timedelta(days=7))
        await ctx.step("act", count, {counter.url!r}, "act-" + str(data["approved"]))
        return data
        """,
        queue={"name": "one-at-a-time", "concurrencyLimit": 1},
    )
    with PodWatcher(stack, ns) as watcher:
        stack.create_run(ns, "durable", name="approve", payload={"id": "r-1"})
        run = stack.wait_run(ns, "approve", {"Waiting"}, timeout=120)
        assert "approval.received" in run["status"]["waitingFor"]
        wait_for(lambda: not watcher.alive, 30, "the waiting run's pod to be gone")
        # Its slot is free: another run of the same queue (limit 1) runs and waits too.
        stack.create_run(ns, "durable", name="second", payload={"id": "r-2"})
        stack.wait_run(ns, "second", {"Waiting"}, timeout=120)
        queues = operator.get(f"/api/v1/namespaces/{ns}/queues")["items"]
        assert [(q["name"], q["running"]) for q in queues] == [("one-at-a-time", 0)]
        # A non-matching event resumes nothing.
        status, answer = post(
            f"{operator.api}/api/v1/events",
            {"name": "approval.received", "namespace": ns, "data": {"requestId": "other", "approved": True}},
            sender,
        )
        assert (status, answer["resumed"]) == (202, 0)
        time.sleep(3)
        assert phase(stack, ns, "approve") == "Waiting" and not watcher.alive
        status, answer = post(
            f"{operator.api}/api/v1/events",
            {"name": "approval.received", "namespace": ns, "data": {"requestId": "r-1", "approved": True}},
            sender,
        )
        assert (status, answer["resumed"]) == (202, 1)
        run = stack.wait_run(ns, "approve", timeout=120)
    st = run["status"]
    assert st["phase"] == "Succeeded", st
    assert st["output"] == {"requestId": "r-1", "approved": True}
    assert st["attempt"] == 1 and st["resumes"] == 1 and st["pods"] == 2  # a resume is not an attempt
    assert [(a["number"], a["resume"]) for a in st["attempts"]] == [(1, False), (2, True)]
    assert counter.calls["create"] == 2 and counter.calls["act-True"] == 1  # one per run: r-1, r-2
    assert phase(stack, ns, "second") == "Waiting"
    # Without a token, or without the right, no event is accepted.
    assert post(f"{operator.api}/api/v1/events", {"name": "x", "namespace": ns})[0] == 401
    # A short timeout raises WaitTimeout in the task.
    apply(
        stack,
        ns,
        """
        try:
            await ctx.wait_for_event("never", {"id": 1}, timeout=2)
        except WaitTimeout as e:
            return "timed out: " + str(e)
        return "resumed"
        """,
        name="impatient",
    )
    stack.create_run(ns, "impatient", name="impatient")
    st = stack.wait_run(ns, "impatient", timeout=120)["status"]
    assert st["phase"] == "Succeeded" and st["output"].startswith("timed out: no event 'never'"), st


def test_an_event_sent_just_before_the_wait_still_matches(
    stack: Stack, ns: str, operator: Operator, sender: str
) -> None:
    apply(
        stack,
        ns,
        """
        await ctx.wait_for(1)  # slept in the pod (shorter than wait_keep_pod_seconds)
        return await ctx.wait_for_event("early", {"k": 1}, timeout=30)
        """,
    )
    status, _ = post(
        f"{operator.api}/api/v1/events", {"name": "early", "namespace": ns, "data": {"k": 1, "v": 2}}, sender
    )
    assert status == 202
    stack.create_run(ns, "durable", name="early")
    st = stack.wait_run(ns, "early", timeout=120)["status"]
    assert st["phase"] == "Succeeded" and st["output"] == {"k": 1, "v": 2}, st
    assert st["resumes"] == 0  # satisfied at registration: it never suspended


def test_a_durable_sleep_survives_an_operator_restart(
    stack: Stack, ns: str, start_operator: Callable[..., Operator], counter: Counter
) -> None:
    op = start_operator()
    apply(
        stack,
        ns,
        f"""
        await ctx.step("before", count, {counter.url!r}, "before")
        await ctx.wait_for(20)
        await ctx.step("after", count, {counter.url!r}, "after")
        return "slept"
        """,
    )
    with PodWatcher(stack, ns) as watcher:
        stack.create_run(ns, "durable", name="sleepy")
        stack.wait_run(ns, "sleepy", {"Waiting"}, timeout=120)
        op.kill()
        time.sleep(3)
        start_operator()  # the timer is in PostgreSQL
        st = stack.wait_run(ns, "sleepy", timeout=120)["status"]
    assert st["phase"] == "Succeeded" and st["resumes"] == 1, st
    assert dict(counter.calls) == {"before": 1, "after": 1}
    assert len(run_pods(watcher, "sleepy")) == 2
    assert watcher.max_alive_where(lambda labels: True) == 1


APPROVAL = """
token = await ctx.create_token(timeout=timedelta(days=7))
await ctx.step("ask", count, payload["counter"], "ask")
await ctx.step("publish", count, payload["counter"], "publish", token.url)  # as a real one mails it
answer = await ctx.wait_for_token(token)
return {"approved": answer["approved"], "by": answer.get("by")}
"""


def test_a_token_completed_by_post_resumes_the_run_and_completes_once(
    stack: Stack, ns: str, operator: Operator, counter: Counter
) -> None:
    apply(stack, ns, APPROVAL)
    stack.create_run(ns, "durable", name="human", payload={"counter": counter.url})
    stack.wait_run(ns, "human", {"Waiting"}, timeout=120)
    [url] = counter.bodies["publish"]
    assert url.startswith(f"{operator.api}/api/v1/tokens/tok_")
    status, answer = post(url, {"approved": False, "by": "ana"})
    assert status == 200 and answer["resumed"] is True
    assert post(url, {"approved": True})[0] == 409  # a token completes once
    assert post(url.replace("tok_", "tok_x"), {"approved": True})[0] == 404
    st = stack.wait_run(ns, "human", timeout=120)["status"]
    assert st["phase"] == "Succeeded" and st["output"] == {"approved": False, "by": "ana"}, st
    assert counter.calls["ask"] == 1 and counter.calls["publish"] == 1


PARENT = """
mode = payload["mode"]
if mode == "trigger-then-fail":
    child = await ctx.trigger("child", {"n": 1})
    if ctx.attempt.number == 1:
        raise RuntimeError("fail after triggering")
    return child
try:
    child = {"n": payload.get("n", 1), "fail": mode == "failing", "slow": mode == "slow"}
    return await ctx.trigger_and_wait("child", child)
except ChildRunFailed as e:
    return {"childFailed": e.phase, "error": e.error.get("message")}
"""

CHILD = """
if payload.get("fail"):
    raise AbortRun("child says no")
if payload.get("slow"):
    await asyncio.sleep(600)
return payload["n"] * 10
"""


def children(stack: Stack, ns: str, parent_id: str) -> list[dict[str, Any]]:
    items = stack.custom.list_namespaced_custom_object(
        GROUP, VERSION, ns, "runs", label_selector=f"kubetask.dev/parent-run={parent_id}"
    )["items"]
    return list(items)


def test_trigger_and_wait_gets_the_childs_output_or_its_failure_and_never_triggers_twice(
    stack: Stack, ns: str, operator: Operator
) -> None:
    apply(stack, ns, PARENT, name="parent")
    apply(stack, ns, CHILD, name="child")
    stack.create_run(ns, "parent", name="ok", payload={"mode": "ok", "n": 4})
    stack.create_run(ns, "parent", name="failing", payload={"mode": "failing"})
    stack.create_run(ns, "parent", name="retried", payload={"mode": "trigger-then-fail"})
    done = stack.wait_all(ns, ["ok", "failing", "retried"], timeout=240)
    ok, failing, retried = (done[n]["status"] for n in ("ok", "failing", "retried"))
    assert ok["phase"] == "Succeeded" and ok["output"] == 40 and ok["resumes"] == 1, ok
    assert failing["phase"] == "Succeeded", failing
    assert failing["output"] == {"childFailed": "Failed", "error": "child says no"}
    assert retried["phase"] == "Succeeded" and retried["attempt"] == 2, retried
    [child] = children(stack, ns, retried["runId"])  # attempt 2 got the same child back
    assert retried["output"] == child["status"]["runId"]
    for parent in (ok, failing):
        [child] = children(stack, ns, parent["runId"])
        assert child["status"]["parentRun"] == parent["runId"]


def test_canceling_a_waiting_parent_ends_it_at_once_and_cancels_its_children(
    stack: Stack, ns: str, operator: Operator
) -> None:
    apply(stack, ns, PARENT, name="parent")
    apply(stack, ns, CHILD, name="child")
    with PodWatcher(stack, ns) as watcher:
        stack.create_run(ns, "parent", name="boss", payload={"mode": "slow"})
        parent = stack.wait_run(ns, "boss", {"Waiting"}, timeout=120)["status"]
        [child] = children(stack, ns, parent["runId"])
        stack.wait_run(ns, child["metadata"]["name"], {"Running"}, timeout=120)
        stack.patch_run(ns, "boss", {"cancel": True})
        st = stack.wait_run(ns, "boss", timeout=60)["status"]
        assert st["phase"] == "Canceled", st
        child_st = stack.wait_run(ns, child["metadata"]["name"], timeout=60)["status"]
        wait_for(lambda: not watcher.alive, 60, "every pod gone")
    assert child_st["phase"] == "Canceled", child_st
    assert "parent run" in child_st["message"]


def test_the_approval_example_both_ways(stack: Stack, ns: str, operator: Operator, sender: str) -> None:
    """examples/approval as its README walks through it: apply, create, wait, answer with
    the CLI (approve) and the Python client (reject)."""
    stack.kubectl(ns, "apply", "-f", str(REPO / "examples/approval/task.yaml"))
    names = []
    for _ in range(2):
        created = stack.kubectl(ns, "create", "-f", str(REPO / "examples/approval/run.yaml"), "-o", "name")
        names.append(created.stdout.strip().split("/")[-1])
    requests = {}
    for name in names:
        st = stack.wait_run(ns, name, {"Waiting"}, timeout=120)["status"]
        detail = operator.get(f"/api/v1/runs/{st['runId']}")
        [created] = [c for c in detail["checkpoints"] if c["name"] == "create approval request"]
        requests[name] = created["result"]["requestId"]
        assert requests[name] in detail["waitingFor"]
    env = {**os.environ, "KUBETASK_API_URL": operator.api, "KUBETASK_TOKEN": sender}
    data = json.dumps({"requestId": requests[names[0]], "approved": True, "by": "ana"})
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetask.cli",
            "events",
            "send",
            "approval.received",
            "-n",
            ns,
            "--data",
            data,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = " ".join(cli.stdout.split())  # rich wraps lines at the terminal's width
    assert cli.returncode == 0 and "resumed 1 waiting run" in said, cli.stdout + cli.stderr
    with Client(operator.api, sender, namespace=ns) as client:
        answer = client.events.send("approval.received", {"requestId": requests[names[1]], "approved": False})
        assert answer.resumed == 1
    done = stack.wait_all(ns, names, timeout=180)
    approved, rejected = (done[n]["status"] for n in names)
    assert approved["phase"] == rejected["phase"] == "Succeeded", (approved, rejected)
    assert approved["output"]["action"] == "shipped" and approved["output"]["by"] == "ana"
    assert rejected["output"]["action"] == "refunded"
    assert approved["attempt"] == 1 and approved["resumes"] == 1
