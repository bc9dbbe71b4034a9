"""A tenant attacks the operator, on the real API server with the chart's admission policy and
Pod Security admission on.

The tenant is a ServiceAccount (a Jupyter server's) holding only the chart's tenant role in its
own namespace, whose namespace enforces the "restricted" Pod Security Standard. The operator is
the session's, running with the cluster administrator's rights: the worst case for a confused
deputy. Every attempt must be refused (403/422 from the API server, or Failed with a reason)
and create nothing: no pod, container, process, Secret or application, and no change to
another user's kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from jupyter_client.manager import AsyncKernelManager
from kubernetes import client
from kubernetes.client.rest import ApiException

from kernel_launchers import protocol
from kernel_launchers.sealed_connection import FIELDS, SealError, encode_public_key, open_sealed
from localcluster.docker import DockerEngine
from localcluster.servers import OperatorProcess
from remote_kernel_provisioner.client_key import PROCESS_KEY
from tests.helpers import wait_for
from tests.profiles import ensure_profile

from .conftest import launcher_processes
from .test_chart import CHART, KUBE_VERSION, helm, run_helm  # noqa: F401 - helm is a fixture
from .test_operator_ssh import (
    GROUP,
    PLURAL,
    VERSION,
    assert_interrupt_ends_a_long_cell,
    delete_and_wait_gone,
    get,
    ready_client,
    start_remote_kernel,
    wait_phase,
)

pytestmark = pytest.mark.integration
TENANT_SA = "jupyter"
CHART_RELEASE = "tenancy"


@dataclass
class Tenant:
    namespace: str
    api: client.ApiClient
    custom: client.CustomObjectsApi
    username: str  # the ServiceAccount's own user name


def _apply(api_client: client.ApiClient, docs: list[dict[str, Any]]) -> None:
    dynamic = {
        "ClusterRole": lambda d: client.RbacAuthorizationV1Api(api_client).create_cluster_role(d),
        "ValidatingAdmissionPolicy": lambda d: client.AdmissionregistrationV1Api(
            api_client
        ).create_validating_admission_policy(d),
        "ValidatingAdmissionPolicyBinding": lambda d: client.AdmissionregistrationV1Api(
            api_client
        ).create_validating_admission_policy_binding(d),
    }
    for doc in docs:
        try:
            dynamic[doc["kind"]](doc)
        except ApiException as err:
            assert err.status == 409, err


def _token(api_client: client.ApiClient, namespace: str, name: str) -> str:
    return str(
        client.CoreV1Api(api_client)
        .create_namespaced_service_account_token(
            name,
            namespace,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
            ),
        )
        .status.token
    )


def _token_client(api_client: client.ApiClient, namespace: str, name: str) -> client.ApiClient:
    config = client.Configuration()
    config.host = api_client.configuration.host
    config.ssl_ca_cert = api_client.configuration.ssl_ca_cert
    config.api_key = {"authorization": f"Bearer {_token(api_client, namespace, name)}"}
    return client.ApiClient(config)


def _token_kubeconfig(api_client: client.ApiClient, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig for a ServiceAccount (what a Jupyter server in its pod would use)."""
    cluster = {
        "server": api_client.configuration.host,
        "certificate-authority": api_client.configuration.ssl_ca_cert,
    }
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": {"token": _token(api_client, namespace, name)}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": namespace}}],
                "current-context": "x",
            }
        )
    )
    return path


def remote_kernel(kernel_id: str | None = None, **spec: Any) -> dict[str, Any]:
    kernel_id = kernel_id or str(uuid.uuid4())
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RemoteKernel",
        "metadata": {"name": f"k-{kernel_id}"},
        "spec": {"kernelId": kernel_id, **spec},
    }


