"""``kubetask runs ...``: list, get, logs, watch, cancel and replay runs (one by id, or in
bulk by filters), through the public API."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kubetask.cli.catalog import read_payload
from kubetask.cli.common import (
    ApiUrl,
    JsonFlag,
    age,
    api_errors,
    app,
    connect,
    console,
    dump,
    duration,
    fail,
    phase,
    print_json,
    when,
)

if TYPE_CHECKING:
    from rich.table import Table

    from kubetask.apimodels import BulkProgress, BulkSummary, LogLine, RunSummary
    from kubetask.sdk.client import Client

runs_app = typer.Typer(help="Runs: list, inspect, follow, cancel, replay.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

Tasks = Annotated[list[str] | None, typer.Option("--task", help="Only runs of this Task (repeatable).")]
Phases = Annotated[
    list[str] | None,
    typer.Option("--status", "--phase", help="Only runs in this phase (repeatable or comma-separated)."),
]
Until = Annotated[str | None, typer.Option(help="Created before (same forms as --since).")]
Tags = Annotated[list[str] | None, typer.Option("--tag", help="Only runs with this tag (repeatable: all).")]
Namespaces = Annotated[
    list[str] | None,
    typer.Option(
        "--namespace", "-n", help="Only runs of this namespace (repeatable). Default: every one you may read."
    ),
]
RunId = Annotated[str, typer.Argument(metavar="ID", help="The run's id (see `kubetask runs list`).")]


def _params(
    task: list[str] | None,
    status: list[str] | None,
    since: str | None,
    until: str | None,
    tag: list[str] | None,
    namespace: list[str] | None,
) -> list[tuple[str, str]]:
    params = [("task", t) for t in task or []]
    params += [("phase", p) for p in status or []]
    params += [("tag", t) for t in tag or []]
    params += [("namespace", n) for n in namespace or []]
    if since and since.lower() != "all":
        params.append(("since", since))
    if until:
        params.append(("until", until))
    return params


def _runs_table(items: list[RunSummary]) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    table.add_column("ID", no_wrap=True)  # whole, to copy into `kubetask runs get`
    table.add_column("NAME", overflow="fold")
    table.add_column("TASK", overflow="fold")
    for column in ("PHASE", "ATTEMPT", "AGE", "DURATION"):
        table.add_column(column, no_wrap=True)
    table.add_column("TAGS", overflow="fold")
    for run in items:
        table.add_row(
            run.id,
            f"{run.namespace}/{run.name}",
            run.task,
            phase(run.phase),
            f"{run.attempt}/{run.max_attempts}",
            age(run.created_at),
            duration(run.started_at, run.finished_at),
            ",".join(run.tags),
        )
    return table


@runs_app.command("list")
def runs_list(
    task: Tasks = None,
    status: Phases = None,
    since: Annotated[
        str, typer.Option(help="Created after: 30m, 24h, 7d, an ISO-8601 time, or `all`.")
    ] = "24h",
    until: Until = None,
    tag: Tags = None,
    namespace: Namespaces = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Runs per page.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Page to show (printed after a full page).")] = None,
    as_json: JsonFlag = False,
    api_url: ApiUrl = None,
) -> None:
    """List runs, newest first."""
    client = connect(api_url)
    with api_errors():
        page = client.runs.page(
            params=_params(task, status, since, until, tag, namespace), limit=limit, cursor=cursor
        )
    if as_json:
        print_json(dump(page))
        return
    out = console()
    if not page.items:
        if since.lower() == "all":
            out.print("No runs match.")
        else:
            out.print(f"No runs created since {since} match (--since all looks further back).")
        return
    out.print(_runs_table(page.items))
    if page.next_cursor:
        out.print(f"[dim]More runs: add --cursor {page.next_cursor}[/]")


@runs_app.command("get")
def runs_get(run_id: RunId, as_json: JsonFlag = False, api_url: ApiUrl = None) -> None:
    """Show one run: its state, payload, output and attempts."""
    client = connect(api_url)
    with api_errors():
        run = client.runs.retrieve(run_id)
    if as_json:
        print_json(dump(run))
        return
    from rich.table import Table

    out = console()
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    rows = [
        ("ID", run.id),
        ("Name", f"{run.namespace}/{run.name}"),
        ("Task", run.task),
        ("Queue", run.queue),
        ("Phase", phase(run.phase)),
        ("Reason", run.reason or "-"),
        ("Message", run.message or "-"),
        ("Attempt", f"{run.attempt} of {run.max_attempts}"),
        ("Priority", str(run.priority)),
        ("Tags", ", ".join(run.tags) or "-"),
        ("Concurrency key", run.concurrency_key or "-"),
        ("Idempotency key", run.idempotency_key or "-"),
        ("Created", when(run.created_at)),
        ("Started", when(run.started_at)),
        ("Finished", when(run.finished_at)),
        ("Duration", duration(run.started_at, run.finished_at)),
    ]
    if run.original_run_id:
        rows.append(("Original run", run.original_run_id))
    for key, value in rows:
        facts.add_row(key, value)
    out.print(facts)
    if run.error:
        out.print(f"\n[bold red]Error[/] {run.error.type}: {run.error.message}")
    out.print("\n[bold]Payload[/]")
    out.print_json(data=run.payload)
    if run.has_output:
        out.print("\n[bold]Output[/]")
        out.print_json(data=run.output)
    if run.attempts:
        table = Table(box=None, header_style="bold", title="Attempts", title_justify="left")
        for column in ("#", "POD", "STARTED (UTC)", "DURATION", "EXIT", "REASON", "ERROR"):
            table.add_column(column, overflow="fold")
        for a in run.attempts:
            table.add_row(
                str(a.number),
                a.pod_name,
                when(a.started_at),
                duration(a.started_at, a.finished_at),
                "-" if a.exit_code is None else str(a.exit_code),
                a.reason or "-",
                f"{a.error.type}: {a.error.message}" if a.error else "",
            )
        out.print()
        out.print(table)


@runs_app.command("logs")
def runs_logs(
    run_id: RunId,
    attempt: Annotated[int | None, typer.Option(min=1, help="Only this attempt's lines.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    api_url: ApiUrl = None,
) -> None:
    """Print a run's log lines (all attempts unless --attempt)."""
    client = connect(api_url)
    with api_errors():
        for line in client.runs.logs(run_id, follow=follow, attempt=attempt):
            _print_line(line, as_json=as_json)


