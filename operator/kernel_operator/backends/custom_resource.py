"""The customResource and sparkApplication backends (gateway_provisioners' CustomResourceProvisioner
and SparkOperatorProvisioner): a kernel as a custom object that another operator turns into pods.

The operator creates the object (owned by the RemoteKernel) and the Secret with the launch
token; it finds the kernel's pod by labels, and reads the object's own status so that a failure
the other operator reports (a SparkApplication that could not be submitted) fails the kernel at
once instead of waiting out the launch timeout. Deleting removes the object; the API server's
garbage collector removes the pods it owns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import BackendError
from ..kube import Kube, KubeError
from ..settings import OperatorSettings
from ..spec import KernelRequest
from .base import BackendRef, BackendStatus, LaunchPlan, kernel_image
from .custom_object_builder import (
    SPARK_GROUP,
    SPARK_PLURAL,
    SPARK_POD_IP_REF,
    SPARK_VERSION,
    build_custom_object,
    build_spark_application,
    combined_state,
    custom_object_kind,
    custom_object_state,
    object_name,
    pod_selector,
    spark_application_state,
)
from .pod_builder import POD_IP_REF, TOKEN_KEY, carries_uid, label_value, labels, pod_state, token_secret_name


class CustomResourceBackend:
    name = "customResource"
    ip_ref = POD_IP_REF  # the kernel pod's IP, if the template sets KERNEL_POD_IP as we do

    def __init__(self, kube: Kube, settings: OperatorSettings) -> None:
        self.kube = kube
        self.settings = settings

    # What differs between a generic custom object and a SparkApplication.
    def kind(self, request: KernelRequest) -> tuple[str, str, str]:
        return custom_object_kind(request.backend_config)

    def build(
        self,
        request: KernelRequest,
        args: Sequence[str],
        image: str,
        namespace: str,
        owner: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        return build_custom_object(request, args, image, namespace, owner)

    def object_state(self, obj: Mapping[str, Any] | None) -> BackendStatus:
        return custom_object_state(obj)

    # -- the Backend interface -------------------------------------------------------------------
    def adopt(self, ref: BackendRef) -> None:
        """Nothing to rebuild: the objects are the record."""

    def release(self, ref: BackendRef) -> None:
        """Nothing to release."""

    def _ref(self, request: KernelRequest) -> BackendRef:
        group, version, plural = self.kind(request)
        return {
            "kind": "CustomObject",
            "group": group,
            "version": version,
            "plural": plural,
            "namespace": request.namespace,
            "name": object_name(request),
            "podSelector": pod_selector(request),
            "tokenSecret": token_secret_name(request),
        }

    async def find(self, request: KernelRequest) -> BackendRef | None:
        ref = self._ref(request)
        found = await self._read(ref)
        return ref if found is not None else None

    async def _read(self, ref: BackendRef) -> dict[str, Any] | None:
        try:
            return await self.kube.read_custom_object(
                str(ref["group"]),
                str(ref["version"]),
                str(ref["plural"]),
                str(ref["namespace"]),
                str(ref["name"]),
            )
        except KubeError as err:
            raise BackendError(
                f"Reading the kernel's {ref['plural']} failed: {err}", reason="ObjectReadFailed"
            ) from err

    async def launch(self, plan: LaunchPlan) -> BackendRef:
        request = plan.request
        image = kernel_image(request, self.settings.kernel_image, self.name)
        ref = self._ref(request)
        namespace = request.namespace
        body = self.build(request, plan.launcher_args(self.ip_ref), image, namespace, plan.owner)
        secret = token_secret_name(request)
        try:
            if not await self.kube.create_secret(
                namespace, secret, {TOKEN_KEY: plan.token.encode()}, labels(request), plan.owner
            ):
                await self.kube.replace_secret_data(namespace, secret, {TOKEN_KEY: plan.token.encode()})
            await self.kube.create_custom_object(
                str(ref["group"]), str(ref["version"]), str(ref["plural"]), namespace, body
            )
        except KubeError as err:
            await self._delete_secret_quietly(namespace, secret)
            reason = "ObjectRejected" if err.status in (400, 404, 422) else "ObjectCreateFailed"
            hint = (
                f" Is the {ref['plural']}.{ref['group']} CRD installed, and its operator running?"
                if err.status == 404
                else ""
            )
            raise BackendError(
                f"The kernel's {body['kind']} could not be created: {err}.{hint}", reason=reason
            ) from err
        return ref

    async def _delete_secret_quietly(self, namespace: str, name: str) -> None:
        # Owned by the RemoteKernel: garbage collection removes it with it if this fails.
        with contextlib.suppress(KubeError):
            await self.kube.delete_secret(namespace, name)

    async def status(self, ref: BackendRef) -> BackendStatus:
        obj = await self._read(ref)
        verdict = self.object_state(obj)
        if verdict.state in ("gone", "failed", "succeeded"):
            return verdict
        try:
            pods = await self.kube.list_pods(str(ref["namespace"]), str(ref["podSelector"]))
        except KubeError as err:
            raise BackendError(f"Listing the kernel's pods failed: {err}", reason="PodListFailed") from err
        newest = sorted(
            pods, key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp", "")), reverse=True
        )
        return combined_state(verdict, [pod_state(pod, None) for pod in newest[:1]])

    async def stop(self, ref: BackendRef, owner: str) -> None:
        """Delete the object, its kernel pods and the token Secret: only those labelled with the
        RemoteKernel's uid ``owner``, or (pods) owned by that object."""
        namespace, owner_label = str(ref["namespace"]), label_value(owner)
        try:
            obj = await self._read(ref)
            if not carries_uid(obj, owner):
                obj = None  # not this kernel's object: status named something else
            else:
                await self.kube.delete_custom_object(
                    str(ref["group"]), str(ref["version"]), str(ref["plural"]), namespace, str(ref["name"])
                )
            object_uid = (obj or {}).get("metadata", {}).get("uid")
            # Its pods go with it (owned by it); delete them too, in case the other operator
            # did not make them owned, so the kernel stops now rather than at collection.
            for pod in await self.kube.list_pods(namespace, str(ref["podSelector"])):
                meta = pod.get("metadata") or {}
                owned = (
                    any(o.get("uid") == object_uid for o in meta.get("ownerReferences") or []) and object_uid
                )
                if owned or carries_uid(pod, owner):
                    await self.kube.delete_pod(
                        namespace, str(meta.get("name")), self.settings.pod_grace_seconds
                    )
            if ref.get("tokenSecret"):
                await self.kube.delete_secret(namespace, str(ref["tokenSecret"]), owner_label)
        except KubeError as err:
            raise BackendError(
                f"Deleting the kernel's {ref['plural']} failed: {err}", reason="StopFailed"
            ) from err


class SparkApplicationBackend(CustomResourceBackend):
    name = "sparkApplication"
    ip_ref = SPARK_POD_IP_REF

    def kind(self, request: KernelRequest) -> tuple[str, str, str]:
        return SPARK_GROUP, SPARK_VERSION, SPARK_PLURAL

    def build(
        self,
        request: KernelRequest,
        args: Sequence[str],
        image: str,
        namespace: str,
        owner: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        return build_spark_application(request, args, image, namespace, owner)

    def object_state(self, obj: Mapping[str, Any] | None) -> BackendStatus:
        return spark_application_state(obj)
