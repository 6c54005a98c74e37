"""The operator's narrow interface to the Kubernetes API (kubernetes_asyncio).

Everything the engine asks of Kubernetes goes through :class:`Kube`, as plain dicts.

An operator that watches some namespaces (``KUBETASK_NAMESPACES``) lists and watches
in those namespaces only, never cluster-wide, so that Roles in them are all the RBAC it
needs (docs/security.md)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.rest import ApiException

from kubetask.spec import GROUP, VERSION

log = logging.getLogger(__name__)
PodHandler = Callable[[str, dict[str, Any]], Awaitable[None]]
#: Called with a complete list of the pods of one namespace (None: of the whole cluster).
RelistHandler = Callable[[list[dict[str, Any]], str | None], Awaitable[None]]
#: Page size of every list: start-up and resync cost follows live objects, in pages.
PAGE = 500


async def load_config() -> None:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        await config.load_kube_config()


class Kube:
    def __init__(self, namespaces: Sequence[str] = ()) -> None:
        # Typed as Any: we speak plain dicts to the API (the generated models' signatures
        # insist on model classes, which the server does not need).
        self.api: Any = client.ApiClient()
        self.core: Any = client.CoreV1Api(self.api)
        self.custom: Any = client.CustomObjectsApi(self.api)
        self.networking: Any = client.NetworkingV1Api(self.api)
        #: Where lists and watches look: these namespaces, or (empty) the whole cluster.
        self.namespaces: list[str] = list(namespaces)

    @property
    def scopes(self) -> list[str | None]:
        """What each list covers: a namespace, or None for the whole cluster."""
        return list(self.namespaces) or [None]

    async def close(self) -> None:
        await self.api.close()

    def _dict(self, obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = self.api.sanitize_for_serialization(obj)
        return out

    # ---- pods, secrets, configmaps -------------------------------------------------------

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Create a Pod, Secret, ConfigMap or ServiceAccount. Returns the object, or None if it already
        existed (409: the deterministic name makes a repeated create harmless)."""
        ns = manifest["metadata"]["namespace"]
        kind = manifest["kind"]
        try:
            if kind == "Pod":
                return self._dict(await self.core.create_namespaced_pod(ns, manifest))
            if kind == "Secret":
                return self._dict(await self.core.create_namespaced_secret(ns, manifest))
            if kind == "ConfigMap":
                return self._dict(await self.core.create_namespaced_config_map(ns, manifest))
            if kind == "ServiceAccount":
                return self._dict(await self.core.create_namespaced_service_account(ns, manifest))
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        raise ValueError(f"unsupported kind {kind}")

    async def replace_secret(self, manifest: dict[str, Any]) -> None:
        meta = manifest["metadata"]
        try:
            await self.core.replace_namespaced_secret(meta["name"], meta["namespace"], manifest)
        except ApiException as e:
            if e.status != 404:
                raise
            await self.create(manifest)

    async def put_network_policy(self, manifest: dict[str, Any]) -> None:
        """Create the NetworkPolicy, or replace the one of that name (no read first: an
        unconditional update)."""
        meta = manifest["metadata"]
        try:
            await self.networking.create_namespaced_network_policy(meta["namespace"], manifest)
        except ApiException as e:
            if e.status != 409:
                raise
            await self.networking.replace_namespaced_network_policy(meta["name"], meta["namespace"], manifest)

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._dict(await self.core.read_namespaced_pod(name, namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def namespace_going(self, namespace: str) -> bool:
        """Whether ``namespace`` is being deleted (or gone): its objects, Tasks and Runs
        alike, are about to go, in no set order."""
        try:
            ns = await self.core.read_namespace(namespace)
        except ApiException as e:
            if e.status == 404:
                return True
            if e.status == 403:  # RBAC without the right: not known to go
                log.warning("cannot read namespace %s (403): grant get on namespaces", namespace)
                return False
            raise
        return ns.metadata.deletion_timestamp is not None or (ns.status and ns.status.phase) == "Terminating"

    async def delete_pod(
        self, namespace: str, name: str, *, grace: int | None = None, uid: str | None = None
    ) -> None:
        """Delete a pod (gone already is fine). With ``uid``, only that very pod (a
        precondition: another pod of the same name is left alone). ``grace``: seconds its
        containers get to stop (None: the pod's own ``terminationGracePeriodSeconds``; 0:
        removed at once, whether or not its kubelet confirms: for a node that is gone)."""
        # All options in the body: the API server reads DeleteOptions from the body when
        # there is one and then ignores the query's (a grace of 0 sent as a query parameter
        # beside a uid precondition was silently the pod's own grace period).
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace is not None:
            body["gracePeriodSeconds"] = grace
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self.core.delete_namespaced_pod(name, namespace, body=body)
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    async def delete_secret(self, namespace: str, name: str) -> None:
        try:
            await self.core.delete_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status != 404:
                raise

    async def _list_all(self, list_fn: Any, selector: str) -> tuple[list[Any], str]:
        """Every item ``list_fn`` returns for ``selector``, a page at a time; and the
        resource version of the list."""
        items: list[Any] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": selector, "limit": PAGE}
            if token:
                kwargs["_continue"] = token
            res = await list_fn(**kwargs)
            items.extend(res.items)
            token = res.metadata._continue
            if not token:
                return items, res.metadata.resource_version

    async def list_pods(self, selector: str, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        """Every pod matching ``selector`` in ``namespace`` (None: the whole cluster), in
        pages; and the list's resource version."""
        items, rv = await self._list_all(self._pods_fn(namespace), selector)
        return [self._dict(p) for p in items], rv

    def _pods_fn(self, namespace: str | None) -> Any:
        if namespace is None:
            return self.core.list_pod_for_all_namespaces
        return functools.partial(self.core.list_namespaced_pod, namespace)

    async def list_secrets(self, selector: str) -> list[dict[str, Any]]:
        """Secrets matching ``selector`` in the watched namespaces (their metadata only:
        all we read), in pages."""
        out: list[dict[str, Any]] = []
        for ns in self.scopes:
            fn = (
                self.core.list_secret_for_all_namespaces
                if ns is None
                else functools.partial(self.core.list_namespaced_secret, ns)
            )
            items, _ = await self._list_all(fn, selector)
            out.extend({"metadata": self._dict(s.metadata)} for s in items)
        return out

    async def watch_pods(self, selector: str, handler: PodHandler, relist: RelistHandler) -> None:
        """List, then watch the operator's pods only (server-side label selector) in the
        watched namespaces, one watch each (or one for the whole cluster), for ever. Each
        (re)list hands the complete set of its namespace to ``relist`` (so pods that
        vanished while the watch was down are noticed); each event goes to ``handler``."""
        await asyncio.gather(*(self._watch_pods(selector, ns, handler, relist) for ns in self.scopes))

    async def _watch_pods(
        self, selector: str, namespace: str | None, handler: PodHandler, relist: RelistHandler
    ) -> None:
        rv: str | None = None
        while True:
            try:
                if rv is None:
                    pods, rv = await self.list_pods(selector, namespace)
                    await relist(pods, namespace)
                while True:
                    w = watch.Watch()
                    async with w.stream(
                        self._pods_fn(namespace),
                        label_selector=selector,
                        resource_version=rv,
                        timeout_seconds=240,
                        # A watch on a connection that went silent (a partition, a paused
                        # server) would wait for ever: the client gives up a bit after the
                        # server should have ended it, and the loop re-lists.
                        _request_timeout=270,
                        allow_watch_bookmarks=True,
                    ) as stream:
                        async for ev in stream:
                            obj = ev["object"]
                            if ev["type"] == "BOOKMARK":
                                rv = (
                                    obj["metadata"]["resourceVersion"]
                                    if isinstance(obj, dict)
                                    else obj.metadata.resource_version
                                )
                                continue
                            if ev["type"] == "ERROR":
                                raise ApiException(status=410)
                            pod = obj if isinstance(obj, dict) else self._dict(obj)
                            rv = pod["metadata"]["resourceVersion"]
                            await handler(ev["type"], pod)
            except asyncio.CancelledError:
                raise
            except ApiException as e:
                rv = None
                if e.status != 410:
                    log.warning("pod watch failed (%s); relisting", e.status)
                    await asyncio.sleep(1)
            except Exception as e:
                rv = None
                log.warning("pod watch failed (%r); relisting", e)
                await asyncio.sleep(1)

    # ---- kubetask resources -----------------------------------------------------------------

    async def get_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name
            )
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def create_object(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create a kubetask object; None if one of that name exists (409)."""
        try:
            obj: dict[str, Any] = await self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, body
            )
            return obj
        except ApiException as e:
            if e.status == 409:
                return None
            raise

    async def iter_objects(self, plural: str) -> AsyncIterator[dict[str, Any]]:
        """Every object of a kubetask kind in the watched namespaces (or the whole
        cluster), fetched a page at a time."""
        for ns in self.scopes:
            token: str | None = None
            while True:
                kwargs: dict[str, Any] = {"limit": PAGE}
                if token:
                    kwargs["_continue"] = token
                if ns is None:
                    res = await self.custom.list_cluster_custom_object(GROUP, VERSION, plural, **kwargs)
                else:
                    res = await self.custom.list_namespaced_custom_object(
                        GROUP, VERSION, ns, plural, **kwargs
                    )
                for item in res.get("items", []):
                    yield item
                token = (res.get("metadata") or {}).get("continue")
                if not token:
                    break

    async def delete_object(self, plural: str, namespace: str, name: str, *, uid: str) -> None:
        """Delete a kubetask object, only if it is still the one with ``uid``."""
        try:
            await self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, body={"preconditions": {"uid": uid}}
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge-patch the status subresource. False if the object is gone."""
        try:
            await self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                {"status": status},
                _content_type="application/merge-patch+json",
            )
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise
