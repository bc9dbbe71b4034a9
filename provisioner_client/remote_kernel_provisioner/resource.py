"""Pure builders: the RemoteKernel body and the connection info read back from it."""

from __future__ import annotations

import base64
import os
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any, cast

from jupyter_client.connect import KernelConnectionInfo

GROUP = "kernel-operator.io"
VERSION = "v1alpha1"
PLURAL = "remotekernels"
SIGNAL_ANNOTATION = f"{GROUP}/signal"
CLASS_LABEL = f"{GROUP}/operator-class"  # picks the operator (its RKO_OPERATOR_CLASS)
SERVER_LABEL = f"{GROUP}/jupyter-server"  # the Jupyter server that started the kernel
KERNEL_NAME_LABEL = f"{GROUP}/kernel-name"  # its kernelspec, to start it again by name
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]")


class OwnerConfigError(ValueError):
    """The owner pod is named without its uid."""


class LaunchRefused(PermissionError):
    """The kernel may not be launched for this user (checked again by the operator)."""


def resource_name(kernel_id: str) -> str:
    return f"k-{kernel_id}"


def kernel_env(env: Mapping[str, str], passthrough: Sequence[str]) -> dict[str, str]:
    """The variables that travel to the kernel: KERNEL_* and the ones named in ``passthrough``."""
    chosen = {k: v for k, v in env.items() if k.startswith("KERNEL_") or k in passthrough}
    # The operator sets these from the spec; sending them twice invites disagreement.
    for name in ("KERNEL_ID", "KERNEL_LANGUAGE"):
        chosen.pop(name, None)
    return chosen


def finalizer_name(operator_class: str) -> str:
    """The finalizer the operator of ``operator_class`` keeps on its kernels (its FINALIZER).
    Set at creation, it saves the operator a write on every launch's path."""
    return f"{GROUP}/finalizer" + (f"-{operator_class}" if operator_class else "")


def label_value(text: str) -> str:
    """``text`` made a valid label value (at most 63 of [A-Za-z0-9_.-], alphanumeric ends)."""
    return _LABEL_VALUE.sub("-", text)[:63].strip("-_.")


def server_name_from_env() -> str:
    return os.environ.get("JUPYTER_SERVER_NAME") or socket.gethostname()


def kernel_labels(operator_class: str, server_name: str, kernel_name: str) -> dict[str, str]:
    labels = {}
    if operator_class:
        labels[CLASS_LABEL] = operator_class
    if server_name:
        labels[SERVER_LABEL] = label_value(server_name)
    if kernel_name:
        labels[KERNEL_NAME_LABEL] = label_value(kernel_name)
    return labels


def pod_owner(name: str, uid: str) -> list[dict[str, Any]]:
    """An ownerReference to the Jupyter server's pod, so the kernel goes when the pod goes."""
    if not name:
        return []
    if not uid:
        raise OwnerConfigError(
            f"owner_pod_name={name!r} needs owner_pod_uid (JUPYTER_POD_UID, from the downward API's metadata.uid)."
        )
    return [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid, "blockOwnerDeletion": False}]


def check_user(username: str, authorized: Sequence[str], unauthorized: Sequence[str]) -> None:
    """Fail fast, before anything is created; the operator enforces its own lists too."""
    if username in unauthorized:
        raise LaunchRefused(f"User {username!r} is not allowed to launch kernels (unauthorized_users).")
    if authorized and username not in authorized:
        raise LaunchRefused(f"User {username!r} is not in authorized_users, so may not launch kernels.")


def build_remote_kernel(
    *,
    kernel_id: str,
    username: str,
    language: str,
    env: Mapping[str, str],
    profile: str | None = None,
    backend: str | None = None,
    image: str | None = None,
    executor_image: str | None = None,
    class_name: str | None = None,
    launch_timeout: float | None = None,
    idle_timeout: float | None = None,
    port_range: str | None = None,
    transport_encryption: str | None = None,
    backend_config: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    owner_references: Sequence[Mapping[str, Any]] = (),
    use_pool: bool = True,
    client_public_key: str | None = None,
    finalizer: str | None = None,
) -> dict[str, Any]:
    """The RemoteKernel this provisioner creates for one kernel: only what a tenant may ask for.

    ``backend`` names the block ``backend_config`` goes into (spec.ssh or spec.yarn); the
    profile decides the backend itself, and the operator refuses a block that does not match it.
    """
    spec: dict[str, Any] = {
        "kernelId": kernel_id,
        "username": username,
        "kernel": {"language": "r" if language.lower() == "r" else language.lower()},
        "env": dict(env),
    }
    if profile:
        spec["profile"] = profile
    if class_name:
        spec["kernel"]["className"] = class_name
    if image:
        spec["image"] = image
    if executor_image:
        spec["executorImage"] = executor_image
    if launch_timeout:
        spec["launchTimeoutSeconds"] = int(launch_timeout)
    if idle_timeout:
        spec["idleTimeoutSeconds"] = int(idle_timeout)
    if port_range:
        spec["portRange"] = port_range
    if transport_encryption:
        spec["transportEncryption"] = transport_encryption
    if not use_pool:
        spec["usePool"] = False
    if client_public_key:
        spec["clientPublicKey"] = client_public_key
    for block, fields in (backend_config or {}).items():
        spec[block] = dict(fields)
    metadata: dict[str, Any] = {
        "name": resource_name(kernel_id),
        "labels": {"kernel-operator.io/kernel-id": kernel_id, **(labels or {})},
    }
    if owner_references:
        metadata["ownerReferences"] = [dict(o) for o in owner_references]
    if finalizer:
        metadata["finalizers"] = [finalizer]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RemoteKernel", "metadata": metadata, "spec": spec}


def connection_info(status: Mapping[str, Any], secret_data: Mapping[str, str]) -> KernelConnectionInfo:
    """jupyter_client connection info from the resource's status and its Secret's data."""
    conn = status["connection"]

    def secret(name: str) -> bytes:
        return base64.b64decode(secret_data[name])

    info: dict[str, Any] = {
        "ip": conn["ip"],
        "transport": conn.get("transport", "tcp"),
        "signature_scheme": conn.get("signatureScheme", "hmac-sha256"),
        "kernel_name": conn.get("kernelName", ""),
        "shell_port": conn["shellPort"],
        "iopub_port": conn["iopubPort"],
        "stdin_port": conn["stdinPort"],
        "control_port": conn["controlPort"],
        "hb_port": conn["hbPort"],
        "key": secret(conn.get("secretRef", {}).get("key", "key")),
    }
    if "curve-publickey" in secret_data:
        info["curve_publickey"] = secret("curve-publickey").decode("ascii")
        info["curve_secretkey"] = secret("curve-secretkey").decode("ascii")
    # KernelManager compares this with its own get_connection_info(): the key as bytes, the
    # Curve keys as Z85 text. KernelConnectionInfo types the key as str, hence the cast.
    return cast(KernelConnectionInfo, info)
