"""Admission: decides when a queued run may get a pod. PostgreSQL is the authority."""

from kubetask.admission.slots import Admission, Grant, QueueLimits

__all__ = ["Admission", "Grant", "QueueLimits"]
