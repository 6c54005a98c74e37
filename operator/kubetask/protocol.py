"""The wire protocol between the runner (in every attempt pod) and the operator's API
(``/runner/v1``), as the one set of models both sides use: the API validates request
bodies with them and builds its answers from them; the runner builds its requests and
reads the answers with them. docs/api.md and docs/runner.md describe the JSON.

- ``GET /runner/v1/attempt``: no body; ``200`` :class:`AttemptResponse`;
- ``POST /runner/v1/logs``: :class:`LogBatch`; ``204`` without a body;
- ``POST /runner/v1/complete``: :class:`Completion`; ``204`` without a body.

Any other answer is an error, :class:`ErrorResponse`.

The rules the models enforce are the API's limits (sizes, what PostgreSQL can store).
Log lines and error texts that break them are cleaned or cut; a request that breaks them
otherwise fails validation with a :class:`Problem` (:func:`problem`) whose code and message
the API sends back as is.

The runner's exit codes live here too: they are the other half of what the runner tells
the operator (read when no outcome was reported).

The runner image installs kubetask without the ``operator`` extra: this module imports
only pydantic and the standard library.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    RootModel,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# ---- exit codes -------------------------------------------------------------------------
# The runner's exit code tells the operator what happened when no outcome was reported
# (engine/outcomes.py decides what each means for the run; docs/runner.md has the table).

EXIT_OK: Final = 0
"""The task returned and its output was reported."""
EXIT_TASK_ERROR: Final = 1
"""The task raised; retryable (reported)."""
EXIT_ABORTED: Final = 10
"""The task raised ``AbortRun``; not retryable (reported)."""
EXIT_LOAD_ERROR: Final = 11
"""The task could not be loaded; not retryable (reported if the API is reachable)."""
EXIT_API_UNREACHABLE: Final = 12
"""The API could not be reached or rejected the token; infrastructure, retryable."""
EXIT_OUTPUT_NOT_SERIALIZABLE: Final = 13
"""The output is not JSON, or the API rejected it; not retryable (reported)."""
EXIT_SUSPENDED: Final = 14
"""The task suspended on a durable wait (registered with the API first): the run waits,
holding no pod and no slot, and a later pod resumes it."""

# ---- limits -----------------------------------------------------------------------------

KiB: Final = 1024
MiB: Final = 1024 * KiB

MAX_LOG_LINES: Final = 1000
"""Most log lines in one ``POST /runner/v1/logs`` (more: ``413 too_many_lines``)."""
MAX_LOG_MESSAGE_BYTES: Final = 64 * KiB
"""Longer log messages are cut to this many UTF-8 bytes, ending with :data:`TRUNCATED`."""
MAX_LOG_FIELD_CHARS: Final = 16
"""``level`` and ``stream`` are cut to this many characters."""
MAX_LOGS_BODY_BYTES: Final = 16 * MiB
"""Most bytes of one ``POST /runner/v1/logs`` body."""
MAX_OUTPUT_BYTES: Final = 10 * MiB
"""Largest task output (compact JSON, UTF-8 bytes; more: ``413 output_too_large``)."""
MAX_COMPLETE_BODY_BYTES: Final = MAX_OUTPUT_BYTES + 1 * MiB
"""Most bytes of one ``POST /runner/v1/complete`` body: the output plus room for the rest."""
MAX_ERROR_TYPE_CHARS: Final = 64
"""A failed attempt's ``error.type`` is cut to this many characters."""
MAX_ERROR_MESSAGE_BYTES: Final = 64 * KiB
"""A failed attempt's ``error.message`` is cut to this many UTF-8 bytes."""
MAX_ERROR_STACK_BYTES: Final = 256 * KiB
"""A failed attempt's ``error.stack`` is cut to this many UTF-8 bytes."""
MAX_STEP_RESULT_BYTES: Final = 1 * MiB
"""Largest result of one ``ctx.step`` (compact JSON, UTF-8 bytes), also the largest event
data and token completion body: the journal is read back by every replaying pod."""
MAX_JOURNAL_NAME_CHARS: Final = 200
"""Longest name of a step or wait (its key adds ``#n`` for repeats)."""
MAX_WAIT_SECONDS: Final = 366 * 24 * 3600
"""Longest timeout or sleep of one durable wait (a year and a day)."""
MAX_ERROR_TYPES: Final = 32
"""A failed attempt's ``error.types`` keeps this many classes, the most derived first."""
MAX_ERROR_TYPE_NAME_CHARS: Final = 256
"""Each of ``error.types`` is cut to this many characters."""

