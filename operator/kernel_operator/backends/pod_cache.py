"""The kubernetes backend's view of its kernel pods: one watch, not one read per kernel.

Rules: one list, then one watch from its resourceVersion, per scope (every namespace, or one
namespace in the namespaced modes), on pods labelled with a RemoteKernel uid; a watch that
ends is resumed from the last version seen, and an expired version (410) means a fresh list.
A pod the cache does not hold is read directly before it is reported missing: the cache may
not have seen a pod created a moment ago. Only what ``pod_state`` reads is kept per pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .. import UID_LABEL
from ..kube import Kube, KubeError

log = logging.getLogger(__name__)
WATCH_SECONDS = 300  # the API server ends a watch after this; it is resumed at once
SYNC_WAIT = 10.0  # how long a status waits for the first list before reading the pod itself


def slim(pod: dict[str, Any]) -> dict[str, Any]:
    """The parts of a pod its kernel's state is read from."""
    meta = pod.get("metadata") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "labels": meta.get("labels") or {},
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "spec": {"nodeName": (pod.get("spec") or {}).get("nodeName")},
        "status": pod.get("status") or {},
    }


class PodCache:
    """Kernel pods of one scope (``namespace`` None: every namespace), kept by one watch."""

    def __init__(self, kube: Kube, namespace: str | None) -> None:
        self.kube = kube
        self.namespace = namespace
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.lists = 0  # API calls made, for the benchmarks
        self.watches = 0
        self.direct_reads = 0

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.synced.wait(), SYNC_WAIT)
        pod = self.pods.get((namespace, name)) if self.synced.is_set() else None
        if pod is not None:
            return pod
        self.direct_reads += 1
        return await self.kube.read_pod(namespace, name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        version = ""
        while True:
            try:
                if not version:
                    items, version = await self.kube.list_pods_versioned(self.namespace, UID_LABEL)
                    self.lists += 1
                    self.pods = {_key(p): slim(p) for p in items}
                    self.synced.set()
                self.watches += 1
                async for kind, pod in self.kube.watch_pods(
                    self.namespace, UID_LABEL, version, WATCH_SECONDS
                ):
                    version = str((pod.get("metadata") or {}).get("resourceVersion") or version)
                    if kind == "DELETED":
                        self.pods.pop(_key(pod), None)
                    else:
                        self.pods[_key(pod)] = slim(pod)
            except KubeError as err:
                if err.status == 410:  # the version is too old: start over from a list
                    version = ""
                    continue
                log.warning("The kernel pod watch failed (%s); listing again in 1 s.", err)
                self.synced.clear()
                version = ""
                await asyncio.sleep(1)
            except (OSError, asyncio.TimeoutError) as err:
                log.warning("The kernel pod watch was cut (%s); resuming.", err)
                await asyncio.sleep(0.5)
            except Exception:  # the watch must outlive anything one event does to it
                log.exception("The kernel pod watch failed; listing again in 1 s.")
                self.synced.clear()
                version = ""
                await asyncio.sleep(1)


def _key(pod: dict[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return str(meta.get("namespace")), str(meta.get("name"))