def _print_line(line: LogLine, *, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(line.model_dump_json(by_alias=True) + "\n")
    else:
        ts = line.ts[:23].replace("T", " ")
        sys.stdout.write(f"{ts} [{line.attempt}] {line.level.upper():<7} {line.message}\n")
    sys.stdout.flush()


@runs_app.command("watch")
def runs_watch(
    task: Tasks = None,
    status: Phases = None,
    since: Annotated[str, typer.Option(help="Created after: 30m, 24h, 7d, ISO-8601, or `all`.")] = "1h",
    tag: Tags = None,
    namespace: Namespaces = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Rows shown (the newest runs).")] = 20,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
    iterations: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many refreshes (default: until Ctrl-C).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each refresh as one JSON line.")] = False,
    api_url: ApiUrl = None,
) -> None:
    """A live table of the newest runs, refreshed every --interval seconds (Ctrl-C stops)."""
    from rich.live import Live

    client = connect(api_url)
    params = _params(task, status, since, None, tag, namespace)
    count = 0
    try:
        with api_errors():
            if as_json:
                while iterations is None or count < iterations:
                    page = client.runs.page(params=params, limit=limit)
                    sys.stdout.write(page.model_dump_json(by_alias=True) + "\n")
                    sys.stdout.flush()
                    count += 1
                    if iterations is None or count < iterations:
                        time.sleep(interval)
                return
            with Live(console=console(), auto_refresh=False) as live:
                while iterations is None or count < iterations:
                    page = client.runs.page(params=params, limit=limit)
                    live.update(_watch_view(page.items, since, interval), refresh=True)
                    count += 1
                    if iterations is None or count < iterations:
                        time.sleep(interval)
    except typer.Exit as e:
        if e.exit_code != 130:
            raise  # Ctrl-C is how watching ends: exit 0


def _watch_view(items: list[RunSummary], since: str, interval: float) -> Any:
    from rich.console import Group
    from rich.text import Text

    stamp = time.strftime("%H:%M:%S")
    header = Text(
        f"{stamp}  {len(items)} runs since {since}, every {interval:g}s (Ctrl-C stops)", style="dim"
    )
    return Group(header, _runs_table(items)) if items else Group(header, Text("No runs match."))


# ---- cancel and replay: one run, or many by filters -------------------------------------


def _bulk_filters_given(*values: Any) -> bool:
    return any(bool(v) for v in values)


@runs_app.command("cancel")
def runs_cancel(
    run_id: Annotated[
        str | None, typer.Argument(metavar="[ID]", help="The run to cancel; or use filters.")
    ] = None,
    task: Tasks = None,
    status: Phases = None,
    since: Annotated[str | None, typer.Option(help="Created after: 30m, 24h, 7d, or ISO-8601.")] = None,
    until: Until = None,
    tag: Tags = None,
    namespace: Namespaces = None,
    limit: Annotated[int | None, typer.Option(min=1, max=10_000, help="Most runs to act on.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonFlag = False,
    api_url: ApiUrl = None,
) -> None:
    """Cancel a run, or (with --task/--status/--since/... filters) every unfinished run they match."""
    client = connect(api_url)
    if run_id is not None:
        if _bulk_filters_given(task, status, since, until, tag, namespace, limit):
            fail("give either a run ID or filters (--task, --status, --since, ...), not both")
        with api_errors():
            answer = client.runs.cancel(run_id)
        if as_json:
            print_json(dump(answer))
        else:
            typer.echo(
                f"cancel requested for {answer.id} ({answer.namespace}/{answer.name}, was {answer.phase})"
            )
        return
    _bulk(client, "cancel", task, status, since, until, tag, namespace, limit, yes=yes, as_json=as_json)


@runs_app.command("replay")
def runs_replay(
    run_id: Annotated[
        str | None, typer.Argument(metavar="[ID]", help="The run to replay; or use filters.")
    ] = None,
    task: Tasks = None,
    status: Phases = None,
    since: Annotated[str | None, typer.Option(help="Created after: 30m, 24h, 7d, or ISO-8601.")] = None,
    until: Until = None,
    tag: Tags = None,
    namespace: Namespaces = None,
    limit: Annotated[int | None, typer.Option(min=1, max=10_000, help="Most runs to act on.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    payload: Annotated[
        str | None,
        typer.Option(
            "--payload",
            "-p",
            help="With an ID: replay with this payload (JSON object, @FILE, or - for stdin).",
        ),
    ] = None,
    as_json: JsonFlag = False,
    api_url: ApiUrl = None,
) -> None:
    """Replay a run (a new run, same task and payload, or --payload), or every run the
    filters match."""
    client = connect(api_url)
    if run_id is not None:
        if _bulk_filters_given(task, status, since, until, tag, namespace, limit):
            fail("give either a run ID or filters (--task, --status, --since, ...), not both")
        edited = read_payload(payload) if payload is not None else None
        with api_errors():
            answer = client.runs.replay(run_id, edited)
        if as_json:
            print_json(dump(answer))
        else:
            typer.echo(f"replayed {answer.replay_of} as {answer.id} ({answer.namespace}/{answer.name})")
        return
    if payload is not None:
        fail("--payload replays one run: give its ID")
    _bulk(client, "replay", task, status, since, until, tag, namespace, limit, yes=yes, as_json=as_json)


def _bulk(
    client: Client,
    action: str,
    task: list[str] | None,
    status: list[str] | None,
    since: str | None,
    until: str | None,
    tag: list[str] | None,
    namespace: list[str] | None,
    limit: int | None,
    *,
    yes: bool,
    as_json: bool,
) -> None:
    from kubetask.apimodels import BULK_MAX_RUNS, TERMINAL_PHASES, BulkSummary

    if not _bulk_filters_given(task, status, since, until, tag, namespace):
        fail(f"give a run ID, or filters for a bulk {action} (--task, --status, --since, --tag, -n)")
    filters: dict[str, Any] = {
        "task": task,
        "status": [p.strip() for s in status or [] for p in s.split(",") if p.strip()],
        "since": since,
        "until": until,
        "tags": tag,
        "namespace": namespace,
    }
    cap = limit or BULK_MAX_RUNS
    with api_errors():
        if not yes:
            matched = list(client.runs.list(**filters, limit=cap))
            if action == "cancel":
                matched = [r for r in matched if r.phase not in TERMINAL_PHASES]
            if not matched:
                typer.echo(f"no runs to {action} match these filters", err=True)
                return
            more = "+" if len(matched) >= cap else ""
            if not typer.confirm(f"{action.capitalize()} {len(matched)}{more} runs?", err=True):
                fail("nothing done (--yes skips this question)")
        lines = (client.runs.bulk_cancel if action == "cancel" else client.runs.bulk_replay)(
            **filters, limit=limit
        )
        summary = _bulk_progress(lines, action, as_json=as_json)
    if summary is None:
        fail(f"the bulk {action} ended without its summary: the connection was cut; run it again")
    assert isinstance(summary, BulkSummary)
    counts = summary.summary
    if as_json:
        return
    done = "canceled" if action == "cancel" else "replayed"
    text = f"{counts.matched} matched, {counts.succeeded} {done}, {counts.skipped} skipped, {counts.failed} failed"
    if counts.truncated:
        text += "; more runs matched than the limit: run it again for the rest"
    if counts.denied_namespaces:
        text += f"; not allowed in {', '.join(counts.denied_namespaces)} (left alone)"
    typer.echo(text)
    if counts.failed:
        fail(f"{counts.failed} runs could not be {done} (see above; `--json` lists each)")


def _bulk_progress(lines: Any, action: str, *, as_json: bool) -> BulkProgress | BulkSummary | None:
    """Show the stream (a progress bar, or the JSON lines); the summary line, if it came."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kubetask.apimodels import BulkSummary

    summary = None
    if as_json:
        for item in lines:
            sys.stdout.write(item.model_dump_json(by_alias=True) + "\n")
            if isinstance(item, BulkSummary):
                summary = item
        return summary
    failures: list[str] = []
    columns = (TextColumn(f"{action}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console(stderr=True), transient=False) as progress:
        bar = progress.add_task(action, total=None)
        for item in lines:
            progress.update(bar, completed=item.done, total=item.total or None)
            if isinstance(item, BulkSummary):
                summary = item
            elif item.result == "failed":
                failures.append(f"{item.run_id}: {item.message}")
    for failure in failures:
        typer.echo(f"failed: {failure}", err=True)
    return summary
