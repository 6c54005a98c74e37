"""The operator's narrow interface to the Kubernetes API (kubernetes_asyncio).

Everything the engine asks of Kubernetes goes through :class:`Kube`, as plain dicts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.rest import ApiException

from kubetask.spec import GROUP, VERSION

log = logging.getLogger(__name__)
PodHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


async def load_config() -> None:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        await config.load_kube_config()


class Kube:
    def __init__(self) -> None:
        # Typed as Any: we speak plain dicts to the API (the generated models' signatures
        # insist on model classes, which the server does not need).
        self.api: Any = client.ApiClient()
        self.core: Any = client.CoreV1Api(self.api)
        self.custom: Any = client.CustomObjectsApi(self.api)

    async def close(self) -> None:
        await self.api.close()

    def _dict(self, obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = self.api.sanitize_for_serialization(obj)
        return out

    # ---- pods, secrets, configmaps -------------------------------------------------------

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Create a Pod, Secret or ConfigMap. Returns the object, or None if it already
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

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._dict(await self.core.read_namespaced_pod(name, namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def delete_pod(self, namespace: str, name: str, *, grace: int | None = None) -> None:
        try:
            await self.core.delete_namespaced_pod(
                name, namespace, grace_period_seconds=grace, propagation_policy="Background"
            )
        except ApiException as e:
            if e.status != 404:
                raise

    async def delete_secret(self, namespace: str, name: str) -> None:
        try:
            await self.core.delete_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status != 404:
                raise

    async def list_pods(self, selector: str) -> tuple[list[dict[str, Any]], str]:
        res = await self.core.list_pod_for_all_namespaces(label_selector=selector)
        return [self._dict(p) for p in res.items], res.metadata.resource_version

    async def watch_pods(self, selector: str, handler: PodHandler, *, resource_version: str) -> None:
        """Watch the operator's pods only (server-side label selector) from a list's
        resource version, for ever. Relists (and replays as ADDED) when the watch expires."""
        rv: str | None = resource_version
        while True:
            try:
                if rv is None:
                    pods, rv = await self.list_pods(selector)
                    for pod in pods:
                        await handler("ADDED", pod)
                while True:
                    w = watch.Watch()
                    async with w.stream(
                        self.core.list_pod_for_all_namespaces,
                        label_selector=selector,
                        resource_version=rv,
                        timeout_seconds=240,
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
            except Exception:
                rv = None
                log.exception("pod watch failed; relisting")
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

    async def list_objects(self, plural: str) -> list[dict[str, Any]]:
        res = await self.custom.list_cluster_custom_object(GROUP, VERSION, plural)
        items: list[dict[str, Any]] = res.get("items", [])
        return items

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
