"""Two tasks whose decorator options become their Task's spec on `kubetask deploy`."""

from __future__ import annotations

from collections import Counter

from kubetask import Queue, Retry, TaskContext, logger, task

from codefirst.text import words


@task(
    id="greet",
    retry=Retry(max_attempts=4, factor=3, min_timeout_ms=500, max_timeout_ms=5000, randomize=False),
    queue=Queue(name="greetings", concurrency_limit=2),
    max_duration_seconds=120,
)
async def greet(payload: dict, ctx: TaskContext) -> dict:
    name = payload.get("name", "world")
    logger.info("greeting %s on attempt %d", name, ctx.attempt.number)
    return {"message": f"Hello, {name}!", "attempt": ctx.attempt.number}


@task(id="word-count", retry=Retry(max_attempts=2))
def word_count(payload: dict, ctx: TaskContext) -> dict:
    counts = Counter(words(payload.get("text", "")))
    return {"words": sum(counts.values()), "top": counts.most_common(3)}
