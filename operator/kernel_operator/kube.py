"""The operator's one I/O seam to the Kubernetes API (besides kopf's own watching).

A thin async wrapper: plain dicts in and out, our own error type, no business logic. Unit tests
replace this class, never the library beneath it.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from . import GROUP, PLURAL, UID_LABEL, VERSION
from .errors import OperatorError
from .kube_auth import load as load_credentials
from .kube_http import ApiClient, ApiStatusError
from .leadership import LeaseConflict
from .pools import POOL_PLURAL
from .profiles import PROFILE_PLURAL

MERGE_PATCH = "application/merge-patch+json"
LEASES = ("coordination.k8s.io", "v1", "leases")
JSON_PATCH = "application/json-patch+json"
RBAC = ("rbac.authorization.k8s.io", "v1")


class KubeError(OperatorError):
    """A Kubernetes API call failed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _error(what: str, err: ApiStatusError) -> KubeError:
    hint = ""
    if err.status == 403:
        # Say whose rights are missing and where they come from, not just "Forbidden".
        hint = (
            ": the operator's ServiceAccount lacks this right; install the chart with rbac.create "
            "or grant what its README lists (namespaced modes grant nothing outside their namespaces)"
        )
    # The API server's own explanation (admission, schema, Pod Security) reaches the user.
    return KubeError(f"{what} failed: {err.status} {err.reason}{_api_message(err)}{hint}", status=err.status)


def _api_message(err: ApiStatusError) -> str:
    """The API server's own explanation (a webhook's or the schema's), when it gave one."""
    try:
        message = json.loads(err.body or "{}").get("message")
    except (ValueError, AttributeError):
        return ""
    return f": {message}" if message else ""


def api_path(
    group: str,
    version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    sub: str = "",
) -> str:
    """The REST path of a collection or an object ("" is the core group)."""
    parts = ["/api/v1"] if not group else ["/apis", group, version]
    if namespace is not None:
        parts += ["namespaces", quote(namespace, safe="")]
    parts.append(plural)
    if name is not None:
        parts.append(quote(name, safe=""))
    if sub:
        parts.append(sub)
    return "/".join(parts)


def _core(plural: str, namespace: str | None = None, name: str | None = None) -> str:
    return api_path("", "v1", plural, namespace, name)


