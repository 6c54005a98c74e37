"""The ``kubetask`` command: run the operator, migrate the database, generate the CRDs,
and look at runs through the HTTP API. docs/cli.md describes every command.

Heavy modules (kopf, SQLAlchemy, aiohttp, rich, httpx) are imported inside the commands
that need them, so ``kubetask --help`` is quick.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from kubetask.engine.machine import TERMINAL

if TYPE_CHECKING:
    import httpx
    from rich.console import Console

app = typer.Typer(
    name="kubetask",
    help="kubetask: a durable task engine for Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The PostgreSQL schema.", no_args_is_help=True)
crds_app = typer.Typer(help="The CustomResourceDefinitions (crds/).", no_args_is_help=True)
runs_app = typer.Typer(help="Runs, read through the kubetask API.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(crds_app, name="crds")
app.add_typer(runs_app, name="runs")

TERMINAL_PHASES = frozenset(p.value for p in TERMINAL)


def main() -> None:
    app()


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        from kubetask import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """kubetask: a durable task engine for Kubernetes."""


# ---- operator -----------------------------------------------------------------------


@app.command("operator")
def operator_cmd(
    namespace: Annotated[
        list[str] | None,
        typer.Option(
            "--namespace",
            "-n",
            help="Namespace to watch (repeatable). Default: KUBETASK_NAMESPACES, else the whole cluster.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the operator: reconcilers, admission, and the HTTP API."""
    from kubetask.reconcilers.main import run_operator

    run_operator(namespaces=list(namespace or []), verbose=verbose)


# ---- db -----------------------------------------------------------------------------


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


@db_app.command("upgrade")
def db_upgrade(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="SQLAlchemy URL (postgresql+psycopg://...). Default: KUBETASK_DATABASE_URL.",
            show_default=False,
        ),
    ] = None,
    revision: Annotated[str, typer.Option(help="Alembic revision to upgrade to.")] = "head",
) -> None:
    """Apply the database migrations (idempotent; safe with several operators starting)."""
    from sqlalchemy.exc import ArgumentError, OperationalError

    from kubetask.settings import settings
    from kubetask.store import db

    url = database_url or settings().database_url
    try:
        db.upgrade(url, revision)
    except ArgumentError as e:
        fail(f"the database URL is not valid ({e}); expected postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB")
    except OperationalError as e:
        reason = str(e.orig or e).strip().splitlines()[0]
        fail(
            f"cannot connect to PostgreSQL at {_safe_url(url)}: {reason}\n"
            "Start it with `make db-up`, or pass --database-url / set KUBETASK_DATABASE_URL "
            "(`make -s database-url` prints the local one)."
        )
    typer.echo(f"database {_safe_url(url)} is at revision {revision}")


# ---- crds ---------------------------------------------------------------------------


@crds_app.command("generate")
def crds_generate(
    out: Annotated[Path, typer.Option("--out", help="Directory of the CRD files.")] = Path("crds"),
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if the files differ from the models.")
    ] = False,
) -> None:
    """Write the CRDs generated from operator/kubetask/spec.py (or check the files)."""
    from kubetask import crdgen

    if not check:
        for path in crdgen.write(out):
            typer.echo(f"wrote {path}")
        return
    stale = []
    for name, crd in crdgen.all_crds().items():
        path = out / name
        if not path.is_file() or path.read_text() != crdgen.render(crd):
            stale.append(str(path))
    if stale:
        fail(
            "these CRD files differ from operator/kubetask/spec.py:\n  "
            + "\n  ".join(stale)
            + f"\nRun `kubetask crds generate --out {out}` and commit the result."
        )
    typer.echo(f"{out}: up to date")


# ---- runs: HTTP client of the public API ------------------------------------------------

ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api-url",
        help="Base URL of the kubetask API. Default: KUBETASK_API_URL (`make -s api-url` prints the local one).",
        show_default=False,
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")]


