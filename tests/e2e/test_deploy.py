"""End to end: ``kubetask deploy`` of examples/codefirst with the real CLI into a fresh
namespace (buildah build FROM the runner image, import into the cluster's containerd,
server-side apply), runs of the deployed tasks in real pods, a re-deploy that builds
nothing, a broken package that applies nothing, and a run that keeps its Task version
when the Task changes between its attempts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetask import Client
from kubetask.deploy.image import containerd_socket
from kubetask.pods import LABEL_ATTEMPT
from kubetask.spec import GROUP, VERSION
from tests.e2e.conftest import wait_for
from tests.e2e.harness import REPO, Operator, PodWatcher, Stack, hack, service_account_token
from tests.e2e.test_trigger import TRIGGER_RULES, trigger_when_allowed

pytestmark = pytest.mark.e2e


def kubetask_deploy(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, as a user runs it."""
    env = {**os.environ, "KUBECONFIG": stack.kubeconfig, "KUBETASK_RUNNER_IMAGE": stack.runner_image}
    return subprocess.run(
        [sys.executable, "-m", "kubetask.cli", "deploy", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def deployed(stack: Stack, *args: str) -> dict[str, Any]:
    done = kubetask_deploy(stack, *args, "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def get_task(stack: Stack, ns: str, name: str) -> dict[str, Any]:
    return stack.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "tasks", name)  # type: ignore[no-any-return]


@pytest.fixture
def images() -> Iterator[list[str]]:
    """Images a test built: removed from buildah's store and containerd at the end (each
    test builds fresh ones, tagged by a nonce in the package)."""
    refs: list[str] = []
    yield refs
    sock = containerd_socket()
    for ref in refs:
        subprocess.run(["buildah", "rmi", ref], capture_output=True)
        if sock:
            subprocess.run(
                ["ctr", "--address", sock, "-n", "k8s.io", "images", "rm", ref], capture_output=True
            )


def test_deploy_examples_then_runs_succeed_and_a_redeploy_builds_nothing(
    stack: Stack, ns: str, operator: Operator, tmp_path: Path, images: list[str]
) -> None:
    # A broken package first: an error that says what to fix, and nothing applied.
    broken = tmp_path / "broken"
    shutil.copytree(REPO / "examples" / "codefirst", broken / "codefirst")
    (broken / "codefirst" / "extra.py").write_text("import no_such_dependency\n")
    failed = kubetask_deploy(stack, str(broken), "-n", ns)
    assert failed.returncode == 1
    assert "cannot import module codefirst.extra" in failed.stderr and "no_such_dependency" in failed.stderr
    assert stack.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "tasks")["items"] == []

    # examples/codefirst, with a nonce file so that this test builds a fresh image.
    root = tmp_path / "examples"
    shutil.copytree(REPO / "examples" / "codefirst", root / "codefirst")
    (root / "codefirst" / "e2e-nonce.txt").write_text(uuid.uuid4().hex)
    # The cluster refuses (no such namespace): checked before building, nothing applied.
    refused = kubetask_deploy(stack, str(root), "-n", f"{ns}-missing")
    assert refused.returncode == 1
    assert "nothing was applied" in refused.stderr and "create the namespace first" in refused.stderr
    first = deployed(stack, str(root), "-n", ns)
    images.append(first["image"])
    assert first["built"] is True and first["namespace"] == ns
    assert first["imported"] is (containerd_socket() is not None)
    assert {t["name"]: t["outcome"] for t in first["tasks"]} == {
        "greet": "created",
        "word-count": "created",
        "next-fires": "created",
    }

    greet = get_task(stack, ns, "greet")
    assert greet["spec"]["image"] == first["image"]
    assert greet["spec"]["entrypoint"] == "codefirst.tasks:greet"
    # The decorator's options are the Task's spec.
    assert greet["spec"]["retry"] == {
        "maxAttempts": 4,
        "factor": 3,
        "minTimeoutMs": 500,
        "maxTimeoutMs": 5000,
        "randomize": False,
        "nonRetryableErrors": [],
    }
    assert greet["spec"]["queue"] == {"name": "greetings", "concurrencyLimit": 2}
    assert greet["spec"]["maxDurationSeconds"] == 120
    assert greet["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetask-deploy"

    # Trigger from Python (the README's way) and as Run resources; next-fires needs
    # croniter, which only the package's requirements.txt put in the image.
    counted = stack.create_run(ns, "word-count", payload={"text": "To be, or not to be."})
    fires = stack.create_run(ns, "next-fires", payload={"after": "2026-01-01T00:00:00+00:00", "n": 2})
    with (
        service_account_token(stack, ns, "app", cluster_rules=TRIGGER_RULES) as token,
        Client(operator.api, token, namespace=ns) as client,
    ):
        made = trigger_when_allowed(client, "greet", {"name": "deploy"})
        run = client.runs.wait(made.id, timeout=180)
    assert run.phase == "Succeeded", run
    assert run.output == {"message": "Hello, deploy!", "attempt": 1}
    words = stack.wait_run(ns, counted)
    assert words["status"]["phase"] == "Succeeded", words["status"]
    assert words["status"]["output"] == {"words": 6, "top": [["to", 2], ["be", 2], ["or", 1]]}
    next_fires = stack.wait_run(ns, fires)
    assert next_fires["status"]["phase"] == "Succeeded", next_fires["status"]
    assert next_fires["status"]["output"] == ["2026-01-01T00:15:00+00:00", "2026-01-01T00:30:00+00:00"]
    pods_images = {c.image for p in stack.pods(ns) for c in p.spec.containers}
    assert pods_images <= {first["image"]}

    # Unchanged code: the same image, nothing built or imported, the Tasks unchanged.
    again = deployed(stack, str(root), "-n", ns)
    assert again["image"] == first["image"]
    assert (again["built"], again["imported"]) == (False, False)
    assert {t["outcome"] for t in again["tasks"]} == {"unchanged"}
    assert get_task(stack, ns, "greet")["metadata"]["resourceVersion"] == greet["metadata"]["resourceVersion"]


VERSIONED = """
    from kubetask import Retry, task


    @task(id="versioned", retry=Retry(max_attempts=2, min_timeout_ms=6000, max_timeout_ms=6000, randomize=False))
    def versioned(payload, ctx):
        if ctx.attempt.number == 1:
            raise RuntimeError("the first attempt fails on purpose")
        return {"version": 1, "attempt": ctx.attempt.number}


    def versioned_v2(payload, ctx):
        return {"version": 2, "attempt": ctx.attempt.number}
"""


def test_a_run_keeps_the_task_version_it_started_with(
    stack: Stack, ns: str, operator: Operator, tmp_path: Path, images: list[str]
) -> None:
    package = tmp_path / "versions"
    package.mkdir()
    (package / "__init__.py").write_text(f"# {uuid.uuid4().hex}\n")
    (package / "tasks.py").write_text(textwrap.dedent(VERSIONED))
    result = deployed(stack, str(package), "-n", ns)
    images.append(result["image"])

    first = stack.create_run(ns, "versioned")
    stack.wait_run(ns, first, {"Retrying"}, timeout=120)
    # Between its attempts the Task changes: other code, another retry policy.
    stack.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        "tasks",
        "versioned",
        {"spec": {"entrypoint": "versions.tasks:versioned_v2", "retry": {"maxAttempts": 1}}},
    )
    generation = get_task(stack, ns, "versioned")["metadata"]["generation"]
    wait_for(
        lambda: (
            (get_task(stack, ns, "versioned").get("status") or {}).get("observedGeneration") == generation
        ),
        30,
        "the operator to see the changed Task",
    )
    second = stack.create_run(ns, "versioned")
    done = stack.wait_run(ns, first, timeout=120)
    # The run's second attempt ran the version it started with.
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["output"] == {"version": 1, "attempt": 2}
    # A run created after the change runs the new version.
    later = stack.wait_run(ns, second, timeout=120)
    assert later["status"]["phase"] == "Succeeded", later["status"]
    assert later["status"]["output"] == {"version": 2, "attempt": 1}


PINNED = """
    import time

    from kubetask import Retry, task


    @task(id="pinned", retry=Retry(max_attempts=2, min_timeout_ms=1000, max_timeout_ms=1000, randomize=False))
    def pinned(payload, ctx):
        if ctx.attempt.number == 1:
            time.sleep(3)
            raise RuntimeError("the first attempt fails on purpose")
        return {"attempt": ctx.attempt.number}
"""


def test_a_retried_run_runs_the_image_digest_its_first_attempt_ran(
    stack: Stack, ns: str, operator: Operator, tmp_path: Path, images: list[str]
) -> None:
    """A Task names its image by a tag, and the tag is pushed again while a run's first
    attempt runs: the second attempt runs the digest the first one ran, not what the tag
    names now. Here "pushed again" is the tag moved, in the node's containerd, to another
    image (the pause image, which has no Python: an attempt run from it would fail). The
    deployed image also gets the ``repository@digest`` reference that pulling it from a
    registry leaves, so its kubelet reports a digest any node could pull (for an image only
    imported into the node it reports a local id, which the operator does not pin)."""
    sock = containerd_socket()
    if sock is None or os.environ.get("KUBECONFIG"):
        pytest.skip("needs the local stack's containerd (moves a tag in it)")

    def ctr(*args: str) -> str:
        out = subprocess.run(
            ["ctr", "--address", sock, "-n", "k8s.io", "images", *args], capture_output=True, text=True
        )
        assert out.returncode == 0, f"ctr images {' '.join(args)}: {out.stderr}"
        return out.stdout

    package = tmp_path / "pins"
    package.mkdir()
    (package / "__init__.py").write_text(f"# {uuid.uuid4().hex}\n")
    (package / "tasks.py").write_text(textwrap.dedent(PINNED))
    built = deployed(stack, str(package), "-n", ns)["image"]
    repository = built.rsplit(":", 1)[0]
    listing = ctr("ls", f"name=={built}").splitlines()
    assert len(listing) == 2, listing
    digest = listing[1].split()[2]
    assert digest.startswith("sha256:"), listing
    by_digest, alias = f"{repository}@{digest}", f"{repository}:moving"
    images.extend([built, alias, by_digest])
    ctr("tag", "--force", built, alias)
    ctr("tag", "--force", built, by_digest)
    stack.custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, "tasks", "pinned", {"spec": {"image": alias}}
    )
    wait_for(
        lambda: (
            (get_task(stack, ns, "pinned").get("status") or {}).get("observedGeneration")
            == get_task(stack, ns, "pinned")["metadata"]["generation"]
        ),
        30,
        "the operator to see the Task's new image",
    )
    with PodWatcher(stack, ns) as watcher:
        name = stack.create_run(ns, "pinned")
        wait_for(
            lambda: any(e.phase == "Running" and e.labels.get(LABEL_ATTEMPT) == "1" for e in watcher.events),
            120,
            "the first attempt's pod to run",
        )
        ctr("tag", "--force", hack("print.sh", "pause-image"), alias)  # the tag, pushed again
        done = stack.wait_run(ns, name, timeout=180)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["output"] == {"attempt": 2}
    first = {e.image for e in watcher.events if e.labels.get(LABEL_ATTEMPT) == "1"}
    second = {e.image for e in watcher.events if e.labels.get(LABEL_ATTEMPT) == "2"}
    assert first == {alias}, first
    assert second == {by_digest}, second
    ran = {e.image_id for e in watcher.events if e.labels.get(LABEL_ATTEMPT) == "1" and e.image_id}
    assert ran == {by_digest}, ran


