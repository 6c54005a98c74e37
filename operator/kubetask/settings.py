"""The one settings object: environment variables prefixed ``KUBETASK_``."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # "null" in a variable means None (e.g. KUBETASK_TTL_SECONDS_AFTER_FINISHED=null keeps
    # finished Runs for ever).
    model_config = SettingsConfigDict(env_prefix="KUBETASK_", extra="ignore", env_parse_none_str="null")

    database_url: str = Field(
        "postgresql+psycopg://kubetask:kubetask@127.0.0.1:54329/kubetask",
        description="SQLAlchemy URL of the PostgreSQL database (psycopg 3 driver).",
    )
    api_host: str = Field("0.0.0.0", description="Address the API listens on.")
    api_port: int = Field(8080, description="Port the API listens on.")
    api_share_port: bool = Field(
        False,
        description="Bind both API ports with SO_REUSEPORT, so several operator processes of one "
        "install (one database) on one host share them, the kernel spreading connections over "
        "them. Off, a port in use fails the start with an error that names it: shared, another "
        "install's operator on the same port would silently answer for this one.",
    )
    api_url: str = Field(
        "http://kubetask-runner.kubetask-system.svc:8081",
        description="Base URL runner pods use to reach the API (the runner listener, runner_api_port).",
    )
    # ---- the HTTP API (docs/api.md) --------------------------------------------------------
    runner_api_port: int = Field(
        8081, description="Port of the runner listener (/runner/v1), apart from the public API's."
    )
    runner_db_pool_size: int = Field(
        4,
        ge=2,
        le=64,
        description="Connections of the runner listener's own database pool (log ingestion cannot "
        "take the reconciler's); log writes use all but one of them.",
    )
    max_log_bytes_per_run: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Log bytes stored per run (per operator replica); further lines are dropped. 0: no limit.",
    )
    token_review_ttl_seconds: float = Field(
        60.0, ge=0, description="How long the public API trusts a TokenReview's answer."
    )
    access_review_ttl_seconds: float = Field(
        10.0, ge=0, description="How long the public API trusts a SubjectAccessReview's answer."
    )
    auth_cache_entries: int = Field(
        10_000, ge=1, description="Most TokenReview (and SubjectAccessReview) answers kept."
    )
    public_url: str = Field(
        "http://kubetask-api.kubetask-system.svc:8080",
        description="Base URL of the public API as its callers see it: the start of token "
        "completion URLs (ctx.create_token). Set it to the Ingress address users reach.",
    )
    # ---- durable execution (docs/durable.md) ----------------------------------------------
    wait_keep_pod_seconds: float = Field(
        10.0,
        ge=0,
        description="A durable sleep this short (or the rest of one) is slept in the pod, which "
        "keeps its slot; longer waits, and every wait for an event, token or child, free the pod.",
    )
    event_retention_seconds: float = Field(
        900.0,
        ge=600,
        description="How long an event is kept: a wait registered this long after the event "
        "arrived still matches it (at least 10 minutes).",
    )
    runner_image: str = Field("localhost/kubetask/runner:0.1.0", description="Default image of a Task.")
    image_pull_policy: str = Field("IfNotPresent", description="imagePullPolicy of attempt pods.")
    # ---- attempt pods (docs/security.md) ---------------------------------------------------
    runner_service_account: str = Field(
        "kubetask-runner",
        max_length=253,
        description="ServiceAccount of attempt pods: the operator creates it where it is missing, "
        'without RBAC bindings and with automountServiceAccountToken false; "" for the '
        "namespace's default.",
    )
    runner_resources: dict[str, Any] | None = Field(
        None,
        description="Container resources (JSON: requests, limits) of attempt pods whose Task sets no "
        "podTemplate.resources; null: none (the namespace's LimitRange decides).",
    )
    runner_tmp_size_limit: str | None = Field(
        "1Gi", description="sizeLimit of the emptyDir on /tmp of attempt pods; null: no limit."
    )
    runner_read_only_root_filesystem: bool = Field(
        True, description="Attempt pods' root filesystem is read-only (only /tmp is writable)."
    )
    # ---- who can run what (docs/security.md) ----------------------------------------------
    allowed_images: list[str] = Field(
        default_factory=list,
        description="Patterns (fnmatch) a Task's spec.image must match (JSON list); empty: any. "
        "Tasks without spec.image run runner_image, always allowed.",
    )
    forbidden_tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Taints a Task may not tolerate (JSON list of {key, value?, effect?}; a missing "
        "field: any value).",
    )
    runner_network_policy: dict[str, Any] | None = Field(
        None,
        description="Spec (JSON) of the NetworkPolicy `kubetask-runner` the operator keeps in each "
        "namespace where it creates attempt pods (created, or replaced, before the first pod of each "
        "Task after each start); null: none.",
    )
    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch (JSON list); empty: the whole cluster."
    )
    task_grace_seconds: float = Field(
        30.0, description="How long a Run naming an unknown Task waits for it before it fails."
    )
    idempotency_ttl_seconds: int = Field(
        24 * 3600, description="How long an idempotencyKey keeps a second Run from executing."
    )
    # ---- the control loop (docs/concepts.md, "Guarantees") -------------------------------
    leader_election: bool = Field(
        True, description="Elect one leader (a Lease) to reconcile; off only for a single process."
    )
    lease_namespace: str = Field(
        "", description="Namespace of the Lease; default: the pod's namespace, else the first watched one."
    )
    lease_name: str = Field("kubetask-operator", description="Name of the leader-election Lease.")
    lease_duration_seconds: float = Field(
        10.0, gt=0, description="How long a candidate waits after the leader's last renewal to take over."
    )
    renew_deadline_seconds: float = Field(
        7.0, gt=0, description="A leader that could not renew for this long stops acting (< lease duration)."
    )
    lease_retry_seconds: float = Field(2.0, gt=0, description="How often the lease is renewed / tried.")
    workers: int = Field(8, ge=1, le=256, description="Runs reconciled at once.")
    db_pool_size: int = Field(
        10, ge=1, le=500, description="Database connections of the operator (plus 5 overflow); >= workers."
    )
    work_timeout_seconds: float = Field(
        60.0, gt=0, description="A reconcile taking longer is cancelled and retried with back-off."
    )
    resync_seconds: float = Field(
        30.0, gt=0, description="Period of the leader's resync (what events may have missed)."
    )
    grant_grace_seconds: float = Field(
        10.0, ge=0, description="A granted attempt without a pod this long is repaired by the resync."
    )
    schedule_grace_seconds: float = Field(
        60.0,
        ge=0,
        description="A Schedule's fire time reached at most this late (a restart, a fail-over) runs as "
        "usual; one reached later was missed, and the Schedule's catchUp decides (docs/schedules.md).",
    )
    infra_retry_limit: int = Field(
        10,
        ge=0,
        le=1000,
        description="Attempts that may end before the task ran (not counted against maxAttempts).",
    )
    unschedulable_timeout_seconds: float = Field(
        300.0, gt=0, description="An attempt whose pod cannot be scheduled this long ends (not counted)."
    )
    image_pull_timeout_seconds: float = Field(
        180.0, gt=0, description="An attempt whose image cannot be pulled this long ends (not counted)."
    )
    pod_start_timeout_seconds: float = Field(
        600.0, gt=0, description="An attempt whose container has not started this long ends (not counted)."
    )
    terminating_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="A pod still there this long past its deletion deadline (node lost) is force-deleted.",
    )
    ttl_seconds_after_finished: int | None = Field(
        7 * 24 * 3600,
        ge=0,
        description="Finished Run resources are deleted after this (Task and Run may override); "
        "null keeps them.",
    )
    record_retention_days: float = Field(
        90.0, ge=0, description="Records of runs whose resource is gone are deleted after this; 0 keeps them."
    )
    log_retention_days: float = Field(
        30.0, ge=0, description="Log lines older than this are deleted; 0 keeps them."
    )
    operator_id: str = Field(
        "", description="Name of this operator process (logs); default: host name + pid."
    )
    log_level: str = Field("INFO")


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings()
