"""What ``kubetask deploy PATH`` deploys: the package's files and its ``@task`` functions.

``PATH`` is one of

- a package (a directory with ``__init__.py``): it and its subpackages;
- a module (``tasks.py``);
- a directory of those (an import root, such as ``examples/``): its top-level modules
  and packages; directories without ``__init__.py`` (and hidden ones) are skipped.

Third-party dependencies: pip requirements files are installed in the image:
``--requirements FILE``, or by default each ``requirements.txt`` found in the directory
given (beside the module given), and in each top-level package deployed. Discovery imports the package on this machine, so they must be
installed here too (as they are where its tests run).

Each module is imported (in a child process) with the import root first on
``sys.path``, as the runner image will import it; the functions are found by the
:class:`~kubetask.sdk.task.TaskDefinition` objects the modules hold. Importing runs a
module's top-level code, never a task's body.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetask.deploy import DeployError
from kubetask.spec import TaskSpec

#: Never part of a package's image (nor of its content hash).
IGNORED_DIRS = frozenset(
    {"__pycache__", ".git", ".hg", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".venv"}
)
IGNORED_SUFFIXES = (".pyc", ".pyo")
#: Seconds the import of the package may take.
IMPORT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Package:
    """The code to deploy: ``root`` (what goes on ``sys.path``) and, relative to it, the
    top-level modules/packages (``names``) and every file they consist of (``files``)."""

    root: Path
    names: tuple[str, ...]
    files: tuple[str, ...]
    modules: tuple[str, ...]
    #: pip requirements files installed in the image (none: no third-party dependencies).
    requirements: tuple[Path, ...] = ()

    @property
    def label(self) -> str:
        """A short name for the image: the package's, or the import root's."""
        return self.names[0] if len(self.names) == 1 else self.root.name


@dataclass(frozen=True)
class FoundTask:
    """A ``@task`` function: its Task name, ``module:attribute`` and decorator spec."""

    name: str
    entrypoint: str
    spec: TaskSpec


def _walk(root: Path, top: Path) -> tuple[list[str], list[str]]:
    """Files and module names of a top-level module or package under ``root``. Every
    file of the package's tree goes into the image (data files too); modules are the
    ``.py`` files of its (sub)packages."""
    if top.is_file():
        return [top.relative_to(root).as_posix()], [top.stem]
    files: list[str] = []
    modules: list[str] = []
    packages: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in IGNORED_DIRS and not d.startswith(".") and not d.endswith(".egg-info")
        )
        if (
            (here / "__init__.py").is_file()
            and here.name.isidentifier()
            and (here == top or here.parent in packages)
        ):
            packages.add(here)
        dotted = ".".join(here.relative_to(root).parts)
        for f in sorted(filenames):
            if f.endswith(IGNORED_SUFFIXES):
                continue
            files.append((here / f).relative_to(root).as_posix())
            if here in packages and f.endswith(".py") and Path(f).stem.isidentifier():
                modules.append(dotted if f == "__init__.py" else f"{dotted}.{Path(f).stem}")
    return files, modules


REQUIREMENTS = "requirements.txt"


def find_package(path: Path, requirements: Path | None = None) -> Package:
    """The package at ``path`` (see the module's docstring), or :class:`DeployError`.
    ``requirements``: a pip requirements file; None: each ``requirements.txt`` in the
    directory given (or beside the module given) and in the top-level packages."""
    path = path.resolve()
    if not path.exists():
        raise DeployError(
            f"{path} does not exist: give a package directory, a module (.py) or a directory of them"
        )
    given: Path | None = None
    if requirements is not None:
        given = requirements.resolve()
        if not given.is_file():
            raise DeployError(f"--requirements {given}: no such file (a pip requirements file)")
    if path.is_file():
        if path.suffix != ".py" or not path.stem.isidentifier():
            raise DeployError(f"{path} is not a Python module: give a package directory or a .py file")
        root, tops = path.parent, [path]
    elif (path / "__init__.py").is_file():
        if not path.name.isidentifier():
            raise DeployError(f"{path.name!r} is not a valid package name (a Python identifier)")
        root, tops = path.parent, [path]
    else:
        root = path
        tops = sorted(
            p
            for p in path.iterdir()
            if not p.name.startswith((".", "_"))
            and (
                (p.is_file() and p.suffix == ".py" and p.stem.isidentifier() and p.name != "setup.py")
                or (p.is_dir() and p.name.isidentifier() and (p / "__init__.py").is_file())
            )
        )
        if not tops:
            raise DeployError(
                f"{path} holds no Python package (a directory with __init__.py) or module (.py): "
                "nothing to deploy"
            )
    files: list[str] = []
    modules: list[str] = []
    for top in tops:
        f, m = _walk(root, top)
        files += f
        modules += m
    return Package(
        root=root,
        names=tuple(t.stem if t.is_file() else t.name for t in tops),
        files=tuple(files),
        modules=tuple(modules),
        requirements=(given,) if given is not None else _requirements_files(path, tops),
    )


def _requirements_files(path: Path, tops: list[Path]) -> tuple[Path, ...]:
    here = path if path.is_dir() else path.parent
    candidates = [here / REQUIREMENTS, *(top / REQUIREMENTS for top in tops if top.is_dir())]
    return tuple(dict.fromkeys(c for c in candidates if c.is_file()))


def find_tasks(package: Package) -> list[FoundTask]:
    """Import the package's modules in a child process and return its ``@task`` functions,
    sorted by name. Raises :class:`DeployError` when a module fails to import, when two
    functions claim one task id, or when there is none."""
    with tempfile.TemporaryDirectory(prefix="kubetask-deploy-") as tmp:
        out = Path(tmp, "index.json")
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("PYTHONPATH", None)
        try:
            child = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "kubetask.deploy.index",
                    str(package.root),
                    str(out),
                    *package.modules,
                ],
                env=env,
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=IMPORT_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise DeployError(
                f"importing the package under {package.root} took more than {IMPORT_TIMEOUT:.0f}s: "
                "does a module do work at import time (move it into a function)?"
            ) from None
        if not out.is_file():
            raise DeployError(
                f"importing the package under {package.root} ended the process (exit {child.returncode}) "
                f"before it was indexed:\n{(child.stderr or child.stdout).strip()[-2000:]}"
            )
        index: dict[str, Any] = json.loads(out.read_text())
    if index.get("error"):
        raise DeployError(str(index["error"]))
    found: list[FoundTask] = []
    for item in index["tasks"]:
        try:
            spec = TaskSpec.model_validate(item["spec"])
        except ValidationError as e:  # the decorator validated it; only a version skew gets here
            raise DeployError(f"task {item['id']} ({item['entrypoint']}): {e}") from None
        found.append(FoundTask(name=item["id"], entrypoint=item["entrypoint"], spec=spec))
    if not found:
        looked = ", ".join(package.modules) or "(no modules)"
        raise DeployError(
            f"no @task functions found under {package.root} (imported: {looked}); decorate a function "
            "with @kubetask.task in one of these modules"
        )
    return sorted(found, key=lambda t: t.name)
