"""``kubetask trigger``, ``kubetask tasks list`` and ``kubetask queues ...``: start runs,
see the Tasks, and pause, resume or limit queues, through the public API."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kubetask.cli.common import (
    ApiUrl,
    JsonFlag,
    Namespace,
    age,
    api_errors,
    app,
    connect,
    console,
    dump,
    fail,
    limit_text,
    phase,
    print_json,
)

if TYPE_CHECKING:
    from kubetask.apimodels import QueueItem, RunDetail
    from kubetask.sdk.client import Client

tasks_app = typer.Typer(help="Tasks: what can run.", no_args_is_help=True)
queues_app = typer.Typer(help="Queues: limits, pause and resume.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(queues_app, name="queues")


# ---- trigger ------------------------------------------------------------------------------


def read_payload(value: str | None, option: str = "--payload") -> dict[str, Any]:
    """``--payload`` (or ``option``): JSON, ``@FILE`` or ``-`` (standard input)."""
    if value is None:
        return {}
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as e:
            fail(f"cannot read the {option} file {value[1:]}: {e.strerror}")
    else:
        text = value
    try:
        payload = json.loads(text)
    except ValueError as e:
        fail(f'{option} is not valid JSON ({e}); e.g. {option} \'{{"name": "world"}}\'')
    if not isinstance(payload, dict):
        fail(f'{option} must be a JSON object, e.g. {option} \'{{"name": "world"}}\'')
    return payload


@app.command("trigger")
def trigger(
    task: Annotated[str, typer.Argument(help="The Task to run.")],
    payload: Annotated[
        str | None, typer.Option("--payload", "-p", help="The input: a JSON object, @FILE, or - (stdin).")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Runs with the same key (until it expires) are one run.")
    ] = None,
    idempotency_key_ttl: Annotated[
        int | None, typer.Option("--idempotency-key-ttl", help="Seconds the key holds (default 24 h).")
    ] = None,
    concurrency_key: Annotated[
        str | None, typer.Option(help="Per-key concurrency limits count runs by this key.")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="-1000..1000; higher is admitted first.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A tag (repeatable).")] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Attempts at most (default: the Task's).")] = None,
    delay: Annotated[
        str | None,
        typer.Option(help="Start no sooner than this: a duration (90, 20s, 5m, 1h30m) or an RFC 3339 time."),
    ] = None,
    ttl: Annotated[
        str | None, typer.Option(help="End Expired if not started this long after it may (20s, 1h, ...).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait for the run to end; show its result.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up waiting after this many seconds.")
    ] = None,
    namespace: Namespace = None,
    as_json: JsonFlag = False,
    api_url: ApiUrl = None,
) -> None:
    """Trigger a run of TASK. With --wait, exit 1 unless it Succeeded."""
    body = read_payload(payload)
    when: str | datetime | None = delay
    if delay is not None and ("T" in delay or "-" in delay.strip()[1:]):
        try:
            when = datetime.fromisoformat(delay.replace("Z", "+00:00"))
        except ValueError:
            fail(f"--delay {delay!r} is neither a duration (20s, 5m, 1h30m) nor an RFC 3339 time")
    client = connect(api_url, namespace)
    with api_errors():
        answer = client.tasks.trigger(
            task,
            body,
            idempotency_key=idempotency_key,
            idempotency_key_ttl_seconds=idempotency_key_ttl,
            concurrency_key=concurrency_key,
            priority=priority,
            tags=tag,
            max_attempts=max_attempts,
            delay=when,
            ttl=ttl,
        )
    if not wait:
        if as_json:
            print_json(dump(answer))
        else:
            cached = " (an existing run holds this idempotency key)" if answer.is_cached else ""
            typer.echo(f"{answer.id} {answer.namespace}/{answer.name}{cached}")
        return
    with api_errors():
        run = _wait(client, answer.id, timeout, quiet=as_json)
    if as_json:
        print_json(dump(run))
    else:
        _show_result(run)
    if run.phase != "Succeeded":
        fail(
            f"run {run.id} ended {run.phase}"
            + (f": {run.error.type}: {run.error.message}" if run.error else "")
        )


def _wait(client: Client, run_id: str, timeout: float | None, *, quiet: bool) -> RunDetail:
    """Poll until the run ends, with a live spinner saying its phase (on stderr)."""
    from kubetask.apimodels import TERMINAL_PHASES

    deadline = None if timeout is None else time.monotonic() + timeout
    err = console(stderr=True)
    with err.status(f"{run_id}: triggered", spinner="dots") as status:
        while True:
            run = client.runs.retrieve(run_id)
            if run.phase in TERMINAL_PHASES:
                return run
            if not quiet:
                status.update(f"{run_id}: {phase(run.phase)} (attempt {run.attempt}/{run.max_attempts})")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"run {run_id} is still {run.phase} after {timeout:g} s; it goes on: "
                    f"`kubetask runs get {run_id}`"
                )
            time.sleep(0.5)


def _show_result(run: RunDetail) -> None:
    out = console()
    out.print(f"{run.id} {run.namespace}/{run.name} {phase(run.phase)} after {run.attempt} attempt(s)")
    if run.error:
        out.print(f"[bold red]Error[/] {run.error.type}: {run.error.message}")
    if run.has_output:
        out.print_json(data=run.output)


# ---- tasks --------------------------------------------------------------------------------


@tasks_app.command("list")
def tasks_list(namespace: Namespace = None, as_json: JsonFlag = False, api_url: ApiUrl = None) -> None:
    """The namespace's Tasks, with their unfinished runs by phase."""
    client = connect(api_url, namespace)
    with api_errors():
        items = client.tasks.list()
    if as_json:
        print_json({"items": dump(items)})
        return
    out = console()
    if not items:
        out.print(f"No Tasks in namespace {client.namespace}.")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "QUEUE", "READY", "PENDING", "QUEUED", "RUNNING", "RETRYING", "ENTRYPOINT", "AGE"):
        table.add_column(column, overflow="fold")
    for t in items:
        ready = "-" if t.ready is None else "[green]True[/]" if t.ready else f"[red]False[/] {t.message}"
        table.add_row(
            t.name,
            t.queue,
            ready,
            str(t.runs.pending),
            str(t.runs.queued),
            str(t.runs.running),
            str(t.runs.retrying),
            t.entrypoint or ("(inline source)" if t.inline_source else "-"),
            age(t.created_at),
        )
    out.print(table)