def _mine(plural: str, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
    return api_path(GROUP, VERSION, plural, namespace, name, sub)


def _selector(label_selector: str) -> dict[str, str | int]:
    return {"labelSelector": label_selector} if label_selector else {}


class Kube:
    """Async access to the few objects the operator reads and writes itself."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api

    @classmethod
    async def connect(cls) -> Kube:
        """In-cluster credentials inside a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
        api = ApiClient(load_credentials)
        await api.connect()
        return cls(api)

    async def close(self) -> None:
        await self.api.close()

    async def _send(
        self,
        what: str,
        method: str,
        path: str,
        *,
        tolerate: tuple[int, ...] = (),
        params: dict[str, str | int] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """The answer to one request; None when its status is one of ``tolerate`` (e.g. 404)."""
        try:
            return await self.api.request(method, path, params=params, body=body, content_type=content_type)
        except ApiStatusError as err:
            if err.status in tolerate:
                return None
            raise _error(what, err) from err

    async def _must(self, what: str, method: str, path: str, **kw: Any) -> dict[str, Any]:
        found = await self._send(what, method, path, **kw)
        assert found is not None  # nothing tolerated
        return found

    # -- secrets -------------------------------------------------------------------------------
    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's data, decoded; None when it does not exist."""
        secret = await self._send(
            f"Reading Secret {namespace}/{name}", "GET", _core("secrets", namespace, name), tolerate=(404,)
        )
        if secret is None:
            return None
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

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
        created = await self._send(
            f"Creating Secret {namespace}/{name}",
            "POST",
            _core("secrets", namespace),
            body=body,
            tolerate=(409,),
        )
        return created is not None

    async def replace_secret_data(self, namespace: str, name: str, data: dict[str, bytes]) -> None:
        body = {"data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
        await self._must(
            f"Updating Secret {namespace}/{name}",
            "PATCH",
            _core("secrets", namespace, name),
            body=body,
            content_type=MERGE_PATCH,
        )

    async def delete_secret(self, namespace: str, name: str, owner_label: str | None = None) -> None:
        """Delete a Secret; with ``owner_label``, only if its kernel-operator.io/uid label is that."""
        what = f"Deleting Secret {namespace}/{name}"
        path = _core("secrets", namespace, name)
        if owner_label is not None:
            secret = await self._send(what, "GET", path, tolerate=(404,))
            if (
                secret is None
                or ((secret.get("metadata") or {}).get("labels") or {}).get(UID_LABEL) != owner_label
            ):
                return
        await self._send(what, "DELETE", path, tolerate=(404,))

    # -- pods and nodes --------------------------------------------------------------------------
    async def create_pod(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        what = f"Creating pod {namespace}/{body['metadata']['name']}"
        return await self._must(what, "POST", _core("pods", namespace), body=body)

    async def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._send(
            f"Reading pod {namespace}/{name}", "GET", _core("pods", namespace, name), tolerate=(404,)
        )

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int) -> None:
        await self._send(
            f"Deleting pod {namespace}/{name}",
            "DELETE",
            _core("pods", namespace, name),
            params={"gracePeriodSeconds": grace_seconds},
            tolerate=(404,),
        )

    async def node_ready(self, name: str) -> bool:
        """Whether Node ``name`` exists and reports Ready=True."""
        node = await self._send(f"Reading node {name}", "GET", _core("nodes", None, name), tolerate=(404,))
        if node is None:
            return False
        conditions = (node.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    async def list_pods_versioned(
        self, namespace: str | None, label_selector: str
    ) -> tuple[list[dict[str, Any]], str]:
        """Pods matching ``label_selector`` (in every namespace when ``namespace`` is None) and
        the list's resourceVersion, to watch from."""
        pods = await self._must(
            f"Listing pods in {namespace or 'all namespaces'} ({label_selector})",
            "GET",
            _core("pods", namespace),
            params=_selector(label_selector),
        )
        return list(pods.get("items") or []), str((pods.get("metadata") or {}).get("resourceVersion", ""))

    async def watch_pods(
        self, namespace: str | None, label_selector: str, resource_version: str, timeout_seconds: int
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Changes to the pods matching ``label_selector`` after ``resource_version``, as
        (ADDED|MODIFIED|DELETED, pod); raises KubeError (status 410) when that version is gone."""
        params = {**_selector(label_selector), "resourceVersion": resource_version}
        try:
            async for event in self.api.watch(_core("pods", namespace), params, timeout_seconds):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    code = obj.get("code") if isinstance(obj, dict) else None
                    raise KubeError(f"The pod watch ended: {obj}", status=int(code) if code else None)
                if kind == "BOOKMARK":
                    continue
                yield str(kind), dict(obj)
        except ApiStatusError as err:
            raise _error(f"Watching pods ({label_selector})", err) from err

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        pods = await self._must(
            f"Listing pods in {namespace} ({label_selector})",
            "GET",
            _core("pods", namespace),
            params=_selector(label_selector),
        )
        return list(pods.get("items") or [])

    # -- other operators' custom objects (customResource, sparkApplication) ---------------------
    async def create_custom_object(
        self, group: str, version: str, plural: str, namespace: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        what = f"Creating {plural}.{group} {namespace}/{body['metadata']['name']}"
        return await self._must(what, "POST", api_path(group, version, plural, namespace), body=body)

    async def read_custom_object(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        what = f"Reading {plural}.{group} {namespace}/{name}"
        return await self._send(
            what, "GET", api_path(group, version, plural, namespace, name), tolerate=(404,)
        )

    async def delete_custom_object(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> None:
        # Background: the API server's garbage collector removes what the object owns.
        await self._send(
            f"Deleting {plural}.{group} {namespace}/{name}",
            "DELETE",
            api_path(group, version, plural, namespace, name),
            params={"propagationPolicy": "Background"},
            tolerate=(404,),
        )

    # -- namespaces ------------------------------------------------------------------------------
    async def create_namespace(self, name: str, labels: dict[str, str]) -> None:
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        await self._send(
            f"Creating namespace {name}", "POST", _core("namespaces"), body=body, tolerate=(409,)
        )

    async def delete_namespace(self, name: str) -> None:
        await self._send(
            f"Deleting namespace {name}", "DELETE", _core("namespaces", None, name), tolerate=(404,)
        )

    async def create_role_binding(self, body: dict[str, Any]) -> None:
        namespace = body["metadata"]["namespace"]
        await self._send(
            f"Creating RoleBinding {namespace}/{body['metadata']['name']}",
            "POST",
            api_path(*RBAC, "rolebindings", namespace),
            body=body,
            tolerate=(409,),
        )

    async def namespace_labels(self, name: str) -> dict[str, str] | None:
        """A namespace's labels; None when it does not exist."""
        found = await self._send(
            f"Reading namespace {name}", "GET", _core("namespaces", None, name), tolerate=(404,)
        )
        return None if found is None else dict((found.get("metadata") or {}).get("labels") or {})

    # -- profiles (cluster-scoped, the administrator's) ---------------------------------------
    async def read_profile(self, name: str) -> dict[str, Any] | None:
        return await self._send(
            f"Reading RemoteKernelProfile {name}", "GET", _mine(PROFILE_PLURAL, None, name), tolerate=(404,)
        )

    async def list_profiles(self) -> list[dict[str, Any]]:
        found = await self._must("Listing RemoteKernelProfiles", "GET", _mine(PROFILE_PLURAL))
        return list(found.get("items") or [])

    # -- remote kernels ------------------------------------------------------------------------
    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge ``status`` into the RemoteKernel's status subresource (None deletes a key)."""
        await self._must(
            f"Patching the status of RemoteKernel {namespace}/{name}",
            "PATCH",
            _mine(PLURAL, namespace, name, "status"),
            body={"status": status},
            content_type=MERGE_PATCH,
        )

    async def read_remote_kernel_status(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The RemoteKernel's status as the API server has it now; None if it is gone."""
        obj = await self.read_remote_kernel(namespace, name)
        return None if obj is None else dict(obj.get("status") or {})

    async def delete_remote_kernel(self, namespace: str, name: str) -> None:
        await self._send(
            f"Deleting RemoteKernel {namespace}/{name}",
            "DELETE",
            _mine(PLURAL, namespace, name),
            tolerate=(404,),
        )

    async def list_remote_kernels(
        self, label_selector: str = "", namespaces: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """RemoteKernels in ``namespaces``, or in every namespace when none are given (which
        needs a cluster-wide right the namespaced modes do not have)."""
        paths = [_mine(PLURAL, namespace) for namespace in namespaces] or [_mine(PLURAL)]
        results = [
            await self._must("Listing RemoteKernels", "GET", path, params=_selector(label_selector))
            for path in paths
        ]
        return [item for result in results for item in result.get("items") or []]

    async def read_remote_kernel(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The whole RemoteKernel as the API server has it now; None if it is gone."""
        return await self._send(
            f"Reading RemoteKernel {namespace}/{name}", "GET", _mine(PLURAL, namespace, name), tolerate=(404,)
        )

    async def create_remote_kernel(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        what = f"Creating RemoteKernel {namespace}/{body['metadata']['name']}"
        return await self._must(what, "POST", _mine(PLURAL, namespace), body=body)

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
            return await self.api.request(
                "PATCH", _mine(PLURAL, namespace, name), body=patch, content_type=JSON_PATCH
            )
        except ApiStatusError as err:
            # A failed test is 422 (or 500 from older servers, with the test's message); gone is 404.
            if err.status in (404, 409, 422) or (err.status == 500 and "test" in err.body):
                return None
            raise _error(f"Claiming RemoteKernel {namespace}/{name}", err) from err

    # -- pools ---------------------------------------------------------------------------------
    async def patch_pool_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._send(
            f"Patching the status of RemoteKernelPool {namespace}/{name}",
            "PATCH",
            _mine(POOL_PLURAL, namespace, name, "status"),
            body={"status": status},
            content_type=MERGE_PATCH,
            tolerate=(404,),
        )

    async def set_owner(self, namespace: str, name: str, owner: dict[str, Any]) -> None:
        """Make ``owner`` the RemoteKernel's only owner (a claimed pool member passes from its
        pool to its claimer, and what it owns goes with the claimer)."""
        await self._must(
            f"Handing RemoteKernel {namespace}/{name} over",
            "PATCH",
            _mine(PLURAL, namespace, name),
            body={"metadata": {"ownerReferences": [owner]}},
            content_type=MERGE_PATCH,
        )

    # -- leases (leader election) --------------------------------------------------------------
    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._send(
            f"Reading Lease {namespace}/{name}", "GET", api_path(*LEASES, namespace, name), tolerate=(404,)
        )

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        created = await self._send(
            f"Creating Lease {namespace}/{name}",
            "POST",
            api_path(*LEASES, namespace),
            body=body,
            tolerate=(409,),
        )
        if created is None:
            raise LeaseConflict(f"Lease {namespace}/{name} exists already.")
        return created

    async def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Write ``body`` whole; a 409 (its resourceVersion is stale) is a LeaseConflict."""
        written = await self._send(
            f"Writing Lease {namespace}/{name}",
            "PUT",
            api_path(*LEASES, namespace, name),
            body=body,
            tolerate=(409,),
        )
        if written is None:
            raise LeaseConflict(f"Lease {namespace}/{name} was written by another replica.")
        return written

    # -- endpoint slices (the other replicas' addresses) ----------------------------------------
    async def list_endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        found = await self._must(
            f"Listing the EndpointSlices of Service {namespace}/{service}",
            "GET",
            api_path("discovery.k8s.io", "v1", "endpointslices", namespace),
            params=_selector(f"kubernetes.io/service-name={service}"),
        )
        return list(found.get("items") or [])

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
        await self._must(
            f"Posting an Event on {meta['namespace']}/{meta['name']}",
            "POST",
            _core("events", meta["namespace"]),
            body=body,
        )
