"""Pure builders for the kubernetes backend: the kernel's pod, its launch-token Secret, and the
mapping from a pod's status to a BackendStatus. No I/O."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from ..errors import SpecError
from ..launch_command import LAUNCHER_MODULE
from ..spec import KernelRequest
from .base import BackendStatus

TOKEN_KEY = "token"
# The kubelet expands $(VAR) in args from the container's env: the kernel binds its pod's IP.
POD_IP_REF = "$(KERNEL_POD_IP)"
FAILED_WAITING = {
    "ErrImagePull": "ImagePullFailed",
    "ImagePullBackOff": "ImagePullFailed",
    "InvalidImageName": "ImagePullFailed",
    "ErrImageNeverPull": "ImagePullFailed",
    "CreateContainerError": "ContainerCreateFailed",
    "CreateContainerConfigError": "ContainerCreateFailed",
    "CrashLoopBackOff": "CrashLoop",
    "RunContainerError": "ContainerCreateFailed",
}
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def pod_name(request: KernelRequest) -> str:
    return f"k-{request.kernel_id}"


def token_secret_name(request: KernelRequest) -> str:
    return f"k-{request.kernel_id}-launch"


def label_value(text: str) -> str:
    """A string made safe as a label value (63 characters of [A-Za-z0-9_.-])."""
    return _LABEL_VALUE.sub("_", text)[:63].strip("_.-") or "unknown"


def labels(request: KernelRequest) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "remote-kernel",
        "app.kubernetes.io/managed-by": "remote-kernel-operator",
        "kernel-operator.io/kernel-id": request.kernel_id,
        "kernel-operator.io/username": label_value(request.username),
    }


def _int_from(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    if not value.lstrip("-").isdigit():
        raise SpecError(f"env {name}={value!r} must be a whole number.")
    return int(value)


def _security_context(request: KernelRequest) -> dict[str, Any]:
    config = request.backend_config
    uid = config.get("runAsUser", _int_from(request.env, "KERNEL_UID"))
    gid = config.get("runAsGroup", _int_from(request.env, "KERNEL_GID"))
    if uid is not None and int(uid) == 0:
        raise SpecError(
            "Kernels may not run as root (runAsUser / KERNEL_UID 0); choose another uid.",
            reason="Unauthorized",
        )
    context: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    if uid is not None:
        context["runAsUser"] = int(uid)
        context["runAsNonRoot"] = True
    if gid is not None:
        context["runAsGroup"] = int(gid)
    return context


def _resources(spec_resources: Mapping[str, Any]) -> dict[str, Any]:
    amounts: dict[str, Any] = {}
    for key in ("cpu", "memory"):
        if spec_resources.get(key) is not None:
            amounts[key] = str(spec_resources[key])
    limits = dict(amounts)
    if spec_resources.get("gpus"):
        limits["nvidia.com/gpu"] = str(spec_resources["gpus"])
    return {"requests": amounts, "limits": limits} if limits else {}


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged onto ``base``: maps merge key by key, anything else is replaced."""
    result = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def kernel_namespace_name(request: KernelRequest) -> str:
    """The namespace made for one kernel when namespaces are not shared (the seed's rule)."""
    user = re.sub(r"[^a-z0-9-]", "-", request.username.lower()).strip("-")[:20] or "user"
    return f"{user}-{request.kernel_id}"[:63].rstrip("-")