@pytest.fixture(scope="module")
def tenant(helm: Path, operator: OperatorProcess, api_client: client.ApiClient) -> Iterator[Tenant]:  # noqa: F811
    """The chart's admission policy and tenant roles, and a tenant ServiceAccount in a namespace
    that enforces the restricted Pod Security Standard."""
    out = run_helm(
        helm, "template", CHART_RELEASE, str(CHART), "-n", "rko-system", "--kube-version", KUBE_VERSION,
        "-s", "templates/admission.yaml", "-s", "templates/tenant-rbac.yaml",
    )  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["kind"] for d in docs} == {
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ClusterRole",
    }
    _apply(api_client, docs)
    core, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    namespace = f"tenant-{uuid.uuid4().hex[:8]}"
    core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(
                name=namespace,
                labels={"pod-security.kubernetes.io/enforce": "restricted", "team": "tenants"},
            )
        )
    )
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=TENANT_SA))
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "jupyter-tenant"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": f"{CHART_RELEASE}-remote-kernel-operator-tenant-edit",
            },
            "subjects": [{"kind": "ServiceAccount", "name": TENANT_SA, "namespace": namespace}],
        },
    )
    api = _token_client(api_client, namespace, TENANT_SA)
    tenant = Tenant(
        namespace, api, client.CustomObjectsApi(api), f"system:serviceaccount:{namespace}:{TENANT_SA}"
    )
    custom = tenant.custom

    def policy_in_force() -> bool:
        body = remote_kernel(username="someone-else")
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, dry_run="All")
        except ApiException as err:
            return err.status == 403 and "act-as" in err.body
        return False

    wait_for(policy_in_force, timeout=60, what="the username admission policy to be in force")
    yield tenant
    for item in client.CustomObjectsApi(api_client).list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL
    )["items"]:
        with contextlib.suppress(ApiException):
            client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, item["metadata"]["name"]
            )
    wait_for(
        lambda: (
            not client.CustomObjectsApi(api_client).list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL
            )["items"]
        ),
        timeout=60,
        what="the tenant's kernels to be cleaned up",
    )
    api.close()
    core.delete_namespace(namespace)


def create(tenant: Tenant, body: dict[str, Any], strict: bool = False) -> dict[str, Any]:
    kwargs = {"field_validation": "Strict"} if strict else {}
    return dict(
        tenant.custom.create_namespaced_custom_object(
            GROUP, VERSION, tenant.namespace, PLURAL, body, **kwargs
        )
    )


def refused_by_api(tenant: Tenant, body: dict[str, Any], strict: bool = False) -> ApiException:
    with pytest.raises(ApiException) as err:
        create(tenant, body, strict)
    return err.value


def failed_with(
    tenant: Tenant, api_client: client.ApiClient, body: dict[str, Any], reason: str
) -> dict[str, Any]:
    create(tenant, body)
    admin = client.CustomObjectsApi(api_client)
    status = wait_phase(admin, tenant.namespace, body["metadata"]["name"], "Failed", "Running", timeout=60)[
        "status"
    ]
    assert status["phase"] == "Failed" and status["reason"] == reason, status
    assert "backendRef" not in status  # nothing was started
    return dict(status)


def pods(api_client: client.ApiClient, namespace: str) -> list[Any]:
    return list(client.CoreV1Api(api_client).list_namespaced_pod(namespace).items)


# -- the resource and the profiles -------------------------------------------------------------


def test_a_tenant_cannot_write_profiles_status_or_anything_privileged(
    tenant: Tenant, api_client: client.ApiClient
) -> None:
    # Profiles are the administrator's: a tenant may not create or change one.
    with pytest.raises(ApiException) as err:
        tenant.custom.create_cluster_custom_object(
            GROUP, VERSION, "remotekernelprofiles",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RemoteKernelProfile", "metadata": {"name": "mine"},
             "spec": {"backend": "kubernetes", "kubernetes": {"podSecurity": "privileged"}}},
        )  # fmt: skip
    assert err.value.status == 403
    # The fields that used to carry privilege are not the tenant's to set: the API server says so.
    for block in (
        {"backend": "kubernetes"},
        {"kubernetes": {"namespace": "kube-system", "serviceAccountName": "admin"}},
        {"docker": {"mounts": [{"type": "bind", "source": "/", "target": "/host"}]}},
        {"ssh": {"python": "/tmp/evil", "user": "root"}},
        {
            "customResource": {
                "group": "example.com",
                "version": "v1",
                "plural": "x",
                "podSelector": {"app": "db"},
            }
        },
        {"sparkApplication": {"template": {"spec": {"driver": {"hostNetwork": True}}}}},
    ):
        refused = refused_by_api(tenant, remote_kernel(username=tenant.username, **block), strict=True)
        assert refused.status in (400, 422) and "unknown field" in refused.body, refused.body
    # And a status it could forge a backendRef in is not its to write.
    body = create(tenant, remote_kernel(username=tenant.username, profile="tenant-nothing"))
    with pytest.raises(ApiException) as err:
        tenant.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, tenant.namespace, PLURAL, body["metadata"]["name"],
            {"status": {"backendRef": {"kind": "Pod", "namespace": "kube-system", "name": "etcd"}}},
        )  # fmt: skip
    assert err.value.status == 403
    # The spec cannot be changed after admission either (a profile swapped in, say).
    with pytest.raises(ApiException) as err:
        tenant.custom.patch_namespaced_custom_object(
            GROUP, VERSION, tenant.namespace, PLURAL, body["metadata"]["name"], {"spec": {"profile": "other"}}
        )
    assert err.value.status == 422 and "immutable" in err.value.body


