"""Real faults for the end-to-end tests, in front of the operator under test: a TCP proxy
for PostgreSQL (:class:`TcpProxy`) and an HTTP proxy for the kube-apiserver
(:class:`KubeApiProxy`). Both run in a background thread; their controls are synchronous."""

from tests.faults.kubeapi import KubeApiProxy, RequestRecord
from tests.faults.tcp import TcpProxy, TcpStats

__all__ = ["KubeApiProxy", "RequestRecord", "TcpProxy", "TcpStats"]
