"""The docker backend on Debian's dockerd: kernels in containers with host networking."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import docker
import pytest
from kubernetes import client

from kernel_operator import UID_LABEL
from localcluster.docker import DockerEngine
from localcluster.servers import OperatorProcess
from tests.helpers import wait_for

from .test_faults import settle
from .test_operator_ssh import (
    GROUP,
    PLURAL,
    VERSION,
    _reply_to,
    delete_and_wait_gone,
    get,
    make_kernel,
    ready_client,
    start_remote_kernel,
    wait_phase,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_kernel_leftovers")]
LABEL = "kernel-operator.io/kernel-id"


def kernel_containers(engine: DockerEngine, kernel_id: str | None = None) -> list[Any]:
    selector = f"{LABEL}={kernel_id}" if kernel_id else LABEL
    return docker.DockerClient(base_url=engine.host).containers.list(
        ignore_removed=True, all=True, filters={"label": selector}
    )


async def test_a_jupyter_client_runs_interrupts_restarts_and_shuts_down_a_docker_kernel(
    operator: OperatorProcess,
    docker_engine: DockerEngine,
    kernel_image: str,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    km = await start_remote_kernel(
        tmp_path, kubeconfig, namespace, monkeypatch, backend="docker", image_name=kernel_image
    )
    kernel_id = str(km.kernel_id)
    [container] = kernel_containers(docker_engine, kernel_id)
    attrs = container.attrs
    assert attrs["HostConfig"]["NetworkMode"] == "host"
    assert "no-new-privileges" in attrs["HostConfig"]["SecurityOpt"]
    env_names = {e.split("=", 1)[0] for e in attrs["Config"]["Env"]}
    assert not {"KUBECONFIG", "RKO_NAMESPACE", "RKO_DOCKER_HOST"} & env_names
    async with ready_client(km) as kc:
        outputs: list[str] = []
        reply = await kc.execute_interactive(
            "import sys, os; print(sys.prefix, os.environ['KERNEL_USERNAME'])",
            output_hook=lambda m: outputs.append(m["content"].get("text", "")),
            timeout=30,
        )
        assert reply["content"]["status"] == "ok"
        assert "".join(outputs).split() == ["/opt/kernel", "alice"]
        msg_id = kc.execute("import time; time.sleep(60)")
        await asyncio.sleep(1)
        await km.interrupt_kernel()
        reply = await _reply_to(kc, msg_id, timeout=10)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    await km.restart_kernel()
    async with ready_client(km) as kc:
        reply = await kc.execute_interactive("1 + 1", timeout=30)
        assert reply["content"]["status"] == "ok"
    started = time.monotonic()
    await km.shutdown_kernel()
    assert time.monotonic() - started < 5
    wait_for(lambda: not kernel_containers(docker_engine, kernel_id), timeout=20, what="no container left")


def test_an_image_that_is_not_on_the_engine_fails_at_once(
    operator: OperatorProcess, docker_engine: DockerEngine, custom: client.CustomObjectsApi, namespace: str
) -> None:
    name, kernel_id = make_kernel(
        namespace, custom, backend="docker", image="no-such-image:1", launchTimeoutSeconds=120
    )
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=20)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "ImageNotFound", status
    assert "no-such-image:1" in status["message"]
    assert not kernel_containers(docker_engine, kernel_id)


def test_a_kernel_that_crashes_in_its_container_fails_with_the_exit_code(
    operator: OperatorProcess,
    docker_engine: DockerEngine,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    name, kernel_id = make_kernel(
        namespace,
        custom,
        backend="docker",
        image=kernel_image,
        kernel={"className": "no.such.Kernel"},
        launchTimeoutSeconds=120,
    )
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=60)["status"]
    assert status["phase"] == "Failed" and "exit code 3" in status["message"], status
    delete_and_wait_gone(custom, namespace, name)
    assert not kernel_containers(docker_engine, kernel_id)


def test_a_container_removed_behind_the_operators_back_fails_the_kernel(
    operator: OperatorProcess,
    docker_engine: DockerEngine,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    name, kernel_id = make_kernel(namespace, custom, backend="docker", image=kernel_image)
    wait_phase(custom, namespace, name, "Running", timeout=60)
    kernel_containers(docker_engine, kernel_id)[0].remove(force=True)
    started = time.monotonic()
    status = wait_phase(custom, namespace, name, "Failed", "Succeeded", timeout=20)["status"]
    assert status["phase"] == "Failed", status
    assert time.monotonic() - started < 5


def test_root_is_refused_in_containers(
    operator: OperatorProcess,
    docker_engine: DockerEngine,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    name, kernel_id = make_kernel(
        namespace, custom, backend="docker", image=kernel_image, docker={"user": "0:0"}
    )
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=20)["status"]
    assert status["reason"] == "Unauthorized", status
    assert not kernel_containers(docker_engine, kernel_id)


def test_a_restarted_operator_keeps_its_docker_kernels_and_cleans_them_up(
    operator: OperatorProcess,
    docker_engine: DockerEngine,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    name, kernel_id = make_kernel(namespace, custom, backend="docker", image=kernel_image)
    wait_phase(custom, namespace, name, "Running", timeout=60)
    operator.stop()
    operator.start()
    time.sleep(2)
    assert wait_phase(custom, namespace, name, "Running", "Failed")["status"]["phase"] == "Running"
    delete_and_wait_gone(custom, namespace, name)
    assert not kernel_containers(docker_engine, kernel_id)


async def test_the_operator_finds_its_containers_by_their_labels(
    operator: OperatorProcess,
    docker_engine: DockerEngine,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    from kernel_operator.backends.docker import DockerBackend
    from kernel_operator.profiles import Profile
    from kernel_operator.settings import OperatorSettings
    from kernel_operator.spec import build_request

    name, _ = make_kernel(namespace, custom, backend="docker", image=kernel_image)
    obj = wait_phase(custom, namespace, name, "Running", timeout=60)
    settings = OperatorSettings.from_env({"RKO_DOCKER_HOST": docker_engine.host})
    backend = DockerBackend(settings.docker)
    profile = Profile.from_object(
        custom.get_cluster_custom_object(GROUP, VERSION, "remotekernelprofiles", obj["spec"]["profile"])
    )
    request = build_request(namespace, name, obj["metadata"]["uid"], obj["spec"], profile, settings)
    found = await backend.find(request)
    assert found is not None and found["id"] == obj["status"]["backendRef"]["id"]
    delete_and_wait_gone(custom, namespace, name)
    assert await backend.find(request) is None


async def test_the_engine_can_be_reached_over_tcp_with_tls(tmp_path: Path) -> None:
    from kernel_operator.backends.docker import DockerBackend
    from kernel_operator.errors import BackendUnavailable
    from kernel_operator.settings import DockerSettings
    from localcluster import free_port

    port = free_port()
    engine = DockerEngine(data_root=tmp_path / "data", tls_port=port)
    engine.start()
    try:
        host = f"tcp://127.0.0.1:{port}"
        backend = DockerBackend(
            DockerSettings(host=host, tls_verify=True, cert_path=str(engine.client_tls_dir))
        )
        assert backend.client().ping()
        assert (await backend.status({"id": "no-such-container"})).state == "gone"
        # Without a client certificate the engine refuses the connection.
        plain = DockerBackend(DockerSettings(host=host, tls_verify=False))
        with pytest.raises((BackendUnavailable, docker.errors.DockerException, OSError)):
            plain.client().ping()
    finally:
        engine.stop()


def test_dockerd_restarted_during_launches_loses_no_record_and_leaks_nothing(
    operator: OperatorProcess,
    docker_engine: DockerEngine,
    kernel_image: str,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """The engine stops (as a dockerd restart does: without live-restore, which Swarm mode
    forbids, its containers stop with it) while kernels launch, and comes back. Every kernel
    ends Running and runs code, or Failed with a reason (a kernel whose container the engine
    stopped); the operator rides the outage out; deleting them leaves no container or Secret."""
    before, before_id = make_kernel(namespace, custom, backend="docker", image=kernel_image)
    wait_phase(custom, namespace, before, "Running", timeout=60)
    names = {before: before_id}
    for _ in range(3):
        name, kernel_id = make_kernel(
            namespace, custom, backend="docker", image=kernel_image, launchTimeoutSeconds=90
        )
        names[name] = kernel_id
    time.sleep(0.5)
    docker_engine.stop()
    time.sleep(1)
    docker_engine.start()
    # Launched after the engine is back: it runs.
    after, after_id = make_kernel(namespace, custom, backend="docker", image=kernel_image)
    names[after] = after_id
    outcomes = settle(custom, api_client, namespace, names, timeout=150)
    print(f"dockerd restart: {list(outcomes.values()).count('Running')}/{len(names)} Running; {outcomes}")
    assert outcomes[after] == "Running", outcomes[after]
    assert operator.proc is not None and operator.proc.poll() is None, "the operator died with dockerd"
    for name in names:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: all(get(custom, namespace, n) is None for n in names), timeout=90, what="all deleted")
    for kernel_id in names.values():
        assert not kernel_containers(docker_engine, kernel_id), kernel_id
    secrets = client.CoreV1Api(api_client).list_namespaced_secret(namespace).items
    assert not [s.metadata.name for s in secrets if any(k in s.metadata.name for k in names.values())]


def test_a_container_created_by_a_launch_that_then_failed_goes_with_its_remote_kernel(
    operator: OperatorProcess,
    docker_engine: DockerEngine,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    """dockerd going down between a container's create and its start fails the launch with
    nothing recorded (a full CI run hit this window once). The container the create left,
    labelled with the RemoteKernel's uid, is found and removed when the kernel is deleted."""
    docker_engine.stop()
    try:
        name, kernel_id = make_kernel(namespace, custom, backend="docker", image=kernel_image)
        failed = wait_phase(custom, namespace, name, "Failed", timeout=60)
    finally:
        docker_engine.start()
    status = failed["status"]
    assert status.get("backend") == "docker" and not status.get("backendRef"), status
    # What the cut-off launch's create leaves: a container with the kernel's labels, never started.
    engine = docker.DockerClient(base_url=docker_engine.host)
    labels = {LABEL: kernel_id, UID_LABEL: failed["metadata"]["uid"]}
    engine.containers.create(kernel_image, ["sleep", "600"], labels=labels, network_mode="host")
    assert [c.status for c in kernel_containers(docker_engine, kernel_id)] == ["created"]
    delete_and_wait_gone(custom, namespace, name, timeout=60)
    assert not kernel_containers(docker_engine, kernel_id)
