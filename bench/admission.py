"""Slot hand-off latency against queue depth, and database statements per admission.

Part 1 (default), at the admission layer against a real PostgreSQL, no pods, so the
numbers isolate admission's own cost. For each depth D (default 100 and 5,000), in a fresh
database: one queue with concurrencyLimit 10, D queued runs spread over 50 concurrency
keys, 10 slots granted. Then K times (default 500, after 50 unmeasured; the depths are
measured in alternating blocks of 25 so a change of the host's load weighs on all): finish the
oldest running run and release its slot in one transaction (what the controller does
when a pod ends: tests/integration/test_admission.finish), then ``Admission.admit`` until
the next grant comes back; that is one hand-off. After each hand-off one new run is
enqueued (not timed) so the depth stays D. Reported: hand-off p50/p99 per depth, the
ratio deepest/shallowest (target <= 1.2: a hand-off must not cost more when more runs
wait), and the statements per admission, both as ``Admission.statements`` counts them
and as PostgreSQL receives them (a ``before_cursor_execute`` listener on the engine).

Part 2 (``--cluster``): the operator on the real cluster, a Queue with
concurrencyLimit 10 and 300 near-instant Runs created while the queue is paused, then
unpaused. From the pod watch: hand-off = k-th pod ADDED - (k-10)-th pod end seen (with
the limit exact, the k-th start waits for the (k-10)-th end), p50/p99.

    python -m bench.admission [--depths 100,5000] [--handoffs 500] [--cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from sqlalchemy import event, insert, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from bench.common import (
    admin_database_url,
    bench_database,
    print_table,
    ratio,
    summary_ms,
    write_results,
)
from kubetask.admission import Admission, QueueLimits
from kubetask.spec import RetrySpec
from kubetask.store import db
from kubetask.store import tables as t

QUEUE = "bench/q"
LIMIT = 10


def retry_for(_: t.Run) -> RetrySpec:
    return RetrySpec()


class StatementCounter:
    """Counts what the engine sends to PostgreSQL (every cursor execute; BEGIN and
    COMMIT are sent by psycopg itself and are not included)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.count = 0
        self.recording: list[tuple[str, Any]] | None = None
        event.listen(engine.sync_engine, "before_cursor_execute", self._on)

    def _on(
        self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
    ) -> None:
        self.count += 1
        if self.recording is not None:
            self.recording.append((statement, params))

    @contextmanager
    def record(self) -> Iterator[list[tuple[str, Any]]]:
        self.recording = []
        try:
            yield self.recording
        finally:
            self.recording = None


def short(sql: str, width: int = 150) -> str:
    return " ".join(sql.split())[:width]


