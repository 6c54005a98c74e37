"""``kubetask schedules list|get|pause|resume|trigger-now``: Schedules through the public
API (docs/schedules.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

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
    print_json,
    when,
)

if TYPE_CHECKING:
    from kubetask.apimodels import ScheduleItem

schedules_app = typer.Typer(help="Schedules: runs of a Task on a cron schedule.", no_args_is_help=True)
app.add_typer(schedules_app, name="schedules")

ScheduleName = Annotated[str, typer.Argument(metavar="SCHEDULE", help="The Schedule's name.")]


def _state(item: ScheduleItem) -> str:
    if item.ready is False:
        return f"[red]invalid[/] {item.message}"
    return "[yellow]paused[/]" if item.paused else "active"


def _show(item: ScheduleItem, as_json: bool) -> None:
    if as_json:
        print_json(dump(item))
        return
    out = console()
    out.print(
        f"[bold]{item.namespace}/{item.name}[/]: task {item.task}, {item.cron!r} in {item.timezone}, {_state(item)}"
    )
    out.print(f"  overlap {item.overlap_policy}, catch-up {item.catch_up}", end="")
    if item.starting_deadline_seconds is not None:
        out.print(f", starting deadline {item.starting_deadline_seconds}s", end="")
    out.print()
    out.print(f"  next run:  {when(item.next_fire_time)}")
    out.print(f"  last run:  {when(item.last_fire_time)} {item.last_run or ''}")
    if item.active_runs:
        out.print(f"  active:    {', '.join(item.active_runs)}")
    if item.upcoming:
        out.print(f"  upcoming:  {', '.join(when(u) for u in item.upcoming)} (UTC)")
    if item.skipped or item.missed:
        out.print(f"  skipped {item.skipped} (overlap), missed {item.missed} (while no operator ran)")


@schedules_app.command("list")
def schedules_list(namespace: Namespace = None, as_json: JsonFlag = False, api_url: ApiUrl = None) -> None:
    """The namespace's Schedules: when they fire next and last, and their unfinished runs."""
    client = connect(api_url, namespace)
    with api_errors():
        items = client.schedules.list()
    if as_json:
        print_json({"items": dump(items)})
        return
    out = console()
    if not items:
        out.print(f"No Schedules in namespace {client.namespace}.")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in (
        "NAME",
        "TASK",
        "CRON",
        "TIMEZONE",
        "STATE",
        "NEXT RUN (UTC)",
        "LAST RUN (UTC)",
        "ACTIVE",
        "AGE",
    ):
        table.add_column(column, overflow="fold")
    for s in items:
        table.add_row(
            s.name,
            s.task,
            s.cron,
            s.timezone,
            _state(s),
            when(s.next_fire_time),
            when(s.last_fire_time),
            str(len(s.active_runs)),
            age(s.created_at),
        )
    out.print(table)


@schedules_app.command("get")
def schedules_get(
    name: ScheduleName, namespace: Namespace = None, as_json: JsonFlag = False, api_url: ApiUrl = None
) -> None:
    """One Schedule: its settings, next fire times, last and active runs."""
    client = connect(api_url, namespace)
    with api_errors():
        _show(client.schedules.retrieve(name), as_json)


@schedules_app.command("pause")
def schedules_pause(
    name: ScheduleName, namespace: Namespace = None, as_json: JsonFlag = False, api_url: ApiUrl = None
) -> None:
    """Fire nothing until resumed (runs already started go on)."""
    client = connect(api_url, namespace)
    with api_errors():
        _show(client.schedules.pause(name), as_json)


@schedules_app.command("resume")
def schedules_resume(
    name: ScheduleName, namespace: Namespace = None, as_json: JsonFlag = False, api_url: ApiUrl = None
) -> None:
    """Fire again from the next fire time (the ones it was paused over are not caught up)."""
    client = connect(api_url, namespace)
    with api_errors():
        _show(client.schedules.resume(name), as_json)


@schedules_app.command("trigger-now")
def schedules_trigger_now(
    name: ScheduleName, namespace: Namespace = None, as_json: JsonFlag = False, api_url: ApiUrl = None
) -> None:
    """Run the Schedule's task now with its payload, whatever its overlap policy or pause."""
    client = connect(api_url, namespace)
    with api_errors():
        answer = client.schedules.trigger_now(name)
    if as_json:
        print_json(dump(answer))
    else:
        typer.echo(f"{answer.id} {answer.namespace}/{answer.name}")
