"""What the commands share: the root application, the options every API command takes,
the client (every failure a one-line message and exit 1), and the formatting of times,
durations and phases."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from pydantic import BaseModel
    from rich.console import Console

    from kubetask.sdk.client import Client

app = typer.Typer(
    name="kubetask",
    help="kubetask: a durable task engine for Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


# ---- options ------------------------------------------------------------------------------

ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api-url",
        help="Base URL of the kubetask API. Default: KUBETASK_API_URL, else found from the current "
        "kubeconfig context (the Kubernetes API server's service proxy).",
        show_default=False,
    ),
]
Namespace = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        "-n",
        help="Namespace. Default: KUBETASK_NAMESPACE, else the kubeconfig context's, else default.",
        show_default=False,
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")]

LOCAL_HINT = "on the local stack, `export KUBETASK_API_URL=$(make -s api-url)`"


@contextmanager
def api_errors() -> Iterator[None]:
    """Every failure of the client as ``error: <what to fix>`` and exit 1 (130 on Ctrl-C)."""
    from kubetask.sdk.client import ApiError

    try:
        yield
    except ApiError as e:
        message = e.message
        if e.code == "unreachable":
            message += f"; {LOCAL_HINT}"
        fail(f"{message} (HTTP {e.status})" if e.status else message)
    except TimeoutError as e:
        fail(str(e))
    except ValueError as e:  # a request the API would refuse, checked before sending
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def connect(api_url: str | None, namespace: str | None = None) -> Client:
    """The API's client, found as docs/client.md says (``--api-url`` first)."""
    from kubetask.sdk.client import Client

    with api_errors():
        return Client(api_url, namespace=namespace)
    raise AssertionError("unreachable")  # api_errors() exits on every error


# ---- output -------------------------------------------------------------------------------


def console(*, stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def dump(model: BaseModel | list[Any]) -> Any:
    """A model (or a list of them) as the API's JSON (camelCase)."""
    if isinstance(model, list):
        return [dump(m) for m in model]
    return model.model_dump(by_alias=True, mode="json")


def when(iso: str | None) -> str:
    """``2024-05-01T12:00:00.123456Z`` -> ``2024-05-01 12:00:00``."""
    return iso[:19].replace("T", " ") if iso else "-"


def _seconds(start: str, end: str | None) -> float:
    begin = datetime.fromisoformat(start)
    return ((datetime.fromisoformat(end) if end else datetime.now(UTC)) - begin).total_seconds()


def duration(start: str | None, end: str | None) -> str:
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


def age(created: str | None) -> str:
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


def phase(value: str) -> str:
    style = _PHASE_STYLE.get(value)
    return f"[{style}]{value}[/]" if style else value


def limit_text(value: int | None) -> str:
    return "-" if value is None else str(value)