TRUNCATED: Final = "… [truncated]"
"""The end of a text the API cut to its limit."""


def clean_text(value: str, max_bytes: int) -> str:
    """Make a string storable in PostgreSQL (no NUL, no lone surrogates) and at most
    ``max_bytes`` UTF-8 bytes long (cut ones end with :data:`TRUNCATED`)."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "replace")
        value = raw.decode("utf-8")
    if len(raw) <= max_bytes:
        return value
    keep = max_bytes - len(TRUNCATED.encode())
    return raw[:keep].decode("utf-8", "ignore") + TRUNCATED


def hash_token(token: str) -> str:
    """How an attempt's token is stored and looked up (never the plaintext): SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def iso(ts: datetime) -> str:
    """ISO-8601 UTC with microseconds and a ``Z``, e.g. ``2024-05-01T12:00:00.123456Z``."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def exception_types(exc: BaseException) -> list[str]:
    """The class hierarchy of ``exc`` as ``error.types`` reports it: ``module.QualifiedName``
    of each class of its MRO, the most derived first, without ``object`` (at most
    :data:`MAX_ERROR_TYPES`). The operator matches a Task's ``retry.nonRetryableErrors``
    against these names, by the last part (the class's own name) or in full."""
    names = [f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__ if cls is not object]
    return names[:MAX_ERROR_TYPES]


# ---- problems ---------------------------------------------------------------------------

_WHERE = "{where}"

#: The codes of the problems the models report, and the HTTP status the API answers with.
PROBLEM_STATUS: Final = {
    "invalid_body": 400,
    "invalid_log_line": 400,
    "invalid_result": 400,
    "invalid_output": 400,
    "too_many_lines": 413,
    "output_too_large": 413,
    "invalid_journal": 400,
    "result_too_large": 413,
}


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a body is not valid: a stable ``code`` (:data:`PROBLEM_STATUS`) and a message
    that says what to change."""

    code: str
    message: str

    @property
    def status(self) -> int:
        """The HTTP status the API answers with."""
        return PROBLEM_STATUS.get(self.code, 400)


def _invalid(code: str, message: str) -> PydanticCustomError:
    """A validation error with one of our codes. ``message`` may start with ``{where}``:
    :func:`problem` puts the location of the value there, e.g. ``lines[3].ts``."""
    # pydantic formats the message with the context: map {where} to itself so that it
    # survives until problem() knows the location.
    return PydanticCustomError(code, message, {"where": _WHERE})


def problem(exc: ValidationError) -> Problem:
    """The first problem ``exc`` reports, as the API sends it back."""
    error = exc.errors(include_url=False)[0]
    where = _location(error["loc"])
    message = error["msg"]
    if error["type"] in PROBLEM_STATUS:
        if message.startswith(_WHERE):
            message = where + message[len(_WHERE) :]
        return Problem(error["type"], message)
    # Not one of ours (the models check types themselves): still say where and what.
    return Problem("invalid_body", f"{where or 'the body'}: {message}")


def _location(loc: Sequence[int | str]) -> str:
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else part
    return where


class _Wire(BaseModel):
    # Unknown fields are ignored, so either side can learn new ones first.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# ---- GET /runner/v1/attempt ---------------------------------------------------------------


class RunRef(_Wire):
    id: str
    name: str
    namespace: str = ""
    tags: list[str] = Field(default_factory=list)


class TaskRef(_Wire):
    id: str


class AttemptRef(_Wire):
    number: int = Field(ge=1)
    max_attempts: int = Field(alias="maxAttempts", ge=1)


class AttemptResponse(_Wire):
    """The answer of ``GET /runner/v1/attempt``: what the attempt should do."""

    run: RunRef
    task: TaskRef
    attempt: AttemptRef
    payload: Any = None
    """The task's first argument (the API sends ``{}`` for a run without a payload)."""


# ---- POST /runner/v1/logs -----------------------------------------------------------------


class LogEntry(_Wire):
    """One log line. ``message`` is cut to :data:`MAX_LOG_MESSAGE_BYTES`; NUL characters and
    lone surrogates are replaced (PostgreSQL text cannot hold them)."""

    ts: datetime | None = None
    """When the line was written: ISO-8601 (no offset means UTC) or Unix seconds on the
    wire; None means the time it arrived. Sent as ISO-8601 UTC with a ``Z``."""
    level: str = "info"
    """``DEBUG`` ... ``CRITICAL`` for log records, ``INFO``/``ERROR`` for stdout/stderr."""
    stream: str = "stdout"
    """``log``, ``stdout`` or ``stderr``."""
    message: str
    """One line without its newline (a log record with its traceback is one entry)."""

    @model_validator(mode="before")
    @classmethod
    def _an_object_with_a_message(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise _invalid("invalid_log_line", "{where} must be an object with ts, level, stream and message")
        if not isinstance(data.get("message"), str):
            raise _invalid("invalid_log_line", "{where}.message must be a string")
        return data

    @field_validator("ts", mode="before")
    @classmethod
    def _time(cls, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value
        if isinstance(value, bool):
            raise _invalid(
                "invalid_log_line", "{where} must be an ISO-8601 string or Unix seconds, not a boolean"
            )
        if isinstance(value, int | float):
            try:
                return datetime.fromtimestamp(value, UTC)
            except (OverflowError, OSError, ValueError):
                raise _invalid(
                    "invalid_log_line", f"{_WHERE}={value!r} is out of range for Unix seconds"
                ) from None
        if isinstance(value, str):
            try:
                dt = datetime.fromisoformat(value)
            except ValueError:
                raise _invalid(
                    "invalid_log_line",
                    f"{_WHERE}={value!r} is not an ISO-8601 time such as 2024-05-01T12:00:00Z",
                ) from None
            return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt
        raise _invalid("invalid_log_line", "{where} must be an ISO-8601 string or Unix seconds")

    @field_validator("level", "stream", mode="before")
    @classmethod
    def _short(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:  # as if absent
            assert info.field_name is not None
            return cls.model_fields[info.field_name].default
        if not isinstance(value, str):
            raise _invalid("invalid_log_line", "{where} must be a string")
        return clean_text(value[:MAX_LOG_FIELD_CHARS], 4 * MAX_LOG_FIELD_CHARS)

    @field_validator("message")
    @classmethod
    def _storable(cls, value: str) -> str:
        return clean_text(value, MAX_LOG_MESSAGE_BYTES)

    @field_serializer("ts")
    def _iso(self, ts: datetime | None) -> str | None:
        return None if ts is None else iso(ts)


class LogBatch(_Wire):
    """The body of ``POST /runner/v1/logs``: at most :data:`MAX_LOG_LINES` lines, stored in
    order."""

    lines: list[LogEntry]

    @model_validator(mode="before")
    @classmethod
    def _a_list_of_lines(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("lines"), list):
            raise _invalid(
                "invalid_body", 'the body must be {"lines": [{"ts", "level", "stream", "message"}, ...]}'
            )
        count = len(data["lines"])
        if count > MAX_LOG_LINES:
            raise _invalid(
                "too_many_lines",
                f"{count} log lines in one request; send at most {MAX_LOG_LINES} per request",
            )
        return data


# ---- POST /runner/v1/complete -------------------------------------------------------------


class ErrorInfo(_Wire):
    """Why an attempt failed. ``type`` is cut to :data:`MAX_ERROR_TYPE_CHARS` characters (an
    empty one is ``Error``), ``message`` and ``stack`` to :data:`MAX_ERROR_MESSAGE_BYTES` and
    :data:`MAX_ERROR_STACK_BYTES`."""

    type: str
    """The exception's class name, or ``TaskLoadError``, ``OutputNotSerializable``,
    ``OutputRejected``."""
    message: str
    stack: str | None = None
    """The traceback without the runner's own frames."""
    types: list[str] = Field(default_factory=list)
    """The exception's class and its bases, the most derived first, each as
    ``module.QualifiedName`` (:func:`exception_types`); empty for errors that are no
    exception of the task (``TaskLoadError``, ...). At most :data:`MAX_ERROR_TYPES`
    entries of at most :data:`MAX_ERROR_TYPE_NAME_CHARS` characters are kept."""

    @model_validator(mode="before")
    @classmethod
    def _strings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("type", "message", "stack"):
                value = data.get(key)
                if not isinstance(value, str) and (key != "stack" or value is not None):
                    raise _invalid("invalid_result", f"error.{key} must be a string")
            types = data.get("types")
            if types is not None and (
                not isinstance(types, list) or not all(isinstance(t, str) for t in types)
            ):
                raise _invalid("invalid_result", "error.types must be a list of strings (class names)")
        return data

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        return (clean_text(value, MAX_ERROR_TYPE_CHARS * 4) or "Error")[:MAX_ERROR_TYPE_CHARS]

    @field_validator("message")
    @classmethod
    def _message(cls, value: str) -> str:
        return clean_text(value, MAX_ERROR_MESSAGE_BYTES)

    @field_validator("stack")
    @classmethod
    def _stack(cls, value: str | None) -> str | None:
        return None if value is None else clean_text(value, MAX_ERROR_STACK_BYTES)

    @field_validator("types", mode="before")
    @classmethod
    def _types(cls, value: Any) -> Any:
        if value is None:  # as if absent
            return []
        return [
            clean_text(name[:MAX_ERROR_TYPE_NAME_CHARS], 4 * MAX_ERROR_TYPE_NAME_CHARS)
            for name in value[:MAX_ERROR_TYPES]
        ]


class Succeeded(_Wire):
    """The task returned ``output``: any JSON value of at most :data:`MAX_OUTPUT_BYTES` as
    compact UTF-8 JSON, without NUL characters (PostgreSQL's ``jsonb`` cannot hold them). A
    missing ``output`` is null."""

    status: Literal["succeeded"] = "succeeded"
    output: Any = None
    _output_bytes: int = PrivateAttr(default=0)

    @property
    def output_bytes(self) -> int:
        """The size of the output as compact UTF-8 JSON."""
        return self._output_bytes

    @model_validator(mode="after")
    def _storable(self) -> Succeeded:
        self._output_bytes = storable_size(
            self.output,
            limit=MAX_OUTPUT_BYTES,
            what="the task's output",
            invalid="invalid_output",
            too_large="output_too_large",
        )
        return self


def storable_size(value: Any, *, limit: int, what: str, invalid: str, too_large: str) -> int:
    """The size of ``value`` as compact UTF-8 JSON, if PostgreSQL's ``jsonb`` can store it
    and it is at most ``limit`` bytes; else a validation error with code ``too_large`` or
    ``invalid`` whose message names ``what``."""
    try:
        raw = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except UnicodeEncodeError:
        raise _invalid(
            invalid, f"{what} has a string with a lone UTF-16 surrogate; send valid Unicode"
        ) from None
    except (TypeError, ValueError) as exc:
        raise _invalid(invalid, f"{what} is not JSON: {exc}") from None
    if len(raw) > limit:
        raise _invalid(
            too_large,
            f"{what} is {len(raw)} bytes as JSON; the limit is {limit} bytes ({limit / MiB:g} MiB). "
            "Store large results elsewhere (e.g. object storage) and return a reference to them",
        )
    if _has_nul(value):
        raise _invalid(
            invalid, f"{what} has a NUL character (\\u0000) in a string; PostgreSQL cannot store it"
        )
    return len(raw)


def _has_nul(value: Any) -> bool:
    """Whether a JSON value has a NUL character in a string or key."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return True
        elif isinstance(v, dict):
            for k, item in v.items():
                if isinstance(k, str) and "\x00" in k:
                    return True
                stack.append(item)
        elif isinstance(v, list | tuple):
            stack.extend(v)
    return False


class Failed(_Wire):
    """The task failed; ``retryable`` (default true) says whether another attempt may help.

    The task's ``catch_error`` may have decided more (docs/retries.md): ``skipped`` (the
    run fails now; ``retryable`` is false then) or ``retryAt`` (the next attempt not
    before that time instead of the retry policy's back-off; ``retryable`` is true then).
    """

    status: Literal["failed"] = "failed"
    error: ErrorInfo
    retryable: bool = True
    retry_at: datetime | None = Field(None, alias="retryAt")
    """The next attempt not before this time (RFC 3339 with an offset on the wire; sent as
    UTC with a ``Z``). The operator never starts it earlier than the attempt's end, and
    the Task's ``maxAttempts`` still bounds the attempts."""
    skipped: bool = False
    """``catch_error`` returned ``RetryDecision.skip()``: not retried."""

    @model_validator(mode="before")
    @classmethod
    def _error_and_retryable(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if not isinstance(data.get("error"), dict | ErrorInfo):
                raise _invalid(
                    "invalid_result", 'a failed result needs "error": {"type", "message", "stack"}'
                )
            if not isinstance(data.get("retryable", True), bool):
                raise _invalid("invalid_result", '"retryable" must be true or false')
            if not isinstance(data.get("skipped", False), bool):
                raise _invalid("invalid_result", '"skipped" must be true or false')
        return data

    @field_validator("retry_at", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> datetime | None:
        if value is None or isinstance(value, datetime):
            if isinstance(value, datetime) and value.tzinfo is None:
                raise _invalid(
                    "invalid_result", "retryAt must have a time zone (a naive datetime is ambiguous)"
                )
            return value
        if isinstance(value, str):
            try:
                dt = datetime.fromisoformat(value)
            except ValueError:
                dt = None
            if dt is not None and dt.tzinfo is not None:
                return dt
        raise _invalid(
            "invalid_result",
            f"retryAt={value!r} is not an RFC 3339 time with an offset, such as 2024-05-01T12:00:00Z",
        )

    @model_validator(mode="after")
    def _consistent(self) -> Failed:
        if self.skipped and self.retryable:
            raise _invalid("invalid_result", '"skipped": true needs "retryable": false')
        if self.retry_at is not None and not self.retryable:
            raise _invalid(
                "invalid_result",
                '"retryAt" needs "retryable": true (a run that is not retried has no next attempt)',
            )
        return self

    @field_serializer("retry_at")
    def _iso(self, ts: datetime | None) -> str | None:
        return None if ts is None else iso(ts)


class Completion(RootModel[Annotated[Succeeded | Failed, Field(discriminator="status")]]):
    """The body of ``POST /runner/v1/complete``: the attempt's outcome, sent once."""

    @model_validator(mode="before")
    @classmethod
    def _a_known_status(cls, data: Any) -> Any:
        if isinstance(data, Succeeded | Failed):
            return data
        if not isinstance(data, dict):
            raise _invalid(
                "invalid_result", 'the body must be a JSON object with "status": "succeeded" or "failed"'
            )
        status = data.get("status")
        if status not in ("succeeded", "failed"):
            raise _invalid("invalid_result", f'"status" must be "succeeded" or "failed", got {status!r}')
        return data


# ---- errors -----------------------------------------------------------------------------------


class ErrorDetail(_Wire):
    code: str
    """Stable and machine-readable, e.g. ``invalid_token``."""
    message: str
    """Says what to change."""


class ErrorResponse(_Wire):
    """Every answer of the API that is not a success: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


# ---- durable execution: /runner/v1/journal, /steps, /waits, /tokens, /children --------------

JournalKind = Literal["step", "sleep", "event", "token", "token_wait", "trigger", "child"]
WaitKind = Literal["sleep", "event", "token_wait", "child"]


class _JournalCall(_Wire):
    """What every journal call carries: the call's key (its name, ``#n`` for the n-th
    repeat of a name in the run), its name, and its position among the run's calls."""

    key: str = Field(min_length=1, max_length=MAX_JOURNAL_NAME_CHARS + 12)
    name: str = Field(min_length=1, max_length=MAX_JOURNAL_NAME_CHARS)
    position: int = Field(ge=0, le=1_000_000)


class JournalEntry(_Wire):
    """One entry of ``GET /runner/v1/journal``: what a replaying pod gets back."""

    key: str
    name: str
    position: int
    kind: JournalKind
    status: str
    """step: completed | failed; waits and tokens: waiting | satisfied | timed_out |
    canceled; trigger: completed."""
    result: Any = None
    error: ErrorInfo | None = None
    due_at: datetime | None = Field(default=None, alias="dueAt")

    @field_serializer("due_at")
    def _iso(self, ts: datetime | None) -> str | None:
        return None if ts is None else iso(ts)


class Journal(_Wire):
    """The answer of ``GET /runner/v1/journal``: the run's entries by position."""

    entries: list[JournalEntry] = Field(default_factory=list)


class StepRecord(_JournalCall):
    """The body of ``POST /runner/v1/steps``: a step returned (``result``, at most
    :data:`MAX_STEP_RESULT_BYTES` of JSON) or raised (``error``)."""

    status: Literal["completed", "failed"]
    result: Any = None
    error: ErrorInfo | None = None
    started_at: datetime | None = Field(default=None, alias="startedAt")

    @model_validator(mode="after")
    def _storable(self) -> StepRecord:
        if self.status == "completed":
            storable_size(
                self.result,
                limit=MAX_STEP_RESULT_BYTES,
                what=f"the result of step {self.name!r}",
                invalid="invalid_journal",
                too_large="result_too_large",
            )
        elif self.error is None:
            raise _invalid("invalid_journal", 'a failed step needs "error": {"type", "message", "stack"}')
        return self

    @field_serializer("started_at")
    def _iso(self, ts: datetime | None) -> str | None:
        return None if ts is None else iso(ts)


class WaitRequest(_JournalCall):
    """The body of ``POST /runner/v1/waits``: register a wait (idempotent by key: a
    replayed registration gets the first one's state, never a new deadline).

    - ``sleep``: ``seconds`` from the first registration, or ``until``;
    - ``event``: ``event`` (its name) and ``match`` (fields its data must contain),
      ``timeoutSeconds``;
    - ``token_wait``: ``tokenId`` (from ``POST /runner/v1/tokens``), until the token expires;
    - ``child``: ``childRunId`` (from ``POST /runner/v1/children``), until it ends.
    """

    kind: WaitKind
    seconds: float | None = Field(default=None, ge=0, le=MAX_WAIT_SECONDS)
    until: datetime | None = None
    timeout_seconds: float | None = Field(default=None, alias="timeoutSeconds", gt=0, le=MAX_WAIT_SECONDS)
    event: str | None = Field(default=None, max_length=256)
    match: dict[str, Any] | None = None
    token_id: str | None = Field(default=None, alias="tokenId", max_length=200)
    child_run_id: str | None = Field(default=None, alias="childRunId", max_length=40)

    @model_validator(mode="after")
    def _complete(self) -> WaitRequest:
        need = {
            "sleep": self.seconds is not None or self.until is not None,
            "event": bool(self.event) and self.timeout_seconds is not None,
            "token_wait": bool(self.token_id),
            "child": bool(self.child_run_id),
        }
        if not need[self.kind]:
            fields = {
                "sleep": '"seconds" or "until"',
                "event": '"event" and "timeoutSeconds"',
                "token_wait": '"tokenId"',
                "child": '"childRunId"',
            }[self.kind]
            raise _invalid("invalid_journal", f"a {self.kind} wait needs {fields}")
        if self.until is not None and self.until.tzinfo is None:
            self.until = self.until.replace(tzinfo=UTC)
        if self.match is not None:
            storable_size(
                self.match,
                limit=64 * KiB,
                what="match",
                invalid="invalid_journal",
                too_large="result_too_large",
            )
        return self

    @field_serializer("until")
    def _iso(self, ts: datetime | None) -> str | None:
        return None if ts is None else iso(ts)


class WaitResponse(_Wire):
    """The answer of ``POST /runner/v1/waits``. ``suspend``: the runner must exit now
    (:data:`EXIT_SUSPENDED`); otherwise ``waiting`` means sleep in the pod until ``dueAt``
    (a short sleep), and ``satisfied``/``timed_out`` carry the outcome."""

    status: Literal["waiting", "satisfied", "timed_out", "canceled"]
    result: Any = None
    due_at: datetime | None = Field(default=None, alias="dueAt")
    suspend: bool = False

    @field_serializer("due_at")
    def _iso(self, ts: datetime | None) -> str | None:
        return None if ts is None else iso(ts)


class TokenRequest(_JournalCall):
    """The body of ``POST /runner/v1/tokens``: a completion token valid ``timeoutSeconds``."""

    timeout_seconds: float = Field(alias="timeoutSeconds", gt=0, le=MAX_WAIT_SECONDS)


class TokenResponse(_Wire):
    """A token: its id (the secret in its URL) and the URL to POST the result to."""

    id: str
    url: str
    expires_at: datetime = Field(alias="expiresAt")

    @field_serializer("expires_at")
    def _iso(self, ts: datetime) -> str:
        return iso(ts)


class ChildRequest(_JournalCall):
    """The body of ``POST /runner/v1/children``: start a child run of ``task`` (in the
    parent's namespace) once per key, however often the parent replays."""

    task: str = Field(min_length=1, max_length=63)
    payload: Any = None
    concurrency_key: str | None = Field(default=None, alias="concurrencyKey", max_length=256)
    idempotency_key: str | None = Field(default=None, alias="idempotencyKey", max_length=256)
    priority: int | None = None
    tags: list[str] | None = None
    max_attempts: int | None = Field(default=None, alias="maxAttempts", ge=1, le=100)

    @model_validator(mode="after")
    def _storable(self) -> ChildRequest:
        storable_size(
            self.payload,
            limit=MAX_STEP_RESULT_BYTES,
            what="the child's payload",
            invalid="invalid_journal",
            too_large="result_too_large",
        )
        return self


class ChildResponse(_Wire):
    """The child run: its id and its Run resource's name."""

    run_id: str = Field(alias="runId")
    name: str
    namespace: str
