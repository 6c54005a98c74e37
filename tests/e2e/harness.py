"""What the end-to-end tests need from the real stack: the cluster, PostgreSQL, the
images, a namespace, an operator process, and a pod watcher. No mocks anywhere."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "kubetask.dev", "v1alpha1"
TERMINAL = {"Succeeded", "Failed", "Canceled", "TimedOut", "Deduplicated", "Expired"}


def hack(*args: str) -> str:
    out = subprocess.run(
        ["bash", str(REPO / "hack" / args[0]), *args[1:]],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def hack_verbose(*args: str) -> None:
    subprocess.run(["bash", str(REPO / "hack" / args[0]), *args[1:]], cwd=REPO, check=True)


@contextlib.contextmanager
def api_server_timing(*, freeze: bool) -> Iterator[None]:
    """A lock between the two pytest lanes of ``make test`` (hack/test.sh), which share one
    kube-apiserver: a test that freezes it (SIGSTOP) holds the lock exclusively
    (``freeze=True``), a test that measures how fast something happens through it holds it
    shared, so the one never runs during the other (the other lane's 10 s freeze once made
    a leader's take-over 19 s)."""
    state = Path(os.environ.get("KUBETASK_STATE", "/var/lib/kubetask-local"))
    path = state / "locks" / "kube-apiserver-timing"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if freeze else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def free_port() -> int:
    """A port free now, for a listener bound without SO_REUSEPORT: another process may be
    given it before that listener binds it, which then fails loudly. Operators take a
    :class:`HeldPort` instead."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


class HeldPort:
    """A TCP port that no other ``bind(port 0)`` on this host is given until :meth:`release`.

    A socket bound to it with SO_REUSEPORT that never listens (so it takes no connection);
    operators started by :class:`Operator` (``KUBETASK_API_SHARE_PORT=true``) bind beside
    it. A port from :func:`free_port` is free again the moment it is returned: the other
    lane of ``make test`` was once given the same one, both its operator and this one's
    bound it with SO_REUSEPORT, and a test read the other lane's operator (a ``404`` for a
    run it had just watched finish)."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._socket.bind(("0.0.0.0", 0))
        self.port = int(self._socket.getsockname()[1])

    def release(self) -> None:
        self._socket.close()


