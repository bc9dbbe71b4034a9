"""Fixtures that start the real servers the integration tests run against.

The Kubernetes control plane is started once per test session (a real etcd, kube-apiserver,
kube-controller-manager and kube-scheduler) and every test gets a fresh namespace.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from docker.models.containers import Container
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from localcluster import ClusterError, LocalCluster, free_port
from localcluster.docker import DockerEngine
from localcluster.gateway_provisioners import gp_install, gp_venv
from localcluster.hosts import HostPool
from localcluster.node import FIXED_PATHS, KubeletNode
from localcluster.servers import OperatorProcess, Sshd
from tests.helpers import REPO_ROOT, wait_for
from tests.profiles import ensure_profile

_timings: dict[str, float] = {}
_notes: list[str] = []  # printed after the run, e.g. where a screenshot is


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    started = time.monotonic()
    try:
        cluster.start()
    except ClusterError as err:
        pytest.fail(f"The local control plane did not start: {err}")
    _timings["cluster start (s)"] = time.monotonic() - started
    state = cluster.load_state()
    assert state is not None
    pids = dict(state.pids)
    yield cluster
    cluster.stop()
    left = [name for name, pid in pids.items() if Path(f"/proc/{pid}").exists()]
    assert not left, f"cluster processes still running after stop: {left}"


@pytest.fixture(scope="session")
def kubeconfig(local_cluster: LocalCluster) -> Path:
    return local_cluster.admin_kubeconfig


@pytest.fixture(scope="session")
def api_client(kubeconfig: Path) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(kubeconfig))
    yield api
    api.close()


@pytest.fixture
def custom(api_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


@pytest.fixture
def namespace(api_client: client.ApiClient) -> Iterator[str]:
    """A fresh namespace with its default ServiceAccount; deleted afterwards."""
    core = client.CoreV1Api(api_client)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    def has_default_sa() -> bool:
        return any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items)

    wait_for(has_default_sa, what=f"the default ServiceAccount in {name}")
    yield name
    core.delete_namespace(name)


def ensure_namespace(api_client: client.ApiClient, name: str) -> None:
    """Create namespace ``name`` unless another fixture already did."""
    try:
        client.CoreV1Api(api_client).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
        )
    except ApiException as err:
        assert err.status == 409, err


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for what, value in _timings.items():
        terminalreporter.write_line(f"{what}: {value:.2f}")
    for note in _notes:
        terminalreporter.write_line(note)


CRD_FILE = REPO_ROOT / "crds" / "remotekernels.kernel-operator.io.yaml"
CRD_FILES = sorted((REPO_ROOT / "crds").glob("*.yaml"))


@pytest.fixture(scope="session")
def crd(api_client: client.ApiClient) -> None:
    """The RemoteKernel and RemoteKernelProfile CRDs, installed from crds/ and served."""
    ext = client.ApiextensionsV1Api(api_client)
    for path in CRD_FILES:
        try:
            ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))
        except ApiException as err:
            assert err.status == 409, err  # already applied by another test: the same file
    custom = client.CustomObjectsApi(api_client)

    def served() -> bool:
        try:
            custom.list_cluster_custom_object("kernel-operator.io", "v1alpha1", "remotekernels")
            custom.list_cluster_custom_object("kernel-operator.io", "v1alpha1", "remotekernelprofiles")
            custom.list_cluster_custom_object("kernel-operator.io", "v1alpha1", "remotekernelpools")
        except ApiException as err:
            assert err.status in (404, 429, 503), err
            return False
        return True

    wait_for(served, what="the RemoteKernel and RemoteKernelProfile CRDs to be served")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def host_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostPool]:
    """Three ssh hosts (h1..h3) and a stranger with two addresses, each in its own network,
    PID and mount namespaces with its own sshd and host key."""
    pool = HostPool(tmp_path_factory.mktemp("hosts"), names=("h1", "h2", "h3", "stranger"))
    started = time.monotonic()
    pool.start(extra_addresses={"stranger": 1})
    _timings["ssh test hosts start (s)"] = time.monotonic() - started
    yield pool
    left = {name: host.kernel_processes() for name, host in pool.hosts.items() if host.kernel_processes()}
    pool.stop()
    assert not left, f"kernel processes left on the test hosts: {left}"


@pytest.fixture(scope="session")
def operator(
    crd: None,
    api_client: client.ApiClient,
    kubeconfig: Path,
    sshd: Sshd,
    docker_engine: DockerEngine,
    node_network: KubeletNode,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """The operator, running against the local cluster with the admin's rights."""
    ensure_namespace(api_client, "rko-system")
    proc = OperatorProcess(
        kubeconfig=kubeconfig,
        log_path=tmp_path_factory.mktemp("operator") / "operator.log",
        env={
            "RKO_NAMESPACE": "rko-system",
            # A fixed port, so a restarted operator is found by launchers already running; on
            # the test node's gateway, which its pods reach (and this machine's kernels too).
            "RKO_RESPONSE_BIND": f"{node_network.addresses.gateway}:{free_port()}",
            "RKO_MONITOR_INTERVAL": "0.5",
            "RKO_SSH_KEY_FILE": str(sshd.client_key),
            "RKO_SSH_KNOWN_HOSTS": str(sshd.known_hosts),
            "RKO_SSH_PORT": str(sshd.port),
            # Kernels on "localhost" run as the operator's children: enabled here, off by default.
            "RKO_SSH_LOCAL_HOSTS": "localhost",
            "RKO_SSH_HOSTS": "localhost",
            "RKO_DOCKER_HOST": docker_engine.host,
            # Host networking on this machine: kernels are reached on loopback only.
            "RKO_DOCKER_KERNEL_IP": "127.0.0.1",
        },
    )
    # The cluster's default profile: kernels on this machine, for RemoteKernels naming none.
    ensure_profile(
        api_client, {"backend": "ssh", "ssh": {"hosts": ["localhost"]}}, name="default-ssh", default=True
    )
    proc.start()
    yield proc
    # Delete every RemoteKernel while the operator runs, so its finalizers clean up; a stopped
    # operator leaves kernels running by design (they survive operator restarts).
    delete_remote_kernels(api_client)
    proc.stop()
    left = launcher_processes()
    assert not left, f"launcher or kernel processes left after the session: {left}"


