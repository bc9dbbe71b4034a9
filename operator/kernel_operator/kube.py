"""The operator's one I/O seam to the Kubernetes API (besides kopf's own watching).

A thin async wrapper: plain dicts in and out, our own error type, no business logic. Unit tests
replace this class, never the library beneath it.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
from collections.abc import AsyncIterator
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from . import GROUP, PLURAL, UID_LABEL, VERSION
from .errors import OperatorError
from .leadership import LeaseConflict
from .pools import POOL_PLURAL
from .profiles import PROFILE_PLURAL

MERGE_PATCH = "application/merge-patch+json"
LEASES = ("coordination.k8s.io", "v1", "leases")
JSON_PATCH = "application/json-patch+json"


class KubeError(OperatorError):
    """A Kubernetes API call failed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _error(what: str, err: ApiException) -> KubeError:
    hint = ""
    if err.status == 403:
        # Say whose rights are missing and where they come from, not just "Forbidden".
        hint = (
            ": the operator's ServiceAccount lacks this right; install the chart with rbac.create "
            "or grant what its README lists (namespaced modes grant nothing outside their namespaces)"
        )
    # The API server's own explanation (admission, schema, Pod Security) reaches the user.
    return KubeError(f"{what} failed: {err.status} {err.reason}{_api_message(err)}{hint}", status=err.status)


def _api_message(err: ApiException) -> str:
    """The API server's own explanation (a webhook's or the schema's), when it gave one."""
    try:
        message = json.loads(err.body or "{}").get("message")
    except (ValueError, AttributeError):
        return ""
    return f": {message}" if message else ""


