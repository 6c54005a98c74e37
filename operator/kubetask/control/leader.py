"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go's
``tools/leaderelection`` does it, so that one operator replica acts at a time.

Every replica runs :meth:`LeaderElector.run`. A candidate reads the Lease every
``retry_period`` and takes it over when nobody holds it (``holderIdentity`` empty, as a
graceful shutdown leaves it) or when the record has not changed for ``lease_duration``,
measured by *its own* monotonic clock from the moment it first saw that record. The
holder's timestamps (``renewTime``) are written for people reading ``kubectl get lease``,
never used for expiry: the replicas' wall clocks need not agree, only their clocks'
rates. The leader rewrites the Lease every ``retry_period``; every write carries the
``resourceVersion`` it read, so two replicas can never both win the same record (the
API server answers the loser 409).

Invariant: ``renew_deadline < lease_duration``. A leader that has not renewed for
``renew_deadline`` (counted from the moment it *sent* its last successful renewal, which
is before the server stored it) stops all side effects: :attr:`LeaderElector.is_leader`
turns False at that instant, and the ``lead()`` task is cancelled. Any other candidate
saw that renewal at the earliest when the server stored it and waits ``lease_duration``
from there, so the old leader has stopped at least ``lease_duration - renew_deadline``
before anyone else can acquire. That margin must cover how long ``lead()`` takes to
honour its cancellation and any difference in the replicas' clock rates.

Take-over times: after a graceful shutdown (the Lease released), up to one
``retry_period``; after a leader dies without releasing, between ``lease_duration -
retry_period`` and ``lease_duration + retry_period`` from its death.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

log = logging.getLogger(__name__)

#: ``callback(leading, holder)``: whether this replica leads now, and the holder last seen.
ChangeCallback = Callable[[bool, str], None]


def new_identity(base: str | None = None) -> str:
    """``<base>_<random>``: unique per process even when a pod restarts under its old name
    (its predecessor's record must not be mistaken for ours). ``base`` defaults to the
    host name, which is the pod name in Kubernetes."""
    return f"{base or os.environ.get('HOSTNAME') or socket.gethostname()}_{secrets.token_hex(4)}"


@dataclass(frozen=True, kw_only=True)
class LeaseSettings:
    """Where the Lease lives, who we are, and the election's timing (seconds)."""

    namespace: str
    name: str = "kubetask-operator"
    #: Unique per process, e.g. ``<pod name>_<random>`` (:func:`new_identity`).
    identity: str
    #: How long a candidate waits after it last saw the record change before taking over.
    lease_duration: float = 10.0
    #: The leader stops all side effects when it could not renew for this long.
    renew_deadline: float = 7.0
    #: How often candidates try to acquire and the leader renews.
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        for field in ("namespace", "name", "identity"):
            if not getattr(self, field):
                raise ValueError(f"LeaseSettings.{field} must not be empty")
        for field in ("lease_duration", "renew_deadline", "retry_period"):
            value = getattr(self, field)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"LeaseSettings.{field} must be a positive number of seconds, not {value!r}")
        if self.renew_deadline >= self.lease_duration:
            raise ValueError(
                f"renew_deadline ({self.renew_deadline}s) must be shorter than lease_duration "
                f"({self.lease_duration}s): a leader that cannot renew must stop before another "
                "replica may take the lease over"
            )
        if self.retry_period >= self.renew_deadline:
            raise ValueError(
                f"retry_period ({self.retry_period}s) must be shorter than renew_deadline "
                f"({self.renew_deadline}s): the leader must get more than one try to renew "
                "before it gives up"
            )


class _Outcome(Enum):
    HOLDING = "holding"  # we acquired or renewed the lease just now
    HELD_BY_OTHER = "held by another"  # someone else holds a lease that has not expired
    FAILED = "failed"  # the API did not answer as needed: try again later