def delete_remote_kernels(api_client: client.ApiClient, operator_class: str | None = None) -> None:
    """Delete every RemoteKernel (of ``operator_class`` when given) and wait until the operator
    serving them has cleaned up."""
    custom = client.CustomObjectsApi(api_client)
    selector = f"kernel-operator.io/operator-class={operator_class}" if operator_class else ""
    which = f"{operator_class}-class RemoteKernel" if operator_class else "RemoteKernel"

    def mine() -> list[dict[str, Any]]:
        found = custom.list_cluster_custom_object(
            "kernel-operator.io", "v1alpha1", "remotekernels", label_selector=selector
        )
        return list(found["items"])

    for item in mine():
        meta = item["metadata"]
        try:
            custom.delete_namespaced_custom_object(
                "kernel-operator.io", "v1alpha1", meta["namespace"], "remotekernels", meta["name"]
            )
        except ApiException as err:
            assert err.status == 404, err
    wait_for(lambda: not mine(), timeout=60, what=f"every {which} to be cleaned up by its operator")


def launcher_processes() -> list[str]:
    """Command lines of every kernel launcher or ipykernel started by the tests."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (
            "kernel_launchers.python_launcher" in cmdline or "ipykernel_launcher" in cmdline
        ):
            found.append(cmdline)
    return found


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """Debian's dockerd with a private data root (images cached in .cache/docker)."""
    engine = DockerEngine()
    engine.start()
    # The data root outlives a run: a run killed part-way (a CI job cancelled) leaves its kernel
    # containers there, and dockerd brings them back. They are not this run's to report.
    earlier = _remove_kernel_objects(docker.DockerClient(base_url=engine.host))
    if earlier:
        print(f"Removed kernel containers and services an interrupted earlier run left: {earlier}")
    yield engine
    engine.stop()


def _kernel_objects(engine: Any) -> list[Any]:
    """Every kernel container (in any state) and Swarm service on ``engine``."""
    label = {"label": "kernel-operator.io/kernel-id"}
    services = engine.services.list(filters=label) if _swarm_active(engine) else []
    return [*engine.containers.list(ignore_removed=True, all=True, filters=label), *services]


