"""What the benchmarks share: the local stack, throwaway databases and namespaces,
percentiles, the result table and the JSON file.

Benchmarks create namespaces ``bench-*`` and databases ``kubetask_bench_*`` and remove
them when they end (also on Ctrl-C)."""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: Environment variable: measure this commit's ``operator/`` (``git archive``) instead
#: of the working tree's, in the operator processes and in the benchmark's own process
#: (its ``kubetask`` imports), e.g. while the working tree is being edited.
OPERATOR_REF = "KUBETASK_BENCH_OPERATOR_REF"
#: ref -> the commit whose operator/ :func:`operator_code` extracted (recorded in the JSON).
EXTRACTED: dict[str, str] = {}


@functools.cache
def operator_code(ref: str) -> Path:
    """The ``operator/`` directory of commit ``ref``, extracted once into a temporary
    directory removed when this process exits."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", f"{ref}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    EXTRACTED[ref] = commit
    tmp = tempfile.mkdtemp(prefix="kubetask-bench-operator-")
    atexit.register(shutil.rmtree, tmp, True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "operator"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    return Path(tmp) / "operator"


if str(REPO) not in sys.path:  # tests.e2e.harness, when not started from the repository root
    sys.path.insert(0, str(REPO))
if str(REPO / "operator") not in sys.path:
    sys.path.insert(1, str(REPO / "operator"))
if os.environ.get(OPERATOR_REF):
    if "kubetask" in sys.modules:
        raise ImportError(f"{OPERATOR_REF}: bench.common must be imported before kubetask")
    sys.path.insert(0, str(operator_code(os.environ[OPERATOR_REF])))

from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from sqlalchemy import DateTime, create_engine, text  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402
from tests.databases import scratch_database  # noqa: E402
from tests.e2e.harness import (  # noqa: E402
    Operator,
    PodEvent,
    PodWatcher,
    Stack,
    free_port,
    hack,
    install_crds,
    namespace,
)

from kubetask.pods import LABEL_ATTEMPT, LABEL_RUN  # noqa: E402
from kubetask.settings import Settings  # noqa: E402
from kubetask.spec import GROUP, VERSION  # noqa: E402

RESULTS = REPO / "bench" / "results"
#: What was seen to disturb the measurement (recorded in the JSON).
DISTURBANCES: list[str] = []
#: A nodeSelector no node matches: pods are created and stored but never scheduled, so
#: no kubelet work is involved.
NOWHERE = {"kubetask.dev/bench-node": "nowhere"}


# ---- numbers ------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max of durations given in seconds, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "mean": round(sum(ms) / len(ms), 3),
        "min": round(min(ms), 3),
        "max": round(max(ms), 3),
    }


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=False))
        )
    )
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))
            )
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


class CpuMeter:
    """This host's CPU use (all processes: the cluster runs here) between start() and
    stop(), from /proc/stat; 100 means every core busy."""

    def __init__(self) -> None:
        self._start: tuple[int, int] | None = None
        self.busy_percent = float("nan")

    @staticmethod
    def _read() -> tuple[int, int]:
        with contextlib.suppress(OSError):
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
            return sum(fields[:8]), idle
        return 0, 0

    def start(self) -> CpuMeter:
        self._start = self._read()
        return self

    def stop(self) -> float:
        total, idle = self._read()
        if self._start and total > self._start[0]:
            dt_total, dt_idle = total - self._start[0], idle - self._start[1]
            self.busy_percent = round(100 * (dt_total - dt_idle) / dt_total, 1)
        return self.busy_percent


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU time a process has used so far (Linux /proc)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return float("nan")


def environment() -> dict[str, Any]:
    def out(*cmd: str) -> str:
        with contextlib.suppress(Exception):
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return ""

    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": out("git", "rev-parse", "--short", "HEAD"),
        "dirty": bool(out("git", "status", "--porcelain", "--", "operator")),
        # Operator processes ran these commits' operator/ (none: the working tree's).
        "operator_refs": EXTRACTED,
        "kubernetes": out("kubectl", "version", "-o", "json"),
        "disturbances": DISTURBANCES,
    }


def write_results(name: str, args: Any, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    env = environment()
    with contextlib.suppress(Exception):
        env["kubernetes"] = json.loads(env["kubernetes"]).get("serverVersion", {}).get("gitVersion", "")
    doc = {
        "benchmark": name,
        "at": dt.datetime.now(dt.UTC).isoformat(),
        "args": vars(args),
        "env": env,
        **results,
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nresults: {path.relative_to(REPO)}")
    return path


# ---- the local stack ----------------------------------------------------------------------------------


def stack() -> Stack:
    """The running local stack (``make up`` or the e2e fixtures started it); KUBECONFIG
    and KUBETASK_BENCH_HOST_IP (default 10.88.0.1, the address pods reach the host at)
    override."""
    kubeconfig = os.environ.get("KUBECONFIG") or hack("print.sh", "kubeconfig")
    os.environ["KUBECONFIG"] = kubeconfig  # kubectl in environment()
    st = Stack(
        kubeconfig=kubeconfig,
        runner_image=os.environ.get("KUBETASK_RUNNER_IMAGE") or hack("print.sh", "runner-image"),
        database_url=os.environ.get("KUBETASK_BENCH_DATABASE_URL") or hack("print.sh", "database-url"),
        host_ip=os.environ.get("KUBETASK_BENCH_HOST_IP", "10.88.0.1"),
    )
    try:
        st.custom.list_cluster_custom_object("kubetask.dev", "v1alpha1", "runs", limit=1)
    except ApiException:
        install_crds(kubeconfig)
    warn_cluster_wide_operator(st)
    return st


def warn_cluster_wide_operator(st: Stack) -> None:
    """An operator installed in the cluster that watches every namespace acts on the
    benchmarks' Runs too (its own database, the same pod names): say so."""
    try:
        dep = client.AppsV1Api().read_namespaced_deployment("kubetask-operator", "kubetask-system")
    except ApiException:
        return
    if not (dep.status and dep.status.ready_replicas):
        return
    env = {e.name: e.value for e in (dep.spec.template.spec.containers[0].env or [])}
    if env.get("KUBETASK_NAMESPACES") in (None, "", "[]"):
        DISTURBANCES.append("kubetask-system/kubetask-operator watched every namespace")
        print(
            "WARNING: kubetask-system/kubetask-operator is running and watches every namespace: it will "
            "act on the benchmark's Runs too. Scale it to 0 for clean numbers "
            "(kubectl -n kubetask-system scale deploy/kubetask-operator --replicas=0).",
            file=sys.stderr,
            flush=True,
        )


