"""The dockerSwarm backend: kernels as one-replica Swarm services on the suite's engine."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import docker
import pytest
from kubernetes import client

from localcluster.docker import DockerEngine
from localcluster.servers import OperatorProcess
from tests.helpers import wait_for

from .test_operator_ssh import (
    _reply_to,
    make_kernel,
    ready_client,
    start_remote_kernel,
    wait_phase,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_kernel_leftovers")]
LABEL = "kernel-operator.io/kernel-id"


def kernel_services(engine: DockerEngine, kernel_id: str) -> list[Any]:
    return docker.DockerClient(base_url=engine.host).services.list(filters={"label": f"{LABEL}={kernel_id}"})


def kernel_containers(engine: DockerEngine, kernel_id: str) -> list[Any]:
    return docker.DockerClient(base_url=engine.host).containers.list(
        ignore_removed=True, all=True, filters={"label": f"{LABEL}={kernel_id}"}
    )


async def test_a_jupyter_client_uses_a_swarm_kernel(
    operator: OperatorProcess,
    swarm: DockerEngine,
    kernel_image: str,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    km = await start_remote_kernel(
        tmp_path, kubeconfig, namespace, monkeypatch, backend="dockerSwarm", image_name=kernel_image
    )
    kernel_id = str(km.kernel_id)
    [service] = kernel_services(swarm, kernel_id)
    spec = service.attrs["Spec"]["TaskTemplate"]
    assert spec["RestartPolicy"]["Condition"] == "none"
    env_names = {e.split("=", 1)[0] for e in spec["ContainerSpec"]["Env"]}
    assert not {"KUBECONFIG", "RKO_DOCKER_HOST", "RKO_LAUNCH_TOKEN"} & env_names
    # The token is a Swarm secret of this kernel's, mounted for the kernel's user only.
    [secret_ref] = spec["ContainerSpec"]["Secrets"]
    assert secret_ref["File"] == {"Name": "rko-launch-token", "UID": "1000", "GID": "1000", "Mode": 0o400}
    assert spec["ContainerSpec"]["User"] == "1000:1000"
    engine = docker.DockerClient(base_url=swarm.host)
    assert [s.name for s in engine.secrets.list(filters={"name": secret_ref["SecretName"]})]
    async with ready_client(km) as kc:
        outputs: list[str] = []
        reply = await kc.execute_interactive(
            "import sys; print(sys.prefix)",
            output_hook=lambda m: outputs.append(m["content"].get("text", "")),
            timeout=30,
        )
        assert reply["content"]["status"] == "ok" and "".join(outputs).strip() == "/opt/kernel"
        msg_id = kc.execute("import time; time.sleep(60)")
        await asyncio.sleep(1)
        await km.interrupt_kernel()
        assert (await _reply_to(kc, msg_id, timeout=10))["content"]["ename"] == "KeyboardInterrupt"
    await km.restart_kernel()
    async with ready_client(km) as kc:
        assert (await kc.execute_interactive("2 + 2", timeout=30))["content"]["status"] == "ok"
    await km.shutdown_kernel()
    assert not kernel_services(swarm, kernel_id)
    assert not engine.secrets.list(filters={"label": "kernel-operator.io/uid"})  # removed with them
    wait_for(
        lambda: not kernel_containers(swarm, kernel_id), timeout=30, what="the service's containers to go"
    )


def test_a_swarm_image_that_is_not_present_fails_at_once(
    operator: OperatorProcess, swarm: DockerEngine, custom: client.CustomObjectsApi, namespace: str
) -> None:
    name, kernel_id = make_kernel(
        namespace, custom, backend="dockerSwarm", image="no-such-image:1", launchTimeoutSeconds=120
    )
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=20)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "ImageNotFound", status
    assert not kernel_services(swarm, kernel_id)


def test_a_service_removed_behind_the_operators_back_fails_the_kernel(
    operator: OperatorProcess,
    swarm: DockerEngine,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    name, kernel_id = make_kernel(namespace, custom, backend="dockerSwarm", image=kernel_image)
    wait_phase(custom, namespace, name, "Running", timeout=60)
    kernel_services(swarm, kernel_id)[0].remove()
    started = time.monotonic()
    status = wait_phase(custom, namespace, name, "Failed", "Succeeded", timeout=20)["status"]
    assert status["phase"] == "Failed", status
    assert time.monotonic() - started < 5
    wait_for(
        lambda: not kernel_containers(swarm, kernel_id), timeout=30, what="the service's containers to go"
    )


def test_a_restarted_operator_keeps_its_swarm_kernels_and_cleans_them_up(
    operator: OperatorProcess,
    swarm: DockerEngine,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    name, kernel_id = make_kernel(namespace, custom, backend="dockerSwarm", image=kernel_image)
    wait_phase(custom, namespace, name, "Running", timeout=60)
    operator.stop()
    operator.start()
    time.sleep(2)
    assert wait_phase(custom, namespace, name, "Running", "Failed")["status"]["phase"] == "Running"
    custom.delete_namespaced_custom_object("kernel-operator.io", "v1alpha1", namespace, "remotekernels", name)
    wait_for(lambda: not kernel_services(swarm, kernel_id), timeout=30, what="the service to be removed")


def test_a_swarm_task_that_fails_fails_the_kernel(
    operator: OperatorProcess,
    swarm: DockerEngine,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    name, _ = make_kernel(
        namespace,
        custom,
        backend="dockerSwarm",
        image=kernel_image,
        kernel={"className": "no.such.Kernel"},
        launchTimeoutSeconds=120,
    )
    started = time.monotonic()
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=60)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "TaskFailed", status
    assert "exit code 3" in status["message"]
    assert time.monotonic() - started < 30
