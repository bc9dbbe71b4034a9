"""The provisioners of one process share one API connection per loop, namespace and kubeconfig
(RemoteKernels.connect, the client's I/O seam, is replaced by a counting fake)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from remote_kernel_provisioner.cluster import RemoteKernels
from remote_kernel_provisioner.connections import SharedConnections


class FakeKernels:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.closed = False

    async def close(self) -> None:
        self.closed = True


class Connects:
    """The calls to RemoteKernels.connect; namespaces in ``failing`` fail once."""

    def __init__(self) -> None:
        self.made: list[tuple[str, str | None]] = []
        self.failing: set[str] = set()

    async def __call__(self, namespace: str, kubeconfig: str | None = None) -> Any:
        self.made.append((namespace, kubeconfig))
        await asyncio.sleep(0.01)  # other provisioners ask meanwhile
        if namespace in self.failing:
            self.failing.discard(namespace)
            raise OSError("no route to the API server")
        return FakeKernels(namespace)


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> Connects:
    fake = Connects()
    monkeypatch.setattr(RemoteKernels, "connect", staticmethod(fake))
    return fake


async def test_a_burst_of_provisioners_makes_one_connection_closed_by_the_last(
    connects: Connects,
) -> None:
    shared = SharedConnections()
    got = await asyncio.gather(*(shared.acquire("ns", "/kc") for _ in range(50)))
    assert len(connects.made) == 1 and all(k is got[0] for k in got)
    other = await shared.acquire("other-ns", "/kc")  # another namespace: its own
    assert other is not got[0] and len(connects.made) == 2
    for kernels in got[:-1]:
        await shared.release(kernels)
    assert not got[0].closed  # still in use by one
    await shared.release(got[-1])
    assert got[0].closed
    again = await shared.acquire("ns", "/kc")  # a later kernel: a new connection
    assert again is not got[0] and len(connects.made) == 3


async def test_a_failed_connection_fails_its_waiters_and_the_next_try_connects_again(
    connects: Connects,
) -> None:
    shared = SharedConnections()
    connects.failing.add("ns")
    results = await asyncio.gather(*(shared.acquire("ns", "/kc") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results) and len(connects.made) == 1
    kernels = await shared.acquire("ns", "/kc")
    assert isinstance(kernels, FakeKernels) and len(connects.made) == 2


def test_each_event_loop_has_its_own_connection(connects: Connects) -> None:
    shared = SharedConnections()
    first = asyncio.run(shared.acquire("ns", "/kc"))
    second = asyncio.run(shared.acquire("ns", "/kc"))
    assert first is not second and len(connects.made) == 2


async def test_a_shared_connection_has_no_limit_on_concurrent_requests(tmp_path: Any) -> None:
    """Each starting kernel holds a watch on it: aiohttp's default limit of 100 connections
    made the 101st kernel of a burst wait for a free one, and its start time out."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    kernels = await RemoteKernels.connect("ns", str(kubeconfig))
    try:
        assert kernels.api.rest_client.pool_manager.connector.limit == 0  # aiohttp: unlimited
    finally:
        await kernels.close()


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:%d", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t%d}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


async def test_a_kubeconfig_is_parsed_once_until_the_file_changes(tmp_path: Any) -> None:
    """Each event loop makes its own connection (nbclient and jupyter console run a loop per
    kernel), but the file is not parsed again unless it changed."""
    import os

    from remote_kernel_provisioner.cluster import _configuration

    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG % (6443, 1))
    first = await _configuration(str(path))
    assert await _configuration(str(path)) is first
    assert first.host == "https://127.0.0.1:6443"
    path.write_text(KUBECONFIG % (7443, 22))  # another size; the time may not move on coarse clocks
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    second = await _configuration(str(path))
    assert second is not first and second.host == "https://127.0.0.1:7443"
    assert second.api_key.get("BearerToken", second.api_key.get("authorization", "")).endswith("t22")