def build_namespace_role_binding(namespace: str, cluster_role: str, service_account: str) -> dict[str, Any]:
    """Grants the kernel's ServiceAccount ``cluster_role`` inside its own namespace only."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "remote-kernel", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }


def _check_mounts(config: Mapping[str, Any]) -> None:
    """Every mount must name a volume the spec (or its pod template) declares, by a valid name."""
    declared = {str(v.get("name")) for v in config.get("volumes") or [] if isinstance(v, Mapping)}
    template_spec = (config.get("podTemplate") or {}).get("spec") or {}
    declared |= {str(v.get("name")) for v in template_spec.get("volumes") or [] if isinstance(v, Mapping)}
    for volume in config.get("volumes") or []:
        if not isinstance(volume, Mapping) or not _DNS_LABEL.match(str(volume.get("name", ""))):
            raise SpecError(f"spec.kubernetes.volumes entry {volume!r} needs a name that is a DNS label.")
    for mount in config["volumeMounts"]:
        if mount["name"] not in declared:
            raise SpecError(
                f"spec.kubernetes.volumeMounts names volume {mount['name']!r}, which spec.kubernetes.volumes does not declare."
            )
        if not str(mount["mountPath"]).startswith("/"):
            raise SpecError(f"spec.kubernetes.volumeMounts path {mount['mountPath']!r} must be absolute.")


def build_pod(
    request: KernelRequest,
    launcher_args: list[str],
    image: str,
    namespace: str,
    owner: Mapping[str, Any] | None,
    resources: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The kernel's pod: data built from the spec, never templated text."""
    config = request.backend_config
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(request.env.items())]
    env += [
        {"name": "KERNEL_NAMESPACE", "value": namespace},
        {"name": "KERNEL_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KERNEL_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {
            "name": "RKO_LAUNCH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": token_secret_name(request), "key": TOKEN_KEY}},
        },
    ]
    container: dict[str, Any] = {
        "name": "kernel",
        "image": image,
        "imagePullPolicy": config.get("imagePullPolicy", "IfNotPresent"),
        "command": ["python", "-m", LAUNCHER_MODULE],
        "args": launcher_args,
        "env": env,
        "securityContext": _security_context(request),
    }
    working_dir = config.get("workingDir") or request.env.get("KERNEL_WORKING_DIR")
    if working_dir:
        container["workingDir"] = working_dir
    if resources:
        built = _resources(resources)
        if built:
            container["resources"] = built
    if config.get("volumeMounts"):
        container["volumeMounts"] = [dict(m) for m in config["volumeMounts"]]
        _check_mounts(config)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    service_account = config.get("serviceAccountName") or request.env.get("KERNEL_SERVICE_ACCOUNT_NAME")
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if config.get("fsGroup") is not None:
        pod_spec["securityContext"] = {"fsGroup": int(config["fsGroup"])}
    if config.get("volumes"):
        pod_spec["volumes"] = [dict(v) for v in config["volumes"]]
    metadata: dict[str, Any] = {"name": pod_name(request), "namespace": namespace, "labels": labels(request)}
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    built_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
    template = config.get("podTemplate") or {}
    if not template:
        return built_pod
    # The template is the base; what the operator builds (identity, command, security) wins.
    merged = deep_merge(template, built_pod)
    template_containers = (template.get("spec") or {}).get("containers") or []
    if template_containers:
        merged["spec"]["containers"] = [
            deep_merge(template_containers[0], container),
            *template_containers[1:],
        ]
    return merged


def pod_state(pod: Mapping[str, Any] | None, node_ready: bool | None) -> BackendStatus:
    """What a kernel pod's status means for the kernel. ``node_ready`` None: node unknown."""
    if pod is None:
        return BackendStatus("gone", "PodDeleted", "The kernel's pod was deleted.")
    name = pod.get("metadata", {}).get("name", "?")
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return BackendStatus("gone", "PodDeleted", f"The kernel's pod {name} is being deleted.")
    status = pod.get("status") or {}
    phase = status.get("phase", "Pending")
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FAILED_WAITING:
            detail = waiting.get("message") or waiting["reason"]
            return BackendStatus(
                "failed", FAILED_WAITING[waiting["reason"]], f"Pod {name}: {waiting['reason']}: {detail}"
            )
    if phase == "Succeeded":
        return BackendStatus("succeeded", "KernelExited", f"The kernel's pod {name} completed.", 0)
    if phase == "Failed":
        reason = status.get("reason") or "PodFailed"
        message = status.get("message") or ""
        for container in status.get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated:
                code = terminated.get("exitCode")
                message = (
                    message
                    or f"the kernel container exited with code {code} ({terminated.get('reason', 'Error')})"
                )
                return BackendStatus("failed", reason, f"Pod {name} failed: {message}.", code)
        return BackendStatus("failed", reason, f"Pod {name} failed: {message or reason}.")
    node = (pod.get("spec") or {}).get("nodeName")
    if node and node_ready is False:
        return BackendStatus(
            "failed", "NodeLost", f"The node {node} running pod {name} is gone or not ready."
        )
    if phase == "Running":
        return BackendStatus("running")
    return BackendStatus("starting")