@dataclass
class Stack:
    kubeconfig: str
    runner_image: str
    database_url: str
    #: The address runner pods use to reach processes on this host.
    host_ip: str
    core: client.CoreV1Api = field(init=False)
    custom: client.CustomObjectsApi = field(init=False)

    def __post_init__(self) -> None:
        config.load_kube_config(self.kubeconfig)
        self.core = client.CoreV1Api()
        self.custom = client.CustomObjectsApi()

    def kubectl(self, ns: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``kubectl -n <ns> <args>`` on this cluster, as a user would type it; never raises."""
        return subprocess.run(
            ["kubectl", "--kubeconfig", self.kubeconfig, "-n", ns, *args],
            input=stdin,
            capture_output=True,
            text=True,
        )

    # ---- resources ---------------------------------------------------------------------------

    def apply_task(self, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Task", "metadata": {"name": name}, "spec": spec}
        try:
            created: dict[str, Any] = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, "tasks", body
            )
            return created
        except ApiException as e:
            if e.status != 409:
                raise
            patched: dict[str, Any] = self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, ns, "tasks", name, {"spec": spec}
            )
            return patched

    def apply_queue(self, ns: str, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Queue", "metadata": {"name": name}, "spec": spec}
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "queues", body)
        except ApiException as e:
            if e.status != 409:
                raise
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "queues", name, {"spec": spec})

    def create_run(self, ns: str, task: str, *, name: str | None = None, **spec: Any) -> str:
        meta = {"name": name} if name else {"generateName": f"{task}-"}
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Run",
            "metadata": meta,
            "spec": {"task": task, **spec},
        }
        out = self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "runs", body)
        return str(out["metadata"]["name"])

    def get_run(self, ns: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "runs", name)  # type: ignore[no-any-return]

    def patch_run(self, ns: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "runs", name, {"spec": spec})

    def wait_run(
        self, ns: str, name: str, phases: set[str] | None = None, timeout: float = 180
    ) -> dict[str, Any]:
        phases = phases or TERMINAL
        deadline = time.monotonic() + timeout
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            run = self.get_run(ns, name)
            if (run.get("status") or {}).get("phase") in phases:
                return run
            time.sleep(0.5)
        raise AssertionError(
            f"run {ns}/{name} did not reach {sorted(phases)} in {timeout}s: "
            f"{json.dumps(run.get('status'), indent=1)}"
        )

    def wait_all(self, ns: str, names: list[str], timeout: float = 300) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        done: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline and len(done) < len(names):
            items = self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "runs")["items"]
            for r in items:
                if r["metadata"]["name"] in names and (r.get("status") or {}).get("phase") in TERMINAL:
                    done[r["metadata"]["name"]] = r
            time.sleep(1)
        missing = sorted(set(names) - set(done))
        assert not missing, f"{len(missing)} runs did not finish in {timeout}s: {missing[:5]}"
        return done

    def pods(self, ns: str, selector: str = "app.kubernetes.io/managed-by=kubetask") -> list[Any]:
        return list(self.core.list_namespaced_pod(ns, label_selector=selector).items)


def install_crds(kubeconfig: str) -> None:
    """Apply crds/ (server-side) and wait until the API server serves them."""
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    subprocess.run(
        ["kubectl", "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds")],
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run(
        [
            "kubectl",
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/tasks.kubetask.dev",
            "crd/runs.kubetask.dev",
            "crd/queues.kubetask.dev",
            "crd/webhooks.kubetask.dev",
            "crd/schedules.kubetask.dev",
        ],
        check=True,
        env=env,
        capture_output=True,
    )


def ensure_crds(kubeconfig: str) -> bool:
    """Install this tree's CRDs if the cluster serves other ones (another checkout's tests
    on a shared cluster installed theirs: the API server would prune the fields it does
    not know from this tree's resources). Returns whether they were installed."""
    served = client.ApiextensionsV1Api()
    for path in sorted((REPO / "crds").glob("*.yaml")):
        want = yaml.safe_load(path.read_text())
        try:
            have = served.read_custom_resource_definition(want["metadata"]["name"]).to_dict()
        except ApiException:
            install_crds(kubeconfig)
            return True
        want_schema = want["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        have_schema = have["spec"]["versions"][0]["schema"]["open_apiv3_schema"] or {}
        if _keys(want_schema) != _keys(have_schema):
            install_crds(kubeconfig)
            return True
    return False


def _keys(schema: Any, prefix: str = "") -> set[str]:
    """The property paths of a CRD schema (as read from YAML, or from the client)."""
    out: set[str] = set()
    if isinstance(schema, dict):
        for key, value in (schema.get("properties") or {}).items():
            out.add(prefix + key)
            out |= _keys(value, prefix + key + ".")
    return out


@contextlib.contextmanager
def namespace(
    stack: Stack,
    prefix: str,
    *,
    label: str = "kubetask.dev/e2e",
    labels: dict[str, str] | None = None,
    wait_gone: bool = False,
) -> Iterator[str]:
    """A namespace ``<prefix>-<random>`` labelled ``label`` (and ``labels``), deleted at
    the end (waiting for it to go when ``wait_gone``, so what comes next starts on a quiet
    cluster)."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    stack.core.create_namespace({"metadata": {"name": name, "labels": {label: "true", **(labels or {})}}})
    # The default ServiceAccount must exist before pods can be created in the namespace.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(ApiException):
            stack.core.read_namespaced_service_account("default", name)
            break
        time.sleep(0.2)
    try:
        yield name
    finally:
        with contextlib.suppress(ApiException):
            stack.core.delete_namespace(name, propagation_policy="Background")
        deadline = time.monotonic() + 180
        while wait_gone and time.monotonic() < deadline:
            try:
                stack.core.read_namespace(name)
            except ApiException as e:
                if e.status == 404:
                    break
            time.sleep(1)


class Operator:
    """``kubetask operator`` as a separate process on this host, as a user would run it
    during development; SIGKILL-able."""

    def __init__(
        self,
        stack: Stack,
        *,
        database_url: str,
        namespaces: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        name: str = "op",
        port: int | None = None,
        runner_port: int | None = None,
        token: str | None = None,
    ) -> None:
        self.stack = stack
        # A restarted operator keeps its API addresses, as a Service would: pods created by
        # the previous process still reach it. Ports not given are held until release_ports().
        self.held = [HeldPort() for given in (port, runner_port) if not given]
        held = iter(h.port for h in self.held)
        self.port = port or next(held)
        self.runner_port = runner_port or next(held)
        #: Bearer token for the public API (:meth:`get`); see api_reader_token().
        self.token = token
        self.log_path = log_dir / f"operator-{name}-{self.port}.log"
        self.env = {
            **os.environ,
            "KUBECONFIG": stack.kubeconfig,
            "KUBETASK_DATABASE_URL": database_url,
            "KUBETASK_API_PORT": str(self.port),
            "KUBETASK_RUNNER_API_PORT": str(self.runner_port),
            # Beside the HeldPort that keeps the port from other processes, and beside the
            # test's other replicas (start_operator gives them the same ports).
            "KUBETASK_API_SHARE_PORT": "true",
            # Runner pods reach the runner listener only.
            "KUBETASK_API_URL": f"http://{stack.host_ip}:{self.runner_port}",
            # Token completion URLs (ctx.create_token) point at this process's public API.
            "KUBETASK_PUBLIC_URL": f"http://127.0.0.1:{self.port}",
            "KUBETASK_RUNNER_IMAGE": stack.runner_image,
            "KUBETASK_NAMESPACES": json.dumps(namespaces),
            "KUBETASK_TASK_GRACE_SECONDS": "5",
            "KUBETASK_OPERATOR_ID": name,
            # Each test's operators elect their leader on a Lease in the test's namespace,
            # with short periods so fail-over tests take seconds, not minutes.
            "KUBETASK_LEASE_NAMESPACE": namespaces[0],
            "KUBETASK_LEASE_DURATION_SECONDS": "4",
            "KUBETASK_RENEW_DEADLINE_SECONDS": "3",
            "KUBETASK_LEASE_RETRY_SECONDS": "0.5",
            "KUBETASK_RESYNC_SECONDS": "5",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.name = name
        self.start_marker = ""

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """How the operator process is started (benchmarks wrap it to count statements)."""
        return [sys.executable, "-m", "kubetask.cli", "operator"]

    def start(self, *, wait_ready: bool = True) -> Operator:
        """Start the process; with ``wait_ready``, wait until it leads and its first resync
        is done (``/healthz`` answers as soon as the API is up, on every replica)."""
        log = self.log_path.open("ab")
        self.start_marker = f"--- kubetask e2e: operator {self.name} started {time.time():.6f} ---\n"
        log.write(self.start_marker.encode())
        log.flush()
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited {self.proc.returncode}:\n{self.log_tail()}")
            # Replicas share the port: /healthz may be another process's answer, so this
            # one's own log must say it stands for leader (it is up) or leads. Above INFO
            # (the benchmarks' WARNING) that line is never written: /healthz has to do, and
            # the caller checks that the process itself listens (bench.common.listening).
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.api}/healthz", timeout=2) as r:
                if r.status == 200 and (
                    self.leading()
                    if wait_ready
                    else self.own_log_has("standing for leader") or not self.logs_info
                ):
                    return self
            time.sleep(0.3)
        raise AssertionError(f"operator API did not come up:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def release_ports(self) -> None:
        """Let other processes be given the ports this operator held (once it is stopped)."""
        for held in self.held:
            held.release()

    @property
    def logs_info(self) -> bool:
        """Whether this process writes INFO lines (``standing for leader``, ``leading:``)."""
        return self.env.get("KUBETASK_LOG_LEVEL", "INFO").upper() in ("DEBUG", "INFO")

    def leading(self) -> bool:
        """Whether this process leads and finished its first resync (its log says so)."""
        return self.own_log_has("leading:")

    def own_log_has(self, text: str) -> bool:
        """Whether this process (since its start marker) logged ``text``."""
        with contextlib.suppress(OSError):
            return text in self.log_path.read_text(errors="replace").split(self.start_marker)[-1]
        return False

    def log_tail(self, n: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def get(self, path: str) -> Any:
        """GET a public API path with :attr:`token` (when set)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        request = urllib.request.Request(f"{self.api}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())


#: What the e2e tests' token may do: read every kubetask resource in the cluster.
READER_RULES = [
    {
        "apiGroups": [GROUP],
        "resources": ["runs", "tasks", "queues", "schedules"],
        "verbs": ["get", "list", "watch"],
    }
]


@contextlib.contextmanager
def service_account_token(
    stack: Stack, ns: str, name: str, *, cluster_rules: list[dict[str, Any]] | None = None
) -> Iterator[str]:
    """A token of a new ServiceAccount ``ns/name`` (TokenRequest API, valid for a day), bound
    to a ClusterRole with ``cluster_rules`` cluster-wide when given; all removed at the end."""
    stack.core.create_namespaced_service_account(ns, {"metadata": {"name": name}})
    rbac = client.RbacAuthorizationV1Api()
    role = f"{ns}-{name}"
    if cluster_rules is not None:
        rbac.create_cluster_role({"metadata": {"name": role}, "rules": cluster_rules})
        rbac.create_cluster_role_binding(
            {
                "metadata": {"name": role},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
            }
        )
    try:
        yield token_for(stack, ns, name)
    finally:
        if cluster_rules is not None:
            with contextlib.suppress(ApiException):
                rbac.delete_cluster_role_binding(role)
            with contextlib.suppress(ApiException):
                rbac.delete_cluster_role(role)
        with contextlib.suppress(ApiException):
            stack.core.delete_namespaced_service_account(name, ns)


def token_for(stack: Stack, ns: str, service_account: str, seconds: int = 86_400) -> str:
    """``kubectl create token``: a bound token of the ServiceAccount, from the TokenRequest API."""
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": seconds},
    }
    out = stack.core.create_namespaced_service_account_token(service_account, ns, body)
    return str(out.status.token)


@dataclass
class PodEvent:
    at: float
    type: str
    name: str
    uid: str
    phase: str
    labels: dict[str, str]
    #: The task container's image as the pod asks for it, and as its kubelet reports it.
    image: str = ""
    image_id: str = ""


class PodWatcher:
    """Records every pod event in a namespace from the moment it starts, and tracks how
    many kubetask pods were alive at once (per queue label). Alive: created and neither
    deleted nor in a terminal phase."""

    def __init__(self, stack: Stack, ns: str) -> None:
        self.stack, self.ns = stack, ns
        self.events: list[PodEvent] = []
        self.alive: dict[str, dict[str, str]] = {}
        self.max_alive: dict[str, int] = {}
        self.uids_by_name: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> PodWatcher:
        self._thread.start()
        assert self._ready.wait(30), "pod watcher did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        rv = self.stack.core.list_namespaced_pod(self.ns).metadata.resource_version
        self._ready.set()
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(
                    self.stack.core.list_namespaced_pod, self.ns, resource_version=rv, timeout_seconds=5
                ):
                    pod = ev["object"]
                    rv = pod.metadata.resource_version
                    self._record(ev["type"], pod)
                    if self._stop.is_set():
                        break
            except ApiException as e:
                if e.status == 410:
                    rv = self.stack.core.list_namespaced_pod(self.ns).metadata.resource_version
            finally:
                w.stop()

    def _record(self, kind: str, pod: Any) -> None:
        labels = pod.metadata.labels or {}
        if labels.get("app.kubernetes.io/managed-by") != "kubetask":
            return
        name, uid, phase = pod.metadata.name, pod.metadata.uid, pod.status.phase or ""
        with self._lock:
            image = next((c.image for c in pod.spec.containers if c.name == "task"), "")
            image_id = next(
                (c.image_id or "" for c in pod.status.container_statuses or [] if c.name == "task"), ""
            )
            self.events.append(
                PodEvent(time.time(), kind, name, uid, phase, dict(labels), image=image, image_id=image_id)
            )
            self.uids_by_name.setdefault(name, set()).add(uid)
            if kind == "DELETED" or phase in ("Succeeded", "Failed"):
                self.alive.pop(uid, None)
            else:
                self.alive[uid] = labels
            queue = labels.get("kubetask.dev/queue", "")
            count = sum(1 for lab in self.alive.values() if lab.get("kubetask.dev/queue") == queue)
            self.max_alive[queue] = max(self.max_alive.get(queue, 0), count)

    def max_alive_where(self, predicate: Callable[[dict[str, str]], bool]) -> int:
        """Most pods alive at once among those whose labels match, replayed from events."""
        alive: set[str] = set()
        best = 0
        with self._lock:
            for ev in self.events:
                if ev.type == "DELETED" or ev.phase in ("Succeeded", "Failed"):
                    alive.discard(ev.uid)
                elif predicate(ev.labels):
                    alive.add(ev.uid)
                best = max(best, len(alive))
        return best

    def first_created(self) -> dict[str, float]:
        """Pod name -> when its ADDED event was seen."""
        out: dict[str, float] = {}
        with self._lock:
            for ev in self.events:
                if ev.type == "ADDED":
                    out.setdefault(ev.name, ev.at)
        return out


@contextlib.contextmanager
def cli_dashboard(env: dict[str, str], api_url: str | None) -> Iterator[str]:
    """``kubetask dashboard --no-browser`` running; yields the URL it printed."""
    args = [sys.executable, "-m", "kubetask.cli", "dashboard", "--no-browser"]
    cli = subprocess.Popen(
        [*args, "--api-url", api_url] if api_url else args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stdout is not None and cli.stderr is not None
        line = cli.stdout.readline()
        assert line.startswith("kubetask dashboard: http://127.0.0.1:"), (line, cli.stderr.read())
        yield line.split(": ", 1)[1].strip()
    finally:
        cli.terminate()
        cli.wait(10)
