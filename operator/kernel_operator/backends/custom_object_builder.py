"""Pure builders for the customResource and sparkApplication backends, and their state mapping.

A custom object is built from data: the spec's template is a parsed object, and the kernel's
values are put into its string leaves (``${KERNEL_ID}``…), never into text that is then parsed.
A list item that is exactly ``${LAUNCHER_ARGS}`` becomes the launcher's arguments. No I/O.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import SpecError
from ..launch_command import LAUNCHER_MODULE
from ..spec import KernelRequest
from .base import BackendStatus
from .pod_builder import TOKEN_KEY, deep_merge, labels, pod_name, token_secret_name

SPARK_GROUP = "sparkoperator.k8s.io"
SPARK_VERSION = "v1beta2"
SPARK_PLURAL = "sparkapplications"
# spark-operator's labels on the driver pod it creates (its documented contract).
SPARK_APP_LABEL = "sparkoperator.k8s.io/app-name"
SPARK_ROLE_LABEL = "spark-role"
# In Spark's driver pod the kubelet sets this from status.podIP; the launcher binds it.
SPARK_POD_IP_REF = "$(SPARK_DRIVER_BIND_ADDRESS)"
# The launcher as a Spark application's main file, inside the kernel image.
SPARK_MAIN_FILE = "local:///usr/local/lib/rko/spark_driver.py"
LAUNCHER_ARGS = "${LAUNCHER_ARGS}"
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# Spark states (spark-operator's ApplicationStateType) and what they mean for the kernel.
SPARK_STARTING = {"", "NEW", "SUBMITTED", "PENDING_RERUN", "INVALIDATING"}
SPARK_RUNNING = {"RUNNING"}
SPARK_SUCCEEDED = {"COMPLETED", "SUCCEEDING"}
SPARK_FAILED = {"FAILED", "SUBMISSION_FAILED", "FAILING", "UNKNOWN"}


def object_name(request: KernelRequest) -> str:
    return pod_name(request)


def token_env(request: KernelRequest) -> dict[str, Any]:
    """The launch token as an env var read from the kernel's token Secret (never a value)."""
    return {
        "name": "RKO_LAUNCH_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": token_secret_name(request), "key": TOKEN_KEY}},
    }


