"""What this process knows about leadership, for ``/healthz`` and ``/metrics``.

Every replica has one :class:`Leadership`. With leader election it follows the replica's
:class:`~kubetask.control.leader.LeaderElector`: whether it leads now (the elector's
answer, checked against the clock) and who holds the Lease as last read or written.
Without election, the process leads while its controller runs.

Metrics (the process's default registry; the operator makes one Leadership, the last
one made is the one the gauge reads):

- ``kubetask_leader``: 1 while this replica leads, else 0. ``sum(kubetask_leader)`` over
  the replicas is 1 in a healthy release, 0 during a fail-over, never more.
- ``kubetask_leader_transitions_total{direction}``: times this replica started
  (``acquired``) or stopped (``lost``) leading.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import Counter, Gauge

from kubetask.control.leader import LeaderElector

LEADER = Gauge("kubetask_leader", "1 while this replica is the leader (it reconciles), 0 otherwise.")
TRANSITIONS = Counter(
    "kubetask_leader_transitions_total",
    "Times this replica became the leader (direction=acquired) or stopped being it (direction=lost).",
    ["direction"],
)
Direction = Literal["acquired", "lost"]
for _direction in ("acquired", "lost"):
    TRANSITIONS.labels(direction=_direction)  # exported (at 0) before the first transition


class Leadership:
    """This replica's part in leadership, as last known."""

    def __init__(self, *, identity: str = "", lease: str = "") -> None:
        #: This process in the election (``<pod name>_<random>``); "" when unknown.
        self.identity = identity
        #: ``namespace/name`` of the Lease; "" without leader election.
        self.lease = lease
        self._elector: LeaderElector | None = None
        self._leading = False
        self._holder = ""
        LEADER.set_function(lambda: 1.0 if self.leading else 0.0)

    def follow(self, elector: LeaderElector) -> None:
        """Report what ``elector`` knows (call before it runs)."""
        self._elector = elector
        elector.on_change(self.changed)

    def changed(self, leading: bool, holder: str) -> None:
        """The elector's change callback; without election, called when the controller
        starts (True, own identity) and stops (False, "")."""
        if leading != self._leading:
            direction: Direction = "acquired" if leading else "lost"
            TRANSITIONS.labels(direction=direction).inc()
        self._leading, self._holder = leading, holder

    @property
    def leading(self) -> bool:
        """Whether this replica leads now. With election, the elector's answer: a leader
        that could not renew in time stops being one at that instant, before its loop
        notices."""
        return self._elector.is_leader if self._elector is not None else self._leading

    @property
    def holder(self) -> str:
        """Who holds the Lease as last seen ("" when nobody does, or not known yet)."""
        return self._elector.holder if self._elector is not None else self._holder
