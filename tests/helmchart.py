"""The Helm chart helm/kubetask as the tests use it: the pinned helm binary, and the chart
rendered with some values (no cluster needed)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "kubetask"


@functools.cache
def helm_binary() -> str:
    """The helm of the pinned version, as `make helm-check` finds it (hack/lib.sh); "" when
    it is not built (`make binaries`)."""
    out = subprocess.run(
        ["bash", "-c", "source hack/lib.sh && command -v helm || true"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


@contextlib.contextmanager
def values_file(values: dict[str, Any]) -> Iterator[str]:
    """The values in a file, not --set: a database URL's characters mean things to --set
    (JSON is YAML)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(values, f)
    try:
        yield f.name
    finally:
        os.unlink(f.name)


def render(
    values: dict[str, Any], *, release: str = "kubetask", namespace: str = "kubetask-system"
) -> list[dict[str, Any]]:
    """`helm template` of the chart with ``values``: its objects, CRDs left out. Raises
    :class:`RenderError` (with helm's message) when the chart refuses the values."""
    with values_file(values) as path:
        out = subprocess.run(
            [helm_binary(), "template", release, str(CHART), "--namespace", namespace, "--values", path],
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        raise RenderError(out.stderr.strip())
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


class RenderError(Exception):
    pass