async def explain(engine: AsyncEngine, statements: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """How PostgreSQL plans each statement of one admission, at the depth it ran at:
    the access path of every table (plain EXPLAIN: nothing is executed)."""
    out = []
    async with engine.connect() as conn:
        for sql, params in statements:
            if not sql.lstrip().upper().startswith(("SELECT", "DELETE", "UPDATE")):
                continue
            rows = (await conn.exec_driver_sql(f"EXPLAIN {sql}", params)).scalars().all()
            nodes = [r.strip().lstrip("-> ").split("  (")[0] for r in rows if "Scan" in r or "Sort" in r]
            out.append({"statement": short(sql, 90), "access": nodes, "plan": list(rows)})
        await conn.rollback()
    return out


def run_row(run_id: str, key: str) -> dict[str, Any]:
    # The columns tests/integration/test_admission.add_runs sets.
    return {
        "id": run_id,
        "namespace": "bench",
        "name": run_id,
        "uid": run_id,
        "task": "task",
        "queue": QUEUE,
        "concurrency_key": key or None,
        "priority": 0,
        "tags": [],
        "payload": {},
        "phase": "Queued",
        "attempt": 0,
        "max_attempts": 3,
        "reason": "",
        "message": "",
    }


async def add_runs(
    sessions: async_sessionmaker[AsyncSession], admission: Admission, specs: list[tuple[str, str]]
) -> None:
    """test_admission.add_runs, with the runs inserted in one multi-row statement per
    1,000 (the enqueue itself is the same: Admission.enqueue per run, queue row locked)."""
    async with sessions.begin() as s:
        for i in range(0, len(specs), 1000):
            await s.execute(insert(t.Run), [run_row(r, k) for r, k in specs[i : i + 1000]])
        async with admission.locked_queue(s, QUEUE) as q:
            for run_id, key in specs:
                await admission.enqueue(s, q, run_id=run_id, key=key, priority=0)


async def finish(sessions: async_sessionmaker[AsyncSession], admission: Admission, run_id: str) -> None:
    """test_admission.finish: the run ends and its slot is released, one transaction."""
    async with sessions.begin() as s, admission.locked_queue(s, QUEUE) as q:
        await s.execute(update(t.Run).where(t.Run.id == run_id).values(phase="Succeeded"))
        await admission.release(s, q, run_id=run_id)


class Depth:
    """One queue at one depth, in its own database, measured a block at a time so that
    the depths can be interleaved (a change of the host's load then weighs on all)."""

    def __init__(self, url: str, depth: int, keys: int) -> None:
        self.depth, self.keys = depth, keys
        self.engine = create_async_engine(url, pool_size=2)
        self.counter = StatementCounter(self.engine)
        self.sessions = db.session_factory(self.engine)
        self.admission = Admission(self.sessions)
        self.key_names = [f"k{i:03d}" for i in range(keys)]
        self.running: deque[str] = deque()
        self.next_id = 0
        self.done = 0
        self.handoff: list[float] = []
        self.release: list[float] = []
        self.admit: list[float] = []
        self.stmts_release: list[int] = []
        self.stmts_admit: list[int] = []
        self.counted_admit: list[int] = []
        self.sample: list[tuple[str, Any]] = []
        self.fill_seconds = 0.0

    async def setup(self) -> None:
        await self.admission.configure(QUEUE, QueueLimits(concurrency_limit=LIMIT))
        t0 = time.perf_counter()
        n = self.depth + LIMIT
        await add_runs(
            self.sessions, self.admission, [(f"r{i:06d}", self.key_names[i % self.keys]) for i in range(n)]
        )
        self.fill_seconds = time.perf_counter() - t0
        self.next_id = n
        async with self.engine.begin() as conn:  # fresh statistics, as autovacuum would soon have them
            await conn.exec_driver_sql("ANALYZE")
        self.running.extend(g.run_id for g in await self.admission.admit(QUEUE, retry_for=retry_for))
        assert len(self.running) == LIMIT, f"granted {len(self.running)}, expected {LIMIT}"

    async def handoffs(self, n: int, *, measure: bool, record: bool = False) -> None:
        for i in range(n):
            victim = self.running.popleft()
            c0, a0 = self.counter.count, self.admission.statements
            t0 = time.perf_counter()
            await finish(self.sessions, self.admission, victim)
            t1 = time.perf_counter()
            c1 = self.counter.count
            if record and i == n - 1:
                with self.counter.record() as rec:
                    grants = await self.admission.admit(QUEUE, retry_for=retry_for)
                self.sample = rec
            else:
                grants = await self.admission.admit(QUEUE, retry_for=retry_for)
            t2 = time.perf_counter()
            c2, a1 = self.counter.count, self.admission.statements
            if len(grants) != 1:
                raise RuntimeError(f"depth {self.depth}: {len(grants)} grants instead of 1")
            self.running.extend(g.run_id for g in grants)
            if measure:
                self.handoff.append(t2 - t0)
                self.release.append(t1 - t0)
                self.admit.append(t2 - t1)
                self.stmts_release.append(c1 - c0)
                self.stmts_admit.append(c2 - c1)
                self.counted_admit.append(a1 - a0)
            # Keep the depth: one more run waits (not timed).
            key = self.key_names[self.next_id % self.keys]
            await add_runs(self.sessions, self.admission, [(f"r{self.next_id:06d}", key)])
            self.next_id += 1

    async def result(self) -> dict[str, Any]:
        running_now, queued_now = await self.admission.counts(QUEUE)
        return {
            "depth": self.depth,
            "keys": self.keys,
            "fill_seconds": round(self.fill_seconds, 2),
            "handoff_ms": summary_ms(self.handoff),
            "release_ms": summary_ms(self.release),
            "admit_ms": summary_ms(self.admit),
            "statements_per_handoff": {
                "release_sent": sum(self.stmts_release) / len(self.stmts_release),
                "admit_sent": sum(self.stmts_admit) / len(self.stmts_admit),
                "admit_counted_by_Admission": sum(self.counted_admit) / len(self.counted_admit),
            },
            "admit_statements": [short(sql) for sql, _ in self.sample],
            "end_state": {"running": running_now, "queued": queued_now},
            "plans": await explain(self.engine, self.sample),
        }

    async def close(self) -> None:
        await self.engine.dispose()


async def measure_depths(
    urls: list[str], args: argparse.Namespace, depths: list[int]
) -> list[dict[str, Any]]:
    queues = [Depth(url, d, args.keys) for url, d in zip(urls, depths, strict=True)]
    try:
        for q in queues:
            print(f"depth {q.depth}: filling ...", flush=True)
            await q.setup()
            await q.handoffs(args.warmup, measure=False)
        print(
            f"measuring {args.handoffs} hand-offs per depth, interleaved in blocks of {args.block} ...",
            flush=True,
        )
        done = 0
        while done < args.handoffs:
            n = min(args.block, args.handoffs - done)
            for q in queues:
                await q.handoffs(n, measure=True, record=done + n >= args.handoffs)
            done += n
        return [await q.result() for q in queues]
    finally:
        for q in queues:
            await q.close()


# ---- part 2: the operator on the cluster ------------------------------------------------------------


def cluster_part(args: argparse.Namespace) -> dict[str, Any]:
    from tests.e2e.harness import TERMINAL

    from bench.common import (
        AllPods,
        bench_namespace,
        queued_in_db,
        run_phases,
        stack,
        start_operator,
        task_source,
        wait_for,
        wait_task_ready,
    )

    st = stack()
    n, limit = args.cluster_runs, LIMIT
    with bench_database(admin_database_url(), migrate=False) as url, bench_namespace(st, "handoff") as ns:
        op = start_operator(st, url, ns)
        print(f"cluster: namespace {ns}, operator log {op.log_path}", flush=True)
        try:
            st.apply_queue(ns, "q", {"concurrencyLimit": limit, "paused": True})
            st.apply_task(
                ns,
                "instant",
                {
                    "source": task_source("def f(payload, ctx):\n    return 1", "instant"),
                    "retry": {"maxAttempts": 1},
                    "queue": {"name": "q"},
                },
            )
            wait_task_ready(st, ns, "instant")
            for i in range(n):
                st.create_run(ns, "instant", name=f"h-{i:04d}")
            wait_for(lambda: queued_in_db(url) >= n, 300, f"{n} Runs queued", every=1)
            with AllPods(st, ns) as w:
                t_unpause = time.time()
                st.apply_queue(ns, "q", {"concurrencyLimit": limit, "paused": False})

                wait_for(
                    lambda: set(run_phases(st, ns)) <= TERMINAL, args.timeout, "every Run to finish", every=2
                )
                t_done = time.time()
                final = run_phases(st, ns)
            starts = sorted(w.added_uids().values())
            ends = sorted(w.first_ended().values())
            max_alive = w.max_alive_where(lambda labels: True)
        finally:
            op.stop()
    handoff = [starts[k] - ends[k - limit] for k in range(limit, min(len(starts), len(ends) + limit))]
    negative = sum(1 for h in handoff if h < 0)
    return {
        "runs": n,
        "limit": limit,
        "run_phases": final,
        "pods_seen": len(starts),
        "max_alive": max_alive,
        "drain_seconds": round(t_done - t_unpause, 1),
        "handoff_ms": summary_ms([h for h in handoff if h >= 0]),
        "negative_pairs": negative,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="100,5000", help="queue depths, comma separated (default 100,5000)")
    ap.add_argument("--keys", type=int, default=50, help="concurrency keys the runs are spread over")
    ap.add_argument("--handoffs", type=int, default=500, help="measured hand-offs per depth (default 500)")
    ap.add_argument("--warmup", type=int, default=50, help="unmeasured hand-offs first")
    ap.add_argument("--block", type=int, default=25, help="hand-offs per depth before switching depth")
    ap.add_argument("--cluster", action="store_true", help="also part 2: the operator on the cluster")
    ap.add_argument("--cluster-runs", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]

    results: dict[str, Any] = {}
    admin = admin_database_url()
    with ExitStack() as stack:
        urls = [stack.enter_context(bench_database(admin)) for _ in depths]
        results["depths"] = asyncio.run(measure_depths(urls, args, depths))
    first, last = results["depths"][0], results["depths"][-1]
    results["ratio_p50"] = ratio(last["handoff_ms"]["p50"], first["handoff_ms"]["p50"])
    results["ratio_p99"] = ratio(last["handoff_ms"]["p99"], first["handoff_ms"]["p99"])
    print_table(
        f"slot hand-off (release + admit), limit {LIMIT}, {args.keys} keys, {args.handoffs} hand-offs (ms)",
        ["depth", "p50", "p90", "p99", "release p50", "admit p50", "stmts/admission", "Admission.statements"],
        [
            [
                d["depth"],
                d["handoff_ms"]["p50"],
                d["handoff_ms"]["p90"],
                d["handoff_ms"]["p99"],
                d["release_ms"]["p50"],
                d["admit_ms"]["p50"],
                round(d["statements_per_handoff"]["admit_sent"], 2),
                round(d["statements_per_handoff"]["admit_counted_by_Admission"], 2),
            ]
            for d in results["depths"]
        ]
        + [
            [
                f"ratio {last['depth']}/{first['depth']}",
                results["ratio_p50"],
                "",
                results["ratio_p99"],
                "",
                "",
                "",
                "",
            ]
        ],
    )
    print(
        f"release transaction: {first['statements_per_handoff']['release_sent']:.0f} statements; "
        "statements exclude BEGIN/COMMIT (two more round trips per transaction)"
    )
    print(f"one admission's statements at depth {last['depth']}, and how PostgreSQL reaches the rows:")
    plans = {p["statement"][:60]: p["access"] for p in last["plans"]}
    for sql in last["admit_statements"]:
        access = plans.get(sql[:60])
        print(f"  {sql[:100]}" + (f"\n      {'; '.join(access)}" if access else ""))
    if args.cluster:
        results["cluster"] = c = cluster_part(args)
        print_table(
            f"cluster: {c['runs']} near-instant Runs, queue limit {c['limit']} (ms)",
            ["", "n", "p50", "p90", "p99", "max", "max alive", "drain s"],
            [
                [
                    "pod end seen -> next pod ADDED",
                    c["handoff_ms"].get("n", 0),
                    c["handoff_ms"].get("p50"),
                    c["handoff_ms"].get("p90"),
                    c["handoff_ms"].get("p99"),
                    c["handoff_ms"].get("max"),
                    c["max_alive"],
                    c["drain_seconds"],
                ]
            ],
        )
        print(f"Run phases: {c['run_phases']}")
    write_results("admission", args, results)


if __name__ == "__main__":
    main()