class Api:
    """A small client of ``/api/v1`` that turns every failure into a clear CLI error."""

    def __init__(self, url: str | None) -> None:
        import httpx

        from kubetask.settings import settings

        self.url = (url or settings().api_url).rstrip("/")
        self._client = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(10.0), headers={"Accept": "application/json"}
        )

    def get(self, path: str, params: Any = None) -> Any:
        import httpx

        try:
            response = self._client.get(path, params=params)
        except httpx.TransportError as e:
            fail(
                f"cannot reach the kubetask API at {self.url} ({type(e).__name__}: {e}).\n"
                "Pass --api-url or set KUBETASK_API_URL; on the local stack, "
                "`export KUBETASK_API_URL=$(make -s api-url)`."
            )
        return self._body(response)

    def _body(self, response: httpx.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success and body is not None:
            return body
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and "message" in error:
            fail(f"{error['message']} (HTTP {response.status_code})")
        fail(
            f"{response.request.method} {response.request.url} answered HTTP {response.status_code} "
            f"that is not kubetask's API: {response.text[:200]!r}. Is --api-url / KUBETASK_API_URL right?"
        )


def _console() -> Console:
    from rich.console import Console

    return Console()


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _when(iso: str | None) -> str:
    """``2024-05-01T12:00:00.123456Z`` -> ``2024-05-01 12:00:00``."""
    return iso[:19].replace("T", " ") if iso else "-"


def _seconds(start: str, end: str | None) -> float:
    from datetime import UTC, datetime

    begin = datetime.fromisoformat(start)
    return ((datetime.fromisoformat(end) if end else datetime.now(UTC)) - begin).total_seconds()


def _duration(start: str | None, end: str | None) -> str:
    """How long from ``start`` to ``end`` (or now): ``4.2s``, ``3m07s``, ``2h05m``, ``3d04h``."""
    if not start:
        return "-"
    seconds = max(0.0, _seconds(start, end))
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 86400)}d{int(seconds % 86400 // 3600):02d}h"


def _age(created: str | None) -> str:
    """kubectl-style age: ``45s``, ``12m``, ``5h``, ``3d``."""
    if not created:
        return "-"
    seconds = max(0, int(_seconds(created, None)))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


_PHASE_STYLE = {
    "Succeeded": "green",
    "Failed": "red",
    "TimedOut": "red",
    "Canceled": "yellow",
    "Running": "cyan",
    "Retrying": "magenta",
}


def _phase(phase: str) -> str:
    style = _PHASE_STYLE.get(phase)
    return f"[{style}]{phase}[/]" if style else phase


@runs_app.command("list")
def runs_list(
    task: Annotated[
        list[str] | None, typer.Option("--task", help="Only runs of this Task (repeatable).")
    ] = None,
    phase: Annotated[
        list[str] | None,
        typer.Option("--phase", "--status", help="Only runs in this phase (repeatable or comma-separated)."),
    ] = None,
    since: Annotated[
        str, typer.Option(help="Created after: 30m, 24h, 7d, an ISO-8601 time, or `all`.")
    ] = "24h",
    until: Annotated[str | None, typer.Option(help="Created before (same forms as --since).")] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Only runs with this tag (repeatable: all).")
    ] = None,
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", help="Only runs of this namespace.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Runs per page.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Page to show (printed after a full page).")] = None,
    as_json: JsonFlag = False,
    api_url: ApiUrl = None,
) -> None:
    """List runs, newest first."""
    params: list[tuple[str, str | int]] = [("limit", limit)]
    params += [("task", t) for t in task or []]
    params += [("phase", p) for p in phase or []]
    params += [("tag", t) for t in tag or []]
    if since and since.lower() != "all":
        params.append(("since", since))
    if until:
        params.append(("until", until))
    if namespace:
        params.append(("namespace", namespace))
    if cursor:
        params.append(("cursor", cursor))
    page = Api(api_url).get("/api/v1/runs", params=params)
    if as_json:
        _print_json(page)
        return
    from rich.table import Table

    console = _console()
    items = page["items"]
    if not items:
        if since.lower() == "all":
            console.print("No runs match.")
        else:
            console.print(f"No runs created since {since} match (--since all looks further back).")
        return
    table = Table(box=None, header_style="bold")
    table.add_column("ID", no_wrap=True)  # whole, to copy into `kubetask runs get`
    table.add_column("NAME", overflow="fold")
    table.add_column("TASK", overflow="fold")
    for column in ("PHASE", "ATTEMPT", "AGE", "DURATION"):
        table.add_column(column, no_wrap=True)
    table.add_column("TAGS", overflow="fold")
    for run in items:
        table.add_row(
            run["id"],
            f"{run['namespace']}/{run['name']}",
            run["task"],
            _phase(run["phase"]),
            f"{run['attempt']}/{run['maxAttempts']}",
            _age(run["createdAt"]),
            _duration(run["startedAt"], run["finishedAt"]),
            ",".join(run["tags"]),
        )
    console.print(table)
    if page["nextCursor"]:
        console.print(f"[dim]More runs: add --cursor {page['nextCursor']}[/]")


@runs_app.command("get")
def runs_get(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="The run's id (see `kubetask runs list`).")],
    as_json: JsonFlag = False,
    api_url: ApiUrl = None,
) -> None:
    """Show one run: its state, payload, output and attempts."""
    run = Api(api_url).get(f"/api/v1/runs/{_quote(run_id)}")
    if as_json:
        _print_json(run)
        return
    from rich.table import Table

    console = _console()
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    rows = [
        ("ID", run["id"]),
        ("Name", f"{run['namespace']}/{run['name']}"),
        ("Task", run["task"]),
        ("Queue", run["queue"]),
        ("Phase", _phase(run["phase"])),
        ("Reason", run["reason"] or "-"),
        ("Message", run["message"] or "-"),
        ("Attempt", f"{run['attempt']} of {run['maxAttempts']}"),
        ("Priority", str(run["priority"])),
        ("Tags", ", ".join(run["tags"]) or "-"),
        ("Concurrency key", run["concurrencyKey"] or "-"),
        ("Idempotency key", run["idempotencyKey"] or "-"),
        ("Created", _when(run["createdAt"])),
        ("Started", _when(run["startedAt"])),
        ("Finished", _when(run["finishedAt"])),
        ("Duration", _duration(run["startedAt"], run["finishedAt"])),
    ]
    if run.get("originalRunId"):
        rows.append(("Original run", run["originalRunId"]))
    for key, value in rows:
        facts.add_row(key, value)
    console.print(facts)
    if run.get("error"):
        err = run["error"]
        console.print(
            f"\n[bold red]Error[/] {err.get('type', '')}: {err.get('message', '')}", highlight=False
        )
    console.print("\n[bold]Payload[/]")
    console.print_json(data=run["payload"])
    if run.get("hasOutput"):
        console.print("\n[bold]Output[/]")
        console.print_json(data=run["output"])
    if run["attempts"]:
        table = Table(box=None, header_style="bold", title="Attempts", title_justify="left")
        for column in ("#", "POD", "STARTED (UTC)", "DURATION", "EXIT", "REASON", "ERROR"):
            table.add_column(column, overflow="fold")
        for a in run["attempts"]:
            error = a.get("error") or {}
            table.add_row(
                str(a["number"]),
                a["podName"],
                _when(a["startedAt"]),
                _duration(a["startedAt"], a["finishedAt"]),
                "-" if a["exitCode"] is None else str(a["exitCode"]),
                a["reason"] or "-",
                error.get("message", "") if isinstance(error, dict) else str(error),
            )
        console.print()
        console.print(table)