def test_prune_deletes_the_tasks_gone_from_the_code_but_not_while_runs_of_them_are_unfinished(
    stack: Stack, ns: str, operator: Operator, tmp_path: Path
) -> None:
    def package(*names: str) -> str:
        """The package ``shop`` with one @task per name (the same package each time)."""
        root = tmp_path / "shop"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        (root / "__init__.py").write_text("")
        body = "from kubetask import task\n"
        for name in names:
            body += f"\n\n@task(id={name!r})\ndef {name}(payload, ctx):\n    return {{'task': {name!r}}}\n"
        (root / "tasks.py").write_text(body)
        return str(root)

    def tasks() -> set[str]:
        listed = stack.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "tasks")
        return {t["metadata"]["name"] for t in listed["items"]}

    image = ["--image", stack.runner_image]  # nothing to build: no run of these tasks starts a pod
    deployed(stack, package("keep", "gone", "busy"), "-n", ns, *image)
    stack.apply_task(ns, "manual", {"source": "from kubetask import task\n\n@task\ndef manual(p, c): ...\n"})
    waiting = stack.create_run(ns, "busy", delaySeconds=3600)
    stack.wait_run(ns, waiting, {"Delayed"}, timeout=60)
    assert tasks() == {"keep", "gone", "busy", "manual"}

    # A dry run says what would go, and deletes nothing.
    dry = kubetask_deploy(stack, package("keep"), "-n", ns, *image, "--prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "task.kubetask.dev/gone would be deleted (no longer in the code)" in dry.stderr
    assert "task.kubetask.dev/busy kept: 1 runs unfinished" in dry.stderr
    assert tasks() == {"keep", "gone", "busy", "manual"}

    # The Task with an unfinished run stays (deleting it would end the run TaskNotFound);
    # the hand-written Task is not the package's and is never touched.
    first = deployed(stack, package("keep"), "-n", ns, *image, "--prune")
    assert first["pruned"] == [
        {"name": "busy", "deleted": False, "unfinishedRuns": 1},
        {"name": "gone", "deleted": True, "unfinishedRuns": 0},
    ]
    assert tasks() == {"keep", "busy", "manual"}
    assert stack.get_run(ns, waiting)["status"]["phase"] == "Delayed"

    # Once its run ended, the next deploy with --prune deletes it.
    stack.patch_run(ns, waiting, {"cancel": True})
    stack.wait_run(ns, waiting, {"Canceled"}, timeout=60)
    second = deployed(stack, package("keep"), "-n", ns, *image, "--prune")
    assert second["pruned"] == [{"name": "busy", "deleted": True, "unfinishedRuns": 0}]
    assert tasks() == {"keep", "manual"}
    # Without --prune a Task gone from the code stays.
    deployed(stack, package("keep", "extra"), "-n", ns, *image)
    assert deployed(stack, package("keep"), "-n", ns, *image)["pruned"] == []
    assert tasks() == {"keep", "extra", "manual"}
