"""The kubernetes backend's pure builders: the pod, the per-kernel namespace, pod status mapping."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from kernel_operator.backends.pod_builder import (
    build_namespace_role_binding,
    build_pod,
    deep_merge,
    kernel_namespace_name,
    pod_state,
)
from kernel_operator.errors import SettingsError, SpecError
from kernel_operator.settings import OperatorSettings
from tests.unit.requests import request_from


def request(**spec: Any):  # type: ignore[no-untyped-def]
    base: dict[str, Any] = {
        "kernelId": str(uuid.uuid4()),
        "username": "Alice@Example",
        "backend": "kubernetes",
    }
    base.update(spec)
    return request_from(base, OperatorSettings.from_env({}), name="k", uid="uid")


OWNER = {"apiVersion": "kernel-operator.io/v1alpha1", "kind": "RemoteKernel", "name": "k", "uid": "u"}


def test_the_pod_runs_the_launcher_with_only_the_kernels_variables() -> None:
    req = request(
        env={"KERNEL_WORKING_DIR": "/work", "MY": "1"}, kubernetes={"serviceAccountName": "kernels"}
    )
    pod = build_pod(
        req, ["--ip", "$(KERNEL_POD_IP)"], "img:1", "ns", OWNER, {"cpu": "1", "memory": "1Gi", "gpus": 1}
    )
    spec = pod["spec"]
    container = spec["containers"][0]
    assert pod["metadata"]["ownerReferences"] == [OWNER]
    assert pod["metadata"]["labels"]["kernel-operator.io/username"] == "Alice_Example"
    assert spec["restartPolicy"] == "Never" and spec["serviceAccountName"] == "kernels"
    assert spec["automountServiceAccountToken"] is False
    assert container["command"] == ["python", "-m", "kernel_launchers.python_launcher"]
    assert container["args"] == ["--ip", "$(KERNEL_POD_IP)"]
    assert container["workingDir"] == "/work"
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}
    names = [e["name"] for e in container["env"]]
    assert {"KERNEL_ID", "KERNEL_USERNAME", "MY", "KERNEL_POD_IP", "RKO_LAUNCH_TOKEN"} <= set(names)
    token = next(e for e in container["env"] if e["name"] == "RKO_LAUNCH_TOKEN")
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_uid_and_gid_come_from_the_profile_never_from_kernel_variables_and_root_is_refused() -> None:
    def context(req: Any) -> dict[str, Any]:
        return dict(build_pod(req, [], "i", "ns", None)["spec"]["containers"][0]["securityContext"])

    ctx = context(request(kubernetes={"runAsUser": 2000, "runAsGroup": 100}))
    assert ctx["runAsUser"] == 2000 and ctx["runAsGroup"] == 100 and ctx["runAsNonRoot"] is True
    # A tenant's KERNEL_UID 0 is only a variable: the kernel still runs as the default uid.
    ctx = context(request(env={"KERNEL_UID": "0", "KERNEL_GID": "0"}))
    assert ctx["runAsUser"] == 1000 and ctx["runAsGroup"] == 1000 and ctx["runAsNonRoot"] is True
    with pytest.raises(SpecError, match="restricted Pod Security Standard forbids") as err:
        build_pod(request(kubernetes={"runAsUser": 0}), [], "i", "ns", None)
    assert err.value.reason == "PodSecurityViolation"


def test_a_pod_template_is_merged_under_what_the_operator_sets() -> None:
    template = {
        "metadata": {"labels": {"team": "a"}},
        "spec": {
            "nodeSelector": {"gpu": "yes"},
            "restartPolicy": "Always",
            "containers": [{"name": "ignored", "env": [{"name": "X", "value": "1"}], "stdin": True}],
        },
    }
    pod = build_pod(request(kubernetes={"podTemplate": template}), [], "img", "ns", None)
    assert pod["spec"]["nodeSelector"] == {"gpu": "yes"}
    assert pod["spec"]["restartPolicy"] == "Never"  # ours wins
    assert (
        pod["metadata"]["labels"]["team"] == "a"
        and "kernel-operator.io/kernel-id" in pod["metadata"]["labels"]
    )
    container = pod["spec"]["containers"][0]
    assert container["name"] == "kernel" and container["stdin"] is True
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_the_per_kernel_namespace_and_its_role_binding() -> None:
    req = request()
    name = kernel_namespace_name(req)
    assert name.startswith("alice-example-") and len(name) <= 63
    binding = build_namespace_role_binding(name, "remote-kernel", "default")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "remote-kernel",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default", "namespace": name}]


def test_cluster_admin_is_never_the_kernels_role() -> None:
    with pytest.raises(SettingsError, match="cluster-admin"):
        OperatorSettings.from_env({"RKO_KERNEL_CLUSTER_ROLE": "cluster-admin"})


def pod(
    phase: str = "Running",
    waiting: str | None = None,
    terminated: int | None = None,
    message: str = "details",
    **meta: Any,
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}}
    if waiting:
        state = {"waiting": {"reason": waiting, "message": message}}
    if terminated is not None:
        state = {"terminated": {"exitCode": terminated, "reason": "Error"}}
    return {
        "metadata": {"name": "p", **meta},
        "spec": {"nodeName": "n1"},
        "status": {"phase": phase, "containerStatuses": [{"state": state}]},
    }


@pytest.mark.parametrize(
    ("body", "node_ready", "state", "reason"),
    [
        (None, None, "gone", "PodDeleted"),
        (pod(deletionTimestamp="2026-01-01T00:00:00Z"), True, "gone", "PodDeleted"),
        (pod("Pending", waiting="ContainerCreating"), True, "starting", ""),
        (pod("Pending", waiting="ErrImagePull"), True, "failed", "ImagePullFailed"),
        (pod("Pending", waiting="ImagePullBackOff"), True, "failed", "ImagePullFailed"),
        (pod("Running", waiting="CrashLoopBackOff"), True, "failed", "CrashLoop"),
        (pod("Pending", waiting="CreateContainerConfigError"), True, "failed", "ContainerCreateFailed"),
        (
            pod("Pending", waiting="CreateContainerConfigError", message='secret "s" not found'),
            True,
            "failed",
            "ContainerCreateFailed",
        ),
        # Seen in a burst of 100 pods on one kubelet: it retries, and the pod started.
        (
            pod(
                "Pending",
                waiting="CreateContainerConfigError",
                message="failed to sync secret cache: timed out waiting for the condition",
            ),
            True,
            "starting",
            "",
        ),
        (
            pod("Pending", waiting="CreateContainerError", message="context deadline exceeded"),
            True,
            "starting",
            "",
        ),
        (pod("Running"), True, "running", ""),
        (pod("Running"), False, "failed", "NodeLost"),
        (pod("Failed", terminated=3), True, "failed", "PodFailed"),
        (pod("Succeeded", terminated=0), True, "succeeded", "KernelExited"),
    ],
)
def test_pod_status_maps_to_the_kernels_state(
    body: Any, node_ready: bool | None, state: str, reason: str
) -> None:
    result = pod_state(body, node_ready)
    assert result.state == state and result.reason == reason


def test_an_evicted_pod_keeps_the_kubelets_reason() -> None:
    body = pod("Failed")
    body["status"].update(reason="Evicted", message="The node was low on memory.", containerStatuses=[])
    result = pod_state(body, True)
    assert result.reason == "Evicted" and "low on memory" in result.message


def test_volumes_and_mounts_are_data_checked_against_each_other() -> None:
    good = {
        "volumes": [{"name": "data", "emptyDir": {}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    pod = build_pod(request(kubernetes=good), [], "i", "ns", None)
    assert pod["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]
    assert pod["spec"]["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    for bad, words in [
        ({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, "does not declare"),
        ({**good, "volumeMounts": [{"name": "data", "mountPath": "relative"}]}, "absolute"),
        (
            {"volumes": [{"name": "Bad_Name"}], "volumeMounts": [{"name": "Bad_Name", "mountPath": "/x"}]},
            "DNS label",
        ),
    ]:
        with pytest.raises(SpecError, match=words):
            build_pod(request(kubernetes=bad), [], "i", "ns", None)
