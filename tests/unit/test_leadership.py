"""What /healthz and /metrics say about leadership, as the role changes (no I/O)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from kubetask.control.leadership import Leadership


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_gauge_and_the_transitions_follow_the_role() -> None:
    before = {d: sample("kubetask_leader_transitions_total", direction=d) for d in ("acquired", "lost")}
    me = Leadership(identity="a_1", lease="ns/kubetask-operator")
    assert (me.leading, me.holder, sample("kubetask_leader")) == (False, "", 0.0)
    me.changed(False, "b_2")  # a standby learns who leads: no transition of its own
    me.changed(True, "a_1")
    assert (me.leading, me.holder, sample("kubetask_leader")) == (True, "a_1", 1.0)
    me.changed(True, "a_1")
    me.changed(False, "a_1")
    assert (me.leading, sample("kubetask_leader")) == (False, 0.0)
    after = {d: sample("kubetask_leader_transitions_total", direction=d) - before[d] for d in before}
    assert after == {"acquired": 1.0, "lost": 1.0}
