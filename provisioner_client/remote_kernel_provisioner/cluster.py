"""The client's one I/O seam to Kubernetes: RemoteKernels and their Secrets, as plain dicts."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.kube_config import KUBE_CONFIG_DEFAULT_LOCATION

from .resource import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ClusterError(RuntimeError):
    """A Kubernetes call failed; the message says which and why."""


class AlreadyExists(ClusterError):
    """The RemoteKernel to create exists already (a restart's, or another server's)."""


# Loaded kubeconfigs, by path and the file's state: an event loop's first kernel (every kernel
# of nbclient or jupyter console, each in a loop of its own) no longer parses it again. Tokens
# that expire are refreshed by the configuration's own hook, request by request.
_LOADED: dict[tuple[str | None, int, int], client.Configuration] = {}
LOADED_KEPT = 8


async def _configuration(kubeconfig: str | None) -> client.Configuration:
    path = os.path.expanduser(kubeconfig or KUBE_CONFIG_DEFAULT_LOCATION)
    try:
        st = os.stat(path)
        key: tuple[str | None, int, int] | None = (kubeconfig, st.st_mtime_ns, st.st_size)
    except OSError:
        key = None  # no file: in-cluster credentials (their token file rotates: not kept)
    cached = _LOADED.get(key) if key else None
    if cached is not None:
        return cached
    cfg = client.Configuration()
    try:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except (config.ConfigException, OSError, TypeError):
        if kubeconfig:
            raise
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        key = None
    # Shared by every provisioner of a process (connections.py), each holding a watch
    # while its kernel starts or stops: aiohttp's default of 100 connections made the
    # 101st kernel of a burst wait for a free one (and time out).
    cfg.connection_pool_maxsize = 0  # aiohttp: no limit
    if key:
        while len(_LOADED) >= LOADED_KEPT:  # oldest first (a file rewritten leaves its old state)
            del _LOADED[next(iter(_LOADED))]
        _LOADED[key] = cfg
    return cfg


class RemoteKernels:
    """RemoteKernels in one namespace."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        # Any: the generated stubs reject plain dict bodies and _content_type.
        self.custom: Any = client.CustomObjectsApi(api)
        self.core: Any = client.CoreV1Api(api)

    @classmethod
    async def connect(cls, namespace: str, kubeconfig: str | None = None) -> RemoteKernels:
        """From ``kubeconfig`` (or KUBECONFIG / ~/.kube/config), else in-cluster credentials."""
        # KUBECONFIG read now: kubernetes_asyncio reads it once, when it is first imported.
        kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
        return cls(client.ApiClient(await _configuration(kubeconfig)), namespace)

    async def close(self) -> None:
        await self.api.close()

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            result: dict[str, Any] = await self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, body
            )
        except ApiException as err:
            if err.status == 409:
                raise AlreadyExists(
                    f"RemoteKernel {self.namespace}/{body['metadata']['name']} exists."
                ) from err
            raise ClusterError(
                f"Creating RemoteKernel {self.namespace}/{body['metadata']['name']} failed: "
                f"{err.status} {err.reason}: {err.body!r}"
            ) from err
        return result

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise ClusterError(
                f"Reading RemoteKernel {self.namespace}/{name} failed: {err.status} {err.reason}"
            ) from err
        return result

    async def list(self, label_selector: str) -> list[dict[str, Any]]:
        try:
            result: dict[str, Any] = await self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, label_selector=label_selector
            )
        except ApiException as err:
            raise ClusterError(
                f"Listing RemoteKernels in {self.namespace} failed: {err.status} {err.reason}"
            ) from err
        return list(result.get("items", []))

    async def delete(self, name: str) -> None:
        try:
            await self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as err:
            if err.status != 404:
                raise ClusterError(
                    f"Deleting RemoteKernel {self.namespace}/{name} failed: {err.status} {err.reason}"
                ) from err

    async def release_unseen(self, obj: dict[str, Any], finalizer: str) -> bool:
        """Drop ``finalizer`` from a RemoteKernel as ``obj`` shows it, if the object is unchanged
        since (a JSON patch ``test`` of its resourceVersion): an operator that writes it
        meanwhile keeps its finalizer. True if dropped."""
        meta = obj.get("metadata") or {}
        finalizers = list(meta.get("finalizers") or [])
        if finalizer not in finalizers:
            return False
        patch = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")},
            {
                "op": "replace",
                "path": "/metadata/finalizers",
                "value": [f for f in finalizers if f != finalizer],
            },
        ]
        try:
            await self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, meta["name"], patch, _content_type=JSON_PATCH
            )
        except ApiException as err:
            # A failed test is 422 (or 500 from older servers); gone is 404.
            if err.status in (404, 409, 422, 500):
                return False
            raise ClusterError(
                f"Releasing RemoteKernel {self.namespace}/{meta['name']} failed: {err.status} {err.reason}"
            ) from err
        return True

    async def annotate(self, name: str, key: str, value: str) -> None:
        body = {"metadata": {"annotations": {key: value}}}
        try:
            await self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, body, _content_type=MERGE_PATCH
            )
        except ApiException as err:
            raise ClusterError(
                f"Annotating RemoteKernel {self.namespace}/{name} failed: {err.status} {err.reason}"
            ) from err

    async def warm(self) -> None:
        """Open a second pooled connection (a ``GET /version``, which every account may read),
        best effort. A launch's watch holds the first until the kernel is Running; the Secret
        read that follows then needs no new TLS handshake (10-40 ms on the launch's path)."""
        try:
            await client.VersionApi(self.api).get_code()
        except Exception:  # an optimization only: any failure is the next read's to report
            return

    async def secret_data(self, name: str) -> dict[str, str]:
        try:
            secret = await self.core.read_namespaced_secret(name, self.namespace)
        except ApiException as err:
            raise ClusterError(
                f"Reading Secret {self.namespace}/{name} failed: {err.status} {err.reason}"
            ) from err
        return dict(secret.data or {})

    async def watch_until(
        self,
        name: str,
        done: Callable[[dict[str, Any] | None], bool],
        timeout: float,
        start: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Watch one RemoteKernel until ``done(obj)`` (obj None: deleted) or ``timeout``.

        ``start``: the object as just written (saves a read; the watch starts at its version).
        Returns the last object seen (None if it is gone); raises TimeoutError.
        """
        deadline = time.monotonic() + timeout
        obj = start if start is not None else await self.get(name)
        while not done(obj):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"RemoteKernel {self.namespace}/{name} did not reach the expected state in time."
                )
            version = (obj or {}).get("metadata", {}).get("resourceVersion")
            try:
                obj = await asyncio.wait_for(self._watch_once(name, version, done, obj, remaining), remaining)
            except asyncio.TimeoutError:  # not TimeoutError: Python 3.10 raises this one
                continue
            if not done(obj):
                obj = await self.get(name)
        return obj

    async def _watch_once(
        self,
        name: str,
        version: str | None,
        done: Callable[[dict[str, Any] | None], bool],
        obj: dict[str, Any] | None,
        remaining: float,
    ) -> dict[str, Any] | None:
        # A watch read line by line from our own client: kubernetes_asyncio's Watch makes an
        # ApiClient of its own, whose TLS context loads the system's CA bundle (~70 ms a launch).
        try:
            resp = await self.custom.list_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=version,
                # The server ends the watch in time, so a silent stream is re-opened.
                timeout_seconds=max(1, min(int(remaining) + 1, 60)),
                watch=True,
                allow_watch_bookmarks=False,
                _preload_content=False,
            )
        except ApiException as err:
            if err.status == 410:
                return obj  # our version is too old; the caller re-reads
            raise ClusterError(
                f"Watching RemoteKernel {self.namespace}/{name} failed: {err.status} {err.reason}"
            ) from err
        try:
            while True:
                line = await resp.content.readline()
                if not line:
                    break  # the server ended the watch
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    break  # e.g. 410 Gone: our version is too old; the caller re-reads
                obj = None if event.get("type") == "DELETED" else event.get("object")
                if done(obj):
                    break
        finally:
            resp.release()
        return obj
