"""Pure builders for the kubernetes backend: the kernel's pod, its launch-token Secret, and the
mapping from a pod's status to a BackendStatus. No I/O."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from .. import UID_LABEL
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
# The kubelet retries a container it could not create, and under load it often cannot for a
# moment: its Secret cache has not synced yet, or the runtime timed out. Those waits are not
# the kernel's failure (the launch's timeout still bounds them); a missing Secret or a bad
# command is.
TRANSIENT_CREATE_REASONS = ("CreateContainerConfigError", "CreateContainerError")
TRANSIENT_CREATE_MESSAGES = (
    "failed to sync",
    "timed out waiting for the condition",
    "context deadline exceeded",
)
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def pod_name(request: KernelRequest) -> str:
    return f"k-{request.kernel_id}"


def token_secret_name(request: KernelRequest) -> str:
    return f"k-{request.kernel_id}-launch"


def label_value(text: str) -> str:
    """A string made safe as a label value (63 characters of [A-Za-z0-9_.-])."""
    return _LABEL_VALUE.sub("_", text)[:63].strip("_.-") or "unknown"


DEFAULT_UID = 1000  # kernels run as this uid when the profile names none (never root)
POD_SECURITY_LEVELS = ("restricted", "baseline", "privileged")


def labels(request: KernelRequest) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "remote-kernel",
        "app.kubernetes.io/managed-by": "remote-kernel-operator",
        "kernel-operator.io/kernel-id": request.kernel_id,
        "kernel-operator.io/username": label_value(request.username),
        UID_LABEL: label_value(request.uid),
    }


def carries_uid(obj: Mapping[str, Any] | None, owner: str) -> bool:
    """Whether an object (a pod, a custom object: API data) is labelled with RemoteKernel
    ``owner``'s uid: what a stop may act on."""
    labels_ = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return obj is not None and labels_.get(UID_LABEL) == label_value(owner)


def pod_security_level(request: KernelRequest) -> str:
    level = str(request.backend_config.get("podSecurity") or "restricted")
    if level not in POD_SECURITY_LEVELS:
        raise SpecError(
            f"Profile {request.profile}'s kubernetes.podSecurity {level!r} is not one of "
            f"{', '.join(POD_SECURITY_LEVELS)}.",
            reason="ProfileInvalid",
        )
    return level


def _security_context(request: KernelRequest) -> dict[str, Any]:
    """The kernel container's security context: the profile's uid (never the spec's or a
    KERNEL_UID), non-root unless the profile's Pod Security level allows root."""
    config = request.backend_config
    uid = config.get("runAsUser")
    gid = config.get("runAsGroup")
    if uid is None:
        uid, gid = DEFAULT_UID, DEFAULT_UID if gid is None else gid
    if int(uid) == 0 and pod_security_level(request) == "restricted":
        raise SpecError(
            f"Profile {request.profile} runs kernels as root (kubernetes.runAsUser 0), which the "
            "restricted Pod Security Standard forbids; its administrator must choose another uid.",
            reason="PodSecurityViolation",
        )
    context: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsUser": int(uid),
    }
    if int(uid) != 0:
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


# Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
_HOST_NAMESPACES = ("hostNetwork", "hostPID", "hostIPC")


def _containers(pod_spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        c
        for key in ("initContainers", "containers", "ephemeralContainers")
        for c in pod_spec.get(key) or []
        if isinstance(c, dict)
    ]


def enforce_pod_security(pod: dict[str, Any], level: str) -> dict[str, Any]:
    """The final pod made to meet ``level`` of the Pod Security Standards, after every merge.

    What the operator can set without changing what the kernel does is set (no privilege
    escalation, capabilities dropped, non-root, RuntimeDefault seccomp); what it cannot (host
    namespaces, privileged containers, hostPath or other volume types, added capabilities, host
    ports) is refused with every violation named, before anything is created.
    """
    if level == "privileged":
        return pod
    spec = pod["spec"]
    problems: list[str] = []
    problems += [f"spec.{key}" for key in _HOST_NAMESPACES if spec.get(key)]
    volume_types = {
        str(v.get("name")): sorted(k for k in v if k != "name")
        for v in spec.get("volumes") or []
        if isinstance(v, dict)
    }
    for name, kinds in sorted(volume_types.items()):
        if "hostPath" in kinds or (level == "restricted" and not set(kinds) <= RESTRICTED_VOLUMES):
            problems.append(f"volume {name} ({', '.join(kinds)})")
    pod_context = spec.setdefault("securityContext", {})
    for container in _containers(spec):
        name = container.get("name", "?")
        context = container.setdefault("securityContext", {})
        if context.get("privileged"):
            problems.append(f"container {name}: privileged")
        added = (context.get("capabilities") or {}).get("add") or []
        if [c for c in added if level == "restricted" and c != "NET_BIND_SERVICE"] or (
            level == "baseline" and [c for c in added if c in ("SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE", "ALL")]
        ):
            problems.append(f"container {name}: capabilities.add {added}")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            problems.append(f"container {name}: hostPort")
        if level == "restricted":
            uid = context.get("runAsUser", pod_context.get("runAsUser"))
            if uid == 0 or context.get("runAsNonRoot") is False:
                problems.append(f"container {name}: runs as root")
            context["allowPrivilegeEscalation"] = False
            context["capabilities"] = {"drop": ["ALL"], **({"add": added} if added else {})}
            context["runAsNonRoot"] = True
            context.setdefault("seccompProfile", {"type": "RuntimeDefault"})
    if level == "restricted":
        pod_context["runAsNonRoot"] = True
        pod_context.setdefault("seccompProfile", {"type": "RuntimeDefault"})
        if (pod_context.get("seccompProfile") or {}).get("type") == "Unconfined":
            problems.append("spec.securityContext.seccompProfile Unconfined")
    if problems:
        raise SpecError(
            f"The kernel pod would break the {level} Pod Security Standard: {'; '.join(problems)}. "
            "The profile's administrator must remove these, or set kubernetes.podSecurity to a level "
            "that allows them.",
            reason="PodSecurityViolation",
        )
    return pod


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
    working_dir = request.env.get("KERNEL_WORKING_DIR") or config.get("workingDir")
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
        # No token unless the profile says the kernel needs one.
        "automountServiceAccountToken": bool(config.get("automountServiceAccountToken", False)),
        "enableServiceLinks": False,
    }
    service_account = config.get("serviceAccountName")
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
    level = pod_security_level(request)
    if not template:
        return enforce_pod_security(built_pod, level)
    # The template is the base; what the operator builds (identity, command, security) wins.
    merged = deep_merge(template, built_pod)
    template_containers = (template.get("spec") or {}).get("containers") or []
    if template_containers:
        merged["spec"]["containers"] = [
            deep_merge(template_containers[0], container),
            *template_containers[1:],
        ]
    return enforce_pod_security(merged, level)


def is_transient_wait(waiting: Mapping[str, Any]) -> bool:
    """A container the kubelet could not create for a moment and will try again."""
    message = str(waiting.get("message") or "")
    return waiting.get("reason") in TRANSIENT_CREATE_REASONS and any(
        words in message for words in TRANSIENT_CREATE_MESSAGES
    )


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
        if is_transient_wait(waiting):
            continue
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
