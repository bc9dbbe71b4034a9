"""A small controller that does for SparkApplications what the Kubeflow spark-operator documents.

Why not the real one: spark-operator submits each application by running ``spark-submit``
(a JVM and a Spark distribution beside the controller), whose Kubernetes client then creates
the driver pod from a Spark image; our kernel image has Python, not Spark's JVM entrypoint.
What the operator under test relies on is spark-operator's documented contract, which this
follows (docs "API Specification" and "Quick Start Guide", v1beta2):

- A new SparkApplication (no ``status.applicationState``) is submitted: a driver pod named
  ``<app>-driver`` is created with the labels ``spark-role=driver``,
  ``sparkoperator.k8s.io/app-name=<app>``, ``sparkoperator.k8s.io/launched-by-spark-operator=true``
  and ``sparkoperator.k8s.io/submission-id``, plus ``spec.driver.labels``; it is owned by the
  SparkApplication; its image is ``spec.driver.image`` or ``spec.image``, its service account
  ``spec.driver.serviceAccount``, its env ``spec.driver.env`` plus Spark's
  ``SPARK_DRIVER_BIND_ADDRESS`` (the pod IP) and ``SPARK_APPLICATION_ID``. The state becomes
  ``SUBMITTED`` with ``driverInfo.podName``; if the pod cannot be created the state is
  ``SUBMISSION_FAILED`` with ``errorMessage`` (as when spark-submit fails).
- The driver pod's phase drives the state: Running -> ``RUNNING``; Succeeded -> ``COMPLETED``;
  Failed -> ``FAILED`` with the container's exit code in ``errorMessage``; a missing driver pod
  -> ``FAILED``. ``restartPolicy: Never`` is the only policy followed.
- Deleting the SparkApplication removes the driver pod (owner reference, garbage collection).

Where Spark's entrypoint would run ``spark-submit --deploy-mode client`` on the main file, the
driver container runs ``python <mainApplicationFile> <arguments>`` directly; no executors are
started (there is no Spark in the kernel image).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import time
import uuid
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

GROUP, VERSION, PLURAL = "sparkoperator.k8s.io", "v1beta2", "sparkapplications"
log = logging.getLogger("spark-operator-stand-in")


def _memory(spark: str | None) -> str | None:
    """Spark's 512m / 2g as a Kubernetes quantity."""
    if not spark:
        return None
    units = {"k": "Ki", "m": "Mi", "g": "Gi", "t": "Ti"}
    return spark[:-1] + units[spark[-1]] if spark[-1] in units else spark


def driver_pod(app: dict[str, Any]) -> dict[str, Any]:
    """The driver pod spark-operator would have Spark create for ``app``."""
    meta, spec = app["metadata"], app["spec"]
    driver = spec.get("driver") or {}
    name = meta["name"]
    main_file = str(spec["mainApplicationFile"]).removeprefix("local://")
    env = [
        *(driver.get("env") or []),
        {"name": "SPARK_DRIVER_BIND_ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "SPARK_APPLICATION_ID", "value": f"spark-{meta['uid'].replace('-', '')}"},
    ]
    container: dict[str, Any] = {
        "name": "spark-kubernetes-driver",
        "image": driver.get("image") or spec["image"],
        "imagePullPolicy": spec.get("imagePullPolicy", "IfNotPresent"),
        "command": ["python", main_file],
        "args": [str(a) for a in spec.get("arguments") or []],
        "env": env,
    }
    requests = {"cpu": str(driver.get("cores") or 1)}
    if _memory(driver.get("memory")):
        requests["memory"] = str(_memory(driver.get("memory")))
    container["resources"] = {"requests": requests}
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if driver.get("serviceAccount"):
        pod_spec["serviceAccountName"] = driver["serviceAccount"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-driver",
            "namespace": meta["namespace"],
            "labels": {
                **(driver.get("labels") or {}),
                "spark-role": "driver",
                "sparkoperator.k8s.io/app-name": name,
                "sparkoperator.k8s.io/launched-by-spark-operator": "true",
                "sparkoperator.k8s.io/submission-id": str(uuid.uuid4()),
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "SparkApplication",
                    "name": name,
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }


def driver_state(pod: Any) -> tuple[str, str]:
    """applicationState (state, errorMessage) from the driver pod (None: it is gone)."""
    if pod is None:
        return "FAILED", "driver pod not found"
    phase = pod.status.phase if pod.status else "Pending"
    if phase == "Running":
        return "RUNNING", ""
    if phase == "Succeeded":
        return "COMPLETED", ""
    if phase == "Failed":
        for status in pod.status.container_statuses or []:
            terminated = status.state.terminated if status.state else None
            if terminated is not None:
                return "FAILED", (
                    f"driver container failed with ExitCode: {terminated.exit_code}, Reason: {terminated.reason}"
                )
        return "FAILED", f"driver pod failed: {pod.status.reason or ''} {pod.status.message or ''}".strip()
    return "SUBMITTED", ""


class Controller:
    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def set_state(self, app: dict[str, Any], state: str, message: str = "", **extra: Any) -> None:
        meta = app["metadata"]
        current = (app.get("status") or {}).get("applicationState") or {}
        if current.get("state") == state and current.get("errorMessage", "") == message and not extra:
            return
        status = {"applicationState": {"state": state, "errorMessage": message}, **extra}
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": status}
        )
        log.info("SparkApplication %s/%s is %s %s", meta["namespace"], meta["name"], state, message)

    def submit(self, app: dict[str, Any]) -> None:
        pod = driver_pod(app)
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            self.core.create_namespaced_pod(app["metadata"]["namespace"], pod)
        except ApiException as err:
            detail = err.body or err.reason
            message = f"failed to run spark-submit for SparkApplication {app['metadata']['namespace']}/{app['metadata']['name']}: {detail}"
            self.set_state(
                app, "SUBMISSION_FAILED", message, submissionAttempts=1, lastSubmissionAttemptTime=now
            )
            return
        self.set_state(
            app,
            "SUBMITTED",
            driverInfo={"podName": pod["metadata"]["name"]},
            submissionAttempts=1,
            lastSubmissionAttemptTime=now,
        )

    def follow(self, app: dict[str, Any]) -> None:
        meta = app["metadata"]
        try:
            pod = self.core.read_namespaced_pod(f"{meta['name']}-driver", meta["namespace"])
        except ApiException as err:
            if err.status != 404:
                raise
            pod = None
        state, message = driver_state(pod)
        self.set_state(app, state, message)

    def reconcile_all(self) -> None:
        for app in self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]:
            if app["metadata"].get("deletionTimestamp"):
                continue
            state = ((app.get("status") or {}).get("applicationState") or {}).get("state", "")
            try:
                if not state:
                    self.submit(app)
                elif state in ("SUBMITTED", "RUNNING"):
                    self.follow(app)
            except ApiException as err:
                if err.status != 404:  # deleted meanwhile
                    log.warning("Reconciling %s failed: %s", app["metadata"]["name"], err.reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.spark_operator")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--interval", type=float, default=0.3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    controller = Controller(config.new_client_from_config(config_file=args.kubeconfig))
    log.info("Watching SparkApplications.")
    while True:
        try:
            controller.reconcile_all()
        except ApiException as err:
            log.warning("Listing SparkApplications failed: %s", err.reason)
        except (urllib3.exceptions.HTTPError, OSError) as err:  # the API server restarting
            log.warning("The API server cannot be reached: %s", err)
        time.sleep(args.interval)
