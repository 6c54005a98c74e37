"""The shape of kubetask's resources: one source of truth.

The CRD schemas in ``crds/`` are generated from these models (``kubetask crds``) and a
test proves the committed files agree. The operator parses every Task, Run and Queue
through them, so what ``kubectl apply`` accepts and what the engine understands are the
same thing. Field names are the Kubernetes camelCase ones (aliases); Python code uses
snake_case attributes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kubetask.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENTRYPOINT = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
#: An exception class: its name (``ValueError``) or ``module.QualifiedName``.
ERROR_TYPE = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
#: Most entries of ``retry.nonRetryableErrors``, and the longest one.
MAX_NON_RETRYABLE_ERRORS = 64
MAX_ERROR_TYPE_NAME = 256

#: Payloads larger than this (serialised JSON, bytes) end the Run ``Failed``
#: (condition ``PayloadTooLarge``). etcd would take up to ~1.5 MiB, but a Run is
#: watched and cached by every client; large inputs belong in object storage.
MAX_PAYLOAD_BYTES = 256 * 1024
#: Longest delay or TTL of a run (a year).
MAX_DELAY_SECONDS = 31_536_000
#: Outputs up to this size are copied into ``status.output``; larger ones stay in PostgreSQL.
MAX_STATUS_OUTPUT_BYTES = 4 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class OutOfMemorySpec(_Model):
    """What changes for the attempts of a run after one of its attempts was OOM-killed."""

    resources: dict[str, Any] = Field(
        ...,
        description="Container resources (limits, requests) merged over podTemplate.resources, key by key, "
        "for every attempt after an OOM-killed one, e.g. {limits: {memory: 1Gi}}.",
    )


class RetrySpec(_Model):
    """How failed attempts are retried. Delay before attempt n+1 is
    min(maxTimeoutMs, minTimeoutMs * factor**(n-1)), times a random factor in [1, 2)
    when ``randomize``, capped again at maxTimeoutMs."""

    max_attempts: int = Field(3, ge=1, le=100, description="Attempts in all, the first one included.")
    factor: float = Field(2.0, ge=1, le=100, description="Growth of the delay between attempts.")
    min_timeout_ms: int = Field(1000, ge=0, le=86_400_000, description="Delay before the second attempt.")
    max_timeout_ms: int = Field(60000, ge=0, le=86_400_000, description="Upper bound of any delay.")
    randomize: bool = Field(True, description="Multiply each delay by a random factor in [1, 2).")
    non_retryable_errors: list[
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_ERROR_TYPE_NAME, pattern=ERROR_TYPE)]
    ] = Field(
        default_factory=list,
        max_length=MAX_NON_RETRYABLE_ERRORS,
        description="Exception classes that fail the run at once, without another attempt: a class name "
        "(ValueError) or module.QualifiedName, matched against the raised exception's class and its bases.",
    )
    out_of_memory: OutOfMemorySpec | None = Field(
        None,
        description="Resources for the attempts that follow an attempt killed for using too much memory.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.maxTimeoutMs >= self.minTimeoutMs",
                    "message": "retry.maxTimeoutMs must be greater than or equal to retry.minTimeoutMs",
                    "fieldPath": ".maxTimeoutMs",
                }
            ]
        }
    )

    @model_validator(mode="after")
    def _max_not_below_min(self) -> Self:
        # The CEL rule above, for the SDK's and the operator's own parse.
        if self.max_timeout_ms < self.min_timeout_ms:
            raise ValueError(
                f"maxTimeoutMs ({self.max_timeout_ms}) must be greater than or equal to "
                f"minTimeoutMs ({self.min_timeout_ms})"
            )
        return self


class QueueRef(_Model):
    """The queue a Task's runs wait in, with optional inline limits.

    A Queue resource of the same name wins over these inline limits; a conflict is
    reported as a condition on the Task."""

    name: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=DNS1123_LABEL,
        description="Queue name; default: the Task's name.",
    )
    concurrency_limit: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Most runs of the queue with a live pod at once, all keys together.",
    )
    per_key_concurrency_limit: int | None = Field(
        None, ge=1, le=100_000, description="Most runs with a live pod at once for each concurrencyKey."
    )


class PodTemplate(_Model):
    """The parts of the attempt pod a Task may set. Each is passed through to the
    container or pod spec as is (Kubernetes validates them when the pod is created)."""

    resources: dict[str, Any] | None = Field(
        None,
        description="Container resources (requests/limits); replace the operator's defaults for attempt "
        "pods (runner.resources) as a whole.",
    )
    env: list[dict[str, Any]] | None = Field(None, description="Extra container environment variables.")
    env_from: list[dict[str, Any]] | None = Field(None, description="Container envFrom sources.")
    node_selector: dict[str, str] | None = Field(None, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] | None = Field(None, description="Pod tolerations.")


class TaskSpec(_Model):
    """What to run and how."""

    image: str | None = Field(
        None, min_length=1, max_length=512, description="Container image; default: the bundled runner image."
    )
    entrypoint: str | None = Field(
        None, pattern=ENTRYPOINT, max_length=256, description="module:function inside the image."
    )
    source: str | None = Field(
        None, min_length=1, max_length=262_144, description="Inline Python module with one @task function."
    )
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Retry policy.")
    queue: QueueRef | None = Field(None, description="Queue and concurrency limits.")
    max_duration_seconds: int | None = Field(
        None, ge=5, le=604_800, description="Wall-clock limit of one attempt; the run ends TimedOut."
    )
    pod_template: PodTemplate | None = Field(None, description="Pod customisation.")
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=31_536_000,
        description="Delete each finished Run resource this long after it ends (its record stays in "
        "PostgreSQL); a Run's own setting wins; default: the operator's.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.entrypoint) != has(self.source)",
                    "message": "exactly one of spec.entrypoint or spec.source must be set",
                }
            ]
        }
    )

    def queue_name(self, task_name: str) -> str:
        return (self.queue.name if self.queue and self.queue.name else None) or task_name


class Debounce(_Model):
    """Triggers with the same ``key`` (per Task and namespace) within ``delaySeconds`` of
    each other are one run."""

    key: str = Field(..., min_length=1, max_length=256, description="What makes triggers the same.")
    delay_seconds: int = Field(
        ..., ge=1, le=MAX_DELAY_SECONDS, description="The quiet time that ends a burst."
    )
    mode: Literal["leading", "trailing"] = Field(
        "trailing",
        description="trailing: one run after the burst, with the last trigger's payload; leading: "
        "the first trigger runs at once, the rest of the burst is dropped.",
    )
    max_delay_seconds: int | None = Field(
        None,
        ge=1,
        le=MAX_DELAY_SECONDS,
        description="A burst lasts at most this long from its first trigger (a stream of "
        "triggers cannot postpone the run for ever).",
    )


class RunSpec(_Model):
    """One invocation of a Task."""

    task: str = Field(
        ..., min_length=1, max_length=63, pattern=DNS1123_LABEL, description="A Task in this namespace."
    )
    payload: dict[str, Any] = Field(default_factory=dict, description="Any JSON object; the task's input.")
    concurrency_key: str | None = Field(
        None, min_length=1, max_length=256, description="Per-key concurrency group (e.g. a tenant id)."
    )
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=256, description="A second Run with the same key does not execute."
    )
    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first.")
    tags: list[str] = Field(
        default_factory=list, max_length=32, description="Free-form labels for filtering (each 1-128 chars)."
    )
    max_attempts: int | None = Field(
        None, ge=1, le=100, description="Overrides the Task's retry.maxAttempts."
    )
    cancel: bool = Field(False, description="Set true to cancel the run.")
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=31_536_000,
        description="Delete this Run resource this long after it ends (its record stays in "
        "PostgreSQL); default: the Task's, else the operator's.",
    )
    delay_seconds: int | None = Field(
        None,
        ge=0,
        le=MAX_DELAY_SECONDS,
        description="Start no sooner than this many seconds after the Run's creation (phase "
        "Delayed meanwhile, holding nothing).",
    )
    not_before: datetime | None = Field(
        None, description="Start no sooner than this time (RFC 3339); instead of delaySeconds."
    )
    ttl_seconds: int | None = Field(
        None,
        ge=1,
        le=MAX_DELAY_SECONDS,
        description="A run not started this many seconds after it may start (its creation, or "
        "the end of its delay) ends Expired.",
    )
    debounce: Debounce | None = Field(None, description="Collapse a burst of triggers into one run.")

    @model_validator(mode="after")
    def _one_delay(self) -> Self:
        if self.delay_seconds is not None and self.not_before is not None:
            raise ValueError("give delaySeconds or notBefore, not both")
        if self.not_before is not None and self.not_before.tzinfo is None:
            raise ValueError("notBefore needs a time zone, e.g. 2026-12-01T09:00:00Z")
        return self


class RateLimit(_Model):
    """At most ``limit`` pod starts per ``periodSeconds``, as a token bucket (GCRA): a burst
    of ``limit``, then one start every ``periodSeconds / limit``."""

    limit: int = Field(..., ge=1, le=100_000, description="Pod starts per period (and the burst).")
    period_seconds: int = Field(..., ge=1, le=86_400, description="The period, in seconds.")
    per_key: bool = Field(
        False, description="Each concurrencyKey gets its own bucket (instead of one for the queue)."
    )


class QueueSpec(_Model):
    """A queue shared by several Tasks."""

    concurrency_limit: int | None = Field(None, ge=1, le=100_000, description="Most live pods at once.")
    per_key_concurrency_limit: int | None = Field(
        None, ge=1, le=100_000, description="Most live pods at once per concurrencyKey."
    )
    paused: bool = Field(False, description="Paused queues admit nothing; running pods continue.")
    rate_limit: RateLimit | None = Field(None, description="Pod starts per period (a token bucket).")


#: Five fields of a cron expression, or a macro (the operator parses it with croniter;
#: kubetask.engine.cron has the rules).
CRON = (
    r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)"
    r"|[0-9A-Za-z*?/,#-]+( +[0-9A-Za-z*?/,#-]+){4})$"
)
#: An IANA time zone name such as Europe/Berlin (the operator checks that it exists).
TIME_ZONE = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$"
#: The label of every Run a Schedule creates: the Schedule's name.
LABEL_SCHEDULE = "kubetask.dev/schedule"


class ScheduleSpec(_Model):
    """Runs of a Task on a cron schedule, in a time zone (docs/schedules.md)."""

    task: str = Field(
        ...,
        min_length=1,
        max_length=63,
        pattern=DNS1123_LABEL,
        description="The Task to run, in this namespace.",
    )
    cron: str = Field(
        ...,
        min_length=1,
        max_length=200,
        pattern=CRON,
        description="Five fields (minute hour day-of-month month day-of-week), e.g. '30 2 * * *', or "
        "@yearly, @monthly, @weekly, @daily or @hourly.",
    )
    timezone: str = Field(
        "UTC",
        min_length=1,
        max_length=64,
        pattern=TIME_ZONE,
        description="IANA time zone the cron expression is read in, e.g. Europe/Berlin.",
    )
    payload: dict[str, Any] = Field(
        default_factory=dict,
        description="The runs' payload; timestamp, lastTimestamp, timezone, scheduleId and upcoming "
        "are added to it.",
    )
    paused: bool = Field(False, description="A paused schedule fires nothing; resuming does not catch up.")
    overlap_policy: Literal["Allow", "Skip", "CancelPrevious", "BufferOne"] = Field(
        "Allow",
        description="When a fire time comes while a run of this schedule is unfinished: Allow another, "
        "Skip this one, CancelPrevious (cancel it and start this one), or BufferOne (start this one when "
        "it ends; at most one waits).",
    )
    catch_up: Literal["None", "Latest", "All"] = Field(
        "Latest",
        description="Fire times missed while no operator ran: None are run, the Latest one, or All of "
        "those within startingDeadlineSeconds (the latest 100 at most).",
    )
    starting_deadline_seconds: int | None = Field(
        None,
        ge=1,
        le=31_536_000,
        description="A fire time is not run more than this late; required with catchUp All.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.catchUp != 'All' || has(self.startingDeadlineSeconds)",
                    "message": "catchUp All needs startingDeadlineSeconds (how far back to catch up)",
                    "fieldPath": ".startingDeadlineSeconds",
                }
            ]
        }
    )

    @model_validator(mode="after")
    def _deadline_with_all(self) -> ScheduleSpec:
        if self.catch_up == "All" and self.starting_deadline_seconds is None:
            raise ValueError("catchUp All needs startingDeadlineSeconds (how far back to catch up)")
        return self


HTTP_HEADER = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
#: Seconds a Stripe signature's timestamp may differ from the operator's clock.
DEFAULT_TOLERANCE_SECONDS = 300


class SecretKeyRef(_Model):
    """A key of a Secret in the resource's namespace."""

    name: str = Field(..., min_length=1, max_length=253, description="The Secret's name.")
    key: str = Field(..., min_length=1, max_length=253, description="The key in the Secret's data.")


