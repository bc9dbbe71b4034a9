"""The local control plane acts as a real cluster: schemas, RBAC, garbage collection, scheduling."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.helpers import REPO_ROOT, wait_for

CRD_FILE = REPO_ROOT / "crds" / "remotekernels.kernel-operator.io.yaml"
GROUP, VERSION, PLURAL = "kernel-operator.io", "v1alpha1", "remotekernels"


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
    return subprocess.run(
        [exe, f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "HOME": str(kubeconfig.parent)},
    )


@pytest.fixture(scope="module")
def crd_installed(kubeconfig: Path, api_client: client.ApiClient) -> None:
    result = kubectl(kubeconfig, "apply", "-f", str(CRD_FILE))
    assert result.returncode == 0, result.stderr
    ext = client.ApiextensionsV1Api(api_client)

    def established() -> bool:
        crd = ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for(established, what="the RemoteKernel CRD to be established")


def remote_kernel(name: str, **spec: Any) -> dict[str, Any]:
    # root: an operator running in the same session refuses it, so nothing is launched.
    body_spec = {"kernelId": str(uuid.uuid4()), "username": "root"}
    body_spec.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RemoteKernel",
        "metadata": {"name": name},
        "spec": body_spec,
    }


def test_kubectl_matches_the_server_version(kubeconfig: Path) -> None:
    result = kubectl(kubeconfig, "version", "-o", "yaml")
    assert result.returncode == 0, result.stderr
    versions = yaml.safe_load(result.stdout)
    assert versions["serverVersion"]["gitVersion"] == "v1.37.2"
    client_minor = int(versions["clientVersion"]["minor"].rstrip("+"))
    assert abs(client_minor - 37) <= 1, versions["clientVersion"]


def test_crd_is_served_and_its_schema_enforced(
    crd_installed: None, api_client: client.ApiClient, kubeconfig: Path, namespace: str
) -> None:
    custom = client.CustomObjectsApi(api_client)
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, remote_kernel("good", kernel={})
    )
    assert created["spec"]["kernel"] == {"language": "python"}  # a schema default was applied

    bad_specs: list[dict[str, Any]] = [
        {"profile": "Not A Name"},
        {"portRange": "100-200"},
        {"env": {"1BAD": "x"}},
        {"kernel": {"className": "x; import os"}},
    ]
    for bad_spec in bad_specs:
        with pytest.raises(ApiException) as err:
            custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                remote_kernel(f"bad-{uuid.uuid4().hex[:6]}", **bad_spec),
            )
        assert err.value.status == 422, bad_spec

    # kernelId is immutable once set (a patch: an operator may be updating the object meanwhile).
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "good", {"spec": {"kernelId": str(uuid.uuid4())}}
        )
    assert err.value.status == 422
    assert "kernelId is immutable" in err.value.body
    # So are the user and the profile: what was admitted at creation stays what runs.
    for field, value in (("username", "alice"), ("profile", "other")):
        with pytest.raises(ApiException) as err:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "good", {"spec": {field: value}}
            )
        assert err.value.status == 422 and f"{field} is immutable" in err.value.body

    listed = kubectl(kubeconfig, "get", "rk", "-n", namespace, "-o", "name")
    assert listed.stdout.strip() == "remotekernel.kernel-operator.io/good"


def test_rbac_is_enforced(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    token = core.create_namespaced_service_account_token(
        "reader",
        namespace,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[])),
    ).status.token

    as_reader = client.Configuration()
    as_reader.host = api_client.configuration.host
    as_reader.ssl_ca_cert = api_client.configuration.ssl_ca_cert
    as_reader.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(as_reader) as reader_client:
        reader = client.CoreV1Api(reader_client)
        with pytest.raises(ApiException) as err:
            reader.list_namespaced_config_map(namespace)
        assert err.value.status == 403

        rbac = client.RbacAuthorizationV1Api(api_client)
        rbac.create_namespaced_role(
            namespace,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="read-configmaps"),
                rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list"])],
            ),
        )
        rbac.create_namespaced_role_binding(
            namespace,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="reader-reads-configmaps"),
                role_ref=client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="read-configmaps"
                ),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)],
            ),
        )

        def allowed() -> bool:
            try:
                reader.list_namespaced_config_map(namespace)
            except ApiException as exc:
                assert exc.status == 403
                return False
            return True

        wait_for(allowed, timeout=10, what="the RoleBinding to take effect")
        # The role grants list only: reading Secrets stays forbidden.
        with pytest.raises(ApiException) as err:
            reader.list_namespaced_secret(namespace)
        assert err.value.status == 403


def test_deleting_an_owner_deletes_its_dependents(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"), data={"a": "1"})
    )
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name="dependent",
                owner_references=[
                    client.V1OwnerReference(
                        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
                    )
                ],
            ),
        ),
    )
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def dependent_gone() -> bool:
        return not any(
            cm.metadata.name == "dependent" for cm in core.list_namespaced_config_map(namespace).items
        )

    wait_for(dependent_gone, timeout=30, what="the garbage collector to delete the dependent")


def test_a_pod_is_scheduled_to_a_ready_node(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    node_name = f"node-{uuid.uuid4().hex[:8]}"
    node = client.V1Node(
        metadata=client.V1ObjectMeta(name=node_name, labels={"kubernetes.io/hostname": node_name})
    )
    core.create_node(node)
    try:
        now = client.V1NodeCondition(type="Ready", status="True", reason="KubeletReady", message="test node")
        now.last_heartbeat_time = now.last_transition_time = dt.datetime.now(dt.timezone.utc)
        status = {
            "status": {
                "capacity": {"cpu": "4", "memory": "8Gi", "pods": "20"},
                "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "20"},
                "conditions": [api_client.sanitize_for_serialization(now)],
            }
        }
        core.patch_node_status(node_name, status)
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name="sleeper"),
            spec=client.V1PodSpec(
                containers=[client.V1Container(name="main", image="kernel:test")],
                # Other tests' nodes may exist: this pod can only fit the one registered here.
                node_selector={"kubernetes.io/hostname": node_name},
            ),
        )
        core.create_namespaced_pod(namespace, pod)

        def bound_node() -> str | None:
            return core.read_namespaced_pod("sleeper", namespace).spec.node_name  # type: ignore[no-any-return]

        assert wait_for(bound_node, timeout=30, what="the scheduler to bind the pod") == node_name
        # No kubelet confirms a graceful deletion here, so delete it outright.
        core.delete_namespaced_pod("sleeper", namespace, grace_period_seconds=0)
    finally:
        core.delete_node(node_name)
