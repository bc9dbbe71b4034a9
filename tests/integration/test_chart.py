"""The Helm chart: lint and render, then install it into the real control plane (RBAC on).

The installed operator runs twice over: as the chart's Deployment, in its image, in a pod the
real kubelet runs (with the pod's own ServiceAccount token, a read-only root filesystem, no
capabilities, probes run by the kubelet); and as a process holding a token of the chart's ServiceAccount, restarted once
per RBAC rule with that rule removed, to show that every rule is needed. Both serve their own
operator class, so the session's operator and they never touch each other's kernels.
"""

from __future__ import annotations

import copy
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
from .test_operator_ssh import GROUP, PLURAL, VERSION, get, make_kernel, ready_client, start_remote_kernel

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


def run_helm(
    helm: Path, *args: str, kubeconfig: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
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
    result = subprocess.run([str(helm), *args], env=env, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def set_args(values: list[str] | tuple[str, ...]) -> list[str]:
    """helm's --set arguments for ``values`` (each "key=value")."""
    return [arg for value in values for arg in ("--set", value)]


def render(helm: Path, *values: str) -> list[dict[str, Any]]:
    sets = set_args(values)
    out = run_helm(
        helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", KUBE_VERSION, *sets
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
    own = [r for r in of_kind(docs, "Role") if r["metadata"]["namespace"] == NAMESPACE]
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


def test_the_deployment_is_hardened_and_never_runs_two_operators(helm: Path) -> None:
    docs = render(helm, "ssh.hosts={h1,h2}", "ssh.secretName=creds", "extraEnv.RKO_MONITOR_INTERVAL=2")
    (deployment,) = of_kind(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["port"] == "health"
    env = container_env(docs)
    assert env["RKO_SSH_HOSTS"] == "h1,h2" and env["RKO_SSH_SECRET"] == "creds"
    assert env["RKO_MONITOR_INTERVAL"] == "2"
    assert env["RKO_RESPONSE_ADDRESS"] == f"{FULLNAME}.{NAMESPACE}.svc:8877"
    (service,) = of_kind(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 8877


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


def operator_pod(core: client.CoreV1Api) -> Any:
    """The chart's operator pod once the kubelet reports it Ready (its readiness probe passed)."""
    for pod in core.list_namespaced_pod(
        NAMESPACE, label_selector=f"app.kubernetes.io/instance={RELEASE}"
    ).items:
        conditions = {c.type: c.status for c in pod.status.conditions or []}
        if pod.status.phase == "Running" and conditions.get("Ready") == "True":
            return pod
    return None


def operator_process() -> int | None:
    """The machine's pid of the operator running in the chart's pod (found by its settings)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"remote-kernel-operator" not in (entry / "cmdline").read_bytes():
                continue
            if b"RKO_OPERATOR_CLASS=chart\0" in (entry / "environ").read_bytes() + b"\0":
                return int(entry.name)
        except OSError:
            continue
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
    # Ready is the kubelet's verdict from the chart's readiness probe (kopf's /healthz).
    pod = wait_for(lambda: operator_pod(core), timeout=90, what="the operator's pod to be Ready")

    def logs() -> str:
        return str(core.read_namespaced_pod_log(pod.metadata.name, NAMESPACE))  # through the kubelet

    wait_for(
        lambda: "The operator is ready" in logs(), timeout=60, what="the operator in its pod to be ready"
    )
    # What the container runtime made of the securityContext, read from the process itself.
    pid = operator_process()
    assert pid is not None
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
    assert healthy(pod.status.pod_ip, installed.probe_port)
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
        RKO_LIVENESS_ENDPOINT="",
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

    def run() -> str:
        offset = len(proc.log())
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
    for rule, broke in results.items():
        print(f"without {rule}: {broke[:160]}")
    unneeded = [rule for rule, broke in results.items() if not broke]
    assert not unneeded, f"rules nothing needed: {unneeded}"
    assert len(results) >= 9, results


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
        if operator_process() is not None:
            found.append("the operator's process")
        return found

    wait_for(lambda: not left(), timeout=60, what=f"the release's objects to be gone (left: {left()})")
    ext = client.ApiextensionsV1Api(api_client)
    assert ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}").metadata.name == f"{PLURAL}.{GROUP}"
    assert ext.read_custom_resource_definition(f"remotekernelprofiles.{GROUP}").spec.scope == "Cluster"
