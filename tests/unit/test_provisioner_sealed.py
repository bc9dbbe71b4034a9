"""The provisioner reads a kernel's key from status when it was sealed to this process's key,
and from the Secret otherwise (RemoteKernels, the client's I/O seam, is a fake playing the
operator's part)."""

from __future__ import annotations

import base64
import logging
from typing import Any

import pytest

from kernel_launchers import protocol, sealed_connection
from remote_kernel_provisioner import provisioner as provisioner_module
from remote_kernel_provisioner.client_key import ProcessKey
from remote_kernel_provisioner.cluster import RemoteKernels
from remote_kernel_provisioner.provisioner import RemoteKernelProvisioner

from .test_server_extension import FakeServerApp

HMAC_KEY = b"the-hmac-key"


class FakeKernels:
    """Creates Running RemoteKernels the way the operator writes them."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.secret_reads: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.tamper = False

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        self.bodies.append(body)
        return {
            **body,
            "metadata": {**body["metadata"], "uid": f"uid-{len(self.bodies)}", "resourceVersion": "1"},
        }

    async def warm(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def watch_until(self, name: str, done: Any, timeout: float, start: Any = None) -> dict[str, Any]:
        obj = dict(start)
        connection: dict[str, Any] = {
            "ip": "127.0.0.1",
            "shellPort": 1,
            "iopubPort": 2,
            "stdinPort": 3,
            "controlPort": 4,
            "hbPort": 5,
            "secretRef": {"name": f"{name}-connection", "key": "key"},
        }
        client_key = obj["spec"].get("clientPublicKey")
        if client_key:
            uid = "another-uid" if self.tamper else obj["metadata"]["uid"]
            data = {"key": HMAC_KEY}
            connection["sealed"] = sealed_connection.seal(
                data, sealed_connection.parse_public_key(client_key), uid
            )
        obj["status"] = {"phase": "Running", "connection": connection}
        assert done(obj)
        return obj

    async def secret_data(self, name: str) -> dict[str, str]:
        self.secret_reads.append(name)
        return {"key": base64.b64encode(HMAC_KEY).decode()}


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> FakeKernels:
    fake = FakeKernels("ns")

    async def connect(namespace: str, kubeconfig: str | None = None) -> FakeKernels:
        return fake

    monkeypatch.setattr(RemoteKernels, "connect", staticmethod(connect))
    monkeypatch.setattr(provisioner_module, "PROCESS_KEY", ProcessKey())  # this test's process key
    return fake


def provisioner() -> RemoteKernelProvisioner:
    p = RemoteKernelProvisioner(kernel_id="6c9c8d0e-1111-2222-3333-444455556666", namespace="ns")
    p._username, p._kernel_env, p._encryption = "alice", {}, None
    return p


async def _launch(p: RemoteKernelProvisioner) -> dict[str, Any]:
    info = await p.launch_kernel([])
    await p.close()
    return dict(info)


async def test_the_first_launch_reads_the_secret_and_the_next_ones_open_the_sealed_key(
    kernels: FakeKernels,
) -> None:
    # The first launch of a process does not wait for its key: no key in the spec, the Secret read.
    info = await _launch(provisioner())
    assert "clientPublicKey" not in kernels.bodies[0]["spec"] and len(kernels.secret_reads) == 1
    assert info["key"] == HMAC_KEY
    # It started making the key meanwhile; the next launches carry it and read no Secret.
    key = provisioner_module.PROCESS_KEY.wait(10)
    assert key is not None
    info = await _launch(provisioner())
    assert kernels.bodies[1]["spec"]["clientPublicKey"] == key[1]
    assert len(kernels.secret_reads) == 1 and info["key"] == HMAC_KEY


async def test_a_sealed_key_that_does_not_open_is_read_from_the_secret_instead(
    kernels: FakeKernels, caplog: pytest.LogCaptureFixture
) -> None:
    provisioner_module.PROCESS_KEY.wait(10)
    kernels.tamper = True  # sealed for another RemoteKernel: moved from elsewhere
    with caplog.at_level(logging.WARNING):
        info = await _launch(provisioner())
    assert info["key"] == HMAC_KEY and len(kernels.secret_reads) == 1
    assert "does not open" in caplog.text


async def test_a_kernel_created_with_another_processs_key_is_read_from_the_secret(
    kernels: FakeKernels,
) -> None:
    """A restarted Jupyter server attaching: its new process key is not the one in the spec."""
    provisioner_module.PROCESS_KEY.wait(10)
    other = sealed_connection.encode_public_key(protocol.public_key_of(protocol.new_private_key()))
    p = provisioner()
    obj = await kernels.watch_until(
        p.name,
        lambda o: True,
        1,
        start=await kernels.create({"metadata": {"name": p.name}, "spec": {"clientPublicKey": other}}),
    )
    await p._load_connection(obj)
    assert p.connection_info["key"] == HMAC_KEY and kernels.secret_reads == [f"{p.name}-connection"]


async def test_a_process_that_cannot_make_its_key_reads_secrets_as_before(
    kernels: FakeKernels, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> bytes:
        raise OSError("no entropy")

    monkeypatch.setattr(protocol, "new_private_key", broken)
    with caplog.at_level(logging.WARNING):
        assert provisioner_module.PROCESS_KEY.wait(10) is None
    assert "Could not make this process's key" in caplog.text
    info = await _launch(provisioner())
    assert "clientPublicKey" not in kernels.bodies[0]["spec"] and info["key"] == HMAC_KEY
    assert len(kernels.secret_reads) == 1


async def test_a_server_with_the_extension_loaded_launches_its_first_kernel_sealed(
    kernels: FakeKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The extension makes the key before the server serves, however slow the machine: a key
    # still being made in a thread when the first kernel came was seen in CI.
    from remote_kernel_provisioner import server_extension

    monkeypatch.setattr(server_extension, "PROCESS_KEY", provisioner_module.PROCESS_KEY)
    server_extension._load_jupyter_server_extension(FakeServerApp())
    assert provisioner_module.PROCESS_KEY.ready() is not None
    info = await _launch(provisioner())
    assert kernels.bodies[0]["spec"]["clientPublicKey"] == provisioner_module.PROCESS_KEY.ready()[1]
    assert kernels.secret_reads == [] and info["key"] == HMAC_KEY
