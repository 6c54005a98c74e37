"""The ``kubetask`` command against a real operator API (real PostgreSQL, real TokenReviews
and SubjectAccessReviews): trigger, runs (one and bulk), tasks, queues; every error one
line on stderr and exit 1. The API and the ServiceAccounts are test_client's."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.spec import GROUP, VERSION
from tests.e2e.harness import Stack
from tests.integration.test_client import Api, World, api, run_resource, set_phase, world

__all__ = ["api", "world"]  # fixtures, shared with test_client

pytestmark = [pytest.mark.db, pytest.mark.asyncio(loop_scope="session")]

Sessions = async_sessionmaker[AsyncSession]


async def kubetask(*args: str, token: str, stdin: str | None = None) -> Any:
    """``kubetask ARGS`` in a thread (the API serves from this event loop) with
    ``KUBETASK_TOKEN``; it must never end with a traceback."""
    from typer.testing import CliRunner

    from kubetask.cli import app

    env = {"COLUMNS": "250", "KUBETASK_TOKEN": token, "KUBETASK_API_URL": ""}
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args), input=stdin, env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result


def one_line_error(result: Any) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    # (After a prompt, the runner's stderr lacks the newline a terminal's Enter gives.)
    assert lines and "error: " in lines[-1] and "Traceback" not in result.stderr
    return str(lines[-1][lines[-1].index("error: ") :])


async def test_trigger_json_and_wait(api: Api, world: World, cluster: Stack, sessions: Sessions) -> None:
    base = ("--api-url", api.url, "-n", world.ns)
    made = await kubetask(
        "trigger", "hello", "--payload", '{"name": "cli"}', "--idempotency-key", "cli-1", "--tag", "c",
        "--priority", "3", "--json", *base, token=world.dev,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    answer = json.loads(made.stdout)
    assert answer["task"] == "hello" and answer["namespace"] == world.ns and answer["isCached"] is False
    spec = run_resource(cluster, world.ns, answer["name"])["spec"]
    assert (spec["payload"], spec["idempotencyKey"], spec["tags"], spec["priority"]) == (
        {"name": "cli"},
        "cli-1",
        ["c"],
        3,
    )
    again = await kubetask("trigger", "hello", "--idempotency-key", "cli-1", *base, token=world.dev)
    assert again.exit_code == 0 and answer["id"] in again.stdout and "existing run" in again.stdout

    # --wait: a run that does not end in time is a clear error; one that ended is shown.
    slow = await kubetask("trigger", "hello", "--wait", "--timeout", "1", *base, token=world.dev)
    assert "is still Pending after 1 s" in one_line_error(slow)
    await set_phase(sessions, answer["id"], "Succeeded")
    waited = await kubetask(
        "trigger", "hello", "--idempotency-key", "cli-1", "--wait", "--json", *base, token=world.dev
    )
    assert waited.exit_code == 0, waited.output
    assert json.loads(waited.stdout)["phase"] == "Succeeded"

    for bad, says in (
        (["--payload", "{nope"], "--payload is not valid JSON"),
        (["--payload", "[1]"], "must be a JSON object"),
        (["--priority", "5000"], "priority"),
    ):
        assert says in one_line_error(await kubetask("trigger", "hello", *bad, *base, token=world.dev))
    missing = await kubetask("trigger", "no-such-task", *base, token=world.dev)
    assert "no-such-task" in one_line_error(missing) and "(HTTP 404)" in missing.stderr
    denied = await kubetask("trigger", "hello", *base, token=world.viewer)
    assert f"may not create runs.kubetask.dev in namespace {world.ns}" in one_line_error(denied)


async def test_runs_list_get_cancel_replay(api: Api, world: World, cluster: Stack) -> None:
    base = ("--api-url", api.url)
    made = json.loads(
        (
            await kubetask(
                "trigger", "other", "--tag", "one", "--json", "-n", world.ns, *base, token=world.dev
            )
        ).stdout
    )
    listed = await kubetask(
        "runs", "list", "-n", world.ns, "--task", "other", "--json", *base, token=world.viewer
    )
    assert listed.exit_code == 0, listed.output
    assert made["id"] in [r["id"] for r in json.loads(listed.stdout)["items"]]
    table = await kubetask("runs", "list", "-n", world.ns, "--tag", "one", *base, token=world.viewer)
    assert made["id"] in table.stdout and "Pending" in table.stdout
    got = await kubetask("runs", "get", made["id"], "--json", *base, token=world.viewer)
    assert json.loads(got.stdout)["task"] == "other"
    watched = await kubetask(
        "runs",
        "watch",
        "-n",
        world.ns,
        "--iterations",
        "2",
        "--interval",
        "0.2",
        "--json",
        *base,
        token=world.viewer,
    )
    pages = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(pages) == 2 and made["id"] in [r["id"] for r in pages[0]["items"]]
    live = await kubetask("runs", "watch", "-n", world.ns, "--iterations", "1", *base, token=world.viewer)
    assert live.exit_code == 0 and made["id"] in live.stdout

    canceled = await kubetask("runs", "cancel", made["id"], "--json", *base, token=world.dev)
    assert json.loads(canceled.stdout)["cancelRequested"] is True
    assert run_resource(cluster, world.ns, made["name"])["spec"]["cancel"] is True
    replayed = await kubetask("runs", "replay", made["id"], *base, token=world.dev)
    assert replayed.exit_code == 0 and f"replayed {made['id']} as run_" in replayed.stdout
    edited = await kubetask(
        "runs", "replay", made["id"], "--payload", '{"edited": 1}', "--json", *base, token=world.dev
    )
    assert run_resource(cluster, world.ns, json.loads(edited.stdout)["name"])["spec"]["payload"] == {
        "edited": 1
    }
    bulk_edit = await kubetask("runs", "replay", "--task", "other", "-p", "{}", *base, token=world.dev)
    assert "--payload replays one run" in one_line_error(bulk_edit)
    both = await kubetask("runs", "cancel", made["id"], "--task", "other", *base, token=world.dev)
    assert "either a run ID or filters" in one_line_error(both)
    nothing = await kubetask("runs", "cancel", *base, token=world.dev)
    assert "give a run ID, or filters" in one_line_error(nothing)


async def test_bulk_cancel_and_replay(api: Api, world: World, cluster: Stack) -> None:
    base = ("--api-url", api.url, "-n", world.ns)
    names = []
    for i in range(3):
        out = await kubetask(
            "trigger",
            "other",
            "--tag",
            "bulk",
            "--payload",
            f'{{"i": {i}}}',
            "--json",
            *base,
            token=world.dev,
        )
        names.append(json.loads(out.stdout)["name"])
    filters = ("--task", "other", "--tag", "bulk", "--status", "pending")

    # Without --yes it asks first; "no" does nothing.
    declined = await kubetask("runs", "cancel", *filters, *base, token=world.dev, stdin="n\n")
    assert "Cancel 3 runs?" in declined.stderr and "nothing done" in one_line_error(declined)
    assert not any(run_resource(cluster, world.ns, n)["spec"].get("cancel") for n in names)

    done = await kubetask("runs", "cancel", *filters, "--yes", *base, token=world.dev)
    assert done.exit_code == 0, done.output
    assert "3 matched, 3 canceled, 0 skipped, 0 failed" in done.stdout
    assert all(run_resource(cluster, world.ns, n)["spec"]["cancel"] is True for n in names)

    replayed = await kubetask("runs", "replay", *filters, "--yes", "--json", *base, token=world.dev)
    assert replayed.exit_code == 0, replayed.output
    lines = [json.loads(line) for line in replayed.stdout.splitlines()]
    assert lines[-1]["summary"]["succeeded"] == 3 and {x["result"] for x in lines[:-1]} == {"replayed"}
    for line in lines[:-1]:
        new = cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, world.ns, "runs", label_selector=f"kubetask.dev/replay-of={line['runId']}"
        )
        assert len(new["items"]) == 1

    denied = await kubetask("runs", "cancel", *filters, "--yes", *base, token=world.viewer)
    assert "may not patch runs.kubetask.dev" in one_line_error(denied)


async def test_tasks_and_queues(api: Api, world: World, cluster: Stack) -> None:
    base = ("--api-url", api.url, "-n", world.ns)
    tasks = await kubetask("tasks", "list", "--json", *base, token=world.dev)
    assert {"hello", "other"} <= {t["name"] for t in json.loads(tasks.stdout)["items"]}
    table = await kubetask("tasks", "list", *base, token=world.dev)
    assert "app.tasks:hello" in table.stdout
    paused = await kubetask("queues", "pause", "other", "--json", *base, token=world.dev)
    assert json.loads(paused.stdout)["paused"] is True
    listed = await kubetask("queues", "list", *base, token=world.dev)
    assert "other" in listed.stdout and "yes" in listed.stdout
    resumed = await kubetask("queues", "resume", "other", *base, token=world.dev)
    assert "queue " in resumed.stdout and "active" in resumed.stdout
    limited = await kubetask(
        "queues", "set-limit", "other", "4", "--per-key", "2", "--json", *base, token=world.dev
    )
    body = json.loads(limited.stdout)
    assert (body["concurrencyLimit"], body["perKeyConcurrencyLimit"]) == (4, 2)
    queue = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, world.ns, "queues", "other")
    assert queue["spec"]["concurrencyLimit"] == 4
    removed = await kubetask("queues", "set-limit", "other", "none", *base, token=world.dev)
    assert "concurrency limit -" in removed.stdout
    assert "a number or `none`" in one_line_error(
        await kubetask("queues", "set-limit", "other", "lots", *base, token=world.dev)
    )
    assert "give a LIMIT" in one_line_error(
        await kubetask("queues", "set-limit", "other", *base, token=world.dev)
    )
