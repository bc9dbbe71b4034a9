"""The kubernetes backend (gateway_provisioners' KubernetesProvisioner): a kernel in a pod.

The pod is built by the pure builders in pod_builder; this module only creates, reads and
deletes it (and the Secret that hands the launch token to the pod without putting it in the
pod spec). A pod in the RemoteKernel's namespace is owned by it, so garbage collection removes
it even if the operator is gone; a pod elsewhere is removed by the finalizer.
"""

from __future__ import annotations

import asyncio

from ..errors import BackendError
from ..kube import Kube, KubeError
from ..settings import OperatorSettings
from ..spec import KernelRequest
from .base import BackendRef, BackendStatus, LaunchPlan, kernel_image
from .pod_builder import (
    POD_IP_REF,
    TOKEN_KEY,
    build_namespace_role_binding,
    build_pod,
    carries_uid,
    kernel_namespace_name,
    label_value,
    labels,
    pod_name,
    pod_security_level,
    pod_state,
    token_secret_name,
)
from .pod_cache import PodCache


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, kube: Kube, settings: OperatorSettings) -> None:
        self.kube = kube
        self.settings = settings
        self._caches: dict[str | None, PodCache] = {}
        # Node readiness, read at most once a monitor interval per node whatever the kernels on it.
        self._nodes: dict[str, tuple[float, asyncio.Future[bool]]] = {}

    def adopt(self, ref: BackendRef) -> None:
        """Nothing to rebuild: the pods are the record."""

    def release(self, ref: BackendRef) -> None:
        """Nothing to release."""

    def _per_kernel_namespace(self, request: KernelRequest) -> bool:
        config = request.backend_config
        if config.get("namespace"):
            return False
        return bool(config.get("perKernelNamespace", not self.settings.shared_namespace))

    async def _namespace(self, plan: LaunchPlan) -> tuple[str, bool]:
        """Where the pod goes, and whether the operator made that namespace for it.

        The profile decides (never the spec or KERNEL_NAMESPACE): its namespace; else a
        namespace per kernel, bound to a role the operator names and labelled so the API server
        enforces the Pod Security level; else the RemoteKernel's own.
        """
        request = plan.request
        if not self._per_kernel_namespace(request):
            return str(request.backend_config.get("namespace") or request.namespace), False
        namespace = kernel_namespace_name(request)
        level = pod_security_level(request)
        try:
            await self.kube.create_namespace(
                namespace,
                {
                    **labels(request),
                    "pod-security.kubernetes.io/enforce": level,
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            )
            service_account = str(request.backend_config.get("serviceAccountName") or "default")
            await self.kube.create_role_binding(
                build_namespace_role_binding(namespace, self.settings.kernel_cluster_role, service_account)
            )
        except KubeError as err:
            raise BackendError(
                f"The kernel's namespace {namespace} could not be set up: {err}", reason="NamespaceFailed"
            ) from err
        return namespace, True

    async def find(self, request: KernelRequest) -> BackendRef | None:
        """The pod is named after the kernel, in the namespace the profile gives, and carries
        the RemoteKernel's uid."""
        own = self._per_kernel_namespace(request)
        namespace = (
            kernel_namespace_name(request)
            if own
            else str(request.backend_config.get("namespace") or request.namespace)
        )
        pod = await self.kube.read_pod(namespace, pod_name(request))
        if not carries_uid(pod, request.uid):
            return None
        ref: BackendRef = {
            "kind": "Pod",
            "namespace": namespace,
            "name": pod_name(request),
            "tokenSecret": token_secret_name(request),
        }
        if own:
            ref["ownNamespace"] = True
        return ref

    async def launch(self, plan: LaunchPlan) -> BackendRef:
        request = plan.request
        image = kernel_image(request, self.settings.kernel_image, self.name)
        namespace, created_namespace = await self._namespace(plan)
        owner = plan.owner if namespace == request.namespace else None
        secret = token_secret_name(request)
        try:
            created = await self.kube.create_secret(
                namespace, secret, {TOKEN_KEY: plan.token.encode()}, labels(request), owner
            )
            if not created:
                await self.kube.replace_secret_data(namespace, secret, {TOKEN_KEY: plan.token.encode()})
            pod = build_pod(
                request, plan.launcher_args(POD_IP_REF), image, namespace, owner, request.resources
            )
            await self.kube.create_pod(namespace, pod)
        except KubeError as err:
            if created_namespace:
                await self.kube.delete_namespace(namespace)
            raise BackendError(
                f"The kernel's pod could not be created in {namespace}: {err}", reason="PodCreateFailed"
            ) from err
        ref: BackendRef = {
            "kind": "Pod",
            "namespace": namespace,
            "name": pod_name(request),
            "tokenSecret": secret,
        }
        if created_namespace:
            ref["ownNamespace"] = True
        return ref

    async def aclose(self) -> None:
        for cache in self._caches.values():
            await cache.close()
        self._caches.clear()

    def _pods(self, namespace: str) -> PodCache:
        """The watch that serves ``namespace``: one for all (cluster-wide), else one per namespace."""
        scope = namespace if self.settings.watch_namespaces else None
        if scope not in self._caches:
            self._caches[scope] = PodCache(self.kube, scope)
        return self._caches[scope]

    async def status(self, ref: BackendRef) -> BackendStatus:
        namespace = str(ref["namespace"])
        pod = await self._pods(namespace).get(namespace, str(ref["name"]))
        node = ((pod or {}).get("spec") or {}).get("nodeName")
        # Without the right to read Nodes (the namespaced modes), a lost node shows only
        # through the pod's own status, later.
        node_ready = await self._node_ready(str(node)) if node and self.settings.check_nodes else None
        return pod_state(pod, node_ready)

    async def _node_ready(self, node: str) -> bool:
        loop = asyncio.get_running_loop()
        cached = self._nodes.get(node)
        if (
            cached is None
            or loop.time() - cached[0] > self.settings.monitor_interval
            or (cached[1].done() and cached[1].exception() is not None)
        ):
            cached = (loop.time(), asyncio.ensure_future(self.kube.node_ready(node)))
            self._nodes[node] = cached
        return await asyncio.shield(cached[1])

    async def stop(self, ref: BackendRef, owner: str) -> None:
        """Delete the pod, its token Secret and its own namespace: each only if labelled with
        ``owner``, the RemoteKernel's uid (status alone is not trusted to name them)."""
        namespace, owner_label = str(ref["namespace"]), label_value(owner)
        pod = await self.kube.read_pod(namespace, str(ref["name"]))
        if carries_uid(pod, owner):
            await self.kube.delete_pod(namespace, str(ref["name"]), self.settings.pod_grace_seconds)
        if ref.get("tokenSecret"):
            await self.kube.delete_secret(namespace, str(ref["tokenSecret"]), owner_label)
        if ref.get("ownNamespace"):
            labels_ = await self.kube.namespace_labels(namespace)
            if labels_ is not None and carries_uid({"metadata": {"labels": labels_}}, owner):
                await self.kube.delete_namespace(namespace)
