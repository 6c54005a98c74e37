"""``kubetask deploy`` without a cluster: finding the tasks of a package, the Task specs
``--dry-run`` prints (the decorator's options), the content tag, and the errors that say
what to fix. The build and the apply are tests/e2e/test_deploy.py's."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kubetask.cli import app
from kubetask.deploy import DeployError
from kubetask.deploy.discover import find_package, find_tasks
from kubetask.deploy.image import containerfile, image_ref
from kubetask.spec import TaskSpec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
RUNNER = "localhost/kubetask/runner:not-built-here"


def deploy(*args: str) -> Any:
    result = CliRunner().invoke(app, ["deploy", *args], env={"KUBECONFIG": "/nonexistent", "COLUMNS": "250"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def error_of(result: Any) -> str:
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: "), result.stderr
    return str(result.stderr)


def test_dry_run_prints_a_task_per_function_with_the_decorators_spec() -> None:
    result = deploy(str(EXAMPLES), "--dry-run", "--image", "registry.example/shop:v1", "-n", "shop")
    assert result.exit_code == 0, result.stderr
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout)}
    assert sorted(docs) == ["greet", "next-fires", "word-count"]
    greet = docs["greet"]
    assert greet["apiVersion"] == "kubetask.dev/v1alpha1" and greet["kind"] == "Task"
    assert greet["metadata"]["namespace"] == "shop"
    assert greet["spec"] == {
        "image": "registry.example/shop:v1",
        "entrypoint": "codefirst.tasks:greet",
        "retry": {
            "maxAttempts": 4,
            "factor": 3.0,
            "minTimeoutMs": 500,
            "maxTimeoutMs": 5000,
            "randomize": False,
            "nonRetryableErrors": [],
        },
        "queue": {"name": "greetings", "concurrencyLimit": 2},
        "maxDurationSeconds": 120,
    }
    assert docs["word-count"]["spec"]["entrypoint"] == "codefirst.tasks:word_count"
    assert docs["word-count"]["spec"]["retry"]["maxAttempts"] == 2
    for doc in docs.values():  # what the operator parses
        TaskSpec.model_validate(doc["spec"])


def test_dry_run_json_and_the_content_tag(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "codefirst", tmp_path / "codefirst")
    first = deploy(str(tmp_path), "--dry-run", "--json", "--runner-image", RUNNER, "-n", "x")
    assert first.exit_code == 0, first.stderr
    images = {d["spec"]["image"] for d in yaml.safe_load(first.stdout)}
    assert len(images) == 1
    image = images.pop()
    assert image.startswith("localhost/kubetask-tasks/codefirst:")
    # Unchanged code (a package dir or its parent, bytecode or not): the same tag.
    (tmp_path / "codefirst" / "__pycache__").mkdir()
    (tmp_path / "codefirst" / "__pycache__" / "tasks.cpython-311.pyc").write_bytes(b"junk")
    package = find_package(tmp_path / "codefirst")
    assert image_ref(package, runner_image=RUNNER, builder=None) == image
    # A changed file or another runner image: another tag.
    (tmp_path / "codefirst" / "text.py").write_text(
        "# changed\n" + (EXAMPLES / "codefirst/text.py").read_text()
    )
    assert image_ref(find_package(tmp_path / "codefirst"), runner_image=RUNNER, builder=None) != image
    assert image_ref(package, runner_image=RUNNER + "-2", builder=None) != image


def test_requirements_files_are_installed_in_the_image_and_change_its_tag(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "codefirst", tmp_path / "codefirst")
    # The package's own requirements.txt, found whether the package or its parent is given.
    for given in (tmp_path / "codefirst", tmp_path):
        package = find_package(given)
        assert package.requirements == ((tmp_path / "codefirst" / "requirements.txt").resolve(),)
    recipe = containerfile(RUNNER, package)
    lines = recipe.splitlines()
    install = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install"))
    # As root, into the runner's virtualenv, before the package's files; then the runner's user.
    assert lines[install - 2 : install + 2] == [
        "USER 0:0",
        "COPY .kubetask-requirements/ /tmp/kubetask-requirements/",
        "RUN pip install --no-cache-dir -r /tmp/kubetask-requirements/0.txt && rm -rf /tmp/kubetask-requirements",
        "USER 65532:65532",
    ]
    assert install < lines.index("COPY . /opt/kubetask-app/")
    image = image_ref(package, runner_image=RUNNER, builder=None)
    (tmp_path / "codefirst" / "requirements.txt").write_text("croniter==6.0.0\n")
    assert image_ref(find_package(tmp_path), runner_image=RUNNER, builder=None) != image
    # An import root's requirements.txt joins its packages'; --requirements replaces both.
    (tmp_path / "requirements.txt").write_text("humanize\n")
    assert len(find_package(tmp_path).requirements) == 2
    mine = tmp_path / "mine.txt"
    mine.write_text("humanize\n")
    assert find_package(tmp_path, mine).requirements == (mine.resolve(),)
    # No requirements: no install step.
    (tmp_path / "codefirst" / "requirements.txt").unlink()
    (tmp_path / "requirements.txt").unlink()
    assert "pip install" not in containerfile(RUNNER, find_package(tmp_path))


def test_a_missing_requirements_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "codefirst", tmp_path / "codefirst")
    message = error_of(deploy(str(tmp_path), "--dry-run", "--requirements", str(tmp_path / "nope.txt")))
    assert "nope.txt: no such file" in message


def test_the_package_files_and_modules(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/jobs.py": "from kubetask import task\n@task\ndef nightly_job(payload, ctx): ...\n",
            "pkg/data/words.txt": "a b c\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/more.py": "from kubetask import task\n@task(id='more')\ndef more(payload, ctx): ...\n",
            "single.py": "from kubetask import task\n@task(id='single')\ndef single(payload, ctx): ...\n",
            "notes/README.md": "not a package\n",
        },
    )
    root = find_package(tmp_path)
    assert root.names == ("pkg", "single")
    assert "pkg/data/words.txt" in root.files and "notes/README.md" not in root.files
    assert set(root.modules) == {"pkg", "pkg.jobs", "pkg.sub", "pkg.sub.more", "single"}
    found = {t.name: t.entrypoint for t in find_tasks(root)}
    assert found == {
        "nightly-job": "pkg.jobs:nightly_job",
        "more": "pkg.sub.more:more",
        "single": "single:single",
    }
    # A module file alone.
    assert [t.entrypoint for t in find_tasks(find_package(tmp_path / "single.py"))] == ["single:single"]


def test_the_pod_template_and_the_run_ttl_come_from_the_decorator(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "heavy/__init__.py": "",
            "heavy/tasks.py": """
                from kubetask import Pod, task

                @task(
                    id="heavy",
                    pod=Pod(
                        resources={"requests": {"cpu": "2"}, "limits": {"memory": "4Gi"}},
                        env=[{"name": "MODE", "value": "batch"}],
                        node_selector={"pool": "batch"},
                        tolerations=[{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
                    ),
                    ttl_seconds_after_finished=600,
                )
                def heavy(payload, ctx):
                    return {"ok": True}
                """,
        },
    )
    result = deploy(str(tmp_path / "heavy"), "--dry-run", "--image", "x.example/h:1")
    assert result.exit_code == 0, result.stderr
    (doc,) = yaml.safe_load_all(result.stdout)
    assert doc["spec"]["podTemplate"] == {
        "resources": {"requests": {"cpu": "2"}, "limits": {"memory": "4Gi"}},
        "env": [{"name": "MODE", "value": "batch"}],
        "nodeSelector": {"pool": "batch"},
        "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
    }
    assert doc["spec"]["ttlSecondsAfterFinished"] == 600
    TaskSpec.model_validate(doc["spec"])


def test_finding_tasks_runs_no_task_body(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    write(
        tmp_path,
        {
            "bodies/__init__.py": "from bodies.tasks import boom as boom  # a re-export\n",
            "bodies/tasks.py": f"""
                from pathlib import Path
                from kubetask import task

                @task(id="boom")
                def boom(payload, ctx):
                    Path({str(marker)!r}).write_text("the body ran")
                    raise SystemExit("the body ran")
                """,
        },
    )
    result = deploy(str(tmp_path / "bodies"), "--dry-run", "--image", "x.example/b:1")
    assert result.exit_code == 0, result.stderr
    assert [d["spec"]["entrypoint"] for d in yaml.safe_load_all(result.stdout)] == ["bodies.tasks:boom"]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"empty/__init__.py": "", "empty/util.py": "X = 1\n"}, "no @task functions found"),
        (
            {"broken/__init__.py": "", "broken/tasks.py": "import no_such_module_here\n"},
            "cannot import module broken.tasks",
        ),
        (
            {
                "opts/__init__.py": "",
                "opts/tasks.py": "from kubetask import task\n\n@task(id='x', max_duration_seconds=3)\n"
                "def x(payload, ctx): ...\n",
            },
            "max_duration_seconds: Input should be greater than or equal to 5",
        ),
        (
            {
                "twice/__init__.py": "",
                "twice/a.py": "from kubetask import task\n@task(id='same')\ndef one(payload, ctx): ...\n",
                "twice/b.py": "from kubetask import task\n@task(id='same')\ndef two(payload, ctx): ...\n",
            },
            "two @task functions have the id 'same' (twice.a:one and twice.b:two)",
        ),
        (
            {"exits/__init__.py": "import sys\nsys.exit(3)\n"},
            "cannot import module exits of the package",
        ),
        (
            {
                "pods/__init__.py": "",
                "pods/tasks.py": "from kubetask import task\n\n@task(id='x', pod={'env': []})\n"
                "def x(payload, ctx): ...\n",
            },
            "pod must be a kubetask.Pod, not dict",
        ),
        (
            {
                "ttl/__init__.py": "",
                "ttl/tasks.py": "from kubetask import task\n\n@task(id='x', ttl_seconds_after_finished=-1)\n"
                "def x(payload, ctx): ...\n",
            },
            "ttl_seconds_after_finished: Input should be greater than or equal to 0",
        ),
    ],
)
def test_bad_packages_fail_with_what_to_fix(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    write(tmp_path, files)
    package = next(iter(files)).split("/")[0]
    result = deploy(str(tmp_path / package), "--dry-run", "--image", "x.example/b:1")
    message = error_of(result)
    assert expected in message, message
    assert result.stdout == ""  # nothing printed, nothing applied


def test_an_import_error_points_at_the_users_line(tmp_path: Path) -> None:
    write(tmp_path, {"lines/__init__.py": "", "lines/tasks.py": "X = 1\nY = 1 / 0\n"})
    with pytest.raises(DeployError, match=r"ZeroDivisionError: division by zero \(at .*lines/tasks.py:2\)"):
        find_tasks(find_package(tmp_path / "lines"))


def test_paths_that_are_no_package(tmp_path: Path) -> None:
    write(tmp_path, {"docs/README.md": "hi\n", "data.txt": "x\n"})
    assert "holds no Python package" in error_of(deploy(str(tmp_path), "--dry-run", "--image", "x:1"))
    assert "does not exist" in error_of(deploy(str(tmp_path / "nope"), "--dry-run", "--image", "x:1"))
    assert "is not a Python module" in error_of(
        deploy(str(tmp_path / "data.txt"), "--dry-run", "--image", "x:1")
    )


def test_an_image_the_task_spec_rejects_is_reported_per_task(tmp_path: Path) -> None:
    message = error_of(deploy(str(EXAMPLES), "--dry-run", "--image", "x" * 600))
    assert "task greet (codefirst.tasks:greet): the Task spec is invalid: image:" in message


def test_prune_in_a_dry_run_needs_the_cluster() -> None:
    result = deploy(str(EXAMPLES), "--dry-run", "--prune", "--image", "x.example/b:1")
    assert "--prune needs the cluster (a kubeconfig)" in error_of(result)
    assert result.stdout == ""
