"""Installing the project's CRDs (crds/*.yaml, the single sources) into a cluster, and the
profiles a local setup runs kernels under."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .cluster import REPO_ROOT

GROUP, VERSION = "kernel-operator.io", "v1alpha1"
DEFAULT_ANNOTATION = f"{GROUP}/is-default-profile"


def install_crds(api: client.ApiClient, timeout: float = 60.0) -> None:
    """Create or replace every CRD in crds/, then wait until RemoteKernels and profiles are served."""
    ext = client.ApiextensionsV1Api(api)
    for path in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(body)
        except ApiException as err:
            if err.status != 409:
                raise
            existing = ext.read_custom_resource_definition(body["metadata"]["name"])
            assert existing.metadata is not None
            body["metadata"]["resourceVersion"] = existing.metadata.resource_version
            ext.replace_custom_resource_definition(body["metadata"]["name"], body)
    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    for plural in ("remotekernels", "remotekernelprofiles"):
        while True:
            try:
                custom.list_cluster_custom_object(GROUP, VERSION, plural)
                break
            except ApiException as err:
                if time.monotonic() > deadline or err.status not in (404, 429, 503):
                    raise
                time.sleep(0.2)


def apply_profile(api: client.ApiClient, name: str, spec: Mapping[str, Any], default: bool = False) -> None:
    """Create or replace RemoteKernelProfile ``name`` (an administrator's act)."""
    custom = client.CustomObjectsApi(api)
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RemoteKernelProfile",
        "metadata": {"name": name, "annotations": {DEFAULT_ANNOTATION: "true"} if default else {}},
        "spec": dict(spec),
    }
    try:
        custom.create_cluster_custom_object(GROUP, VERSION, "remotekernelprofiles", body)
    except ApiException as err:
        if err.status != 409:
            raise
        current = dict(custom.get_cluster_custom_object(GROUP, VERSION, "remotekernelprofiles", name))  # type: ignore[call-overload]
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        custom.replace_cluster_custom_object(GROUP, VERSION, "remotekernelprofiles", name, body)
