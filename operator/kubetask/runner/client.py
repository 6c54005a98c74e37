"""The runner's side of ``/runner/v1``: JSON bodies (:mod:`kubetask.protocol`), the
attempt's bearer token, and patient retries.

The runner must outlive a restart of the operator or a fail-over to another replica: a
task that finished while the API was away must still report its outcome, or it runs
again. So connection errors, timeouts, 429 and 5xx are retried for a budget of
:data:`DEFAULT_RETRY_SECONDS` (``KUBETASK_API_RETRY_SECONDS``), with capped exponential
back-off and jitter. Any other answer that is not a success (401, 403, 404, 409, ...) is
final at once. Log batches get a much shorter budget of their own (:mod:`.logship`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
from pydantic import BaseModel, ValidationError

from kubetask.protocol import AttemptResponse, ErrorResponse, Failed, LogBatch, Succeeded

#: How long fetching the attempt and reporting the outcome are retried by default: long
#: enough to outlast an operator restart or a leader fail-over.
DEFAULT_RETRY_SECONDS = 600.0
#: Most seconds one HTTP request may take.
REQUEST_TIMEOUT_SECONDS = 10.0
#: The last try before the budget runs out still gets this long.
MIN_REQUEST_TIMEOUT_SECONDS = 2.0


class ApiError(Exception):
    """A request to the operator's API failed for good."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Backoff:
    """The waits between two tries of one request."""

    first: float = 0.2
    """Seconds before the second try."""
    cap: float = 5.0
    """Each wait doubles, up to this many seconds."""
    jitter: float = 0.5
    """Each wait is up to this fraction shorter, at random: the pods of many attempts
    that lost the API together do not come back in step."""

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield delay * (1 - self.jitter * random.random())
            delay = min(delay * 2, self.cap)


class ApiClient:
    """One connection pool to the API (use one per thread). ``retry_budget_seconds`` is
    how long a request is retried unless the call gives its own ``budget``."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        retry_budget_seconds: float = DEFAULT_RETRY_SECONDS,
        timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry_budget_seconds = retry_budget_seconds
        self.timeout_seconds = timeout_seconds
        self.backoff = backoff
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": "kubetask-runner",
            },
        )

    def close(self) -> None:
        self._client.close()

    def request(
        self, method: str, path: str, body: BaseModel | None = None, *, budget: float | None = None
    ) -> httpx.Response:
        """Send one request, retrying transient failures until ``budget`` seconds have
        passed; raise :class:`ApiError` when it fails for good."""
        budget = self.retry_budget_seconds if budget is None else budget
        deadline = time.monotonic() + budget
        content = None
        if body is not None:
            content = json.dumps(body.model_dump(by_alias=True), allow_nan=False).encode("utf-8")
        headers = {"Content-Type": "application/json"} if content is not None else None
        delays = self.backoff.delays()
        while True:
            # A request never runs far past the budget, however slow the API.
            timeout = min(self.timeout_seconds, max(MIN_REQUEST_TIMEOUT_SECONDS, deadline - time.monotonic()))
            try:
                response = self._client.request(
                    method, path, content=content, headers=headers, timeout=timeout
                )
            except httpx.TransportError as exc:
                problem, status = f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}", None
            else:
                if response.is_success:
                    return response
                status = response.status_code
                problem = f"{method} {self.base_url}{path}: HTTP {status} {_reason(response)}"
                if status != 429 and status < 500:
                    raise ApiError(problem, status)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiError(f"{problem} (gave up after {budget:g}s)", status)
            time.sleep(min(next(delays), remaining))

    def get_attempt(self) -> AttemptResponse:
        response = self.request("GET", "/runner/v1/attempt")
        try:
            return AttemptResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise ApiError(f"GET /runner/v1/attempt: malformed answer: {exc}", response.status_code) from None

    def post_logs(self, batch: LogBatch, *, budget: float | None = None) -> None:
        self.request("POST", "/runner/v1/logs", batch, budget=budget)

    def complete(self, outcome: Succeeded | Failed) -> None:
        self.request("POST", "/runner/v1/complete", outcome)


def _reason(response: httpx.Response) -> str:
    """The API's error as ``code: message``, or the start of whatever else it answered."""
    try:
        error = ErrorResponse.model_validate_json(response.content).error
    except ValidationError:
        return short(response.text)
    return short(f"{error.code}: {error.message}")


def short(text: str, limit: int = 300) -> str:
    """``text`` on one line, cut to about ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
