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

    async def list_pods_versioned(
        self, namespace: str | None, selector: str
    ) -> tuple[list[dict[str, Any]], str]:
        return [RUNNING_POD], "1"

    async def watch_pods(self, namespace: str | None, selector: str, version: str, timeout: int) -> Any:
        await asyncio.Event().wait()  # nothing changes
        yield "MODIFIED", RUNNING_POD

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


class ManyPods(NodesForbidden):
    """A hundred kernel pods on one ready node; counts what the backend asks the API."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.lists = 0
        self.pods = [{**RUNNING_POD, "metadata": {"name": f"k{i}", "namespace": "ns"}} for i in range(100)]

    async def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return None

    async def list_pods_versioned(
        self, namespace: str | None, selector: str
    ) -> tuple[list[dict[str, Any]], str]:
        self.lists += 1
        return self.pods, "1"

    async def node_ready(self, name: str) -> bool:
        self.node_reads += 1
        return True


def test_a_hundred_kernels_cost_one_list_and_one_node_read_not_two_hundred_reads() -> None:
    """Each kernel used to read its pod and its node every second: 2,000 reads a second for
    1,000 kernels. One watch serves every pod; a node is read once per interval."""
    kube = ManyPods()
    backend = KubernetesBackend(kube, OperatorSettings(check_nodes=True, monitor_interval=60))

    async def poll() -> list[str]:
        states = await asyncio.gather(
            *(backend.status({"kind": "Pod", "namespace": "ns", "name": f"k{i}"}) for i in range(100))
        )
        # A pod the watch has not seen yet (just created) is read directly, not reported gone.
        states.append(await backend.status({"kind": "Pod", "namespace": "ns", "name": "new"}))
        return [s.state for s in states]

    states = asyncio.run(poll())
    assert states[:100] == ["running"] * 100 and states[100] == "gone"
    assert (kube.lists, kube.node_reads, kube.reads) == (1, 1, 1)


def test_closing_the_backends_ends_their_own_tasks_so_a_stop_does_not_wait_for_them() -> None:
    """kopf waits 5 s on every stop for tasks still running, then cancels them: the pod watch
    (and the ssh backend's reapers of local launchers) made each stop of the operator 5 s long."""
    from kernel_operator.backends import Backends

    async def run() -> tuple[int, int]:
        backends = Backends(OperatorSettings(), NodesForbidden())
        await backends.get("kubernetes").status({"kind": "Pod", "namespace": "ns", "name": "k1"})
        ssh = backends.get("ssh")
        sleeper = await asyncio.create_subprocess_exec("sleep", "30")
        reaper = asyncio.get_running_loop().create_task(sleeper.wait())
        ssh._reapers.add(reaper)  # type: ignore[attr-defined]  # as a local launch registers it
        before = len([t for t in asyncio.all_tasks() if not t.done()])
        await backends.aclose()
        await asyncio.sleep(0)
        after = len([t for t in asyncio.all_tasks() if not t.done()])
        sleeper.kill()
        await sleeper.wait()
        return before, after

    before, after = asyncio.run(run())
    assert (before, after) == (3, 1), (before, after)  # the watch, the reaper, and this task
