"""Two tasks whose decorator options become their Task's spec on `kubetask deploy`."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from croniter import croniter
from kubetask import Queue, Retry, TaskContext, logger, task

from codefirst.text import words


@task(
    id="greet",
    retry=Retry(max_attempts=4, factor=3, min_timeout_ms=500, max_timeout_ms=5000, randomize=False),
    queue=Queue(name="greetings", concurrency_limit=2),
    max_duration_seconds=120,
)
async def greet(payload: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    name = payload.get("name", "world")
    logger.info("greeting %s on attempt %d", name, ctx.attempt.number)
    return {"message": f"Hello, {name}!", "attempt": ctx.attempt.number}


@task(id="word-count", retry=Retry(max_attempts=2))
def word_count(payload: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    counts = Counter(words(payload.get("text", "")))
    return {"words": sum(counts.values()), "top": counts.most_common(3)}


@task(id="next-fires", retry=Retry(max_attempts=1))
def next_fires(payload: dict[str, Any], ctx: TaskContext) -> list[str]:
    """The next ``n`` times a cron expression fires after ``after`` (ISO 8601). croniter is
    a third-party dependency (requirements.txt), installed in the image by deploy."""
    after = datetime.fromisoformat(payload.get("after", "2026-01-01T00:00:00+00:00"))
    fires = croniter(payload.get("cron", "*/15 * * * *"), after)
    return [fires.get_next(datetime).isoformat() for _ in range(int(payload.get("n", 3)))]
