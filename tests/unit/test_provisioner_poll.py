"""poll() and wait(): what a kernel's manager asks while the kernel runs and when it ends
(RemoteKernels, the client's I/O seam, is a fake playing the operator's part)."""

from __future__ import annotations

from typing import Any

import pytest

from remote_kernel_provisioner import provisioner as provisioner_module

from .test_provisioner_sealed import FakeKernels, kernels, provisioner

__all__ = ["kernels"]  # the fixture, used by name


class Reads(FakeKernels):
    """Answers reads with the phase the test sets, and counts them."""

    def __init__(self) -> None:
        super().__init__("ns")
        self.phase = "Running"
        self.reads = 0

    async def get(self, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return None if self.phase == "gone" else {"status": {"phase": self.phase}}

    async def delete(self, name: str) -> None:
        self.phase = "gone"

    async def watch_until(
        self, name: str, done: Any, timeout: float, start: Any = None
    ) -> dict[str, Any] | None:
        if start is None and self.phase == "gone":  # waiting for the deletion
            assert done(None)
            return None
        return await super().watch_until(name, done, timeout, start)


@pytest.fixture
def reads(kernels: FakeKernels, monkeypatch: pytest.MonkeyPatch) -> Reads:
    fake = Reads()

    async def connect(namespace: str, kubeconfig: str | None = None) -> Reads:
        return fake

    monkeypatch.setattr(provisioner_module.RemoteKernels, "connect", staticmethod(connect))
    return fake


async def test_right_after_its_launch_a_kernel_is_alive_without_a_read(
    reads: Reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    # wait_for_ready, and Jupyter Server at a kernel's first websocket, ask at once.
    p = provisioner()
    await p.launch_kernel([])
    assert await p.poll() is None and reads.reads == 0
    monkeypatch.setattr(provisioner_module, "RUNNING_FRESH_SECONDS", 0.0)  # the moment has passed
    reads.phase = "Failed"
    assert await p.poll() == 1 and reads.reads == 1
    reads.phase = "gone"
    assert await p.poll() == 0
    await p.close()


async def test_a_shutdown_waits_for_the_end_the_api_reports_not_for_the_launchs_sighting(
    reads: Reads,
) -> None:
    p = provisioner()
    await p.launch_kernel([])
    reads.phase = "Succeeded"  # the kernel ended at its shutdown_request, just after its launch
    assert await p.wait() == 0 and reads.reads == 1
    await p.close()


async def test_a_kernel_never_created_or_deleted_is_not_alive(reads: Reads) -> None:
    p = provisioner()
    assert await p.poll() == 0 and await p.wait() == 0
    await p.launch_kernel([])
    await p.kill()
    assert await p.poll() == 0 and await p.wait() == 0
    await p.close()
