"""The Helm chart: lint and render, then install it into the real control plane (RBAC on).

The installed operator runs twice over: as the chart's Deployment, in its image, in a pod the
real kubelet runs (with the pod's own ServiceAccount token, a read-only root filesystem, no
capabilities, probes run by the kubelet); and as a process holding a token of the chart's ServiceAccount, restarted once
per RBAC rule with that rule removed, to show that every rule is needed. Both serve their own
operator class, so the session's operator and they never touch each other's kernels.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from localcluster import free_port
from localcluster.docker import DockerEngine
from localcluster.node import KubeletNode, NodeAddresses
from localcluster.servers import OperatorProcess, Sshd
from tests.helpers import REPO_ROOT, wait_for

from .conftest import ensure_namespace
from .test_faults import delete_and_check_nothing_left, runs_code
from .test_leader_election import seconds_to_first_status, wait_some_launching
from .test_operator_ssh import (
    GROUP,
    PLURAL,
    VERSION,
    get,
    make_kernel,
    ready_client,
    start_remote_kernel,
    wait_phase,
)

CHART = REPO_ROOT / "charts" / "remote-kernel-operator"
KUBE_VERSION = "1.37.0"
NAMESPACE = "rko-chart"
RELEASE = "rko"
FULLNAME = "rko-remote-kernel-operator"
GATEWAY = NodeAddresses.for_index(0).gateway  # the session's test node (node_network)
SSH_SECRET = "rko-ssh"
# Words in a log that mean a right was missing: the API's 403 (its reason, "Forbidden", which
# every such error carries: a bare "403" also matches log timestamps and kernel ids), and kopf's
# own warning when it may not follow CRDs.
DENIED = ("Forbidden", "Not enough permissions")


def denied_lines(log: str) -> list[str]:
    """The lines of an operator's log that say a right was missing."""
    return [line for line in log.splitlines() if any(word in line for word in DENIED)]


# How long the rule scenario keeps its kernels running: several monitor intervals.
WATCH_RUNNING_SECONDS = 3.0
pytestmark = pytest.mark.timeout(600)


