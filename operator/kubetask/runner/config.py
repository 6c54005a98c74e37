"""What the operator tells the runner through the pod's environment (docs/runner.md lists
the variables). Read by :func:`kubetask.runner.main.main`, never at import time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kubetask.runner.client import DEFAULT_RETRY_SECONDS

DEFAULT_TOKEN_FILE = "/var/run/kubetask/token/token"
DEFAULT_SOURCE_FILE = "/var/run/kubetask/source/task.py"


class ConfigError(Exception):
    """The pod's environment is incomplete or malformed (an operator bug, not the task's)."""


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """What the operator tells the runner through the pod's environment."""

    api_url: str
    """``KUBETASK_API_URL``: the operator's API, e.g. ``http://10.96.0.50:8080``."""
    token_file: Path
    """``KUBETASK_TOKEN_FILE``: the file holding the per-attempt bearer token."""
    run_id: str | None = None
    run_name: str | None = None
    task_id: str | None = None
    """``KUBETASK_TASK_ID``: the Task's name; an explicit ``@task`` id must equal it."""
    attempt: int | None = None
    max_attempts: int | None = None
    entrypoint: str | None = None
    """``KUBETASK_ENTRYPOINT``: ``module:function``; wins over the source file when set."""
    source_file: Path = Path(DEFAULT_SOURCE_FILE)
    """``KUBETASK_SOURCE_FILE``: the Task's inline source."""
    retry_budget_seconds: float = DEFAULT_RETRY_SECONDS
    """``KUBETASK_API_RETRY_SECONDS``: how long fetching the attempt and reporting the
    outcome are retried while the API is unreachable or answers 429/5xx."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RunnerConfig:
        def opt(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def opt_int(name: str) -> int | None:
            value = opt(name)
            if value is None:
                return None
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r} is not an integer") from None

        api_url = opt("KUBETASK_API_URL")
        if api_url is None:
            raise ConfigError("KUBETASK_API_URL is not set")
        if not api_url.startswith(("http://", "https://")):
            raise ConfigError(f"KUBETASK_API_URL={api_url!r} is not an http(s) URL")
        budget = opt("KUBETASK_API_RETRY_SECONDS")
        try:
            retry_budget = float(budget) if budget is not None else DEFAULT_RETRY_SECONDS
        except ValueError:
            raise ConfigError(f"KUBETASK_API_RETRY_SECONDS={budget!r} is not a number") from None
        return cls(
            api_url=api_url.rstrip("/"),
            token_file=Path(opt("KUBETASK_TOKEN_FILE") or DEFAULT_TOKEN_FILE),
            run_id=opt("KUBETASK_RUN_ID"),
            run_name=opt("KUBETASK_RUN_NAME"),
            task_id=opt("KUBETASK_TASK_ID"),
            attempt=opt_int("KUBETASK_ATTEMPT"),
            max_attempts=opt_int("KUBETASK_MAX_ATTEMPTS"),
            entrypoint=opt("KUBETASK_ENTRYPOINT"),
            source_file=Path(opt("KUBETASK_SOURCE_FILE") or DEFAULT_SOURCE_FILE),
            retry_budget_seconds=max(0.0, retry_budget),
        )

    def read_token(self) -> str:
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the token file {self.token_file}: {exc.strerror or exc}"
            ) from None
        if not token:
            raise ConfigError(f"the token file {self.token_file} is empty")
        return token