def _remove_kernel_objects(engine: Any) -> list[str]:
    """Remove every kernel container and Swarm service on ``engine``; their descriptions."""
    found = _kernel_objects(engine)
    for leftover in found:
        with contextlib.suppress(docker.errors.APIError):
            if isinstance(leftover, Container):
                leftover.remove(force=True)
            else:
                leftover.remove()
    return [
        f"{type(o).__name__} {o.name} {o.attrs.get('State', {}).get('Status', '')}".strip() for o in found
    ]


@pytest.fixture(scope="session")
def kernel_image(docker_engine: DockerEngine) -> str:
    """The Python kernel image, built locally once (hack/images/build-kernel-image.sh)."""
    return docker_engine.build_kernel_image()


@pytest.fixture(scope="session")
def gp_kernelspecs(
    tmp_path_factory: pytest.TempPathFactory, kernel_image: str, scala_kernel_image: str
) -> Path:
    """Every kernelspec gateway_provisioners' installers make here, as an administrator ran them;
    the Jupyter data directory that holds them."""
    gp_venv()
    prefix = tmp_path_factory.mktemp("gp")
    installs: list[tuple[str, str, list[str]]] = [
        ("jupyter-k8s-spec", "gp_k8s_py", ["--image-name", kernel_image]),
        ("jupyter-k8s-spec", "gp_k8s_scala", ["--language", "Scala", "--image-name", scala_kernel_image]),
        ("jupyter-k8s-spec", "gp_k8s_spark_crd", ["--spark", "--crd", "--image-name", kernel_image]),
        ("jupyter-docker-spec", "gp_docker_py", ["--image-name", kernel_image]),
        ("jupyter-docker-spec", "gp_swarm_py", ["--swarm", "--image-name", kernel_image]),
        ("jupyter-ssh-spec", "gp_ssh_py", ["--remote-hosts", "127.0.0.1", "--authorized-users", "alice"]),
        ("jupyter-yarn-spec", "gp_yarn_spark", []),
        ("jupyter-yarn-spec", "gp_yarn_scala", ["--language", "Scala"]),
        # With this option 0.5.0 leaves its template unfilled ("language": "${language}").
        ("jupyter-yarn-spec", "gp_yarn_endpoint", ["--yarn-endpoint", "http://127.0.0.1:1/ws/v1/cluster"]),
    ]
    for installer, name, options in installs:
        gp_install(installer, prefix, name, *options)
    # Its ssh installer cannot make an R kernelspec at all (0.5.0 ships no R launcher for it).
    with pytest.raises(RuntimeError, match="kernel-launchers/r"):
        gp_install("jupyter-ssh-spec", prefix, "gp_ssh_r", "--language", "R", "--remote-hosts", "127.0.0.1")
    return prefix / "share" / "jupyter"


@pytest.fixture(scope="session")
def r_kernel_image(docker_engine: DockerEngine) -> str:
    """The R kernel image (R, IRkernel and our launcher), built locally once."""
    return docker_engine.build_kernel_image("r")


@pytest.fixture(scope="session")
def gp_bootstrap_image(docker_engine: DockerEngine) -> str:
    """A kernel image as gateway_provisioners' jupyter-image-bootstrap makes one, plus our wheel."""
    return docker_engine.build_kernel_image("gp-bootstrap")


@pytest.fixture(scope="session")
def scala_kernel_image(docker_engine: DockerEngine) -> str:
    """The Scala kernel image (Java 17, Spark from pyspark, Apache Toree, our launcher), built
    locally once."""
    return docker_engine.build_kernel_image("scala")


# What others than a node put in a node's fixed host paths (see node_network).
MACHINE_ENTRIES = {"/run/containerd": {"s"}}


