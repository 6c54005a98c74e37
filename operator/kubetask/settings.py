"""The one settings object: environment variables prefixed ``KUBETASK_``."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUBETASK_", extra="ignore")

    database_url: str = Field(
        "postgresql+psycopg://kubetask:kubetask@127.0.0.1:54329/kubetask",
        description="SQLAlchemy URL of the PostgreSQL database (psycopg 3 driver).",
    )
    api_host: str = Field("0.0.0.0", description="Address the API listens on.")
    api_port: int = Field(8080, description="Port the API listens on.")
    api_url: str = Field(
        "http://kubetask-api.kubetask-system.svc:8080",
        description="Base URL runner pods use to reach the API.",
    )
    runner_image: str = Field("localhost/kubetask/runner:0.1.0", description="Default image of a Task.")
    image_pull_policy: str = Field("IfNotPresent", description="imagePullPolicy of attempt pods.")
    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch (JSON list); empty: the whole cluster."
    )
    task_grace_seconds: float = Field(
        30.0, description="How long a Run naming an unknown Task waits for it before it fails."
    )
    idempotency_ttl_seconds: int = Field(
        24 * 3600, description="How long an idempotencyKey keeps a second Run from executing."
    )
    operator_id: str = Field(
        "", description="Name of this operator process (logs); default: host name + pid."
    )
    log_level: str = Field("INFO")


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings()
