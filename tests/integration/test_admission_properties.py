"""Property-based: random interleavings of enqueue / admit / release against a real
PostgreSQL keep the documented admission rules (on top of the scenario tests)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from kubetask.admission import Admission, QueueLimits
from kubetask.pods import pod_name
from kubetask.store import db
from kubetask.store import tables as t
from tests.integration.test_admission import add_runs, finish, retry_for

pytestmark = pytest.mark.db

Op = tuple[str, int, int]  # ("enqueue", key index, priority) | ("admit", n, 0) | ("release", index, 0)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("enqueue"), st.integers(0, 3), st.integers(-1, 1)),
        st.tuples(st.just("admit"), st.integers(1, 5), st.just(0)),
        st.tuples(st.just("release"), st.integers(0, 10), st.just(0)),
    ),
    min_size=1,
    max_size=40,
)

_counter = itertools.count()


@dataclass
class Model:
    """What the rules allow, tracked beside the database."""

    limit: int
    per_key: int
    queued: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # run -> (key, priority, arrival)
    running: dict[str, str] = field(default_factory=dict)  # run -> key


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, limit=st.integers(1, 4), per_key=st.integers(1, 3))
def test_admission_rules_hold_for_any_interleaving(
    test_database_url: str, ops: list[Op], limit: int, per_key: int
) -> None:
    asyncio.run(_check(test_database_url, ops, limit, per_key))


async def _check(url: str, ops: list[Op], limit: int, per_key: int) -> None:
    engine = db.make_engine(url, pool_size=2)
    sessions = db.session_factory(engine)
    admission = Admission(sessions, pod_name=pod_name)
    queue = f"ns/prop-{next(_counter)}"
    await admission.configure(queue, QueueLimits(concurrency_limit=limit, per_key_limit=per_key))
    model = Model(limit, per_key)
    try:
        for kind, a, b in ops:
            if kind == "enqueue":
                run_id = f"{queue}-{next(_counter)}"
                await add_runs(sessions, admission, queue, [(run_id, f"k{a}", b)])
                model.queued[run_id] = (f"k{a}", b, len(model.queued) + len(model.running) + next(_counter))
            elif kind == "release" and model.running:
                run_id = sorted(model.running)[a % len(model.running)]
                await finish(sessions, admission, queue, run_id)
                del model.running[run_id]
            elif kind == "admit":
                grants = await admission.admit(queue, retry_for=retry_for, max_grants=a)
                for grant in grants:
                    key, prio, _ = model.queued[grant.run_id]
                    eligible = [
                        (k, p)
                        for r, (k, p, _) in model.queued.items()
                        if sum(1 for v in model.running.values() if v == k) < per_key
                    ]
                    # Priority first: nothing eligible outranks the granted run.
                    assert prio == max(p for _, p in eligible)
                    # First come first served within a key (same priority).
                    same = [r for r, (k, p, _) in model.queued.items() if k == key and p == prio]
                    assert grant.run_id == min(same, key=lambda r: model.queued[r][2])
                    del model.queued[grant.run_id]
                    model.running[grant.run_id] = key
                    assert len(model.running) <= limit
                    assert sum(1 for v in model.running.values() if v == key) <= per_key
                # Work-conserving: fewer grants than asked only when the queue limit is
                # reached or every queued run's key is at its per-key limit.
                if len(grants) < a:
                    full = len(model.running) >= limit
                    blocked = all(
                        sum(1 for v in model.running.values() if v == k) >= per_key
                        for k, _, _ in model.queued.values()
                    )
                    assert full or blocked
            async with sessions() as s:
                q = await s.get(t.Queue, queue)
                assert q is not None
                assert (q.running, q.queued) == (len(model.running), len(model.queued))
                slots = set((await s.execute(select(t.Slot.run_id).where(t.Slot.queue == queue))).scalars())
                assert slots == set(model.running)
    finally:
        await engine.dispose()