def admin_database_url() -> str:
    return os.environ.get("KUBETASK_BENCH_DATABASE_URL") or hack("print.sh", "database-url")


def bench_database(admin_url: str, *, migrate: bool = True) -> contextlib.AbstractContextManager[str]:
    """A fresh database ``kubetask_bench_<random>`` (migrated), dropped at the end."""
    return scratch_database(admin_url, "kubetask_bench", migrate=migrate)


def bench_namespace(st: Stack, prefix: str) -> contextlib.AbstractContextManager[str]:
    """A namespace ``bench-<prefix>-<random>``, deleted at the end; waits until it is gone,
    so the next phase starts on a quiet cluster."""
    return namespace(st, f"bench-{prefix}", label="kubetask.dev/bench", wait_gone=True)


def run_phases(st: Stack, ns: str) -> dict[str, int]:
    """How many of the namespace's Runs are in each phase ("?" before the first status)."""
    out: dict[str, int] = {}
    for r in st.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "runs")["items"]:
        ph = (r.get("status") or {}).get("phase") or "?"
        out[ph] = out.get(ph, 0) + 1
    return out


def queued_in_db(url: str) -> int:
    """Runs waiting in the queues of the database at ``url``."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM queue_entries")).scalar_one())
    finally:
        engine.dispose()


def log_dir() -> Path:
    d = RESULTS / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


class CountingOperator(Operator):
    """The harness's operator process, started through bench.opstats (statements and
    transactions counted by code path, written to ``stats_path``)."""

    def __init__(self, *args: Any, stats_path: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats_path = stats_path
        self.env["KUBETASK_BENCH_OPSTATS"] = str(stats_path)
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.opstats", "operator"]


def production_timings() -> dict[str, str]:
    """The operator's own defaults (kubetask.settings) for what the e2e harness shortens so
    that tests take seconds: the lease timings and the resync period. A benchmark measures
    the operator as it runs in production unless it says otherwise."""
    fields = Settings.model_fields
    names = ("lease_duration_seconds", "renew_deadline_seconds", "lease_retry_seconds", "resync_seconds")
    return {f"KUBETASK_{n.upper()}": str(fields[n].default) for n in names if n in fields}


def has_setting(code: Path | None, name: str) -> bool:
    """Whether the operator in ``code`` (another commit's ``operator/``; None: the one this
    process imported) has the setting ``name``: older commits lack leader election and
    the runner's own port."""
    if code is None:
        return name in Settings.model_fields
    text = (code / "kubetask" / "settings.py").read_text()
    return any(line.strip().startswith(f"{name}:") for line in text.splitlines())


def lease_holder(st: Stack, ns: str) -> str:
    """holderIdentity of the operators' Lease in ``ns`` (the harness puts it in the first
    watched namespace); "" when nobody holds it or it does not exist yet."""
    field = Settings.model_fields.get("lease_name")
    if field is None:  # an operator from before leader election
        return ""
    try:
        lease = client.CoordinationV1Api(st.core.api_client).read_namespaced_lease(field.default, ns)
    except ApiException:
        return ""
    return str((lease.spec and lease.spec.holder_identity) or "")


