"""The kubernetes backend (gateway_provisioners' KubernetesProvisioner): a kernel in a pod.

The pod is built by the pure builders in pod_builder; this module only creates, reads and
deletes it (and the Secret that hands the launch token to the pod without putting it in the
pod spec). A pod in the RemoteKernel's namespace is owned by it, so garbage collection removes
it even if the operator is gone; a pod elsewhere is removed by the finalizer.
"""

from __future__ import annotations

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
    kernel_namespace_name,
    labels,
    pod_name,
    pod_state,
    token_secret_name,
)


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, kube: Kube, settings: OperatorSettings) -> None:
        self.kube = kube
        self.settings = settings

    def adopt(self, ref: BackendRef) -> None:
        """Nothing to rebuild: the pods are the record."""

    def release(self, ref: BackendRef) -> None:
        """Nothing to release."""

    async def _namespace(self, plan: LaunchPlan) -> tuple[str, bool]:
        """Where the pod goes, and whether the operator made that namespace for it.

        The seed's rule: the kernel's own namespace when given; else the shared one (the
        RemoteKernel's); else a namespace per kernel, bound to a role the operator names.
        """
        request = plan.request
        given = request.backend_config.get("namespace") or request.env.get("KERNEL_NAMESPACE")
        if given or self.settings.shared_namespace:
            return str(given or request.namespace), False
        namespace = kernel_namespace_name(request)
        try:
            await self.kube.create_namespace(namespace, labels(request))
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
        """The pod is named after the kernel, in the namespace the rules give."""
        candidates = [
            str(
                request.backend_config.get("namespace")
                or request.env.get("KERNEL_NAMESPACE")
                or request.namespace
            )
        ]
        if not self.settings.shared_namespace:
            candidates.append(kernel_namespace_name(request))
        for namespace in candidates:
            if await self.kube.read_pod(namespace, pod_name(request)) is not None:
                ref: BackendRef = {
                    "kind": "Pod",
                    "namespace": namespace,
                    "name": pod_name(request),
                    "tokenSecret": token_secret_name(request),
                }
                if namespace != candidates[0]:
                    ref["ownNamespace"] = True
                return ref
        return None

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

    async def status(self, ref: BackendRef) -> BackendStatus:
        pod = await self.kube.read_pod(str(ref["namespace"]), str(ref["name"]))
        node = ((pod or {}).get("spec") or {}).get("nodeName")
        # Without the right to read Nodes (the namespaced modes), a lost node shows only
        # through the pod's own status, later.
        node_ready = await self.kube.node_ready(str(node)) if node and self.settings.check_nodes else None
        return pod_state(pod, node_ready)

    async def stop(self, ref: BackendRef) -> None:
        namespace = str(ref["namespace"])
        await self.kube.delete_pod(namespace, str(ref["name"]), self.settings.pod_grace_seconds)
        if ref.get("tokenSecret"):
            await self.kube.delete_secret(namespace, str(ref["tokenSecret"]))
        if ref.get("ownNamespace"):
            await self.kube.delete_namespace(namespace)
