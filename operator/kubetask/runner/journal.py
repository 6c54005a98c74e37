"""The runner's side of durable execution: :class:`kubetask.sdk.durable.Transport` over
the runner API (``/runner/v1/journal``, ``/steps``, ``/waits``, ``/tokens``,
``/children``), with the same patient retries as the attempt's other requests."""

from __future__ import annotations

import threading
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from kubetask.protocol import (
    ChildRequest,
    ChildResponse,
    Journal,
    JournalEntry,
    StepRecord,
    TokenRequest,
    TokenResponse,
    WaitRequest,
    WaitResponse,
)
from kubetask.runner.client import ApiClient, ApiError

M = TypeVar("M", bound=BaseModel)


class RunnerTransport:
    """One client of its own (httpx clients are not shared between threads); calls come
    from worker threads, one at a time."""

    def __init__(self, base_url: str, token: str, *, retry_budget_seconds: float) -> None:
        self._api = ApiClient(base_url, token, retry_budget_seconds=retry_budget_seconds)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._api.close()

    def _send(self, method: str, path: str, body: BaseModel | None, answer: type[M] | None) -> M | None:
        with self._lock:
            response = self._api.request(method, path, body)
        if answer is None:
            return None
        try:
            return answer.model_validate_json(response.content)
        except ValidationError as exc:
            raise ApiError(f"{method} {path}: malformed answer: {exc}", response.status_code) from None

    def journal(self) -> list[JournalEntry]:
        got = self._send("GET", "/runner/v1/journal", None, Journal)
        assert got is not None
        return got.entries

    def record_step(self, body: StepRecord) -> None:
        self._send("POST", "/runner/v1/steps", body, None)

    def wait(self, body: WaitRequest) -> WaitResponse:
        got = self._send("POST", "/runner/v1/waits", body, WaitResponse)
        assert got is not None
        return got

    def token(self, body: TokenRequest) -> TokenResponse:
        got = self._send("POST", "/runner/v1/tokens", body, TokenResponse)
        assert got is not None
        return got

    def child(self, body: ChildRequest) -> ChildResponse:
        got = self._send("POST", "/runner/v1/children", body, ChildResponse)
        assert got is not None
        return got