def holds_lease(st: Stack, ns: str, op: Operator) -> bool:
    """Whether ``op`` holds the Lease (identities are ``<KUBETASK_OPERATOR_ID>_<random>``)."""
    return lease_holder(st, ns).startswith(f"{op.name}_")


def listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a socket listening on TCP ``port`` (Linux /proc). With
    replicas sharing a port (SO_REUSEPORT), ``/healthz`` may be answered by another one."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                    return True
    return False


def start_operator(
    st: Stack,
    database_url: str,
    ns: str,
    *,
    count_statements: bool = False,
    name: str = "bench",
    port: int | None = None,
    runner_port: int | None = None,
    harness_timings: bool = False,
    wait_leading: bool = True,
    code: Path | None = None,
    **env: str,
) -> Operator:
    """A kubetask operator process on this host watching ``ns`` only, with the production
    lease and resync timings (``harness_timings``: the e2e harness's short ones). With
    ``wait_leading``, returns once it holds the Lease (read from the API server, so it
    works at any log level; ``Operator.leading()`` needs the INFO line ``leading:``; an
    operator from before leader election acts at once), else once the process itself
    listens on its API port.
    ``port``, ``runner_port``: share another operator's API ports (replicas bind them with
    SO_REUSEPORT; the runner's port is in the pods it created).
    ``code``: run the ``kubetask`` package found there (another commit's ``operator/``);
    default: ``$KUBETASK_BENCH_OPERATOR_REF``'s (:func:`operator_code`), else the working tree."""
    if code is None and (ref := os.environ.get(OPERATOR_REF)):
        code = operator_code(ref)
    if not has_setting(code, "api_share_port"):
        # Code from before KUBETASK_API_SHARE_PORT may not bind beside a HeldPort: ports free now.
        port, runner_port = port or free_port(), runner_port or free_port()
    kwargs: dict[str, Any] = {
        "database_url": database_url,
        "namespaces": [ns],
        "log_dir": log_dir(),
        "name": name,
        "port": port,
        "runner_port": runner_port,
        "env": {
            "KUBETASK_LOG_LEVEL": "WARNING",
            **({} if harness_timings else production_timings()),
            **env,
        },
    }
    op: Operator
    if count_statements:
        stats = log_dir() / f"opstats-{ns}-{name}.json"
        stats.unlink(missing_ok=True)
        op = CountingOperator(st, stats_path=stats, **kwargs)
    else:
        op = Operator(st, **kwargs)
    if code is not None:
        op.env["PYTHONPATH"] = os.pathsep.join([str(code), op.env.get("PYTHONPATH", "")])
    if not has_setting(code, "runner_api_port"):
        # From before the runner listener had a port of its own: one API port for all.
        op.env["KUBETASK_API_URL"] = f"http://{st.host_ip}:{op.port}"
    op.start(wait_ready=False)
    assert op.proc is not None
    pid = op.proc.pid
    wait_for(lambda: listening(pid, op.port), 90, f"operator {name} to listen on {op.port}", every=0.05)
    if wait_leading and has_setting(code, "lease_name"):
        wait_for(lambda: holds_lease(st, ns, op), 120, f"operator {name} to hold the Lease in {ns}")
    return op


def task_source(body: str, task_id: str) -> str:
    return f"from kubetask import task\n\n@task(id={task_id!r})\n{body}\n"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_task_ready(st: Stack, ns: str, name: str, timeout: float = 60) -> None:
    def ready() -> bool:
        body = st.custom.get_namespaced_custom_object("kubetask.dev", "v1alpha1", ns, "tasks", name)
        conds = (body.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)

    wait_for(ready, timeout, f"Task {ns}/{name} Ready")


