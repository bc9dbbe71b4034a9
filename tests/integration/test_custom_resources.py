"""The sparkApplication and customResource backends on the local control plane.

spark-operator is stood in for by tests/spark_operator (why: see its controller's docstring):
it turns SparkApplications into driver pods, which the real kubelet runs in our kernel image, so
the kernel really starts. The generic customResource backend is shown with the same kind, as
the seed's CustomResourceProvisioner was used: a SparkApplication written as a template.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jupyter_client import AsyncKernelManager
from kubernetes import client
from kubernetes.client.rest import ApiException

from localcluster import LocalCluster
from localcluster.servers import OperatorProcess
from tests.helpers import wait_for
from tests.spark_operator import CRD, controller_command

from .test_operator_ssh import (
    delete_and_wait_gone,
    get,
    make_kernel,
    ready_client,
    start_remote_kernel,
    wait_phase,
)

SPARK = ("sparkoperator.k8s.io", "v1beta2", "sparkapplications")
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def spark_operator(
    local_cluster: LocalCluster, api_client: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    extensions = client.ApiextensionsV1Api(api_client)
    try:
        extensions.create_custom_resource_definition(yaml.safe_load(CRD.read_text()))
    except ApiException as err:
        assert err.status == 409, err
    custom = client.CustomObjectsApi(api_client)

    def served() -> bool:
        try:
            custom.list_cluster_custom_object(*SPARK)
        except ApiException:
            return False
        return True

    wait_for(served, what="the SparkApplication CRD to be served")
    log_path = tmp_path_factory.mktemp("spark-operator") / "controller.log"
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        controller_command(local_cluster.admin_kubeconfig),
        cwd=Path(__file__).resolve().parents[2],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    yield
    proc.terminate()
    proc.wait(20)


def spark_apps(custom: client.CustomObjectsApi, namespace: str) -> list[dict[str, Any]]:
    return list(custom.list_namespaced_custom_object(SPARK[0], SPARK[1], namespace, SPARK[2])["items"])


def driver_pods(api_client: client.ApiClient, namespace: str) -> list[Any]:
    return list(
        client.CoreV1Api(api_client).list_namespaced_pod(namespace, label_selector="spark-role=driver").items
    )


def spark_template(kernel_image: str) -> dict[str, Any]:
    """A SparkApplication as a customResource template: data with ${...} in its string leaves."""
    return {
        "metadata": {"labels": {"team": "analytics"}},
        "spec": {
            "type": "Python",
            "mode": "cluster",
            "pythonVersion": "3",
            "sparkVersion": "3.5.3",
            "image": "${KERNEL_IMAGE}",
            "mainApplicationFile": "local:///usr/local/lib/rko/spark_driver.py",
            "arguments": ["${LAUNCHER_ARGS}"],
            "restartPolicy": {"type": "Never"},
            "driver": {
                "cores": 1,
                "memory": "512m",
                "labels": {"kernel-operator.io/kernel-id": "${KERNEL_ID}"},
                "env": [
                    {"name": "KERNEL_ID", "value": "${KERNEL_ID}"},
                    {"name": "KERNEL_USERNAME", "value": "${KERNEL_USERNAME}"},
                    {
                        "name": "RKO_LAUNCH_TOKEN",
                        "valueFrom": {
                            "secretKeyRef": {"name": "${KERNEL_TOKEN_SECRET}", "key": "${KERNEL_TOKEN_KEY}"}
                        },
                    },
                    {"name": "KERNEL_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                ],
            },
            "executor": {"instances": 1, "cores": 1, "memory": "512m"},
        },
    }


@pytest.mark.parametrize("backend", ["sparkApplication", "customResource"])
async def test_code_runs_in_a_kernel_launched_through_a_custom_object(
    backend: str,
    operator: OperatorProcess,
    kube_node: str,
    spark_operator: None,
    kernel_image: str,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config: dict[str, Any] = {}
    if backend == "customResource":
        config = {
            "group": SPARK[0],
            "version": SPARK[1],
            "plural": SPARK[2],
            "kind": "SparkApplication",
            "podSelector": {"sparkoperator.k8s.io/app-name": "${KERNEL_NAME}", "spark-role": "driver"},
            "template": spark_template(kernel_image),
        }
    started = time.monotonic()
    km: AsyncKernelManager = await start_remote_kernel(
        tmp_path,
        kubeconfig,
        namespace,
        monkeypatch,
        backend=backend,
        image_name=kernel_image,
        launch_timeout=90,
        backend_config=config,
    )
    kernel_id = str(km.kernel_id)
    async with ready_client(km) as kc:
        print(f"{backend} kernel ready in {time.monotonic() - started:.2f} s")
        outputs: list[str] = []
        reply = await kc.execute_interactive(
            "import os; print(os.environ['KERNEL_ID'], os.environ['KERNEL_USERNAME'])",
            output_hook=lambda m: outputs.append(m["content"].get("text", "")),
            timeout=30,
        )
        assert reply["content"]["status"] == "ok"
        assert "".join(outputs).split() == [kernel_id, "alice"]
    [app] = spark_apps(custom, namespace)
    assert app["metadata"]["labels"]["kernel-operator.io/kernel-id"] == kernel_id
    assert app["metadata"]["ownerReferences"][0]["kind"] == "RemoteKernel"
    assert app["status"]["applicationState"]["state"] == "RUNNING"
    [pod] = driver_pods(api_client, namespace)
    assert pod.metadata.labels["sparkoperator.k8s.io/app-name"] == app["metadata"]["name"]
    [token] = [e for e in app["spec"]["driver"]["env"] if e["name"] == "RKO_LAUNCH_TOKEN"]
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"].endswith("-launch")
    if backend == "customResource":
        assert app["metadata"]["labels"]["team"] == "analytics"
    await km.shutdown_kernel()
    wait_for(lambda: not spark_apps(custom, namespace), timeout=30, what="the SparkApplication to be deleted")
    wait_for(lambda: not driver_pods(api_client, namespace), timeout=60, what="the driver pod to be deleted")


def test_a_spark_application_that_fails_submission_fails_the_kernel_within_seconds(
    operator: OperatorProcess,
    kube_node: str,
    spark_operator: None,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    started = time.monotonic()
    name, _ = make_kernel(
        namespace,
        custom,
        backend="sparkApplication",
        image=kernel_image,
        launchTimeoutSeconds=300,
        sparkApplication={"serviceAccount": "no-such-account"},
    )
    failed = wait_phase(custom, namespace, name, "Failed", "Running", timeout=60)
    seconds = time.monotonic() - started
    status = failed["status"]
    print(f"Failed in {seconds:.1f} s: {status['message'][:300]}")
    assert status["phase"] == "Failed" and status["reason"] == "SubmissionFailed", status
    assert "SUBMISSION_FAILED" in status["message"] and "no-such-account" in status["message"]
    assert seconds < 20
    delete_and_wait_gone(custom, namespace, name)
    assert not spark_apps(custom, namespace)


def test_deleting_the_remote_kernel_removes_its_custom_object_and_pods(
    operator: OperatorProcess,
    kube_node: str,
    spark_operator: None,
    kernel_image: str,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    name, _ = make_kernel(
        namespace, custom, backend="sparkApplication", image=kernel_image, launchTimeoutSeconds=90
    )
    running = wait_phase(custom, namespace, name, "Running", "Failed", timeout=90)
    assert running["status"]["phase"] == "Running", running["status"]
    assert spark_apps(custom, namespace) and driver_pods(api_client, namespace)
    delete_and_wait_gone(custom, namespace, name)
    assert get(custom, namespace, name) is None
    assert not spark_apps(custom, namespace)
    wait_for(lambda: not driver_pods(api_client, namespace), timeout=60, what="the driver pod to be deleted")
    secrets = client.CoreV1Api(api_client).list_namespaced_secret(namespace).items
    assert not [s.metadata.name for s in secrets if s.metadata.name.startswith("k-")]


@pytest.mark.parametrize(
    ("backend", "config", "reason", "words"),
    [
        (
            "customResource",
            {
                "group": "apps",
                "version": "v1",
                "plural": "deployments",
                "kind": "Deployment",
                "template": {"spec": {}},
            },
            "InvalidSpec",
            "kubernetes backend",
        ),
        (
            "customResource",
            {
                "group": SPARK[0],
                "version": SPARK[1],
                "plural": SPARK[2],
                "kind": "SparkApplication",
                "template": {"spec": {"image": "${NOPE}"}},
            },
            "InvalidTemplate",
            "${NOPE}",
        ),
        (
            "customResource",
            {
                "group": "example.com",
                "version": "v1",
                "plural": "widgets",
                "kind": "Widget",
                "template": {"spec": {"a": 1}},
            },
            "ObjectRejected",
            "CRD installed",
        ),
        ("sparkApplication", {"driver": {"memory": "lots"}}, "InvalidMemory", "lots"),
    ],
)
def test_bad_custom_object_requests_fail_with_a_reason(
    operator: OperatorProcess,
    spark_operator: None,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
    backend: str,
    config: dict[str, Any],
    reason: str,
    words: str,
) -> None:
    name, _ = make_kernel(namespace, custom, backend=backend, image=kernel_image, **{backend: config})
    failed = wait_phase(custom, namespace, name, "Failed", timeout=20)
    assert failed["status"]["reason"] == reason and words in failed["status"]["message"], failed["status"]
    delete_and_wait_gone(custom, namespace, name)


async def test_a_kernel_starts_from_the_migrated_spark_operator_kernelspec(
    gp_kernelspecs: Path,
    operator: OperatorProcess,
    kube_node: str,
    spark_operator: None,
    node_images: Callable[[str], str],
    kernel_image: str,
    custom: client.CustomObjectsApi,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gateway_provisioners' `jupyter-k8s-spec --spark --crd` kernelspec, migrated: a SparkApplication."""
    from .test_migrate import PYTHON_CODE, apply_migrated, run_migrated

    node_images(kernel_image)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    profiles = apply_migrated(gp_kernelspecs, tmp_path, custom, namespace, monkeypatch)
    crd = next(p for p in profiles if p["metadata"]["name"] == "gp-k8s-spark-crd")["spec"]
    assert crd["backend"] == "sparkApplication" and crd["sparkApplication"]["driverImage"] == kernel_image
    assert await run_migrated("gp_k8s_spark_crd", PYTHON_CODE, custom, namespace, ready=120) == "42 alice"
