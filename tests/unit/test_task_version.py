"""The Task version a run keeps (control.catalogue: TaskInfo.version, pinned): what its
attempts' pods and retry policy are made from, whatever the Task says later."""

from __future__ import annotations

from kubetask.control.catalogue import TaskInfo, pinned
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