class WebhookSpec(_Model):
    """An HTTP endpoint that triggers a Task when a request is signed with a shared secret.

    ``POST /api/v1/namespaces/{namespace}/webhooks/{name}`` on the public API; docs/webhooks.md."""

    task: str = Field(
        ...,
        min_length=1,
        max_length=63,
        pattern=DNS1123_LABEL,
        description="The Task to trigger, in this namespace.",
    )
    format: Literal["github", "stripe", "hmac-sha256"] = Field(
        ...,
        description="How requests are signed: github (X-Hub-Signature-256), stripe (Stripe-Signature, "
        "timestamped) or hmac-sha256 (the hex digest in spec.header).",
    )
    secret_ref: SecretKeyRef = Field(..., description="The Secret key holding the shared secret.")
    header: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=HTTP_HEADER,
        description="hmac-sha256 only (and required there): the header carrying the hex digest.",
    )
    tolerance_seconds: int | None = Field(
        None,
        ge=1,
        le=86_400,
        description=f"stripe only: how far the signed timestamp may be from now; default {DEFAULT_TOLERANCE_SECONDS}.",
    )
    payload: Literal["body", "wrapped"] = Field(
        "body",
        description="The run's payload: the JSON body itself (body), or {headers, body} (wrapped).",
    )
    forward_headers: list[str] = Field(
        default_factory=lambda: ["Content-Type", "User-Agent", "X-GitHub-Event", "X-GitHub-Delivery"],
        max_length=32,
        description="wrapped only: the request headers copied into payload.headers (names lowercased).",
    )
    idempotency_key_header: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=HTTP_HEADER,
        description="A header whose value becomes the run's idempotencyKey (e.g. X-GitHub-Delivery), so a "
        "redelivery does not run twice.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.format == 'hmac-sha256' ? has(self.header) : !has(self.header)",
                    "message": "spec.header is required with format hmac-sha256 and not allowed otherwise",
                    "fieldPath": ".header",
                },
                {
                    "rule": "!has(self.toleranceSeconds) || self.format == 'stripe'",
                    "message": "spec.toleranceSeconds is only allowed with format stripe",
                    "fieldPath": ".toleranceSeconds",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _format_fields(self) -> WebhookSpec:
        # The CEL rules above, for the operator's own parse.
        if (self.format == "hmac-sha256") != (self.header is not None):
            raise ValueError("spec.header is required with format hmac-sha256 and not allowed otherwise")
        if self.tolerance_seconds is not None and self.format != "stripe":
            raise ValueError("spec.toleranceSeconds is only allowed with format stripe")
        return self

    @property
    def tolerance(self) -> int:
        return self.tolerance_seconds or DEFAULT_TOLERANCE_SECONDS


# Tags are validated item by item in the CRD (pydantic puts the bound on the list).
TAG_ITEM_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 128}
