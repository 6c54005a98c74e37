"""``kubetask operator``, ``kubetask db upgrade`` and ``kubetask crds generate``: the
commands that run and set up kubetask itself (they need the ``operator`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kubetask.cli.common import app, fail

db_app = typer.Typer(help="The PostgreSQL schema.", no_args_is_help=True)
crds_app = typer.Typer(help="The CustomResourceDefinitions (crds/).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(crds_app, name="crds")


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