class Kube:
    """Async access to the few objects the operator reads and writes itself."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        # Typed as Any: the generated stubs reject plain dict bodies and _content_type,
        # both of which the client accepts and this wrapper relies on.
        self.core: Any = client.CoreV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)
        self.rbac: Any = client.RbacAuthorizationV1Api(api)

    @classmethod
    async def connect(cls) -> Kube:
        """In-cluster credentials inside a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            await config.load_kube_config()
        return cls(client.ApiClient())

    async def close(self) -> None:
        await self.api.close()

    # -- secrets -------------------------------------------------------------------------------
    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's data, decoded; None when it does not exist."""
        try:
            secret = await self.core.read_namespaced_secret(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise _error(f"Reading Secret {namespace}/{name}", err) from err
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    async def create_secret(
        self,
        namespace: str,
        name: str,
        data: dict[str, bytes],
        labels: dict[str, str] | None = None,
        owner: dict[str, Any] | None = None,
    ) -> bool:
        """Create a Secret; False if one by that name already exists."""
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "labels": labels or {},
                "ownerReferences": [owner] if owner else [],
            },
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }
        try:
            await self.core.create_namespaced_secret(namespace, body)
        except ApiException as err:
            if err.status == 409:
                return False
            raise _error(f"Creating Secret {namespace}/{name}", err) from err
        return True

    async def replace_secret_data(self, namespace: str, name: str, data: dict[str, bytes]) -> None:
        body = {"data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
        try:
            await self.core.patch_namespaced_secret(name, namespace, body)
        except ApiException as err:
            raise _error(f"Updating Secret {namespace}/{name}", err) from err

    async def delete_secret(self, namespace: str, name: str, owner_label: str | None = None) -> None:
        """Delete a Secret; with ``owner_label``, only if its kernel-operator.io/uid label is that."""
        try:
            if owner_label is not None:
                secret = await self.core.read_namespaced_secret(name, namespace)
                if (secret.metadata.labels or {}).get(UID_LABEL) != owner_label:
                    return
            await self.core.delete_namespaced_secret(name, namespace)
        except ApiException as err:
            if err.status != 404:
                raise _error(f"Deleting Secret {namespace}/{name}", err) from err

    # -- pods and nodes --------------------------------------------------------------------------
    async def create_pod(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            pod = await self.core.create_namespaced_pod(namespace, body)
        except ApiException as err:
            raise _error(f"Creating pod {namespace}/{body['metadata']['name']}", err) from err
        return dict(self.api.sanitize_for_serialization(pod))

    async def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            pod = await self.core.read_namespaced_pod(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise _error(f"Reading pod {namespace}/{name}", err) from err
        return dict(self.api.sanitize_for_serialization(pod))

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int) -> None:
        try:
            await self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace_seconds)
        except ApiException as err:
            if err.status != 404:
                raise _error(f"Deleting pod {namespace}/{name}", err) from err

    async def node_ready(self, name: str) -> bool:
        """Whether Node ``name`` exists and reports Ready=True."""
        try:
            node = await self.core.read_node(name)
        except ApiException as err:
            if err.status == 404:
                return False
            raise _error(f"Reading node {name}", err) from err
        conditions = (node.status.conditions if node.status else None) or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    async def list_pods_versioned(
        self, namespace: str | None, label_selector: str
    ) -> tuple[list[dict[str, Any]], str]:
        """Pods matching ``label_selector`` (in every namespace when ``namespace`` is None) and
        the list's resourceVersion, to watch from."""
        try:
            if namespace is None:
                pods = await self.core.list_pod_for_all_namespaces(label_selector=label_selector)
            else:
                pods = await self.core.list_namespaced_pod(namespace, label_selector=label_selector)
        except ApiException as err:
            raise _error(f"Listing pods in {namespace or 'all namespaces'} ({label_selector})", err) from err
        items = [dict(self.api.sanitize_for_serialization(pod)) for pod in pods.items]
        return items, str(pods.metadata.resource_version)

    async def watch_pods(
        self, namespace: str | None, label_selector: str, resource_version: str, timeout_seconds: int
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Changes to the pods matching ``label_selector`` after ``resource_version``, as
        (ADDED|MODIFIED|DELETED, pod); raises KubeError (status 410) when that version is gone."""
        from kubernetes_asyncio import watch

        func = (
            self.core.list_pod_for_all_namespaces
            if namespace is None
            else functools.partial(self.core.list_namespaced_pod, namespace)
        )
        stream = watch.Watch().stream(
            func,
            label_selector=label_selector,
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
        )
        try:
            async with stream as events:
                async for event in events:
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        code = obj.get("code") if isinstance(obj, dict) else None
                        raise KubeError(f"The pod watch ended: {obj}", status=int(code) if code else None)
                    yield str(kind), dict(self.api.sanitize_for_serialization(obj))
        except ApiException as err:
            raise _error(f"Watching pods ({label_selector})", err) from err

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        try:
            pods = await self.core.list_namespaced_pod(namespace, label_selector=label_selector)
        except ApiException as err:
            raise _error(f"Listing pods in {namespace} ({label_selector})", err) from err
        return [dict(self.api.sanitize_for_serialization(pod)) for pod in pods.items]

    # -- other operators' custom objects (customResource, sparkApplication) ---------------------
    async def create_custom_object(
        self, group: str, version: str, plural: str, namespace: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            created = await self.custom.create_namespaced_custom_object(
                group, version, namespace, plural, body
            )
        except ApiException as err:
            what = f"Creating {plural}.{group} {namespace}/{body['metadata']['name']}"
            raise _error(what, err) from err
        return dict(created)

    async def read_custom_object(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        try:
            return dict(
                await self.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise _error(f"Reading {plural}.{group} {namespace}/{name}", err) from err

    async def delete_custom_object(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> None:
        try:
            # Background: the API server's garbage collector removes what the object owns.
            await self.custom.delete_namespaced_custom_object(
                group, version, namespace, plural, name, propagation_policy="Background"
            )
        except ApiException as err:
            if err.status != 404:
                raise _error(f"Deleting {plural}.{group} {namespace}/{name}", err) from err

    # -- namespaces ------------------------------------------------------------------------------
    async def create_namespace(self, name: str, labels: dict[str, str]) -> None:
        try:
            await self.core.create_namespace({"metadata": {"name": name, "labels": labels}})
        except ApiException as err:
            if err.status != 409:
                raise _error(f"Creating namespace {name}", err) from err

    async def delete_namespace(self, name: str) -> None:
        try:
            await self.core.delete_namespace(name)
        except ApiException as err:
            if err.status != 404:
                raise _error(f"Deleting namespace {name}", err) from err

    async def create_role_binding(self, body: dict[str, Any]) -> None:
        namespace = body["metadata"]["namespace"]
        try:
            await self.rbac.create_namespaced_role_binding(namespace, body)
        except ApiException as err:
            if err.status != 409:
                raise _error(f"Creating RoleBinding {namespace}/{body['metadata']['name']}", err) from err

    async def namespace_labels(self, name: str) -> dict[str, str] | None:
        """A namespace's labels; None when it does not exist."""
        try:
            namespace = await self.core.read_namespace(name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise _error(f"Reading namespace {name}", err) from err
        return dict(namespace.metadata.labels or {})

    # -- profiles (cluster-scoped, the administrator's) ---------------------------------------
    async def read_profile(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(await self.custom.get_cluster_custom_object(GROUP, VERSION, PROFILE_PLURAL, name))
        except ApiException as err:
            if err.status == 404:
                return None
            raise _error(f"Reading RemoteKernelProfile {name}", err) from err

    async def list_profiles(self) -> list[dict[str, Any]]:
        try:
            found = await self.custom.list_cluster_custom_object(GROUP, VERSION, PROFILE_PLURAL)
        except ApiException as err:
            raise _error("Listing RemoteKernelProfiles", err) from err
        return list(found.get("items", []))

    # -- remote kernels ------------------------------------------------------------------------
    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge ``status`` into the RemoteKernel's status subresource (None deletes a key)."""
        try:
            await self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": status},
                _content_type=MERGE_PATCH,
            )
        except ApiException as err:
            raise _error(f"Patching the status of RemoteKernel {namespace}/{name}", err) from err

    async def read_remote_kernel_status(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The RemoteKernel's status as the API server has it now; None if it is gone."""
        try:
            obj = await self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise _error(f"Reading RemoteKernel {namespace}/{name}", err) from err
        return dict(obj.get("status") or {})

    async def delete_remote_kernel(self, namespace: str, name: str) -> None:
        try:
            await self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as err:
            if err.status != 404:
                raise _error(f"Deleting RemoteKernel {namespace}/{name}", err) from err

    async def list_remote_kernels(
        self, label_selector: str = "", namespaces: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """RemoteKernels in ``namespaces``, or in every namespace when none are given (which
        needs a cluster-wide right the namespaced modes do not have)."""
        try:
            if not namespaces:
                results = [
                    await self.custom.list_cluster_custom_object(
                        GROUP, VERSION, PLURAL, label_selector=label_selector
                    )
                ]
            else:
                results = [
                    await self.custom.list_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, label_selector=label_selector
                    )
                    for namespace in namespaces
                ]
        except ApiException as err:
            raise _error("Listing RemoteKernels", err) from err
        return [item for result in results for item in result.get("items", [])]

    async def read_remote_kernel(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The whole RemoteKernel as the API server has it now; None if it is gone."""
        try:
            return dict(
                await self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise _error(f"Reading RemoteKernel {namespace}/{name}", err) from err

    async def create_remote_kernel(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return dict(
                await self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
            )
        except ApiException as err:
            raise _error(f"Creating RemoteKernel {namespace}/{body['metadata']['name']}", err) from err

    async def swap_label(
        self, namespace: str, name: str, label: str, expected: str, value: str
    ) -> dict[str, Any] | None:
        """Set ``label`` to ``value`` only if it is ``expected`` now (a JSON patch ``test``, which
        the API server applies atomically): the object patched, or None if the label differs or
        the object is gone. Two callers never both win."""
        path = "/metadata/labels/" + label.replace("~", "~0").replace("/", "~1")
        patch = [
            {"op": "test", "path": path, "value": expected},
            {"op": "replace", "path": path, "value": value},
        ]
        try:
            return dict(
                await self.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, patch, _content_type=JSON_PATCH
                )
            )
        except ApiException as err:
            # A failed test is 422 (or 500 from older servers, with the test's message); gone is 404.
            if err.status in (404, 409, 422) or (err.status == 500 and "test" in str(err.body)):
                return None
            raise _error(f"Claiming RemoteKernel {namespace}/{name}", err) from err

    # -- pools ---------------------------------------------------------------------------------
    async def patch_pool_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            await self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, POOL_PLURAL, name, {"status": status}, _content_type=MERGE_PATCH
            )
        except ApiException as err:
            if err.status != 404:
                raise _error(f"Patching the status of RemoteKernelPool {namespace}/{name}", err) from err

    async def set_owner(self, namespace: str, name: str, owner: dict[str, Any]) -> None:
        """Make ``owner`` the RemoteKernel's only owner (a claimed pool member passes from its
        pool to its claimer, and what it owns goes with the claimer)."""
        try:
            await self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"metadata": {"ownerReferences": [owner]}},
                _content_type=MERGE_PATCH,
            )
        except ApiException as err:
            raise _error(f"Handing RemoteKernel {namespace}/{name} over", err) from err

    # -- leases (leader election) --------------------------------------------------------------
    # Through the generic API, in plain dicts like every other object here.
    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(
                await self.custom.get_namespaced_custom_object(*LEASES[:2], namespace, LEASES[2], name)
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise _error(f"Reading Lease {namespace}/{name}", err) from err

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return dict(
                await self.custom.create_namespaced_custom_object(*LEASES[:2], namespace, LEASES[2], body)
            )
        except ApiException as err:
            if err.status == 409:
                raise LeaseConflict(f"Lease {namespace}/{body['metadata']['name']} exists already.") from err
            raise _error(f"Creating Lease {namespace}/{body['metadata']['name']}", err) from err

    async def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Write ``body`` whole; a 409 (its resourceVersion is stale) is a LeaseConflict."""
        try:
            return dict(
                await self.custom.replace_namespaced_custom_object(
                    *LEASES[:2], namespace, LEASES[2], name, body
                )
            )
        except ApiException as err:
            if err.status == 409:
                raise LeaseConflict(f"Lease {namespace}/{name} was written by another replica.") from err
            raise _error(f"Writing Lease {namespace}/{name}", err) from err

    # -- endpoint slices (the other replicas' addresses) ----------------------------------------
    async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        try:
            found = await self.custom.list_namespaced_custom_object(
                "discovery.k8s.io",
                "v1",
                namespace,
                "endpointslices",
                label_selector=f"kubernetes.io/service-name={service}",
            )
        except ApiException as err:
            raise _error(f"Listing the EndpointSlices of Service {namespace}/{service}", err) from err
        return list(found.get("items", []))

    # -- events (posted directly where kopf is not running: a standby replica) -----------------
    async def post_event(
        self, involved: dict[str, Any], type_: str, reason: str, message: str, component: str
    ) -> None:
        meta = involved["metadata"]
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": involved.get("kind", "RemoteKernel"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.core.create_namespaced_event(meta["namespace"], body)
        except ApiException as err:
            raise _error(f"Posting an Event on {meta['namespace']}/{meta['name']}", err) from err
