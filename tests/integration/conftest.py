"""Fixtures that start the real servers the integration tests run against.

The Kubernetes control plane is started once per test session (a real etcd, kube-apiserver,
kube-controller-manager and kube-scheduler) and every test gets a fresh namespace.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from localcluster import ClusterError, LocalCluster
from tests.helpers import wait_for

_timings: dict[str, float] = {}


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for what, value in _timings.items():
        terminalreporter.write_line(f"{what}: {value:.1f}")
