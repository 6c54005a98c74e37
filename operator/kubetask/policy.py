"""Who can run what: the images a Task may choose and the taints it may not tolerate.

A Task chooses the image and tolerations of the pods the operator creates, so creating a
Task is the right to run pods in its namespace (docs/security.md). The cluster's admin
narrows it with two settings (chart values ``taskPolicy``): a Task outside them is not
Ready (its condition says why) and its runs fail without a pod. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from kubetask.spec import TaskSpec


@dataclass(frozen=True)
class Refusal:
    #: The reason of the Task's condition and of the failed run (CamelCase).
    reason: str
    message: str


@dataclass(frozen=True)
class TaskPolicy:
    #: Patterns (fnmatch: ``*``, ``?``, ``[...]``) of the full image reference a Task's
    #: ``spec.image`` must match; empty: any image. Tasks without ``spec.image`` run the
    #: operator's runner image, which is always allowed.
    allowed_images: tuple[str, ...] = ()
    #: Taints a Task may not tolerate: ``{key, value?, effect?}``, a missing field
    #: standing for any value.
    forbidden_tolerations: tuple[dict[str, Any], ...] = ()

    def check(self, spec: TaskSpec) -> Refusal | None:
        """Why ``spec`` may not run, or None."""
        image = spec.image
        if (
            image is not None
            and self.allowed_images
            and not any(fnmatchcase(image, p) for p in self.allowed_images)
        ):
            return Refusal(
                "ImageNotAllowed",
                f"image {image!r} matches none of the allowed images "
                f"({', '.join(self.allowed_images)}; the operator's taskPolicy.allowedImages)",
            )
        tolerations = (spec.pod_template.tolerations if spec.pod_template else None) or []
        for toleration in tolerations:
            for taint in self.forbidden_tolerations:
                if tolerates(toleration, taint):
                    return Refusal(
                        "TolerationNotAllowed",
                        f"toleration {toleration} tolerates the taint {taint}, which Tasks may not "
                        "tolerate (the operator's taskPolicy.forbiddenTolerations)",
                    )
        return None


def tolerates(toleration: dict[str, Any], taint: dict[str, Any]) -> bool:
    """Whether ``toleration`` tolerates some taint that ``taint`` describes (Kubernetes'
    matching rules; a field missing from ``taint`` stands for every value)."""
    effect = toleration.get("effect") or ""
    if effect and taint.get("effect") and effect != taint["effect"]:
        return False
    key = toleration.get("key") or ""
    operator = toleration.get("operator") or "Equal"
    if not key:
        return operator == "Exists"  # an empty key with Exists tolerates every taint
    if key != taint.get("key"):
        return False
    if operator == "Exists" or "value" not in taint:
        return True
    return bool((toleration.get("value") or "") == (taint.get("value") or ""))
