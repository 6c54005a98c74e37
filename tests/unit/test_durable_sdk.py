"""The SDK's journal (kubetask.sdk.durable) with its in-memory transport: keys, positions,
replay from recorded results, the determinism check, limits and the sync variants."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from kubetask import ReplayMismatch, TaskContext
from kubetask.protocol import MAX_STEP_RESULT_BYTES
from kubetask.sdk.durable import Durable, LocalTransport


def ctx_with(transport: LocalTransport) -> TaskContext:
    base = TaskContext.local("t")
    return TaskContext(run=base.run, task=base.task, attempt=base.attempt, durable=Durable(transport))


async def test_a_replay_returns_recorded_results_without_calling_again() -> None:
    transport = LocalTransport()
    calls: list[str] = []

    def charge(amount: int) -> dict[str, Any]:
        calls.append(f"charge {amount}")
        return {"charged": amount, "ids": (1, 2)}

    async def notify() -> str:
        calls.append("notify")
        return "sent"

    first = ctx_with(transport)
    assert await first.step("charge", charge, 5) == {"charged": 5, "ids": [1, 2]}  # as JSON stores it
    assert await first.step("notify", notify) == "sent"
    assert await first.step("notify", notify) == "sent"  # the same name again: a new step
    assert calls == ["charge 5", "notify", "notify"]
    assert sorted(transport.entries) == ["step:charge", "step:notify", "step:notify#2"]

    replay = ctx_with(transport)  # a new pod of the same run
    assert await replay.step("charge", charge, 5) == {"charged": 5, "ids": [1, 2]}
    assert await replay.step("notify", notify) == "sent"
    assert await replay.step("notify", notify) == "sent"
    assert await replay.step("notify", notify) == "sent"  # the third one is new: it runs
    assert calls == ["charge 5", "notify", "notify", "notify"]


async def test_a_failed_step_is_recorded_raised_and_run_again_on_replay() -> None:
    transport = LocalTransport()
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("downstream is down")
        return "ok"

    with pytest.raises(ConnectionError):
        await ctx_with(transport).step("call", flaky)
    entry = transport.entries["step:call"]
    assert entry.status == "failed" and entry.error is not None
    assert entry.error.type == "ConnectionError" and "downstream is down" in (entry.error.stack or "")
    assert await ctx_with(transport).step("call", flaky) == "ok"
    assert transport.entries["step:call"].status == "completed"


async def test_a_different_call_at_a_recorded_position_is_a_replay_mismatch() -> None:
    transport = LocalTransport()
    await ctx_with(transport).step("a", lambda: 1)
    with pytest.raises(ReplayMismatch, match=r"step 'a'.*calls step 'b'"):
        await ctx_with(transport).step("b", lambda: 2)


async def test_results_must_be_json_and_within_the_limit() -> None:
    ctx = ctx_with(LocalTransport())
    with pytest.raises(TypeError, match="not JSON"):
        await ctx.step("obj", lambda: object())
    with pytest.raises(ValueError, match=f"limit is {MAX_STEP_RESULT_BYTES} bytes"):
        await ctx.step("big", lambda: "x" * (MAX_STEP_RESULT_BYTES + 1))


async def test_timeouts_take_seconds_or_timedeltas_and_are_bounded() -> None:
    ctx = ctx_with(LocalTransport())
    await ctx.wait_for(0.01)
    await ctx.wait_for(timedelta(milliseconds=10))
    with pytest.raises(TypeError, match="seconds"):
        await ctx.wait_for("10s")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="between 0 and"):
        await ctx.wait_for(timedelta(days=400))
    with pytest.raises(RuntimeError, match="needs a cluster"):
        await ctx.wait_for_event("approval.received", {"id": 1}, timeout=timedelta(days=7))
    with pytest.raises(TypeError, match="unknown trigger option"):
        await ctx.trigger("child", {}, queue="x")


def test_sync_tasks_use_ctx_sync() -> None:
    transport = LocalTransport()
    ctx = ctx_with(transport)
    assert ctx.sync.step("a", lambda x: x * 2, 21) == 42
    assert ctx_with(transport).sync.step("a", lambda x: x * 3, 21) == 42  # replayed

    async def misuse() -> None:
        ctx.sync.step("b", lambda: 1)

    with pytest.raises(RuntimeError, match=r"ctx\.sync is for sync"):
        asyncio.run(misuse())
