"""The kubernetes backend's reading of pod state, at our own Kube seam (no API server)."""

from __future__ import annotations

import asyncio
from typing import Any

from kernel_operator.backends.base import BackendRef
from kernel_operator.backends.kubernetes import KubernetesBackend
from kernel_operator.kube import Kube
from kernel_operator.settings import OperatorSettings

RUNNING_POD: dict[str, Any] = {
    "metadata": {"name": "k1", "namespace": "ns"},
    "spec": {"nodeName": "n1"},
    "status": {"phase": "Running"},
}


class NodesForbidden(Kube):
    """A Kube whose ServiceAccount may read pods but not Nodes (the namespaced modes)."""

    def __init__(self) -> None:  # no API client: every call used here is overridden
        self.node_reads = 0

    async def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return RUNNING_POD

    async def node_ready(self, name: str) -> bool:
        self.node_reads += 1
        return False  # a lost node: the kernel would fail if this were consulted


def status_with(check_nodes: bool) -> tuple[str, int]:
    kube = NodesForbidden()
    backend = KubernetesBackend(kube, OperatorSettings(check_nodes=check_nodes))
    ref: BackendRef = {"kind": "Pod", "namespace": "ns", "name": "k1"}
    return asyncio.run(backend.status(ref)).state, kube.node_reads


def test_without_node_checks_the_node_is_never_read() -> None:
    state, reads = status_with(check_nodes=False)
    assert reads == 0
    assert state != "failed"


def test_with_node_checks_a_lost_node_fails_the_kernel() -> None:
    state, reads = status_with(check_nodes=True)
    assert reads == 1
    assert state == "failed"