def _quote(run_id: str) -> str:
    from urllib.parse import quote

    return quote(run_id, safe="")


@runs_app.command("logs")
def runs_logs(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="The run's id (see `kubetask runs list`).")],
    attempt: Annotated[int | None, typer.Option(min=1, help="Only this attempt's lines.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    api_url: ApiUrl = None,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls with --follow.")] = 1.0,
) -> None:
    """Print a run's log lines (all attempts unless --attempt)."""
    api = Api(api_url)
    path = f"/api/v1/runs/{_quote(run_id)}"
    params: dict[str, int] = {"limit": 1000}
    if attempt is not None:
        params["attempt"] = attempt
    final = False  # the run has ended: drain what is left, then stop
    try:
        while True:
            page = api.get(f"{path}/logs", params=params)
            for line in page["items"]:
                _print_line(line, as_json=as_json)
            if page["next"] is not None:
                params["after"] = page["next"]
            if len(page["items"]) == params["limit"]:
                continue  # more right away
            if not follow or final:
                return
            if api.get(path)["phase"] in TERMINAL_PHASES:
                final = True
                continue
            time.sleep(interval)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _print_line(line: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    else:
        level = line["level"].upper()
        ts = (line["ts"] or "")[:23].replace("T", " ")
        sys.stdout.write(f"{ts} [{line['attempt']}] {level:<7} {line['message']}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