# -- helm ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm() -> Path:
    """helm, built once from its Go module; its caches and config kept out of $HOME."""
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "helm" / "build.sh")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def helm_env(kubeconfig: Path | None = None) -> dict[str, str]:
    home = REPO_ROOT / ".cache" / "helm" / "home"
    env = {
        "PATH": "/usr/bin:/bin",
        # helm's Kubernetes client keeps a discovery cache under $HOME/.kube: not in the tree.
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


def run_helm(
    helm: Path, *args: str, kubeconfig: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = helm_env(kubeconfig)
    result = subprocess.run([str(helm), *args], env=env, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def set_args(values: list[str] | tuple[str, ...]) -> list[str]:
    """helm's --set arguments for ``values`` (each "key=value")."""
    return [arg for value in values for arg in ("--set", value)]


def render(helm: Path, *values: str, api_versions: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The chart rendered with ``values``, on a cluster that serves ``api_versions`` too."""
    sets = set_args(values)
    extra = [arg for version in api_versions for arg in ("--api-versions", version)]
    out = run_helm(
        helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", KUBE_VERSION, *extra, *sets
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def installed_manifest(helm: Path, release: str, namespace: str, kubeconfig: Path) -> list[dict[str, Any]]:
    """The objects a release installed, as Helm recorded them."""
    out = run_helm(helm, "get", "manifest", release, "-n", namespace, kubeconfig=kubeconfig)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] in kinds]


def container_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = of_kind(docs, "Deployment")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env if "value" in e}  # not POD_IP, from the downward API


# -- static checks -----------------------------------------------------------------------------


def test_the_chart_lints_and_carries_the_crd_from_its_single_source(helm: Path) -> None:
    for values in (
        [],
        ["singleNamespace=true", "kernels.checkNodes=false"],
        ["kernels.perKernelNamespace=true"],
    ):
        sets = set_args(values)
        result = run_helm(helm, "lint", "--strict", str(CHART), *sets)
        assert "0 chart(s) failed" in result.stdout, result.stdout
    sources = sorted((REPO_ROOT / "crds").glob("*.yaml"))
    assert [s.name for s in sources] == [
        "remotekernelpools.kernel-operator.io.yaml",
        "remotekernelprofiles.kernel-operator.io.yaml",
        "remotekernels.kernel-operator.io.yaml",
    ]
    for source in sources:
        copy_ = CHART / "crds" / source.name
        assert copy_.read_bytes() == source.read_bytes(), (
            f"{copy_} has drifted from {source}: copy crds/ into the chart (make chart checks this)"
        )
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [s.name for s in sources]


def test_the_rbac_is_narrow_and_split_into_framework_and_application(helm: Path) -> None:
    docs = render(helm)
    roles = of_kind(docs, "ClusterRole", "Role")
    assert {(r["kind"], r["metadata"]["name"]) for r in roles} == {
        ("ClusterRole", f"{FULLNAME}-framework"),
        ("ClusterRole", f"{FULLNAME}-application"),
        ("ClusterRole", f"{FULLNAME}-profiles"),
        # Tenants' roles (aggregated into edit/admin and view), bound to no one by the chart.
        ("ClusterRole", f"{FULLNAME}-tenant-edit"),
        ("ClusterRole", f"{FULLNAME}-tenant-view"),
        ("ClusterRole", f"{FULLNAME}-profile-viewer"),
        ("ClusterRole", f"{FULLNAME}-pool-admin"),  # aggregated into admin: pools
        ("Role", f"{FULLNAME}-leader-election"),  # its one Lease, in its own namespace
    }
    bound = {b["roleRef"]["name"] for b in of_kind(docs, "ClusterRoleBinding", "RoleBinding")}
    tenants = {f"{FULLNAME}-{n}" for n in ("tenant-edit", "tenant-view", "profile-viewer", "pool-admin")}
    assert not tenants & bound
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], f"a wildcard in {role['metadata']['name']}: {rule}"
            if "secrets" in rule["resources"]:
                # Secrets are never listed or watched, and in the operator's own namespace only
                # its two named Secrets may be read.
                assert not {"list", "watch"} & set(rule["verbs"]), rule
    # Serving other namespaces only, the operator may read just its two Secrets in its own.
    docs = render(helm, "watchNamespaces={team-a}", "kernels.checkNodes=false", "ssh.secretName=creds")
    own = [
        r
        for r in of_kind(docs, "Role")
        if r["metadata"]["namespace"] == NAMESPACE and not r["metadata"]["name"].endswith("-leader-election")
    ]
    assert [r["rules"] for r in own] == [
        [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "verbs": ["get"],
                "resourceNames": [f"{FULLNAME}-keys", "creds"],
            },
            # Pooled kernels' Secrets, until claimed (names are per kernel: none to list).
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get", "delete"]},
        ]
    ]
    operator_rules = [
        rule
        for r in roles
        if not r["metadata"]["name"].endswith(("-edit", "-view", "-viewer", "-pool-admin"))
        for rule in r["rules"]
    ]
    resources = {res for rule in operator_rules for res in rule["resources"]}
    # What Enterprise Gateway's chart grants and this one must not.
    assert not {"rolebindings", "clusterroles", "configmaps", "services"} & resources
    # Namespaces are only read (a profile's namespaceSelector), never made or deleted by default.
    assert [rule["verbs"] for rule in operator_rules if "namespaces" in rule["resources"]] == [["get"]]


def test_the_single_namespace_mode_reads_only_profiles_and_its_namespace_cluster_wide(helm: Path) -> None:
    docs = render(helm, "singleNamespace=true", "kernels.checkNodes=false", "rbac.tenantRoles=false")
    # Profiles are cluster-scoped (the administrator's): reading them, and the served namespace's
    # labels by name, is all the cluster-wide right this mode has.
    (profiles,) = of_kind(docs, "ClusterRole")
    assert profiles["rules"] == [
        {"apiGroups": [GROUP], "resources": ["remotekernelprofiles"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"], "resourceNames": [NAMESPACE]},
    ]
    assert [b["roleRef"]["name"] for b in of_kind(docs, "ClusterRoleBinding")] == [
        profiles["metadata"]["name"]
    ]
    assert {d["metadata"]["namespace"] for d in of_kind(docs, "Role", "RoleBinding")} == {NAMESPACE}
    env = container_env(docs)
    assert env["RKO_WATCH_NAMESPACES"] == NAMESPACE
    assert env["RKO_CHECK_NODES"] == "false"


def test_the_deployment_is_hardened_and_runs_one_leader_among_its_replicas(helm: Path) -> None:
    docs = render(helm, "ssh.hosts={h1,h2}", "ssh.secretName=creds", "extraEnv.RKO_MONITOR_INTERVAL=2")
    (deployment,) = of_kind(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert pod["terminationGracePeriodSeconds"] == 40  # drainSeconds and the handlers' time
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    env = container_env(docs)
    assert env["RKO_SSH_HOSTS"] == "h1,h2" and env["RKO_SSH_SECRET"] == "creds"
    assert env["RKO_MONITOR_INTERVAL"] == "2"
    assert env["RKO_RESPONSE_ADDRESS"] == f"{FULLNAME}.{NAMESPACE}.svc:8877"
    assert env["RKO_LEADER_ELECTION"] == "true" and env["RKO_LEADER_LEASE"] == f"{FULLNAME}-leader"
    assert env["RKO_HTTP_BIND"] == "0.0.0.0:8080" and "RKO_LIVENESS_ENDPOINT" not in env
    names = {e["name"]: e for e in container["env"]}
    assert names["RKO_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (service,) = of_kind(docs, "Service")
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("response", 8877),
        ("metrics", 8080),
    ]
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    (lease_role,) = [r for r in of_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    assert lease_role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "update"],
            "resourceNames": [f"{FULLNAME}-leader"],
        },
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]},
    ]
    assert env["RKO_PEER_SERVICE"] == FULLNAME
    (lease,) = of_kind(docs, "Lease")  # Helm's: removed on uninstall
    assert lease["metadata"]["name"] == f"{FULLNAME}-leader" and "holderIdentity" not in lease["spec"]
    assert not of_kind(docs, "ServiceMonitor")  # no Prometheus Operator here


def test_without_leader_election_one_replica_is_replaced_with_recreate(helm: Path) -> None:
    docs = render(helm, "leaderElection.enabled=false")
    (deployment,) = of_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert not of_kind(docs, "PodDisruptionBudget")
    assert not [r for r in of_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    assert container_env(docs)["RKO_LEADER_ELECTION"] == "false"


def test_a_service_monitor_and_the_dashboard_where_asked_for(helm: Path) -> None:
    docs = render(
        helm,
        "metrics.dashboardConfigMap.enabled=true",
        "logFormat=json",
        api_versions=("monitoring.coreos.com/v1/ServiceMonitor",),
    )
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (dashboard,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "dashboards" / "remote-kernel-operator.json").read_text()
    assert json.loads(dashboard["data"]["remote-kernel-operator.json"]) == json.loads(shipped)
    assert container_env(docs)["RKO_LOG_FORMAT"] == "json"


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (
            ["singleNamespace=true", "kernels.perKernelNamespace=true", "kernels.checkNodes=false"],
            "cluster-wide right",
        ),
        (["singleNamespace=true"], "checkNodes reads Nodes"),
        (["singleNamespace=true", "watchNamespaces={a}", "kernels.checkNodes=false"], "not both"),
        (["kernels.clusterRole=cluster-admin"], "full control of the cluster"),
        (["extraEnv.PATH=/tmp"], "only RKO_"),
        (["ssh.loadBalancing=random"], "round-robin or least-connection"),
        (["kernels.transportEncryption=maybe"], "disabled, auto or required"),
        (["serviceAccount.create=false"], "serviceAccount.name must name"),
        (["customObjects.kinds[0].group=example.com"], "needs group and resources"),
        (
            [
                "profiles[0].name=a",
                "profiles[0].default=true",
                "profiles[0].spec.backend=ssh",
                "profiles[1].name=b",
                "profiles[1].default=true",
                "profiles[1].spec.backend=ssh",
            ],
            "Only one of profiles may be the default",
        ),
        (["profiles[0].name=a"], "needs a name and a spec"),
    ],
)
def test_values_that_cannot_work_are_refused_with_what_to_change(
    helm: Path, values: list[str], words: str
) -> None:
    sets = set_args(values)
    result = run_helm(
        helm,
        "template",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        *sets,
        check=False,
    )
    assert result.returncode != 0
    assert words in result.stderr, result.stderr


def test_per_kernel_namespaces_add_only_their_rights_and_bind_one_role(helm: Path) -> None:
    docs = render(helm, "kernels.perKernelNamespace=true")
    (app,) = [r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("-application")]
    bind = [rule for rule in app["rules"] if "bind" in rule["verbs"]]
    assert bind == [
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterroles"],
            "verbs": ["bind"],
            "resourceNames": ["remote-kernel"],
        }
    ]
    assert container_env(docs)["RKO_SHARED_NAMESPACE"] == "false"
    assert any(r["metadata"]["name"] == "remote-kernel" for r in of_kind(docs, "ClusterRole"))


def test_custom_object_backends_get_rights_only_when_enabled(helm: Path) -> None:
    def rules(*values: str) -> list[dict[str, Any]]:
        docs = render(helm, *values)
        (app,) = [r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("-application")]
        return list(app["rules"])

    default = rules()
    assert not [r for r in default if "sparkoperator.k8s.io" in r["apiGroups"]]
    # Kernel pods are followed by one watch: list and watch belong to every install.
    assert {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["create", "get", "list", "watch", "delete"],
    } in default
    spark = rules("customObjects.sparkApplications=true")
    assert {
        "apiGroups": ["sparkoperator.k8s.io"],
        "resources": ["sparkapplications"],
        "verbs": ["create", "get", "delete"],
    } in spark
    kinds = rules(
        "customObjects.kinds[0].group=example.com", "customObjects.kinds[0].resources[0]=notebookjobs"
    )
    assert {
        "apiGroups": ["example.com"],
        "resources": ["notebookjobs"],
        "verbs": ["create", "get", "delete"],
    } in kinds
    assert not [r for r in kinds if "sparkoperator.k8s.io" in r["apiGroups"]]
    # The namespaced mode's Roles carry the same rules (one template feeds both).
    docs = render(
        helm, "singleNamespace=true", "kernels.checkNodes=false", "customObjects.sparkApplications=true"
    )
    assert any(
        "sparkoperator.k8s.io" in r["apiGroups"] for role in of_kind(docs, "Role") for r in role["rules"]
    )


# -- installed into the control plane ------------------------------------------------------------


@dataclass
class Installed:
    values: list[str]
    response_port: int
    probe_port: int
    docs: list[dict[str, Any]]


def ssh_secret(core: client.CoreV1Api, namespace: str, sshd: Sshd) -> None:
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=SSH_SECRET),
        type="kubernetes.io/ssh-auth",
        string_data={
            "ssh-privatekey": sshd.client_key.read_text(),
            "known_hosts": sshd.known_hosts.read_text(),
        },
    )
    try:
        core.create_namespaced_secret(namespace, body)
    except ApiException as err:
        assert err.status == 409, err


@pytest.fixture(scope="module")
def operator_image(docker_engine: DockerEngine, node_images: Callable[[str], str]) -> str:
    return node_images(docker_engine.build_operator_image())  # built, then copied into the node


@pytest.fixture(scope="module")
def chart_sshd(node_network: KubeletNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """An sshd on the test node's gateway: the machine as the operator's pod sees it."""
    server = Sshd(tmp_path_factory.mktemp("chart-sshd"), host=node_network.addresses.gateway)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def installed(
    helm: Path,
    kubeconfig: Path,
    crd: None,
    api_client: client.ApiClient,
    chart_sshd: Sshd,
    kernel_image: str,
    operator_image: str,
    kube_node: str,
) -> Iterator[Installed]:
    """The chart installed with the operator image; the operator pod runs on the real node."""
    sshd = chart_sshd
    ensure_namespace(api_client, NAMESPACE)
    ssh_secret(client.CoreV1Api(api_client), NAMESPACE, sshd)
    response_port, probe_port = free_port(), free_port()
    repository, tag = operator_image.split(":")
    values = [
        "operatorClass=chart",
        f"image.repository={repository}",
        f"image.tag={tag}",
        f"kernels.image={kernel_image}",
        f"responseListener.port={response_port}",
        # No cluster DNS here: launchers dial the operator pod's own address.
        f"responseListener.address=$(POD_IP):{response_port}",
        f"probes.port={probe_port}",
        f"ssh.hosts={{{sshd.host}}}",
        f"ssh.port={sshd.port}",
        "ssh.user=root",
        f"ssh.python={sys.executable}",
        f"ssh.secretName={SSH_SECRET}",
        "extraEnv.RKO_MONITOR_INTERVAL=0.5",
    ]
    sets = set_args(values)
    run_helm(helm, "install", RELEASE, str(CHART), "-n", NAMESPACE, *sets, kubeconfig=kubeconfig)
    docs = installed_manifest(helm, RELEASE, NAMESPACE, kubeconfig)
    yield Installed(values, response_port, probe_port, docs)
    if run_helm(helm, "status", RELEASE, "-n", NAMESPACE, kubeconfig=kubeconfig, check=False).returncode == 0:
        run_helm(helm, "uninstall", RELEASE, "-n", NAMESPACE, "--wait", kubeconfig=kubeconfig)


LEASE = f"{FULLNAME}-leader"


def lease_holder(api_client: client.ApiClient) -> str:
    try:
        lease = client.CoordinationV1Api(api_client).read_namespaced_lease(LEASE, NAMESPACE)
    except ApiException as err:
        if err.status == 404:
            return ""
        raise
    return str(lease.spec.holder_identity or "")


def ready_pods(core: client.CoreV1Api) -> list[Any]:
    """The chart's operator pods the kubelet reports Ready (their readiness probe passed)."""
    found = []
    for pod in core.list_namespaced_pod(
        NAMESPACE, label_selector=f"app.kubernetes.io/instance={RELEASE}"
    ).items:
        conditions = {c.type: c.status for c in pod.status.conditions or []}
        if (
            pod.status.phase == "Running"
            and conditions.get("Ready") == "True"
            and not pod.metadata.deletion_timestamp
        ):
            found.append(pod)
    return found


def wait_both_ready(core: client.CoreV1Api, timeout: float = 120) -> None:
    """Both replicas Ready; else fail with what the pods say (phase, conditions, log tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(ready_pods(core)) == 2:
            return
        time.sleep(0.5)
    said = []
    for pod in core.list_namespaced_pod(
        NAMESPACE, label_selector=f"app.kubernetes.io/instance={RELEASE}"
    ).items:
        try:
            tail = core.read_namespaced_pod_log(pod.metadata.name, NAMESPACE, tail_lines=15)
        except ApiException as err:
            tail = f"(no log: {err.reason})"
        said.append(
            f"{pod.metadata.name} {pod.status.phase} {pod.status.conditions} {pod.status.container_statuses}\n{tail}"
        )
    pytest.fail("the operator's two pods did not become Ready:\n" + "\n".join(said))


def leader_pod(core: client.CoreV1Api, api_client: client.ApiClient) -> Any:
    """The Ready operator pod that holds the leader Lease, once there is one."""
    holder = lease_holder(api_client)
    return next((pod for pod in ready_pods(core) if pod.metadata.name == holder), None)


def operator_processes() -> list[int]:
    """The machine's pids of the operators running in the chart's pods (found by their settings)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"remote-kernel-operator" not in (entry / "cmdline").read_bytes():
                continue
            if b"RKO_OPERATOR_CLASS=chart\0" in (entry / "environ").read_bytes() + b"\0":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def process_of_pod(pod_name: str) -> int | None:
    """The operator process whose RKO_POD_NAME is ``pod_name``."""
    for pid in operator_processes():
        try:
            if f"RKO_POD_NAME={pod_name}\0".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                return pid
        except OSError:
            continue
    return None


def assert_hardened(pid: int) -> None:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    assert status["Uid"].split()[:2] == ["10001", "10001"] and status["Gid"].split()[0] == "10001"
    assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"].strip() == "1"
    root_mount = next(
        line.split()
        for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        if line.split()[4] == "/"
    )
    assert "ro" in root_mount[5].split(","), root_mount


def metric(host: str, port: int, name: str) -> float | None:
    """One unlabelled sample of a replica's /metrics."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return None


def healthy(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


async def run_code(km: Any, code: str) -> str:
    async with ready_client(km) as kc:
        outputs: list[str] = []
        reply = await kc.execute_interactive(
            code, timeout=30, output_hook=lambda m: outputs.append(m["content"].get("text", ""))
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(outputs).strip()


async def test_the_charts_operator_pod_runs_pod_and_ssh_kernels_without_a_403(
    installed: Installed,
    chart_sshd: Sshd,
    api_client: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = client.CoreV1Api(api_client)
    # Ready is the kubelet's verdict from the chart's readiness probe (/readyz): both replicas.
    wait_both_ready(core)
    pod = wait_for(
        lambda: leader_pod(core, api_client), timeout=60, what="a leader among the operator's pods"
    )

    def logs() -> str:
        return str(core.read_namespaced_pod_log(pod.metadata.name, NAMESPACE))  # through the kubelet

    wait_for(
        lambda: "The operator is ready" in logs(), timeout=60, what="the operator in its pod to be ready"
    )
    # What the container runtime made of the securityContext, read from each process itself.
    pids = operator_processes()
    assert len(pids) == 2, pids
    for pid in pids:
        assert_hardened(pid)
    assert healthy(pod.status.pod_ip, installed.probe_port)
    standby = next(p for p in ready_pods(core) if p.metadata.name != pod.metadata.name)
    assert metric(pod.status.pod_ip, installed.probe_port, "rko_leader") == 1.0
    assert metric(standby.status.pod_ip, installed.probe_port, "rko_leader") == 0.0
    pod_dir, ssh_dir = tmp_path / "pod", tmp_path / "ssh"
    for path in (pod_dir, ssh_dir):
        path.mkdir()
    km = await start_remote_kernel(
        pod_dir, kubeconfig, NAMESPACE, monkeypatch, operator_class="chart", backend="kubernetes"
    )
    try:
        assert await run_code(km, "import sys; print(sys.prefix)") == "/opt/kernel"
    finally:
        await km.shutdown_kernel()
    km = await start_remote_kernel(
        ssh_dir, kubeconfig, NAMESPACE, monkeypatch, operator_class="chart", remote_hosts=[chart_sshd.host]
    )
    try:
        assert await run_code(km, "print(6 * 7)") == "42"
    finally:
        await km.shutdown_kernel()
    custom = client.CustomObjectsApi(api_client)
    wait_for(
        lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"],
        timeout=30,
        what="the chart's kernels to be gone",
    )
    text = logs()
    assert not denied_lines(text), text[-3000:]


# -- every rule is needed ------------------------------------------------------------------------


def service_account_kubeconfig(
    api_client: client.ApiClient, admin: Path, namespace: str, name: str, path: Path
) -> Path:
    """A kubeconfig holding a token of ServiceAccount ``namespace/name``, from the TokenRequest API."""
    token = client.CoreV1Api(api_client).create_namespaced_service_account_token(
        name,
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
        ),
    )
    doc = yaml.safe_load(admin.read_text())
    cluster = doc["clusters"][0]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": name, "user": {"token": token.status.token}}],
                "contexts": [{"name": name, "context": {"cluster": cluster["name"], "user": name}}],
                "current-context": name,
            }
        )
    )
    return path


def process_env(installed_docs: list[dict[str, Any]], operator_class: str) -> dict[str, str]:
    """The Deployment's settings, with its own class and ports, for a process on this machine."""
    env = container_env(installed_docs)
    port = free_port()
    env.update(
        RKO_OPERATOR_CLASS=operator_class,
        # The node's gateway: this machine's address that the node's pods reach.
        RKO_RESPONSE_BIND=f"{GATEWAY}:{port}",
        RKO_RESPONSE_ADDRESS=f"{GATEWAY}:{port}",
        RKO_HTTP_BIND="",
        RKO_DRAIN_SECONDS="0",  # stopped and started once per rule: nothing to wait for
    )
    return env


def scenario(
    custom: client.CustomObjectsApi, proc: OperatorProcess, offset: int, labels: dict[str, str]
) -> str:
    """A pod kernel and an ssh kernel launched and deleted under ``proc``. Returns "" when all went
    well, else what went wrong (a denied call in the log, or a kernel that did not get there)."""
    # Profiles for the chart's namespace only: the operator reads the namespace's labels.
    only_here = {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    names = [
        make_kernel(
            NAMESPACE,
            custom,
            labels=labels,
            backend="kubernetes",
            username="alice",
            namespaceSelector=only_here,
        )[0],
        make_kernel(
            NAMESPACE,
            custom,
            labels=labels,
            backend="ssh",
            username="alice",
            ssh={"hosts": [GATEWAY]},
            namespaceSelector=only_here,
        )[0],
    ]

    def denied() -> str:
        log = proc.log()[offset:]
        return next(iter(denied_lines(log)), "")

    def phases() -> list[str]:
        return [((get(custom, NAMESPACE, n) or {}).get("status") or {}).get("phase", "") for n in names]

    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and not denied() and phases() != ["Running", "Running"]:
        time.sleep(0.3)
    if denied() or phases() != ["Running", "Running"]:
        return denied() or f"kernels did not run: {phases()}"
    # Watched while they run: the monitor reads each backend's status (a pod's Node too) every
    # RKO_MONITOR_INTERVAL (0.5 s here), and a launcher that reports quickly can otherwise be
    # deleted before the first of those reads.
    watched = time.monotonic() + WATCH_RUNNING_SECONDS
    while time.monotonic() < watched and not denied():
        time.sleep(0.3)
    if denied() or phases() != ["Running", "Running"]:
        return denied() or f"kernels did not keep running: {phases()}"
    for name in names:
        custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not denied() and any(get(custom, NAMESPACE, n) for n in names):
        time.sleep(0.3)
    if denied() or any(get(custom, NAMESPACE, n) for n in names):
        return denied() or "kernels were not deleted"
    return ""


def clean_up(custom: client.CustomObjectsApi, proc: OperatorProcess, labels: dict[str, str]) -> None:
    """With every right back, the operator finishes what a missing right left undone."""
    free_the_lease(custom.api_client)
    proc.start()
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    for item in custom.list_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, label_selector=selector
    )["items"]:
        try:
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, PLURAL, item["metadata"]["name"]
            )
        except ApiException as err:
            assert err.status == 404, err
    wait_for(
        lambda: (
            not custom.list_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, PLURAL, label_selector=selector
            )["items"]
        ),
        timeout=60,
        what="the kernels left by a missing right to be cleaned up",
    )
    proc.stop()


def test_every_rule_is_needed(
    installed: Installed,
    api_client: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
) -> None:
    """With the chart's rights the scenario runs without a 403; without any one rule it breaks."""
    rbac = client.RbacAuthorizationV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    sa_kubeconfig = service_account_kubeconfig(
        api_client, kubeconfig, NAMESPACE, FULLNAME, tmp_path / "sa.kubeconfig"
    )
    labels = {f"{GROUP}/operator-class": "chart-rules"}
    proc = OperatorProcess(
        sa_kubeconfig, tmp_path / "operator.log", process_env(installed.docs, "chart-rules")
    )
    # The process leads on the release's own Lease (the one its rights name): the release's
    # pods stand aside meanwhile.
    apps = client.AppsV1Api(api_client)
    core = client.CoreV1Api(api_client)
    wait_both_ready(core)  # none still starting (it could take the Lease after the scale-down)
    apps.patch_namespaced_deployment_scale(FULLNAME, NAMESPACE, {"spec": {"replicas": 0}})
    wait_for(
        lambda: (
            not operator_processes()
            and not core.list_namespaced_pod(
                NAMESPACE, label_selector=f"app.kubernetes.io/instance={RELEASE}"
            ).items
        ),
        timeout=120,
        what="the release's operator pods to be gone",
    )

    def run() -> str:
        offset = len(proc.log())
        free_the_lease(api_client)
        proc.start(wait_ready=False)
        try:
            return scenario(custom, proc, offset, labels)
        finally:
            proc.stop()

    assert run() == "", f"the chart's own rights are not enough: {proc.log()[-3000:]}"
    roles: list[tuple[str, str | None, dict[str, Any]]] = []
    for doc in of_kind(installed.docs, "ClusterRole", "Role"):
        name, namespace = doc["metadata"]["name"], doc["metadata"].get("namespace")
        if name.endswith(("-tenant-edit", "-tenant-view", "-profile-viewer", "-pool-admin")):
            continue  # tenants' roles: the operator is not bound to them
        live = (
            rbac.read_cluster_role(name) if namespace is None else rbac.read_namespaced_role(name, namespace)
        )
        roles.append((name, namespace, api_client.sanitize_for_serialization(live)))
    results: dict[str, str] = {}
    for name, namespace, live in roles:
        for index, rule in enumerate(live["rules"]):
            reduced = copy.deepcopy(live)
            del reduced["rules"][index]
            replace_role(rbac, name, namespace, reduced)
            try:
                results[f"{name}: {rule['resources']} {rule['verbs']}"] = run()
            finally:
                replace_role(rbac, name, namespace, live)
            clean_up(custom, proc, labels)
    apps.patch_namespaced_deployment_scale(FULLNAME, NAMESPACE, {"spec": {"replicas": 2}})
    wait_both_ready(core)
    for rule, broke in results.items():
        print(f"without {rule}: {broke[:160]}")
    unneeded = [rule for rule, broke in results.items() if not broke]
    assert not unneeded, f"rules nothing needed: {unneeded}"
    assert len(results) >= 9, results


def free_the_lease(api_client: client.ApiClient) -> None:
    """Empty the release's Lease's holder (as a clean stop leaves it), so the next one leads."""
    coordination = client.CoordinationV1Api(api_client)
    lease = coordination.read_namespaced_lease(LEASE, NAMESPACE)
    lease.spec.holder_identity = None
    coordination.replace_namespaced_lease(LEASE, NAMESPACE, lease)


def replace_role(
    rbac: client.RbacAuthorizationV1Api, name: str, namespace: str | None, body: dict[str, Any]
) -> None:
    body = {k: v for k, v in body.items() if k in ("apiVersion", "kind", "metadata", "rules")}
    body["metadata"] = {
        k: v for k, v in body["metadata"].items() if k in ("name", "namespace", "labels", "annotations")
    }
    if namespace is None:
        rbac.replace_cluster_role(name, body)
    else:
        rbac.replace_namespaced_role(name, namespace, body)


# -- several replicas: failover and a rolling upgrade -------------------------------------------

CHART_LABELS = {f"{GROUP}/operator-class": "chart"}
ONLY_HERE = {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}


def chart_kernels(custom: client.CustomObjectsApi, ssh: int, pods: int) -> dict[str, str]:
    """RemoteKernels for the chart's operator: ``ssh`` on the test node's gateway, ``pods`` in pods."""
    made = [
        make_kernel(
            NAMESPACE,
            custom,
            labels=CHART_LABELS,
            backend="ssh",
            username="alice",
            ssh={"hosts": [GATEWAY]},
            namespaceSelector=ONLY_HERE,
            launchTimeoutSeconds=120,
        )
        for _ in range(ssh)
    ]
    made += [
        make_kernel(
            NAMESPACE,
            custom,
            labels=CHART_LABELS,
            backend="kubernetes",
            username="alice",
            namespaceSelector=ONLY_HERE,
            launchTimeoutSeconds=120,
        )
        for _ in range(pods)
    ]
    return dict(made)


def all_running_and_answering(
    custom: client.CustomObjectsApi, api_client: client.ApiClient, names: dict[str, str]
) -> None:
    for name in names:
        obj = wait_phase(custom, NAMESPACE, name, "Running", "Failed", timeout=180)
        assert obj["status"]["phase"] == "Running", f"{name}: {obj['status'].get('message')}"
        assert runs_code(api_client, NAMESPACE, obj), name


def delete_and_check_nothing_left_here(
    custom: client.CustomObjectsApi, api_client: client.ApiClient, names: dict[str, str]
) -> None:
    delete_and_check_nothing_left(custom, api_client, NAMESPACE, names)
    core = client.CoreV1Api(api_client)
    wait_for(
        lambda: (
            not [
                p.metadata.name
                for p in core.list_namespaced_pod(NAMESPACE).items
                if any(k in p.metadata.name for k in names.values())
            ]
        ),
        timeout=60,
        what="the kernels' pods to be gone",
    )


@contextlib.contextmanager
def removed_on_failure(
    custom: client.CustomObjectsApi, api_client: client.ApiClient, *kernels: dict[str, str]
) -> Iterator[None]:
    """On a failure inside: print the operator pods' last log lines (what the failure is about),
    then delete the RemoteKernels in ``kernels`` (as filled by then) and wait for them to go, so
    their kernels do not outlive this test and fail the next ones' checks of what is left."""
    try:
        yield
    except BaseException:
        names = [name for group in kernels for name in group]
        core = client.CoreV1Api(api_client)
        for pod in core.list_namespaced_pod(
            NAMESPACE, label_selector=f"app.kubernetes.io/instance={RELEASE}"
        ).items:
            with contextlib.suppress(ApiException):
                tail = core.read_namespaced_pod_log(pod.metadata.name, NAMESPACE, tail_lines=80)
                print(f"--- the last log lines of {pod.metadata.name}:\n{tail}")
        for name in names:
            with contextlib.suppress(ApiException):
                custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
        with contextlib.suppress(Exception):
            wait_for(
                lambda: all(get(custom, NAMESPACE, n) is None for n in names), timeout=90, what="all deleted"
            )
        raise


def test_the_leader_pod_killed_during_concurrent_launches_loses_no_kernel(
    installed: Installed, api_client: client.ApiClient, custom: client.CustomObjectsApi
) -> None:
    """The leading replica's process SIGKILLed while 20 kernels launch (15 over ssh, 5 in
    pods): every kernel ends Running and runs code, a leader acts again within 15 s, and
    deleting them leaves nothing."""
    core = client.CoreV1Api(api_client)
    wait_both_ready(core)
    leader = wait_for(lambda: leader_pod(core, api_client), timeout=60, what="a leader")
    names: dict[str, str] = {}
    with removed_on_failure(custom, api_client, names):
        names.update(chart_kernels(custom, ssh=15, pods=5))
        wait_some_launching(custom, NAMESPACE, names)
        pid = process_of_pod(leader.metadata.name)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        probe = chart_kernels(custom, ssh=1, pods=0)
        names.update(probe)
        acted = seconds_to_first_status(custom, NAMESPACE, next(iter(probe)), killed)
        all_running_and_answering(custom, api_client, names)
        holder = lease_holder(api_client)
        print(
            f"chart: leader pod's process killed during 20 launches; a leader ({holder}, "
            f"{'the restarted container' if holder == leader.metadata.name else 'the standby'}) "
            f"wrote status {acted:.1f} s after the kill"
        )
        assert acted <= 15, acted
    delete_and_check_nothing_left_here(custom, api_client, names)


def test_the_leaders_node_lost_during_concurrent_launches_loses_no_kernel(
    installed: Installed,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    local_cluster: Any,
    docker_engine: DockerEngine,
    operator_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The leader's whole node lost (kubelet, containerd and every container on it SIGKILLed)
    while 20 kernels launch: the standby on the other node leads within 15 s, every launcher
    reports to it (each was given both replicas' addresses), and every kernel ends Running."""
    core = client.CoreV1Api(api_client)
    wait_both_ready(core)
    doomed = KubeletNode(tmp_path_factory.mktemp("ha-doomed"), local_cluster, name="node-ha", index=1)
    doomed.plumb()
    names: dict[str, str] = {}
    with removed_on_failure(custom, api_client, names):
        try:
            doomed.start(docker_engine.env)
            doomed.import_images(operator_image, docker_env=docker_engine.env)
            # Move one replica to the new node (the anti-affinity prefers it), then make it lead.
            first = wait_for(lambda: leader_pod(core, api_client), timeout=60, what="a leader")
            moved = None
            for _ in range(4):  # the scheduler's preference, not a rule: try again if it chose node-1
                (standby,) = [p for p in ready_pods(core) if p.metadata.name != first.metadata.name]
                core.delete_namespaced_pod(standby.metadata.name, NAMESPACE)
                wait_for(
                    lambda s=standby.metadata.name: (
                        len([p for p in ready_pods(core) if p.metadata.name != s]) == 2
                    ),
                    timeout=120,
                    what="the replacement replica to be Ready",
                )
                moved = next((p for p in ready_pods(core) if p.spec.node_name == doomed.name), None)
                if moved is not None:
                    break
            assert moved is not None, "no replica was scheduled to the new node"
            # Stop the leader on node-1 (SIGTERM: it hands the Lease over) until the new node's
            # replica leads: the handover goes to whichever standby tries first, and the
            # replacement pod (on node-1: the anti-affinity spreads) may be first.
            for _ in range(6):
                leader = wait_for(lambda: leader_pod(core, api_client), timeout=60, what="a leader")
                if leader.spec.node_name == doomed.name:
                    break
                core.delete_namespaced_pod(leader.metadata.name, NAMESPACE)
                wait_for(
                    lambda name=leader.metadata.name: lease_holder(api_client) not in ("", name),
                    timeout=60,
                    what="another replica to lead",
                )
                wait_both_ready(core)
            leader = wait_for(lambda: leader_pod(core, api_client), timeout=60, what="a leader")
            assert leader.spec.node_name == doomed.name, "the new node's replica never led"
            moved = leader
            wait_both_ready(core)
            # Both replicas in the Service's EndpointSlices: each launch names them both.
            discovery = client.DiscoveryV1Api(api_client)
            wait_for(
                lambda: (
                    sum(
                        1
                        for piece in discovery.list_namespaced_endpoint_slice(
                            NAMESPACE, label_selector=f"kubernetes.io/service-name={FULLNAME}"
                        ).items
                        for endpoint in piece.endpoints or []
                        if endpoint.conditions and endpoint.conditions.ready
                    )
                    == 2
                ),
                timeout=30,
                what="both replicas in the Service's endpoints",
            )
            names.update(
                chart_kernels(custom, ssh=20, pods=0)
            )  # launchers on this machine: they outlive the node
            wait_some_launching(custom, NAMESPACE, names)
            lost = time.monotonic()
            doomed.lose()  # every process of the node SIGKILLed at once: no Lease released
            probe = chart_kernels(custom, ssh=1, pods=0)
            acted = seconds_to_first_status(custom, NAMESPACE, next(iter(probe)), lost)
            names.update(probe)
            all_running_and_answering(custom, api_client, names)
            print(
                f"chart: the leader's node lost during 20 launches; the standby wrote status {acted:.1f} s later"
            )
            assert acted <= 15, acted
            assert lease_holder(api_client) not in ("", moved.metadata.name)
        finally:
            doomed.stop()
            with contextlib.suppress(ApiException):
                core.delete_node(doomed.name)
            for pod in core.list_namespaced_pod(
                NAMESPACE, field_selector=f"spec.nodeName={doomed.name}"
            ).items:
                with contextlib.suppress(ApiException):
                    core.delete_namespaced_pod(
                        pod.metadata.name, NAMESPACE, body=client.V1DeleteOptions(grace_period_seconds=0)
                    )
    delete_and_check_nothing_left_here(custom, api_client, names)
    wait_both_ready(core)


def test_a_rolling_upgrade_loses_no_kernel_and_launches_during_it_succeed(
    helm: Path,
    installed: Installed,
    kubeconfig: Path,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    docker_engine: DockerEngine,
    operator_image: str,
    node_images: Callable[[str], str],
) -> None:
    """``helm upgrade`` to another image tag while kernels run and others launch: both pods are
    replaced one by one, no kernel is lost or fails, and the Lease moves to a new pod."""
    core = client.CoreV1Api(api_client)
    wait_both_ready(core)
    before = {p.metadata.name for p in ready_pods(core)}
    repository, _ = operator_image.split(":")
    upgraded = f"{repository}:upgrade"
    subprocess.run(["docker", "tag", operator_image, upgraded], env=docker_engine.env, check=True)
    node_images(upgraded)
    running: dict[str, str] = {}
    during: dict[str, str] = {}
    with removed_on_failure(custom, api_client, running, during):
        _upgrade_while_launching(helm, installed, kubeconfig, api_client, custom, before, running, during)
    delete_and_check_nothing_left_here(custom, api_client, {**running, **during})


def _upgrade_while_launching(
    helm: Path,
    installed: Installed,
    kubeconfig: Path,
    api_client: client.ApiClient,
    custom: client.CustomObjectsApi,
    before: set[str],
    running: dict[str, str],
    during: dict[str, str],
) -> None:
    core = client.CoreV1Api(api_client)
    running.update(chart_kernels(custom, ssh=4, pods=2))
    all_running_and_answering(custom, api_client, running)
    sets = set_args([*installed.values, "image.tag=upgrade"])
    upgrade = subprocess.Popen(
        [str(helm), "upgrade", RELEASE, str(CHART), "-n", NAMESPACE, *sets, "--wait", "--timeout", "5m"],
        env=helm_env(kubeconfig),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    began = time.monotonic()
    while upgrade.poll() is None and time.monotonic() - began < 300:
        during.update(chart_kernels(custom, ssh=1, pods=0))  # a launch every couple of seconds
        time.sleep(2)
    output = upgrade.communicate(timeout=60)[0]
    assert upgrade.returncode == 0, output
    after = {p.metadata.name for p in ready_pods(core)}
    assert len(after) == 2 and not before & after, (before, after)
    wait_for(lambda: lease_holder(api_client) in after, timeout=30, what="a new pod to lead")
    for pod in core.list_namespaced_pod(
        NAMESPACE, label_selector=f"app.kubernetes.io/instance={RELEASE}"
    ).items:
        if pod.metadata.name in after:
            assert pod.spec.containers[0].image.endswith(":upgrade")
    all_running_and_answering(custom, api_client, running)
    all_running_and_answering(custom, api_client, during)
    print(
        f"chart: rolling upgrade with {len(running)} kernels running and {len(during)} launched during it: none lost"
    )
    assert len(during) >= 3, during


# -- single-namespace mode and uninstall -------------------------------------------------------


def test_the_single_namespace_release_runs_kernels_with_only_namespaced_rights(
    helm: Path,
    installed: Installed,
    kubeconfig: Path,
    api_client: client.ApiClient,
    tmp_path: Path,
) -> None:
    namespace, release = "rko-chart-ns", "solo"
    ensure_namespace(api_client, namespace)
    values = [
        *installed.values,
        "operatorClass=chart-solo",
        "singleNamespace=true",
        "kernels.checkNodes=false",
    ]
    # No pod for this release's Deployment: its operator runs as a process, below.
    values.append("nodeSelector.kernel-operator\\.io/none=none")
    sets = set_args(values)
    run_helm(helm, "install", release, str(CHART), "-n", namespace, *sets, kubeconfig=kubeconfig)
    try:
        fullname = f"{release}-remote-kernel-operator"
        authz = client.AuthorizationV1Api(api_client)

        def allowed(verb: str, resource: str, ns: str | None, group: str = "") -> bool:
            review = client.V1SubjectAccessReview(
                spec=client.V1SubjectAccessReviewSpec(
                    user=f"system:serviceaccount:{namespace}:{fullname}",
                    resource_attributes=client.V1ResourceAttributes(
                        verb=verb, resource=resource, namespace=ns, group=group
                    ),
                )
            )
            return bool(authz.create_subject_access_review(review).status.allowed)

        assert allowed("create", "pods", namespace)
        assert not allowed("create", "pods", NAMESPACE)
        assert not allowed("list", "remotekernels", None, GROUP)
        assert not allowed("get", "nodes", None)
        env = process_env(installed_manifest(helm, release, namespace, kubeconfig), "chart-solo")
        sa_kubeconfig = service_account_kubeconfig(
            api_client, kubeconfig, namespace, fullname, tmp_path / "sa.kubeconfig"
        )
        proc = OperatorProcess(sa_kubeconfig, tmp_path / "operator.log", env)
        proc.start()
        try:
            custom = client.CustomObjectsApi(api_client)
            name, _ = make_kernel(
                namespace, custom, labels={f"{GROUP}/operator-class": "chart-solo"}, backend="kubernetes"
            )
            wait_for(
                lambda: ((get(custom, namespace, name) or {}).get("status") or {}).get("phase") == "Running",
                timeout=60,
                what="the kernel to run",
            )
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            wait_for(
                lambda: get(custom, namespace, name) is None, timeout=30, what="the kernel to be deleted"
            )
        finally:
            proc.stop()
        denied = denied_lines(proc.log())
        assert not denied, denied
    finally:
        run_helm(helm, "uninstall", release, "-n", namespace, "--wait", kubeconfig=kubeconfig)


def test_uninstall_leaves_nothing_but_the_crd(
    helm: Path,
    installed: Installed,
    kubeconfig: Path,
    api_client: client.ApiClient,
    docker_engine: DockerEngine,
) -> None:
    run_helm(helm, "uninstall", RELEASE, "-n", NAMESPACE, "--wait", kubeconfig=kubeconfig)
    selector = f"app.kubernetes.io/instance={RELEASE}"
    core, apps, rbac = (
        client.CoreV1Api(api_client),
        client.AppsV1Api(api_client),
        client.RbacAuthorizationV1Api(api_client),
    )

    def left() -> list[str]:
        found = []
        for kind, listing in [
            ("Deployment", apps.list_namespaced_deployment(NAMESPACE, label_selector=selector)),
            ("Pod", core.list_namespaced_pod(NAMESPACE, label_selector=selector)),
            ("Service", core.list_namespaced_service(NAMESPACE, label_selector=selector)),
            ("ServiceAccount", core.list_namespaced_service_account(NAMESPACE, label_selector=selector)),
            ("Secret", core.list_namespaced_secret(NAMESPACE, label_selector=selector)),
            ("Role", rbac.list_role_for_all_namespaces(label_selector=selector)),
            ("RoleBinding", rbac.list_role_binding_for_all_namespaces(label_selector=selector)),
            ("ClusterRole", rbac.list_cluster_role(label_selector=selector)),
            ("ClusterRoleBinding", rbac.list_cluster_role_binding(label_selector=selector)),
            (
                "ValidatingAdmissionPolicy",
                client.AdmissionregistrationV1Api(api_client).list_validating_admission_policy(
                    label_selector=selector
                ),
            ),
            (
                "NetworkPolicy",
                client.NetworkingV1Api(api_client).list_namespaced_network_policy(
                    NAMESPACE, label_selector=selector
                ),
            ),
        ]:
            found += [f"{kind} {item.metadata.name}" for item in listing.items]
        if operator_processes():
            found.append("the operator's processes")
        with contextlib.suppress(ApiException):
            client.CoordinationV1Api(api_client).read_namespaced_lease(LEASE, NAMESPACE)
            found.append(f"Lease {LEASE}")
        return found

    wait_for(lambda: not left(), timeout=60, what=f"the release's objects to be gone (left: {left()})")
    ext = client.ApiextensionsV1Api(api_client)
    assert ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}").metadata.name == f"{PLURAL}.{GROUP}"
    assert ext.read_custom_resource_definition(f"remotekernelprofiles.{GROUP}").spec.scope == "Cluster"