def test_a_tenant_may_name_only_itself_or_the_users_rbac_lets_it_act_for(
    tenant: Tenant, api_client: client.ApiClient
) -> None:
    ensure_profile(api_client, {"backend": "ssh", "ssh": {"hosts": ["localhost"]}}, name="tenant-ssh")
    for who in ("alice", "root", "system:admin"):
        err = refused_by_api(tenant, remote_kernel(username=who, profile="tenant-ssh"))
        assert err.status == 403 and f"spec.username {who} is neither you" in err.body, err.body
    # Its own name is admitted (and launches).
    admitted = create(tenant, remote_kernel(username=tenant.username, profile="tenant-ssh", kernel={}))
    assert admitted["spec"]["username"] == tenant.username
    # A grant of act-as on alice, in its namespace, lets it name alice and nobody else.
    rbac = client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(
        tenant.namespace,
        {
            "metadata": {"name": "act-as-alice"},
            "rules": [
                {
                    "apiGroups": [GROUP],
                    "resources": ["users"],
                    "verbs": ["act-as"],
                    "resourceNames": ["alice"],
                }
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        tenant.namespace,
        {
            "metadata": {"name": "act-as-alice"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "act-as-alice"},
            "subjects": [{"kind": "ServiceAccount", "name": TENANT_SA, "namespace": tenant.namespace}],
        },
    )

    def alice_admitted() -> bool:
        try:
            create(tenant, remote_kernel(username="alice", profile="tenant-ssh"))
        except ApiException as err:
            assert err.status == 403, err
            return False
        return True

    wait_for(alice_admitted, timeout=20, what="the act-as grant to take effect")
    assert refused_by_api(tenant, remote_kernel(username="bob", profile="tenant-ssh")).status == 403


# -- pods ----------------------------------------------------------------------------------------


def test_a_tenants_kernel_pod_is_where_and_what_its_profile_says_whatever_it_asks(
    tenant: Tenant, api_client: client.ApiClient, kube_node: str, kernel_image: str
) -> None:
    ensure_profile(api_client, {"backend": "kubernetes", "image": kernel_image}, name="tenant-pods")
    before = {p.metadata.name for p in pods(api_client, "kube-system")}
    kernel_id = str(uuid.uuid4())
    body = remote_kernel(
        kernel_id,
        username=tenant.username,
        profile="tenant-pods",
        env={
            "KERNEL_NAMESPACE": "kube-system",
            "KERNEL_SERVICE_ACCOUNT_NAME": "default",
            "KERNEL_UID": "0",
            "KERNEL_GID": "0",
        },
        # Unknown to the schema now: pruned by the API server, never seen by the operator.
        kubernetes={"namespace": "kube-system", "podTemplate": {"spec": {"hostPID": True}},
                    "volumes": [{"name": "root", "hostPath": {"path": "/"}}]},
    )  # fmt: skip
    create(tenant, body)
    admin = client.CustomObjectsApi(api_client)
    status = wait_phase(admin, tenant.namespace, body["metadata"]["name"], "Running", "Failed", timeout=90)[
        "status"
    ]
    assert status["phase"] == "Running", status
    pod = client.CoreV1Api(api_client).read_namespaced_pod(f"k-{kernel_id}", tenant.namespace)
    spec = pod.spec
    assert not spec.host_pid and not spec.host_network and not spec.host_ipc
    assert spec.automount_service_account_token is False
    assert not [v for v in spec.volumes or [] if v.host_path is not None]
    (container,) = spec.containers
    context = container.security_context
    assert context.run_as_user == 1000 and context.run_as_non_root is True
    assert context.allow_privilege_escalation is False and context.capabilities.drop == ["ALL"]
    assert context.seccomp_profile.type == "RuntimeDefault"
    rk = admin.get_namespaced_custom_object(
        GROUP, VERSION, tenant.namespace, PLURAL, body["metadata"]["name"]
    )
    assert pod.metadata.labels["kernel-operator.io/uid"] == rk["metadata"]["uid"]
    assert {p.metadata.name for p in pods(api_client, "kube-system")} == before  # nothing there
    env = {e.name: e for e in container.env}
    assert env["KERNEL_NAMESPACE"].value == tenant.namespace  # the real one, not the tenant's claim
    assert env["RKO_LAUNCH_TOKEN"].value is None  # a secretKeyRef, not a value in the pod spec
    # The launch token appears in no status, Event or log line.
    token = client.CoreV1Api(api_client).read_namespaced_secret(f"k-{kernel_id}-launch", tenant.namespace)
    import base64

    secret = base64.b64decode(token.data["token"]).decode()
    events = client.CoreV1Api(api_client).list_namespaced_event(tenant.namespace).items
    assert secret not in json.dumps(status) and secret not in " ".join(e.message or "" for e in events)


def test_a_profile_whose_pod_the_api_server_refuses_fails_with_the_api_servers_reason(
    tenant: Tenant, api_client: client.ApiClient, kube_node: str, kernel_image: str
) -> None:
    # An administrator's privileged profile, used in a namespace that enforces "restricted":
    # the operator lets the profile through, the API server's Pod Security admission does not.
    ensure_profile(
        api_client,
        {"backend": "kubernetes", "image": kernel_image,
         "kubernetes": {"podSecurity": "privileged", "podTemplate": {"spec": {"hostPID": True}}}},
        name="tenant-privileged",
    )  # fmt: skip
    kernel_id = str(uuid.uuid4())
    body = remote_kernel(kernel_id, username=tenant.username, profile="tenant-privileged")
    status = failed_with(tenant, api_client, body, "PodCreateFailed")
    # Not just "422": the API server's own words reach the RemoteKernel.
    assert "violates PodSecurity" in status["message"] and "hostPID" in status["message"], status
    assert f"k-{kernel_id}" not in {p.metadata.name for p in pods(api_client, tenant.namespace)}


@pytest.mark.parametrize(
    ("spec", "profile", "reason"),
    [
        ({"image": "busybox:latest"}, {"images": ["rko-kernel-python:*"]}, "ImageNotAllowed"),
        ({"env": {"KERNEL_IMAGE": "busybox:latest"}}, {"images": ["rko-kernel-python:*"]}, "ImageNotAllowed"),
        ({"env": {"LD_PRELOAD": "/tmp/x.so"}}, {}, "EnvNotAllowed"),
        ({"resources": {"cpu": "64", "memory": "1Ti"}}, {"maxima": {"cpu": "2"}}, "ExceedsProfile"),
        ({"idleTimeoutSeconds": 0}, {"maxima": {"idleTimeoutSeconds": 3600}}, "ExceedsProfile"),
        ({}, {"namespaceSelector": {"matchLabels": {"team": "admins"}}}, "ProfileNotAllowed"),
        ({}, {"languages": ["r"]}, "LanguageNotSupported"),
        ({}, {"users": {"authorized": ["alice"]}}, "Unauthorized"),
        ({"ssh": {"hosts": ["10.0.0.1"]}}, {}, "HostNotAllowed"),
        ({"executorImage": "busybox:latest"}, {"images": ["rko-kernel-python:*"]}, "ImageNotAllowed"),
        ({"launchTimeoutSeconds": 3600}, {"maxima": {"launchTimeoutSeconds": 60}}, "ExceedsProfile"),
        ({"portRange": "30000..31999"}, {"defaults": {"portRange": "40000..41999"}}, "InvalidPortRange"),
        ({"transportEncryption": "disabled"}, {"requireTransportEncryption": True}, "EncryptionRequired"),
        ({"yarn": {"queue": "root.admins"}}, {"yarn": {"queues": ["analytics"]}}, "QueueNotAllowed"),
        ({"env": {"KERNEL_QUEUE": "root.admins"}}, {"yarn": {"queues": ["analytics"]}}, "QueueNotAllowed"),
    ],
)
def test_what_the_profile_does_not_allow_fails_with_a_reason_and_starts_nothing(
    tenant: Tenant, api_client: client.ApiClient, spec: dict[str, Any], profile: dict[str, Any], reason: str
) -> None:
    if "ssh" in spec:
        backend: dict[str, Any] = {"backend": "ssh", "ssh": {"hosts": ["localhost"]}}
    elif "yarn" in spec or "yarn" in profile:
        backend = {"backend": "yarn"}  # refused before any ResourceManager is asked
    else:
        backend = {"backend": "kubernetes"}
    name = ensure_profile(api_client, {**backend, **profile})
    before = {p.metadata.name for p in pods(api_client, tenant.namespace)}
    status = failed_with(
        tenant, api_client, remote_kernel(username=tenant.username, profile=name, **spec), reason
    )
    assert status["message"]
    assert {p.metadata.name for p in pods(api_client, tenant.namespace)} == before
    assert not [c for c in launcher_processes() if "10.0.0.1" in c]


def test_spark_options_outside_the_allow_list_never_reach_spark_submit(
    tenant: Tenant, api_client: client.ApiClient
) -> None:
    name = ensure_profile(
        api_client,
        {
            "backend": "yarn",
            "yarn": {"spark": True, "allowedSparkOptions": ["spark.executor.memory", "--jars"]},
        },
        name="tenant-spark",
    )
    for opts, words in (
        ("--jars /var/run/secrets/kubernetes.io/serviceaccount/token", "only remote URIs"),  # a local file
        ("--conf spark.driver.extraJavaOptions=-Dx=1", "allows only spark.executor.memory, --jars"),
        ("--proxy-user hdfs", "the operator decides it"),  # never a tenant's, allow-listed or not
    ):
        body = remote_kernel(username=tenant.username, profile=name, yarn={"sparkOpts": opts})
        status = failed_with(tenant, api_client, body, "InvalidSparkOptions")
        assert words in status["message"], status


# -- identity of objects -----------------------------------------------------------------------


async def test_another_users_kernel_id_cannot_be_used_to_reach_their_kernel(
    tenant: Tenant,
    api_client: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Alice's kernel, started through Jupyter by someone allowed to, in another namespace.
    km = await start_remote_kernel(tmp_path, kubeconfig, namespace, monkeypatch)
    admin = client.CustomObjectsApi(api_client)
    try:
        victim = get(admin, namespace, f"k-{km.kernel_id}")
        assert victim is not None and victim["status"]["phase"] == "Running"
        secret_before = (
            client.CoreV1Api(api_client)
            .read_namespaced_secret(f"k-{km.kernel_id}-connection", namespace)
            .data
        )
        body = remote_kernel(str(km.kernel_id), username=tenant.username, profile="tenant-ssh")
        status = failed_with(tenant, api_client, body, "KernelIdInUse")
        assert "in use" in status["message"]
        # Alice's kernel is untouched: still Running, same Secret, and it runs code.
        after = get(admin, namespace, f"k-{km.kernel_id}")
        assert after is not None and after["status"]["phase"] == "Running"
        assert after["status"]["backendRef"] == victim["status"]["backendRef"]
        assert (
            client.CoreV1Api(api_client)
            .read_namespaced_secret(f"k-{km.kernel_id}-connection", namespace)
            .data
            == secret_before
        )
        async with ready_client(km) as kc:
            reply = await kc.execute_interactive("6 * 7", timeout=20)
            assert reply["content"]["status"] == "ok"
        # Deleting the tenant's impostor does nothing to Alice's kernel either.
        delete_and_wait_gone(tenant.custom, tenant.namespace, body["metadata"]["name"])
        assert (get(admin, namespace, f"k-{km.kernel_id}") or {}).get("status", {}).get("phase") == "Running"
    finally:
        await km.shutdown_kernel(now=True)


def _client_key() -> tuple[bytes, str]:
    private = protocol.new_private_key()
    return private, encode_public_key(protocol.public_key_of(private))


def test_a_connection_sealed_to_a_key_opens_for_it_alone_and_the_key_cannot_be_moved(
    tenant: Tenant, api_client: client.ApiClient
) -> None:
    ensure_profile(api_client, {"backend": "ssh", "ssh": {"hosts": ["localhost"]}}, name="tenant-ssh")
    private, public = _client_key()
    body = remote_kernel(username=tenant.username, profile="tenant-ssh", clientPublicKey=public)
    name = body["metadata"]["name"]
    create(tenant, body)
    admin = client.CustomObjectsApi(api_client)
    obj = wait_phase(admin, tenant.namespace, name, "Running", "Failed", timeout=60)
    assert obj["status"]["phase"] == "Running", obj["status"]
    connection, uid = obj["status"]["connection"], obj["metadata"]["uid"]
    secret = client.CoreV1Api(api_client).read_namespaced_secret(
        connection["secretRef"]["name"], tenant.namespace
    )
    assert open_sealed(connection["sealed"], private, uid) == {
        k: v for k, v in secret.data.items() if k in FIELDS
    }
    with pytest.raises(SealError):  # whoever else reads the RemoteKernel sees ciphertext
        open_sealed(connection["sealed"], _client_key()[0], uid)
    # The tenant can neither re-aim the key (to have it sealed again to another) nor drop it.
    for value in (_client_key()[1], None):
        with pytest.raises(ApiException) as err:
            tenant.custom.patch_namespaced_custom_object(
                GROUP, VERSION, tenant.namespace, PLURAL, name, {"spec": {"clientPublicKey": value}}
            )
        assert err.value.status == 422 and "clientPublicKey is immutable" in err.value.body, err.value.body
    delete_and_wait_gone(tenant.custom, tenant.namespace, name)
    # Nor add one to a kernel made without.
    body = remote_kernel(username=tenant.username, profile="tenant-ssh")
    create(tenant, body)
    with pytest.raises(ApiException) as err:
        tenant.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            tenant.namespace,
            PLURAL,
            body["metadata"]["name"],
            {"spec": {"clientPublicKey": public}},
        )
    assert err.value.status == 422 and "clientPublicKey is immutable" in err.value.body, err.value.body
    delete_and_wait_gone(tenant.custom, tenant.namespace, body["metadata"]["name"])
    # A key that is no key: refused by the API; a low-order point: Failed, nothing started.
    bad = remote_kernel(username=tenant.username, profile="tenant-ssh", clientPublicKey="not a key")
    assert refused_by_api(tenant, bad).status == 422
    low = remote_kernel(username=tenant.username, profile="tenant-ssh", clientPublicKey="A" * 43 + "=")
    assert "low-order point" in failed_with(tenant, api_client, low, "InvalidSpec")["message"]
    delete_and_wait_gone(tenant.custom, tenant.namespace, low["metadata"]["name"])


async def test_a_client_without_rights_to_secrets_runs_its_kernel_on_the_key_sealed_to_it(
    tenant: Tenant, api_client: client.ApiClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jupyter's provisioner as the tenant: its role covers RemoteKernels and no Secret, so the
    kernel's key can only come sealed to this process's key."""
    ensure_profile(api_client, {"backend": "ssh", "ssh": {"hosts": ["localhost"]}}, name="tenant-ssh")
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(tenant.api).list_namespaced_secret(tenant.namespace)
    assert err.value.status == 403
    key = PROCESS_KEY.wait(30)  # made by this process's first launch; made here if none came yet
    assert key is not None
    kubeconfig = _token_kubeconfig(api_client, tenant.namespace, TENANT_SA, tmp_path / "tenant.kubeconfig")
    spec_dir = tmp_path / "jupyter" / "kernels" / "remote-tenant"
    spec_dir.mkdir(parents=True)
    config = {"namespace": tenant.namespace, "kubeconfig": str(kubeconfig), "profile": "tenant-ssh"}
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["python", "-m", "kernel_launchers.python_launcher"],
                "display_name": "Remote Python (tenant)",
                "language": "python",
                "metadata": {"kernel_provisioner": {"provisioner_name": "remote-kernel", "config": config}},
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    km = AsyncKernelManager(kernel_name="remote-tenant")
    await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": tenant.username})
    try:
        obj = get(client.CustomObjectsApi(api_client), tenant.namespace, f"k-{km.kernel_id}")
        assert obj is not None and obj["spec"]["clientPublicKey"] == key[1]
        assert obj["status"]["connection"]["sealed"]
        async with ready_client(km) as kc:
            reply = await kc.execute_interactive("6 * 7", timeout=20)
            assert reply["content"]["status"] == "ok"
    finally:
        await km.shutdown_kernel(now=True)
    assert get(client.CustomObjectsApi(api_client), tenant.namespace, f"k-{km.kernel_id}") is None


def test_a_tampered_backend_ref_makes_the_operator_delete_nothing_else(
    tenant: Tenant, api_client: client.ApiClient, kube_node: str, kernel_image: str
) -> None:
    """Who can write status (not a tenant: shown above) still cannot aim the operator's stop at
    another object: it acts only on what carries the RemoteKernel's uid."""
    core = client.CoreV1Api(api_client)
    admin = client.CustomObjectsApi(api_client)
    victim_ns = f"victim-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=victim_ns)))
    try:
        core.create_namespaced_secret(
            victim_ns,
            client.V1Secret(metadata=client.V1ObjectMeta(name="crown-jewels"), string_data={"a": "b"}),
        )
        # A kernel its profile refuses (it must be culled within an hour): nothing is started.
        ensure_profile(
            api_client,
            {"backend": "kubernetes", "maxima": {"idleTimeoutSeconds": 3600}},
            name="tenant-nothing",
        )
        body = remote_kernel(username=tenant.username, profile="tenant-nothing")
        create(tenant, body)
        name = body["metadata"]["name"]
        wait_phase(admin, tenant.namespace, name, "Failed", "Running", timeout=60)
        admin.patch_namespaced_custom_object_status(
            GROUP, VERSION, tenant.namespace, PLURAL, name,
            {"status": {"backend": "kubernetes", "backendRef": {"kind": "Pod", "namespace": victim_ns,
             "name": "crown-jewels", "tokenSecret": "crown-jewels", "ownNamespace": True}}},
        )  # fmt: skip
        tenant.custom.delete_namespaced_custom_object(GROUP, VERSION, tenant.namespace, PLURAL, name)
        wait_for(
            lambda: get(admin, tenant.namespace, name) is None, timeout=30, what="the kernel to be deleted"
        )
        assert core.read_namespaced_secret("crown-jewels", victim_ns).data  # still there
        assert core.read_namespace(victim_ns).status.phase == "Active"  # and its namespace
    finally:
        core.delete_namespace(victim_ns)


# -- containers and processes ------------------------------------------------------------------


def test_a_container_kernel_is_never_root_mounts_nothing_and_holds_no_token_in_its_spec(
    tenant: Tenant,
    api_client: client.ApiClient,
    docker_engine: DockerEngine,
    kernel_image: str,
    no_kernel_leftovers: None,
) -> None:
    ensure_profile(api_client, {"backend": "docker", "image": kernel_image}, name="tenant-docker")
    kernel_id = str(uuid.uuid4())
    body = remote_kernel(
        kernel_id,
        username=tenant.username,
        profile="tenant-docker",
        env={"KERNEL_UID": "0", "KERNEL_SECRET_NOTE": "s3cr3t-value"},
    )
    create(tenant, body)
    admin = client.CustomObjectsApi(api_client)
    status = wait_phase(admin, tenant.namespace, body["metadata"]["name"], "Running", "Failed", timeout=90)[
        "status"
    ]
    assert status["phase"] == "Running", status
    container = docker.DockerClient(base_url=docker_engine.host).containers.get(status["backendRef"]["id"])
    config, host = container.attrs["Config"], container.attrs["HostConfig"]
    assert config["User"] == "1000:1000"
    assert (
        not host["Privileged"] and host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    )
    assert not container.attrs["Mounts"]
    assert not [e for e in config["Env"] if e.startswith("RKO_LAUNCH_TOKEN")]
    assert "s3cr3t-value" not in " ".join(config["Cmd"])
    top = container.top(ps_args="-o pid,uid,args")
    assert top["Processes"] and all(row[1] != "0" for row in top["Processes"]), top
    delete_and_wait_gone(tenant.custom, tenant.namespace, body["metadata"]["name"])


def test_an_ssh_kernels_token_and_env_are_on_no_command_line(
    tenant: Tenant, api_client: client.ApiClient
) -> None:
    body = remote_kernel(username=tenant.username, profile="tenant-ssh", env={"KERNEL_NOTE": "s3cr3t-value"})
    ensure_profile(api_client, {"backend": "ssh", "ssh": {"hosts": ["localhost"]}}, name="tenant-ssh")
    create(tenant, body)
    admin = client.CustomObjectsApi(api_client)
    status = wait_phase(admin, tenant.namespace, body["metadata"]["name"], "Running", "Failed", timeout=60)[
        "status"
    ]
    assert status["phase"] == "Running", status
    pid = status["backendRef"]["pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    assert "--launch-file" in cmdline and "s3cr3t-value" not in cmdline and "RKO_LAUNCH_TOKEN" not in environ
    assert not [c for c in launcher_processes() if "s3cr3t-value" in c]
    run_dir = Path(status["backendRef"]["runDir"])
    assert run_dir.stat().st_mode & 0o777 == 0o700 and not (run_dir / "launch.json").exists()
    delete_and_wait_gone(tenant.custom, tenant.namespace, body["metadata"]["name"])


# -- the listener and the control port under abuse ----------------------------------------------


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def test_five_thousand_idle_connections_do_not_stop_a_kernel_launching_and_running(
    operator: OperatorProcess,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    host, _, port = operator.env["RKO_RESPONSE_BIND"].rpartition(":")
    assert operator.proc is not None
    held: list[socket.socket] = []
    try:
        started = time.monotonic()
        while len(held) < 5000 and time.monotonic() - started < 60:
            sock = socket.socket()
            sock.settimeout(2)
            try:
                sock.connect((host, int(port)))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        assert len(held) == 5000
        # A kernel launches (its launcher reports through the same listener) and runs code.
        km = await start_remote_kernel(tmp_path, kubeconfig, namespace, monkeypatch)
        try:
            async with ready_client(km) as kc:
                reply = await kc.execute_interactive("6 * 7", timeout=20)
                assert reply["content"]["status"] == "ok"
        finally:
            await km.shutdown_kernel(now=True)
        limit = 512 * 2**20  # the chart's memory limit for the operator
        rss = _rss_bytes(operator.proc.pid)
        print(f"operator RSS with 5000 idle connections: {rss / 2**20:.0f} MiB")
        assert rss < limit
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_control_port_held_by_a_slow_client_still_takes_a_signal(
    operator: OperatorProcess,
    api_client: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    km = await start_remote_kernel(tmp_path, kubeconfig, namespace, monkeypatch, interrupt_mode="signal")
    status = get(client.CustomObjectsApi(api_client), namespace, f"k-{km.kernel_id}")["status"]  # type: ignore[index]
    control = (status["connection"]["ip"], status["backendRef"]["controlPort"])
    # Slow clients: each sends one byte now and then, never a whole request.
    slow = []
    for _ in range(4):
        sock = socket.create_connection(control, timeout=5)
        sock.sendall(b"{")
        slow.append(sock)
    try:

        def trickle() -> None:
            for sock in slow:
                sock.sendall(b" ")

        await assert_interrupt_ends_a_long_cell(km, before=trickle)
    finally:
        for sock in slow:
            sock.close()
        await km.shutdown_kernel(now=True)


def test_only_kernels_may_reach_the_listener_by_the_charts_network_policy(helm: Path) -> None:  # noqa: F811
    out = run_helm(
        helm, "template", CHART_RELEASE, str(CHART), "--kube-version", KUBE_VERSION,
        "-s", "templates/networkpolicy.yaml", "--set", "networkPolicy.kernelSources[0].ipBlock.cidr=10.1.0.0/16",
    )  # fmt: skip
    (policy,) = [d for d in yaml.safe_load_all(out.stdout) if d]
    listener, probes = policy["spec"]["ingress"]
    assert listener["ports"] == [{"port": 8877, "protocol": "TCP"}]
    assert listener["from"] == [
        {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "remote-kernel"}},
        },
        {"ipBlock": {"cidr": "10.1.0.0/16"}},
    ]
    assert "from" not in probes and probes["ports"] == [{"port": 8080, "protocol": "TCP"}]


def test_the_chart_ships_the_tenant_roles_it_claims(helm: Path) -> None:  # noqa: F811
    out = run_helm(
        helm,
        "template",
        CHART_RELEASE,
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        "-s",
        "templates/tenant-rbac.yaml",
    )
    roles = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out.stdout) if d}
    edit = roles[f"{CHART_RELEASE}-remote-kernel-operator-tenant-edit"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    rule, pools = edit["rules"]
    assert rule["resources"] == ["remotekernels"] and "remotekernels/status" not in json.dumps(roles)
    assert set(rule["verbs"]) == {"create", "get", "list", "watch", "delete", "patch"}
    # Pools: editors read them; only namespace admins make and scale them.
    assert pools["resources"] == ["remotekernelpools"] and set(pools["verbs"]) == {"get", "list", "watch"}
    pool_admin = roles[f"{CHART_RELEASE}-remote-kernel-operator-pool-admin"]
    assert pool_admin["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert "remotekernelpools/status" not in json.dumps(pool_admin)


def test_a_tenant_makes_pools_only_with_a_namespace_admins_rights_and_only_for_itself(
    tenant: Tenant, api_client: client.ApiClient
) -> None:
    pool = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RemoteKernelPool",
        "metadata": {"name": "mine"},
        "spec": {"replicas": 0, "profile": "tenant-pods"},
    }
    pools = "remotekernelpools"
    with pytest.raises(ApiException) as err:
        tenant.custom.create_namespaced_custom_object(
            GROUP, VERSION, tenant.namespace, pools, pool, dry_run="All"
        )
    assert err.value.status == 403  # editors read pools; they do not make them
    rbac = client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role_binding(
        tenant.namespace,
        {
            "metadata": {"name": "jupyter-pool-admin"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": f"{CHART_RELEASE}-remote-kernel-operator-pool-admin",
            },
            "subjects": [{"kind": "ServiceAccount", "name": TENANT_SA, "namespace": tenant.namespace}],
        },
    )
    try:

        def create_pool(body: dict[str, Any]) -> Any:
            return tenant.custom.create_namespaced_custom_object(
                GROUP, VERSION, tenant.namespace, pools, body, dry_run="All"
            )

        def allowed() -> bool:
            try:
                create_pool(pool)
            except ApiException as e:
                assert e.status == 403, e
                return False
            return True

        wait_for(allowed, timeout=30, what="the pool-admin role to take effect")
        # A pool of someone else's kernels (impersonating profiles need one) is refused like a
        # RemoteKernel naming someone else.
        with pytest.raises(ApiException) as err:
            create_pool({**pool, "spec": {**pool["spec"], "username": "someone-else"}})
        assert err.value.status == 403 and "act-as" in err.value.body
        create_pool({**pool, "spec": {**pool["spec"], "username": tenant.username}})
        # The pool's status (its counts) stays the operator's.
        with pytest.raises(ApiException) as err:
            tenant.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, tenant.namespace, pools, "mine", {"status": {"ready": 99}}
            )
        assert err.value.status in (403, 404)
    finally:
        rbac.delete_namespaced_role_binding("jupyter-pool-admin", tenant.namespace)
