"""The kubernetes backend on the real control plane, with pods run by a real kubelet (containerd)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from localcluster.node import KubeletNode
from localcluster.servers import OperatorProcess
from tests.helpers import wait_for

from .test_operator_ssh import (
    GROUP,
    PLURAL,
    VERSION,
    delete_and_wait_gone,
    get,
    make_kernel,
    ready_client,
    start_remote_kernel,
    wait_phase,
)

pytestmark = pytest.mark.integration


def read_pod(core: client.CoreV1Api, namespace: str, name: str) -> Any:
    try:
        return core.read_namespaced_pod(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def test_a_pod_kernel_runs_and_deleting_it_removes_the_pod(
    operator: OperatorProcess,
    kube_node: str,
    kernel_image: str,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    core = client.CoreV1Api(api_client)
    name, kernel_id = make_kernel(
        namespace,
        custom,
        backend="kubernetes",
        image=kernel_image,
        resources={"cpu": "500m", "memory": "512Mi"},
    )
    started = time.monotonic()
    status = wait_phase(custom, namespace, name, "Running", "Failed", timeout=90)["status"]
    assert status["phase"] == "Running", status
    launch_seconds = time.monotonic() - started
    pod = read_pod(core, namespace, name)
    assert pod.spec.node_name == kube_node
    assert pod.spec.restart_policy == "Never"
    assert pod.metadata.owner_references[0].kind == "RemoteKernel"
    assert pod.metadata.labels["kernel-operator.io/kernel-id"] == kernel_id
    kernel = pod.spec.containers[0]
    assert kernel.resources.limits == {"cpu": "500m", "memory": "512Mi"}
    assert kernel.security_context.allow_privilege_escalation is False
    env_names = {e.name for e in kernel.env}
    # Only the kernel's own variables: nothing of the operator's environment.
    assert not {"KUBECONFIG", "RKO_NAMESPACE", "RKO_RESPONSE_BIND", "PATH", "HOME"} & env_names
    token_var = next(e for e in kernel.env if e.name == "RKO_LAUNCH_TOKEN")
    assert token_var.value is None and token_var.value_from.secret_key_ref is not None  # not in the pod spec
    assert status["connection"]["ip"] == pod.status.pod_ip  # the pod's own address, on the node
    print(f"pod kernel Running after {launch_seconds:.2f} s")
    delete_and_wait_gone(custom, namespace, name)
    wait_for(lambda: read_pod(core, namespace, name) is None, timeout=30, what="the kernel pod to be deleted")
    assert not [s for s in core.list_namespaced_secret(namespace).items if kernel_id in s.metadata.name]


async def test_a_jupyter_client_runs_code_in_a_pod_kernel(
    operator: OperatorProcess,
    kube_node: str,
    kernel_image: str,
    api_client: client.ApiClient,
    tmp_path: Path,
    kubeconfig: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    km = await start_remote_kernel(
        tmp_path, kubeconfig, namespace, monkeypatch, backend="kubernetes", image_name=kernel_image
    )
    kernel_id = str(km.kernel_id)
    try:
        async with ready_client(km) as kc:
            outputs: list[str] = []
            reply = await kc.execute_interactive(
                "import os, sys; print(os.environ['KERNEL_POD_NAME'], sys.prefix, "
                "sorted(k for k in os.environ if k.startswith('RKO_') or k == 'KUBECONFIG'))",
                output_hook=lambda m: outputs.append(m["content"].get("text", "")),
                timeout=30,
            )
            assert reply["content"]["status"] == "ok"
            pod_name, prefix, leaked = "".join(outputs).split(" ", 2)
            assert pod_name == f"k-{kernel_id}"
            assert prefix == "/opt/kernel"  # the kernel image's venv: it runs in the container
            assert leaked.strip() == "[]"  # no operator variable, not even the launch token
    finally:
        await km.shutdown_kernel()
    core = client.CoreV1Api(api_client)
    wait_for(lambda: read_pod(core, namespace, f"k-{kernel_id}") is None, timeout=30, what="the pod to go")


def test_an_image_that_is_not_present_fails_at_once(
    operator: OperatorProcess, kube_node: str, custom: client.CustomObjectsApi, namespace: str
) -> None:
    started = time.monotonic()
    name, _ = make_kernel(
        namespace, custom, backend="kubernetes", image="no-such-image:1", launchTimeoutSeconds=120
    )
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=60)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "ImagePullFailed", status
    # The real kubelet's words: the waiting reason, then containerd's own error.
    assert "ErrImagePull: failed to pull and unpack image" in status["message"], status["message"]
    assert "docker.io/library/no-such-image:1" in status["message"]
    assert time.monotonic() - started < 20  # not the 120 s launch timeout


def test_a_container_the_kubelet_cannot_configure_fails_at_once(
    operator: OperatorProcess,
    kube_node: str,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    # The profile's pod template names a Secret that does not exist: the kubelet refuses to make
    # the container (CreateContainerConfigError) and keeps retrying; the kernel fails at once.
    template = {
        "spec": {"containers": [{"name": "kernel", "envFrom": [{"secretRef": {"name": "no-such-secret"}}]}]}
    }
    started = time.monotonic()
    name, _ = make_kernel(
        namespace,
        custom,
        backend="kubernetes",
        image=kernel_image,
        kubernetes={"podTemplate": template},
        launchTimeoutSeconds=120,
    )
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=60)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "ContainerCreateFailed", status
    assert 'CreateContainerConfigError: secret "no-such-secret" not found' in status["message"], status
    assert time.monotonic() - started < 30  # not the 120 s launch timeout


def test_a_kernel_that_crashes_in_its_pod_fails_with_the_exit_code(
    operator: OperatorProcess,
    kube_node: str,
    kernel_image: str,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    name, _ = make_kernel(
        namespace,
        custom,
        backend="kubernetes",
        image=kernel_image,
        kernel={"className": "no.such.KernelClass"},
        launchTimeoutSeconds=120,
    )
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=60)["status"]
    assert status["phase"] == "Failed", status
    # The launcher's own code for a kernel that did not start (EXIT_LAUNCH_FAILED), as the
    # kubelet reports a container that exits non-zero: terminated, reason Error.
    assert "the kernel container exited with code 3 (Error)" in status["message"], status["message"]


def test_a_pod_deleted_behind_the_operators_back_fails_the_kernel(
    operator: OperatorProcess,
    kube_node: str,
    kernel_image: str,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    name, _ = make_kernel(namespace, custom, backend="kubernetes", image=kernel_image)
    wait_phase(custom, namespace, name, "Running", timeout=90)
    client.CoreV1Api(api_client).delete_namespaced_pod(name, namespace)
    started = time.monotonic()
    status = wait_phase(custom, namespace, name, "Failed", "Succeeded", timeout=30)["status"]
    assert status["reason"] == "PodDeleted", status
    assert time.monotonic() - started < 10


def test_an_evicted_pod_fails_the_kernel(
    operator: OperatorProcess,
    kube_node: str,
    kernel_image: str,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    name, _ = make_kernel(namespace, custom, backend="kubernetes", image=kernel_image)
    wait_phase(custom, namespace, name, "Running", timeout=90)
    client.CoreV1Api(api_client).create_namespaced_pod_eviction(
        name, namespace, client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace=namespace))
    )
    status = wait_phase(custom, namespace, name, "Failed", "Succeeded", timeout=30)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "PodDeleted", status


def test_root_is_refused_for_pod_kernels(
    operator: OperatorProcess, custom: client.CustomObjectsApi, namespace: str, kernel_image: str
) -> None:
    # Even a profile cannot run a kernel as root under the restricted Pod Security Standard.
    name, _ = make_kernel(
        namespace, custom, backend="kubernetes", image=kernel_image, kubernetes={"runAsUser": 0}
    )
    status = wait_phase(custom, namespace, name, "Failed", "Running", timeout=30)["status"]
    assert status["phase"] == "Failed" and status["reason"] == "PodSecurityViolation", status
    assert "root" in status["message"]
    assert (
        custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"][0]["status"].get(
            "backendRef"
        )
        is None
    )
    assert get(custom, namespace, name) is not None


def test_a_namespace_per_kernel_is_made_bound_and_deleted(
    operator: OperatorProcess,
    kube_node: str,
    kernel_image: str,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    core = client.CoreV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    role = client.V1ClusterRole(
        metadata=client.V1ObjectMeta(name="remote-kernel"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list"])],
    )
    try:
        rbac.create_cluster_role(role)
    except ApiException as err:
        assert err.status == 409
    operator.stop()
    operator.env["RKO_SHARED_NAMESPACE"] = "false"
    operator.start()
    try:
        name, kernel_id = make_kernel(
            namespace, custom, backend="kubernetes", image=kernel_image, username="carol"
        )
        status = wait_phase(custom, namespace, name, "Running", "Failed", timeout=90)["status"]
        assert status["phase"] == "Running", status
        own = status["backendRef"]["namespace"]
        assert own == f"carol-{kernel_id}" and own != namespace
        binding = rbac.read_namespaced_role_binding("remote-kernel", own)
        assert binding.role_ref.name == "remote-kernel"
        assert read_pod(core, own, name) is not None
        delete_and_wait_gone(custom, namespace, name)

        def namespace_going() -> bool:
            try:
                return core.read_namespace(own).metadata.deletion_timestamp is not None
            except ApiException as err:
                return err.status == 404

        wait_for(namespace_going, timeout=30, what=f"namespace {own} to be deleted")
    finally:
        operator.stop()
        operator.env.pop("RKO_SHARED_NAMESPACE")
        operator.start()


def test_a_lost_node_fails_its_kernels(
    operator: OperatorProcess,
    kube_node: str,
    local_cluster: Any,
    docker_engine: Any,
    kernel_image: str,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    core = client.CoreV1Api(api_client)
    doomed = KubeletNode(tmp_path_factory.mktemp("doomed"), local_cluster, name="node-doomed", index=1)
    doomed.plumb()
    try:
        doomed.start(docker_engine.env)
        doomed.import_images(kernel_image, docker_env=docker_engine.env)
        template = {"spec": {"nodeSelector": {"kubernetes.io/hostname": doomed.name}}}
        name, _ = make_kernel(
            namespace, custom, backend="kubernetes", image=kernel_image, kubernetes={"podTemplate": template}
        )
        wait_phase(custom, namespace, name, "Running", timeout=90)
        assert read_pod(core, namespace, name).spec.node_name == doomed.name
        doomed.set_kubelet(False)  # the kubelet dies without a word; its containers go on
        core.delete_node(doomed.name)  # and the node is removed from the cluster
        started = time.monotonic()
        status = wait_phase(custom, namespace, name, "Failed", "Succeeded", timeout=30)["status"]
        assert status["reason"] == "NodeLost", status
        assert time.monotonic() - started < 10
    finally:
        doomed.stop()  # what a dead node leaves behind: its pod, which no kubelet confirms gone
        for pod in core.list_namespaced_pod(namespace).items:
            core.delete_namespaced_pod(
                pod.metadata.name, namespace, body=client.V1DeleteOptions(grace_period_seconds=0)
            )


def test_a_pod_kernel_is_claimed_from_a_pool_and_its_pod_goes_with_the_claimer(
    operator: OperatorProcess,
    kube_node: str,
    kernel_image: str,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    from tests.profiles import ensure_profile

    from .test_pools import claimer, connect, make_pool, members, run, wait_ready

    ensure_profile(api_client, {"backend": "kubernetes", "image": kernel_image}, name="pool-pods")
    make_pool(custom, namespace, profile="pool-pods", replicas=1)
    wait_ready(custom, namespace, 1)
    name, kernel_id = claimer(
        custom, namespace, profile="pool-pods", env={"KERNEL_TEAM": "blue", "KERNEL_WORKING_DIR": "/tmp"}
    )
    obj = wait_phase(custom, namespace, name, "Running", "Failed", timeout=30)
    assert obj["status"]["reason"] == "ClaimedFromPool", obj["status"]
    member_name = obj["status"]["pool"]["member"]
    core = client.CoreV1Api(api_client)
    pod_name = obj["status"]["backendRef"]["name"]
    pod = read_pod(core, namespace, pod_name)
    assert pod is not None and obj["status"]["connection"]["ip"] == pod.status.pod_ip
    assert [o.name for o in pod.metadata.owner_references] == [member_name]
    kc = connect(api_client, namespace, obj)
    try:
        said = run(
            kc,
            "import os; print(os.environ['KERNEL_USERNAME'], os.environ['KERNEL_ID'], "
            "os.environ['KERNEL_TEAM'], os.getcwd())",
        )
    finally:
        kc.stop_channels()
    assert said.split() == ["alice", kernel_id, "blue", "/tmp"], said
    # The pod is owned by the member, the member by the claimer: the pool's refill or deletion
    # never touches it; deleting the claimer removes it.
    (member,) = [m for m in members(custom, namespace) if m["metadata"]["name"] == member_name]
    assert [o["name"] for o in member["metadata"]["ownerReferences"]] == [name]
    wait_ready(custom, namespace, 1)
    delete_and_wait_gone(custom, namespace, name)
    wait_for(lambda: read_pod(core, namespace, pod_name) is None, timeout=30, what="the claimed pod to go")
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "remotekernelpools", "warm")
