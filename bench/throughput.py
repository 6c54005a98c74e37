"""Throughput with no queue limit: admitted runs per second, against raw pod creation
through the API server measured in the same run (the ceiling).

1. admission: M runs (default 2,000) queued on a queue with no limit in a fresh
   database; ``Admission.admit`` (default max_grants, as the controller calls it) until
   the queue is empty -> grants/s, and statements per grant.
2. raw pods: M pods, tiny spec whose nodeSelector matches no node (stored, never
   scheduled, no kubelet work), created by ``--concurrency`` concurrent requests on one
   kubernetes_asyncio client -> pods/s: the ceiling of anything that creates pods.
3. end to end: the operator (host process) with no queue limit; a Task whose pods match
   no node; R Runs (default 300) created while their Queue is paused (so Run intake is
   not measured), then the Queue is unpaused: pods/s from the unpause to the last pod
   ADDED seen by a watch, against raw pod creation of the same count just before.

    python -m bench.throughput [--admit-runs 2000] [--raw-pods 2000] [--runs 300] [--concurrency 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import signal
import time
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client as aclient
from kubernetes_asyncio import config as aconfig
from sqlalchemy.ext.asyncio import create_async_engine
from tests.e2e.harness import Stack

from bench import opstats
from bench.admission import QUEUE, StatementCounter, add_runs, retry_for
from bench.common import (
    NOWHERE,
    AllPods,
    ApiWrites,
    admin_database_url,
    bench_database,
    bench_namespace,
    log_dir,
    print_table,
    process_cpu_seconds,
    queued_in_db,
    ratio,
    stack,
    start_operator,
    task_source,
    wait_for,
    wait_task_ready,
    write_results,
)
from kubetask.admission import Admission, QueueLimits
from kubetask.store import db

#: Resources whose writes the summary shows (the JSON has all of them).
INTERESTING = {"pods", "secrets", "configmaps", "runs/status", "queues/status", "pods/status", "events"}

# ---- 1. admission only ------------------------------------------------------------------------------------


async def admission_part(url: str, m: int, keys: int) -> dict[str, Any]:
    engine = create_async_engine(url, pool_size=2)
    counter = StatementCounter(engine)
    sessions = db.session_factory(engine)
    admission = Admission(sessions)
    try:
        await admission.configure(QUEUE, QueueLimits())
        await add_runs(sessions, admission, [(f"r{i:06d}", f"k{i % keys:03d}") for i in range(m)])
        async with engine.begin() as conn:
            await conn.exec_driver_sql("ANALYZE")
        c0, a0 = counter.count, admission.statements
        granted, calls = 0, 0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        while True:
            grants = await admission.admit(QUEUE, retry_for=retry_for)
            calls += 1
            granted += len(grants)
            if not grants:
                break
        took = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        return {
            "runs": m,
            "client_cpu_seconds": round(cpu, 3),
            "granted": granted,
            "admit_calls": calls,
            "seconds": round(took, 3),
            "grants_per_s": round(granted / took, 1),
            "statements_per_grant_sent": round((counter.count - c0) / granted, 2),
            "statements_per_grant_counted": round((admission.statements - a0) / granted, 2),
        }
    finally:
        await engine.dispose()


# ---- 2. raw pods ----------------------------------------------------------------------------------------------


def raw_pod(name: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "raw"}},
        "spec": {
            "nodeSelector": NOWHERE,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Never",
            "containers": [{"name": "c", "image": image, "command": ["python", "-c", "pass"]}],
        },
    }


async def create_raw(st: Stack, ns: str, count: int, concurrency: int, prefix: str) -> dict[str, Any]:
    cfg = aclient.Configuration()
    await aconfig.load_kube_config(config_file=st.kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = concurrency
    api = aclient.ApiClient(cfg)
    core = aclient.CoreV1Api(api)
    todo = iter(range(count))
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for i in todo:
            try:
                # A dict body, as the API server takes it (the client declares its model).
                await core.create_namespaced_pod(ns, raw_pod(f"{prefix}-{i:05d}", st.runner_image))  # type: ignore[arg-type]
            except aclient.ApiException:
                errors += 1

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        took = time.perf_counter() - t0
    finally:
        await api.close()
    return {
        "pods": count,
        "concurrency": concurrency,
        "seconds": round(took, 3),
        "pods_per_s": round(count / took, 1),
        "errors": errors,
    }


def delete_all_pods(st: Stack, ns: str, timeout: float = 300) -> None:
    st.core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
    wait_for(
        lambda: not st.core.list_namespaced_pod(ns, limit=1).items, timeout, f"pods of {ns} deleted", every=1
    )


def raw_part(st: Stack, ns: str, count: int, concurrency: int, prefix: str) -> dict[str, Any]:
    writes = ApiWrites(st).start()
    out = asyncio.run(create_raw(st, ns, count, concurrency, prefix))
    writes.stop()
    out["api_writes"] = writes.delta
    delete_all_pods(st, ns)
    return out


# ---- 3. end to end ---------------------------------------------------------------------------------------------


def operator_part(
    st: Stack, ns: str, url: str, runs: int, timeout: float, count: bool, profile: Path | None
) -> dict[str, Any]:
    env: dict[str, Any] = {"KUBETASK_BENCH_PROFILE": str(profile)} if profile else {}
    count = count or profile is not None
    op = start_operator(st, url, ns, count_statements=count, **env)
    stats_path = str(getattr(op, "stats_path", ""))
    print(f"  operator log {op.log_path}", flush=True)
    try:
        st.apply_queue(ns, "q", {"paused": False})
        st.apply_task(
            ns,
            "nowhere",
            {
                "source": task_source("def f(payload, ctx):\n    return 1", "nowhere"),
                "queue": {"name": "q"},
                "podTemplate": {"nodeSelector": NOWHERE},
            },
        )
        wait_task_ready(st, ns, "nowhere")
        with AllPods(st, ns) as w:
            # One warm-up Run: the operator creates the Task's source ConfigMap once and
            # has its connections open, as in steady operation.
            st.create_run(ns, "nowhere", name="warm")
            wait_for(lambda: "warm" in w.attempt_pods(), 60, "the warm-up pod")
            st.apply_queue(ns, "q", {"paused": True})
            time.sleep(1)
            for i in range(runs):
                st.create_run(ns, "nowhere", name=f"e2e-{i:04d}")
            wait_for(lambda: queued_in_db(url) >= runs, 300, f"{runs} Runs queued", every=1)
            time.sleep(2.6)  # the queued Runs' status patches settle; opstats has written its counts
            stats0 = opstats.read(stats_path) if count else None
            writes = ApiWrites(st).start()
            assert op.proc is not None
            cpu0 = process_cpu_seconds(op.proc.pid)
            if profile:
                op.proc.send_signal(signal.SIGUSR1)
            t0 = time.time()
            st.apply_queue(ns, "q", {"paused": False})
            names = [f"e2e-{i:04d}" for i in range(runs)]
            wait_for(lambda: all(n in w.attempt_pods() for n in names), timeout, "every pod", every=0.2)
            seen = w.attempt_pods()
            times = sorted(seen[n][1] for n in names)
            op_cpu = process_cpu_seconds(op.proc.pid) - cpu0
            if profile:
                op.proc.send_signal(signal.SIGUSR2)
            time.sleep(3)  # the status patches that trail the pods
            writes.stop()
            stats = opstats.diff(opstats.read(stats_path), stats0) if stats0 is not None else None
    finally:
        op.stop()
    took = times[-1] - t0
    return {
        "runs": runs,
        "seconds": round(took, 3),
        "pods_per_s": round(runs / took, 1),
        "first_pod_after_s": round(times[0] - t0, 3),
        "pods_per_s_first_to_last": round((runs - 1) / (times[-1] - times[0]), 1),
        "operator_cpu_seconds": round(op_cpu, 2),
        "api_writes": writes.delta,
        "operator_statements": stats,
        "operator_profile": profile_summary(profile) if profile else None,
    }


def profile_summary(path: Path) -> dict[str, Any]:
    """Where the operator's CPU went during the burst: own time by package."""
    wait_for(path.exists, 30, "the operator's profile")
    stats = pstats.Stats(str(path))
    by: dict[str, float] = {}
    total = 0.0
    for (filename, _, fn), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        if "site-packages/" in filename:
            key = filename.split("site-packages/")[1].split("/")[0]
        elif f"{os.sep}kubetask{os.sep}" in filename:
            key = "kubetask"
        elif filename == "~":
            key = "idle (epoll)" if "poll" in fn else "builtins"
        else:
            key = "stdlib"
        by[key] = by.get(key, 0.0) + tottime
    return {
        "file": str(path),
        "seconds": round(total, 2),
        "by_package": {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--admit-runs", type=int, default=2000, help="queued runs admitted in part 1 (0: skip it)"
    )
    ap.add_argument("--raw-pods", type=int, default=2000, help="pods created raw in part 2")
    ap.add_argument("--runs", type=int, default=300, help="Runs through the operator in part 3")
    ap.add_argument("--concurrency", type=int, default=10, help="concurrent raw pod creations (default 10)")
    ap.add_argument("--keys", type=int, default=50)
    ap.add_argument("--skip-cluster", action="store_true", help="part 1 only")
    ap.add_argument(
        "--count-statements",
        action="store_true",
        help="run the operator through bench.opstats and report its statements per pod by code path "
        "(slows the operator down: explains the numbers, do not quote its rates)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="--count-statements, and a cProfile of the operator during the burst (bench/results/logs)",
    )
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()

    results: dict[str, Any] = {}
    admin = admin_database_url()
    if args.admit_runs > 0:
        with bench_database(admin) as url:
            print(f"1. admission: {args.admit_runs} queued runs, no limit ...", flush=True)
            results["admission"] = asyncio.run(admission_part(url, args.admit_runs, args.keys))
    if not args.skip_cluster:
        st = stack()
        with bench_namespace(st, "raw") as ns:
            print(f"2. raw: {args.raw_pods} pods, {args.concurrency} concurrent ...", flush=True)
            results["raw"] = raw_part(st, ns, args.raw_pods, args.concurrency, "raw")
        with bench_database(admin, migrate=False) as url, bench_namespace(st, "tput") as ns:
            print(f"3. raw: {args.runs} pods, then the operator: {args.runs} Runs ...", flush=True)
            results["raw_same_count"] = raw_part(st, ns, args.runs, args.concurrency, "raw")
            profile = log_dir() / f"operator-profile-{ns}.pstats" if args.profile else None
            results["operator"] = operator_part(
                st, ns, url, args.runs, args.timeout, args.count_statements, profile
            )
    a = results.get("admission")
    rows: list[list[Any]] = []
    if a:
        rows.append(["admission (grants/s)", a["granted"], a["seconds"], a["grants_per_s"], ""])
    if "raw" in results:
        r, r2, o = results["raw"], results["raw_same_count"], results["operator"]
        results["ratio_operator_to_raw"] = ratio(o["pods_per_s"], r2["pods_per_s"])
        rows.append(
            [f"raw pods, {args.concurrency} concurrent", r["pods"], r["seconds"], r["pods_per_s"], ""]
        )
        if a:
            results["ratio_admission_to_raw"] = ratio(a["grants_per_s"], r["pods_per_s"])
            rows.append(["admission / raw", "", "", results["ratio_admission_to_raw"], ""])
        rows += [
            [f"raw pods, {args.concurrency} concurrent", r2["pods"], r2["seconds"], r2["pods_per_s"], ""],
            [
                "operator: unpause -> pods",
                o["runs"],
                o["seconds"],
                o["pods_per_s"],
                o["pods_per_s_first_to_last"],
            ],
            ["operator / raw", "", "", results["ratio_operator_to_raw"], ""],
        ]
    print_table("throughput, no queue limit", ["", "count", "seconds", "per second", "first->last /s"], rows)
    if a:
        print(
            f"admission: {a['client_cpu_seconds']} s of this process's CPU in {a['seconds']} s; "
            f"{a['admit_calls']} admit() calls, {a['statements_per_grant_sent']} statements per grant "
            f"sent ({a['statements_per_grant_counted']} by Admission.statements)"
        )
    if "operator" in results:
        o, r2 = results["operator"], results["raw_same_count"]
        print(f"operator process CPU during the burst: {o['operator_cpu_seconds']} s in {o['seconds']} s")
        for label, w in (("operator burst", o["api_writes"]), ("raw burst, same count", r2["api_writes"])):
            shown = {k: v for k, v in w.items() if k.split(" ")[1] in INTERESTING}
            print(f"API writes during the {label} (cluster-wide, {', '.join(sorted(INTERESTING))}): {shown}")
        if o.get("operator_statements"):
            st_, cm = o["operator_statements"]["statements"], o["operator_statements"]["commits"]
            print(
                f"operator database work during the burst: {sum(st_.values()) / o['runs']:.1f} statements and "
                f"{sum(cm.values()) / o['runs']:.1f} commits per pod; by code path (per pod):"
            )
            for path, n in list(opstats.by_outer_inner(st_).items())[:15]:
                print(f"  {n / o['runs']:6.2f}  {path}")
        if o.get("operator_profile"):
            prof = o["operator_profile"]
            print(f"operator CPU profile of the burst ({prof['file']}), own time by package:")
            for pkg, sec in list(prof["by_package"].items())[:12]:
                print(f"  {sec:7.2f} s  {pkg}")
    write_results("throughput", args, results)


if __name__ == "__main__":
    main()