class ApiWrites:
    """Mutating requests the API server answered between start() and stop(), by
    resource, verb and code, from its ``apiserver_request_total`` metric. Cluster-wide:
    anything else writing at the same time (other tests) is counted too."""

    MUTATING = ("POST", "PUT", "PATCH", "DELETE", "APPLY")

    def __init__(self, st: Stack) -> None:
        self.st = st
        self._before: dict[str, float] = {}
        self.delta: dict[str, int] = {}

    def _read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            raw = subprocess.run(
                ["kubectl", "get", "--raw", "/metrics"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
                env={**os.environ, "KUBECONFIG": self.st.kubeconfig},
            ).stdout
        except Exception:  # metrics are a bonus; never fail a benchmark on them
            return out
        for line in raw.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels_raw, _, value = line.rpartition(" ")
            labels = dict(
                part.split("=", 1) for part in labels_raw[len("apiserver_request_total{") : -1].split(",")
            )
            labels = {k: v.strip('"') for k, v in labels.items()}
            if labels.get("verb") not in self.MUTATING:
                continue
            res = labels.get("resource", "") + (
                f"/{labels['subresource']}" if labels.get("subresource") else ""
            )
            key = f"{labels['verb']} {res} {labels.get('code', '')}"
            out[key] = out.get(key, 0.0) + float(value)
        return out

    def start(self) -> ApiWrites:
        self._before = self._read()
        return self

    def stop(self) -> dict[str, int]:
        after = self._read()
        self.delta = {
            k: int(v - self._before.get(k, 0.0))
            for k, v in sorted(after.items())
            if v - self._before.get(k, 0.0) > 0
        }
        return self.delta

    def count(self, verb: str, resource: str, code: str | None = None) -> int:
        return sum(
            v
            for k, v in self.delta.items()
            if k.split(" ")[0] == verb
            and k.split(" ")[1] == resource
            and (code is None or k.split(" ")[2] == code)
        )


class AllPods(PodWatcher):
    """The e2e PodWatcher, recording every pod of the namespace (Job pods too), each
    event stamped with ``time.time()`` when this process received it."""

    def __enter__(self) -> AllPods:
        super().__enter__()
        return self

    def _record(self, kind: str, pod: Any) -> None:
        labels = pod.metadata.labels or {}
        with self._lock:
            self.events.append(
                PodEvent(
                    time.time(),
                    kind,
                    pod.metadata.name,
                    pod.metadata.uid,
                    pod.status.phase or "",
                    dict(labels),
                )
            )

    def snapshot(self) -> list[PodEvent]:
        with self._lock:
            return list(self.events)

    def first_added(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for ev in self.snapshot():
            if ev.type == "ADDED":
                out.setdefault(ev.name, ev.at)
        return out

    def first_ended(self) -> dict[str, float]:
        """Pod uid -> when its terminal phase (Succeeded/Failed) was first seen."""
        out: dict[str, float] = {}
        for ev in self.snapshot():
            if ev.phase in ("Succeeded", "Failed"):
                out.setdefault(ev.uid, ev.at)
        return out

    def attempt_pods(self, attempt: int = 1) -> dict[str, tuple[str, float]]:
        """Run name -> (name of its pod of ``attempt``, when that pod's first ADDED was
        seen), from the pods' labels: pod names carry part of the Run's uid
        (``kubetask.pods.pod_name``), so they cannot be computed from the Run's name."""
        out: dict[str, tuple[str, float]] = {}
        for ev in self.snapshot():
            run = ev.labels.get(LABEL_RUN)
            if ev.type == "ADDED" and run and ev.labels.get(LABEL_ATTEMPT) == str(attempt):
                out.setdefault(run, (ev.name, ev.at))
        return out

    def added_uids(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for ev in self.snapshot():
            if ev.type == "ADDED":
                out.setdefault(ev.uid, ev.at)
        return out


def insert_copies(
    url: str,
    copies: list[tuple[Any, dict[str, str], str]],
    series: str,
    params: dict[str, Any],
    *,
    shift_times: str | None = None,
) -> dict[str, int]:
    """``INSERT ... SELECT`` copies of rows, one per row of ``series`` (a SQL set-returning
    expression aliased ``g``): for each (table, overrides, where), every column but identity
    ones is copied from the rows ``where`` selects (as ``src``), except the ``overrides``
    (SQL over ``src`` and ``g``); with ``shift_times``, every other time column minus that
    interval. Returns the rows inserted per table; ANALYZEs after."""
    engine = create_engine(url, poolclass=NullPool)
    out: dict[str, int] = {}
    try:
        with engine.begin() as conn:
            for table, over, where in copies:
                cols = [c for c in table.columns if c.identity is None]
                exprs = [
                    over.get(c.name)
                    or (
                        f"src.{c.name} - {shift_times}"
                        if shift_times and isinstance(c.type, DateTime)
                        else f"src.{c.name}"
                    )
                    for c in cols
                ]
                res = conn.execute(
                    text(
                        f"INSERT INTO {table.name} ({', '.join(c.name for c in cols)}) "
                        f"SELECT {', '.join(exprs)} FROM {table.name} src, {series} WHERE {where}"
                    ),
                    params,
                )
                out[table.name] = res.rowcount
            conn.execute(text("ANALYZE"))
    finally:
        engine.dispose()
    return out


def create_bare_run(st: Stack, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Create the Run ``ns/name`` (while no operator runs: it stays bare), retrying a few
    times through API server hiccups (many are created in a row)."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Run", "metadata": {"name": name}, "spec": spec}
    for _ in range(5):
        with contextlib.suppress(ApiException):
            out: dict[str, Any] = st.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "runs", body)
            return out
        time.sleep(1)
    raise RuntimeError(f"could not create Run {ns}/{name}")
