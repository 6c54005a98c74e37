"""The Task version a run keeps (control.catalogue: TaskInfo.version, pinned): what its
attempts' pods and retry policy are made from, whatever the Task says later."""

from __future__ import annotations

from kubetask.control.catalogue import TaskInfo, image_digest, pinned, with_image_digest
from kubetask.spec import TaskSpec

DEFAULT = "localhost/kubetask/runner:default"


def spec(**fields: object) -> TaskSpec:
    return TaskSpec.model_validate({"entrypoint": "app.tasks:hello", **fields})


def test_a_version_records_the_spec_the_effective_image_and_the_generation() -> None:
    info = TaskInfo("hello", "ns", "uid-1", spec(retry={"maxAttempts": 5}), generation=3)
    version = info.version(DEFAULT)
    assert version["uid"] == "uid-1" and version["generation"] == 3
    assert version["image"] == DEFAULT  # no spec.image: the default at resolve time
    assert version["spec"]["retry"]["maxAttempts"] == 5 and "image" not in version["spec"]
    own = TaskInfo("hello", "ns", "uid-1", spec(image="registry.example/app:abc"))
    assert own.version(DEFAULT)["image"] == "registry.example/app:abc"


def test_attempts_use_the_version_not_the_task_as_it_is_now() -> None:
    version = TaskInfo("hello", "ns", "uid-1", spec(retry={"maxAttempts": 5}, maxDurationSeconds=60)).version(
        DEFAULT
    )
    changed = spec(entrypoint="app.tasks:other", image="registry.example/app:new", retry={"maxAttempts": 1})
    kept = pinned(version, changed, "localhost/kubetask/runner:newer-default")
    assert kept.spec.entrypoint == "app.tasks:hello" and kept.spec.retry.max_attempts == 5
    assert kept.spec.max_duration_seconds == 60
    assert kept.image == DEFAULT


def test_runs_resolved_before_versions_were_kept_use_the_task_as_it_is() -> None:
    current = spec(image="registry.example/app:new")
    assert pinned(None, current, DEFAULT).spec == current
    assert pinned(None, current, DEFAULT).image == "registry.example/app:new"
    assert pinned(None, spec(), DEFAULT).image == DEFAULT
    # A record that does not parse (a spec from a newer operator, say): the Task as it is.
    assert pinned({"spec": {"unknownField": 1}, "image": "x"}, current, DEFAULT).spec == current


DIGEST = "sha256:" + "ab" * 32


def pod(image_id: str, container: str = "task") -> dict[str, object]:
    return {"status": {"containerStatuses": [{"name": container, "imageID": image_id}]}}


def test_the_digest_a_first_attempt_ran_is_what_later_attempts_run() -> None:
    version = TaskInfo("hello", "ns", "uid-1", spec(image="registry.example/app:v1")).version(DEFAULT)
    ran = pod(f"registry.example/app@{DIGEST}")
    kept = with_image_digest(version, ran)
    assert kept is not None and kept["imageDigest"] == f"registry.example/app@{DIGEST}"
    assert kept["image"] == "registry.example/app:v1"  # the reference stays, for people
    assert (
        pinned(kept, spec(image="registry.example/app:v2"), DEFAULT).image == f"registry.example/app@{DIGEST}"
    )
    # Kept once: a later pod (even of another digest) changes nothing.
    assert with_image_digest(kept, pod(f"registry.example/app@sha256:{'cd' * 32}")) is None
    # Older kubelets (dockershim) prefixed it.
    legacy = with_image_digest(version, pod(f"docker-pullable://registry.example/app@{DIGEST}"))
    assert legacy is not None and legacy["imageDigest"] == f"registry.example/app@{DIGEST}"


def test_no_digest_is_kept_when_none_can_be_pulled_or_none_is_needed() -> None:
    version = TaskInfo("hello", "ns", "uid-1", spec(image="registry.example/app:v1")).version(DEFAULT)
    # An image imported into the node (never pulled): only a local id, which no node pulls.
    assert image_digest(pod(DIGEST)) is None
    assert with_image_digest(version, pod(DIGEST)) is None
    # Not the task's container, no status yet, a malformed id.
    assert image_digest(pod(f"registry.example/app@{DIGEST}", container="sidecar")) is None
    assert image_digest({"status": {}}) is None and image_digest({}) is None
    assert image_digest(pod("registry.example/app@sha256:short")) is None
    # The Task names its image by digest already; a run without a version.
    by_digest = TaskInfo("hello", "ns", "uid-1", spec(image=f"registry.example/app@{DIGEST}")).version(
        DEFAULT
    )
    assert with_image_digest(by_digest, pod(f"registry.example/app@{DIGEST}")) is None
    assert with_image_digest(None, pod(f"registry.example/app@{DIGEST}")) is None