def substitute(template: Any, values: Mapping[str, str], args: Sequence[str]) -> Any:
    """``template`` with ``${NAME}`` replaced in its string leaves. Unknown names are errors."""
    if isinstance(template, Mapping):
        return {key: substitute(value, values, args) for key, value in template.items()}
    if isinstance(template, list):
        out: list[Any] = []
        for item in template:
            if item == LAUNCHER_ARGS:
                out.extend(args)
            else:
                out.append(substitute(item, values, args))
        return out
    if isinstance(template, str):

        def value_of(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in values:
                raise SpecError(
                    f"customResource.template names ${{{name}}}, which the operator does not provide; "
                    f"it provides {', '.join('${' + n + '}' for n in sorted(values))} and ${{LAUNCHER_ARGS}} "
                    "(as a whole list item).",
                    reason="InvalidTemplate",
                )
            return values[name]

        return _PLACEHOLDER.sub(value_of, template)
    return copy.deepcopy(template)


def template_values(request: KernelRequest, image: str, namespace: str) -> dict[str, str]:
    return {
        "KERNEL_ID": request.kernel_id,
        "KERNEL_USERNAME": request.username,
        "KERNEL_NAMESPACE": namespace,
        "KERNEL_NAME": object_name(request),
        "KERNEL_IMAGE": image,
        "KERNEL_TOKEN_SECRET": token_secret_name(request),
        "KERNEL_TOKEN_KEY": TOKEN_KEY,
        "LAUNCHER_MODULE": LAUNCHER_MODULE,
    }


def _metadata(
    request: KernelRequest, namespace: str, owner: Mapping[str, Any] | None, extra_labels: Mapping[str, Any]
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": object_name(request),
        "namespace": namespace,
        "labels": {**{str(k): str(v) for k, v in extra_labels.items()}, **labels(request)},
    }
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    return metadata


def custom_object_kind(config: Mapping[str, Any]) -> tuple[str, str, str]:
    """group, version and plural of a customResource spec, checked."""
    group, version, plural = (str(config.get(k) or "") for k in ("group", "version", "plural"))
    for field, value in (("group", group), ("plural", plural)):
        if not _NAME.match(value):
            raise SpecError(
                f"spec.customResource.{field} {value!r} is not a valid name.", reason="InvalidSpec"
            )
    if not re.match(r"^v[0-9]+((alpha|beta)[0-9]+)?$", version):
        raise SpecError(
            f"spec.customResource.version {version!r} is not an API version.", reason="InvalidSpec"
        )
    if group in ("", "core", "apps", "batch", "rbac.authorization.k8s.io", "kernel-operator.io"):
        raise SpecError(
            f"spec.customResource.group {group!r} is not another operator's custom resource; use the "
            "kubernetes backend for pods.",
            reason="InvalidSpec",
        )
    return group, version, plural


def build_custom_object(
    request: KernelRequest,
    launcher_args: Sequence[str],
    image: str,
    namespace: str,
    owner: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The custom object for a customResource kernel: its template with the kernel's values."""
    config = request.backend_config
    group, version, _ = custom_object_kind(config)
    kind = str(config.get("kind") or "")
    template = config.get("template")
    if not kind or not isinstance(template, Mapping) or not template:
        raise SpecError(
            "spec.customResource needs kind and a template (the object's fields, e.g. its spec).",
            reason="InvalidTemplate",
        )
    args = [*launcher_args]
    body = substitute(
        {k: v for k, v in template.items() if k not in ("apiVersion", "kind", "metadata", "status")},
        template_values(request, image, namespace),
        args,
    )
    template_labels = ((template.get("metadata") or {}).get("labels")) or {}
    body.update(
        apiVersion=f"{group}/{version}",
        kind=kind,
        metadata=_metadata(request, namespace, owner, template_labels),
    )
    return dict(body)


def pod_selector(request: KernelRequest) -> str:
    """Labels that find the kernel's pod among what the other operator created."""
    if request.backend == "sparkApplication":
        return f"{SPARK_APP_LABEL}={object_name(request)},{SPARK_ROLE_LABEL}=driver"
    selector = request.backend_config.get("podSelector") or {
        "kernel-operator.io/kernel-id": request.kernel_id
    }
    values = template_values(request, request.image or "", request.namespace)
    return ",".join(f"{k}={substitute(str(v), values, [])}" for k, v in sorted(selector.items()))


def _spark_memory(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    if not re.match(r"^[0-9]+[kmgt]?$", value):
        raise SpecError(
            f"{field} {value!r} is not a Spark memory size such as 512m or 2g.", reason="InvalidMemory"
        )
    return value


def build_spark_application(
    request: KernelRequest,
    launcher_args: Sequence[str],
    image: str,
    namespace: str,
    owner: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A SparkApplication (spark-operator v1beta2) whose driver is the kernel launcher."""
    config = request.backend_config
    # The spec's images are already checked against the profile's allow-list.
    driver_image = str(request.image or config.get("driverImage") or image)
    executor_image = str(request.executor_image or config.get("executorImage") or driver_image)
    driver = dict(config.get("driver") or {})
    executor = dict(config.get("executor") or {})
    env = [{"name": k, "value": v} for k, v in sorted(request.env.items())]
    env.append(token_env(request))
    kernel_labels = labels(request)
    spark_conf = {str(k): str(v) for k, v in (config.get("sparkConf") or {}).items()}
    for key in spark_conf:
        if key.startswith(("spark.kubernetes.driver.pod", "spark.kubernetes.authenticate")):
            raise SpecError(f"sparkApplication.sparkConf may not set {key}.", reason="InvalidSparkOptions")
    driver_spec: dict[str, Any] = {
        "cores": int(driver.get("cores") or 1),
        "memory": _spark_memory(
            driver.get("memory") or request.env.get("KERNEL_DRIVER_MEMORY"), "driver.memory"
        )
        or "512m",
        "labels": kernel_labels,
        "env": env,
        "image": driver_image,
    }
    service_account = config.get("serviceAccount")  # the profile's, never KERNEL_SERVICE_ACCOUNT_NAME
    if service_account:
        driver_spec["serviceAccount"] = str(service_account)
    executor_spec: dict[str, Any] = {
        "instances": int(executor.get("instances", 1)),
        "cores": int(executor.get("cores") or 1),
        "memory": _spark_memory(
            executor.get("memory") or request.env.get("KERNEL_EXECUTOR_MEMORY"), "executor.memory"
        )
        or "512m",
        "labels": kernel_labels,
        "image": executor_image,
    }
    app: dict[str, Any] = {
        "apiVersion": f"{SPARK_GROUP}/{SPARK_VERSION}",
        "kind": "SparkApplication",
        "metadata": _metadata(request, namespace, owner, {}),
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": driver_image,
            "imagePullPolicy": "IfNotPresent",
            "mainApplicationFile": str(config.get("mainApplicationFile") or SPARK_MAIN_FILE),
            "arguments": [*launcher_args, "--spark-context-initialization-mode", "lazy"],
            "sparkVersion": str(config.get("sparkVersion") or "3.5.3"),
            "sparkConf": spark_conf,
            # A kernel is not re-run: a second driver would be a new kernel nobody is connected to.
            "restartPolicy": {"type": "Never"},
            "driver": driver_spec,
            "executor": executor_spec,
        },
    }
    extra = config.get("template") or {}
    if extra:
        # A partial SparkApplication under what the operator builds (which wins).
        return deep_merge(extra, app)
    return app


def spark_application_state(app: Mapping[str, Any] | None) -> BackendStatus:
    """A SparkApplication's applicationState as the kernel's state."""
    if app is None:
        return BackendStatus("gone", "ApplicationDeleted", "The kernel's SparkApplication was deleted.")
    name = (app.get("metadata") or {}).get("name", "?")
    state_info = (app.get("status") or {}).get("applicationState") or {}
    state = str(state_info.get("state") or "")
    message = str(state_info.get("errorMessage") or "").strip()
    if state in SPARK_STARTING:
        return BackendStatus("starting")
    if state in SPARK_RUNNING:
        return BackendStatus("running")
    if state in SPARK_SUCCEEDED:
        return BackendStatus("succeeded", "ApplicationCompleted", f"SparkApplication {name} completed.", 0)
    reason = "SubmissionFailed" if state == "SUBMISSION_FAILED" else "ApplicationFailed"
    return BackendStatus("failed", reason, f"SparkApplication {name} is {state}: {message or 'no message'}")


def custom_object_state(obj: Mapping[str, Any] | None) -> BackendStatus:
    """What a generic custom object's own status says: only 'gone' or 'failed' are decided here;
    otherwise the kernel's pod decides."""
    if obj is None:
        return BackendStatus("gone", "ObjectDeleted", "The kernel's custom object was deleted.")
    name = (obj.get("metadata") or {}).get("name", "?")
    status = obj.get("status") or {}
    for field in ("phase", "state", "applicationState"):
        value = status.get(field)
        if isinstance(value, Mapping):  # e.g. SparkApplication-like {"state": ...}
            value = value.get("state")
        if str(value or "").upper() in ("FAILED", "ERROR", "SUBMISSION_FAILED"):
            detail = status.get("message") or status.get("reason") or value
            return BackendStatus(
                "failed", "ObjectFailed", f"The kernel's custom object {name} is {value}: {detail}"
            )
    for condition in status.get("conditions") or []:
        if condition.get("type") in ("Failed", "Error") and condition.get("status") == "True":
            detail = condition.get("message") or condition.get("reason") or ""
            return BackendStatus(
                "failed", "ObjectFailed", f"The kernel's custom object {name} failed: {detail}"
            )
    return BackendStatus("starting")


def combined_state(owner: BackendStatus, pods: Sequence[BackendStatus]) -> BackendStatus:
    """The custom object's verdict first (it fails early and says why), then its kernel pod's."""
    if owner.state in ("gone", "failed", "succeeded"):
        return owner
    if not pods:
        return owner if owner.state != "running" else BackendStatus("starting")
    return pods[0]