def _micro_time(dt: datetime) -> str:
    """A MicroTime as the API server writes it: RFC 3339, UTC, always six digits."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """One replica's part in the election on one Lease. See the module docstring."""

    def __init__(self, *, api_client: client.ApiClient, settings: LeaseSettings) -> None:
        self.settings = settings
        self._api_client = api_client
        # Typed as Any: we send plain dicts (the generated signatures insist on models).
        self._api: Any = client.CoordinationV1Api(api_client)
        self._callbacks: list[ChangeCallback] = []
        # The Lease as last read or written (a V1Lease), for its resourceVersion.
        self._lease: Any = None
        # When (monotonic) we first saw the Lease's current resourceVersion: a
        # candidate's expiry clock. Any write, a renewal above all, restarts it.
        self._observed_version: str | None = None
        self._observed_at = 0.0
        # When (monotonic) we sent the last successful acquisition or renewal of the
        # current term; None while we do not lead.
        self._renewed_at: float | None = None
        self._last_renewal: float | None = None
        self._holder = ""
        self._transitions = 0
        self._acquired_at: datetime | None = None
        self._error_streak = False
        self._lead_task: asyncio.Task[None] | None = None
        # What callbacks were last told, so that they hear of changes only.
        self._reported: tuple[bool, str] = (False, "")

    # ---- what others may read -------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True only while we hold the lease *and* renewed it within ``renew_deadline``,
        checked against the clock now: a leader whose loop is stuck stops being one on
        time even before the loop notices."""
        renewed = self._renewed_at
        return renewed is not None and time.monotonic() - renewed < self.settings.renew_deadline

    @property
    def holder(self) -> str:
        """The holderIdentity last read or written ("" when nobody holds the lease)."""
        return self._holder

    @property
    def leader_transitions(self) -> int:
        """The Lease's leaseTransitions as last read or written."""
        return self._transitions

    @property
    def acquired_at(self) -> datetime | None:
        """When (UTC) the current holder acquired the lease, as last read or written."""
        return self._acquired_at

    @property
    def last_renewal(self) -> float | None:
        """``time.monotonic()`` when we sent our last successful acquisition or renewal
        (kept after we step down), for health checks and tests."""
        return self._last_renewal

    def on_change(self, callback: ChangeCallback) -> None:
        """Call ``callback(leading, holder)`` whenever we start or stop leading or see a
        new holder (for logs and metrics; it must not block, and its errors are logged)."""
        self._callbacks.append(callback)

    # ---- the election -----------------------------------------------------------------------

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Take part in the election for ever, running ``lead()`` as a task while we lead.

        ``lead()`` is cancelled (and awaited) when we cannot renew for ``renew_deadline``
        or see another holder. If it returns or raises, we step down and release the lease
        and stand again after ``retry_period``. Cancelling ``run()`` cancels ``lead()``,
        waits for it, then releases the lease so another replica takes over at once."""
        try:
            while True:
                await self._acquire()
                ended = await self._lead_while_renewing(lead)
                if ended:
                    # lead() gave up: let another replica have the lease, and do not
                    # grab it straight back ourselves.
                    await self._release()
                    await asyncio.sleep(self.settings.retry_period)
        finally:
            # Graceful shutdown (cancelled), or a bug: once lead() has stopped, the lease
            # can go to the next replica without waiting for it to expire. (If a second
            # cancellation cut short the wait for lead(), it may still be running: then
            # the lease must expire the slow way.)
            stopped = self._lead_task is None or self._lead_task.done()
            if stopped and self._holder == self.settings.identity:
                await self._release()

    async def _acquire(self) -> None:
        """Returns once we hold the lease."""
        log.info(
            "standing for leader of lease %s/%s as %s",
            self.settings.namespace,
            self.settings.name,
            self.settings.identity,
        )
        while True:
            # A slow API server may take a while, but not for ever (renew_deadline).
            if await self._attempt(budget=self.settings.renew_deadline) is _Outcome.HOLDING:
                return
            await asyncio.sleep(self.settings.retry_period)

    async def _lead_while_renewing(self, lead: Callable[[], Awaitable[None]]) -> bool:
        """Run ``lead()`` and renew until we lose the lease (False) or ``lead()`` ends (True).
        ``lead()`` is stopped either way before this returns."""
        s = self.settings
        log.info("became leader of lease %s/%s as %s", s.namespace, s.name, s.identity)
        self._changed()
        task = self._lead_task = asyncio.create_task(_await(lead), name=f"leader {s.namespace}/{s.name}")
        next_try = time.monotonic() + s.retry_period
        try:
            while (renewed := self._renewed_at) is not None:
                deadline = renewed + s.renew_deadline
                # Wake up for the next renewal, or at the deadline exactly: that is when
                # lead() must stop, not at the next tick after it.
                wake = min(next_try, deadline)
                await asyncio.wait({task}, timeout=max(0.0, wake - time.monotonic()))
                if task.done():
                    self._lead_ended(task)
                    return True
                now = time.monotonic()
                if now >= deadline:
                    log.warning(
                        "could not renew lease %s/%s for %.1fs: no longer leader",
                        s.namespace,
                        s.name,
                        s.renew_deadline,
                    )
                    return False
                if now < next_try:
                    continue
                next_try = now + s.retry_period
                # The attempt must not outlive the deadline (a request can hang on a
                # partitioned network for minutes).
                outcome = await self._attempt(budget=deadline - now)
                if outcome is _Outcome.HELD_BY_OTHER:
                    log.warning(
                        "lease %s/%s is held by %s: no longer leader", s.namespace, s.name, self._holder
                    )
                    return False
            return False  # not reached: only this loop ends a term
        finally:
            # No side effects from here on, whatever the loop is told.
            self._renewed_at = None
            if not task.done():
                task.cancel()
                # Wait for lead() to finish its cleanup: only then has leadership ended.
                # A cancellation of run() meanwhile cancels this wait, not lead()'s.
                await asyncio.wait({task})
                if not task.cancelled() and task.exception() is not None:
                    log.error("lead() failed while being stopped", exc_info=task.exception())
            log.info("stopped leading lease %s/%s", s.namespace, s.name)
            self._changed()

    def _lead_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            log.warning("lead() was cancelled from elsewhere: stepping down")
        elif (exc := task.exception()) is not None:
            log.error("lead() failed: stepping down", exc_info=exc)
        else:
            log.warning("lead() returned: stepping down")

    # ---- one round trip ---------------------------------------------------------------------

    async def _attempt(self, *, budget: float) -> _Outcome:
        """One try to acquire or renew, errors logged (once per streak) and swallowed."""
        try:
            async with asyncio.timeout(budget):
                outcome = await self._try_acquire_or_renew()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._failed(e)
            return _Outcome.FAILED
        if self._error_streak:
            self._error_streak = False
            log.info("lease %s/%s: the API answers again", self.settings.namespace, self.settings.name)
        return outcome

    async def _try_acquire_or_renew(self) -> _Outcome:
        s = self.settings
        # The leader's validity counts from *before* the request: the server stores the
        # renewal later than this, and candidates count from when they see it.
        sent = time.monotonic()
        now = _micro_time(datetime.now(UTC))

        if self._renewed_at is not None and self._lease is not None:
            # Fast path: renew on the record we wrote last. 409: someone else wrote it
            # since (or a renewal of ours whose answer we lost): read it again below.
            try:
                self._stored(await self._replace(self._renewal(self._lease, now)), sent)
                return _Outcome.HOLDING
            except ApiException as e:
                if e.status != 409:
                    raise

        try:
            lease = await self._api.read_namespaced_lease(s.name, s.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            return await self._create(now, sent)
        self._observe(lease)

        holder = lease.spec.holder_identity or ""
        ours = holder == s.identity
        if self._renewed_at is not None and not ours:
            return _Outcome.HELD_BY_OTHER
        if holder and not ours and not self._expired(lease):
            return _Outcome.HELD_BY_OTHER
        try:
            self._stored(await self._replace(self._renewal(lease, now)), sent)
        except ApiException as e:
            if e.status == 409:  # another candidate was quicker: it holds the lease now
                return _Outcome.FAILED
            raise
        return _Outcome.HOLDING

    def _renewal(self, lease: Any, now: str) -> dict[str, Any]:
        """The Lease with us as holder: a renewal keeps the term's acquireTime and
        transitions; an acquisition starts a new term."""
        spec = lease.spec
        renewing = self._renewed_at is not None and spec.holder_identity == self.settings.identity
        transitions = spec.lease_transitions or 0
        if renewing:
            acquired = _micro_time(spec.acquire_time) if spec.acquire_time else now
        else:
            acquired = now
            if spec.holder_identity != self.settings.identity:
                transitions += 1
        return self._body(
            lease,
            holder=self.settings.identity,
            duration=math.ceil(self.settings.lease_duration),
            acquired=acquired,
            renewed=now,
            transitions=transitions,
        )

    def _body(
        self, lease: Any, *, holder: str, duration: int, acquired: str, renewed: str, transitions: int
    ) -> dict[str, Any]:
        # The whole metadata goes back, resourceVersion included: that is the optimistic
        # lock, and labels or annotations someone put on the Lease survive the update.
        metadata: dict[str, Any] = self._api_client.sanitize_for_serialization(lease.metadata)
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": duration,
                "acquireTime": acquired,
                "renewTime": renewed,
                "leaseTransitions": transitions,
            },
        }

    async def _replace(self, body: dict[str, Any]) -> Any:
        return await self._api.replace_namespaced_lease(self.settings.name, self.settings.namespace, body)

    async def _create(self, now: str, sent: float) -> _Outcome:
        s = self.settings
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": math.ceil(s.lease_duration),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
        try:
            lease = await self._api.create_namespaced_lease(s.namespace, body)
        except ApiException as e:
            if e.status == 409:  # another candidate created it first: read it next time
                return _Outcome.FAILED
            raise
        self._stored(lease, sent)
        return _Outcome.HOLDING

    def _expired(self, lease: Any) -> bool:
        """Whether the record has not changed for a lease duration by *our* clock. The
        longer of the holder's promise (leaseDurationSeconds) and ours: a holder
        configured differently (during an upgrade, say) is still safe from us."""
        duration = max(float(lease.spec.lease_duration_seconds or 0), self.settings.lease_duration)
        return time.monotonic() - self._observed_at >= duration

    def _observe(self, lease: Any) -> None:
        """Remember a Lease we read; a new resourceVersion restarts the expiry clock."""
        self._lease = lease
        if lease.metadata.resource_version != self._observed_version:
            self._observed_version = lease.metadata.resource_version
            # After the answer came, not before we asked: the later, the safer.
            self._observed_at = time.monotonic()
        holder = lease.spec.holder_identity or ""
        self._transitions = lease.spec.lease_transitions or 0
        self._acquired_at = lease.spec.acquire_time
        if holder != self._holder:
            self._holder = holder
            log.info("lease %s/%s is held by %r", self.settings.namespace, self.settings.name, holder)
            self._changed()

    def _stored(self, lease: Any, sent: float) -> None:
        """Remember a Lease we wrote with us as holder (sent: when the write was sent)."""
        self._renewed_at = self._last_renewal = sent
        self._observe(lease)

    async def _release(self) -> None:
        """Give the lease up, if we still hold it, so that the next replica need not wait
        for it to expire: no holder, a one-second duration (as client-go does). lead()
        must be stopped before this is called."""
        s = self.settings
        self._renewed_at = None
        try:
            async with asyncio.timeout(s.renew_deadline):
                while True:
                    lease = await self._api.read_namespaced_lease(s.name, s.namespace)
                    self._observe(lease)
                    if (lease.spec.holder_identity or "") != s.identity:
                        return
                    now = _micro_time(datetime.now(UTC))
                    body = self._body(
                        lease,
                        holder="",
                        duration=1,
                        acquired=now,
                        renewed=now,
                        transitions=lease.spec.lease_transitions or 0,
                    )
                    try:
                        self._observe(await self._replace(body))
                    except ApiException as e:
                        if e.status == 409:  # a renewal of ours landed late: read again
                            continue
                        raise
                    log.info("released lease %s/%s", s.namespace, s.name)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning(
                "could not release lease %s/%s (%s): it expires in %.0fs",
                s.namespace,
                s.name,
                _describe(e),
                s.lease_duration,
            )

    # ---- reporting ---------------------------------------------------------------------------

    def _failed(self, e: Exception) -> None:
        """Log an error once per streak: WARNING when transient (the API server or the
        network), ERROR otherwise (RBAC, say). Either way we retry at the next period;
        for a leader, a streak only counts against renew_deadline."""
        if self._error_streak:
            log.debug("lease %s/%s: %s", self.settings.namespace, self.settings.name, _describe(e))
            return
        self._error_streak = True
        level = logging.WARNING if _transient(e) else logging.ERROR
        log.log(
            level,
            "lease %s/%s: %s; retrying every %.1fs",
            self.settings.namespace,
            self.settings.name,
            _describe(e),
            self.settings.retry_period,
            exc_info=None if level == logging.WARNING else e,
        )

    def _changed(self) -> None:
        state = (self.is_leader, self._holder)
        if state == self._reported:
            return
        self._reported = state
        for callback in self._callbacks:
            try:
                callback(*state)
            except Exception:
                log.exception("leader election callback %r failed", callback)


async def _await(lead: Callable[[], Awaitable[None]]) -> None:
    # create_task() wants a coroutine; lead() need only return an awaitable.
    await lead()


def _transient(e: Exception) -> bool:
    if isinstance(e, ApiException):
        return e.status is None or e.status == 429 or e.status >= 500
    return isinstance(e, TimeoutError | aiohttp.ClientError | OSError)


def _describe(e: Exception) -> str:
    if isinstance(e, ApiException):
        return f"API error {e.status} {e.reason}"
    if isinstance(e, TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}"