@pytest.fixture(scope="session")
def node_network(
    local_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KubeletNode]:
    """The test node's network namespace and addresses (plumbed before the operator starts,
    which listens on its gateway); ``kube_node`` starts containerd and the kubelet in it."""
    before = {path for path in FIXED_PATHS.values() if Path(path).exists()}
    node = KubeletNode(tmp_path_factory.mktemp("node"), local_cluster, name="node-1", index=0)
    node.plumb()
    yield node
    node.stop()
    assert not node_leftovers(node), node_leftovers(node)
    # The fixed host paths were the node's folder inside it: on the machine, nothing of the
    # node's. A path made meanwhile may stay only empty of it: `ip netns add` makes /run/netns
    # and keeps it, and dockerd's container shims keep their sockets in /run/containerd/s
    # (seen on a fresh machine, where neither existed before the suite).
    for path in {p for p in FIXED_PATHS.values() if Path(p).exists()} - before:
        left = {entry.name for entry in Path(path).iterdir()} - MACHINE_ENTRIES.get(path, set())
        assert not left, f"{path} holds {sorted(left)} after the node stopped"


def node_leftovers(node: KubeletNode) -> list[str]:
    """What a stopped node may not leave: its namespace, veth, processes or cgroup folders."""
    left = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    if node.netns in netns.split():
        left.append(f"network namespace {node.netns}")
    if Path(f"/sys/class/net/{node.veth}").exists():
        left.append(f"interface {node.veth}")
    left += [str(p) for p in Path("/sys/fs/cgroup").glob("*/k8s.io")]
    routes = subprocess.run(
        ["ip", "route", "show", "type", "unreachable"], capture_output=True, text=True
    ).stdout
    left += [f"route {line.strip()}" for line in routes.splitlines() if "198.18." in line]
    left += [cmd for cmd in _command_lines() if str(node.root) in cmd]
    return left


def _command_lines() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.fixture(scope="session")
def kube_node(
    node_network: KubeletNode, docker_engine: DockerEngine, kernel_image: str, api_client: client.ApiClient
) -> Iterator[str]:
    """A real node (the upstream kubelet with containerd and runc) holding the kernel image."""
    started = time.monotonic()
    node_network.start(docker_engine.env)
    _timings["node start (s)"] = time.monotonic() - started
    started = time.monotonic()
    node_network.import_images(kernel_image, docker_env=docker_engine.env)
    _timings["kernel image import into the node (s)"] = time.monotonic() - started
    yield node_network.name
    # Pods still bound to the node (a failed test's) are stopped with it.
    core = client.CoreV1Api(api_client)
    for pod in core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node_network.name}").items:
        with contextlib.suppress(ApiException):
            core.delete_namespaced_pod(
                pod.metadata.name, pod.metadata.namespace, body=client.V1DeleteOptions(grace_period_seconds=0)
            )


@pytest.fixture(scope="session")
def node_images(
    kube_node: str, node_network: KubeletNode, docker_engine: DockerEngine
) -> Callable[[str], str]:
    """Import one more image from the suite's Docker engine into the node (once)."""
    imported: set[str] = set()

    def ensure(ref: str) -> str:
        if ref not in imported:
            node_network.import_images(ref, docker_env=docker_engine.env)
            imported.add(ref)
        return ref

    return ensure


@pytest.fixture(scope="session")
def swarm(docker_engine: DockerEngine) -> Iterator[DockerEngine]:
    """Swarm mode on the suite's engine, advertised and listening on loopback only."""

    subprocess.run(
        ["docker", "swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377"],
        env=docker_engine.env,
        capture_output=True,
        check=False,  # already a manager after an interrupted run: that is fine
    )
    info = subprocess.run(
        ["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"],
        env=docker_engine.env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert info.stdout.strip() == "active", info
    yield docker_engine
    subprocess.run(
        ["docker", "swarm", "leave", "--force"], env=docker_engine.env, capture_output=True, check=False
    )


@pytest.fixture
def no_kernel_leftovers(docker_engine: DockerEngine) -> Iterator[None]:
    """After each test (and its namespace's deletion), no kernel container or service remains."""
    yield
    engine = docker.DockerClient(base_url=docker_engine.host)
    # What is left is named, then removed: the next test starts clean and fails only for its own.
    wait_for(
        lambda: not _kernel_objects(engine),
        timeout=60,
        what="every kernel container and service to be removed (those left are removed now)",
        found=lambda: _remove_kernel_objects(engine),
    )


def _swarm_active(engine: Any) -> bool:
    return bool(engine.info().get("Swarm", {}).get("LocalNodeState") == "active")