# ---- queues -------------------------------------------------------------------------------

QueueName = Annotated[str, typer.Argument(metavar="QUEUE", help="The queue's name.")]


def _show_queue(item: QueueItem, as_json: bool) -> None:
    if as_json:
        print_json(dump(item))
        return
    state = "paused" if item.paused else "active"
    typer.echo(
        f"queue {item.namespace}/{item.name}: {state}, concurrency limit {limit_text(item.concurrency_limit)}, "
        f"per key {limit_text(item.per_key_concurrency_limit)}; {item.running} running, {item.queued} queued"
    )


@queues_app.command("list")
def queues_list(namespace: Namespace = None, as_json: JsonFlag = False, api_url: ApiUrl = None) -> None:
    """The namespace's queues: limits, paused, runs holding a slot and waiting."""
    client = connect(api_url, namespace)
    with api_errors():
        items = client.queues.list()
    if as_json:
        print_json({"items": dump(items)})
        return
    out = console()
    if not items:
        out.print(f"No queues in namespace {client.namespace}.")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "PAUSED", "LIMIT", "PER KEY", "RUNNING", "QUEUED", "SOURCE"):
        table.add_column(column)
    for q in items:
        table.add_row(
            q.name,
            "[yellow]yes[/]" if q.paused else "no",
            limit_text(q.concurrency_limit),
            limit_text(q.per_key_concurrency_limit),
            str(q.running),
            str(q.queued),
            q.source,
        )
    out.print(table)


@queues_app.command("pause")
def queues_pause(
    name: QueueName, namespace: Namespace = None, as_json: JsonFlag = False, api_url: ApiUrl = None
) -> None:
    """Admit nothing more from the queue (running runs go on)."""
    client = connect(api_url, namespace)
    with api_errors():
        _show_queue(client.queues.pause(name), as_json)


@queues_app.command("resume")
def queues_resume(
    name: QueueName, namespace: Namespace = None, as_json: JsonFlag = False, api_url: ApiUrl = None
) -> None:
    """Admit runs from the queue again."""
    client = connect(api_url, namespace)
    with api_errors():
        _show_queue(client.queues.resume(name), as_json)


def _limit(value: str, option: str) -> int | None:
    if value.lower() in ("none", "unlimited"):
        return None
    try:
        return int(value)
    except ValueError:
        fail(f"{option} is a number or `none` (no limit), not {value!r}")


@queues_app.command("set-limit")
def queues_set_limit(
    name: QueueName,
    limit: Annotated[
        str | None,
        typer.Argument(metavar="[LIMIT]", help="Most runs at once: a number, or `none` for no limit."),
    ] = None,
    per_key: Annotated[
        str | None,
        typer.Option("--per-key", help="Most runs at once per concurrency key (a number or `none`)."),
    ] = None,
    namespace: Namespace = None,
    as_json: JsonFlag = False,
    api_url: ApiUrl = None,
) -> None:
    """Change the queue's concurrency limit (and/or its per-key limit)."""
    if limit is None and per_key is None:
        fail("give a LIMIT and/or --per-key N (a number, or `none` to remove the limit)")
    kwargs: dict[str, Any] = {}
    if limit is not None:
        kwargs["concurrency_limit"] = _limit(limit, "LIMIT")
    if per_key is not None:
        kwargs["per_key_concurrency_limit"] = _limit(per_key, "--per-key")
    client = connect(api_url, namespace)
    with api_errors():
        _show_queue(client.queues.set_limit(name, **kwargs), as_json)


# ---- events -------------------------------------------------------------------------------

events_app = typer.Typer(
    help="Events: resume the runs waiting for them (ctx.wait_for_event).", no_args_is_help=True
)
app.add_typer(events_app, name="events")


@events_app.command("send")
def events_send(
    name: Annotated[str, typer.Argument(help="The event's name, e.g. approval.received.")],
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="The event's data: JSON, @FILE or - (standard input).")
    ] = None,
    namespace: Namespace = None,
    as_json: JsonFlag = False,
    api_url: ApiUrl = None,
) -> None:
    """Send an event to the runs of a namespace waiting for it; it is stored first, and
    kept for a while so a wait registered shortly after still gets it."""
    body = read_payload(data, "--data")
    client = connect(api_url, namespace)
    with api_errors():
        answer = client.events.send(name, body)
    if as_json:
        print_json(dump(answer))
        return
    console().print(
        f"event {answer.id} {answer.name!r} stored in {answer.namespace}; "
        f"resumed {answer.resumed} waiting run{'s' if answer.resumed != 1 else ''}"
    )
